"""Images/s of ``biodino embed`` beside the plain single-process loop it replaced, in one run, on the same JPEGs.

The JPEGs are generated photographs (``synthetic.photo``, seeded: the same files every run), 500 x 375 by default
like the photos of a field collection, written to a temporary folder. The backbone is a preset, randomly
initialized (seed 0, LayerScale at 1 so that the class token depends on the image) and written by ``biodino
export``'s own ``export_backbone``; both sides load that file. On the CPU the default is a forward far cheaper
than decoding (vit_tiny_p16 at 112 px, ~0.2 ms an image beside ~2.5 ms of decode and resize), the regime of
real photographs on a GPU; on a GPU it is the Bio-DINO SoViT-150M/14 at 252 px.

- ``baseline``: the loop ``biodino embed`` replaced (``biodino/eval/embed.py`` before DataLoader workers), all in
  the main process: for each batch of paths, PIL open + ``convert("RGB")``, per image torchvision's
  ``ToImage, Resize(bicubic, antialias), CenterCrop, ToDtype(float, scale), Normalize``, stack, copy to the
  device, forward (``--baseline pil``: torchvision's PIL ``Resize``/``ToTensor`` instead, a slower variant whose
  pixels differ from the tensor resize by rounding, ~1e-3 in the embeddings).
- ``biodino_embed``: ``run_embed(EmbedRequest(...))``, what ``biodino embed MODEL FOLDER --out X.npz --workers
  W`` runs: planning, DataLoader workers decoding and cropping to uint8, device-side normalization, part files,
  merge and the ``.npz``. Its time excludes the model load (reading the file and moving it to the device),
  which is timed on its own and reported as ``model_load_s``; the baseline's model is loaded before timing too.
- ``embed_parts``: ``embed_parts`` in the same process with the model already loaded, the same workers: the
  loader and forward alone; the gap to ``biodino_embed`` is planning, part files, merge and the output file.

Worker start-up counts on both worker sides (every command pays it). On a GPU both sides run the forward under
bf16 autocast, as ``biodino embed`` does. On the CPU ``biodino embed`` runs its forward on the cores the workers
leave (cores - workers torch threads; 2 threads beside 2 busy workers on 2 cores made it 5x slower). Each repeat runs the sides in turn (so drifting machine load hits all
alike) and the best of ``--repeats`` is reported. The embeddings of each side are compared with the baseline's,
file by file: the same pixels reach the network on both sides and only the normalization's float rounding
differs (~1e-6 on the CPU; on a GPU, bf16 rounding of inputs differing in the last float bit), so the run fails
beyond ``--tolerance`` (default 1e-4 on the CPU, 5e-2 on a GPU). ``feature_std`` is how much the embeddings
vary between images, to read that difference against.

Time in forward: the backbone's ``forward_features`` is wrapped; on a GPU a pair of CUDA events brackets each
call and the GPU time between them is summed (``forward_s``), on the CPU the wall time of each call.
``wait_share = 1 - forward_s / seconds``: the share of the timed wall time in which the device was not running
the forward, i.e. waiting for decoded batches (plus the copy, normalization and, for ``biodino_embed``,
planning and writing). ``wait_share_steady`` is the same from the start of the first forward to the end of the
last, without the wait for the first batch (worker start-up). ``cpu_ms_per_image`` is the single-thread cost of
decoding and of resizing one image (first 64 files), to read the rates against.

    python benchmarks/embed.py                              # CPU: vit_tiny_p16 at 112 px, 1024 JPEGs, 2 workers
    python benchmarks/embed.py --device cuda --workers 2 8  # GPU: SoViT-150M/14 (Bio-DINO) at 252 px, bf16
    python benchmarks/embed.py --images 16 --width 64 --height 48 --preset vit_tiny_p8 --resolution 32 \\
        --batch 4 --repeats 1                               # smoke, seconds

The last line printed is one JSON object: ``{"baseline": {...}, "biodino_embed": {"W": {...}}, "embed_parts":
{"W": {...}}, "ratio": {"W": biodino_embed / baseline}, "max_abs_diff", "feature_std", "cpu_ms_per_image",
"config"}`` with ``img_per_s``, ``seconds``, ``forward_s``, ``wait_share``, ``wait_share_steady`` and (worker
sides) ``max_abs_diff`` per side."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T1
from torchvision.transforms import v2 as T

from biodino.config.recipe import load_config
from biodino.data.synthetic import jpeg_bytes, photo
from biodino.eval.embed import FEATURES, embed_parts, eval_transform, feature_width, features_of, load_rgb
from biodino.eval.embed_inputs import plan_parts
from biodino.eval.embed_parts import Embedded
from biodino.interop.export import TrainingState, export_backbone, load_encoder
from biodino.models.presets import preset_config
from biodino.run import embed_job
from biodino.ssl.dinov2 import student_backbone

BIO_DINO = "vit_reg4_so150m_p14_ls"
DEFAULTS = {"cuda": {"preset": BIO_DINO, "resolution": 252, "images": 2048},
            "cpu": {"preset": "vit_tiny_p16", "resolution": 112, "images": 1024}}
RECIPES = {BIO_DINO: "bio_dino/stage2_252"}  # a preset's own recipe (normalization); others use "tiny"
TOLERANCE = {"cpu": 1e-4, "cuda": 5e-2}
PROFILE_IMAGES = 64


def write_jpegs(folder: Path, count: int, width: int, height: int, distinct: int = 64,
                quality: int = 90) -> list[Path]:
    """``count`` seeded JPEGs: ``distinct`` generated photographs, each reused rolled by a different offset (a
    photograph takes ~50 ms to generate, a JPEG ~3 ms to encode), so every file holds different pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    bases = [np.asarray(photo(seed, width, height)) for seed in range(min(distinct, count))]
    paths = []
    for i in range(count):
        base, turn = bases[i % len(bases)], i // len(bases)
        pixels = np.roll(base, (turn * 37 % height, turn * 53 % width), axis=(0, 1)) if turn else base
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(jpeg_bytes(Image.fromarray(pixels), quality=quality))
        paths.append(path)
    return paths


