"""``cvft compare``: fit several strategies on the same data and budget, and tabulate and plot them.

Examples::

    cvft compare --config base.yaml --strategies linear_probe,bitfit,lora,full --seeds 0,1,2
    cvft compare --config base.yaml --strategies configs/linear_probe.yaml,configs/resnet_lora.yaml \
        --data.root my_images/ --trainer.max_epochs 5
    cvft compare --config base.yaml --strategies linear_probe,lora --seeds 0,1,2 --resume runs/compare/version_0

Options other than those below are ``cvft fit`` options and apply to every run.
"""

from __future__ import annotations

import argparse
import sys

from cvft.errors import CvftError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``cvft compare``'s own options (the rest are passed to every fit)."""
    parser = argparse.ArgumentParser(
        prog="cvft compare",
        description="Fit each strategy (with each seed) on the same data and budget; write compare.csv, "
        "compare.md and compare.png into <trainer.default_root_dir>/compare/version_<n>/. Any other option is a "
        "`cvft fit` option applied to every run (e.g. --data.root images/ --trainer.max_epochs 5).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", "-c", action="append", required=True, help="Base `cvft fit` config (repeatable).")
    parser.add_argument(
        "--strategies",
        required=True,
        help="Comma-separated strategy names (lora), stacks (lora+supcon) or recipe files (configs/linear_probe.yaml; "
        "only the recipe's model.strategies is used).",
    )
    parser.add_argument("--seeds", default="0", help="Comma-separated seed_everything values (default: 0).")
    parser.add_argument(
        "--resume",
        default=None,
        help="Continue this comparison folder (or 'last': the newest one with the same configs and overrides); "
        "runs with a result.json are skipped, the rest run again; strategies and seeds it lacks are added to it.",
    )
    parser.add_argument(
        "--metric", default=None, help="Metric to plot (default: the task's, e.g. test/acc or val/acc)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cvft compare``; returns 0, or raises :class:`CvftError` when any run failed (the table lists them)."""
    from cvft.compare.runner import compare

    argv = sys.argv[1:] if argv is None else list(argv)
    options, overrides = build_parser().parse_known_args(argv)
    try:
        table = compare(
            config=options.config,
            strategies=options.strategies,
            seeds=options.seeds,
            overrides=overrides,
            resume=options.resume,
            metric=options.metric,
        )
    except KeyboardInterrupt:
        print("\ncvft compare: interrupted; finished runs are kept. Continue with the same command plus "
              "--resume last.", file=sys.stderr)  # fmt: skip
        return 130
    failed = [(row["strategy"], row["failed_logs"], row["error"]) for row in table if row["failed_logs"]]
    if failed:
        runs = sum(row["runs"] - row["runs_ok"] for row in table)
        details = "; ".join(f"{name}: {error or 'failed'} (logs: {logs})" for name, logs, error in failed)
        raise CvftError(
            f"{runs} of {sum(row['runs'] for row in table)} runs failed, and the table marks them: {details}. "
            f"Fix the cause and rerun with --resume {table.folder} to run only those."
        )
    return 0
