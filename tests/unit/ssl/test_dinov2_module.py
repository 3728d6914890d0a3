"""The DINOv2 LightningModule end to end on tiny presets: loss composition, EMA, freezing, a short fit."""

from __future__ import annotations

import json

import pytest
import lightning as L
import torch

from biodino.ssl import module as ssl_module
from biodino.ssl.dinov2 import DINOv2Module
from biodino.ssl.module import NonFiniteLossError
from biodino.config.schema import HeadConfig
from biodino.config.checks import check_ranges
from tests.synthetic import Recorder, fit, tiny_config


def test_total_is_the_weighted_sum_of_its_terms_and_teacher_follows_ema() -> None:
    cfg = tiny_config()
    module, rec = DINOv2Module(cfg), Recorder()
    fit(module, cfg, steps=3, callbacks=[rec])
    for m in rec.metrics:
        assert m["loss/total"] == pytest.approx(m["loss/dino"] + m["loss/ibot"] + 0.1 * m["loss/koleo"], rel=1e-5)
    for step, (before, (student, teacher)) in enumerate(zip(rec.teacher_before, rec.after)):
        mom = module.schedules.momentum(step)
        for k in before:
            torch.testing.assert_close(teacher[k], mom * before[k] + (1 - mom) * student[k], rtol=1e-5, atol=1e-7)
    assert not module.teacher.training and module.student.training


def test_last_layer_is_frozen_for_the_configured_steps() -> None:
    cfg = tiny_config(objective={"freeze_last_layer_epochs": 0.3})  # 3 of 10 steps per epoch
    module, rec = DINOv2Module(cfg), Recorder()
    key = "dino_head.last_layer.parametrizations.weight.original1"
    initial = module.student.state_dict()[key].clone()
    fit(module, cfg, steps=5, callbacks=[rec])
    per_step = [student[key] for student, _ in rec.after]
    assert all(torch.equal(w, initial) for w in per_step[:3])
    assert not torch.equal(per_step[3], initial)
    mlp = "dino_head.mlp.0.weight"
    assert not torch.equal(rec.after[1][0][mlp], rec.teacher_before[0][mlp])  # the rest trains from step 1 (lr(0) = 0)


def test_drop_grads_freezes_the_last_layer_as_birder_does_outside_adamw_and_the_clipping_norm(monkeypatch) -> None:
    """birder's freeze: the last layers' gradients are dropped before clipping, so AdamW keeps no moments for
    them and the clipped norm is that of the other gradients; after the freeze they train."""
    cfg = tiny_config(objective={"freeze_last_layer_epochs": 0.3, "last_layer_freeze": "drop_grads"})
    module, rec = DINOv2Module(cfg), Recorder()
    last = [p for n, p in module.student.named_parameters() if ".last_layer." in f".{n}"]
    key = "dino_head.last_layer.parametrizations.weight.original1"
    initial = module.student.state_dict()[key].clone()
    clipped: list[list[torch.Tensor]] = []
    real_clip = ssl_module.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        clipped.append([p for p in params if p.grad is not None])
        return real_clip(params, max_norm)

    monkeypatch.setattr(ssl_module, "clip_grad_norm_", spy)
    trainer = fit(module, cfg, steps=3, callbacks=[rec])
    assert all(torch.equal(student[key], initial) for student, _ in rec.after)
    optimizer = trainer.optimizers[0]
    assert all(not optimizer.state.get(p) for p in last)  # no AdamW state: never stepped
    assert len(clipped) == 3 and all(not any(q is p for p in last for q in step) for step in clipped)
    assert all(optimizer.state.get(p) for p in module.student.backbone.parameters())


def test_birder_warmup_starts_at_a_hundredth_of_the_peak_like_its_torch_schedulers() -> None:
    """birder's schedule: LinearLR(start_factor=0.01) over the warmup, then CosineAnnealingLR(T_max = steps -
    warmup - 1, eta_min) stepped once per optimizer step; compared with torch's own schedulers."""
    from biodino.ssl.schedules import Schedules

    cfg = tiny_config(optim={"warmup_start": 0.01, "warmup_epochs": 0.4, "min_lr": 1e-5})
    s, total, warmup = Schedules(cfg), cfg.schedule.total_steps, 4
    peak = s.lr(warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup - 1, eta_min=1e-5)], [warmup])
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [s.lr(t) for t in range(total)] == pytest.approx(expected, rel=1e-9)