def export_random_backbone(preset: str, resolution: int, out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialized ``preset`` backbone at ``resolution``, written by ``export_backbone``. LayerScale
    starts at 1 rather than 1e-5 (the same computation): otherwise the blocks leave the class token nearly the
    same for every image, and comparing the sides' embeddings would prove little."""
    cfg = load_config(RECIPES.get(preset, "tiny"), [f"model.preset={preset}", f"crops.global_size={resolution}",
                                                    "model.layer_scale_init=1.0"])
    torch.manual_seed(seed)
    backbone = student_backbone(cfg)
    weights = {f"teacher.backbone.{k}": v for k, v in backbone.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_backbone(TrainingState(weights, cfg, 0, out_dir / "random-init"), out_dir, tag="random")


class ForwardClock:
    """Time in the backbone's ``forward_features``: GPU time between CUDA events on a GPU, wall time on the CPU."""

    def __init__(self, backbone: torch.nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[Any, Any]] = []
        inner = backbone.forward_features

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = inner(*args, **kwargs)
                end.record()
            else:
                start = time.perf_counter()
                out = inner(*args, **kwargs)
                end = time.perf_counter()
            self.spans.append((start, end))
            return out

        backbone.forward_features = timed

    def reset(self) -> None:
        self.spans = []

    def _elapsed(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def seconds(self) -> float:
        """Summed time in forward."""
        if self.cuda:
            torch.cuda.synchronize()
        return float(sum(self._elapsed(start, end) for start, end in self.spans))

    def steady(self) -> float:
        """From the start of the first forward to the end of the last: the run without the wait for the first
        batch (worker start-up, first decodes)."""
        if self.cuda:
            torch.cuda.synchronize()
        return self._elapsed(self.spans[0][0], self.spans[-1][1]) if self.spans else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_transform(resolution: int, mean: Sequence[float], std: Sequence[float], kind: str = "tensor"):
    """Per-image float preprocessing of the replaced loop (``tensor``), or torchvision's PIL path (``pil``)."""
    bicubic = T.InterpolationMode.BICUBIC
    if kind == "pil":
        return T1.Compose([T1.Resize(resolution, interpolation=bicubic, antialias=True), T1.CenterCrop(resolution),
                           T1.ToTensor(), T1.Normalize(mean, std)])
    return T.Compose([T.ToImage(), T.Resize(resolution, interpolation=bicubic, antialias=True),
                      T.CenterCrop(resolution), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


@torch.inference_mode()
def baseline_loop(backbone: torch.nn.Module, paths: Sequence[Path], transform, batch_size: int,
                  features: str = "cls") -> np.ndarray:
    """The plain loop: decode, transform and forward in the main process, batch after batch."""
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(paths), batch_size):
        chunk = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as im:
                chunk.append(transform(im.convert("RGB")))
        x = torch.stack(chunk).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out.append(features_of(backbone, x, features).float().cpu().numpy())
    return np.concatenate(out)


def embed_in_process(backbone: torch.nn.Module, folder: Path, prep, batch_size: int, workers: int,
                     features: str) -> tuple[list[str], np.ndarray]:
    """``embed_parts`` over the folder's parts, as ``run_embed`` plans them, without the store and the merge."""
    parts = plan_parts([str(folder)]).parts
    done: dict[int, Embedded] = {}
    embed_parts(backbone, parts, prep, done.__setitem__, batch_size, workers, features)
    keys = [k for i in sorted(done) for k in done[i].keys]
    return keys, np.concatenate([done[i].array(feature_width(backbone, features)) for i in sorted(done)])


@contextmanager
def instrumented_load(device: torch.device) -> Iterator[dict[str, Any]]:
    """``run_embed``'s model load, timed (file to device) and with a ``ForwardClock`` on the loaded backbone."""
    real = embed_job.load_encoder
    record: dict[str, Any] = {}

    def load(*args: Any, **kwargs: Any):
        t = time.perf_counter()
        backbone, meta = real(*args, **kwargs)
        backbone = backbone.to(device)  # run_embed's own .to(device) is then a no-op
        _sync(device)
        record["load_s"] = time.perf_counter() - t
        record["clock"] = ForwardClock(backbone, device)
        return backbone, meta

    embed_job.load_encoder = load
    try:
        yield record
    finally:
        embed_job.load_encoder = real


def run_biodino_embed(model: Path, folder: Path, out: Path, batch_size: int, workers: int, features: str,
                      device: torch.device) -> tuple[float, dict[str, Any], list[str], np.ndarray]:
    """``run_embed`` as ``biodino embed`` calls it: its wall time less the model load, the load's record, the
    keys and embeddings of the ``.npz`` it wrote."""
    with instrumented_load(device) as record:
        _sync(device)
        start = time.perf_counter()
        result = embed_job.run_embed(embed_job.EmbedRequest(model, (str(folder),), out, features=features,
                                                            batch_size=batch_size, workers=workers,
                                                            device=str(device)))
        _sync(device)
        wall = time.perf_counter() - start
    if result is None or result.skipped:
        raise RuntimeError(f"biodino embed did not embed every image: {result}")
    data = np.load(out)
    return wall - record["load_s"], record, [str(k) for k in data["keys"]], data["embeddings"]


def stage_costs(paths: Sequence[Path], resolution: int) -> dict[str, float]:
    """Single-thread ms per image: decode to RGB, and resize + center crop to uint8 (what a worker does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resize = eval_transform(resolution, (0.0,) * 3, (1.0,) * 3).resize()
        t = time.perf_counter()
        images = [load_rgb(p) for p in paths]
        decode = time.perf_counter() - t
        t = time.perf_counter()
        for im in images:
            resize(im)
        crop = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    return {"decode": 1e3 * decode / len(paths), "resize_crop": 1e3 * crop / len(paths)}


def side(images: int, seconds: float, clock: ForwardClock, diff: Optional[float] = None,
         **extra: Any) -> dict[str, Any]:
    forward, steady = clock.seconds(), clock.steady()
    out = {"img_per_s": images / seconds, "seconds": seconds, "forward_s": forward,
           "wait_share": max(0.0, 1.0 - forward / seconds),
           "wait_share_steady": max(0.0, 1.0 - forward / steady) if steady > 0 else None, **extra}
    if diff is not None:
        out["max_abs_diff"] = diff
    return out


def max_diff(keys: list[str], got: np.ndarray, want: dict[str, np.ndarray]) -> float:
    """Largest difference between embeddings of the same file."""
    if sorted(keys) != sorted(want):
        raise RuntimeError(f"embedded {len(keys)} images, expected {len(want)}")
    return float(max(np.abs(got[i] - want[k]).max() for i, k in enumerate(keys)))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--preset", help=f"backbone preset (default: {BIO_DINO} on a GPU, "
                                         f"{DEFAULTS['cpu']['preset']} on the CPU)")
    parser.add_argument("--resolution", type=int, help="default: 252 on a GPU, 112 on the CPU; with --preset "
                                                       "alone: the preset's own (252 for Bio-DINO's)")
    parser.add_argument("--images", type=int, help="number of JPEGs (default: 2048 on a GPU, 1024 on the CPU)")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--distinct", type=int, default=64, help="generated photographs the files are made from")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="DataLoader workers, one run each")
    parser.add_argument("--features", default="cls", choices=FEATURES)
    parser.add_argument("--baseline", default="tensor", choices=("tensor", "pil"),
                        help="the replaced loop's tensor transforms, or torchvision's PIL resize")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, help="largest embedding difference allowed (default: 1e-4 on "
                                                        "the CPU, 5e-2 on a GPU: bf16)")
    parser.add_argument("--no-in-process", action="store_true", help="skip the embed_parts side")
    parser.add_argument("--dir", type=Path, help="where the temporary work folder goes")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    preset = args.preset or defaults["preset"]
    resolution = args.resolution or (defaults["resolution"] if args.preset is None
                                     else 252 if preset == BIO_DINO else preset_config(preset).image_size)
    count = args.images or defaults["images"]
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[device.type]
    best: dict[str, dict[str, Any]] = {}

    def keep(name: str, result: dict[str, Any]) -> None:
        if name not in best or result["seconds"] < best[name]["seconds"]:
            best[name] = result

    with tempfile.TemporaryDirectory(prefix="biodino-embed-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        folder = work / "images"
        paths = write_jpegs(folder, count, args.width, args.height, args.distinct)
        model = export_random_backbone(preset, resolution, work / "model")
        backbone, meta = load_encoder(model)
        backbone = backbone.to(device).eval()
        mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
        clock = ForwardClock(backbone, device)
        transform = baseline_transform(resolution, mean, std, args.baseline)
        prep = eval_transform(resolution, mean, std)
        costs = stage_costs(paths[:PROFILE_IMAGES], resolution)
        baseline_loop(backbone, paths[:args.batch], transform, args.batch, args.features)  # warm-up: caches, kernels

        for r in range(args.repeats):  # the sides in turn, so that drifting load on the machine hits all alike
            clock.reset()
            _sync(device)
            start = time.perf_counter()
            want = baseline_loop(backbone, paths, transform, args.batch, args.features)
            _sync(device)
            keep("baseline", side(count, time.perf_counter() - start, clock))
            reference = {str(p): e for p, e in zip(paths, want)}
            spread = float(want.std(axis=0).mean())
            for w in args.workers:
                seconds, record, keys, got = run_biodino_embed(model, folder, work / f"out-{r}-{w}.npz",
                                                               args.batch, w, args.features, device)
                keep(f"biodino_embed/{w}", side(count, seconds, record["clock"], max_diff(keys, got, reference),
                                                model_load_s=record["load_s"]))
                if args.no_in_process:
                    continue
                clock.reset()
                _sync(device)
                start = time.perf_counter()
                keys, got = embed_in_process(backbone, folder, prep, args.batch, w, args.features)
                _sync(device)
                seconds = time.perf_counter() - start
                keep(f"embed_parts/{w}", side(count, seconds, clock, max_diff(keys, got, reference)))

    result: dict[str, Any] = {"baseline": best["baseline"]}
    for name in ("biodino_embed", "embed_parts"):
        if any(key.startswith(name + "/") for key in best):
            result[name] = {str(w): best[f"{name}/{w}"] for w in args.workers}
    base = best["baseline"]["img_per_s"]
    result["ratio"] = {w: s["img_per_s"] / base for w, s in result["biodino_embed"].items()}
    worst = max(s["max_abs_diff"] for name in ("biodino_embed", "embed_parts") for s in result.get(name, {}).values())
    result["max_abs_diff"] = worst
    result["feature_std"] = spread  # how much the embeddings vary between images, to read max_abs_diff against
    result["cpu_ms_per_image"] = costs
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    result["config"] = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                        else None, "preset": preset, "resolution": resolution, "images": count,
                        "size": [args.width, args.height], "batch": args.batch, "workers": args.workers,
                        "features": args.features, "baseline": args.baseline, "repeats": args.repeats,
                        "precision": precision, "torch_threads": torch.get_num_threads(),
                        "cpus": len(os.sched_getaffinity(0)),
                        "tolerance": tolerance}

    print(f"{count} JPEGs {args.width}x{args.height} -> {preset} at {resolution} px on {device} ({precision}), "
          f"batch {args.batch}, best of {args.repeats}; one core decodes in {costs['decode']:.2f} ms/img and "
          f"resizes in {costs['resize_crop']:.2f}")
    b = best["baseline"]
    print(f"plain loop, main process:       {b['img_per_s']:8.1f} images/s  (device waits {b['wait_share']:.0%})")
    for w, s in result["biodino_embed"].items():
        print(f"biodino embed, {w:>2} workers:      {s['img_per_s']:8.1f} images/s  (device waits "
              f"{s['wait_share']:.0%}; model load {s['model_load_s']:.2f} s not counted)  "
              f"ratio {result['ratio'][w]:.2f}x")
        if w in result.get("embed_parts", {}):
            p = result["embed_parts"][w]
            print(f"embed_parts in-process, {w:>2} w:  {p['img_per_s']:8.1f} images/s  (device waits "
                  f"{p['wait_share']:.0%})")
    print(f"largest embedding difference to the plain loop: {worst:.2e} (tolerance {tolerance:.0e}; "
          f"embeddings vary by {spread:.2e} between images)")
    print(json.dumps(result))
    if worst > tolerance:
        raise SystemExit(f"embeddings differ from the plain loop's by {worst:.2e} > {tolerance:.0e}")
    return result


if __name__ == "__main__":
    main()
