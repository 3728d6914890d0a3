"""``biodino demo``: generate a labelled image set, pack it, train with the online monitor on the held-out images
(its k-NN curve in plots/eval.png), export, and compare k-NN accuracy of the trained teacher backbone with the same
backbone at random initialization, through the same protocol code as the monitor and ``biodino eval``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from biodino.data.pack import PackOptions, pack
from biodino.data.synthetic import SHAPE_CLASSES, write_shapes
from biodino.eval.embed import embed_images, eval_transform
from biodino.eval.embed_inputs import labelled_paths
from biodino.eval.protocols import Options, Split, evaluate
from biodino.models import VisionTransformer, build_backbone
from biodino.interop.export import export_backbone, load_backbone, load_training_state
from biodino.config.recipe import load_config
from biodino.run.history import read_history
from biodino.run.trainer import train

QUERY_EVERY = 6  # every 6th image of a class is a held-out query; the rest are the memory bank


def labelled_folder(root: Path) -> list[tuple[Path, int]]:
    """Images under ``root/<class>/``, labelled by class folder (sorted)."""
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise FileNotFoundError(f"{root} needs one sub-folder per class (at least 2) for the k-NN evaluation")
    return [(p, label) for label, d in enumerate(classes) for p in labelled_paths([str(d)])[0]]


def split(items: list[tuple[Path, int]]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(memory bank, held-out queries): every QUERY_EVERY-th image of each class is a query."""
    bank, queries = [], []
    for label in sorted({lab for _, lab in items}):
        of_class = [it for it in items if it[1] == label]
        queries += of_class[::QUERY_EVERY]
        bank += [it for i, it in enumerate(of_class) if i % QUERY_EVERY]
    return bank, queries


def knn(backbone: VisionTransformer, bank: list, queries: list, resolution: int, mean, std) -> float:
    """Cosine k-NN accuracy (k=20, T=0.07) of the backbone's class token on the queries, images resized to
    ``resolution``: biodino eval's knn protocol."""
    prep = eval_transform(resolution, mean, std)
    train, test = (Split(embed_images(backbone.eval(), [p for p, _ in part], prep, 256),
                         torch.tensor([lab for _, lab in part])) for part in (bank, queries))
    return evaluate(train, test, ["knn"], Options(k=20))["knn"]["top1"]


def held_out_folder(queries: list[tuple[Path, int]], folder: Path) -> Path:
    """The queries copied into class sub-folders: the online monitor's ``eval.data``, never trained on."""
    for path, _ in queries:
        target = folder / path.parent.name / path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return folder


def run_demo(out: Path, seed: int = 0, data: Optional[Path] = None, per_class: int = 600,
             overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """The whole demo; returns the two k-NN accuracies and the timings."""
    start = time.time()
    if data is None:
        data = out / "images"
        if not data.exists():
            write_shapes(data, per_class, seed=seed)
    bank, queries = split(labelled_folder(data))
    listing = out / "train.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p, _ in bank))
    pack([str(listing)], PackOptions(out=out / "shards", prefix="demo", max_count=1000, min_side=16,
                                     near_threshold=None, seed=seed, overwrite=True))
    cfg = load_config("demo", [f"seed={seed}", f"runs_dir={out / 'runs'}", f"name=demo-seed{seed}",
                               f"data.shards={out / 'shards' / 'demo.json'}",
                               f"eval.data={held_out_folder(queries, out / 'heldout')}", *overrides])
    prepared = time.time()
    run = train(cfg).run
    trained = time.time()
    exported, meta = load_backbone(export_backbone(load_training_state(run.root), out / "export"))
    torch.manual_seed(seed)
    random_init = build_backbone(cfg.model.preset, image_size=cfg.crops.global_size)
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    res = meta["resolution"]
    return {"knn_trained": knn(exported, bank, queries, res, mean, std),
            "knn_random": knn(random_init, bank, queries, res, mean, std),
            "curve": {step + 1: m["eval/knn_top1"] for step, m in read_history(run.history).items()
                      if "eval/knn_top1" in m},
            "bank": len(bank), "queries": len(queries), "prepare_s": prepared - start,
            "train_s": trained - prepared, "total_s": time.time() - start, "run": str(run.root)}


def describe() -> str:
    return f"{len(SHAPE_CLASSES)} generated classes: {', '.join(SHAPE_CLASSES)}"
