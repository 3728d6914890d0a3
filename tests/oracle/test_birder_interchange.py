"""Interchange with birder 0.8.4, checked against birder itself: its own DINOv2 training script writes the full
training weights that biodino imports, and its own loader reads what biodino exports in its layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from biodino.data.pack import PackOptions, pack
from biodino.checkpoint import full_weights
from biodino.interop import birder as birder_format
from biodino.interop.init_weights import load_full_weights
from biodino.cli.main import main
from biodino.interop.export import (TrainingState, backbone_from_state, export_backbone, export_full, load_backbone,
                                  load_training_state)
from biodino.config.recipe import load_config
from biodino.checkpoint.safe_load import CheckpointError
from biodino.run.trainer import build_module
from tests.images import save_photo

birder_train = pytest.importorskip("birder.scripts.train_dino_v2")  # dev extra: always present in CI
from birder.common import fs_ops  # noqa: E402
from birder.conf import settings  # noqa: E402
from birder.model_registry import registry  # noqa: E402
from birder.net.base import get_signature  # noqa: E402

# birder's SoViT-150M/14 config cut down to our `vit_tiny_reg4_p14` (patch 14, 4 registers, LayerScale).
TINY_VIT = {"num_layers": 2, "hidden_dim": 64, "num_heads": 2, "mlp_dim": 160}
# The same heads on both sides: DINO 96 prototypes, separate iBOT head with 80, hidden 48, bottleneck 32.
TINY_RECIPE = ["model.preset=vit_tiny_reg4_p14", "crops.global_size=56", "crops.local_size=28", "crops.num_local=2",
               "objective.centering=softmax", "objective.dino.head.num_prototypes=96",
               "objective.dino.head.hidden_dim=48", "objective.dino.head.bottleneck_dim=32",
               "objective.ibot.separate_head=true", "objective.ibot.head.num_prototypes=80",
               "objective.ibot.head.hidden_dim=48", "objective.ibot.head.bottleneck_dim=32"]
CPU = torch.device("cpu")


def _birder_train(root: Path, **extra) -> Path:
    """birder's ``train_dino_v2`` on CPU (its fake data, 2 images a step), in this process, saving under
    ``root/models``; ``extra`` are its arguments by name (``epochs``, ``resume_epoch``, ...)."""
    args = birder_train.args_from_dict(**{
        "network": "vit_reg4_so150m_p14_ls", "model_config": dict(TINY_VIT), "tag": "t", "size": [56],
        "local_crop_size": [28], "local_crops_number": 2, "dino_out_dim": 96, "ibot_out_dim": 80,
        "ibot_separate_head": True, "head_bottleneck_dim": 32, "dino_head_hidden_dim": 48, "batch_size": 2,
        "epochs": 1, "steps_per_epoch": 2, "warmup_teacher_temp_epochs": 0, "freeze_last_layer_epochs": 0,
        "device": "cpu", "num_workers": 0, "use_fake_data": True, "non_interactive": True, "no_summary": True,
        "opt": "adamw", "lr": 1e-3, "seed": 0, **extra})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(settings, "MODELS_DIR", root / "models")
        mp.setattr(settings, "TRAINING_RUNS_PATH", root / "runs")
        (root / "models").mkdir(exist_ok=True)
        birder_train.train(args)
    return root / "models"


@pytest.fixture(scope="module")
def birder_models(tmp_path_factory) -> Path:
    """birder's training for 2 steps: ``dino_v2_vit_reg4_so150m_p14_ls_t_1.pt`` (full state) and
    ``vit_reg4_so150m_p14_ls_dino-v2-t_1.pt`` (its teacher backbone)."""
    return _birder_train(tmp_path_factory.mktemp("birder"))


@pytest.fixture(scope="module")
def birder_full(birder_models) -> Path:
    return birder_models / "dino_v2_vit_reg4_so150m_p14_ls_t_1.pt"


def _birder_tiny(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """birder's own ViT with the tiny config, holding ``state``."""
    net = registry.net_factory("vit_reg4_so150m_p14_ls", 0, config=dict(TINY_VIT), size=(56, 56))
    net.load_state_dict(state)
    return net.eval()


