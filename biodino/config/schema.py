"""The configuration schema: dataclasses that recipes, overrides and every module are checked against.

Defaults are the DINOv2 reference recipe (facebookresearch/dinov2 ``ssl_default_config.yaml``) unless a
comment says otherwise; recipes in ``configs/`` set the seed models' values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# The values of enumerated fields, in one place (checks.py checks them; the modules they select import them).
OBJECTIVES = ("dinov2", "franca")
CENTERINGS = ("softmax", "sinkhorn_knopp")
ATTN_BACKENDS = ("sdpa", "xformers")
STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
DTYPES = ("bfloat16", "float16", "float32")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PARAM_GROUPS = ("dinov2", "birder")  # biodino.ssl.param_groups: weight-decay exemptions and lr scales, or none
LAST_LAYER_FREEZES = ("zero_lr", "drop_grads")  # how the heads' last layers are held during the freeze
EVAL_PROTOCOLS = ("knn", "simpleshot", "retrieval", "ami", "linear", "svm", "mlp")  # biodino.eval.protocols.PROTOCOLS
INITS = ("dinov2", "birder")  # biodino.models.vit.VisionTransformer.init_weights
QUEUE_DTYPES = ("float32", "bfloat16")  # the Sinkhorn queue's storage
MATRYOSHKA_INPUTS = ("prefix", "full")  # biodino.ssl.matryoshka: level i reads the first d_i features, or all D


class ConfigError(ValueError):
    """A recipe, override or value that does not fit the schema; the message names the key and its source."""


@dataclass
class ModelConfig:
    preset: str = "vit_tiny_p8"
    drop_path_rate: Optional[float] = None  # None: the preset's rate
    drop_path_uniform: bool = False  # every block at the rate (dinov2) instead of rising linearly from 0 (birder)
    init: str = "dinov2"  # from-scratch weights: "dinov2" or "birder" (see VisionTransformer.init_weights)
    layer_scale_init: Optional[float] = None  # None: the preset's; 0 turns LayerScale off
    attn_backend: str = "sdpa"
    grad_checkpointing: bool = False


@dataclass
class HeadConfig:
    num_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3


@dataclass
class DinoConfig:
    weight: float = 1.0
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class IbotConfig:
    weight: float = 1.0
    separate_head: bool = False
    head: HeadConfig = field(default_factory=HeadConfig)  # used when separate_head
    mask_sample_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    # the mask rectangles' aspect range (h / w, log-uniform); None: dinov2's [0.3, 1 / 0.3]
    mask_aspect: Optional[list[float]] = None


@dataclass
class KoleoConfig:
    weight: float = 0.1


@dataclass
class FrancaConfig:
    """What Franca adds to DINOv2's objective."""

    nesting_levels: int = 5  # Matryoshka levels of the heads
    # prefix (birder): level i maps the first d_i features through Linear(d_i, d_i); full (valeoai/Franca):
    # the whole embedding through Linear(D, d_i)
    matryoshka_input: str = "prefix"
    sinkhorn_queue_size: int = 0  # queued teacher rows per level joining Sinkhorn-Knopp (0: none)
    sinkhorn_queue_dtype: str = "float32"  # or "bfloat16": birder stores the queue in its AMP dtype (half the memory)


@dataclass
class ObjectiveConfig:
    name: str = "dinov2"
    centering: str = "softmax"  # "softmax" or "sinkhorn_knopp"
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    freeze_last_layer_epochs: float = 1
    # zero_lr (dinov2): the last layers' lr is 0 while frozen, their gradients still feed AdamW's moments and the
    # clipping norm; drop_grads (birder): their gradients are dropped before clipping, AdamW leaves them untouched
    last_layer_freeze: str = "zero_lr"
    franca: "FrancaConfig" = field(default_factory=lambda: FrancaConfig())  # used by objective.name: franca
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    koleo: KoleoConfig = field(default_factory=KoleoConfig)


@dataclass
class OptimConfig:
    base_lr: float = 4e-3  # scaled by sqrt(global batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    layerwise_decay: float = 1.0
    patch_embed_lr_mult: float = 0.2
    # dinov2: no weight decay on biases, norms, LayerScale, tokens and position embedding, layerwise_decay and
    # patch_embed_lr_mult apply; birder (its scripts' defaults): weight decay and the same lr on every parameter
    param_groups: str = "dinov2"
    warmup_start: float = 0.0  # the lr at step 0 as a fraction of the peak (birder's --lr-warmup-decay: 0.01)
    clip_grad: Optional[float] = 3.0
    beta1: float = 0.9
    beta2: float = 0.999


CROP_POLICIES = ("dinov2", "birder")  # crops.policy: the structure of the augmentation (biodino.data.photometric)


