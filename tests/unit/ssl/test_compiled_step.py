"""``trainer.compile``: every block of student and teacher runs compiled, global and local crops alike, without
recompiling per block (the hazard: per-block float drop-path rates made Dynamo recompile until its limit of 8 and
run the remaining blocks eagerly). Counted with a tracing-only backend: no code generation, so it runs in seconds."""

from __future__ import annotations

import copy

import torch
from torch._dynamo import register_backend

from biodino.config.recipe import load_config
from biodino.distributed.sharding import compile_blocks
from biodino.models import build_backbone
from biodino.run.trainer import build_module
from tests.synthetic import fit

GRAPHS: list[torch.fx.GraphModule] = []
CALLS = [0]


@register_backend
def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """Records each graph Dynamo hands over and counts the calls into it; runs the graph as traced."""
    GRAPHS.append(gm)

    def run(*args: object) -> object:
        CALLS[0] += 1
        return gm.forward(*args)

    return run


def _reset() -> None:
    torch._dynamo.reset()
    GRAPHS.clear()
    CALLS[0] = 0


def test_eighteen_blocks_with_rising_drop_path_rates_share_two_graphs() -> None:
    """The SoViT-150M depth (18) and recipe rate (0.4 at the last block), at tiny width: student (training, two
    crop sizes in one pass, backward) and teacher (eval, no grad) each compile once for all 18 blocks."""
    _reset()
    student = build_backbone("vit_tiny_p8", depth=18, drop_path_rate=0.4).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    for net in (student, teacher):
        for block in net.blocks:
            block.compile(backend="counting")
    assert len({blk.drop_path.p for blk in student.blocks}) == 18
    for _ in range(3):
        g, loc = torch.randn(8, 3, 32, 32), torch.randn(32, 3, 16, 16)  # 2 x 4 global, 8 x 4 local crops
        with torch.no_grad():
            teacher.forward_features(g)
        out_g, out_l = student.forward_features_list([g, loc], [None, None])
        (out_g.cls.sum() + out_l.cls.sum()).backward()
    assert len(GRAPHS) == 2  # one for the student's blocks, one for the teacher's
    assert CALLS[0] == 3 * (18 + 18)  # every block call of every step ran compiled


def test_a_compiled_training_run_of_the_stage_one_recipe_runs_every_block_compiled() -> None:
    """The tiny Bio-DINO stage-1 recipe with its 2 global + 8 local crops, trained with ``trainer.compile=true``:
    every block call and both losses run compiled, from one graph each."""
    _reset()
    cfg = load_config("bio_dino_tiny/stage1", ["trainer.compile=true", "trainer.compile_backend=counting",
                                                "schedule.batch_size=2", "crops.num_local=8"])
    assert cfg.crops.num_local == 8
    module = build_module(cfg)
    depth = len(module.student.backbone.blocks)
    fit(module, cfg, steps=3)
    # blocks: student and teacher; losses: DINO and iBOT, each one graph (fixed shapes, no recompiles)
    assert len(GRAPHS) == 2 + 2
    assert CALLS[0] == 3 * (2 * depth + 2)  # every block of both networks and both losses, every step


def test_compile_blocks_leaves_the_outputs_unchanged() -> None:
    _reset()
    net = build_backbone("vit_tiny_p8", depth=3, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = net.embedding(x)
        compile_blocks([type("N", (), {"backbone": net})()], backend="counting")
        compiled = net.embedding(x)
    assert CALLS[0] == 3
    torch.testing.assert_close(compiled, eager)
