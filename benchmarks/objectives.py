"""Training objectives against their baselines on real images with a pretrained backbone, in one table.

* **distillation**: a small student (``mobilenetv3_small_050``, random init) with 300 labelled images, trained alone
  against the same student distilled from an EfficientNet-Lite0 teacher fine-tuned from real ImageNet weights on the
  whole training split (PneumoniaMNIST); the teacher's logits are cached per sample.
* **contrastive**: supervised-contrastive pre-fine-tuning (SupCon on two views, LoRA on the backbone) followed by a
  linear probe, against a direct linear probe, same total epochs (PneumoniaMNIST).
* **continual**: the 3-task sequence PneumoniaMNIST -> BreastMNIST -> digits on one Lite0 backbone (one head per
  task): final average accuracy, average forgetting and backward transfer of plain sequential fine-tuning, L2-SP,
  EWC, LwF and one LoRA adapter per task.
* **domain**: source PneumoniaMNIST, target the same task under an intensity shift (gamma 0.5, contrast 0.6 -
  real images, synthetic shift); source-only against AdaBN and pseudo-label self-training on unlabelled target
  images.
* **multitask**: one Lite0 backbone with a head per task on PneumoniaMNIST + BreastMNIST against one model per task.

    python benchmarks/objectives.py                  # everything, ~15 min on 2 CPU cores
    python benchmarks/objectives.py --only distillation,continual
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from real_tasks import digits, lite0_weights, medmnist
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cvft.tasks import ImageClassifier

LITE0 = "tf_efficientnet_lite0"
POINTWISE = r"blocks\.\d+\.\d+\.conv_p[wl]"  # EfficientNet's pointwise (1x1) convolutions


# --------------------------------------------------------------------------- shared pieces
class Views(Dataset):
    """``(views, target, index)`` items: ``num_views`` random flips / shifts of a tensor image (V = 1: no stack)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, num_views: int = 1, augment: bool = True):
        self.images, self.targets, self.num_views, self.augment = images, targets, num_views, augment

    def __len__(self) -> int:
        return len(self.targets)

    def _view(self, image: torch.Tensor) -> torch.Tensor:
        if not self.augment:
            return image
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        dy, dx = torch.randint(-4, 5, (2,)).tolist()
        return image.roll((dy, dx), dims=(-2, -1))

    def __getitem__(self, index: int):
        image = self.images[index]
        views = (
            torch.stack([self._view(image) for _ in range(self.num_views)]) if self.num_views > 1 else self._view(image)
        )
        return views, self.targets[index], torch.tensor(index)


def trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def fit(model: ImageClassifier, data: dict[str, torch.Tensor], epochs: int, batch_size: int = 32, views: int = 1):
    loader = DataLoader(Views(data["train_x"], data["train_y"], views), batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    trainer(epochs).fit(model, loader)
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    logits = torch.cat([model(x) for x in images.split(256)])
    return float((logits.argmax(-1) == targets).float().mean())


def classifier(backbone: str, num_classes: int, strategies: list[Any], lr: float, **kwargs: Any) -> ImageClassifier:
    weights = lite0_weights() if backbone == LITE0 else None
    return ImageClassifier(
        backbone,
        pretrained=False,
        weights=weights,
        num_classes=num_classes,
        strategies=strategies,
        lr=lr,
        warmup_epochs=0,
        **kwargs,
    )


# --------------------------------------------------------------------------- the comparisons
BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {}


def benchmark(fn: Callable[[argparse.Namespace], list[dict[str, Any]]]):
    BENCHMARKS[fn.__name__] = fn
    return fn


STUDENT = "mobilenetv3_small_050"


@benchmark
def distillation(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A small student with few labels, alone vs distilled from a Lite0 teacher fine-tuned on the whole split."""
    from cvft.export import export_classifier

    full = medmnist("pneumoniamnist", args.size, None, args.seed)
    few = medmnist("pneumoniamnist", args.size, args.student_size, args.seed)
    teacher = classifier(LITE0, 2, ["full"], lr=1e-3)
    seconds = fit(teacher, full, 2)
    value = accuracy(teacher, full["test_x"], full["test_y"])
    run = f"teacher: Lite0 fine-tuned on {len(full['train_y'])} images"
    rows = [dict(comparison="distillation", run=run, metric="test acc", value=value, seconds=seconds)]
    teacher_file = export_classifier(teacher, Path(args.out) / "teacher.safetensors")

    pl.seed_everything(args.seed, verbose=False)
    alone = classifier(STUDENT, 2, ["full"], lr=3e-3)
    seconds = fit(alone, few, args.epochs * 3)
    baseline = accuracy(alone, few["test_x"], few["test_y"])
    rows.append(dict(comparison="distillation", run=f"student alone: {STUDENT}, {len(few['train_y'])} labels",
                     metric="test acc", value=baseline, seconds=seconds))  # fmt: skip

    pl.seed_everything(args.seed, verbose=False)
    spec = {"name": "distillation", "teacher": LITE0, "teacher_weights": str(teacher_file), "temperature": 4.0,
            "alpha": 0.7, "cache_logits": True}  # fmt: skip
    student = classifier(STUDENT, 2, ["full", spec], lr=3e-3)
    seconds = fit(student, few, args.epochs * 3)
    rows.append(dict(comparison="distillation", run="same student + KD (T=4, alpha=0.7, cached teacher logits)",
                     metric="test acc", value=accuracy(student, few["test_x"], few["test_y"]), baseline=baseline,
                     seconds=seconds))  # fmt: skip
    return rows


@benchmark
def contrastive(args: argparse.Namespace) -> list[dict[str, Any]]:
    """SupCon (alone, LoRA on the backbone) then a linear probe, against a direct linear probe; same total epochs."""
    from cvft.workflows import linear_probe_after_contrastive

    data = medmnist("pneumoniamnist", args.size, args.train_size, args.seed)
    direct = classifier(LITE0, 2, ["linear_probe"], lr=1e-2)
    seconds = fit(direct, data, 2 * args.epochs)
    baseline = accuracy(direct, data["test_x"], data["test_y"])
    rows = [dict(comparison="contrastive", run="linear probe", metric="test acc", value=baseline, seconds=seconds)]
    lora = {"name": "lora", "rank": 8, "alpha": 16, "targets": POINTWISE}
    stage1 = classifier(LITE0, 2, [lora, {"name": "supcon", "mode": "alone", "temperature": 0.1}], lr=3e-3)
    seconds = fit(stage1, data, args.epochs, views=2)
    probe = linear_probe_after_contrastive(stage1, f"{args.out}/supcon_stage1.safetensors", lr=1e-2, warmup_epochs=0)
    seconds += fit(probe, data, args.epochs)
    value = accuracy(probe, data["test_x"], data["test_y"])
    rows.append(
        dict(
            comparison="contrastive",
            run="SupCon (LoRA) -> linear probe",
            metric="test acc",
            value=value,
            baseline=baseline,
            seconds=seconds,
        )
    )
    return rows


CONTINUAL_METHODS: dict[str, Any] = {
    "sequential fine-tuning": "finetune",
    "L2-SP": {"name": "l2sp", "alpha": 1.0},
    "EWC": {"name": "ewc", "lam": 1000.0, "fisher_batches": 4},
    "LwF": {"name": "lwf", "lam": 10.0},
    "adapter per task (LoRA)": "adapter_per_task",
}


@benchmark
def continual(args: argparse.Namespace) -> list[dict[str, Any]]:
    """PneumoniaMNIST -> BreastMNIST -> digits on one Lite0 backbone: forgetting of each method."""
    from cvft.continual import run_continual

    sources = {
        "pneumonia": medmnist("pneumoniamnist", args.size, args.train_size // 2, args.seed),
        "breast": medmnist("breastmnist", args.size, None, args.seed),
        "digits": digits(args.size, args.seed),
    }
    tasks = []
    for name, data in sources.items():
        train = DataLoader(TensorDataset(data["train_x"], data["train_y"]), batch_size=32, shuffle=True)
        test = DataLoader(TensorDataset(data["test_x"], data["test_y"]), batch_size=256)
        tasks.append((name, train, test, int(data["train_y"].max()) + 1))
    rows, baseline = [], None
    chosen = args.continual_methods.split(",") if args.continual_methods else list(CONTINUAL_METHODS)
    for label, method in CONTINUAL_METHODS.items():
        if label not in chosen:
            continue
        strategies = None
        if method == "adapter_per_task":
            strategies = [{"name": "lora", "rank": 8, "alpha": 16, "targets": POINTWISE, "train_head": False}]
        start = time.perf_counter()
        result = run_continual(
            LITE0, tasks, method=method, epochs=args.epochs, lr=1e-3, weights=lite0_weights(),
            strategies=strategies, seed=args.seed, verbose=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        forgetting = float(result.average_forgetting)
        if baseline is None:
            baseline = forgetting
        rows.append(
            dict(comparison="continual", run=label, metric="avg forgetting", value=forgetting,
                 baseline=None if label.startswith("sequential") else baseline, seconds=seconds)
        )  # fmt: skip
        rows.append(
            dict(comparison="continual", run=label, metric="final avg acc", value=float(result.average_accuracy))
        )
        rows.append(dict(comparison="continual", run=label, metric="BWT", value=float(result.bwt)))
        print(result.table(), flush=True)
    return rows


def intensity_shift(images: torch.Tensor, gamma: float = 0.5, contrast: float = 0.6) -> torch.Tensor:
    """A scanner-like shift of normalised images: gamma on the 0..1 intensities, then reduced contrast."""
    pixels = (images * 0.5 + 0.5).clamp(0, 1).pow(gamma)
    pixels = 0.5 + contrast * (pixels - 0.5)
    return (pixels - 0.5) / 0.5


def save_unlabelled(images: torch.Tensor, folder: Path) -> Path:
    """Normalised 3-channel tensors as 8-bit grayscale PNGs (the form a user's target folder has)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images[:, 0] * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for i, array in enumerate(pixels):
        Image.fromarray(array, mode="L").save(folder / f"target_{i:04d}.png")
    return folder


@benchmark
def domain(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Source PneumoniaMNIST, target = shifted images: source-only vs AdaBN vs pseudo-label self-training."""
    import copy

    from cvft.strategies.domain import adabn

    data = medmnist("pneumoniamnist", args.size, args.train_size, args.seed)
    target_x, target_y = intensity_shift(data["test_x"]), data["test_y"]  # evaluation: labels kept aside
    unlabelled = save_unlabelled(intensity_shift(data["val_x"]), Path(args.out) / "domain_target")  # no labels
    source = classifier(LITE0, 2, ["full"], lr=1e-3)
    seconds = fit(source, data, args.epochs)
    rows = [dict(comparison="domain", run="source, on source test", metric="test acc",
                 value=accuracy(source, data["test_x"], data["test_y"]), seconds=seconds)]  # fmt: skip
    baseline = accuracy(source, target_x, target_y)
    rows.append(dict(comparison="domain", run="source-only, on target", metric="test acc", value=baseline))

    adapted = copy.deepcopy(source)
    start = time.perf_counter()
    adabn(adapted.backbone, unlabelled, image_size=args.size)
    rows.append(dict(comparison="domain", run="AdaBN, on target", metric="test acc",
                     value=accuracy(adapted, target_x, target_y), baseline=baseline,
                     seconds=time.perf_counter() - start))  # fmt: skip

    spec = {"name": "pseudo_label", "target_root": str(unlabelled), "threshold": 0.9, "image_size": args.size}
    self_trained = classifier(LITE0, 2, ["full", spec], lr=3e-4)
    self_trained.backbone.load_state_dict(source.backbone.state_dict())
    seconds = fit(self_trained, data, 1)
    rows.append(dict(comparison="domain", run="pseudo-label (1 epoch), on target", metric="test acc",
                     value=accuracy(self_trained, target_x, target_y), baseline=baseline, seconds=seconds))  # fmt: skip
    return rows


@benchmark
def multitask(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One Lite0 backbone with two heads (PneumoniaMNIST + BreastMNIST, uncertainty weighting) vs one model each."""
    from cvft.data import MultiTaskDataModule
    from cvft.tasks import MultiTaskClassifier

    sources = {
        "pneumonia": medmnist("pneumoniamnist", args.size, args.train_size, args.seed),
        "breast": medmnist("breastmnist", args.size, None, args.seed),
    }
    rows, single = [], {}
    for name, data in sources.items():
        model = classifier(LITE0, 2, ["full"], lr=1e-3)
        seconds = fit(model, data, args.epochs)
        single[name] = accuracy(model, data["test_x"], data["test_y"])
        rows.append(dict(comparison="multitask", run=f"single-task model, {name}", metric="test acc",
                         value=single[name], seconds=seconds))  # fmt: skip
    tasks = {name: {"num_classes": 2} for name in sources}
    model = MultiTaskClassifier(
        tasks, LITE0, pretrained=False, weights=lite0_weights(), strategies=["full"], weighting="uncertainty",
        lr=1e-3, warmup_epochs=0,
    )  # fmt: skip
    train = {name: TensorDataset(d["train_x"], d["train_y"]) for name, d in sources.items()}
    datamodule = MultiTaskDataModule(train, batch_size=32, seed=args.seed)
    start = time.perf_counter()
    trainer(args.epochs).fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    model.eval()
    for name, data in sources.items():
        with torch.no_grad():
            logits = torch.cat([model(x, task=name) for x in data["test_x"].split(256)])
        value = float((logits.argmax(-1) == data["test_y"]).float().mean())
        rows.append(dict(comparison="multitask", run=f"shared backbone, {name}", metric="test acc", value=value,
                         baseline=single[name], seconds=seconds))  # fmt: skip
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| comparison | run | metric | value | baseline | value - baseline | time s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = r.get("baseline")
        delta = f"{r['value'] - base:+.3f}" if base is not None else ""
        base_text = f"{base:.3f}" if base is not None else ""
        print(
            f"| {r['comparison']} | {r['run']} | {r['metric']} | {r['value']:.3f} | {base_text} | {delta} | "
            f"{r.get('seconds', float('nan')):.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="all", help=f"comma-separated subset of {list(BENCHMARKS)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=1200)
    parser.add_argument("--continual-methods", default=None, help=f"subset of {list(CONTINUAL_METHODS)}")
    parser.add_argument("--student-size", type=int, default=300, help="labelled images of the distilled student")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmark-results")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    names = list(BENCHMARKS) if args.only == "all" else [n.strip() for n in args.only.split(",")]
    rows: list[dict[str, Any]] = []
    for name in names:
        pl.seed_everything(args.seed, verbose=False)
        start = time.perf_counter()
        found = BENCHMARKS[name](args)
        rows += found
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        print_table(found)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
