"""Each loss and teacher target against an explicit computation written out here (loops, formulas)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biodino.data.masking import masked_positions
from biodino.ssl.losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp


def _ce(target: torch.Tensor, student_logits: torch.Tensor, temp: float) -> torch.Tensor:
    return -(target * F.log_softmax(student_logits / temp, dim=-1)).sum()


@pytest.mark.parametrize("n_local", [0, 3, 8])
def test_dino_loss_matches_loops_over_crops(n_local: int) -> None:
    B, K, T = 5, 17, 0.1
    t = torch.softmax(torch.randn(2 * B, K), -1)
    s_g, s_l = torch.randn(2 * B, K), torch.randn(n_local * B, K)
    total, terms = 0.0, 0
    for ti in range(2):
        students = [s_g[j * B : (j + 1) * B] for j in range(2) if j != ti]
        students += [s_l[j * B : (j + 1) * B] for j in range(n_local)]
        for s in students:
            total += sum(_ce(t[ti * B + b], s[b], T) for b in range(B)) / B
            terms += 1
    assert terms == 2 + 2 * n_local
    torch.testing.assert_close(dino_loss(s_g, s_l, t, T), total / terms, rtol=1e-6, atol=1e-6)


def test_ibot_loss_matches_loops_over_images_and_tokens() -> None:
    n_img, N, K, T = 6, 9, 11, 0.1
    masks = torch.rand(n_img, N) < 0.4
    masks[0] = False  # an unmasked image contributes nothing
    M = int(masks.sum())
    s, t = torch.randn(M, K), torch.softmax(torch.randn(M, K), -1)
    expected, row = 0.0, 0
    for i in range(n_img):
        for j in range(N):
            if masks[i, j]:
                expected += _ce(t[row], s[row], T) / masks[i].sum()
                row += 1
    got = ibot_loss(s, t, masked_positions(masks, 0)[1], n_img, T)
    torch.testing.assert_close(got, expected / n_img, rtol=1e-6, atol=1e-6)


def test_koleo_matches_nearest_neighbour_formula() -> None:
    x = torch.randn(7, 5)
    xn = x / x.norm(dim=1, keepdim=True)
    logs = []
    for i in range(7):
        j = max((k for k in range(7) if k != i), key=lambda k: float(xn[i] @ xn[k]))
        logs.append(math.log(float((xn[i] - xn[j] + 1e-8).norm()) + 1e-8))
    assert float(koleo_loss(x)) == pytest.approx(-sum(logs) / 7, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        koleo_loss(x[:1])


def test_sinkhorn_rows_sum_to_one_and_prototypes_are_equipartitioned() -> None:
    n, K = 64, 16
    logits = torch.randn(n, K)
    uniform = torch.full((K,), n / K)
    naive = torch.softmax(logits / 0.5, -1).sum(0)
    deviations = []
    for iterations in (3, 50):
        q = sinkhorn_knopp(logits, temperature=0.5, iterations=iterations)
        torch.testing.assert_close(q.sum(1), torch.ones(n))
        deviations.append(float(((q.sum(0) - uniform).abs() / uniform).max()))
    naive_dev = float(((naive - uniform).abs() / uniform).max())
    assert deviations[0] < 0.5 * naive_dev and deviations[0] < 0.15  # 3 iterations: close to equipartition
    assert deviations[1] < 1e-4  # and converging to it


def test_sinkhorn_matches_the_papers_k_by_b_formulation() -> None:
    logits, T = torch.randn(12, 7), 0.1
    Q = torch.exp(logits.double() / T).t()  # K x B
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(3):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    expected = (Q * B).t().float()
    torch.testing.assert_close(sinkhorn_knopp(logits, T, 3), expected, rtol=1e-5, atol=1e-7)


def test_softmax_center_uses_old_center_then_moves_by_ema() -> None:
    center = SoftmaxCenter(5, momentum=0.9)
    c0 = torch.randn(1, 5)
    center.center.copy_(c0)
    logits = torch.randn(8, 5)
    probs = center(logits, 0.04)
    torch.testing.assert_close(probs, torch.softmax((logits - c0) / 0.04, -1))
    torch.testing.assert_close(center.center, 0.9 * c0 + 0.1 * logits.mean(0, keepdim=True))


def test_softmax_center_ignores_an_empty_batch() -> None:
    center = SoftmaxCenter(4)
    center.center.fill_(1.0)
    assert center(torch.empty(0, 4), 0.04).shape == (0, 4)
    torch.testing.assert_close(center.center, torch.ones(1, 4))


def test_padding_rows_take_no_part_in_the_targets() -> None:
    """The masked-token buffer has a fixed size; its padding rows (valid = False) must leave the real rows' targets
    and the center's update exactly as if they were absent."""
    real, pad = torch.randn(13, 17), torch.randn(5, 17) * 4
    padded, valid = torch.cat([real, pad]), torch.cat([torch.ones(13, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)])
    torch.testing.assert_close(sinkhorn_knopp(padded, 0.05, 3, valid=valid)[:13], sinkhorn_knopp(real, 0.05, 3))
    assert torch.equal(sinkhorn_knopp(padded, 0.05, 3, valid=valid)[13:], torch.zeros(5, 17))
    a, b = SoftmaxCenter(17, momentum=0.7), SoftmaxCenter(17, momentum=0.7)
    torch.testing.assert_close(a(padded, 0.1, valid=valid)[:13], b(real, 0.1))
    torch.testing.assert_close(a.center, b.center)


def test_sinkhorn_does_not_modify_its_input() -> None:
    logits = torch.randn(6, 9)
    before = logits.clone()
    sinkhorn_knopp(logits, 0.1, 3)
    assert torch.equal(logits, before)
