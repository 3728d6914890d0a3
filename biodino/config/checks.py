"""Ranges of every configuration value, checked in one pass over the whole config before anything is created.

``RULES`` maps each dotted key to a predicate and what it means; a value outside its range is a ConfigError that
names the key, the value and the range. Floats must be finite. Checks that need another part of the project (a
preset's patch size, an objective's head sizes) run in ``run.trainer.check_runnable``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

from biodino.config.schema import (ACCELERATORS, ATTN_BACKENDS, CENTERINGS, DTYPES, EVAL_PROTOCOLS, INITS,
                                  LAST_LAYER_FREEZES, MATRYOSHKA_INPUTS, OBJECTIVES, PARAM_GROUPS, PRECISIONS,
                                  QUEUE_DTYPES, STRATEGIES, WANDB_MODES, ConfigError, TrainConfig)
from biodino.config.schema import CROP_POLICIES, CropsConfig

Check = tuple[Callable[[Any], bool], str]


def at_least(n: float) -> Check:
    return (lambda v: v >= n, f">= {n}")


def positive() -> Check:
    return (lambda v: v > 0, "> 0")


def within(lo: float, hi: float, hi_open: bool = False) -> Check:
    pred = (lambda v: lo <= v < hi) if hi_open else (lambda v: lo <= v <= hi)
    return pred, f"in [{lo}, {hi}{')' if hi_open else ']'}"


def probability() -> Check:
    return within(0.0, 1.0)


def one_of(choices: tuple) -> Check:
    return (lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def optional(check: Check) -> Check:
    pred, desc = check
    return (lambda v: v is None or pred(v), f"{desc} (or null)")


def ordered_pair(lo: float, hi: float, lo_open: bool = True) -> Check:
    """Two values a <= b, both in (lo, hi] (or [lo, hi])."""
    first = (lambda a: a > lo) if lo_open else (lambda a: a >= lo)
    return (lambda v: len(v) == 2 and first(v[0]) and v[0] <= v[1] <= hi,
            f"two values a <= b in {'(' if lo_open else '['}{lo}, {hi}]")


def each(check: Check, n: int) -> Check:
    pred, desc = check
    return (lambda v: len(v) == n and all(pred(x) for x in v), f"{n} values, each {desc}")


def non_empty() -> Check:
    return (lambda v: bool(str(v).strip()), "not empty")


def run_name() -> Check:
    return (lambda v: bool(v.strip()) and "/" not in v and v not in (".", ".."), "a non-empty name without '/'")


def odd() -> Check:
    return (lambda v: v >= 1 and v % 2 == 1, "an odd number >= 1")


HEAD = {"num_prototypes": at_least(1), "hidden_dim": at_least(1), "bottleneck_dim": at_least(1),
        "nlayers": at_least(1)}

RULES: dict[str, Check] = {
    "name": run_name(), "runs_dir": non_empty(), "seed": at_least(0),
    "model.preset": non_empty(), "model.drop_path_rate": optional(within(0.0, 1.0, hi_open=True)),
    "model.layer_scale_init": optional(at_least(0.0)), "model.attn_backend": one_of(ATTN_BACKENDS),
    "model.init": one_of(INITS),
    **{f"objective.{h}.head.{k}": v for h in ("dino", "ibot") for k, v in HEAD.items()},
    "objective.dino.weight": at_least(0.0), "objective.ibot.weight": at_least(0.0),
    "objective.koleo.weight": at_least(0.0),
    "objective.ibot.mask_sample_probability": probability(),
    "objective.ibot.mask_ratio_min": probability(), "objective.ibot.mask_ratio_max": probability(),
    "objective.ibot.mask_aspect": optional(ordered_pair(0.0, math.inf)),
    "objective.name": one_of(OBJECTIVES), "objective.centering": one_of(CENTERINGS),
    "objective.sinkhorn_iterations": at_least(1), "objective.center_momentum": probability(),
    "objective.student_temp": positive(), "objective.teacher_temp": positive(),
    "objective.warmup_teacher_temp": positive(), "objective.warmup_teacher_temp_epochs": at_least(0.0),
    "objective.momentum_teacher": probability(), "objective.final_momentum_teacher": probability(),
    "objective.freeze_last_layer_epochs": at_least(0.0), "objective.last_layer_freeze": one_of(LAST_LAYER_FREEZES),
    "objective.franca.nesting_levels": at_least(1), "objective.franca.sinkhorn_queue_size": at_least(0),
    "objective.franca.sinkhorn_queue_dtype": one_of(QUEUE_DTYPES),
    "objective.franca.matryoshka_input": one_of(MATRYOSHKA_INPUTS),
    "optim.base_lr": positive(), "optim.min_lr": at_least(0.0), "optim.warmup_epochs": at_least(0.0),
    "optim.weight_decay": at_least(0.0), "optim.weight_decay_end": at_least(0.0),
    "optim.layerwise_decay": (lambda v: 0 < v <= 1, "in (0, 1]"), "optim.patch_embed_lr_mult": at_least(0.0),
    "optim.param_groups": one_of(PARAM_GROUPS), "optim.warmup_start": within(0.0, 1.0),
    "optim.clip_grad": optional(positive()), "optim.beta1": within(0.0, 1.0, hi_open=True),
    "optim.beta2": within(0.0, 1.0, hi_open=True),
    "crops.global_size": at_least(1), "crops.local_size": at_least(1), "crops.num_local": at_least(0),
    "crops.global_scale": ordered_pair(0.0, 1.0), "crops.local_scale": ordered_pair(0.0, 1.0),
    "crops.flip_p": probability(), "crops.jitter_p": probability(), "crops.grayscale_p": probability(),
    "crops.solarize_p": probability(), "crops.brightness": at_least(0.0), "crops.contrast": at_least(0.0),
    "crops.saturation": at_least(0.0), "crops.hue": within(0.0, 0.5), "crops.blur_p": each(probability(), 3),
    "crops.blur_sigma": ordered_pair(0.0, math.inf), "crops.blur_kernel_size": odd(),
    "crops.solarize_threshold": within(0, 255), "crops.normalize_mean": each((lambda v: True, "finite"), 3),
    "crops.normalize_std": each(positive(), 3),
    "crops.policy": one_of(CROP_POLICIES), "crops.aug_level": optional(within(1, 10)),
    "data.num_workers": at_least(0), "data.shards_per_block": at_least(1),
    "schedule.epochs": at_least(1), "schedule.steps_per_epoch": at_least(1), "schedule.batch_size": at_least(1),
    "schedule.accumulate_grad_batches": at_least(1),
    "trainer.accelerator": one_of(ACCELERATORS), "trainer.devices": at_least(1), "trainer.num_nodes": at_least(1),
    "trainer.precision": optional(one_of(PRECISIONS)), "trainer.strategy": one_of(STRATEGIES),
    "trainer.fsdp.param_dtype": optional(one_of(DTYPES)), "trainer.fsdp.reduce_dtype": one_of(DTYPES),
    "trainer.log_every_n_steps": at_least(1), "trainer.compile_backend": non_empty(),
    "logging.wandb": one_of(WANDB_MODES), "logging.project": non_empty(),
    "checkpoint.every_n_steps": at_least(1), "checkpoint.keep_last": at_least(1),
    "eval.every_n_steps": optional(at_least(1)), "eval.max_images": at_least(2), "eval.k": at_least(1),
    "eval.protocols": (lambda v: len(v) > 0 and all(p in EVAL_PROTOCOLS for p in v),
                       f"a list of {', '.join(EVAL_PROTOCOLS)}"),
}
# Free-form values: paths and switches (booleans need no range).
UNCHECKED = {"data.shards", "init.full_weights", "logging.group", "eval.data", "checkpoint.monitor"}


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, declared type) of every non-dataclass field, depth first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaves(value, key + ".")
        else:
            yield key, value, f.type


def _finite(value: Any) -> bool:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return all(not isinstance(v, float) or math.isfinite(v) for v in values)


def check_crops_policy(c: CropsConfig) -> None:
    """crops.policy birder: aug_level set, and the fields that have no place in birder's transforms at 0 (none is
    overridden silently); dinov2: no aug_level."""
    if c.policy == "dinov2":
        if c.aug_level is not None:
            raise ConfigError(f"crops.aug_level ({c.aug_level}) is birder's chain level; it needs crops.policy: birder")
        return
    if c.aug_level is None:
        raise ConfigError("crops.policy: birder needs crops.aug_level (birder's --aug-level; its scripts use 5)")
    unused = {"crops.grayscale_p": c.grayscale_p, "crops.solarize_p": c.solarize_p, "crops.blur_p[0]": c.blur_p[0],
              "crops.blur_p[1]": c.blur_p[1]}
    nonzero = [f"{key} ({value})" for key, value in unused.items() if value != 0]
    if nonzero:
        raise ConfigError(f"crops.policy: birder has no {', '.join(nonzero)}: set them to 0 (the global crops' colour "
                          "ops, blur and solarize come from birder's chain at crops.aug_level)")
    if c.blur_reference_inverted:
        raise ConfigError("crops.blur_reference_inverted is DINOv2's; it needs crops.policy: dinov2")


def check_ranges(cfg: TrainConfig) -> None:
    """Every value in its range, plus the relations between values of one section; ConfigError names the key."""
    for key, value, _ in leaves(cfg):
        if not _finite(value):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        rule = RULES.get(key)
        if rule is not None and not isinstance(value, bool) and not rule[0](value):
            raise ConfigError(f"{key}: {value!r} is out of range; must be {rule[1]}")
    check_crops_policy(cfg.crops)
    o = cfg.optim
    if o.param_groups == "birder" and (o.layerwise_decay, o.patch_embed_lr_mult) != (1.0, 1.0):
        raise ConfigError(f"optim.param_groups: birder gives every parameter the same lr; set optim.layerwise_decay "
                          f"({o.layerwise_decay}) and optim.patch_embed_lr_mult ({o.patch_embed_lr_mult}) to 1.0, "
                          "or use optim.param_groups: dinov2")
    ibot = cfg.objective.ibot
    if ibot.mask_ratio_min > ibot.mask_ratio_max:
        raise ConfigError(f"objective.ibot.mask_ratio_min ({ibot.mask_ratio_min}) must not exceed "
                          f"objective.ibot.mask_ratio_max ({ibot.mask_ratio_max})")
