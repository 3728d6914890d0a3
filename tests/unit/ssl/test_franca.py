"""The Franca objective: per-level losses and queued Sinkhorn-Knopp against birder, the module end to end."""

from __future__ import annotations

import pytest
import torch

from biodino.data.datamodule import mask_sampler
from biodino.ssl.franca import FrancaModule
from biodino.data.masking import masked_positions
from biodino.ssl.losses import SinkhornQueue, dino_loss, ibot_loss, sinkhorn_knopp
from biodino.data.masking import CyclicMasking
from biodino.config.schema import FrancaConfig, HeadConfig
from biodino.interop.export import TrainingState, backbone_from_state, export_backbone, load_backbone
from tests.synthetic import Recorder, fit, tiny_config

ref = pytest.importorskip("birder.net.ssl.franca")  # dev extra: always present in CI
WIDTHS = [16, 32, 64]  # prototypes per level


def _franca_config(objective=None, **sections):
    franca = {"name": "franca", "centering": "sinkhorn_knopp", "franca": FrancaConfig(nesting_levels=3),
              "warmup_teacher_temp": 0.04, "teacher_temp": 0.04}
    cfg = tiny_config(objective={**franca, **(objective or {})}, **sections)
    cfg.objective.dino.head = HeadConfig(num_prototypes=64, hidden_dim=64, bottleneck_dim=32)
    return cfg


def test_queued_sinkhorn_per_level_matches_birder() -> None:
    n, temp = 20, 0.05
    logits = [torch.randn(n, k) for k in WIDTHS]
    queue = [torch.randn(12, k) for k in WIDTHS]
    expected = ref.SinkhornKnoppNormalizationMRL()(tuple(logits), tuple(queue), torch.tensor(temp), 3)
    for ours, theirs, lg, q in zip((sinkhorn_knopp(lg, temp, 3, queue=q) for lg, q in zip(logits, queue)),
                                   expected, logits, queue):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ours.sum(1), torch.ones(n))


def test_per_level_dino_and_ibot_sums_match_birder() -> None:
    B, n_local, temp = 5, 4, 0.1
    t = [torch.softmax(torch.randn(2 * B, k), -1) for k in WIDTHS]
    s_g = [torch.randn(2 * B, k) for k in WIDTHS]
    s_l = [torch.randn(n_local * B, k) for k in WIDTHS]
    swapped = [torch.cat([x[B:], x[:B]]) for x in t]  # birder's teacher returns [crop 1, crop 0]
    loss = ref.DINOLossMRL(temp, nesting_levels=3)
    terms = 2 + 2 * n_local
    expected = (loss(s_l, swapped, n_crops=(n_local, 2), teacher_global=False) / terms
                + loss(s_g, swapped, n_crops=2, teacher_global=True) * 2 / terms)
    ours = sum(dino_loss(g, lo, tt, temp) for g, lo, tt in zip(s_g, s_l, t))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0.0)

    masks = torch.rand(2 * B, 16) < 0.4
    M = int(masks.sum())
    s_p, t_p = [torch.randn(M, k) for k in WIDTHS], [torch.softmax(torch.randn(M, k), -1) for k in WIDTHS]
    w = masked_positions(masks, 0)[1]
    expected = ref.iBOTPatchLossMRL(temp, 3)(tuple(s_p), tuple(t_p), masks, w, M) * 2 * 0.5
    ours = sum(ibot_loss(s, tt, w, 2 * B, temp) for s, tt in zip(s_p, t_p))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0.0)


def test_queue_is_a_fifo_used_once_full() -> None:
    queue = SinkhornQueue(5, [2, 3])
    assert not queue.full
    queue.push([torch.full((3, 2), 1.0), torch.full((3, 3), 1.0)])
    assert not queue.full  # 3 of 5
    queue.push([torch.full((4, 2), 2.0), torch.full((4, 3), 2.0)])
    assert queue.full
    first, second = queue.levels()
    assert first.shape == (5, 2) and second.shape == (5, 3)
    assert sorted(first[:, 0].tolist()) == [1.0, 2.0, 2.0, 2.0, 2.0]  # the oldest row was replaced


