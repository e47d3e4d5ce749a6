"""Inference, shared by the bundles' evaluate / inference configs and by model serving.

The input side (readers for every supported format, grey to RGB) and the output side (probabilities,
inverted back to each image's own size, thresholded) are written once here; the configs and
:mod:`masksup_med.serving.model` call the same functions. Also: list the images of a folder, write overlays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import stat
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Activationsd, AsDiscreted, CopyItemsd, Invertd, MapTransform, Transform
from PIL import Image

from masksup_med.data.errors import DatasetError, DatasetNotFoundError, UnreadableFileError
from masksup_med.data.formats import SUPPORTED_SUFFIXES, file_stem, file_suffix, mask_suffix_for
from masksup_med.data.limits import ImageRejected, InputLimits, file_header
from masksup_med.data.readers import AnyImageReader, read_array
from masksup_med.errors import OutputDirError

__all__ = [
    "FlipInferer",
    "OutputRefusedError",
    "OverlayHandler",
    "PlaceOutputd",
    "PredictionFiles",
    "image_readers",
    "list_images",
    "native_mask_postprocessing",
    "output_conflict",
    "overlay",
    "place_output",
    "segmentation_inferer",
    "write_output",
]

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


class FlipInferer(Inferer):
    """Test-time flip augmentation: the network's output averaged over flipped copies of the input.

    Each copy is flipped, run through the network, and its output flipped back before averaging, so the
    outputs line up with the input. The default copies are the input itself, its horizontal flip and its
    vertical flip. In MONAI's 2D axes (``N, C, W, H``) spatial axis 0 is the width (a horizontal flip) and
    axis 1 the height (a vertical flip). The logits are averaged (the postprocessing's sigmoid comes after),
    so the result is what the evaluator, the inference config and serving threshold as usual.

    Args:
        flips: one entry per copy, each the spatial axes it is flipped along (``()``: the input as it is).
    """

    def __init__(self, flips: Sequence[Sequence[int]] = ((), (0,), (1,))) -> None:
        super().__init__()
        if not flips:
            raise ValueError("FlipInferer needs at least one flip (() is the input as it is)")
        self.flips = [tuple(int(a) for a in axes) for axes in flips]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """The mean over ``flips`` of ``network(flipped inputs)`` flipped back; extra arguments go to ``network``."""
        total = None
        for axes in self.flips:
            dims = [2 + a for a in axes]  # batch and channel come first
            flipped = torch.flip(inputs, dims) if dims else inputs
            output = network(flipped, *args, **kwargs)
            output = torch.flip(output, dims) if dims else output
            total = output.float() if total is None else total + output.float()
        return total / len(self.flips)


def segmentation_inferer(tta_flips: bool = False) -> Inferer:
    """The inferer of evaluation, inference and serving: :class:`FlipInferer` with ``tta_flips``, else MONAI's
    ``SimpleInferer`` (the network once)."""
    return FlipInferer() if tta_flips else SimpleInferer()


IGNORED = {".ds_store", "thumbs.db"}
MASK_POSTFIX = "mask"
OVERLAY_POSTFIX = "overlay"


class OutputRefusedError(OutputDirError):
    """An output file's name is taken by something this run must not write through or replace (a symbolic link)."""


def _unusable(path: Path) -> str | None:
    """Why the network cannot take the image in ``path`` (unreadable, a volume, odd channels), or None."""
    try:
        array = read_array(path)
    except UnreadableFileError as e:
        return e.reason
    # 16-bit and float images are normalised (the bundle's ``intensity``: NormaliseIntensityd)
    if array.ndim == 3 and array.shape[-1] > 4:
        return f"{array.shape[-1]} channels; grey, RGB or RGBA expected"
    return None


def _candidates(folder: Path) -> list[Path]:
    """The files of ``folder`` with an image suffix (sorted); refused when there are none."""
    if not folder.is_dir():
        raise DatasetNotFoundError(f"input folder {folder} does not exist; pass --input_dir with your images.")
    supported = set(SUPPORTED_SUFFIXES)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and file_suffix(p) in supported and p.name.lower() not in IGNORED and not p.name.startswith(".")
    )
    if not files:
        raise DatasetNotFoundError(
            f"input folder {folder} holds no images with a supported extension ({', '.join(sorted(supported))})."
        )
    return files


