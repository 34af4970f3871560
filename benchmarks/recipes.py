"""Training-toolbox recipes on real data: each strategy with and without EMA, Mixup/CutMix and RandAugment.

Runs ``cvft compare`` once per recipe (the same strategies, seeds, data and budget; only the training tools differ)
on a MedMNIST set (official train/val/test splits) or the imagenette subset from ``../shared/assets`` with
EfficientNet-Lite0's real ImageNet weights, and prints one table of the test metrics (mean ± std over seeds) and
training images/s.

    python benchmarks/recipes.py                                  # BreastMNIST, lora, 3 seeds, 10 epochs
    python benchmarks/recipes.py --dataset pneumoniamnist --strategies lora,full --epochs 5
    python benchmarks/recipes.py --dataset imagenette --image-size 112 --epochs 3   # 100 train / 30 val per class

Finished comparisons are reused (``--resume last``), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import yaml
from real_tasks import IMAGENETTE, LITE0_FILE, MEDMNIST, _write_imagenette_folder

HERE = Path(__file__).resolve().parent

_EMA = ["--model.ema_decay={ema}", "--model.ema_warmup=true"]
_MIX = ["--model.mixup=0.2", "--model.cutmix=1.0"]
_RAND = ["--data.augment=randaugment"]

RECIPES: dict[str, list[str]] = {
    "plain": [],
    "ema": _EMA,
    "mixup+cutmix": _MIX,
    "randaugment": _RAND,
    "ema+mixup+cutmix": _EMA + _MIX,
    "all": _EMA + _MIX + _RAND,
}
"""Recipe name -> ``cvft fit`` options added to every run of its comparison (``{ema}``: ``--ema-decay``).

The EMA warms up (decay ``min(ema_decay, (1 + n) / (10 + n))`` at update ``n``, timm's), so a short run averages
over a window that fits its length instead of keeping most of the pretrained start."""


def data_options(dataset: str, work: Path) -> tuple[str, dict]:
    """The task and ``data:`` section for ``dataset``; ``SystemExit`` when its assets are missing."""
    if not LITE0_FILE.is_file():
        raise SystemExit("This benchmark needs ../shared/assets/efficientnet_lite0_imagenet.")
    if dataset == "imagenette":
        if not IMAGENETTE.is_dir():
            raise SystemExit("This benchmark needs ../shared/assets/imagenette_224_subset.")
        root = work / "imagenette_100"
        if not root.exists():
            _write_imagenette_folder(root, train_per_class=100, val_per_class=30)
        return "classification", {"root": str(root)}
    npz = MEDMNIST / f"{dataset}.npz"
    if not npz.is_file():
        raise SystemExit(f"This benchmark needs ../shared/assets/medmnist_28/{dataset}.npz.")
    return "medical", {"medmnist": str(npz)}


def run_recipe(name: str, options: list[str], base: Path, work: Path, strategies: str, seeds: str) -> list[dict]:
    """``cvft compare`` for one recipe; returns its table rows."""
    root = work / name
    command = [
        sys.executable, "-m", "cvft.cli", "compare", "--config", str(base), "--strategies", strategies,
        "--seeds", seeds, f"--trainer.default_root_dir={root}", *options,
    ]  # fmt: skip
    if sorted(root.glob("compare/version_*/compare.csv")):
        command += ["--resume", "last"]
    subprocess.run(command, check=True)
    table = sorted(root.glob("compare/version_*/compare.csv"))[-1]
    with open(table, newline="") as handle:
        return list(csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--strategies", default="lora")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--out", default=str(HERE / "out" / "recipes"))
    args = parser.parse_args()
    work = Path(args.out) / f"{args.dataset}_{args.image_size}px_{args.epochs}ep"
    work.mkdir(parents=True, exist_ok=True)
    task, data = data_options(args.dataset, work)
    base = work / "base.yaml"
    config = {
        "seed_everything": 0,
        "task": task,
        "trainer": {"max_epochs": args.epochs, "accelerator": "cpu"},
        "model": {"backbone": "tf_efficientnet_lite0", "pretrained": False, "weights": str(LITE0_FILE)},
        "data": {**data, "image_size": args.image_size, "batch_size": 32},
    }
    base.write_text(yaml.safe_dump(config))
    rows = {}
    for name in args.recipes.split(","):
        options = [option.format(ema=args.ema_decay) for option in RECIPES[name]]
        rows[name] = run_recipe(name, options, base, work, args.strategies, args.seeds)
    first = next(iter(rows.values()))[0]
    metrics = [key.removesuffix("_mean") for key in first if key.startswith("test/") and key.endswith("_mean")]
    print(f"\n{args.dataset} {args.image_size}px, {args.epochs} epochs, seeds {args.seeds} (test split, mean ± std)")
    print("| strategy | recipe | " + " | ".join(metrics) + " | train images/s |")
    print("|---|---|" + "---|" * (len(metrics) + 1))
    for name, table in rows.items():
        for row in table:
            cells = [f"{float(row[m + '_mean']):.3f} ± {float(row[m + '_std'] or 0):.3f}" for m in metrics]
            speed = float(row["images_per_s_mean"])
            print(f"| {row['strategy']} | {name} | " + " | ".join(cells) + f" | {speed:.1f} |")


if __name__ == "__main__":
    main()
