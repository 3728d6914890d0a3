"""birder 0.8.4's own DINOv2 training step, set up for a side-by-side timing against biodino.

``birder_step(...)`` builds the student, teacher, losses, optimizer, scheduler and grad scaler from birder's
own modules, in the order and with the values ``birder.scripts.train_dino_v2.train`` uses, and returns a
closure that runs the body of that script's inner loop once (one micro-batch, then the optimizer step) on
inputs prepared beforehand with birder's own mask generator and collator.

Where things come from in birder (``site-packages/birder/``):

- ``scripts/train_dino_v2.py``: ``args_from_dict`` (the argument parser with its defaults + ``validate_args``),
  ``DINOv2BlockMasking`` and ``TrainCollator`` (masks, ``mask_indices_list``, ``masks_weight``, ``upper_bound``),
  and the loop body reproduced in ``step`` (teacher under ``no_grad``, softmax centering with the one-step-late
  center update, student, local/global DINO, KoLeo, iBOT, backward, last-layer freeze, clip, scaler, optimizer,
  scheduler, ``torch._foreach_lerp_`` EMA, weight-decay schedule).
- ``net/ssl/dino_v2.py``: ``DINOv2Student``, ``DINOv2Teacher`` (``DINOHead`` inside), ``DINOLoss``,
  ``iBOTPatchLoss``, ``KoLeoLoss``.
- ``common/training_utils.py``: ``set_random_seeds``, ``configure_torch_compiler``, ``scale_lr``,
  ``get_wd_custom_keys``, ``optimizer_parameter_groups``, ``get_optimizer``, ``get_scheduler``,
  ``cosine_scheduler``, ``get_amp_scaler``, ``SmoothedValue``, ``accuracy``.
- ``model_registry``: ``registry.net_factory`` for the backbone (``net/vit.py``, configs in ``net/_vit_configs.py``).

The flags reproduced are those of birder's published Bio-DINO command (``docs`` pretrain recipes, "DINO v2:
SoViT reg4 150m p14 LS", the 250-epoch run)::

    --network vit_reg4_so150m_p14_ls --dino-out-dim 98304 --head-bottleneck-dim 320 --ibot-separate-head
    --ibot-out-dim 98304 --warmup-teacher-temp-epochs 20 --local-crop-size 98 --opt adamw --opt-fused
    --clip-grad-norm 3 --grad-accum-steps 8 --lr 0.0002 --lr-scale 1024 --lr-scale-type sqrt --wd 0.04
    --wd-end 0.2 --lr-scheduler-update step --lr-scheduler cosine --lr-cosine-min 1e-7 --epochs 250
    --steps-per-epoch 4000 --warmup-epochs 40 --rgb-mode none --amp --amp-dtype bfloat16 --compile

with the shapes (network, batch, crops, sizes, head widths) taken from the arguments instead. Everything
else is birder's default: ``--centering centering`` (softmax centering, center momentum 0.9, student temperature
0.1, teacher temperature 0.04 -> 0.07), 3-layer heads without BN, ``--ibot-mask-probability 0.5`` with mask
ratios 0.1-0.5 (block masks, min 4 patches, max half the grid, aspect 0.33-3.33), ``--koleo-loss-weight 0.1``,
``--momentum-teacher 0.992`` (cosine to 1), ``--freeze-last-layer-epochs 1``, no ``--norm-wd`` /
``--bias-weight-decay`` / ``--transformer-embedding-decay`` (every parameter decays), model dtype float32,
``--compile-mode`` unset, ``--compile-fullgraph`` off, ``--compile-opt`` off, no gradient checkpointing.
``precision="bf16-mixed"`` means ``--amp --amp-dtype bfloat16``; ``"32-true"`` means no ``--amp``.

What ``--compile`` compiles (as the script does): ``torch.compile`` of the student module, the teacher module,
``DINOLoss`` (its ``forward``), ``KoLeoLoss`` and ``iBOTPatchLoss``, plus in-place ``.compile()`` of both losses'
``sinkhorn_normalizer`` (unused with softmax centering). ``softmax_center_teacher``/``update_center`` are methods,
not ``forward``, so they run eagerly even when compiled. The optimizer step is not compiled.

Process-global settings birder's script applies, applied here at setup too (they also affect anything else timed
in the same process, e.g. the biodino side): ``torch.set_float32_matmul_precision("high")`` when ``--amp``;
on CUDA ``torch.backends.cudnn.benchmark = True``; the dynamo recompile limits (torch's defaults). The values
are reported in the info dict.

Not reproduced / deliberately different:

- Gradient accumulation: the command accumulates 8 micro-batches per optimizer step; one ``step()`` here is one
  micro-batch *and* one optimizer step (``effective_accum_steps = 1``), like a biodino step without accumulation.
- No DDP/FSDP, one process (``world_size=1``; no all-reduces in centering), no data loader or augmentation:
  the crops are fixed standard-normal tensors (``--rgb-mode none`` makes the normalization irrelevant anyway),
  collated once by birder's ``TrainCollator`` and reused every call, so the masked-token count, and therefore
  every shape, is the same each step (real birder training changes ``n_masked_patches``/``upper_bound`` every
  batch, which under ``--compile`` costs recompiles or dynamic shapes; this benchmark spares birder that).
- Epoch: by default the step is an epoch-2 step (past ``--freeze-last-layer-epochs 1``), so the heads' last
  layers train; ``freeze_last_layer=True`` gives the epoch-1 behaviour (their gradients set to ``None`` after
  backward, so AdamW skips them).
- birder's per-step statistics (``SmoothedValue`` updates of the five losses and, on by default,
  the "extended metrics": prototype/patch agreement, target entropy, center drift) are bookkeeping, not training;
  they are left out unless ``birder_metrics=True``. Logging every 100 steps (which calls ``.item()``),
  tensorboard, checkpointing and the torchinfo summary are never run.

How birder's step differs from a plain DINOv2 step (reproduced, not fixed; matters when reading the timings):

- Host syncs: none in this step with ``--opt-fused`` (checked on CPU by counting ``Tensor.item``/``__bool__``/
  ``tolist``/``nonzero`` calls inside ``step``: zero for fp32 and bf16). The masks' boolean indexing,
  ``nonzero`` and ``masks_weight`` are computed in the collator, on the CPU, outside the step. Without
  ``--opt-fused`` (``opt_fused=False``) and with ``--amp``, ``GradScaler.step`` syncs once per step
  (``found_inf.item()`` in ``torch/amp/grad_scaler.py``, ``_maybe_opt_step``).
- ``--amp --amp-dtype bfloat16`` still creates a ``GradScaler`` (``get_amp_scaler`` does for any amp dtype): the
  loss is scaled by 65536, ``unscale_`` runs a non-finite check + unscale over every gradient before clipping,
  and ``found_inf`` is passed into the fused AdamW kernel; the scale is updated each step. None of it is needed
  for bf16.
- The optimizer is built before the teacher is frozen, so the teacher's parameters are in its parameter groups
  too (twice the parameter list; they never get gradients, so AdamW skips them after filtering).
  ``clip_grad_norm_`` also walks ``net.parameters()``, teacher included.
- The teacher runs ``masked_encoding_retention`` with an all-zero float mask, i.e. an extra multiply by
  ``1 - 0`` of the patch embeddings; the student's mask token is blended in by arithmetic
  (``x * (1 - m) + token * m``), not by ``torch.where``.
- Global and local crops go through the student backbone in two separate passes (different resolutions); the
  DINO head is called twice in the student (global, local), so its weight-normed last layer (98,304 x 320) is
  re-normalized twice per step in the student and once per head in the teacher.
- iBOT: masked patch tokens are gathered with ``index_select`` into a zero buffer of ``upper_bound`` rows (the sum
  of each masked crop's maximum ratio), the head runs on all ``upper_bound`` rows and the result is sliced to the
  ``masked_tokens`` real ones, in both student and teacher.
- Softmax centering is applied with the center of the previous step (``update_center`` only stores the batch
  sum; ``apply_center_update`` folds it in at the next ``softmax_center_teacher``).
- The EMA is one ``torch._foreach_lerp_`` over all teacher/student parameters (the teacher's unused mask token
  included); the weight-decay schedule is a Python loop over the parameter groups; the LR scheduler steps each
  optimizer step.
- Under ``--compile``: ``DINOLoss.forward`` is compiled twice (called with a tuple of local chunks, then with a
  list holding the global output: a guard failure on the argument type, then different shapes), and the first
  call of ``step`` compiles everything (tens of seconds on a cold cache; warm up at least 2 calls).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from birder.common import training_utils
from birder.model_registry import registry
from birder.net.ssl.dino_v2 import DINOLoss, DINOv2Student, DINOv2Teacher, KoLeoLoss, iBOTPatchLoss
from birder.scripts import train_dino_v2 as birder_train

# The published Bio-DINO command's optimisation/schedule flags (see the module docstring).
BIO_DINO_FLAGS: dict[str, Any] = {
    "warmup_teacher_temp_epochs": 20, "opt": "adamw", "opt_fused": True, "clip_grad_norm": 3.0,
    "grad_accum_steps": 8, "lr": 0.0002, "lr_scale": 1024, "lr_scale_type": "sqrt", "wd": 0.04, "wd_end": 0.2,
    "lr_scheduler_update": "step", "lr_scheduler": "cosine", "lr_cosine_min": 1e-7, "epochs": 250,
    "steps_per_epoch": 4000, "warmup_epochs": 40, "rgb_mode": "none", "centering": "centering",
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def birder_step(network: str, batch_size: int, n_local: int, global_size: int, local_size: int,
                dino_out_dim: int, ibot_out_dim: int, bottleneck_dim: int, hidden_dim: int, separate_ibot_head: bool,
                device: torch.device, precision: str, compile: bool, seed: int = 0, *,
                model_config: Optional[dict[str, Any]] = None, opt_fused: bool = True,
                freeze_last_layer: bool = False, birder_metrics: bool = False) -> tuple[Callable[[], None], dict]:
    """birder's DINOv2 training step for these shapes; returns ``(step, info)``.

    ``network`` is a birder registry name ("vit_reg4_so150m_p14_ls" for Bio-DINO; "vit_reg1_t14", birder's
    tiny ViT with 1 register and patch 14, for CPU smoke runs). ``batch_size`` is images per step (2 global
    crops each, ``n_local`` local crops each). ``precision``: "bf16-mixed" or "32-true". Extra keywords:
    ``model_config`` (birder's ``--model-config``, e.g. a cut-down ViT), ``opt_fused`` (``--opt-fused``, on in the
    published command; birder passes ``fused=True`` on any device), ``freeze_last_layer`` (an epoch-1 step),
    ``birder_metrics`` (include birder's per-step statistics).
    """
    if precision not in ("bf16-mixed", "32-true"):
        raise ValueError(f"precision must be 'bf16-mixed' or '32-true', got {precision!r}")
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"birder's train_dino_v2 runs on cuda or cpu, got {device}")

    amp = precision == "bf16-mixed"
    args = birder_train.args_from_dict(**{
        **BIO_DINO_FLAGS,
        "network": network, "model_config": None if model_config is None else dict(model_config),
        "size": [global_size], "local_crop_size": [local_size], "local_crops_number": n_local,
        "batch_size": batch_size, "dino_out_dim": dino_out_dim, "ibot_out_dim": ibot_out_dim,
        "ibot_separate_head": separate_ibot_head, "head_bottleneck_dim": bottleneck_dim,
        "dino_head_hidden_dim": hidden_dim, "opt_fused": opt_fused, "amp": amp, "amp_dtype": "bfloat16",
        "compile": compile, "device": device.type, "seed": seed, "use_fake_data": True, "num_workers": 0,
        "non_interactive": True, "no_summary": True, "no_extended_metrics": not birder_metrics,
    })

    # training_utils.init_training, minus distributed init and logging
    if device.type == "cuda":
        torch.backends.cudnn.enabled = True
        torch.backends.cudnn.benchmark = True
    training_utils.set_random_seeds(args.seed)
    training_utils.configure_torch_compiler(args)

    # Networks, as in train()
    model_dtype: torch.dtype = getattr(torch, args.model_dtype)
    student_backbone = registry.net_factory(args.network, 0, args.channels, config=args.model_config, size=args.size)
    teacher_model_config = {**(args.model_config or {}), "drop_path_rate": 0.0}
    teacher_backbone = registry.net_factory(args.network, 0, args.channels, config=teacher_model_config,
                                            size=args.size)
    student_backbone.set_dynamic_size()
    if args.ibot_separate_head is False:
        args.ibot_out_dim = args.dino_out_dim
    head_config = {
        "dino_out_dim": args.dino_out_dim, "use_bn": False, "num_layers": args.dino_head_layers,
        "hidden_dim": args.dino_head_hidden_dim, "head_bottleneck_dim": args.head_bottleneck_dim,
        "ibot_separate_head": args.ibot_separate_head, "ibot_out_dim": args.ibot_out_dim,
    }
    student = DINOv2Student(student_backbone, config=dict(head_config))
    teacher = DINOv2Teacher(teacher_backbone, config=dict(head_config))
    teacher.load_state_dict(student.state_dict())
    teacher.eval()

    dino_loss = DINOLoss(args.dino_out_dim, student_temp=0.1, center_momentum=0.9, queue_size=args.sinkhorn_queue_size)
    koleo_loss = KoLeoLoss()
    ibot_patch_loss = iBOTPatchLoss(args.ibot_out_dim, student_temp=0.1, center_momentum=0.9,
                                    queue_size=args.sinkhorn_queue_size)
    net = torch.nn.ModuleDict({"student": student, "teacher": teacher, "dino_loss": dino_loss,
                               "koleo_loss": koleo_loss, "ibot_patch_loss": ibot_patch_loss})
    net.to(device, dtype=model_dtype)
    if args.fast_matmul is True or args.amp is True:
        torch.set_float32_matmul_precision("high")

    info: dict[str, Any] = {
        "network": args.network,
        "model_config": args.model_config,
        "params_student": _count(student),
        "params_teacher": _count(teacher),
        "params_student_backbone": _count(student.backbone),
        "params_dino_head": _count(student.dino_head),
        "params_ibot_head": 0 if student.ibot_head is None else _count(student.ibot_head),
    }

    if args.compile is True:
        student = torch.compile(student, fullgraph=args.compile_fullgraph, mode=args.compile_mode)
        teacher = torch.compile(teacher, fullgraph=args.compile_fullgraph, mode=args.compile_mode)
        dino_loss.sinkhorn_normalizer.compile(fullgraph=args.compile_fullgraph, mode=args.compile_mode)
        dino_loss = torch.compile(dino_loss, fullgraph=args.compile_fullgraph, mode=args.compile_mode)
        koleo_loss = torch.compile(koleo_loss, fullgraph=args.compile_fullgraph, mode=args.compile_mode)
        ibot_patch_loss.sinkhorn_normalizer.compile(fullgraph=args.compile_fullgraph, mode=args.compile_mode)
        ibot_patch_loss = torch.compile(ibot_patch_loss, fullgraph=args.compile_fullgraph, mode=args.compile_mode)

    # Inputs: birder's mask generator and collator over one fixed batch of synthetic crops
    mask_size = (args.size[0] // student_backbone.max_stride, args.size[1] // student_backbone.max_stride)
    seq_len = mask_size[0] * mask_size[1]
    mask_generator = birder_train.DINOv2BlockMasking(mask_size, min_num_patches=4,
                                                     max_num_patches=mask_size[0] * mask_size[1] // 2,
                                                     min_aspect=0.33, max_aspect=3.33)
    collator = birder_train.TrainCollator(mask_generator, seq_len=seq_len, mask_probability=args.ibot_mask_probability,
                                          mask_ratio_tuple=(0.1, 0.5))
    gen = torch.Generator().manual_seed(seed)
    samples = [(f"synthetic/{k}.jpeg",
                {"global_crops": [torch.randn(args.channels, *args.size, generator=gen) for _ in range(2)],
                 "local_crops": [torch.randn(args.channels, *args.local_crop_size, generator=gen)
                                 for _ in range(args.local_crops_number)]}, 0)
               for k in range(batch_size)]
    data = collator(samples)
    global_crops = data["collated_global_crops"].to(device, dtype=model_dtype)
    local_crops = data["collated_local_crops"].to(device, dtype=model_dtype)
    masks = data["collated_masks"].to(device)
    mask_indices_list = data["mask_indices_list"].to(device)
    n_masked_patches = mask_indices_list.size(0)
    upper_bound = data["upper_bound"]
    masks_weight = data["masks_weight"].to(device)
    del samples, data

    n_local_crops = args.local_crops_number
    n_global_crops = 2
    ibot_loss_scale = 1.0 / n_global_crops
    n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)
    n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
    effective_accum_steps = 1  # one micro-batch per optimizer step here (see the module docstring)

    # Optimizer, scheduler, schedules (virtual epochs of --steps-per-epoch batches)
    epoch_num_batches = args.steps_per_epoch * args.grad_accum_steps
    lr = training_utils.scale_lr(args)
    parameters = training_utils.optimizer_parameter_groups(
        net, args.wd, base_lr=lr, norm_weight_decay=args.norm_wd,
        custom_keys_weight_decay=training_utils.get_wd_custom_keys(args),
        custom_layer_weight_decay=args.custom_layer_wd, layer_decay=args.layer_decay,
        backbone_layer_decay=args.backbone_layer_decay, layer_decay_min_scale=args.layer_decay_min_scale,
        layer_decay_no_opt_scale=args.layer_decay_no_opt_scale, bias_lr=args.bias_lr,
        backbone_prefix="student.backbone", custom_layer_lr_scale=args.custom_layer_lr_scale)
    optimizer = training_utils.get_optimizer(parameters, lr, args)
    scheduler = training_utils.get_scheduler(optimizer, args.steps_per_epoch, args)
    if args.compile_opt is True:
        optimizer.step = torch.compile(optimizer.step, fullgraph=False)

    epoch = 1 if freeze_last_layer else args.freeze_last_layer_epochs + 1
    momentum_schedule = training_utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, 0, epoch_num_batches)
    teacher_temp_schedule = training_utils.cosine_scheduler(args.teacher_temp, args.teacher_temp, args.epochs,
                                                            args.warmup_teacher_temp_epochs, epoch_num_batches,
                                                            args.warmup_teacher_temp)
    wd_schedule = (training_utils.cosine_scheduler(args.wd, args.wd_end, args.epochs, 0, epoch_num_batches)
                   if args.wd_end is not None else None)
    epoch_first_step = (epoch - 1) * epoch_num_batches
    epoch_teacher_temp_schedule = torch.tensor(
        teacher_temp_schedule[epoch_first_step: epoch_first_step + epoch_num_batches], dtype=torch.float32,
        device=device)
    momentum_schedule = momentum_schedule[epoch_first_step: epoch_first_step + epoch_num_batches]
    wd_schedule = None if wd_schedule is None else wd_schedule[epoch_first_step: epoch_first_step + epoch_num_batches]
    del teacher_temp_schedule

    scaler, amp_dtype = training_utils.get_amp_scaler(device, args.amp, args.amp_dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student_without_ddp = student

    net.train()
    teacher.eval()
    optimizer.zero_grad()

    track_extended_metrics = not args.no_extended_metrics
    stats = {k: training_utils.SmoothedValue() for k in
             ("loss", "dino_local", "dino_global", "koleo", "ibot_patch", "proto_agreement", "patch_agreement",
              "target_entropy", "dino_center_drift", "ibot_center_drift")}
    counter = {"i": 0}

    def step() -> None:
        i = counter["i"] % epoch_num_batches
        counter["i"] += 1
        teacher_temp = epoch_teacher_temp_schedule[i]

        with torch.amp.autocast(device.type, enabled=args.amp, dtype=amp_dtype):
            with torch.no_grad():
                teacher_embedding_after_head, teacher_masked_patch_tokens_after_head = teacher(
                    global_crops, n_global_crops, upper_bound, mask_indices_list)
                teacher_patch_tokens_raw = teacher_masked_patch_tokens_after_head
                if args.centering == "centering":
                    if track_extended_metrics is True:
                        prev_dino_center = dino_loss.center.clone()
                        prev_ibot_center = ibot_patch_loss.center.clone()
                    teacher_dino_softmax_centered = dino_loss.softmax_center_teacher(
                        teacher_embedding_after_head, teacher_temp=teacher_temp
                    ).view(n_global_crops, -1, *teacher_embedding_after_head.shape[1:])
                    dino_loss.update_center(teacher_embedding_after_head)

                    teacher_masked_patch_tokens_after_head = teacher_masked_patch_tokens_after_head.unsqueeze(0)
                    masked_teacher_ibot_softmax_centered = ibot_patch_loss.softmax_center_teacher(
                        teacher_masked_patch_tokens_after_head[:, :n_masked_patches], teacher_temp=teacher_temp)
                    masked_teacher_ibot_softmax_centered = masked_teacher_ibot_softmax_centered.squeeze(0)
                    ibot_patch_loss.update_center(teacher_masked_patch_tokens_after_head[:, :n_masked_patches])
                else:
                    teacher_dino_softmax_centered = dino_loss.sinkhorn_knopp_teacher(
                        teacher_embedding_after_head, teacher_temp=teacher_temp
                    ).view(n_global_crops, -1, *teacher_embedding_after_head.shape[1:])
                    masked_teacher_ibot_softmax_centered = ibot_patch_loss.sinkhorn_knopp_teacher(
                        teacher_masked_patch_tokens_after_head, teacher_temp=teacher_temp)

            student_output = student(global_crops, local_crops, masks, upper_bound, mask_indices_list,
                                     return_moe_training_output=False)
            student_global_embedding = student_output["global_embedding"]
            student_global_embedding_after_head = student_output["global_embedding_after_head"]
            student_local_embedding_after_head = student_output["local_embedding_after_head"]
            student_global_masked_patch_tokens_after_head = student_output["global_masked_patch_tokens_after_head"]

            loss_dino_local_crops = dino_loss(
                student_local_embedding_after_head.chunk(n_local_crops), teacher_dino_softmax_centered.unbind(0)
            ) / (n_global_crops_loss_terms + n_local_crops_loss_terms)
            loss = args.dino_loss_weight * loss_dino_local_crops

            loss_scales = n_global_crops
            loss_dino_global_crops = (
                dino_loss([student_global_embedding_after_head], [teacher_dino_softmax_centered.flatten(0, 1)])
                * loss_scales / (n_global_crops_loss_terms + n_local_crops_loss_terms))
            loss += args.dino_loss_weight * loss_dino_global_crops

            loss_koleo = sum(koleo_loss(p) for p in student_global_embedding.chunk(n_global_crops))
            loss += args.koleo_loss_weight * loss_koleo

            loss_ibot_patch = (
                ibot_patch_loss(student_global_masked_patch_tokens_after_head, masked_teacher_ibot_softmax_centered,
                                student_masks_flat=masks, masks_weight=masks_weight,
                                n_masked_patches=n_masked_patches)
                * loss_scales * ibot_loss_scale)
            loss += args.ibot_loss_weight * loss_ibot_patch

        ssl_loss = loss
        loss = ssl_loss / effective_accum_steps
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if args.freeze_last_layer_epochs >= epoch:
            student_without_ddp.dino_head.cancel_last_layer_gradients()
            if student_without_ddp.ibot_head is not None:
                student_without_ddp.ibot_head.cancel_last_layer_gradients()

        if scaler is not None:
            if args.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            if args.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad_norm)
            optimizer.step()
        optimizer.zero_grad()
        scheduler.step()  # --lr-scheduler-update step

        with torch.no_grad():
            m = momentum_schedule[i]
            torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), weight=1 - m)
        if wd_schedule is not None:
            wd = wd_schedule[i]
            for param_group in optimizer.param_groups:
                if param_group["weight_decay"] > 0:
                    param_group["weight_decay"] = wd

        if birder_metrics is True:
            stats["loss"].update(ssl_loss.detach())
            stats["dino_local"].update(loss_dino_local_crops.detach())
            stats["dino_global"].update(loss_dino_global_crops.detach())
            stats["koleo"].update(loss_koleo.detach())
            stats["ibot_patch"].update(loss_ibot_patch.detach())
            if track_extended_metrics is True:
                probs_teacher = teacher_embedding_after_head.chunk(n_global_crops)
                probs_student = student_global_embedding_after_head.chunk(n_global_crops)
                stats["proto_agreement"].update(
                    training_utils.accuracy(probs_teacher[0].argmax(dim=1), probs_student[0].argmax(dim=1)))
                stats["patch_agreement"].update(training_utils.accuracy(
                    teacher_patch_tokens_raw.argmax(dim=1),
                    student_global_masked_patch_tokens_after_head.argmax(dim=1)))
                with torch.no_grad():
                    p = teacher_dino_softmax_centered.detach()
                    p = p.reshape(-1, p.size(-1))
                    marginal = p.mean(dim=0).clamp_min(1e-12)
                    entropy = -(marginal * marginal.log()).sum()
                stats["target_entropy"].update(entropy.detach())
                if args.centering == "centering":
                    stats["dino_center_drift"].update(
                        torch.norm(dino_loss.center - prev_dino_center, p=2).detach())
                    stats["ibot_center_drift"].update(
                        torch.norm(ibot_patch_loss.center - prev_ibot_center, p=2).detach())

    info.update({
        "batch_size": batch_size,
        "global_crops": f"2 x {args.size[0]}x{args.size[1]}",
        "local_crops": f"{n_local_crops} x {args.local_crop_size[0]}x{args.local_crop_size[1]}",
        "seq_len": seq_len,
        "masked_tokens": n_masked_patches,
        "upper_bound": upper_bound,
        "masked_global_crops": int(masks.any(dim=1).sum()),
        "global_crops_in_batch": int(masks.size(0)),
        "dino_out_dim": args.dino_out_dim,
        "ibot_out_dim": args.ibot_out_dim if args.ibot_separate_head else None,
        "centering": args.centering,
        "precision": precision,
        "amp_dtype": None if amp_dtype is None else str(amp_dtype),
        "grad_scaler": scaler is not None,
        "compile": args.compile,
        "optimizer": type(optimizer).__name__,
        "fused": bool(optimizer.defaults.get("fused")),
        "param_groups": len(optimizer.param_groups),
        "optimizer_params": sum(len(g["params"]) for g in optimizer.param_groups),
        "lr_peak": lr,
        "epoch": epoch,
        "last_layer_frozen": args.freeze_last_layer_epochs >= epoch,
        "birder_metrics": birder_metrics,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "device": str(device),
    })
    return step, info


def _time(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true",
                        help="one step of the real Bio-DINO network (vit_reg4_so150m_p14_ls, 98,304 prototypes), "
                             "batch 2")
    cli = parser.parse_args()
    cpu = torch.device("cpu")
    if cli.real:
        step, info = birder_step("vit_reg4_so150m_p14_ls", batch_size=2, n_local=8, global_size=224, local_size=98,
                                 dino_out_dim=98304, ibot_out_dim=98304, bottleneck_dim=320, hidden_dim=2048,
                                 separate_ibot_head=True, device=cpu, precision="32-true", compile=False)
        print(info)
        print(f"step: {_time(step, cpu, warmup=0, steps=1):.2f} s")
    else:
        # birder's tiny ViT (12 x 192, 1 register, patch 14), 6x6 global / 3x3 local patch grids
        step, info = birder_step("vit_reg1_t14", batch_size=4, n_local=2, global_size=84, local_size=42,
                                 dino_out_dim=1024, ibot_out_dim=1024, bottleneck_dim=64, hidden_dim=256,
                                 separate_ibot_head=True, device=cpu, precision="32-true", compile=False)
        print(info)
        print(f"step: {_time(step, cpu, warmup=1, steps=3) * 1e3:.1f} ms")
