"""Random masking as MONAI transforms: array versions, dictionary (``…d``) versions, batch masking."""

from masksup_med.transforms.base import RandMask, RandMaskd
from masksup_med.transforms.free_form import RandFreeFormMask, RandFreeFormMaskd
from masksup_med.transforms.label import ForegroundMask, ForegroundMaskd
from masksup_med.transforms.patch import RandPatchMask, RandPatchMaskd

__all__ = [
    "ForegroundMask",
    "ForegroundMaskd",
    "RandFreeFormMask",
    "RandFreeFormMaskd",
    "RandMask",
    "RandMaskd",
    "RandPatchMask",
    "RandPatchMaskd",
]
