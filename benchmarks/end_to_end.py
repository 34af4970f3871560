"""End-to-end speed: the whole ``cvft fit`` process against the hand-written loop (``plain_loop.py``), same data.

Each round runs both as fresh processes, alternating which goes first, and times them from process start to exit:
imports, data loading and preprocessing, training, validation every epoch and the outputs each writes. Both see
the same images (BreastMNIST's official split from ``../shared/assets``), image size, batch size, epochs, optimizer
and no augmentation. The ratio of images/s (training images over wall time) is reported as the median over rounds.

    python benchmarks/end_to_end.py                         # BreastMNIST, 96 px, 3 epochs, full fine-tuning
    python benchmarks/end_to_end.py --method linear_probe --rounds 5

Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from real_tasks import LITE0_FILE, MEDMNIST

HERE = Path(__file__).resolve().parent


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stderr[-3000:]}")
    return wall, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--method", choices=["full", "linear_probe", "bitfit"], default="full")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    npz = MEDMNIST / f"{args.dataset}.npz"
    if not npz.is_file() or not LITE0_FILE.is_file():
        raise SystemExit("This benchmark needs ../shared/assets (medmnist_28 and efficientnet_lite0_imagenet).")
    import numpy as np

    train_images = args.epochs * len(np.load(npz)["train_labels"])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    plain = [
        sys.executable, str(HERE / "plain_loop.py"), "--npz", str(npz), "--weights", str(LITE0_FILE),
        "--method", args.method, "--image-size", str(args.image_size), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--no-test",
    ]  # fmt: skip
    times: dict[str, list[float]] = {"cvft": [], "plain": []}
    metrics: dict[str, list[float]] = {"cvft": [], "plain": []}
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as root:
            cvft = [
                sys.executable, "-m", "cvft.cli", "fit", "--task", "medical", f"--data.medmnist={npz}",
                "--model.backbone=tf_efficientnet_lite0", "--model.pretrained=false", f"--model.weights={LITE0_FILE}",
                f"--model.lr={args.lr}", "--model.warmup_epochs=0", f"--data.image_size={args.image_size}",
                f"--data.batch_size={args.batch_size}", "--data.augment=none", f"--trainer.max_epochs={args.epochs}",
                "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}", "--seed_everything=0",
            ] + ([] if args.method == "full" else [f"--model.strategies={args.method}"])  # fmt: skip
            order = [("cvft", cvft), ("plain", plain)]
            for name, command in order if round_index % 2 == 0 else order[::-1]:
                wall, out = run_timed(command, env)
                times[name].append(wall)
                if name == "plain":
                    metrics[name].append(json.loads(out.strip().splitlines()[-1])["val_acc"])
                else:
                    line = next(x for x in out.splitlines() if x.startswith("Final validation"))
                    metrics[name].append(float(line.split("val/acc ")[1].split()[0]))
            print(
                f"round {round_index + 1}: cvft {times['cvft'][-1]:.1f} s, plain {times['plain'][-1]:.1f} s", flush=True
            )
    ips = {name: train_images / statistics.median(t) for name, t in times.items()}
    print(f"\n{args.dataset} {args.image_size}px, {args.epochs} epochs, {args.method}, {args.rounds} rounds (medians)")
    print("| loop | wall s | train images/s | val acc |\n|---|---|---|---|")
    for name in ("cvft", "plain"):
        wall, acc = statistics.median(times[name]), statistics.median(metrics[name])
        print(f"| {name} | {wall:.1f} | {ips[name]:.1f} | {acc:.3f} |")
    print(f"\nratio cvft / plain images/s: {ips['cvft'] / ips['plain']:.2f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
