"""Run the medical example notebooks top to bottom (FAST mode) and check what they write and print.

The kernel is the interpreter running the tests: a kernelspec pointing at ``sys.executable`` is written into a
temporary Jupyter data folder, so no kernel has to be installed (``python -m ipykernel install``) beforehand.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "examples" / "medical"
KERNEL = "cvft-notebook-test"


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    """Execute a notebook of examples/medical in FAST mode; return its executed copy and its output folder."""
    jupyter = tmp_path / "jupyter"
    kernelspec.write_kernel_spec(jupyter / "kernels" / KERNEL, overrides={"display_name": KERNEL})
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("CVFT_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("CVFT_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    def run(name: str):
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(NOTEBOOKS)}}
        )
        client.execute()
        return notebook, tmp_path / "out"

    return run


def printed(notebook) -> str:
    """Everything the notebook's cells printed."""
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), path.name
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: first code cell must be parameters"


@pytest.mark.slow
def test_lora_vs_linear_probe_notebook_writes_results(run_notebook):
    notebook, out = run_notebook("01_lora_vs_linear_probe_medmnist.ipynb")
    with open(out / "01_lora_vs_linear_probe" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    runs = {(row["backbone"], row["method"]) for row in rows}
    assert {("vit_tiny_patch16_224", "lora"), ("vit_tiny_patch16_224", "linear_probe")} <= runs
    if any(row["weights"] == "RANDOM INIT" for row in rows):  # offline: the pretrained CNN comparison runs too
        assert {("tf_efficientnet_lite0", "lora"), ("tf_efficientnet_lite0", "linear_probe")} <= runs
        assert "NO PRETRAINED ViT" in printed(notebook)
    for row in rows:
        auroc = float(row["test_auroc"])
        assert math.isfinite(auroc) and 0.0 <= auroc <= 1.0, row
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert float(row["train_images_per_s"]) > 0
    probe = {row["backbone"]: int(row["trainable_params"]) for row in rows if row["method"] == "linear_probe"}
    lora = {row["backbone"]: int(row["trainable_params"]) for row in rows if row["method"] == "lora"}
    assert all(probe[name] < lora[name] for name in probe), (probe, lora)
    if any(row["real_data"] == "False" for row in rows):
        assert "NO REAL DATA FOUND" in printed(notebook)


@pytest.mark.slow
def test_dicom_nifti_notebook_splits_by_patient_and_refuses_leaks(run_notebook):
    notebook, out = run_notebook("02_dicom_nifti_windowing_and_patient_splits.ipynb")
    text = printed(notebook)
    folder = out / "02_dicom_nifti_patient_splits"
    assert (folder / "ct_windows.png").stat().st_size > 0
    assert (folder / "nifti_views.png").stat().st_size > 0
    assert "No patient is in two splits" in text
    assert "Leaking split refused" in text and "appear in more than one split" in text
    assert " HU" in text and "soft tissue" in text


@pytest.mark.slow
def test_evaluation_notebook_writes_metrics_plots_and_explanations(run_notebook):
    notebook, out = run_notebook("03_evaluation_roc_calibration_explanations.ipynb")
    folder = out / "03_evaluation"
    for name in ("roc_curves.png", "reliability_diagram.png", "confusion_matrix.png"):
        assert (folder / name).stat().st_size > 0, name
    assert len(list((folder / "gradcam").glob("*.png"))) == 4
    assert len(list((folder / "rollout").glob("*.png"))) == 4
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["split"] for row in rows} == {"val (youden)", "test (youden from val)", "test (0.5)"}
    for row in rows:
        assert 0.0 <= float(row["auroc"]) <= 1.0 and 0.0 <= float(row["ece"]) <= 1.0, row
    assert "operating point chosen on validation" in printed(notebook)
