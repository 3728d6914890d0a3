"""FLOPs of one DINOv2/Franca training step per source image, counted from the model and the recipe.

Matrix products only (2 FLOPs per multiply-add; norms, softmax and other elementwise work are left out, as MFU
counts them): the student's forward and backward (3x the forward; 2x for the patch embedding, whose input needs
no gradient) over every crop, the teacher's forward over
the global crops, and both heads on the class tokens and the masked patch tokens (the iBOT buffer, padding
included: it is computed). For the Bio-DINO stage-1 recipe this is about 966 GFLOP per image.
"""

from __future__ import annotations

from biodino.config.schema import HeadConfig, TrainConfig
from biodino.models import preset_config
from biodino.ssl.matryoshka import nesting_dims


def backbone_flops(cfg: TrainConfig, size: int) -> tuple[float, float]:
    """One forward of the backbone on one ``size`` x ``size`` crop: (blocks, patch embedding)."""
    m = preset_config(cfg.model.preset)
    patches = (size // m.patch_size) ** 2
    n = patches + 1 + m.num_registers
    per_block = 2 * n * (4 * m.dim * m.dim + 2 * m.dim * m.mlp_dim) + 4 * n * n * m.dim  # projections, attention
    return m.depth * per_block, 2 * patches * 3 * m.patch_size**2 * m.dim


def head_flops(cfg: TrainConfig, head: HeadConfig) -> float:
    """One token through a head: the MLP to the bottleneck and the prototypes (per level for Franca)."""
    dim = preset_config(cfg.model.preset).dim
    franca = cfg.objective.franca
    if cfg.objective.name != "franca":
        widths = [(dim, head.num_prototypes)]
    else:
        widths = [(d, int(head.num_prototypes * d / dim)) for d in nesting_dims(dim, franca.nesting_levels)]
    total = 0.0
    for d, k in widths:  # Franca's per-level input projection reads d features (prefix) or all of them (full)
        proj = (d if franca.matryoshka_input == "prefix" else dim) * d if cfg.objective.name == "franca" else 0
        layers = [d] + [head.hidden_dim] * (head.nlayers - 1) + [head.bottleneck_dim]
        total += 2 * (proj + sum(a * b for a, b in zip(layers[:-1], layers[1:])) + head.bottleneck_dim * k)
    return total


def step_flops_per_image(cfg: TrainConfig, masked_per_image: float) -> float:
    """The whole step per source image; ``masked_per_image`` is the iBOT buffer's rows per image."""
    c, o = cfg.crops, cfg.objective
    (g_blocks, g_embed), (l_blocks, l_embed) = backbone_flops(cfg, c.global_size), backbone_flops(cfg, c.local_size)
    student = 2 * g_blocks + c.num_local * l_blocks
    embed = 2 * g_embed + c.num_local * l_embed  # its backward has no input gradient: 2x the forward, not 3x
    teacher = 2 * (g_blocks + g_embed)
    ibot_head = o.ibot.head if o.ibot.separate_head else o.dino.head
    masked = masked_per_image if o.ibot.weight > 0 else 0.0
    heads_student = (2 + c.num_local) * head_flops(cfg, o.dino.head) + masked * head_flops(cfg, ibot_head)
    heads_teacher = 2 * head_flops(cfg, o.dino.head) + masked * head_flops(cfg, ibot_head)
    return 3 * (student + heads_student) + 2 * embed + teacher + heads_teacher
