"""Inference, shared by the bundles' evaluate / inference configs and by model serving.

The input side (readers for every supported format, grey to RGB) and the output side (probabilities,
inverted back to each image's own size, thresholded) are written once here; the configs and
:mod:`masksup_med.serving.model` call the same functions. Also: list the images of a folder, write overlays.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Activationsd, AsDiscreted, CopyItemsd, Invertd, Transform
from PIL import Image

from masksup_med.data.errors import DatasetNotFoundError, UnreadableFileError
from masksup_med.data.formats import SUPPORTED_SUFFIXES, file_suffix
from masksup_med.data.readers import AnyImageReader, read_array

__all__ = ["OverlayHandler", "image_readers", "list_images", "native_mask_postprocessing", "overlay"]

logger = logging.getLogger(__name__)


def image_readers() -> AnyImageReader:
    """``reader`` argument of ``LoadImaged`` for any supported image file (TIFF or a Pillow format)."""
    return AnyImageReader()


def native_mask_postprocessing(preprocessing: Transform, threshold: float = 0.5) -> list[Transform]:
    """Logits ``pred`` -> probabilities -> ``pred_native`` at the input's own size -> both thresholded.

    ``preprocessing`` is the (invertible) transform that made the network's input from ``image``;
    ``pred_native`` is ``pred`` inverted through it (bilinear on probabilities, then thresholded), so
    it lines up with the file that was read. Used by evaluation, inference and serving alike.
    """
    return [
        Activationsd(keys="pred", sigmoid=True),
        CopyItemsd(keys="pred", names="pred_native"),
        Invertd(keys="pred_native", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys=["pred", "pred_native"], threshold=threshold),
    ]


IGNORED = {".ds_store", "thumbs.db"}


def _unusable(path: Path) -> str | None:
    """Why the network cannot take the image in ``path`` (unreadable, not 8-bit, odd channels), or None."""
    try:
        array = read_array(path)
    except UnreadableFileError as e:
        return e.reason
    # 16-bit and float images are normalised (the bundle's ``intensity``: NormaliseIntensityd)
    if array.ndim == 3 and array.shape[-1] > 4:
        return f"{array.shape[-1]} channels; grey, RGB or RGBA expected"
    return None


def list_images(input_dir: str | os.PathLike) -> list[dict]:
    """``[{"image": path}, …]`` for every usable image in ``input_dir`` (sorted).

    Each file is read once first: files the network cannot take (unreadable, a volume) are skipped
    and listed in a warning; grey and RGBA images are kept (:class:`~masksup_med.transforms.EnsureRGB`
    makes them RGB). A folder with no usable image is refused.
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"input folder {folder} does not exist; pass --input_dir with your images.")
    supported = set(SUPPORTED_SUFFIXES)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and file_suffix(p) in SUPPORTED_SUFFIXES
        and p.name.lower() not in IGNORED
        and not p.name.startswith(".")
    )
    if not files:
        raise DatasetNotFoundError(
            f"input folder {folder} holds no images with a supported extension ({', '.join(sorted(supported))})."
        )
    skipped = {p: why for p in files if (why := _unusable(p)) is not None}
    if skipped:
        logger.warning(
            f"skipping {len(skipped)} of {len(files)} files in {folder} that cannot be used:\n"
            + "\n".join(f"  {p.name}: {why}" for p, why in skipped.items())
        )
    usable = [p for p in files if p not in skipped]
    if not usable:
        raise DatasetNotFoundError(
            f"input folder {folder} holds no usable image: every file was skipped (listed above)."
        )
    return [{"image": str(p)} for p in usable]


def overlay(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 80), alpha: float = 0.45
) -> np.ndarray:
    """``H, W, 3`` uint8 image with ``mask`` (``H, W`` bool) tinted in ``color`` and its outline drawn."""
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    rgb = rgb.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * tint
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    rgb[mask & ~inner] = tint
    return rgb.clip(0, 255).astype(np.uint8)


class OverlayHandler:
    """Evaluator handler writing ``<stem>_overlay.png``: the input image with the predicted mask tinted.

    Reads ``image_native`` (the loaded image, before scaling and resizing) from the batch and
    ``pred_native`` (the mask at the image's own size) from the output; both use MONAI's PIL axes.

    Args:
        output_dir: folder the overlays are written to (made when missing).
        enabled: False attaches nothing (``--save_overlays false``).
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        """Write overlays after every iteration."""
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for item, out in zip(engine.state.batch, engine.state.output):
            image = np.transpose(torch.as_tensor(item["image_native"]).cpu().numpy(), (2, 1, 0))  # C,W,H -> H,W,C
            mask = torch.as_tensor(out["pred_native"]).cpu().numpy()[0].T > 0.5  # W,H -> H,W
            picture = overlay(image[..., 0] if image.shape[-1] == 1 else image, mask)
            stem = Path(str(item["image_native"].meta["filename_or_obj"])).stem
            Image.fromarray(picture).save(self.output_dir / f"{stem}_overlay.png")
