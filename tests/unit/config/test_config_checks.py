"""Every configuration value has a range, checked in one pass before anything is written; a value out of range
never trains. Recipes that are not YAML or not text, and overrides that change an existing run's architecture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from biodino.cli.main import main
from biodino.config.schema import ConfigError, TrainConfig
from biodino.config.checks import RULES, UNCHECKED, leaves
from biodino.config.recipe import load_config

# (override, the key the error must name): each value outside what the field means.
OUT_OF_RANGE = [
    ("seed=-1", "seed"), ("name=a/b", "name"), ("name=' '", "name"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate"), ("model.drop_path_rate=-0.1", "model.drop_path_rate"),
    ("model.layer_scale_init=-1e-5", "model.layer_scale_init"), ("model.attn_backend=flash", "model.attn_backend"),
    ("objective.name=simclr", "objective.name"), ("objective.centering=sinkhorn", "objective.centering"),
    ("objective.dino.head.num_prototypes=0", "objective.dino.head.num_prototypes"),
    ("objective.ibot.head.num_prototypes=0", "objective.ibot.head.num_prototypes"),
    ("objective.dino.head.bottleneck_dim=0", "objective.dino.head.bottleneck_dim"),
    ("objective.dino.head.nlayers=0", "objective.dino.head.nlayers"),
    ("objective.student_temp=0", "objective.student_temp"), ("objective.teacher_temp=-0.04", "objective.teacher_temp"),
    ("objective.warmup_teacher_temp=0", "objective.warmup_teacher_temp"),
    ("objective.momentum_teacher=1.5", "objective.momentum_teacher"),
    ("objective.final_momentum_teacher=-0.1", "objective.final_momentum_teacher"),
    ("objective.center_momentum=2", "objective.center_momentum"),
    ("objective.sinkhorn_iterations=0", "objective.sinkhorn_iterations"),
    ("objective.freeze_last_layer_epochs=-1", "objective.freeze_last_layer_epochs"),
    ("objective.franca.nesting_levels=0", "objective.franca.nesting_levels"),
    ("objective.franca.sinkhorn_queue_size=-8", "objective.franca.sinkhorn_queue_size"),
    ("objective.dino.weight=-1", "objective.dino.weight"), ("objective.koleo.weight=-0.1", "objective.koleo.weight"),
    ("objective.ibot.mask_sample_probability=1.5", "objective.ibot.mask_sample_probability"),
    ("objective.ibot.mask_ratio_max=1.2", "objective.ibot.mask_ratio_max"),
    ("objective.ibot.mask_ratio_min=0.6", "objective.ibot.mask_ratio_min"),  # above the max (0.5)
    ("optim.base_lr=0", "optim.base_lr"), ("optim.base_lr=-1e-3", "optim.base_lr"), ("optim.base_lr=nan", "optim.base_lr"),
    ("optim.base_lr=inf", "optim.base_lr"), ("optim.min_lr=-1", "optim.min_lr"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"), ("optim.weight_decay=-0.04", "optim.weight_decay"),
    ("optim.layerwise_decay=0", "optim.layerwise_decay"), ("optim.layerwise_decay=1.1", "optim.layerwise_decay"),
    ("optim.clip_grad=0", "optim.clip_grad"), ("optim.beta1=1.0", "optim.beta1"), ("optim.beta2=-0.5", "optim.beta2"),
    ("optim.patch_embed_lr_mult=-0.2", "optim.patch_embed_lr_mult"),
    ("crops.global_size=0", "crops.global_size"), ("crops.num_local=-1", "crops.num_local"),
    ("crops.global_scale=[0.5,0.3]", "crops.global_scale"), ("crops.local_scale=[0.0,0.3]", "crops.local_scale"),
    ("crops.global_scale=[0.3,1.5]", "crops.global_scale"), ("crops.flip_p=2", "crops.flip_p"),
    ("crops.jitter_p=-0.1", "crops.jitter_p"), ("crops.hue=0.6", "crops.hue"), ("crops.brightness=-1", "crops.brightness"),
    ("crops.blur_p=[1.0,0.1,1.5]", "crops.blur_p"), ("crops.blur_sigma=[0,2]", "crops.blur_sigma"),
    ("crops.blur_kernel_size=8", "crops.blur_kernel_size"), ("crops.solarize_threshold=300", "crops.solarize_threshold"),
    ("crops.normalize_std=[0.5,0,0.5]", "crops.normalize_std"), ("crops.grayscale_p=1.01", "crops.grayscale_p"),
    ("data.num_workers=-1", "data.num_workers"), ("data.shards_per_block=0", "data.shards_per_block"),
    ("schedule.epochs=0", "schedule.epochs"), ("schedule.steps_per_epoch=0", "schedule.steps_per_epoch"),
    ("schedule.batch_size=0", "schedule.batch_size"), ("schedule.accumulate_grad_batches=0",
                                                       "schedule.accumulate_grad_batches"),
    ("trainer.devices=0", "trainer.devices"), ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.strategy=deepspeed", "trainer.strategy"), ("trainer.precision=8-bit", "trainer.precision"),
    ("trainer.accelerator=tpu9", "trainer.accelerator"), ("trainer.fsdp.param_dtype=int8", "trainer.fsdp.param_dtype"),
    ("trainer.fsdp.reduce_dtype=fp8", "trainer.fsdp.reduce_dtype"), ("trainer.log_every_n_steps=0",
                                                                   "trainer.log_every_n_steps"),
    ("logging.wandb=sometimes", "logging.wandb"), ("logging.project=''", "logging.project"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps"), ("checkpoint.keep_last=0", "checkpoint.keep_last"),
]


@pytest.mark.parametrize("override,key", OUT_OF_RANGE)
def test_a_value_out_of_range_names_its_key(override, key) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value).startswith(f"{key}:") or f"{key} (" in str(err.value), str(err.value)


def test_every_field_of_the_schema_has_a_range_or_is_free_form() -> None:
    """A field added to the schema without a rule fails here instead of training with any value."""
    for key, value, declared in leaves(TrainConfig()):
        if "bool" in str(declared):
            continue
        assert key in RULES or key in UNCHECKED, f"{key} ({declared}) has no range in biodino.config.checks.RULES"
    assert not set(RULES) - {k for k, _, _ in leaves(TrainConfig())}, "a rule names no field"


def test_the_defaults_and_every_shipped_recipe_are_in_range() -> None:
    configs = Path(__file__).resolve().parents[3] / "configs"
    for recipe in sorted(configs.rglob("*.yaml")):
        if "stages" in recipe.read_text() or recipe.name == "common.yaml":
            continue  # schedules; common.yaml is checked through the stages that start from it
        load_config(str(recipe))


def test_cross_part_checks_name_the_key(tiny_shards) -> None:
    from biodino.run.trainer import check_runnable

    cases = [(["model.preset=vit_huge"], "model.preset: unknown preset 'vit_huge'"),
             (["crops.global_size=36"], "crops.global_size: 36 is not a multiple of the patch size 8"),
             (["crops.local_size=12"], "crops.local_size: 12 is not a multiple of the patch size 8"),
             (["objective.name=franca", "objective.franca.nesting_levels=7"], "objective.franca.nesting_levels: 7 levels need"),
             (["objective.name=franca", "objective.franca.nesting_levels=4", "objective.dino.head.num_prototypes=4"],
              "objective.dino.head.num_prototypes: 4 leaves the coarsest of 4 levels without prototypes"),
             (["schedule.batch_size=1"], "schedule.batch_size=1: KoLeo")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            check_runnable(load_config("tiny", [f"data.shards={tiny_shards}", *overrides]))


def test_out_of_range_on_the_command_line_exits_2_in_one_line_and_writes_nothing(tiny_shards, tmp_path) -> None:
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "biodino", "train", "tiny", f"data.shards={tiny_shards}",
                           f"runs_dir={runs}", "optim.base_lr=-0.01"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "biodino train: error: optim.base_lr: -0.01 is out of range; must be > 0"]
    assert not runs.exists()


def test_a_bad_recipe_value_is_refused_before_torch_is_imported(tiny_shards, tmp_path) -> None:
    """The YAML checks come first, so a typo is reported in a fraction of a second, not after Lightning loads."""
    probe = ("import sys; from biodino.cli.main import main; code = main(sys.argv[1:]); "
             "print([m for m in ('torch', 'lightning') if m in sys.modules]); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, "train", "tiny", f"data.shards={tiny_shards}",
                           f"runs_dir={tmp_path}", "optim.base_lr=-0.01"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "optim.base_lr" in proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("content,message", [
    (b"schedule:\n  epochs: [1,\n", "not valid YAML at line 3"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
    (b"name: x\n\tbad: indent\n", "not valid YAML at line 2"),
])
def test_a_recipe_that_is_not_yaml_names_the_file(tmp_path, capsys, content, message) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    assert main(["train", str(recipe), f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{recipe}: {message}" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_an_override_changing_an_existing_runs_architecture_is_refused_without_touching_it(tiny_shards, tmp_path,
                                                                                            capsys) -> None:
    base = ["train", "tiny", f"data.shards={tiny_shards}", f"runs_dir={tmp_path}", "name=a", "schedule.epochs=1",
            "schedule.steps_per_epoch=2", "logging.plots=false"]
    assert main(base) == 0
    config = (tmp_path / "a" / "config.yaml").read_bytes()
    refusals = [("crops.global_size=40", "student.backbone.pos_embedding"),
                ("objective.dino.head.num_prototypes=128", "dino_center.center: (1, 64) -> (1, 128)"),
                ("optim.layerwise_decay=0.9", "optimizer parameter groups")]
    for i, (change, first) in enumerate(refusals):
        if i == 0:  # a real process: its exit status and everything it printed
            proc = subprocess.run([sys.executable, "-m", "biodino", *base, change], capture_output=True, text=True,
                                  timeout=120)
            code, err = proc.returncode, proc.stderr
        else:  # the same check in this process, without starting another interpreter
            capsys.readouterr()
            code, err = main([*base, change]), capsys.readouterr().err
        assert code == 2, err[-2000:]
        (line,) = err.strip().splitlines()
        assert "was trained with another architecture" in line and first in line and change.split("=")[0] in line
        assert (tmp_path / "a" / "config.yaml").read_bytes() == config
    assert main([*base, "optim.base_lr=0.02", "schedule.epochs=2"]) == 0  # a longer run, another lr: resumes



def test_the_enumerated_objectives_are_the_registered_ones() -> None:
    from biodino.config.schema import OBJECTIVES as NAMES
    from biodino.ssl.objectives import OBJECTIVES

    assert tuple(OBJECTIVES) == NAMES