def test_module_loss_is_the_sum_over_levels() -> None:
    cfg = _franca_config(model={"drop_path_rate": 0.0})
    module = FrancaModule(cfg)
    module.log = module.log_dict = lambda *a, **k: None
    captured = {}
    module.total_loss = lambda terms, weights: captured.update(terms) or sum(terms.values())
    assert module.student.dino_head.dims == [24, 48, 96] and module.student.dino_head.num_prototypes == [16, 32, 64]
    g, loc = torch.randn(8, 3, 32, 32), torch.randn(16, 3, 16, 16)
    masks = torch.rand(8, 16) < 0.3
    module.training_step(module.on_before_batch_transfer({"global_crops": g, "local_crops": loc, "masks": masks}, 0), 0)
    with torch.no_grad():
        t_out = module.teacher.backbone.forward_features(g)
        t = [sinkhorn_knopp(x, 0.04, 3) for x in module.teacher.dino_head(t_out.cls)]
        s_g = module.student.dino_head(module.student.backbone.forward_features(g, masks, module.student.mask_token).cls)
        s_l = module.student.dino_head(module.student.backbone.forward_features(loc).cls)
    per_level = [float(dino_loss(a, b, c)) for a, b, c in zip(s_g, s_l, t)]
    assert float(captured["dino"].detach()) == pytest.approx(sum(per_level), rel=1e-5)


def test_franca_uses_inverse_roll_masks_and_refuses_softmax_centering() -> None:
    assert isinstance(mask_sampler(_franca_config(), FrancaModule.mask_shape).generator, CyclicMasking)
    with pytest.raises(ValueError, match="sinkhorn_knopp"):
        FrancaModule(_franca_config(objective={"centering": "softmax"}))


