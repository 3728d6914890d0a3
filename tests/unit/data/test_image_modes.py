"""Images of every kind a collection holds reach the model as a viewer shows them (8-bit RGB, upright), in
``biodino pack``, in the training crops and in ``biodino embed``; flat, gradient and strip images are not taken
for near duplicates of each other."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from biodino.data.decode import to_rgb
from biodino.data.multicrop import MultiCrop
from biodino.data.pack import PackOptions, pack
from biodino.config.schema import CropsConfig
from tests.images import photo


def _png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _sixteen_bit(seed: int, size: tuple[int, int] = (80, 60)) -> tuple[Image.Image, np.ndarray]:
    """A 16-bit grayscale picture whose 8-bit rendering is known exactly: 8-bit photo values x 257."""
    grey = np.asarray(photo(seed, *size).convert("L")).astype(np.uint16)
    return Image.fromarray(grey * 257), grey.astype(np.uint8)


def _rotated_png(arr: np.ndarray) -> bytes:
    """``arr`` stored as it comes off a sensor held sideways: EXIF orientation 6 (display rotated 90 deg. clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _png(Image.fromarray(np.rot90(arr, 1).copy()), exif=exif)


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_to_rgb_renders_each_mode_as_displayed() -> None:
    img16, expected = _sixteen_bit(1)
    np.testing.assert_array_equal(np.asarray(to_rgb(_open(_png(img16)))), np.repeat(expected[..., None], 3, 2))
    assert np.asarray(_open(_png(img16)).convert("RGB")).mean() > 250  # what a plain convert makes of it

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.array([0, 128, 255, 255], np.uint8)[None, :]
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    alpha = rgba[..., 3:4] / 255
    want = alpha * rgba[..., :3] + (1 - alpha) * 255  # composited over white
    assert np.abs(out - want).max() <= 1

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    out = np.asarray(to_rgb(palette))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 200, 30)

    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 255))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    assert [tuple(p) for p in np.asarray(to_rgb(cmyk))[0]] == [(0, 0, 0), (0, 255, 255)]

    arr = np.asarray(photo(2, 40, 30))
    np.testing.assert_array_equal(np.asarray(to_rgb(_open(_rotated_png(arr)))), arr)
    grey = np.asarray(to_rgb(Image.fromarray(arr[..., 0])))
    assert (grey == arr[..., :1]).all()


def _pack(folder: Path, out: Path) -> tuple[dict, dict[str, Image.Image]]:
    report = pack([str(folder)], PackOptions(out=out, prefix="m", min_side=8))
    stored = {}
    for sample in wds.WebDataset(sorted(str(p) for p in out.glob("m-*.tar")), shardshuffle=False):
        ext = next(k for k in sample if k in ("jpg", "png", "webp"))
        stored[Path(json.loads(sample["json"])["source_path"]).name] = Image.open(io.BytesIO(sample[ext]))
    return report, stored