def test_birder_full_state_layout_and_our_shapes(birder_full, tmp_path) -> None:
    ckpt = torch.load(birder_full, map_location="cpu", weights_only=True)
    state = ckpt["state"]
    assert ckpt["signature"] == {"inputs": [{"data_shape": [0, 3, 56, 56]}], "outputs": [{"data_shape": [0]}]}
    assert ckpt["task"] == "self_supervised_learning" and ckpt["class_to_idx"] == {}
    assert state["student.mask_token"].shape == (1, 1, 1, 64)
    assert state["dino_loss.center"].shape == (1, 96) and state["ibot_patch_loss.center"].shape == (1, 1, 80)
    assert state["dino_loss.center"].abs().sum() > 0  # two steps: the centers have moved
    weights = birder_format.module_weights(state, birder_full)
    assert weights["teacher.mask_token"].shape == (64,)
    assert weights["dino_center.center"].shape == (1, 96) and weights["ibot_center.center"].shape == (1, 80)
    # Back to birder's layout: tensor for tensor, shape for shape, the file birder wrote.
    again = torch.load(export_full(load_training_state(birder_full), tmp_path / "rt.pt", "birder"), weights_only=True)
    assert again["signature"] == ckpt["signature"] and set(again["state"]) == set(state)
    for key, value in state.items():
        assert again["state"][key].shape == value.shape and torch.equal(again["state"][key], value), key


def test_one_layer_heads_take_birders_key_names(tmp_path) -> None:
    from birder.net.ssl.dino_v2 import DINOHead

    theirs = {f"student.dino_head.{k}": v for k, v in DINOHead(64, 96, False, 1, 48, 32).state_dict().items()}
    module = build_module(load_config("tiny", [*TINY_RECIPE, "objective.dino.head.nlayers=1"]))
    ours = birder_format.birder_state(module.state_dict())
    assert {k for k in ours if k.startswith("student.dino_head.")} == set(theirs)
    again = birder_format.module_weights(ours, tmp_path / "x.pt")
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in full_weights.module_keys(
        full_weights.weights_of(module.state_dict())).items()}


@pytest.fixture(scope="module")
def biodino_run(birder_full, tmp_path_factory) -> Path:
    """``biodino train`` (in this process) started from birder's full weights: 2 steps, teacher momentum 1."""
    root = tmp_path_factory.mktemp("biodino")
    for i in range(8):
        save_photo(root / "img" / f"{i}.jpg", seed=300 + i, width=64, height=64)
    pack([str(root / "img")], PackOptions(out=root / "shards", prefix="s", max_count=4, min_side=16))
    args = ["train", "tiny", *TINY_RECIPE, f"data.shards={root / 'shards' / 's.json'}", f"runs_dir={root}",
            "name=from_birder", f"init.full_weights={birder_full}", "objective.momentum_teacher=1.0",
            "objective.final_momentum_teacher=1.0", "schedule.epochs=1", "schedule.steps_per_epoch=2",
            "schedule.batch_size=2", "checkpoint.every_n_steps=2", "data.num_workers=0"]
    assert main(args) == 0
    return root / "from_birder"


def test_init_full_weights_loads_birder_weights_and_a_run_starts_from_them(birder_full, biodino_run) -> None:
    birder_state = torch.load(birder_full, weights_only=True)["state"]
    module = build_module(load_config("tiny", [*TINY_RECIPE, f"init.full_weights={birder_full}"]))
    load_full_weights(module, birder_full)
    loaded = module.state_dict()
    for key, value in birder_format.module_weights(birder_state, birder_full).items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(loaded["student.mask_token"], birder_state["student.mask_token"].flatten())
    torch.testing.assert_close(loaded["ibot_center.center"], birder_state["ibot_patch_loss.center"][0])
    # After two steps with teacher momentum 1 the run's teacher is still birder's, bit for bit.
    after = load_training_state(biodino_run)
    assert after.step == 2
    for key, value in birder_state.items():
        if key.startswith("teacher.") and not key.endswith("mask_token"):
            torch.testing.assert_close(after.weights[key], value, rtol=0, atol=0, msg=key)


def test_a_backbone_release_or_wrong_heads_are_refused_as_full_weights(birder_models, birder_full) -> None:
    module = build_module(load_config("tiny", TINY_RECIPE))
    with pytest.raises(CheckpointError, match="birder backbone release"):
        load_full_weights(module, birder_models / "vit_reg4_so150m_p14_ls_dino-v2-t_1.pt")
    other = build_module(load_config("tiny", [*TINY_RECIPE, "objective.ibot.head.num_prototypes=64"]))
    with pytest.raises(CheckpointError, match="ibot_head.last_layer"):
        load_full_weights(other, birder_full)


