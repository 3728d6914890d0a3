"""biodino's training step beside birder 0.8.4's, on the same shapes, batch and precision, in one process.

biodino's side is the real step as ``biodino train`` runs it (Lightning, the module's device photometric
augmentation, optimizer step, EMA) on synthetic uint8 crops with real iBOT masks, in place of JPEG decoding.
birder's side is its own DINOv2 student, teacher, heads, losses and optimizer (``birder_reference.py``). Each is
timed after a warm-up that excludes compilation, then a few more steps count the host syncs (CUDA's sync debug
mode on a GPU, a dispatcher census on the CPU).

    python benchmarks/train_step.py --device cuda --batch 48 --compile --precision bf16-mixed   # Bio-DINO stage 1
    python benchmarks/train_step.py --device cpu --preset bio_dino_tiny/stage1 --batch 4 --steps 3  # smoke, < 1 min
    python benchmarks/train_step.py --device cpu --preset bio_dino_tiny/stage1 --batch 2 --steps 2 --birder-network \
        vit_reg1_t14 --set crops.global_size=56 crops.local_size=28 model.preset=vit_tiny_reg4_p14  # both sides, CPU

The last line printed is one JSON object: ``{"biodino": {...}, "birder": {...} or null, "ratio": {...} or null,
"config": {...}}`` with ``img_per_s``, ``peak_mem_gb``, ``flops_per_img``, ``mfu``, ``syncs_per_step`` per side.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere: `benchmarks` imports
from benchmarks.step_flops import step_flops_per_image
from benchmarks.sync_census import SyncCensus
from biodino.config.recipe import load_config
from biodino.config.schema import TrainConfig
from biodino.data.datamodule import mask_sampler
from biodino.data.masking import masked_positions
from biodino.models import PRESETS
from biodino.run.trainer import build_module

BIRDER_NETWORKS = {"vit_reg4_so150m_p14_ls": "vit_reg4_so150m_p14_ls"}  # biodino preset -> birder network
CENSUS_STEPS = 3
TINY_RECIPE = "tiny"  # where a bare backbone preset runs: tiny heads and crops


class RepeatedBatch(IterableDataset):
    """The same uint8 crops and masks every step, numbered like the data pipeline's batches."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __iter__(self):
        for index in itertools.count():
            yield {**self.batch, "batch_index": index}


def synthetic_batch(cfg: TrainConfig, seed: int = 0) -> dict[str, Any]:
    """uint8 crops as the workers make them, and iBOT masks from the recipe's own sampler."""
    import random

    g = torch.Generator().manual_seed(seed)
    b, c = cfg.schedule.batch_size, cfg.crops
    sampler = mask_sampler(cfg)
    masks = sampler(2 * b, random.Random(seed))
    indices, weights = masked_positions(masks, sampler.capacity(2 * b))
    return {"global_crops": torch.randint(0, 256, (2 * b, 3, c.global_size, c.global_size), dtype=torch.uint8,
                                          generator=g),
            "local_crops": torch.randint(0, 256, (c.num_local * b, 3, c.local_size, c.local_size), dtype=torch.uint8,
                                         generator=g),
            "masks": masks, "mask_indices": indices, "mask_weights": weights}


class SyncCounter:
    """Host syncs while active: CUDA's sync debug mode on a GPU (it sees the real waits, copies included), the
    dispatcher census on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.census = SyncCensus()
        self._caught: Optional[warnings.catch_warnings] = None
        self._records: list = []

    def __enter__(self) -> "SyncCounter":
        if self.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self.census.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(*exc)
        else:
            self.census.__exit__(*exc)

    @property
    def count(self) -> int:
        if self.device.type == "cuda":
            return sum("synchronizing" in str(w.message) for w in self._records)
        return self.census.count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class StepTimer(L.Callback):
    """Wall time of ``steps`` optimizer steps after ``warmup`` ones, then the syncs of ``CENSUS_STEPS`` more."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.counter = SyncCounter(device)
        self.elapsed = self.peak = self.syncs = None
        self._t0 = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step == self.warmup:
            _sync(self.device)
            _reset_peak(self.device)
            self._t0 = time.perf_counter()
        elif step == self.warmup + self.steps:
            _sync(self.device)
            self.elapsed = time.perf_counter() - self._t0
            self.peak = _peak_gb(self.device)
            self.counter.__enter__()
        elif step == self.warmup + self.steps + CENSUS_STEPS:
            self.counter.__exit__(None, None, None)
            self.syncs = self.counter.count / CENSUS_STEPS