def test_pack_stores_16_bit_alpha_palette_and_rotated_images_as_displayed(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    expected = {}
    for i in range(6):  # distinct 16-bit pictures: once all white, and then near duplicates of each other
        img16, want = _sixteen_bit(10 + i)
        (src / f"deep{i}.png").write_bytes(_png(img16))
        expected[f"deep{i}.png"] = np.repeat(want[..., None], 3, 2)
    upright = np.asarray(photo(20, 64, 48))
    (src / "sideways.png").write_bytes(_rotated_png(upright))
    expected["sideways.png"] = upright
    rgba = np.dstack([np.asarray(photo(21, 64, 48)), np.full((48, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0
    Image.fromarray(rgba, "RGBA").save(src / "cutout.png")
    expected["cutout.png"] = np.where(rgba[..., 3:] == 0, 255, rgba[..., :3])
    photo(22, 64, 48).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "indexed.gif")
    expected["indexed.gif"] = np.asarray(Image.open(src / "indexed.gif").convert("RGB"))

    report, stored = _pack(src, tmp_path / "out")
    assert report["kept"] == 9 and report["near_duplicates"] == 0
    for name, want in expected.items():
        got = stored[name]
        assert got.mode == "RGB" and got.size == (want.shape[1], want.shape[0]), name
        assert got.format == "PNG", name  # lossless sources stay lossless (a GIF becomes a PNG)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)


def test_flat_gradient_and_strip_images_are_not_near_duplicates(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128), (250, 250, 240)]):
        Image.new("RGB", (64, 64), colour).save(src / f"flat{i}.png")
    ramp = np.linspace(0, 255, 64)
    for i, (lo, hi) in enumerate([(0, 1), (0.2, 0.9), (0.5, 1)]):  # left-to-right ramps: dHash all zeros
        row = (lo + (hi - lo) * ramp / 255) * 255
        Image.fromarray(np.tile(row, (64, 1)).astype(np.uint8)).convert("RGB").save(src / f"ramp{i}.png")
    for i in range(4):
        strip = rng.integers(0, 256, (8, 400, 3), dtype=np.uint8)
        Image.fromarray(strip).save(src / f"strip{i}.png")
    report = pack([str(src)], PackOptions(out=tmp_path / "out", prefix="m", min_side=8))
    assert report["kept"] == 12 and report["near_duplicates"] == 0


def _crops(data: bytes, size: int = 32) -> torch.Tensor:
    cfg = CropsConfig(global_size=size, local_size=16, num_local=0, global_scale=(1.0, 1.0), flip_p=0.0)
    return MultiCrop(cfg)(data, np.random.default_rng(0))["global_crops"][0]


def test_training_crops_see_16_bit_and_rotated_images_as_displayed() -> None:
    img16, want = _sixteen_bit(3, (64, 64))
    crop = _crops(_png(img16)).float()
    reference = torch.from_numpy(np.asarray(Image.fromarray(want).convert("RGB").resize((32, 32),
                                                                                        Image.Resampling.BICUBIC)))
    torch.testing.assert_close(crop, reference.permute(2, 0, 1).float(), rtol=0, atol=0)
    upright = np.asarray(photo(4, 48, 48))
    displayed = torch.from_numpy(np.asarray(Image.fromarray(upright).resize((32, 32), Image.Resampling.BICUBIC)))
    assert torch.equal(_crops(_rotated_png(upright)), displayed.permute(2, 0, 1))


def _exported_backbone(tmp_path: Path) -> Path:
    from biodino.interop.export import TrainingState, export_backbone
    from biodino.config.recipe import load_config
    from biodino.run.trainer import build_module

    cfg = load_config("tiny")
    return export_backbone(TrainingState(build_module(cfg).state_dict(), cfg, 0, tmp_path / "in-memory"), tmp_path)


def test_embed_reads_rotated_images_upright_and_skips_unreadable_ones(tmp_path, capsys) -> None:
    from biodino.cli.main import main

    model = _exported_backbone(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    upright = np.asarray(photo(5, 64, 48))
    Image.fromarray(upright).save(images / "a_upright.png")
    (images / "b_sideways.png").write_bytes(_rotated_png(upright))
    (images / "c_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    img16, _ = _sixteen_bit(6)
    (images / "d_deep.png").write_bytes(_png(img16))
    assert main(["embed", str(model), str(images), "--out", str(tmp_path / "e.npz")]) == 0
    captured = capsys.readouterr()
    assert "3 embeddings of size 96" in captured.out and "1 skipped" in captured.out
    assert f"skipped {images / 'c_broken.jpg'}" in captured.err
    data = np.load(tmp_path / "e.npz")
    assert [Path(p).name for p in data["keys"]] == ["a_upright.png", "b_sideways.png", "d_deep.png"]
    np.testing.assert_array_equal(data["embeddings"][0], data["embeddings"][1])

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["embed", str(model), str(empty), "--out", str(tmp_path / "f.npz")]) == 2
    assert f"no images in {empty}" in capsys.readouterr().err
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_grayscale_modes_use_their_full_range(mode) -> None:
    values = np.linspace(0, 1, 256).reshape(16, 16)
    if mode == "F":
        img = Image.fromarray(values.astype(np.float32), "F")
    else:
        img = Image.fromarray((values * 65535).astype(np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    out = np.asarray(to_rgb(img))[..., 0]
    np.testing.assert_array_equal(out, np.rint(values * 255).astype(np.uint8))
