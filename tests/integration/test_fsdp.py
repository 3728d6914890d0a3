"""FSDP2 over gloo on CPU with real processes (torchrun): loss equality with one rank, DDP, reshardable
checkpoints across world sizes, export from a sharded checkpoint, and refusing pickled code in DCP metadata."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from biodino.ssl.grad_norm import clip_grad_norm_
from biodino.interop.export import export_backbone, load_backbone, load_training_state
from biodino.run.history import read_history
from biodino.checkpoint.run_dir import RunDir
from biodino.checkpoint.safe_load import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "fsdp_equivalence.py"


def torchrun(world: int, *args: str, timeout: float = 300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def equivalence_run(out: Path, world: int, strategy: str, *overrides: str) -> list[list[dict[str, float]]]:
    out.mkdir(parents=True, exist_ok=True)
    torchrun(world, str(SCRIPT), str(out), strategy, *overrides)
    return [json.loads((out / f"losses_rank{r}.json").read_text()) for r in range(world)]


def mean_over_ranks(per_rank: list[list[dict[str, float]]], key: str) -> list[float]:
    return [sum(rank[step][key] for rank in per_rank) / len(per_rank) for step in range(len(per_rank[0]))]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> list[list[dict[str, float]]]:
    return equivalence_run(tmp_path_factory.mktemp("fsdp1"), 1, "fsdp")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[list[dict[str, float]]]]:
    """Also with activation checkpointing per block: recomputation must not change the numbers."""
    out = tmp_path_factory.mktemp("fsdp2")
    return out, equivalence_run(out, 2, "fsdp", "model.grad_checkpointing=true")


def test_two_sharded_ranks_reproduce_one_rank_losses_on_the_same_global_batch(one_rank, two_ranks) -> None:
    _, two = two_ranks
    for key in ("loss/dino", "loss/ibot", "loss/total"):
        assert mean_over_ranks(two, key) == pytest.approx(mean_over_ranks(one_rank, key), abs=1e-5), key
    # the global gradient norm is the same on every rank and clipping binds (clip 0.05), so a per-shard norm
    # would change the updates and the later losses
    norms = [[step["grad_norm"] for step in rank] for rank in two]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    assert norms[0] == pytest.approx([step["grad_norm"] for step in one_rank[0]], rel=1e-4)
    assert min(norms[0]) > 0.05


def test_accumulation_reduce_scatters_once_per_optimizer_step_with_unchanged_losses(two_ranks, tmp_path) -> None:
    """Accumulating 2 micro-batches: the same reduce-scatters per optimizer step as without accumulation (one per
    sharded unit), and the losses of one rank accumulating the same micro-batches."""
    _, plain = two_ranks
    accumulating = equivalence_run(tmp_path / "two", 2, "fsdp", "schedule.accumulate_grad_batches=2")
    reference = equivalence_run(tmp_path / "one", 1, "fsdp", "schedule.accumulate_grad_batches=2")
    per_step = {step["reduce_scatters"] for rank in plain + accumulating for step in rank}
    assert len(per_step) == 1 and per_step.pop() > 0
    for key in ("loss/dino", "loss/ibot", "loss/total"):
        assert mean_over_ranks(accumulating, key) == pytest.approx(mean_over_ranks(reference, key), abs=1e-5), key
    assert mean_over_ranks(accumulating, "grad_norm") == pytest.approx(mean_over_ranks(reference, "grad_norm"), rel=1e-5)


def test_ddp_without_ibot_trains_with_the_mask_token_frozen(tmp_path) -> None:
    """DDP fails on parameters without gradients; without iBOT the mask token is frozen, not left unused."""
    one = equivalence_run(tmp_path / "one", 1, "ddp", "objective.ibot.weight=0")
    two = equivalence_run(tmp_path / "two", 2, "ddp", "objective.ibot.weight=0")
    assert mean_over_ranks(two, "loss/total") == pytest.approx(mean_over_ranks(one, "loss/total"), abs=1e-5)


def test_export_from_a_sharded_checkpoint_equals_the_consolidated_weights(two_ranks, tmp_path) -> None:
    out, _ = two_ranks
    consolidated = load_file(out / "consolidated.safetensors")
    state = load_training_state(out / "sharded.ckpt")
    assert state.weights.keys() == consolidated.keys()
    for key, value in consolidated.items():
        assert torch.equal(state.weights[key], value), key
    backbone, _ = load_backbone(export_backbone(state, tmp_path))
    prefix = "teacher.backbone."
    teacher = {k.removeprefix(prefix): v for k, v in consolidated.items() if k.startswith(prefix)}
    exported = backbone.state_dict()
    assert exported.keys() == teacher.keys()
    assert all(torch.equal(exported[k], teacher[k]) for k in teacher)


def _train(world: int, shards: Path, runs: Path, epochs: int, held_out: Path) -> None:
    torchrun(world, "-m", "biodino", "train", "tiny", f"data.shards={shards}", f"runs_dir={runs}", "name=reshard",
             "trainer.strategy=fsdp", f"trainer.devices={world}", f"schedule.epochs={epochs}",
             "schedule.steps_per_epoch=3", "checkpoint.every_n_steps=3", f"eval.data={held_out}", "eval.k=3",
             "logging.wandb=disabled")


def _monitored(run: RunDir, checkpoint: Path, held_out: Path) -> dict:
    """The monitor's metrics recomputed independently: the checkpoint's teacher exported and embedded."""
    from biodino.config.recipe import load_config
    from biodino.eval.embed import embed_images, eval_transform
    from biodino.eval.protocols import Options, Split, evaluate
    from biodino.run.monitor import EvalMonitor, held_out as held_out_images

    cfg = load_config(str(run.config))
    backbone, meta = load_backbone(export_backbone(load_training_state(checkpoint), checkpoint.parent.parent))
    paths, labels = held_out_images(str(held_out), cfg.eval.max_images)
    x = embed_images(backbone, paths, eval_transform(meta["resolution"], meta["normalization"]["mean"],
                                                     meta["normalization"]["std"]))
    y, monitor = torch.tensor(labels), EvalMonitor(cfg)
    return evaluate(Split(x[monitor.gallery], y[monitor.gallery]), Split(x[monitor.queries], y[monitor.queries]),
                    ["knn", "retrieval"], Options(k=3, seed=cfg.seed))


def test_a_sharded_checkpoint_resumes_on_one_rank_and_back_on_two(tiny_shards: Path, tmp_path) -> None:
    """Also with the online monitor: on 2 FSDP ranks its metrics are those of the consolidated teacher."""
    from tests.images import save_photo

    held_out = tmp_path / "held_out"
    for c in range(3):
        for i in range(4):
            save_photo(held_out / f"class{c}" / f"{i}.jpg", seed=50 * c + i, width=48, height=40)
    run = RunDir(tmp_path / "reshard")
    _train(2, tiny_shards, tmp_path, epochs=1, held_out=held_out)
    assert run.newest_checkpoint().name == "step=0000003.ckpt"
    assert sorted(p.name for p in run.newest_checkpoint().glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    first = _monitored(run, run.newest_checkpoint(), held_out)
    _train(1, tiny_shards, tmp_path, epochs=2, held_out=held_out)
    assert sorted(p.name for p in run.newest_checkpoint().glob("*.distcp")) == ["__0_0.distcp"]
    _train(2, tiny_shards, tmp_path, epochs=3, held_out=held_out)
    assert run.newest_checkpoint().name == "step=0000009.ckpt"
    history = read_history(run.history)
    assert sorted(history) == list(range(9))  # each resumed run continued at the saved step
    assert all(torch.isfinite(torch.tensor(history[s]["loss/total"])) for s in history)
    assert [s for s, m in history.items() if "eval/knn_top1" in m] == [2, 5, 8]
    for step, expected in ((2, first), (8, _monitored(run, run.newest_checkpoint(), held_out))):
        assert history[step]["eval/knn_top1"] == pytest.approx(expected["knn"]["top1"]), step
        assert history[step]["eval/retrieval_map"] == pytest.approx(expected["retrieval"]["map"], abs=1e-5), step


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_dcp_metadata_that_would_run_code_is_refused(two_ranks, tmp_path, monkeypatch) -> None:
    out, _ = two_ranks
    bad = tmp_path / "bad.ckpt"
    bad.mkdir()
    for f in (out / "sharded.ckpt").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        load_training_state(bad)
    assert not (tmp_path / "pwned").exists()


def test_clip_grad_norm_uses_the_norm_over_all_gradients() -> None:
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    norm = clip_grad_norm_([a, b, torch.zeros(1, requires_grad=True)], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0, 0, 0, 0.8]), atol=1e-6)


def test_compiled_blocks_compute_what_eager_blocks_compute() -> None:
    from biodino.config.recipe import load_config
    from biodino.distributed.sharding import compile_blocks
    from biodino.run.trainer import build_module

    student = build_module(load_config("tiny", [])).student
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        (eager,) = student([x])
        compile_blocks([student])
        (compiled,) = student([x])
    assert all(b._compiled_call_impl is not None for b in student.backbone.blocks)
    assert torch.allclose(compiled.cls, eager.cls, atol=1e-4)
    assert torch.allclose(compiled.patches, eager.patches, atol=1e-4)
