"""The training-step benchmark: its FLOP count against torch's FlopCounterMode over a real step, and a CPU smoke
run of the script printing its JSON line (CI does not time anything; the figures come from a GPU)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import train_step
from benchmarks.step_flops import head_flops, step_flops_per_image
from biodino.config.recipe import load_config
from biodino.data.datamodule import mask_sampler
from biodino.run.trainer import build_module


@pytest.mark.parametrize("recipe,extra", [("bio_dino_tiny/stage1", []), ("franca_bioscan5m", []),
                                          ("franca_bioscan5m", ["objective.franca.matryoshka_input=full"])])
def test_flops_per_image_match_the_flop_counter_over_a_real_step(recipe, extra) -> None:
    overrides = ["schedule.batch_size=4", "crops.num_local=8", *extra]
    if recipe.startswith("franca"):
        overrides += ["model.preset=vit_tiny_p16", "crops.global_size=64", "crops.local_size=32",
                      "objective.dino.head.num_prototypes=256", "objective.dino.head.hidden_dim=64",
                      "objective.dino.head.bottleneck_dim=32"]
    cfg = load_config(recipe, overrides)
    module = build_module(cfg)
    batch = module.on_before_batch_transfer(train_step.synthetic_batch(cfg), 0)
    batch["global_crops"] = module.photometric.normalize(batch["global_crops"])
    batch["local_crops"] = module.photometric.normalize(batch["local_crops"])
    module.log_step = lambda values: None
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as counted matmuls
        module.training_step(batch, 0).backward()
    masked = mask_sampler(cfg).capacity(8) / 4
    expected = step_flops_per_image(cfg, masked) * 4
    # the counter also sees the losses' small products (DINO cross terms, KoLeo), which MFU leaves out
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_the_benchmark_runs_on_cpu_and_prints_one_json_line(capsys) -> None:
    out = train_step.main(["--device", "cpu", "--preset", "bio_dino_tiny/stage1", "--batch", "2", "--steps", "2",
                           "--warmup", "1", "--no-birder"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == json.loads(json.dumps(out))
    b = out["biodino"]
    assert b["img_per_s"] > 0 and b["syncs_per_step"] == 0 and out["birder"] is None
    assert b["flops_per_img"] == pytest.approx(step_flops_per_image(load_config("bio_dino_tiny/stage1", [
        "schedule.batch_size=2"]), mask_sampler(load_config("bio_dino_tiny/stage1", [])).capacity(4) / 2))


@pytest.mark.parametrize("reads", ["prefix", "full"])
def test_franca_head_flops_count_what_the_level_inputs_read(reads) -> None:
    """One token through the Matryoshka head, counted by torch's FlopCounter: the per-level projection reads d_i
    features (prefix) or all of them (full), so the two variants differ there."""
    cfg = load_config("franca_bioscan5m", ["model.preset=vit_tiny_p16", f"objective.franca.matryoshka_input={reads}",
                                           "objective.dino.head.num_prototypes=256", "objective.dino.head.hidden_dim=64",
                                           "objective.dino.head.bottleneck_dim=32", "objective.ibot.separate_head=false"])
    head = build_module(cfg).student.dino_head
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(torch.randn(1, 64))
    assert counter.get_total_flops() == head_flops(cfg, cfg.objective.dino.head)