def test_ema_runs_once_per_optimizer_step_under_accumulation(monkeypatch) -> None:
    calls = []
    real = ssl_module.ema_update_
    monkeypatch.setattr(ssl_module, "ema_update_", lambda t, s, m: (calls.append(m), real(t, s, m)))
    cfg = tiny_config(schedule={"accumulate_grad_batches": 2})
    trainer = fit(DINOv2Module(cfg), cfg, steps=3, accumulate=2)
    assert trainer.global_step == 3 and len(calls) == 3


def test_thirty_step_fit_decreases_the_loss() -> None:
    """Sinkhorn-Knopp targets are equipartitioned from step 0, so the DINO term itself must fall.

    (With softmax centering the DINO term first rises toward log K while the center, starting at 0,
    catches up with the collapsed LayerScale init; over 30 steps only KoLeo would fall.)
    """
    cfg = tiny_config(objective={"centering": "sinkhorn_knopp", "warmup_teacher_temp": 0.04, "teacher_temp": 0.04},
                      optim={"base_lr": 0.05})
    cfg.objective.dino.head = HeadConfig(num_prototypes=64, hidden_dim=64, bottleneck_dim=32)
    module, rec = DINOv2Module(cfg), Recorder()
    fit(module, cfg, steps=30, callbacks=[rec])
    total = [m["loss/total"] for m in rec.metrics]
    dino = [m["loss/dino"] for m in rec.metrics]
    assert len(total) == 30 and all(torch.isfinite(torch.tensor(total)))
    assert sum(total[-5:]) / 5 < sum(total[:5]) / 5 - 1.0, total
    assert sum(dino[-5:]) / 5 < sum(dino[:5]) / 5 - 0.3, dino


def test_sinkhorn_centering_with_a_separate_ibot_head_trains() -> None:
    cfg = tiny_config(objective={"centering": "sinkhorn_knopp"})
    cfg.objective.ibot.separate_head = True
    module, rec = DINOv2Module(cfg), Recorder()
    assert module.student.ibot_head is not None
    assert module.ibot_center.center.shape[-1] == 128
    fit(module, cfg, steps=3, callbacks=[rec])
    assert all(torch.isfinite(torch.tensor(m["loss/ibot"])) for m in rec.metrics)


def test_config_errors_name_their_key() -> None:
    with pytest.raises(ValueError, match=r"schedule.batch_size=1: KoLeo \(objective.koleo.weight=0.1\)"):
        DINOv2Module(tiny_config(schedule={"batch_size": 1}))
    with pytest.raises(ValueError, match="objective.centering: 'sinkhorn' is out of range"):
        check_ranges(tiny_config(objective={"centering": "sinkhorn"}))  # checked with the config, before any module
    no_koleo = tiny_config(schedule={"batch_size": 1})
    no_koleo.objective.koleo.weight = 0.0
    DINOv2Module(no_koleo)  # a batch of 1 is fine without KoLeo


def test_a_non_finite_step_is_never_applied_and_stops_the_run_naming_it(tmp_path) -> None:
    """Step 1's iBOT term turns NaN. Nothing is read on the host until the end, yet the optimizer applies neither
    step 1 nor any later one (the teacher keeps following the unchanged student), and the read names the step and
    the terms; no checkpoint is written."""
    from biodino.run.history import History

    cfg = tiny_config()
    module = DINOv2Module(cfg)
    real_total = module.total_loss

    def poisoned(terms, weights):
        if module.global_step == 1:
            terms = {**terms, "ibot": terms["ibot"] * float("nan")}
        return real_total(terms, weights)

    module.total_loss = poisoned
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    history = History(tmp_path / "history.jsonl", None, every=1000)
    with pytest.raises(NonFiniteLossError, match=r"step 1: loss/ibot, loss/total, grad_norm"):
        fit(module, cfg, steps=4, callbacks=[Snapshot(), history])
    after_step_0 = snapshots[0]
    for state in snapshots[1:]:
        for k in after_step_0:
            assert torch.isfinite(state[k]).all(), k
            if k.startswith("student."):
                assert torch.equal(state[k], after_step_0[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the failed steps are logged, for the record
    trainer = L.Trainer(logger=False, enable_checkpointing=False, callbacks=[history], accelerator="cpu")
    trainer.strategy.connect(module)
    module.log_step({"loss/total": torch.tensor(float("inf"))})
    with pytest.raises(NonFiniteLossError):
        trainer.save_checkpoint(tmp_path / "never.ckpt")
    assert not (tmp_path / "never.ckpt").exists()
