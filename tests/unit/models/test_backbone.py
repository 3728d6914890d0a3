"""Backbone: parameter counts of the seed models, shapes, position embeddings, masking, attention."""

from __future__ import annotations

import math

import pytest
import torch

from biodino.models import build_backbone

# Published parameter counts of the seed models' backbones (model cards / birder releases).
SEED_COUNTS = [
    ("vit_reg4_so150m_p14_ls", 224, 133_623_712),
    ("vit_reg4_so150m_p14_ls", 252, 133_684_640),
    ("vit_reg4_so150m_p14_ls", 336, 133_910_432),
    ("vit_b16_ls", 224, 85_817_088),
]


@pytest.mark.parametrize("preset,size,expected", SEED_COUNTS)
def test_seed_model_parameter_counts(preset: str, size: int, expected: int) -> None:
    with torch.device("meta"):
        model = build_backbone(preset, image_size=size)
    assert model.num_params() == expected


def test_sovit_position_embedding_covers_special_tokens() -> None:
    with torch.device("meta"):
        model = build_backbone("vit_reg4_so150m_p14_ls")
    assert tuple(model.pos_embedding.shape) == (1, 261, 896)  # 16*16 patches + class + 4 registers


@pytest.mark.parametrize(
    "preset,size,embedding,detection",
    [
        ("vit_reg4_so150m_p14_ls", 252, (1, 896), (1, 896, 18, 18)),
        ("vit_b16_ls", 224, (1, 768), (1, 768, 14, 14)),
    ],
)
def test_seed_model_output_shapes(preset, size, embedding, detection) -> None:
    model = build_backbone(preset, image_size=size).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert tuple(model.embedding(x).shape) == embedding
        assert tuple(model.detection_features(x)["stage1"].shape) == detection
        out = model.forward_features(x)
    assert tuple(out.registers.shape) == (1, model.num_registers, embedding[1])
    assert tuple(out.patches.shape) == (1, detection[2] * detection[3], embedding[1])


def test_local_crop_size_runs_in_the_same_model() -> None:
    model = build_backbone("vit_tiny_reg4_p14").eval()  # stored at 56 px (4x4 grid)
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 98, 98))
    assert tuple(out.patches.shape) == (2, 49, 64)
    with pytest.raises(ValueError, match="100x98 is not a multiple of patch size 14"):
        model.embedding(torch.randn(1, 3, 100, 98))


def test_stochastic_depth_rises_linearly_to_the_preset_rate() -> None:
    model = build_backbone("vit_tiny_p8", drop_path_rate=0.1)
    rates = [blk.drop_path.p for blk in model.encoder.block]
    assert rates == pytest.approx([0.1 * i / 3 for i in range(4)])


def test_norms_and_layer_scale_of_the_presets() -> None:
    with torch.device("meta"):
        model = build_backbone("vit_reg4_so150m_p14_ls")
    blk = model.encoder.block[0]
    assert blk.norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert model.encoder.block[-1].drop_path.p == pytest.approx(0.1)
    fresh = build_backbone("vit_tiny_reg4_p14")
    assert torch.all(fresh.encoder.block[1].layer_scale_2.gamma == 1e-5)


def _smooth_grid_embedding(model) -> None:
    """Fill the grid part with a smooth field, as trained position embeddings are."""
    gh, gw = model.grid
    ys, xs = torch.meshgrid(torch.linspace(0, 1, gh), torch.linspace(0, 1, gw), indexing="ij")
    freqs = torch.arange(1, model.embed_dim + 1) / model.embed_dim
    field = torch.sin(2 * math.pi * (ys[..., None] * freqs + xs[..., None] * freqs.flip(0)))
    with torch.no_grad():
        model.pos_embedding[0, model.num_prefix_tokens :] = field.reshape(gh * gw, -1)


def test_pos_embed_resize_round_trip_keeps_grid_and_special_tokens() -> None:
    model = build_backbone("vit_reg4_so150m_p14_ls", depth=1)  # 224 px: 16x16 grid
    _smooth_grid_embedding(model)
    original = model.pos_embedding.detach().clone()
    model.resize_pos_embed(252)
    assert model.grid == (18, 18) and model.image_size == 252
    assert tuple(model.pos_embedding.shape) == (1, 5 + 18 * 18, 896)
    model.resize_pos_embed(224)
    back = model.pos_embedding.detach()
    assert torch.equal(back[:, :5], original[:, :5])  # class + registers bit-identical
    err = (back[:, 5:] - original[:, 5:]).abs().max().item()
    assert err < 0.02, f"round-trip error {err}"


def test_on_the_fly_resize_leaves_stored_embedding_and_matches_permanent_resize_shape() -> None:
    model = build_backbone("vit_tiny_p16").eval()  # 64 px, 4x4 grid
    before = model.pos_embedding.detach().clone()
    with torch.no_grad():
        model.embedding(torch.randn(1, 3, 96, 96))
    assert torch.equal(model.pos_embedding, before)