def measure_biodino(cfg: TrainConfig, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    module = build_module(cfg)
    timer = StepTimer(warmup, steps, device)
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=cfg.trainer.precision,
                        max_steps=warmup + steps + CENSUS_STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        num_sanity_val_steps=0)
    loader = DataLoader(RepeatedBatch(synthetic_batch(cfg)), batch_size=None, pin_memory=device.type == "cuda")
    trainer.fit(module, loader)
    return {"img_per_s": cfg.schedule.batch_size * steps / timer.elapsed, "peak_mem_gb": timer.peak,
            "syncs_per_step": timer.syncs, "params_student": sum(p.numel() for p in module.student.parameters())}


def measure_birder(cfg: TrainConfig, network: str, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    from benchmarks.birder_reference import birder_step

    o, c = cfg.objective, cfg.crops
    ibot = o.ibot.head if o.ibot.separate_head else o.dino.head
    step, info = birder_step(network, cfg.schedule.batch_size, c.num_local, c.global_size, c.local_size,
                             o.dino.head.num_prototypes, ibot.num_prototypes, o.dino.head.bottleneck_dim,
                             o.dino.head.hidden_dim, o.ibot.separate_head, device, cfg.trainer.precision,
                             cfg.trainer.compile)
    for _ in range(warmup):
        step()
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    peak = _peak_gb(device)
    with SyncCounter(device) as counter:
        for _ in range(CENSUS_STEPS):
            step()
    return {"img_per_s": cfg.schedule.batch_size * steps / elapsed, "peak_mem_gb": peak,
            "syncs_per_step": counter.count / CENSUS_STEPS, "network": network,
            "params_student": info.get("params_student")}


def with_flops(result: dict[str, Any], flops: float, peak_tflops: float) -> dict[str, Any]:
    return {**result, "flops_per_img": flops, "mfu": result["img_per_s"] * flops / (peak_tflops * 1e12)}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="bio_dino/stage1_224",
                   help="a recipe (its model, crops and heads), or a backbone preset (in the tiny recipe)")
    p.add_argument("--batch", type=int, default=48, help="images per GPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps run before timing (compilation happens here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--precision", default=None, help="bf16-mixed (default on a GPU) or 32-true")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "xformers"))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak: 989 for H100 SXM and H200")
    p.add_argument("--birder", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--birder-network", default=None, help="birder's name of the same backbone")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    recipe, model = (TINY_RECIPE, [f"model.preset={args.preset}"]) if args.preset in PRESETS else (args.preset, [])
    cfg = load_config(recipe, [*model, f"schedule.batch_size={args.batch}", "schedule.accumulate_grad_batches=1",
                                    f"trainer.precision={precision}", f"trainer.compile={str(args.compile).lower()}",
                                    f"model.attn_backend={args.attn}", "trainer.devices=1", "trainer.strategy=auto",
                                    f"trainer.accelerator={device.type}", *args.set])
    masked = mask_sampler(cfg).capacity(2 * args.batch) / args.batch
    flops = step_flops_per_image(cfg, masked)
    out: dict[str, Any] = {"config": {"preset": args.preset, "batch": args.batch, "precision": precision,
                                      "compile": args.compile, "attn": args.attn, "device": str(device),
                                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                                      else "cpu", "steps": args.steps, "warmup": args.warmup}}
    out["biodino"] = with_flops(measure_biodino(cfg, device, args.warmup, args.steps), flops, args.peak_tflops)
    _free(device)
    network = args.birder_network or BIRDER_NETWORKS.get(cfg.model.preset)
    out["birder"] = out["ratio"] = None
    if args.birder and network is not None and cfg.objective.name == "dinov2" and _birder_available():
        out["birder"] = with_flops(measure_birder(cfg, network, device, args.warmup, args.steps), flops,
                                   args.peak_tflops)
        b, r = out["biodino"], out["birder"]
        out["ratio"] = {"img_per_s": b["img_per_s"] / r["img_per_s"],
                        "peak_mem": b["peak_mem_gb"] / r["peak_mem_gb"] if r["peak_mem_gb"] else None}
    print(json.dumps(out))
    return out


def _birder_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("birder") is not None


if __name__ == "__main__":
    main()
