"""Both Matryoshka head inputs against their references: ``prefix`` against birder 0.8.4's ``DINOHeadMRL`` (installed:
names, shapes, outputs), ``full`` against valeoai/Franca's ``MRLDINOHead`` (not installed, never downloaded: its
shapes are written out below from its source, its forward pass is re-derived with plain torch ops)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from biodino.config.recipe import load_config
from biodino.ssl.franca import FrancaModule
from biodino.ssl.matryoshka import MatryoshkaHead

birder = pytest.importorskip("birder.net.ssl.franca")  # dev extra: always present in CI

TOL = dict(rtol=1e-6, atol=1e-6)


# --- prefix: birder 0.8.4 ---------------------------------------------------------------------------------------

def _birder_to_ours(key: str) -> str:
    """birder ``DINOHeadMRL`` keeps one ModuleList per layer kind; ours keeps one ModuleList of levels."""
    for theirs, ours in (("matryoshka_projections", "proj"), ("mlps", "mlp"), ("last_layers", "last_layer")):
        key = re.sub(rf"^{theirs}\.(\d+)\.", rf"levels.\1.{ours}.", key)
    return key


def _birder_head(in_dim, num_prototypes, levels, hidden_dim, bottleneck_dim, nlayers):
    return birder.DINOHeadMRL(num_prototypes, use_bn=False, num_layers=nlayers, hidden_dim=hidden_dim,
                              bottleneck_dim=bottleneck_dim, nesting_list=birder._get_nesting_list(in_dim, levels))


def test_prefix_has_birders_parameters_name_by_name_for_the_bioscan_recipe() -> None:
    """configs/franca_bioscan5m.yaml's head: ViT-B (768), 4 levels, 65,536 prototypes, 2048 hidden, 320 bottleneck."""
    sizes = dict(in_dim=768, num_prototypes=65_536, levels=4, hidden_dim=2048, bottleneck_dim=320, nlayers=3)
    with torch.device("meta"):
        ours, theirs = MatryoshkaHead(**sizes, matryoshka_input="prefix"), _birder_head(**sizes)
    want = {_birder_to_ours(k): tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 62_594_720


@pytest.mark.parametrize("nlayers", [1, 2, 3])
def test_prefix_outputs_equal_birders_for_the_same_weights(nlayers: int) -> None:
    sizes = dict(in_dim=64, num_prototypes=256, levels=4, hidden_dim=48, bottleneck_dim=16, nlayers=nlayers)
    theirs, ours = _birder_head(**sizes), MatryoshkaHead(**sizes, matryoshka_input="prefix")
    with torch.no_grad():  # non-zero biases and non-unit gains: every tensor's place shows in the output
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours.load_state_dict({_birder_to_ours(k): v for k, v in theirs.state_dict().items()})
    x = torch.randn(9, 64)
    got, want = ours(x), theirs(x)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


# --- full: valeoai/Franca (github.com/valeoai/Franca @ 24f8c60) -------------------------------------------------
# franca/layers/mrl_dino_head.py
#   55     matryoshka_projections[i] = nn.Linear(in_dim, d_i, bias=mlp_bias)            (mlp_bias defaults to True)
#   58-70  mlps[i] = _build_mlp(nlayers, d_i, bottleneck_dim, hidden_dim, use_bn=False, bias=mlp_bias), i.e.
#   11-33  Linear(d_i, hidden)-GELU, (Linear(hidden, hidden)-GELU) * (nlayers - 2), Linear(hidden, bottleneck)-GELU
#   73-84  last_layers[i] = weight_norm(nn.Linear(bottleneck, int(out_dim * d_i / nesting_list[-1]), bias=False))
#   86-87  weight_g filled with 1 (torch.nn.utils.weight_norm: weight_g (K_i, 1), weight_v (K_i, bottleneck))
#   97-112 forward: level i = last_layers[i](mlps[i](matryoshka_projections[i](x))), returned as a tuple, coarse first;
#          no L2 normalization before the last layer
# franca/train/ssl_meta_arch.py
#   110-124 DINO head: in_dim = embed_dim, nesting_list = [D//16, D//8, D//4, D//2, D], cfg.dino.head_* sizes
#   152-166 iBOT head (separate_head): the same with cfg.ibot.head_* sizes
# franca/configs/train/IN21K/vitb14.yaml: vit_base (D = 768); dino: head_n_prototypes 131072, head_bottleneck_dim 384;
#   ibot: separate_head true, head_n_prototypes 131072; the rest from franca/configs/ssl_default_config.yaml 43-60:
#   head_nlayers 3, head_hidden_dim 2048, ibot head_bottleneck_dim 256.
# Levels d_i = 48, 96, 192, 384, 768; prototypes K_i = 131072 * d_i / 768 = 8192, 16384, 32768, 65536, 131072.
VALEOAI_VITB_DINO = {
    "matryoshka_projections.0.weight": (48, 768), "matryoshka_projections.0.bias": (48,),
    "mlps.0.0.weight": (2048, 48), "mlps.0.0.bias": (2048,), "mlps.0.2.weight": (2048, 2048), "mlps.0.2.bias": (2048,),
    "mlps.0.4.weight": (384, 2048), "mlps.0.4.bias": (384,),
    "last_layers.0.weight_g": (8192, 1), "last_layers.0.weight_v": (8192, 384),
    "matryoshka_projections.1.weight": (96, 768), "matryoshka_projections.1.bias": (96,),
    "mlps.1.0.weight": (2048, 96), "mlps.1.0.bias": (2048,), "mlps.1.2.weight": (2048, 2048), "mlps.1.2.bias": (2048,),
    "mlps.1.4.weight": (384, 2048), "mlps.1.4.bias": (384,),
    "last_layers.1.weight_g": (16384, 1), "last_layers.1.weight_v": (16384, 384),
    "matryoshka_projections.2.weight": (192, 768), "matryoshka_projections.2.bias": (192,),
    "mlps.2.0.weight": (2048, 192), "mlps.2.0.bias": (2048,), "mlps.2.2.weight": (2048, 2048), "mlps.2.2.bias": (2048,),
    "mlps.2.4.weight": (384, 2048), "mlps.2.4.bias": (384,),
    "last_layers.2.weight_g": (32768, 1), "last_layers.2.weight_v": (32768, 384),
    "matryoshka_projections.3.weight": (384, 768), "matryoshka_projections.3.bias": (384,),
    "mlps.3.0.weight": (2048, 384), "mlps.3.0.bias": (2048,), "mlps.3.2.weight": (2048, 2048), "mlps.3.2.bias": (2048,),
    "mlps.3.4.weight": (384, 2048), "mlps.3.4.bias": (384,),
    "last_layers.3.weight_g": (65536, 1), "last_layers.3.weight_v": (65536, 384),
    "matryoshka_projections.4.weight": (768, 768), "matryoshka_projections.4.bias": (768,),
    "mlps.4.0.weight": (2048, 768), "mlps.4.0.bias": (2048,), "mlps.4.2.weight": (2048, 2048), "mlps.4.2.bias": (2048,),
    "mlps.4.4.weight": (384, 2048), "mlps.4.4.bias": (384,),
    "last_layers.4.weight_g": (131072, 1), "last_layers.4.weight_v": (131072, 384),
}
VALEOAI_VITB_IBOT = {
    "matryoshka_projections.0.weight": (48, 768), "matryoshka_projections.0.bias": (48,),
    "mlps.0.0.weight": (2048, 48), "mlps.0.0.bias": (2048,), "mlps.0.2.weight": (2048, 2048), "mlps.0.2.bias": (2048,),
    "mlps.0.4.weight": (256, 2048), "mlps.0.4.bias": (256,),
    "last_layers.0.weight_g": (8192, 1), "last_layers.0.weight_v": (8192, 256),
    "matryoshka_projections.1.weight": (96, 768), "matryoshka_projections.1.bias": (96,),
    "mlps.1.0.weight": (2048, 96), "mlps.1.0.bias": (2048,), "mlps.1.2.weight": (2048, 2048), "mlps.1.2.bias": (2048,),
    "mlps.1.4.weight": (256, 2048), "mlps.1.4.bias": (256,),
    "last_layers.1.weight_g": (16384, 1), "last_layers.1.weight_v": (16384, 256),
    "matryoshka_projections.2.weight": (192, 768), "matryoshka_projections.2.bias": (192,),
    "mlps.2.0.weight": (2048, 192), "mlps.2.0.bias": (2048,), "mlps.2.2.weight": (2048, 2048), "mlps.2.2.bias": (2048,),
    "mlps.2.4.weight": (256, 2048), "mlps.2.4.bias": (256,),
    "last_layers.2.weight_g": (32768, 1), "last_layers.2.weight_v": (32768, 256),
    "matryoshka_projections.3.weight": (384, 768), "matryoshka_projections.3.bias": (384,),
    "mlps.3.0.weight": (2048, 384), "mlps.3.0.bias": (2048,), "mlps.3.2.weight": (2048, 2048), "mlps.3.2.bias": (2048,),
    "mlps.3.4.weight": (256, 2048), "mlps.3.4.bias": (256,),
    "last_layers.3.weight_g": (65536, 1), "last_layers.3.weight_v": (65536, 256),
    "matryoshka_projections.4.weight": (768, 768), "matryoshka_projections.4.bias": (768,),
    "mlps.4.0.weight": (2048, 768), "mlps.4.0.bias": (2048,), "mlps.4.2.weight": (2048, 2048), "mlps.4.2.bias": (2048,),
    "mlps.4.4.weight": (256, 2048), "mlps.4.4.bias": (256,),
    "last_layers.4.weight_g": (131072, 1), "last_layers.4.weight_v": (131072, 256),
}
# Their sums, by hand: per level 768 d + d + 2048 d + 2048 + 2048^2 + 2048 + 2048 b + b + K (b + 1).
VALEOAI_VITB_DINO_PARAMS = 126_889_296
VALEOAI_VITB_IBOT_PARAMS = 93_072_080


def _valeoai_to_ours(key: str) -> str:
    """valeoai's names -> ours; its deprecated weight_norm's (weight_g, weight_v) are the parametrization's
    (original0, original1)."""
    key = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", key)
    key = re.sub(r"\.weight_v$", ".parametrizations.weight.original1", key)
    return _birder_to_ours(key)


def _shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_the_reference_constants_add_up() -> None:
    for table, total in ((VALEOAI_VITB_DINO, VALEOAI_VITB_DINO_PARAMS), (VALEOAI_VITB_IBOT, VALEOAI_VITB_IBOT_PARAMS)):
        assert sum(torch.Size(s).numel() for s in table.values()) == total


def test_full_has_valeoai_franca_vit_b_heads_shape_by_shape() -> None:
    """Franca ViT-B's recipe built through biodino's config and FrancaModule: both heads, tensor by tensor."""
    cfg = load_config("franca_bioscan5m", [
        "objective.franca.matryoshka_input=full", "objective.franca.nesting_levels=5",
        "objective.dino.head.num_prototypes=131072", "objective.dino.head.bottleneck_dim=384",
        "objective.ibot.separate_head=true", "objective.ibot.head.num_prototypes=131072",
        "objective.ibot.head.hidden_dim=2048", "objective.ibot.head.bottleneck_dim=256",
        "objective.franca.sinkhorn_queue_size=0"])
    with torch.device("meta"):
        network = FrancaModule(cfg).student
    assert network.backbone.embed_dim == 768
    for head, table, total in ((network.dino_head, VALEOAI_VITB_DINO, VALEOAI_VITB_DINO_PARAMS),
                               (network.patch_head, VALEOAI_VITB_IBOT, VALEOAI_VITB_IBOT_PARAMS)):
        assert head.matryoshka_input == "full"
        assert _shapes(head) == {_valeoai_to_ours(k): v for k, v in table.items()}
        assert sum(p.numel() for p in head.parameters()) == total


def test_full_and_prefix_differ_only_in_the_first_layer_of_the_coarser_levels() -> None:
    sizes = dict(in_dim=768, num_prototypes=65_536, levels=4, hidden_dim=2048, bottleneck_dim=320, nlayers=3)
    with torch.device("meta"):
        full, prefix = _shapes(MatryoshkaHead(**sizes, matryoshka_input="full")), _shapes(MatryoshkaHead(**sizes))
    assert full.keys() == prefix.keys()
    differ = {k for k in full if full[k] != prefix[k]}
    assert differ == {"levels.0.proj.weight", "levels.1.proj.weight", "levels.2.proj.weight"}  # (d_i, D) vs (d_i, d_i)
    for k in differ:
        assert full[k][1] == 768 and prefix[k][1] == prefix[k][0] == full[k][0]


def _mlp_linears(i: int, nlayers: int) -> list[str]:
    """valeoai's _build_mlp (mrl_dino_head.py 11-33): a bare Linear when nlayers == 1, else a Sequential whose
    Linears sit at 0, 2, 4, ... (a GELU after each)."""
    return [f"mlps.{i}"] if nlayers == 1 else [f"mlps.{i}.{2 * j}" for j in range(nlayers)]


def _valeoai_names(levels: int, nlayers: int) -> list[str]:
    names = []
    for i in range(levels):
        names += [f"matryoshka_projections.{i}.weight", f"matryoshka_projections.{i}.bias"]
        names += [f"{m}.{t}" for m in _mlp_linears(i, nlayers) for t in ("weight", "bias")]
        names += [f"last_layers.{i}.weight_g", f"last_layers.{i}.weight_v"]
    return names


def _valeoai_forward(state: dict[str, torch.Tensor], x: torch.Tensor, levels: int, nlayers: int) -> list:
    """valeoai/Franca's MRLDINOHead.forward (mrl_dino_head.py 97-112) in plain torch ops on its own tensor names:
    Linear(D, d_i) on all of x, the MLP, then the weight-normalized last layer g * v / ||v|| (row norms:
    torch.nn.utils.weight_norm's dim=0), no L2 norm in between."""
    out = []
    for i in range(levels):
        h = x @ state[f"matryoshka_projections.{i}.weight"].T + state[f"matryoshka_projections.{i}.bias"]
        for m in _mlp_linears(i, nlayers):
            h = h @ state[f"{m}.weight"].T + state[f"{m}.bias"]
            if nlayers > 1:
                h = F.gelu(h)
        v, g = state[f"last_layers.{i}.weight_v"], state[f"last_layers.{i}.weight_g"]
        out.append(h @ (g * v / v.norm(dim=1, keepdim=True)).T)
    return out


@pytest.mark.parametrize("nlayers", [1, 3])
def test_full_outputs_follow_valeoai_franca_forward(nlayers: int) -> None:
    """A state dict in valeoai's names, loaded through the key map, gives the outputs of its forward pass."""
    D, levels, K, hidden, bottleneck = 64, 4, 256, 48, 16
    head = MatryoshkaHead(D, K, levels, hidden, bottleneck, nlayers, matryoshka_input="full")
    ours = head.state_dict()
    inverse = {_valeoai_to_ours(k): k for k in _valeoai_names(levels, nlayers)}
    assert set(inverse) == set(ours)
    theirs = {inverse[k]: torch.randn_like(v) * 0.2 for k, v in ours.items()}
    head.load_state_dict({_valeoai_to_ours(k): v for k, v in theirs.items()})
    x = torch.randn(9, D)
    got, want = head(x), _valeoai_forward(theirs, x, levels, nlayers)
    assert [g.shape[1] for g in got] == [32, 64, 128, 256]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_full_coarse_level_reads_the_last_feature_and_prefix_does_not() -> None:
    D = 64
    heads = {m: MatryoshkaHead(D, 256, 4, 48, 16, 3, matryoshka_input=m) for m in ("prefix", "full")}
    x = torch.randn(9, D)
    y = x.clone()
    y[:, D - 1] += 1.0
    for mode, head in heads.items():
        before, after = head(x), head(y)
        moved = [not torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(before, after)]
        assert moved == ([True] * 4 if mode == "full" else [False, False, False, True]), mode
    # the finest level reads all D features in both modes: same weights, same output
    full, prefix = heads["full"].levels[-1], heads["prefix"].levels[-1]
    prefix.load_state_dict(full.state_dict())
    torch.testing.assert_close(prefix(x), full(x), rtol=0, atol=0)
