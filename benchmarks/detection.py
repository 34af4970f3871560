r"""Object detection with a frozen, a LoRA and a fully fine-tuned backbone, side by side: mAP against cost.

Each strategy trains an ``ObjectDetector`` (FCOS on ``tf_efficientnet_lite0`` from its real ImageNet weights by
default; ``--head``, ``--backbone``) on two data sets with the same epochs, batch size and schedule:

* ``shapes``: cvft's generated shapes set (``write_shapes_detection``, written into ``--out``); validation is a
  seeded 20 % of its images.
* ``coco128``: COCO128's real photos from ``../shared/assets/coco128_detection``, trained on ``train2017`` and
  evaluated on ``val2017`` (its YOLO labels, 80 classes). Skipped with a message when the assets are absent.

Each run is its own process, so peak RSS is its own. Images/s is the median over training steps after the first
few (forward, backward and optimizer step). The table goes to stdout (markdown) and ``--out/detection.csv``.

    python benchmarks/detection.py                      # the full run: 6 runs of 12 epochs at 320 px (use a GPU)
    python benchmarks/detection.py --only shapes,lora --epochs 1 --num-images 24 --image-size 96 \
        --limit-train-batches 3 --limit-val-batches 2 --fpn-channels 32 --batch-size 4   # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft_methods import POINTWISE, StepTimer
from real_tasks import ASSETS, lite0_weights

COCO128 = ASSETS / "coco128_detection" / "config.yaml"
DATASETS = ("shapes", "coco128")
STRATEGIES = ("frozen", "lora", "conv_adapter", "full")
# strategy: (learning rate of neck and head, backbone lr as a share of it)
LEARNING_RATES = {"frozen": (1e-3, 1.0), "lora": (1e-3, 1.0), "conv_adapter": (1e-3, 1.0), "full": (1e-3, 0.3)}


def strategies_for(strategy: str, backbone: str) -> list[Any] | None:
    """The cvft strategy list of a benchmark row (LoRA on EfficientNet's pointwise convs, else timm's preset)."""
    if strategy == "frozen":
        return ["linear_probe"]
    if strategy == "lora":
        targets = POINTWISE if "efficientnet" in backbone else "auto"
        return [{"name": "lora", "rank": 8, "alpha": 16, "targets": targets}]
    if strategy == "conv_adapter":  # the additive row: a pointwise bottleneck beside every block
        return [{"name": "conv_adapter", "placement": "parallel_block", "kind": "pointwise", "reduction": 8}]
    return None


def data_module(dataset: str, args: argparse.Namespace):
    """The ``DetectionDataModule`` of ``shapes`` (generated into ``--out``) or ``coco128``."""
    from cvft.data.detection import DetectionDataModule, write_shapes_detection

    common = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": 0,
        "seed": args.seed,
        "augment": args.augment,
    }
    if dataset == "shapes":
        root = write_shapes_detection(args.out / f"shapes_{args.num_images}", args.num_images, image_size=128)
        return DetectionDataModule(coco_json=root / "annotations.json", **common)
    classes = [name.strip() for name in args.classes.split(",")] if args.classes else None
    return DetectionDataModule(data_yaml=COCO128, classes=classes, **common)


# --------------------------------------------------------------------------- one run, in its own process
def run_one(dataset: str, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl

    from cvft.tasks.detection import ObjectDetector

    torch.manual_seed(args.seed)
    data = data_module(dataset, args)
    lr, backbone_share = LEARNING_RATES[strategy]
    if args.backbone_lr_share is not None and strategy != "frozen":
        backbone_share = args.backbone_lr_share
    weights = args.weights or (lite0_weights() if args.backbone == "tf_efficientnet_lite0" else None)
    model = ObjectDetector(
        data.num_classes,
        class_names=data.class_names,
        category_ids=data.category_ids,
        backbone=args.backbone,
        pretrained=weights is None,
        weights=weights,
        head=args.head,
        strategies=strategies_for(strategy, args.backbone),
        image_size=args.image_size,
        fpn_channels=args.fpn_channels,
        lr=lr,
        backbone_lr_scale=backbone_share,
        warmup_epochs=min(1.0, args.epochs / 4),
        head_warmup_epochs=args.head_warmup_epochs if strategy != "frozen" else 0,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        check_val_every_n_epoch=args.epochs,  # evaluate once, at the end
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/map", "val/map_50")}
    steady = [n / s for n, s in zip(timer.sizes[args.warmup_steps :], timer.seconds[args.warmup_steps :], strict=True)]
    return {
        "data": dataset,
        "strategy": strategy,
        "seed": args.seed,
        "head_warmup_epochs": args.head_warmup_epochs if strategy != "frozen" else 0,
        "backbone_lr_share": backbone_share,
        "head": args.head,
        "backbone": args.backbone,
        "weights": model.weights_source.split(" ")[0],
        "trainable": trainable,
        "total": total,
        "map": metrics.get("val/map", float("nan")),
        "map_50": metrics.get("val/map_50", float("nan")),
        "images_per_s": statistics.median(steady) if steady else float("nan"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --------------------------------------------------------------------------- the table
def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per data set and strategy: mAP and mAP50 as mean ± std over seeds, median speed, largest RSS."""
    print(
        "| data | strategy | seeds | trainable params | % of model | mAP | mAP50 | train images/s | "
        "run s | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r["data"], r["strategy"]), []).append(r)
    for (data, strategy), runs in rows.items():
        done = [r for r in runs if "error" not in r]
        if not done:
            print(f"| {data} | {strategy} | failed: {runs[0]['error']} ||||||||")
            continue
        first = done[0]
        share = 100.0 * first["trainable"] / first["total"]
        print(
            f"| {data} | {strategy} | {len(done)} | {first['trainable']:,} | {share:.1f} | "
            f"{_mean_std([r['map'] for r in done])} | {_mean_std([r['map_50'] for r in done])} | "
            f"{statistics.median(r['images_per_s'] for r in done):.2f} | "
            f"{statistics.median(r['run_s'] for r in done):.0f} | {max(r['peak_rss_mib'] for r in done):.0f} |"
        )


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for r in results for key in r))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
    os.replace(tmp, path)