@dataclass
class CropsConfig:
    """Multi-crop augmentation (DINOv2 recipe). Geometry runs in the CPU workers, photometrics on the device.

    ``policy`` selects the structure; the numbers stay these explicit fields, none is overridden by the policy.

    - ``dinov2``: DINOv2's recipe. Every crop: colour jitter (``jitter_p``), grayscale, blur (``blur_p`` per crop
      group), solarize on global crop 2.
    - ``birder``: birder 0.8.4's ``train_dino_v2`` / ``train_franca`` transforms.
      - Global crops: a random-resized crop (``global_scale``), bilinear or bicubic at random. Then birder's op
        chain at ``aug_level``: 2 to max(2, (L + 1) // 2) ops drawn from rotate, brightness, contrast + hue,
        saturation, translate, shear, posterize, blur, autocontrast, sharpness and solarize (identity included),
        magnitudes from L. Then the flip.
      - Local crops: a bicubic random-resized crop (``local_scale``), the flip, the colour jitter with ``jitter_p``
        (``brightness``, ``contrast``, ``saturation``, ``hue``), the blur with ``blur_p[2]``.
      - Must be 0: ``grayscale_p``, ``solarize_p``, ``blur_p[0]`` and ``blur_p[1]`` (birder has none of these
        outside the chain).
      - The values of birder's scripts with their defaults (``--aug-level 5``, ``--resize-min-scale`` 0.35 in
        train_dino_v2 and 0.4 in train_franca, local transform hard-coded in both): ``aug_level: 5``,
        ``global_scale: [0.35, 1.0]`` (Franca: ``[0.4, 1.0]``), ``local_scale: [0.1, 0.35]``, ``flip_p: 0.5``,
        ``jitter_p: 0.8``, ``brightness: 0.25``, ``contrast: 0.15``, ``saturation: 0.0``, ``hue: 0.04``,
        ``grayscale_p: 0.0``, ``blur_p: [0.0, 0.0, 0.5]``, ``blur_sigma: [0.5, 1.2]``, ``blur_kernel_size: 3``,
        ``solarize_p: 0.0``.
    """

    global_size: int = 224
    local_size: int = 98
    num_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 9
    # The reference code hands 1 - p to its blur wrapper (global crop 1 never blurred); True reproduces that.
    blur_reference_inverted: bool = False
    solarize_p: float = 0.2  # global crop 2 only
    solarize_threshold: int = 128
    normalize_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    normalize_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    policy: str = "dinov2"  # dinov2 | birder (see above)
    aug_level: Optional[int] = None  # birder's --aug-level, 1-10: policy birder only (its scripts' default: 5)


@dataclass
class DataConfig:
    shards: str = ""  # a shard index (*.json, written by `biodino pack`) or a glob of tar shards
    num_workers: int = 4
    shards_per_block: int = 4  # shards mixed in each block of a rank's stream (see data/stream.py)
    pin_memory: bool = True


@dataclass
class ScheduleConfig:
    """Run length: an epoch is a fixed number of optimizer steps, as in DINOv2 (not a pass over the data)."""

    epochs: int = 100
    steps_per_epoch: int = 1250
    batch_size: int = 64  # per device
    accumulate_grad_batches: int = 1

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class FSDPConfig:
    """``trainer.strategy: fsdp``: FSDP2 over all ranks, one unit per transformer block and per head."""

    param_dtype: Optional[str] = None  # compute dtype of gathered parameters; None: bfloat16 on GPU, float32 on CPU
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # False keeps gathered blocks until backward: faster, more memory


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: Optional[str] = None  # None: bf16-mixed on GPU, 32-true on CPU
    strategy: str = "auto"  # auto | ddp | fsdp
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    compile: bool = False  # torch.compile each transformer block (student and teacher)
    compile_backend: str = "inductor"  # a torch.compile backend name (e.g. aot_eager to debug a compiled run)
    log_every_n_steps: int = 10


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # online | offline | disabled | auto (online when an API key is configured, else offline)
    project: str = "biodino"
    group: Optional[str] = None  # the wandb group; a schedule's stages get the schedule's name
    plots: bool = True


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000
    keep_last: int = 3
    monitor: Optional[str] = None  # e.g. eval/knn_top1: also keep the checkpoint where it was highest (needs eval.data)


@dataclass
class EvalConfig:
    """The online monitor: the teacher's embeddings of a held-out labelled folder, evaluated during training."""

    data: Optional[str] = None  # a folder with one sub-folder per class; None: no monitor
    every_n_steps: Optional[int] = None  # None: at the checkpoint interval (checkpoint.every_n_steps)
    protocols: tuple[str, ...] = ("knn", "retrieval")  # names of biodino eval's protocols
    max_images: int = 2000  # at most this many images, spread over the classes (bounds the cost)
    k: int = 20


@dataclass
class InitConfig:
    full_weights: Optional[str] = None  # a full-weights file (`biodino export --full`): weights only, fresh optimizer


@dataclass
class TrainConfig:
    name: str = "run"
    runs_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all ranks: the batch the lr scaling refers to."""
        s = self.schedule
        return s.batch_size * s.accumulate_grad_batches * self.trainer.devices * self.trainer.num_nodes
