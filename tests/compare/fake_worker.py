"""Stands in for ``python -m cvft.compare.worker`` in fast tests: no torch, results from the arguments.

Every call appends its arguments to the file named by $CVFT_FAKE_CALLS. ``bitfit`` is refused (exit code 2, as a
cvft error would be), ``norm_only`` with seed 1 crashes with a traceback; every other run writes fit.json.
"""

import json
import os
import sys
from pathlib import Path

fit_json, args = Path(sys.argv[1]), sys.argv[2:]
with open(os.environ["CVFT_FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\n")
value = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
strategies = json.loads(value["--model.strategies"])
names = [s if isinstance(s, str) else s["name"] for s in strategies]
seed = int(value["--seed_everything"])
print(f"fitting {names} with seed {seed}")
if "bitfit" in names:
    print("cvft: error: Strategy 'bitfit' is refused for this test.", file=sys.stderr)
    sys.exit(2)
if "norm_only" in names and seed == 1:
    raise RuntimeError("crashed mid-way through the fit")
accuracy = {"linear_probe": 0.5, "lora": 0.8}.get(names[0], 0.6) + 0.1 * seed
trainable = {"linear_probe": 300, "lora": 40_000}.get(names[0], 5_000)
fit_json.write_text(
    json.dumps(
        {
            "task": "classification",
            "split": "val",
            "monitor": "val/acc",
            "headline": "val/acc",
            "metrics": {"val/acc": accuracy, "val/f1_macro": accuracy - 0.1},
            "trainable_params": trainable,
            "total_params": 400_000,
            "images_per_s": 100.0 + seed,
            "peak_rss_mb": 900.0,
            "cuda_peak_mb": None,
            "startup_s": 0.0,
            "fit_s": 0.01,
            "run_folder": str(fit_json.parent / "cvft" / "version_0"),
            "best_checkpoint": None,
        }
    )
)