def output_conflict(path: str | os.PathLike) -> str | None:
    """Why an output file may not be written at ``path`` (a symbolic link, or not a regular file); None if it may.

    A symbolic link is never followed (that would write wherever it points) nor replaced: it is left as it is.
    """
    path = Path(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return (
            f"{path} is a symbolic link (to {os.readlink(path)}); it was left as it is, nothing written through it. "
            "Remove the link or choose another output folder"
        )
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file; it was left as it is. Remove it or choose another output folder"
    return None


def _file_mode() -> int:
    """The permissions a new file gets under this process's umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def place_output(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the finished file ``source`` (in the same folder or file system) to ``path``.

    ``path`` must not be a symbolic link or anything but a regular file (:class:`OutputRefusedError`):
    a link in the output folder is never followed nor replaced. A regular file of that name is replaced
    at once (``os.replace``), so a reader never sees half a file.
    """
    path = Path(path)
    problem = output_conflict(path)
    if problem:
        raise OutputRefusedError(problem)
    os.replace(source, path)
    return path


def write_output(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write`` (which fills the file it is given) without following or replacing a link.

    ``write`` fills a new temporary file beside ``path``, which then takes its place (:func:`place_output`).
    """
    path = Path(path)
    problem = output_conflict(path)
    if problem:
        raise OutputRefusedError(problem)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        os.chmod(name, _file_mode())
        write(Path(name))
        return place_output(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


class PredictionFiles:
    """The files one prediction run reads and writes: the inputs it uses, where each mask goes, which inputs
    it skipped and why, and the summary it ends with (the inference config's ``infer#files``).

    - Every image file of ``input_dir`` is checked from its header against the input limits
      (:class:`~masksup_med.data.limits.InputLimits`) before anything decodes it, then read once
      (unreadable, a volume: skipped).
    - Each input's mask is ``<stem>_mask<output_ext>`` (and ``<stem>_overlay.png``). Two inputs with one
      stem (``same.png``, ``same.jpg``; or names differing only in case, one file on macOS and Windows)
      would write one file: the run is refused before anything is written, naming both.
    - An output name taken by a symbolic link (or anything but a regular file) in ``output_dir`` is left as
      it is: that input is skipped, naming the link. Files are written beside their name and moved into
      place, so a link is never followed.
    - :meth:`finish` logs the summary (masks written, inputs skipped with the reason for each) and fails
      the run (a non-zero exit) when an input was skipped, unless ``skip_bad_inputs``.

    Args:
        input_dir: folder of images.
        output_dir: folder the masks (and overlays) go to; None only lists the inputs.
        output_ext: the masks' suffix (``.png``, ``.nii.gz``), or ``auto``: by the inputs' format
            (:func:`~masksup_med.data.formats.mask_suffix_for`: NIfTI for medical formats, PNG otherwise).
        overlays: whether ``<stem>_overlay.png`` is written too.
        max_pixels: the largest image, width x height from its header (default: ``InputLimits``').
        max_image_bytes: the largest image decoded (default: ``InputLimits``').
        skip_bad_inputs: end with success when inputs were skipped (they are still listed in the summary).
    """

    def __init__(
        self,
        input_dir: str | os.PathLike,
        output_dir: str | os.PathLike | None = None,
        output_ext: str = ".png",
        overlays: bool = False,
        max_pixels: int | None = None,
        max_image_bytes: int | None = None,
        skip_bad_inputs: bool = False,
    ) -> None:
        defaults = InputLimits()
        self.input_dir = Path(input_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.output_ext = output_ext
        self.overlays = bool(overlays)
        self.limits = dataclasses.replace(
            defaults,
            max_pixels=int(max_pixels or defaults.max_pixels),
            max_image_bytes=int(max_image_bytes or defaults.max_image_bytes),
        )
        self.skip_bad_inputs = bool(skip_bad_inputs)
        self.skipped: dict[str, str] = {}  # input file name: why it has no mask
        self.written: list[Path] = []
        self.listed = 0
        self._items: list[dict] | None = None
        self._mask_ext = output_ext
        self._staging: Path | None = None

    # ------------------------------------------------------------------------------ inputs
    def mask_name(self, image: str | os.PathLike) -> str:
        """The file name of the mask of ``image``: ``<stem>_mask<output_ext>``."""
        return f"{file_stem(image)}_{MASK_POSTFIX}{self._mask_ext}"

    @property
    def mask_ext(self) -> str:
        """The masks' suffix: ``output_ext``, or the one ``auto`` picks for the inputs (they are scanned first)."""
        self.items
        return self._mask_ext

    def output_names(self, image: str | os.PathLike) -> list[str]:
        """The names this run writes for ``image`` in ``output_dir``."""
        names = [self.mask_name(image)]
        if self.overlays:
            names.append(f"{file_stem(image)}_{OVERLAY_POSTFIX}.png")
        return names

    @property
    def items(self) -> list[dict]:
        """``[{"image": path}, …]`` of the inputs this run uses (the folder is scanned on first use)."""
        if self._items is None:
            self._items = self._scan()
        return self._items

    def _why_not(self, path: Path) -> str | None:
        try:
            file_header(path).check_size(self.limits)
        except ImageRejected as e:
            return e.naming_option()
        except OSError as e:
            return f"cannot be opened ({e.strerror or type(e).__name__})"
        return _unusable(path)

    def _refuse_collisions(self, usable: list[Path]) -> None:
        by_name: dict[str, list[Path]] = {}
        for path in usable:
            by_name.setdefault(self.mask_name(path).casefold(), []).append(path)
        clashes = [paths for paths in by_name.values() if len(paths) > 1]
        if not clashes:
            return
        where = f" in {self.output_dir}" if self.output_dir is not None else ""
        listed = "\n".join(
            f"  {' and '.join(p.name for p in paths)} would {'both' if len(paths) == 2 else 'all'} be written as "
            f"{' / '.join(sorted({self.mask_name(p) for p in paths}))}"
            for paths in clashes
        )
        raise DatasetError(
            f"input folder {self.input_dir} holds images whose masks would have one name{where}; "
            f"nothing was written:\n{listed}\n"
            "Each mask is named after its image without the suffix (names differing only in case are one file "
            "on macOS and Windows): rename or move one of each."
        )

    def _scan(self) -> list[dict]:
        files = _candidates(self.input_dir)
        self.listed = len(files)
        for path in files:
            why = self._why_not(path)
            if why is not None:
                self.skipped[path.name] = why
        usable = [p for p in files if p.name not in self.skipped]
        if self.output_ext == "auto":
            self._mask_ext = mask_suffix_for(usable)
        self._refuse_collisions(usable)
        if self.output_dir is not None:
            for path in usable:
                problems = [output_conflict(self.output_dir / name) for name in self.output_names(path)]
                problems = [p for p in problems if p]
                if problems:
                    self.skipped[path.name] = f"its output {problems[0]}"
        if self.skipped:
            logger.warning(
                f"skipping {len(self.skipped)} of {len(files)} files in {self.input_dir} that cannot be used:\n"
                + "\n".join(f"  {name}: {why}" for name, why in self.skipped.items())
            )
        kept = [p for p in files if p.name not in self.skipped]
        if not kept:
            raise DatasetNotFoundError(
                f"input folder {self.input_dir} holds no usable image: every file was skipped:\n"
                + "\n".join(f"  {name}: {why}" for name, why in self.skipped.items())
            )
        return [{"image": str(p)} for p in kept]

    # ------------------------------------------------------------------------------ outputs
    @property
    def staging_dir(self) -> str:
        """A private folder inside ``output_dir`` that the writer fills; each file then moves into place."""
        if self.output_dir is None:
            raise ValueError("PredictionFiles without an output_dir writes nothing")
        if self._staging is None:
            self.items  # the inputs are checked (and a name clash refused) before anything is made
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=".masksup-writing-", dir=self.output_dir))
            weakref.finalize(self, shutil.rmtree, self._staging, True)
        return str(self._staging)

    def skip(self, image: str | os.PathLike, reason: str) -> None:
        """Count ``image`` as skipped, for ``reason``."""
        self.skipped[Path(image).name] = reason
        logger.warning(f"{Path(image).name}: skipped: {reason}")

    def place(self, staged: str | os.PathLike, image: str | os.PathLike) -> Path | None:
        """Move the mask of ``image`` written at ``staged`` to its name in ``output_dir``; None if refused."""
        staged = Path(staged)
        try:
            path = place_output(staged, Path(self.output_dir) / staged.name)
        except OutputRefusedError as e:
            staged.unlink(missing_ok=True)
            self.skip(image, f"its output {e}")
            return None
        self.written.append(path)
        return path

    def summary(self) -> str:
        """What the run wrote and skipped, one line per skipped input."""
        where = f" to {self.output_dir}" if self.output_dir is not None else ""
        head = f"prediction: {len(self.written)} mask(s) written{where}"
        if not self.skipped:
            return f"{head}; no input skipped"
        return f"{head}; {len(self.skipped)} of {self.listed} input(s) skipped:\n" + "\n".join(
            f"  {name}: {why}" for name, why in self.skipped.items()
        )

    def finish(self) -> int:
        """Log the summary last; fail (:class:`DatasetError`) when an input was skipped, unless ``skip_bad_inputs``.

        Returns the number of masks written.
        """
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        summary = self.summary()
        if self.skipped and not self.skip_bad_inputs:
            raise DatasetError(
                f"{summary}\nFix or remove the skipped inputs and run again, or pass --skip-bad-inputs "
                "(bundle override: --skip_bad_inputs true) to accept a run that skips them."
            )
        (logger.warning if self.skipped else logger.info)(summary)
        return len(self.written)


class PlaceOutputd(MapTransform):
    """Move each file ``SaveImaged`` wrote into :attr:`PredictionFiles.staging_dir` to its name in the output folder
    (:meth:`PredictionFiles.place`: never through a symbolic link). The writer needs ``savepath_in_metadict=True``.

    Args:
        keys: the items the writer saved (their metadata's ``saved_to``).
        files: the run's :class:`PredictionFiles`.
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(self, keys: KeysCollection, files: PredictionFiles, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.files = files

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            meta = d[key].meta
            self.files.place(meta["saved_to"], meta["filename_or_obj"])
        return d


def list_images(input_dir: str | os.PathLike, limits: InputLimits | None = None) -> list[dict]:
    """``[{"image": path}, …]`` for every usable image in ``input_dir`` (sorted).

    Each file's header is checked against ``limits`` (default :class:`InputLimits`), then it is read once:
    files the network cannot take (over the limits, unreadable, a volume) are skipped and listed in a
    warning; grey and RGBA images are kept (:class:`~masksup_med.transforms.EnsureRGB` makes them RGB).
    A folder with no usable image is refused, and so are two images whose masks would have one name.
    """
    limits = limits or InputLimits()
    return PredictionFiles(input_dir, max_pixels=limits.max_pixels, max_image_bytes=limits.max_image_bytes).items


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
    Written beside its name and moved into place (:func:`write_output`): a symbolic link of that name is
    left as it is, and the input counts as skipped.

    Args:
        output_dir: folder the overlays are written to (made when missing).
        enabled: False attaches nothing (``--save_overlays false``).
        files: the run's :class:`PredictionFiles`, told about an overlay that could not be written (None: a warning).
    """

    def __init__(
        self, output_dir: str | os.PathLike, enabled: bool = True, files: PredictionFiles | None = None
    ) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.files = files

    def attach(self, engine: Engine) -> None:
        """Write overlays after every iteration."""
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for item, out in zip(engine.state.batch, engine.state.output):
            image = np.transpose(torch.as_tensor(item["image_native"]).cpu().numpy(), (2, 1, 0))  # C,W,H -> H,W,C
            mask = torch.as_tensor(out["pred_native"]).cpu().numpy()[0].T > 0.5  # W,H -> H,W
            picture = Image.fromarray(overlay(image[..., 0] if image.shape[-1] == 1 else image, mask))
            source = Path(str(item["image_native"].meta["filename_or_obj"]))
            try:
                name = f"{file_stem(source)}_{OVERLAY_POSTFIX}.png"
                write_output(self.output_dir / name, lambda part: picture.save(part, "PNG"))
            except OutputRefusedError as e:
                if self.files is None:
                    logger.warning(f"{source.name}: overlay not written: {e}")
                else:
                    self.files.skip(source, f"its mask was written, its overlay not: {e}")