def test_masked_patches_are_replaced_by_the_mask_token() -> None:
    model = build_backbone("vit_tiny_p16", drop_path_rate=0.0).eval()
    mask_token = torch.randn(64)
    a = torch.randn(1, 3, 64, 64)
    b = a.clone()
    b[..., :16, :16] = torch.randn(3, 16, 16)  # differs only inside patch 0
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 0] = True
    with torch.no_grad():
        masked_a = model.forward_features(a, masks, mask_token).patches
        masked_b = model.forward_features(b, masks, mask_token).patches
        plain_a = model.forward_features(a).patches
        plain_b = model.forward_features(b).patches
        other_token = model.forward_features(a, masks, torch.randn(64)).patches
        none_masked = model.forward_features(a, torch.zeros_like(masks), mask_token).patches
    torch.testing.assert_close(masked_a, masked_b)  # patch content no longer matters
    assert not torch.allclose(plain_a, plain_b)
    assert not torch.allclose(masked_a, other_token)  # the token's value does
    torch.testing.assert_close(none_masked, plain_a)
    with pytest.raises(ValueError, match="without a mask_token"):
        model.forward_features(a, masks)
    with pytest.raises(ValueError, match="masks shape"):
        model.forward_features(a, masks[:, :8], mask_token)


def test_initialization_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(3)
    a = build_backbone("vit_tiny_reg4_p14").state_dict()
    torch.manual_seed(3)
    b = build_backbone("vit_tiny_reg4_p14").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_backward_reaches_every_parameter() -> None:
    model = build_backbone("vit_tiny_reg4_p14").train()
    masks = torch.rand(2, 16) < 0.3
    out = model.forward_features(torch.randn(2, 3, 56, 56), masks, torch.zeros(64, requires_grad=True))
    (out.cls.square().sum() + out.patches.mean() + out.registers.mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = build_backbone("vit_tiny_p8", drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    model.embedding(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model.embedding(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_sdpa_attention_matches_a_plain_reference() -> None:
    from biodino.models.attention import Attention

    attn = Attention(48, num_heads=4)
    x = torch.randn(2, 7, 48)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 4, 12).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(12), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 48))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def test_xformers_backend_falls_back_to_sdpa_off_cuda_with_a_warning() -> None:
    torch.manual_seed(1)
    sdpa = build_backbone("vit_tiny_p16").eval()
    xf = build_backbone("vit_tiny_p16", attn_backend="xformers").eval()
    xf.load_state_dict(sdpa.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(UserWarning, match="attention backend 'xformers' unavailable"):
        out = xf.embedding(x)
    torch.testing.assert_close(out, sdpa.embedding(x))


def test_unknown_preset_and_backend_are_named() -> None:
    with pytest.raises(KeyError, match="vit_huge"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="'flash'"):
        build_backbone("vit_tiny_p8", attn_backend="flash")


def test_one_pass_over_two_crop_sizes_equals_two_passes() -> None:
    """The student's single pass of the blocks over global and local crops (attention within each size) computes
    what a separate forward of each does; so does the masked variant."""
    model = build_backbone("vit_tiny_reg4_p14", drop_path_rate=0.0).eval()
    g, loc = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    masks, token = torch.rand(4, 16) < 0.3, torch.randn(64)
    out_g, out_l = model.forward_features_list([g, loc], [masks, None], token)
    for ours, ref in ((out_g, model.forward_features(g, masks, token)), (out_l, model.forward_features(loc))):
        for field in ("cls", "registers", "patches"):
            torch.testing.assert_close(getattr(ours, field), getattr(ref, field), atol=1e-5, rtol=1e-5)


def test_drop_path_drops_whole_images_at_its_rate_and_rescales_the_rest() -> None:
    from biodino.models.vit import DropPath

    torch.manual_seed(0)
    drop = DropPath(0.25).train()
    shapes = ((3000, 2), (1000, 3))  # two groups of images, their tokens flat
    out = drop(torch.ones(3000 * 2 + 1000 * 3, 1), shapes).view(-1)
    first, second = out[:6000].view(3000, 2), out[6000:].view(1000, 3)
    for group in (first, second):
        assert (group == group[:, :1]).all()  # one draw per image, shared by its tokens
        assert set(group[:, 0].unique().tolist()) <= {0.0, float(torch.tensor(1 / 0.75))}
    kept = torch.cat([first[:, 0], second[:, 0]]).ne(0).float().mean()
    assert abs(float(kept) - 0.75) < 0.03
    assert torch.equal(drop.eval()(torch.ones(5, 1), ((5, 1),)), torch.ones(5, 1))


def test_drop_path_rate_survives_meta_construction_and_loading() -> None:
    with torch.device("meta"):
        model = build_backbone("vit_tiny_p8", drop_path_rate=0.3)
    model = model.to_empty(device="cpu")
    model.load_state_dict(build_backbone("vit_tiny_p8", drop_path_rate=0.3).state_dict())
    assert model.encoder.block[-1].drop_path.survival == pytest.approx(0.7)
