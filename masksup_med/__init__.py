"""masksup-med: masked supervised learning (MaskSup) for medical image segmentation on MONAI."""

__version__ = "0.1.0"
