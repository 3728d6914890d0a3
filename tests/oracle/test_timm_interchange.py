"""``biodino export --format timm`` checked against timm itself: the folder it writes builds timm's own
VisionTransformer from ``config.json`` alone, loads strictly, and gives biodino's embeddings and detection map.

Weights are random but far from biodino's initialization (LayerScale gammas of 0.1-0.6 instead of 1e-5, unit-scale
class and register tokens and position embedding, non-zero biases, non-unit norms), so a tensor in the wrong place or
a prefix token in the wrong order changes the outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from biodino.cli.main import main
from biodino.config.recipe import load_config
from biodino.config.schema import CropsConfig, ModelConfig, TrainConfig
from biodino.interop import timm as timm_format
from biodino.interop.export import TrainingState, backbone_from_state, export_backbone, export_full, load_training_state
from biodino.models import VisionTransformer, build_backbone
from biodino.run.trainer import build_module

timm = pytest.importorskip("timm")  # dev extra: always present in CI
from timm.data import resolve_model_data_config  # noqa: E402

try:  # timm's local-dir: model source (timm/models/_hub.py), absent from older releases
    from timm.models._hub import load_model_config_from_path  # noqa: F401
    HAS_LOCAL_DIR = True
except ImportError:
    HAS_LOCAL_DIR = False

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _randomize(key: str, shape: torch.Size) -> torch.Tensor:
    """A random value for backbone tensor ``key``, far from biodino's initialization."""
    if key.endswith(".gamma"):
        return torch.empty(shape).uniform_(0.1, 0.6)
    if key in ("class_token", "reg_tokens"):
        return torch.randn(shape)
    if key == "pos_embedding":
        return torch.randn(shape) * 0.5
    if len(shape) == 1 and "norm" in key and key.endswith(".weight"):
        return 1 + 0.1 * torch.randn(shape)
    return 0.02 * torch.randn(shape)


def _random_teacher(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "teacher.backbone."
    return {k: _randomize(k[len(prefix):], v.shape) if k.startswith(prefix) else v for k, v in weights.items()}


def _timm_from_config(folder: Path, meta: bool = False) -> tuple[torch.nn.Module, dict]:
    """What the export promises: ``create_model(architecture, num_classes=0, **model_args)`` and a strict load;
    ``meta`` builds the model on the meta device and assigns the tensors (no seconds in a random initialization)."""
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no partial files
    cfg = json.loads((folder / "config.json").read_text())
    with torch.device("meta" if meta else "cpu"):
        model = timm.create_model(cfg["architecture"], num_classes=0, **cfg["model_args"])
    result = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True, assign=meta)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval(), cfg


