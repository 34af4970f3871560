"""Medical imaging data: DICOM / NIfTI / 16-bit readers, CT windows, MedMNIST files, datasets and data modules.

Readers return ``float32`` ``H x W x C`` arrays in ``[0, 1]``; :func:`read_medical_image` dispatches on the file's
format. pydicom and nibabel are optional: ``pip install "cvft[medical]"``.
"""

from cvft.data.medical.augment import MEDICAL_AUGMENT_PRESETS, build_medical_transforms
from cvft.data.medical.datamodule import SAMPLERS, MedicalImageDataModule
from cvft.data.medical.dataset import MedicalArrayDataset, MedicalImageDataset, fit_channels
from cvft.data.medical.dicom import dicom_frame_count, is_dicom_file, read_dicom
from cvft.data.medical.labels import MedicalRecord, read_medical_csv
from cvft.data.medical.medmnist import MEDMNIST_TASKS, MedMNISTTask, load_medmnist_npz, medmnist_path, medmnist_task
from cvft.data.medical.nifti import is_nifti_file, nifti_slices, read_nifti_slice, read_nifti_volume
from cvft.data.medical.patient_split import check_no_patient_leak, patient_split
from cvft.data.medical.raster import read_raster, read_raster_values
from cvft.data.medical.read import MEDICAL_SUFFIXES, is_medical_image_file, medical_image_format, read_medical_image
from cvft.data.medical.windowing import WINDOW_PRESETS, apply_window, resolve_window, scale_min_max

__all__ = [
    "MEDICAL_AUGMENT_PRESETS",
    "SAMPLERS",
    "MedicalArrayDataset",
    "MedicalImageDataModule",
    "MedicalImageDataset",
    "MedicalRecord",
    "build_medical_transforms",
    "check_no_patient_leak",
    "fit_channels",
    "patient_split",
    "read_medical_csv",
    "MEDICAL_SUFFIXES",
    "MEDMNIST_TASKS",
    "MedMNISTTask",
    "WINDOW_PRESETS",
    "apply_window",
    "dicom_frame_count",
    "is_dicom_file",
    "is_medical_image_file",
    "is_nifti_file",
    "load_medmnist_npz",
    "medical_image_format",
    "medmnist_path",
    "medmnist_task",
    "nifti_slices",
    "read_dicom",
    "read_medical_image",
    "read_nifti_slice",
    "read_nifti_volume",
    "read_raster",
    "read_raster_values",
    "resolve_window",
    "scale_min_max",
]
