"""Reading shards for training: per-rank streams, workers, resume, corrupt data, crop geometry."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

from biodino.data.datamodule import ResumingLoader, mask_sampler
from biodino.data.dataset import MultiCropBatches
from biodino.data.multicrop import _decode, random_resized_crop_box
from biodino.data.pack import PackOptions, pack
from biodino.data.shard_index import Shard, ShardIndexError, resolve_shards
from biodino.data.stream import SampleStream
from biodino.data.tar_reader import TarShard
from biodino.config.schema import TrainConfig
from tests.images import jpeg_bytes, photo, save_photo


def _cfg(batch_size: int = 3) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.preset = "vit_tiny_p8"
    cfg.crops = dataclasses.replace(cfg.crops, global_size=32, local_size=16, num_local=2)
    cfg.schedule.batch_size = batch_size
    return cfg


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Shard]:
    root = tmp_path_factory.mktemp("stream")
    for i in range(30):
        save_photo(root / "img" / f"{i:03d}.jpg", seed=1000 + i, width=80, height=60)
    pack([str(root / "img")], PackOptions(out=root / "shards", prefix="s", max_count=6, min_side=16, jobs=1))
    return resolve_shards(str(root / "shards" / "s.json"))


def _batches(ds: MultiCropBatches, n: int, workers: int) -> list[dict]:
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def test_batches_have_the_crop_shapes_dtypes_and_masks(shards) -> None:
    cfg = _cfg()
    batch = MultiCropBatches(shards, cfg, mask_sampler(cfg)).batch(0)
    assert batch["global_crops"].shape == (6, 3, 32, 32) and batch["global_crops"].dtype == torch.uint8
    assert batch["local_crops"].shape == (6, 3, 16, 16) and batch["local_crops"].dtype == torch.uint8
    assert batch["masks"].shape == (6, 16) and batch["masks"].dtype == torch.bool
    assert int(batch["masks"].any(1).sum()) == 3  # half the global crops masked
    assert int(batch["corrupt"]) == 0


def test_two_ranks_two_workers_are_reproducible_distinct_and_in_order(shards) -> None:
    cfg = _cfg()
    runs = {rank: _batches(MultiCropBatches(shards, cfg, mask_sampler(cfg), rank), 6, workers=2)
            for rank in (0, 1)}
    again = _batches(MultiCropBatches(shards, cfg, mask_sampler(cfg), 0), 6, workers=2)
    for rank, batches in runs.items():
        assert [int(b["batch_index"]) for b in batches] == list(range(6))  # round robin = rank order
    for a, b in zip(runs[0], again):
        assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["masks"], b["masks"])
    flat = [b["global_crops"] for r in (0, 1) for b in runs[r]]
    assert all(not torch.equal(x, y) for i, x in enumerate(flat) for y in flat[i + 1 :])  # workers, ranks differ
    single = _batches(MultiCropBatches(shards, cfg, mask_sampler(cfg), 0), 6, workers=0)
    assert all(torch.equal(a["local_crops"], b["local_crops"]) for a, b in zip(single, runs[0]))


def test_resume_starts_exactly_at_the_consumed_batch(shards) -> None:
    cfg = _cfg()
    full = _batches(MultiCropBatches(shards, cfg, mask_sampler(cfg)), 7, workers=2)
    consumed = [4]
    loader = ResumingLoader(MultiCropBatches(shards, cfg, mask_sampler(cfg)), lambda: consumed[0], num_workers=2)
    first = next(iter(loader))
    assert int(first["batch_index"]) == 4 and torch.equal(first["global_crops"], full[4]["global_crops"])
    consumed[0] = 6
    assert torch.equal(next(iter(loader))["global_crops"], full[6]["global_crops"])


def test_every_shard_is_read_and_blocks_are_permutations(shards) -> None:
    stream = SampleStream(shards, seed=0, rank=1, shards_per_block=2)
    located = [stream.locate(p) for p in range(400)]
    assert {s for s, _ in located} == set(range(len(shards)))
    block = stream.block(0)
    first = located[: sum(shards[i].samples for i in block.shard_ids)]
    assert len(set(first)) == len(first) or len(set(block.shard_ids)) < 2  # distinct shards: no repeats
    assert SampleStream(shards, seed=0, rank=1, shards_per_block=2).locate(399) == located[399]  # random access
    assert located != [SampleStream(shards, seed=0, rank=0, shards_per_block=2).locate(p) for p in range(400)]


def _write_shard(path: Path, images: list[bytes]) -> Shard:
    with wds.TarWriter(str(path)) as sink:
        for i, data in enumerate(images):
            sink.write({"__key__": f"{i:05d}", "jpg": data, "json": json.dumps({"i": i}).encode()})
    return Shard(path, len(images))


def test_corrupt_samples_and_a_truncated_shard_are_skipped_and_counted(tmp_path, caplog) -> None:
    good = [jpeg_bytes(photo(i, 64, 48)) for i in range(12)]
    bad = _write_shard(tmp_path / "bad.tar", good[:5] + [b"not an image"] + good[5:6])
    whole = _write_shard(tmp_path / "cut.tar", good[6:12])
    with tarfile.open(whole.path) as tar:
        cut = tar.getmember("00004.jpg").offset_data + 100  # inside sample 4's image: samples 4 and 5 lost
    whole.path.write_bytes(whole.path.read_bytes()[:cut])
    assert len(TarShard(whole.path)) == 4 and TarShard(whole.path).truncated
    cfg = _cfg(batch_size=2)
    cfg.data.shards_per_block = 1  # a block is one pass over the shard in a seeded order
    for shard, bad_positions in ((bad, 1), (whole, 2)):
        caplog.clear()
        ds = MultiCropBatches([shard], cfg, mask_sampler(cfg))
        batches = [ds.batch(m) for m in range(shard.samples // 2)]  # exactly one pass
        counted = sum(int(b["corrupt"]) for b in batches)
        assert counted >= bad_positions  # each bad position skipped (its substitute may be bad too)
        assert counted == caplog.text.count("skipping corrupt sample")
        assert all(b["global_crops"].shape[0] == 4 for b in batches)  # batches stay full


def test_missing_or_empty_shards_fail_at_start_naming_the_path(tmp_path) -> None:
    (tmp_path / "idx.json").write_text(json.dumps({"shardlist": [{"url": "gone.tar", "nsamples": 3}]}))
    with pytest.raises(ShardIndexError, match="gone.tar"):
        resolve_shards(str(tmp_path / "idx.json"))
    (tmp_path / "empty-000.tar").write_bytes(b"")
    with pytest.raises(ShardIndexError, match="empty-000.tar"):
        resolve_shards(str(tmp_path / "empty-*.tar"))
    with pytest.raises(ShardIndexError, match="nothing-"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))


def test_crop_boxes_follow_torchvision_random_resized_crop() -> None:
    rng, n = np.random.default_rng(0), 4000
    ours = np.array([random_resized_crop_box(500, 375, (0.05, 0.32), rng) for _ in range(n)], dtype=float)
    torch.manual_seed(0)
    img = torch.zeros(3, 375, 500)
    ref = np.array([RandomResizedCrop.get_params(img, [0.05, 0.32], [3 / 4, 4 / 3]) for _ in range(n)], dtype=float)
    area = lambda w, h: w * h / (500 * 375)  # noqa: E731
    ours_area, ref_area = area(ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1]), area(ref[:, 3], ref[:, 2])
    assert abs(ours_area.mean() - ref_area.mean()) < 4 * ref_area.std() / math.sqrt(n)
    ours_ar = np.log((ours[:, 2] - ours[:, 0]) / (ours[:, 3] - ours[:, 1]))
    ref_ar = np.log(ref[:, 3] / ref[:, 2])
    assert abs(ours_ar.mean() - ref_ar.mean()) < 4 * ref_ar.std() / math.sqrt(n)
    # impossible scale: both fall back to the same deterministic center crop
    i, j, h, w = RandomResizedCrop.get_params(torch.zeros(3, 100, 400), [2.0, 3.0], [3 / 4, 4 / 3])
    assert random_resized_crop_box(400, 100, (2.0, 3.0), rng) == (j, i, j + w, i + h)


def test_jpeg_draft_decodes_at_reduced_size_only_when_every_crop_allows() -> None:
    data = jpeg_bytes(photo(0, 800, 600))
    small_outputs = _decode(Image.open(io.BytesIO(data)), [(0, 0, 400, 400), (0, 0, 200, 200)], [96, 48])
    assert small_outputs.size == (200, 150)  # factor 4.1 -> JPEG scale 1/4
    tight = _decode(Image.open(io.BytesIO(data)), [(0, 0, 400, 400), (0, 0, 60, 60)], [96, 48])
    assert tight.size == (800, 600)  # a 60 px box for a 48 px crop allows no reduction


def test_module_trains_on_packed_shards_through_the_datamodule(shards) -> None:
    """Shards -> stream -> CPU crops -> device photometrics -> DINOv2 loss; epochs continue the stream."""
    import lightning as L

    from biodino.data.datamodule import ShardDataModule
    from biodino.ssl.dinov2 import DINOv2Module
    from biodino.config.schema import HeadConfig

    cfg = _cfg(batch_size=4)
    cfg.data.shards, cfg.data.num_workers, cfg.data.pin_memory = str(shards[0].path.parent / "s.json"), 1, False
    cfg.objective.dino.head = cfg.objective.ibot.head = HeadConfig(num_prototypes=64, hidden_dim=32, bottleneck_dim=16)
    cfg.schedule.epochs, cfg.schedule.steps_per_epoch = 2, 2
    seen: list[int] = []

    class Seen(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(pl_module.batch_index())
            assert batch["global_crops"].dtype == torch.float32  # augmented and normalized on the device

    trainer = L.Trainer(max_steps=3, limit_train_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[Seen()])
    module = DINOv2Module(cfg)
    trainer.fit(module, datamodule=ShardDataModule(cfg))
    assert trainer.global_step == 3 and seen == [0, 1, 2]  # epoch 2 starts where epoch 1 stopped
    assert [m["data/corrupt_samples"] for m in module.step_metrics.read().values()] == [0, 0, 0]
