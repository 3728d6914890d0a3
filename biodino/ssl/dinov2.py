"""The DINOv2 objective: DINO loss on class tokens, iBOT on masked patches, KoLeo on the student."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from biodino.data.masking import BlockMasking
from biodino.models import VisionTransformer, build_backbone
from biodino.ssl.heads import DINOHead
from biodino.ssl.losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from biodino.ssl.module import SSLModule
from biodino.ssl.network import SSLNetwork, freeze_unused
from biodino.config.schema import ConfigError, HeadConfig, TrainConfig

N_GLOBAL = 2


def check_objective(cfg: TrainConfig) -> None:
    """Config errors that would otherwise surface mid-run, each naming its key."""
    o = cfg.objective
    if o.koleo.weight > 0 and cfg.schedule.batch_size < 2:
        raise ConfigError(
            f"schedule.batch_size={cfg.schedule.batch_size}: KoLeo (objective.koleo.weight={o.koleo.weight}) "
            "needs at least 2 images per rank (it is infinite with 1); raise the batch or set the weight to 0"
        )


def student_backbone(cfg: TrainConfig) -> VisionTransformer:
    """The recipe's backbone at the global crop size, with the model section's overrides."""
    m = cfg.model
    overrides: dict[str, Any] = {"attn_backend": m.attn_backend, "grad_checkpointing": m.grad_checkpointing,
                                 "image_size": cfg.crops.global_size, "drop_path_uniform": m.drop_path_uniform,
                                 "init": m.init}
    if m.drop_path_rate is not None:
        overrides["drop_path_rate"] = m.drop_path_rate
    if m.layer_scale_init is not None:
        overrides["layer_scale_init"] = m.layer_scale_init or None
    return build_backbone(m.preset, **overrides)


def _head(in_dim: int, h: HeadConfig) -> DINOHead:
    return DINOHead(in_dim, h.num_prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers)


class DINOv2Module(SSLModule):
    """DINOv2 as in facebookresearch/dinov2: the batch holds crop-major ``global_crops`` (2B, 3, H, W),
    ``local_crops`` (n_local * B, 3, h, w) and the iBOT ``masks`` (2B, N) drawn by the data workers."""

    mask_shape = BlockMasking  # the iBOT masks the data workers draw for this objective
    check = staticmethod(check_objective)

    softmax_centers = True  # kept even under Sinkhorn-Knopp: birder's DINOv2 state always holds both centers

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        o = cfg.objective
        self.losses: tuple[Callable, Callable] = (dino_loss, ibot_loss)
        if self.softmax_centers:
            ibot_k = (o.ibot.head if o.ibot.separate_head else o.dino.head).num_prototypes
            self.dino_center = SoftmaxCenter(o.dino.head.num_prototypes, o.center_momentum)
            self.ibot_center = SoftmaxCenter(ibot_k, o.center_momentum)

    def build_network(self) -> SSLNetwork:
        o = self.cfg.objective
        backbone = student_backbone(self.cfg)
        dim = backbone.embed_dim
        ibot_head = _head(dim, o.ibot.head) if o.ibot.separate_head else None
        return freeze_unused(SSLNetwork(backbone, _head(dim, o.dino.head), ibot_head), o.ibot.weight > 0)

    def compile_losses(self, backend: str) -> None:
        """``torch.compile`` the DINO and iBOT losses: the fp32 cast, the temperature, the log-softmax over the
        prototypes and the products fuse into a few passes (forward and backward) instead of one per op."""
        self.losses = tuple(torch.compile(fn, backend=backend, dynamic=False) for fn in (dino_loss, ibot_loss))

    def targets(self, logits: list[torch.Tensor], kind: str, temp: float,
                valid: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Teacher targets per level (DINOv2 has one) for the ``dino`` or ``ibot`` head's logits; rows whose
        ``valid`` is false (padding of the masked-token buffer) take no part in the centering."""
        (level,) = logits
        if self.cfg.objective.centering == "softmax":
            center = self.dino_center if kind == "dino" else self.ibot_center
            return [center(level, temp, valid=valid)]
        return [sinkhorn_knopp(level, temp, self.cfg.objective.sinkhorn_iterations, valid=valid)]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Teacher on the global crops; student on global (masked) and local crops in one pass of its blocks; each
        head once per network; masked patches gathered by the batch's fixed-size index list (no host sync)."""
        o = self.cfg.objective
        g, loc = batch["global_crops"], batch["local_crops"]
        temp = self.schedules.teacher_temp(self.global_step)
        use_ibot = o.ibot.weight > 0
        index, weight = batch["mask_indices"], batch["mask_weights"]
        with torch.no_grad():
            (t_out,) = self.teacher([g])
            t_cls, t_patch = self.teacher.heads(t_out.cls, _gather(t_out.patches, index) if use_ibot else None)
            t_dino = self.targets(t_cls, "dino", temp)
            t_ibot = self.targets(t_patch, "ibot", temp, valid=weight > 0) if use_ibot else []

        crops = [g, loc] if loc.shape[0] else [g]
        s_out = self.student(crops, [batch["masks"] if use_ibot else None, None][: len(crops)])
        cls = torch.cat([out.cls for out in s_out]) if len(s_out) > 1 else s_out[0].cls
        s_cls, s_patch = self.student.heads(cls, _gather(s_out[0].patches, index) if use_ibot else None)
        n_g = g.shape[0]
        dino, ibot = self.losses
        terms = {"dino": sum(dino(s[:n_g], s[n_g:], t, o.student_temp, N_GLOBAL) for s, t in zip(s_cls, t_dino))}
        weights = {"dino": o.dino.weight}
        if use_ibot:
            terms["ibot"] = sum(ibot(s, t, weight, n_g, o.student_temp) for s, t in zip(s_patch, t_ibot))
            weights["ibot"] = o.ibot.weight
        if o.koleo.weight > 0:  # per global crop, summed (DINOv2): never between two crops of one image
            terms["koleo"] = sum(koleo_loss(c) for c in s_out[0].cls.chunk(N_GLOBAL))
            weights["koleo"] = o.koleo.weight
        self.log_step({"teacher_temp": temp})
        return self.total_loss(terms, weights)


def _gather(patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) patch tokens -> (len(index), C) at flat positions ``index`` (the masked ones, padded)."""
    return patches.flatten(0, 1).index_select(0, index)
