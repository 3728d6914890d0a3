"""Recipes: composition, overrides, and errors that name the key and exit 2 before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from biodino.cli.main import main
from biodino.config.recipe import ConfigError, load_config


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_compose_and_overrides_apply_last(tmp_path) -> None:
    _write(tmp_path / "model" / "small.yaml", "model:\n  preset: vit_tiny_p16\nschedule:\n  batch_size: 7\n")
    recipe = _write(tmp_path / "r.yaml", "defaults: [model/small]\nschedule:\n  epochs: 3\n")
    cfg = load_config(str(recipe), ["schedule.epochs=5", "crops.global_scale=[0.4,1.0]"])
    assert cfg.model.preset == "vit_tiny_p16" and cfg.schedule.batch_size == 7
    assert cfg.schedule.epochs == 5 and cfg.crops.global_scale == (0.4, 1.0)
    assert cfg.schedule.total_steps == 5 * 1250


def test_shipped_recipes_load() -> None:
    assert load_config("tiny").model.preset == "vit_tiny_p8"


@pytest.mark.parametrize(
    "recipe,overrides,message",
    [
        ("schedule:\n  batch_sise: 3\n", [], r"r.yaml: schedule.batch_sise: Key 'batch_sise' not in 'ScheduleConfig'"),
        ("schedule:\n  batch_size: many\n", [], r"r.yaml: schedule.batch_size: Value 'many'"),
        ("name: x\n", ["optim.base_lr=fast"], r"command line: optim.base_lr: Value 'fast'"),
        ("name: x\n", ["trainer.devicez=2"], r"command line: trainer.devicez"),
        ("name: x\n", ["schedule.epochs"], r"override 'schedule.epochs' is not key=value"),
        ("defaults: [nowhere]\n", [], r"defaults entry 'nowhere' not found"),
        ("schedule: [1, 2\n", [], r"not valid YAML"),
        ("- a\n- b\n", [], r"a recipe must be a mapping"),
    ],
)
def test_config_errors_name_the_key_and_source(tmp_path, recipe, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(str(_write(tmp_path / "r.yaml", recipe)), overrides)


def test_train_usage_errors_exit_2_and_write_nothing(tmp_path, capsys) -> None:
    recipe = _write(tmp_path / "r.yaml", "name: r\nschedule:\n  batch_sise: 3\n")
    cases = [
        ((str(recipe),), "schedule.batch_sise"),
        (("tiny",), "data.shards: missing required value"),
        (("tiny", f"data.shards={tmp_path}/none.json"), "shard index not found"),
        (("tiny", f"data.shards={tmp_path}/none-*.tar"), "no shards match"),
        (("nosuchrecipe",), "recipe not found: nosuchrecipe"),
        (("tiny", "schedule.batch_size=1"), "schedule.batch_size=1: KoLeo"),
        (("tiny", "objective.name=simclr"), "objective.name: 'simclr' is out of range; must be one of dinov2"),
        (("tiny", "logging.wandb=sometimes"), "logging.wandb: 'sometimes' is out of range; must be one of auto"),
    ]
    for args, message in cases:
        assert main(["train", *args, f"runs_dir={tmp_path / 'runs'}"]) == 2
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "runs").exists()
    run = subprocess.run([sys.executable, "-m", "biodino", "train", str(recipe)], capture_output=True, text=True,
                         cwd=tmp_path)  # the real process exit code
    assert run.returncode == 2 and "schedule.batch_sise" in run.stderr


def test_configs_of_earlier_versions_load_with_moved_keys(tmp_path) -> None:
    """Run directories and checkpoints written before Franca's settings moved to objective.franca still load."""
    from dataclasses import asdict

    from biodino.config.recipe import config_from_dict

    old = asdict(load_config("franca_bioscan5m"))
    franca = old["objective"].pop("franca")  # the flat layout of earlier versions, which had only these two
    old["objective"].update({k: franca[k] for k in ("nesting_levels", "sinkhorn_queue_size")})
    assert config_from_dict(old, "checkpoint").objective.franca.nesting_levels == 4
    import yaml

    recipe = _write(tmp_path / "old.yaml", yaml.safe_dump(old))
    cfg = load_config(str(recipe))
    assert (cfg.objective.franca.nesting_levels, cfg.objective.franca.sinkhorn_queue_size) == (4, 1280)


def test_the_dinov2_default_recipe_is_the_seed_stage_with_dinov2s_policies() -> None:
    """configs/bio_dino_dinov2.yaml: every augmentation, parameter-group, freeze and warmup value is the schema's
    (dinov2's) default; the rest is Bio-DINO stage 1, whose own values are birder's."""
    from dataclasses import asdict

    from biodino.config.schema import CropsConfig, OptimConfig, ObjectiveConfig

    ours, seed = load_config("bio_dino_dinov2"), load_config("bio_dino/stage1_224")
    crops = {k: v for k, v in asdict(ours.crops).items() if not k.startswith(("normalize", "global_size", "local_size"))}
    assert crops == {k: v for k, v in asdict(CropsConfig()).items() if k in crops}
    dinov2 = OptimConfig()
    assert (ours.optim.param_groups, ours.optim.patch_embed_lr_mult, ours.optim.warmup_start) == (
        dinov2.param_groups, dinov2.patch_embed_lr_mult, dinov2.warmup_start) == ("dinov2", 0.2, 0.0)
    assert ours.objective.last_layer_freeze == ObjectiveConfig().last_layer_freeze == "zero_lr"
    assert (seed.crops.policy, seed.optim.param_groups, seed.objective.last_layer_freeze) == (
        "birder", "birder", "drop_grads")
    dinov2_model = {"drop_path_rate": 0.3, "drop_path_uniform": True, "init": "dinov2"}  # ssl_default_config's
    assert {k: v for k, v in asdict(ours.model).items() if k in dinov2_model} == dinov2_model
    assert seed.model.init == "birder" and ours.objective.ibot.mask_aspect is None
    assert {**asdict(ours.model), **dinov2_model} == {**asdict(seed.model), **dinov2_model}
    assert asdict(ours.schedule) == asdict(seed.schedule)