def _batches(text: str) -> int | float:
    """Lightning's ``limit_*_batches``: a whole number counts batches (``1`` is one batch), a decimal is a share."""
    return int(text) if text.strip().isdigit() else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated data sets and/or strategies, e.g. shapes,lora")
    parser.add_argument("--head", default="fcos", choices=("fcos", "retinanet", "faster_rcnn"))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="local weights file (default: lite0's real weights, or hub)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=320, help="network input side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fpn-channels", type=int, default=128)
    parser.add_argument("--num-images", type=int, default=400, help="size of the generated shapes set")
    parser.add_argument("--limit-train-batches", type=_batches, default=1.0, help="share (0.5) or batches (3)")
    parser.add_argument("--limit-val-batches", type=_batches, default=1.0, help="share (0.5) or batches (3)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; runs interleave the strategies per seed")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--augment", default="default", choices=("none", "default", "strong"))
    parser.add_argument(
        "--head-warmup-epochs", type=int, default=0, help="train neck and head alone first (not the frozen row)"
    )
    parser.add_argument(
        "--backbone-lr-share", type=float, default=None, help="backbone lr as a share of the head's (default per row)"
    )
    parser.add_argument("--classes", default=None, help="coco128: keep only these categories, e.g. person,car")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run (1 leaves a core free)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child process: "data:strategy"
    args = parser.parse_args()

    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    if args.run:
        dataset, strategy = args.run.split(":")
        print("RESULT " + json.dumps(run_one(dataset, strategy, args)))
        return
    wanted = {part.strip() for part in (args.only or "").split(",") if part.strip()}
    unknown = wanted - set(DATASETS) - set(STRATEGIES)
    if unknown:
        sys.exit(f"--only {sorted(unknown)} unknown; choose from {list(DATASETS) + list(STRATEGIES)}")
    datasets = [d for d in DATASETS if not wanted & set(DATASETS) or d in wanted]
    strategies = [s for s in STRATEGIES if not wanted & set(STRATEGIES) or s in wanted]
    if "coco128" in datasets and not COCO128.is_file():
        print(f"skipping coco128: {COCO128} is missing (it comes with ../shared/assets, see its README).")
        datasets.remove("coco128")
    options = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in vars(args).items()
        if key not in ("only", "run", "seeds", "seed") and value is not None
    ]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results = []
    for dataset, seed, strategy in [(d, seed, s) for d in datasets for seed in seeds for s in strategies]:
        child = [sys.executable, __file__, "--run", f"{dataset}:{strategy}", f"--seed={seed}", *options]
        start = time.perf_counter()
        proc = subprocess.run(child, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"data": dataset, "strategy": strategy, "seed": seed, "error": tail[:120]})
            print(f"{dataset} / {strategy} / seed {seed}: FAILED ({tail[:200]})", flush=True)
            continue
        result = json.loads(line[len("RESULT ") :]) | {"run_s": time.perf_counter() - start}
        results.append(result)
        print(
            f"{dataset} / {strategy} / seed {seed}: mAP {result['map']:.3f}, mAP50 {result['map_50']:.3f}, "
            f"{result['trainable']:,} trainable, {result['images_per_s']:.1f} img/s "
            f"({result['run_s']:.0f} s)",
            flush=True,
        )
        write_csv(results, args.out / "detection.csv")  # after every run, so a stopped sweep keeps what it measured
    if not results:
        sys.exit("nothing ran")
    print()
    print_table(results)
    write_csv(results, args.out / "detection.csv")
    print(f"\nwrote {args.out / 'detection.csv'}")


if __name__ == "__main__":
    main()
