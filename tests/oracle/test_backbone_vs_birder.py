"""The backbone against birder 0.8.4, which defined and published both seed-model architectures."""

from __future__ import annotations

import pytest
import torch

from biodino.models import build_backbone

birder_registry = pytest.importorskip("birder.model_registry").registry  # dev extra: always present in CI


def _birder(name: str, size: int):
    net = birder_registry.net_factory(name, 0, size=(size, size))
    net.set_dynamic_size()
    return net.eval()


@pytest.mark.parametrize("preset,size", [("vit_reg4_so150m_p14_ls", 224), ("vit_b16_ls", 224)])
def test_same_keys_and_outputs_as_birder(preset: str, size: int) -> None:
    theirs = _birder(preset, size)
    ours = build_backbone(preset, image_size=size).eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if not k.startswith("classifier")})
    assert ours.num_params() == sum(p.numel() for n, p in theirs.named_parameters() if "classifier" not in n)
    patch = ours.patch_size
    with torch.no_grad():
        for side in (size, 7 * patch):  # the stored size and a local-crop size (resized on the fly)
            x = torch.randn(2, 3, side, side)
            torch.testing.assert_close(ours.embedding(x), theirs.embedding(x), atol=1e-5, rtol=1e-5)
        x = torch.randn(1, 3, size, size)
        torch.testing.assert_close(
            ours.detection_features(x)["stage1"], theirs.detection_features(x)["stage1"], atol=1e-5, rtol=1e-5
        )


def test_permanent_resize_matches_birder_adjust_size() -> None:
    theirs = _birder("vit_reg4_so150m_p14_ls", 224)
    ours = build_backbone("vit_reg4_so150m_p14_ls").eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if not k.startswith("classifier")})
    theirs.adjust_size((252, 252))
    ours.resize_pos_embed(252)
    torch.testing.assert_close(ours.pos_embedding, theirs.pos_embedding, atol=1e-6, rtol=1e-6)