def _assert_same_network(ours: VisionTransformer, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    """Embedding (timm's pre-logits output) within 1e-5, and the last block's patch map."""
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_params()
    with torch.no_grad():
        embedding = theirs(x)
        assert embedding.shape == (x.shape[0], ours.embed_dim)
        assert (embedding - ours.embedding(x)).abs().max() < 1e-5
        _, maps = theirs.forward_intermediates(x, indices=1, norm=False, output_fmt="NCHW")
        torch.testing.assert_close(maps[-1], ours.detection_features(x)["stage1"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset,size,resolution,layer_scale", [
    ("vit_tiny_p8", 32, 48, False),  # exported at another resolution, without LayerScale
    ("vit_tiny_reg4_p14", 56, None, True),  # 4 registers: the prefix rows reordered
])
def test_cli_export_loads_in_timm(preset: str, size: int, resolution: Optional[int], layer_scale: bool,
                                  tmp_path, capsys) -> None:
    cfg = load_config("tiny", [f"model.preset={preset}", f"crops.global_size={size}", f"crops.local_size={size // 2}",
                               f"crops.normalize_mean={list(MEAN)}", f"crops.normalize_std={list(STD)}",
                               *([] if layer_scale else ["model.layer_scale_init=0"])])
    weights = _random_teacher(build_module(cfg).state_dict())
    full = export_full(TrainingState(weights, cfg, 7, tmp_path / "in-memory"), tmp_path / "run_full.safetensors")
    args = ["export", str(full), "--format", "timm", "--out", str(tmp_path / "out"),
            *(["--resolution", str(resolution)] if resolution else [])]
    assert main(args) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == tmp_path / "out" / f"{preset}_tiny_7"
    assert main(args) == 0  # again, over the same folder
    assert Path(capsys.readouterr().out.strip()) == folder

    ours = backbone_from_state(load_training_state(full)).eval()
    if resolution:
        ours.resize_pos_embed(resolution)
    side = ours.image_size
    theirs, config = _timm_from_config(folder)
    assert config["num_classes"] == 0 and config["model_args"]["img_size"] == side
    assert config["model_args"]["reg_tokens"] == ours.num_registers
    assert (config["model_args"]["init_values"] is not None) == layer_scale
    assert config["pretrained_cfg"]["input_size"] == [3, side, side]
    x = torch.randn(2, 3, side, side)
    _assert_same_network(ours, theirs, x)

    if ours.num_registers:  # the test would see a wrong token order: biodino's rows as they are differ clearly
        unordered = {**theirs.state_dict(), "pos_embed": ours.pos_embedding.detach()}
        wrong = timm.create_model(config["architecture"], num_classes=0, **config["model_args"]).eval()
        wrong.load_state_dict(unordered)
        with torch.no_grad():
            assert (wrong(x) - ours.embedding(x)).abs().max() > 1e-2

    if not HAS_LOCAL_DIR:
        pytest.skip(f"timm {timm.__version__} has no 'local-dir:' model source")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert loaded.num_classes == 0
    data = resolve_model_data_config(loaded)
    assert data["input_size"] == (3, side, side) and data["crop_pct"] == 1.0
    assert tuple(data["mean"]) == MEAN and tuple(data["std"]) == STD  # the run's normalization
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), theirs(x), atol=0, rtol=0)


@pytest.mark.parametrize("preset,params", [("vit_b16_ls", 85_817_088), ("vit_reg4_so150m_p14_ls", 133_623_712)])
def test_seed_architectures_in_timm(preset: str, params: int, tmp_path) -> None:
    with torch.device("meta"):  # shapes only: no time in an initialization that is overwritten
        shapes = {k: v.shape for k, v in build_backbone(preset).state_dict().items()}
    weights = {f"teacher.backbone.{k}": _randomize(k, shape) for k, shape in shapes.items()}
    cfg = TrainConfig(name="seed", model=ModelConfig(preset=preset), crops=CropsConfig(global_size=224))
    state = TrainingState(weights, cfg, 3, tmp_path / "in-memory")
    folder = export_backbone(state, tmp_path, fmt="timm")
    assert folder == tmp_path / f"{preset}_seed_3"

    ours = backbone_from_state(state).eval()
    assert ours.num_params() == params
    theirs, config = _timm_from_config(folder, meta=True)  # the tiny cases above build it as users do
    args = config["model_args"]
    hidden = ours.cfg.mlp_dim
    assert int(args["embed_dim"] * args["mlp_ratio"]) == hidden == theirs.blocks[0].mlp.fc1.out_features
    assert args["reg_tokens"] == ours.num_registers and args["patch_size"] == ours.patch_size
    _assert_same_network(ours, theirs, torch.randn(1, 3, 224, 224))


def test_key_map_covers_every_tensor_and_rejects_others() -> None:
    backbone = build_backbone("vit_tiny_reg4_p14")
    names = [timm_format.timm_key(k) for k in backbone.state_dict()]
    assert len(set(names)) == len(names)
    assert {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.ls2.gamma",
            "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias"} <= set(names)
    with pytest.raises(ValueError, match="no counterpart"):
        timm_format.timm_key("encoder.block.0.mlp.1.weight")
    assert int(896 * timm_format.mlp_ratio(896, 2320)) == 2320  # SoViT-150M: 2320 / 896 = 2.589...


def test_full_weights_in_timm_format_are_refused_before_reading_anything(tmp_path, capsys) -> None:
    from biodino.cli.main import main

    assert main(["export", str(tmp_path / "absent"), "--full", "--format", "timm", "--out", str(tmp_path)]) == 2
    assert "--format timm writes a backbone only" in capsys.readouterr().err and not list(tmp_path.iterdir())
