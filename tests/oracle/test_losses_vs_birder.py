"""DINOv2 losses, targets and head against birder 0.8.4 (the framework that trained Bio-DINO), fp32."""

from __future__ import annotations

import pytest
import torch

from biodino.ssl.heads import DINOHead
from biodino.data.masking import masked_positions
from biodino.ssl.losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp

ref = pytest.importorskip("birder.net.ssl.dino_v2")  # dev extra: always present in CI
RTOL = 1e-6


def test_dino_loss_as_birder_composes_it() -> None:
    B, K, n_local = 6, 64, 8
    temp = torch.tensor(0.05)
    teacher_logits, s_g, s_l = torch.randn(2 * B, K), torch.randn(2 * B, K), torch.randn(n_local * B, K)
    theirs = ref.DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    t = theirs.softmax_center_teacher(teacher_logits, teacher_temp=temp)
    swapped = torch.cat([t[B:], t[:B]]).view(2, B, K)  # birder's teacher returns [crop 1, crop 0]
    terms = 2 + 2 * n_local
    expected = (theirs(list(s_l.chunk(n_local)), list(swapped.unbind(0))) / terms
                + theirs([s_g], [swapped.flatten(0, 1)]) * 2 / terms)
    ours = dino_loss(s_g, s_l, SoftmaxCenter(K)(teacher_logits, float(temp)), 0.1)
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=0.0)


def test_ibot_loss_as_birder_composes_it() -> None:
    n_img, N, K = 8, 16, 32
    masks = torch.rand(n_img, N) < 0.3
    M = int(masks.sum())
    s, t = torch.randn(M, K), torch.softmax(torch.randn(M, K), -1)
    weights = masked_positions(masks, 0)[1]
    theirs = ref.iBOTPatchLoss(K, student_temp=0.1, center_momentum=0.9)
    expected = theirs(s, t, student_masks_flat=masks, masks_weight=weights, n_masked_patches=M) * 2 * 0.5
    torch.testing.assert_close(ibot_loss(s, t, weights, n_img, 0.1), expected, rtol=RTOL, atol=0.0)


def test_koleo_as_birder() -> None:
    x = torch.randn(16, 24)
    torch.testing.assert_close(koleo_loss(x), ref.KoLeoLoss()(x), rtol=RTOL, atol=0.0)


def test_sinkhorn_and_center_update_as_birder() -> None:
    logits, temp = torch.randn(40, 32), torch.tensor(0.06)
    expected = ref.SinkhornKnoppNormalization()(logits, None, temp, 3)
    torch.testing.assert_close(sinkhorn_knopp(logits, float(temp), 3), expected, rtol=1e-5, atol=1e-8)

    theirs, ours = ref.DINOLoss(32, 0.1, 0.9), SoftmaxCenter(32, 0.9)
    for _ in range(3):
        batch = torch.randn(10, 32)
        t_probs = theirs.softmax_center_teacher(batch, teacher_temp=temp)
        theirs.update_center(batch)
        torch.testing.assert_close(ours(batch, float(temp)), t_probs, rtol=RTOL, atol=1e-9)
    theirs.apply_center_update()
    torch.testing.assert_close(ours.center, theirs.center, rtol=RTOL, atol=1e-9)


def test_head_keys_outputs_and_bio_dino_size_as_birder() -> None:
    theirs = ref.DINOHead(48, 200, use_bn=False, num_layers=3, hidden_dim=64, bottleneck_dim=16)
    ours = DINOHead(48, 200, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 48)
    torch.testing.assert_close(ours(x), theirs(x), rtol=RTOL, atol=1e-7)
    with torch.device("meta"):
        bio = DINOHead(896, 98_304, hidden_dim=2048, bottleneck_dim=320)
    assert sum(p.numel() for p in bio.parameters()) == 38_244_672  # REFERENCE.md: birder's Bio-DINO head
    assert len(bio.state_dict()) == 8
