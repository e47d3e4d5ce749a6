"""Random masking as MONAI transforms: array versions, dictionary (``…d``) versions, batch masking."""

from masksup_med.transforms.bank import RandMaskBank, RandMaskBankd
from masksup_med.transforms.base import RandMask, RandMaskd
from masksup_med.transforms.channels import EnsureRGB, EnsureRGBd
from masksup_med.transforms.cutmix import RandCutMix
from masksup_med.transforms.free_form import RandFreeFormMask, RandFreeFormMaskd
from masksup_med.transforms.intensity import NormaliseIntensity, NormaliseIntensityd
from masksup_med.transforms.label import ForegroundMask, ForegroundMaskd
from masksup_med.transforms.patch import RandPatchMask, RandPatchMaskd

__all__ = [
    "EnsureRGB",
    "EnsureRGBd",
    "ForegroundMask",
    "ForegroundMaskd",
    "NormaliseIntensity",
    "NormaliseIntensityd",
    "RandCutMix",
    "RandFreeFormMask",
    "RandFreeFormMaskd",
    "RandMask",
    "RandMaskBank",
    "RandMaskBankd",
    "RandMaskd",
    "RandPatchMask",
    "RandPatchMaskd",
]
