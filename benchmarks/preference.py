"""Reward and preference fine-tuning against the decision a supervised model already allows: expected cost on test.

Two real tasks, each with a cost matrix ``cost[true class][decision]``:

* ``pneumoniamnist``: paediatric chest X-rays (normal / pneumonia, ``../shared/assets/medmnist_28``, official
  splits, a stratified ``--train-size`` subset of the training split); a missed pneumonia costs 5, a false alarm 1.
* ``digits``: scikit-learn's handwritten digits (seeded 60/20/20 split); every confusion costs 1, except the chosen
  look-alikes 3/8, 4/9, 1/7 and 5/6 (both ways), which cost 10.

Per data set and seed: supervised fine-tuning (SFT, the whole EfficientNet-Lite0 from its real ImageNet weights,
cross-entropy), then, each from that SFT checkpoint and with the same optimizer budget, the aligned policies:
REINFORCE (moving-average baseline), PPO, TRPO (on the cost matrix's reward ``-cost``), DPO on pairs generated from the
cost matrix, and PPO on the scores of a Bradley-Terry reward model trained on ``--rm-pairs`` preference pairs. The
honest baseline is **SFT with the Bayes-optimal decision rule** on its probabilities (``argmin_a sum_y p(y|x) cost[y,
a]``, :func:`cvft.strategies.preference.bayes_decisions`): it needs no training at all; ``sft+calibrated bayes``
applies it to probabilities temperature-scaled on the validation split. Every policy is evaluated by its most likely
label (the decision a user deploys). ``--align-split val`` makes the aligned methods roll out (and DPO and the reward
model draw their pairs) on the validation split, which SFT never trained on, instead of SFT's own training split.

Each (data set, seed) is its own process (``--jobs`` at once). The table goes to stdout (markdown; expected cost and
accuracy as mean ± std over seeds, pneumonia sensitivity and specificity where binary) and ``--out`` gets
``preference.csv`` and ``preference.png`` (test cost per method).

    python benchmarks/preference.py                                   # both data sets, seeds 0,1,2 (~30 min, 2 cores)
    python benchmarks/preference.py --datasets digits --seeds 0       # one quick run
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from real_tasks import digits, lite0_weights, medmnist

PNEUMONIA_COST = [[0.0, 1.0], [5.0, 0.0]]
LOOK_ALIKES = ((3, 8), (4, 9), (1, 7), (5, 6))


def digits_cost() -> list[list[float]]:
    """Digits: 1 per confusion, 10 for the look-alike pairs (both ways), 0 on the diagonal."""
    cost = [[0.0 if true == chosen else 1.0 for chosen in range(10)] for true in range(10)]
    for a, b in LOOK_ALIKES:
        cost[a][b] = cost[b][a] = 10.0
    return cost


#: data set: cost matrix, number of classes, image side in pixels, supervised epochs (``--sft-epochs`` overrides).
DATASETS: dict[str, dict[str, Any]] = {
    "pneumoniamnist": {"cost": PNEUMONIA_COST, "classes": 2, "size": 64, "sft_epochs": 3},
    "digits": {"cost": digits_cost(), "classes": 10, "size": 32, "sft_epochs": 10},
}
METHODS = ("sft", "sft+bayes", "sft+calibrated bayes", "reinforce", "ppo", "trpo", "dpo", "reward_model+ppo")


def load(dataset: str, args: argparse.Namespace, seed: int) -> dict[str, torch.Tensor]:
    size = DATASETS[dataset]["size"]
    if dataset == "digits":
        return digits(size, seed)
    return medmnist(dataset, size, args.train_size, seed)


def objective(method: str, cost: list[list[float]], args: argparse.Namespace) -> dict[str, Any]:
    """The cvft strategy configuration of an aligned row (the reward: ``-cost[true, decision]``)."""
    reward = {"cost_matrix": cost}
    if method == "reinforce":
        return {"name": "reinforce", "reward": reward, "baseline": "moving_average", "kl_coef": args.kl_coef}
    if method == "ppo":
        return {"name": "ppo", "reward": reward, "clip": 0.2, "epochs": 4, "minibatches": 2, "kl_coef": args.kl_coef}
    if method == "trpo":
        return {"name": "trpo", "reward": reward, "max_kl": args.max_kl}
    if method == "dpo":
        return {"name": "dpo", "beta": args.beta}
    raise ValueError(method)


# --------------------------------------------------------------------------- one data set and seed, in its own process
def _classifier(num_classes: int, strategies: list[Any], lr: float):
    from cvft.tasks import ImageClassifier

    return ImageClassifier(
        "tf_efficientnet_lite0",
        pretrained=False,
        weights=lite0_weights(),
        num_classes=num_classes,
        strategies=strategies,
        lr=lr,
        warmup_epochs=0,
    )


def _fit(model, loader, epochs: int) -> float:
    from objectives import trainer as quiet_trainer

    trainer = quiet_trainer(epochs)
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


@torch.no_grad()
def _probs(model, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).float().softmax(-1) for x in images.split(256)])


def _scores(decisions: torch.Tensor, targets: torch.Tensor, cost: list[list[float]]) -> dict[str, float]:
    """Expected cost per image, accuracy, and (binary) sensitivity / specificity of the decisions."""
    matrix = torch.tensor(cost)
    scores = {
        "test_cost": float(matrix[targets, decisions].mean()),
        "test_acc": float((decisions == targets).float().mean()),
    }
    if matrix.shape[0] == 2:
        scores["sensitivity"] = float((decisions[targets == 1] == 1).float().mean())
        scores["specificity"] = float((decisions[targets == 0] == 0).float().mean())
    return scores


def run_seed(dataset: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    from torch.utils.data import DataLoader, TensorDataset

    from cvft.data.preference import PreferencePairDataset, pairs_from_cost_matrix
    from cvft.strategies.preference import bayes_decisions
    from cvft.tasks.temperature import fit_temperature

    spec = DATASETS[dataset]
    cost, classes = spec["cost"], spec["classes"]
    data = load(dataset, args, seed)
    labelled = TensorDataset(data["train_x"], data["train_y"])
    # What the aligned methods roll out on: the SFT training split, or the validation split SFT never saw.
    align_x, align_y = data[f"{args.align_split}_x"], data[f"{args.align_split}_y"]
    aligned_on = TensorDataset(align_x, align_y)
    test_x, test_y = data["test_x"], data["test_y"]

    def loader(dataset_: Any) -> DataLoader:
        return DataLoader(dataset_, batch_size=args.batch_size, shuffle=True, drop_last=True)

    rows: list[dict[str, Any]] = []

    def record(method: str, decisions: torch.Tensor, seconds: float, **extra: Any) -> None:
        row = {"dataset": dataset, "seed": seed, "method": method, "align_split": args.align_split, "train_s": seconds}
        rows.append(row | _scores(decisions, test_y, cost) | extra)
        print(f"{dataset} / seed {seed} / {method}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)

    torch.manual_seed(seed)
    sft = _classifier(classes, ["full"], args.sft_lr)
    seconds = _fit(sft, loader(labelled), args.sft_epochs or spec["sft_epochs"])
    probs = _probs(sft, test_x)
    record("sft", probs.argmax(-1), seconds)
    record("sft+bayes", bayes_decisions(probs, cost), 0.0)
    # The Bayes rule on temperature-scaled probabilities (temperature fitted on the validation split).
    val_logits = _probs(sft, data["val_x"]).clamp_min(1e-12).log()
    temperature = fit_temperature(val_logits, data["val_y"])
    calibrated = (probs.clamp_min(1e-12).log() / temperature).softmax(-1)
    record("sft+calibrated bayes", bayes_decisions(calibrated, cost), 0.0, temperature=temperature)
    sft_state = copy.deepcopy(sft.backbone.state_dict())

    def from_sft(strategy: dict[str, Any] | str, lr: float):
        torch.manual_seed(seed)
        model = _classifier(classes, [args.policy_params, strategy], lr)
        model.backbone.load_state_dict(sft_state)
        return model

    pairs = PreferencePairDataset(pairs_from_cost_matrix(align_y.tolist(), cost, seed=seed), images=aligned_on)
    for method in ("reinforce", "ppo", "trpo", "dpo"):
        if method not in args.methods:
            continue
        model = from_sft(objective(method, cost, args), args.lr)
        seconds = _fit(model, loader(pairs if method == "dpo" else aligned_on), args.epochs)
        record(method, _probs(model, test_x).argmax(-1), seconds)

    if "reward_model+ppo" in args.methods:
        # A Bradley-Terry reward model (the SFT network with a retrained head) on a few hundred preference pairs.
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(len(pairs), generator=generator)[: args.rm_pairs].tolist()
        reward_model = from_sft("reward_model", args.lr)
        reward_model.backbone.reset_classifier(classes)  # scores, not the SFT logits
        rm_seconds = _fit(reward_model, loader(torch.utils.data.Subset(pairs, subset)), args.rm_epochs)
        reward_net = reward_model.backbone.eval()
        test_pairs = pairs_from_cost_matrix(test_y.tolist(), cost, seed=seed)
        with torch.no_grad():
            scores = torch.cat([reward_net(x) for x in test_x.split(256)])
        index = torch.tensor([p.path for p in test_pairs])
        preferred = torch.tensor([p.preferred for p in test_pairs])
        rejected = torch.tensor([p.rejected for p in test_pairs])
        rm_acc = float((scores[index, preferred] > scores[index, rejected]).float().mean())
        strategy = objective("ppo", cost, args) | {"reward": {"model": reward_net}}
        model = from_sft(strategy, args.lr)
        seconds = _fit(model, loader(aligned_on), args.epochs)
        record(
            "reward_model+ppo",
            _probs(model, test_x).argmax(-1),
            seconds + rm_seconds,
            rm_pair_acc=rm_acc,
            rm_pairs=len(subset),
        )
    return rows


# --------------------------------------------------------------------------- the table and the plot
def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per data set and method: test cost and accuracy as mean ± std over seeds, median training seconds."""
    print("| data | method | seeds | test cost / image | test acc | sensitivity | specificity | train s |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    for (dataset, method), runs in groups.items():
        sens = _mean_std([r["sensitivity"] for r in runs]) if "sensitivity" in runs[0] else "-"
        spec = _mean_std([r["specificity"] for r in runs]) if "specificity" in runs[0] else "-"
        extra = ""
        if "rm_pair_acc" in runs[0]:
            pair_acc = _mean_std([r["rm_pair_acc"] for r in runs])
            extra = f" (reward model: {runs[0]['rm_pairs']} pairs, test pair acc {pair_acc})"
        print(
            f"| {dataset} | {method}{extra} | {len(runs)} | {_mean_std([r['test_cost'] for r in runs])} | "
            f"{_mean_std([r['test_acc'] for r in runs])} | {sens} | {spec} | "
            f"{statistics.median(r['train_s'] for r in runs):.0f} |"
        )


def write_outputs(results: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "preference.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for r in results for key in r)))
        writer.writeheader()
        writer.writerows(results)
    os.replace(tmp, out / "preference.csv")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        methods = list(dict.fromkeys(r["method"] for r in results if r["dataset"] == dataset))
        for x, method in enumerate(methods):
            costs = [r["test_cost"] for r in results if r["dataset"] == dataset and r["method"] == method]
            ax.scatter([x] * len(costs), costs, color="tab:blue", alpha=0.7)
            ax.hlines(statistics.mean(costs), x - 0.3, x + 0.3, color="black")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_ylabel("test expected cost per image (lower is better)")
        ax.set_title(f"{dataset}: one dot per seed, bar = mean")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "preference.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,pneumoniamnist")
    parser.add_argument("--methods", default=",".join(METHODS), help="aligned rows to run (sft always runs)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-size", type=int, default=1200, help="PneumoniaMNIST training subset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sft-epochs", type=int, default=0, help="0: 3 (pneumoniamnist), 10 (digits)")
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each aligned method from the SFT model")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the aligned methods (not TRPO)")
    parser.add_argument(
        "--align-split",
        default="train",
        choices=("train", "val"),
        help="where the aligned methods roll out and draw pairs: SFT's training split, or the unseen validation split",
    )
    parser.add_argument("--policy-params", default="linear_probe", help="what the aligned methods train")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--max-kl", type=float, default=0.01)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rm-pairs", type=int, default=300)
    parser.add_argument("--rm-epochs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1, help="(data set, seed) processes at once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / jobs)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child process: "dataset:seed"
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",")]

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
    if args.run:
        dataset, seed = args.run.split(":")
        print("RESULT " + json.dumps(run_seed(dataset, int(seed), args)))
        return
    forwarded = [a for a in sys.argv[1:] if not a.startswith(("--jobs", "--run"))]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(d.strip(), int(s)) for d in args.datasets.split(",") for s in args.seeds.split(",")]
    results: list[dict[str, Any]] = []
    running: list[tuple[tuple[str, int], subprocess.Popen]] = []
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    while jobs or running:
        while jobs and len(running) < args.jobs:
            dataset, seed = jobs.pop(0)
            child = [sys.executable, __file__, *forwarded, f"--threads={threads}", f"--run={dataset}:{seed}"]
            running.append(((dataset, seed), subprocess.Popen(child, stdout=subprocess.PIPE, text=True, env=env)))
        (key, proc), running = running[0], running[1:]
        stdout, _ = proc.communicate()
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{key}: FAILED (see the messages above)", flush=True)
            continue
        results.extend(json.loads(line[len("RESULT ") :]))
        write_outputs(results, args.out)
    if not results:
        sys.exit("nothing ran")
    print()
    print_table(results)
    print(f"\nwrote {args.out / 'preference.csv'} and {args.out / 'preference.png'}")


if __name__ == "__main__":
    main()
