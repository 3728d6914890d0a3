"""Franca's nested Matryoshka heads: sizes, prefix slicing, last-layer names, and equality with birder 0.8.4."""

from __future__ import annotations

import re

import pytest
import torch

from biodino.ssl.matryoshka import MatryoshkaHead, nesting_dims
from biodino.models import build_backbone
from biodino.ssl.network import SSLNetwork
from biodino.ssl.param_groups import param_rule

ref = pytest.importorskip("birder.net.ssl.franca")  # dev extra: always present in CI

RTOL = 1e-6
SMALL = dict(in_dim=32, num_prototypes=64, levels=3, hidden_dim=24, bottleneck_dim=8, nlayers=3)


def _birder_head(in_dim: int, num_prototypes: int, levels: int, hidden_dim: int, bottleneck_dim: int,
                 nlayers: int) -> torch.nn.Module:
    return ref.DINOHeadMRL(num_prototypes, use_bn=False, num_layers=nlayers, hidden_dim=hidden_dim,
                           bottleneck_dim=bottleneck_dim, nesting_list=ref._get_nesting_list(in_dim, levels))


def _to_ours(key: str) -> str:
    """birder's DINOHeadMRL keys -> ours: per-kind ModuleLists become one ModuleList of per-level heads."""
    key = re.sub(r"^matryoshka_projections\.(\d+)\.", r"levels.\1.proj.", key)
    key = re.sub(r"^mlps\.(\d+)\.", r"levels.\1.mlp.", key)
    return re.sub(r"^last_layers\.(\d+)\.", r"levels.\1.last_layer.", key)


def test_nesting_dims_and_prototype_counts() -> None:
    assert nesting_dims(768, 4) == [96, 192, 384, 768] == ref._get_nesting_list(768, 4)
    assert nesting_dims(768, 1) == [768]
    with torch.device("meta"):
        head = MatryoshkaHead(768, 65_536, levels=4, bottleneck_dim=320)
    assert head.dims == [96, 192, 384, 768]
    assert head.num_prototypes == [8_192, 16_384, 32_768, 65_536]
    assert [lvl.last_layer.weight.shape[0] for lvl in head.levels] == head.num_prototypes


@pytest.mark.parametrize("dim, levels", [(768, 0), (100, 4), (96, 7)])
def test_bad_nesting_raises(dim: int, levels: int) -> None:
    with pytest.raises(ValueError, match="levels|divisible"):
        MatryoshkaHead(dim, 64, levels=levels)


def test_vit_b16_head_has_franca_parameter_count() -> None:
    sizes = dict(in_dim=768, num_prototypes=65_536, levels=4, hidden_dim=2048, bottleneck_dim=320, nlayers=3)
    with torch.device("meta"):
        ours, theirs = MatryoshkaHead(**sizes), _birder_head(**sizes)
    assert sum(p.numel() for p in theirs.parameters()) == 62_594_720
    assert sum(p.numel() for p in ours.parameters()) == 62_594_720


def test_each_level_reads_only_its_prefix() -> None:
    head = MatryoshkaHead(**SMALL)
    x = torch.randn(5, 32)
    base = head(x)
    for i, d in enumerate(head.dims):
        y = x.clone()
        y[:, d:] += torch.randn(5, 32 - d)
        out = head(y)
        for j in range(len(head.dims)):
            if j <= i:
                torch.testing.assert_close(out[j], base[j], rtol=0, atol=0)
            else:  # finer levels see the change: the slicing is not trivially ignoring the input
                assert not torch.allclose(out[j], base[j])


def test_gradients_reach_a_feature_band_only_from_its_level_and_finer() -> None:
    head = MatryoshkaHead(**SMALL)
    x = torch.randn(5, 32, requires_grad=True)
    outs = head(x)
    bands = list(zip([0] + head.dims[:-1], head.dims))
    for j, out in enumerate(outs):
        (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x)
        for i, (lo, hi) in enumerate(bands):
            reached = bool(grad[:, lo:hi].abs().sum() > 0)
            assert reached == (i <= j), f"band {i} [{lo}, {hi}) from level {j}: reached={reached}"


def test_last_layers_are_named_for_the_optimizer_freeze() -> None:
    head = MatryoshkaHead(**SMALL)
    names = [f"dino_head.{n}" for n, _ in head.named_parameters()]
    with torch.device("meta"):
        network = SSLNetwork(build_backbone("vit_tiny_p8"), head, None)
    frozen = [n for n in names if param_rule(n, 2, network, 1.0, 1.0).last_layer]
    assert len(frozen) == 2 * SMALL["levels"]  # weight-norm gain and direction per level
    assert all(".parametrizations.weight.original" in n for n in frozen)
    for level in head.levels:  # gain starts at 1 and is trainable
        g = level.last_layer.parametrizations.weight.original0
        assert g.requires_grad and torch.equal(g, torch.ones_like(g))


@pytest.mark.parametrize("nlayers", [1, 2, 3])
def test_outputs_match_birder_franca_head(nlayers: int) -> None:
    sizes = dict(in_dim=64, num_prototypes=512, levels=4, hidden_dim=96, bottleneck_dim=24, nlayers=nlayers)
    theirs, ours = _birder_head(**sizes), MatryoshkaHead(**sizes)
    with torch.no_grad():  # non-trivial biases and gains, so every tensor's placement matters
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    state = {_to_ours(k): v for k, v in theirs.state_dict().items()}
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state)
    x = torch.randn(7, 64)
    got, want = ours(x), theirs(x)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=1e-7)


def test_fresh_init_matches_birder_statistics() -> None:
    """Same init recipe: trunc-normal(0.02) Linear weights, zero biases, unit gains, default-init directions."""
    sizes = dict(in_dim=256, num_prototypes=1024, levels=2, hidden_dim=256, bottleneck_dim=64, nlayers=3)
    ours, theirs = MatryoshkaHead(**sizes).state_dict(), _birder_head(**sizes).state_dict()
    for k, v in theirs.items():
        mine = ours[_to_ours(k)]
        assert mine.shape == v.shape
        if k.endswith("bias") or k.endswith("original0"):
            assert torch.equal(mine, v)
        else:
            assert abs(mine.std().item() / v.std().item() - 1) < 0.1


def test_matryoshka_input_defaults_to_prefix_and_full_reads_every_feature() -> None:
    from biodino.config.recipe import load_config

    assert load_config("tiny").objective.franca.matryoshka_input == "prefix"
    assert load_config("franca_bioscan5m").objective.franca.matryoshka_input == "prefix"  # birder's, the seed's
    assert load_config("tiny", ["objective.franca.matryoshka_input=full"]).objective.franca.matryoshka_input == "full"
    full = MatryoshkaHead(**SMALL, matryoshka_input="full")
    assert [lvl.proj.in_features for lvl in full.levels] == [32, 32, 32]
    assert [lvl.proj.out_features for lvl in full.levels] == full.dims == [8, 16, 32]
    assert [lvl.proj.in_features for lvl in MatryoshkaHead(**SMALL).levels] == [8, 16, 32]
    with pytest.raises(ValueError, match="matryoshka_input"):
        MatryoshkaHead(**SMALL, matryoshka_input="suffix")


def test_an_unknown_matryoshka_input_is_refused_naming_the_key() -> None:
    from biodino.config.recipe import load_config
    from biodino.config.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["objective.franca.matryoshka_input=bogus"])
    assert str(err.value).startswith("objective.franca.matryoshka_input:"), str(err.value)
    assert "prefix" in str(err.value) and "full" in str(err.value)