def test_export_of_birder_weights_equals_birder_teacher_and_student(birder_models, birder_full, tmp_path) -> None:
    assert main(["export", str(birder_full), "--out", str(tmp_path), "--tag", "t"]) == 0
    teacher, meta = load_backbone(tmp_path / "vit_tiny_reg4_p14_t_1.safetensors")
    assert meta["preset"] == "vit_tiny_reg4_p14" and meta["resolution"] == 56  # matched on the tensor shapes
    rgb = torch.load(birder_full, weights_only=True)["rgb_stats"]
    assert meta["normalization"] == {"mean": list(rgb["mean"]), "std": list(rgb["std"])}
    # birder's teacher, read by birder's loader from the backbone file its training script wrote.
    release = birder_models / "vit_reg4_so150m_p14_ls_dino-v2-t_1.pt"
    theirs, _ = fs_ops.load_model(CPU, "vit_reg4_so150m_p14_ls", path=release, config=dict(TINY_VIT), inference=True)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(teacher.embedding(x), theirs.embedding(x), rtol=1e-5, atol=1e-5)
        assert main(["export", str(birder_full), "--out", str(tmp_path), "--tag", "s", "--student"]) == 0
        student, _ = load_backbone(tmp_path / "vit_tiny_reg4_p14_s_1.safetensors")
        birder_state = torch.load(birder_full, weights_only=True)["state"]
        their_student = _birder_tiny({k[len("student.backbone."):]: v for k, v in birder_state.items()
                                      if k.startswith("student.backbone.")})
        torch.testing.assert_close(student.embedding(x), their_student.embedding(x), rtol=1e-5, atol=1e-5)
    assert main(["export", str(birder_full), "--out", str(tmp_path), "--preset", "vit_tiny_p16"]) == 2


def test_birder_format_export_of_a_biodino_run_loads_in_birder(biodino_run, tmp_path) -> None:
    assert main(["export", str(biodino_run), "--out", str(tmp_path), "--format", "birder", "--student"]) == 0
    path = tmp_path / "vit_tiny_reg4_p14_from_birder_2.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["signature"] == get_signature((1, 3, 56, 56), num_outputs=0)  # birder's backbone signature
    assert saved["task"] == "image_classification" and saved["class_to_idx"] == {}
    assert saved["rgb_stats"] == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    theirs, _ = fs_ops.load_model(CPU, "vit_b16", path=path, inference=True)  # any ViT name: config in the file
    ours = backbone_from_state(load_training_state(biodino_run), "student").eval()
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(theirs.embedding(x), ours.embedding(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,side", [("vit_reg4_so150m_p14_ls", 98), ("vit_b16_ls", 96)])
def test_seed_architectures_convert_both_ways_with_birder(preset: str, side: int, tmp_path) -> None:
    """birder's own network -> biodino (preset matched on shapes) -> birder's layout -> birder's loader."""
    theirs = registry.net_factory(preset, 0, size=(224, 224)).eval()
    theirs.set_dynamic_size()
    ckpt = {"state": theirs.state_dict(), "signature": get_signature((1, 3, 224, 224), num_outputs=0),
            "rgb_stats": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}, "task": "image_classification"}
    source = tmp_path / f"{preset}_release_7.pt"  # named as a birder file; never written: the dict is in memory
    state = TrainingState(*birder_format.training_state(ckpt, source), source)
    assert state.cfg.model.preset == preset and state.cfg.crops.global_size == 224 and state.step == 7
    ours = backbone_from_state(state).eval()
    x = torch.randn(1, 3, side, side)  # not the stored size: both resize the position embedding on the fly
    with torch.no_grad():
        reference = theirs.embedding(x)
        torch.testing.assert_close(ours.embedding(x), reference, rtol=1e-5, atol=1e-5)
    del theirs, ours
    path = export_backbone(state, tmp_path, fmt="birder", tag="rt")
    assert path.name == f"{preset}_rt_7.pt"
    back, info = fs_ops.load_model(CPU, preset, path=path, inference=True)
    back.set_dynamic_size()
    assert info.rgb_stats == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    with torch.no_grad():
        torch.testing.assert_close(back.embedding(x), reference, rtol=1e-5, atol=1e-5)


def test_birder_resumes_training_from_a_biodino_full_export(biodino_run, tmp_path) -> None:
    assert main(["export", str(biodino_run), "--out", str(tmp_path), "--full", "--format", "birder"]) == 0
    ours = tmp_path / "dino_v2_vit_tiny_reg4_p14_from_birder_2.pt"
    (tmp_path / "models").mkdir()
    shutil.copy(ours, tmp_path / "models" / "dino_v2_vit_reg4_so150m_p14_ls_t_2.pt")  # birder's name for its run
    models = _birder_train(tmp_path, epochs=3, resume_epoch=2, steps_per_epoch=1)  # strict load, one more epoch
    assert (models / "dino_v2_vit_reg4_so150m_p14_ls_t_3.pt").is_file()