def test_tiny_fit_decreases_the_loss_and_the_backbone_exports(tmp_path) -> None:
    cfg = _franca_config(optim={"base_lr": 0.05}, objective={"franca": FrancaConfig(nesting_levels=3, sinkhorn_queue_size=32)})
    module, rec = FrancaModule(cfg), Recorder()
    fit(module, cfg, steps=30, callbacks=[rec])
    total = [m["loss/total"] for m in rec.metrics]
    assert sum(total[-5:]) / 5 < sum(total[:5]) / 5 - 1.0, total
    assert bool(module.dino_queue.full)
    state = TrainingState(module.state_dict(), cfg, 30, tmp_path / "in-memory")
    reloaded, meta = load_backbone(export_backbone(state, tmp_path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.embedding(x), backbone_from_state(state).eval().embedding(x))
    assert meta["provenance"]["objective"] == "franca"


def test_the_bioscan_recipe_trains_with_tiny_overrides(tmp_path) -> None:
    """`biodino train configs/franca_bioscan5m.yaml` with tiny-preset overrides, on CPU."""
    from biodino.data.pack import PackOptions, pack
    from biodino.cli.main import main
    from biodino.config.recipe import load_config
    from biodino.config.resources import configs_dir
    from biodino.checkpoint.run_dir import RunDir
    from tests.images import save_photo

    cfg = load_config("franca_bioscan5m")
    assert (cfg.model.preset, cfg.objective.franca.nesting_levels, cfg.objective.franca.sinkhorn_queue_size) == ("vit_b16_ls", 4, 1280)
    assert cfg.global_batch_size == 1024 and cfg.crops.global_scale == (0.4, 1.0)
    assert cfg.objective.dino.head.bottleneck_dim == 320 and cfg.crops.normalize_mean == (0.5, 0.5, 0.5)
    for i in range(16):
        save_photo(tmp_path / "img" / f"{i}.jpg", seed=i, width=64, height=48)
    pack([str(tmp_path / "img")], PackOptions(out=tmp_path / "shards", prefix="s", min_side=16))
    tiny = ["model.preset=vit_tiny_p8", "crops.global_size=32", "crops.local_size=16", "crops.num_local=2",
            "objective.dino.head.num_prototypes=64", "objective.dino.head.hidden_dim=32",
            "objective.dino.head.bottleneck_dim=16", "objective.franca.nesting_levels=3", "objective.franca.sinkhorn_queue_size=8",
            "schedule.epochs=1", "schedule.steps_per_epoch=3", "schedule.batch_size=4",
            "schedule.accumulate_grad_batches=1", "trainer.devices=1", "trainer.accelerator=cpu",
            "trainer.precision=32-true", "data.num_workers=0", "data.pin_memory=false", "logging.wandb=disabled",
            f"data.shards={tmp_path / 'shards' / 's.json'}", f"runs_dir={tmp_path / 'runs'}"]
    assert main(["train", str(configs_dir() / "franca_bioscan5m.yaml"), *tiny]) == 0
    assert RunDir(tmp_path / "runs" / "franca_bioscan5m").newest_checkpoint().name == "step=0000003.ckpt"


def test_franca_weights_of_earlier_versions_with_softmax_centers_still_load(tmp_path) -> None:
    from biodino.checkpoint.full_weights import load_tensors

    module = FrancaModule(_franca_config())
    assert not any("center" in k for k in module.state_dict())  # Franca's targets are Sinkhorn-Knopp only
    old = {**module.state_dict(), "dino_center.center": torch.zeros(1, 64), "ibot_center.center": torch.zeros(1, 64)}
    fresh = FrancaModule(_franca_config())
    load_tensors(fresh, old, tmp_path / "old.safetensors")
    torch.testing.assert_close(fresh.teacher.dino_head.levels[0].proj.weight,
                               module.teacher.dino_head.levels[0].proj.weight)
    checkpoint = {"state_dict": dict(old)}
    fresh.on_load_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(module.state_dict())


def test_queue_push_skips_padding_and_a_queue_not_yet_full_takes_no_part() -> None:
    """Pushing rows with padding equals pushing the valid rows alone (the reference: a list kept by hand), and
    Sinkhorn with a queue whose ``full`` flag is false equals Sinkhorn without it."""
    size, kept = 5, []
    queue = SinkhornQueue(size, [2, 3])
    for step, n in enumerate([3, 4, 7, 1]):
        rows = torch.arange(n * 5, dtype=torch.float32).view(n, 5) + 100 * step
        valid = torch.rand(n) < 0.7
        queue.push([rows[:, :2], rows[:, 2:]], valid)
        kept = (kept + [r for r, v in zip(rows, valid) if v])[-size:]
        stored = sorted(map(tuple, torch.cat(queue.levels(), 1).tolist()))
        expected = sorted(map(tuple, [r.tolist() for r in kept] + [(0.0,) * 5] * (size - len(kept))))
        if len(kept) == size or not bool(queue.full):
            assert stored == expected, step
    logits, queued = torch.randn(6, 8), torch.randn(4, 8)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, 3, queue=queued, queue_valid=torch.tensor(False)),
                               sinkhorn_knopp(logits, 0.1, 3))
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, 3, queue=queued, queue_valid=torch.tensor(True)),
                               sinkhorn_knopp(logits, 0.1, 3, queue=queued))


def test_a_bfloat16_queue_stores_what_birders_amp_queue_stores() -> None:
    """The Franca recipe's bfloat16 queue (birder's ``sinkhorn_queue.to(amp_dtype)``): the same rows as birder's
    queue moved to bfloat16, fed the same pushes, and Sinkhorn reads them as the rounded values in fp32."""
    ref = pytest.importorskip("birder.net.ssl.franca")
    assert _franca_config().objective.franca.sinkhorn_queue_dtype == "float32"
    from biodino.config.recipe import load_config
    assert load_config("franca_bioscan5m").objective.franca.sinkhorn_queue_dtype == "bfloat16"
    ours = SinkhornQueue(6, [2, 3], torch.bfloat16)
    theirs = ref.SinkhornQueue(6, (2, 3)).to(torch.bfloat16)
    for n in (4, 4, 3):
        rows = torch.randn(n, 5) * 30
        ours.push([rows[:, :2], rows[:, 2:]])
        theirs((rows[:, :2], rows[:, 2:]))
    assert ours.rows.dtype == torch.bfloat16 and torch.equal(ours.rows, theirs.queue)
    logits = torch.randn(6, 5)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, 3, queue=ours.rows, queue_valid=ours.full),
                               sinkhorn_knopp(logits, 0.1, 3, queue=theirs.queue.float()))
