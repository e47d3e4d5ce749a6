"""Serve a registered segmentation model over REST: images in, masks out.

The registered model (:mod:`masksup_med.tracking.model_format`: tensor in, logits out) knows nothing about
image files. :func:`build_serving_model` writes an MLflow pyfunc model whose loader is this module
(:func:`_load_pyfunc`, :class:`MaskSupSegmenter`): it wraps the registered network with the bundle's
own preprocessing, so that MLflow's scoring server (``/ping``, ``/invocations``) takes image files and
answers with masks:

- input: a table with one column ``image``: each cell one image file (PNG, JPEG, BMP, TIFF, or a 2D
  NIfTI-1 ``.nii`` / ``.nii.gz`` or single-frame DICOM), base64-encoded. Any of the scoring server's
  JSON layouts works, e.g.
  ``{"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo…"]]}}`` or
  ``{"dataframe_records": [{"image": "iVBORw0KGgo…"}]}``.
- output: one row per image: ``mask`` (a base64 PNG, 8-bit, 0 = background, 255 = foreground, at
  the input image's own size), ``width``, ``height`` and ``foreground_fraction``. The server wraps
  them as ``{"predictions": [{"mask": …, "width": …, "height": …, "foreground_fraction": …}]}``.
  For a NIfTI or DICOM image the PNG's columns are its first voxel axis (i), its rows the second (j),
  as the readers lay it out; the affine is not returned.

Each image's header is checked against the serving limits (:mod:`masksup_med.serving.limits`)
before it is decoded, then it goes through the same code as the bundle's inference config: read
with the project's readers (so TIFFs work), channel first, grey to RGB
(:class:`~masksup_med.transforms.EnsureRGB`), the config's ``resizing`` transforms (intensity 0..255
to 0..1, resize to the model's training size), the network, then
:func:`masksup_med.inference.native_mask_postprocessing` (sigmoid, ``Invertd`` back to the image's
size, threshold). The training size is the registered model's input shape (``C, W, H``: MONAI's axes, the bundle's
``image_size`` order, width first), so a model trained at 128 x 128 is run at 128 x 128.

The served folder holds no pickle: ``MLmodel`` names this module as the loader, ``data/`` holds the
registered model's files (weights and network definition, read by
:func:`masksup_med.tracking.model_format.load_model`) and the local bundle's ``train.json``.
``masksup-med serve`` writes it in a temporary folder and runs :mod:`masksup_med.serving.app` on it.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from masksup_med.serving.limits import ImageRejected, InputLimits, RequestRejected, image_header, sniff_suffix

__all__ = [
    "MaskSupSegmenter",
    "build_serving_model",
    "decode_image",
    "encode_mask",
    "model_input_size",
    "segment_files",
    "sniff_suffix",
]

logger = logging.getLogger(__name__)

# what the scoring server's input and output columns are called
IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("mask", "width", "height", "foreground_fraction")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec("string", "mask"),
            ColSpec("long", "width"),
            ColSpec("long", "height"),
            ColSpec("double", "foreground_fraction"),
        ]
    ),
)
NETWORK_DIR = "network"  # the registered model's files, in the pyfunc's data folder
BUNDLE_CONFIG = "train.json"


def _image_bytes(encoded: str | bytes) -> bytes:
    """The file bytes of one base64-encoded cell."""
    try:
        if isinstance(encoded, str):
            encoded = encoded.encode("ascii", errors="strict")
        if not isinstance(encoded, bytes):
            raise TypeError(f"got {type(encoded).__name__}")
        return base64.b64decode(encoded, validate=True)
    except (UnicodeEncodeError, binascii.Error, TypeError, ValueError):
        raise RequestRejected(
            f"column {IMAGE_COLUMN!r} must hold base64-encoded image files (standard alphabet, padded, no line breaks)"
        ) from None


def decode_image(
    encoded: str | bytes, limits: InputLimits | None = None, intensity: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Decode one base64-encoded image file into a channel-first array in MONAI's axes (``C, W, H``).

    The header is checked against ``limits`` first (:class:`RequestRejected`, 413, when over). The
    bytes are then read with :func:`masksup_med.data.readers.read_array`, the readers the bundles
    use. Grey images are repeated to three channels and an alpha channel is dropped, so any of them
    fits an RGB network. A file that does not decode raises :class:`RequestRejected` (400). Images that
    are not 8-bit (NIfTI, DICOM: CT, MR) are mapped to 0..255 as the bundle's ``intensity`` says
    (:class:`~masksup_med.transforms.NormaliseIntensity`; percentiles 0.5..99.5 when None).
    """
    from masksup_med.data.errors import UnreadableFileError
    from masksup_med.data.readers import read_array
    from masksup_med.transforms.channels import EnsureRGB

    data = _image_bytes(encoded)
    try:
        header = image_header(data).check(limits or InputLimits())
    except ImageRejected as e:
        raise RequestRejected.from_image(e) from None
    with tempfile.TemporaryDirectory(prefix="masksup-serve-") as tmp:
        path = Path(tmp) / f"image{header.suffix}"
        path.write_bytes(data)
        try:
            array = read_array(path)  # W, H[, C]
        except UnreadableFileError as e:
            reason = e.reason.replace(str(path), "image")
            raise RequestRejected(f"the image does not decode: {reason[:300]}") from None
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    array = _normalised(array, intensity)
    try:
        return np.ascontiguousarray(EnsureRGB()(array))
    except ValueError as e:
        raise RequestRejected(str(e)) from None


def _normalised(array: np.ndarray, intensity: Mapping[str, Any] | None) -> np.ndarray:
    """``array`` (channel first) mapped to 0..255 when it is not 8-bit (see :func:`decode_image`)."""
    from masksup_med.transforms.intensity import NormaliseIntensity

    return NormaliseIntensity(intensity)(array, source_dtype=array.dtype.name)


def encode_mask(mask: np.ndarray) -> str:
    """Base64 PNG of a boolean ``H, W`` mask, 8-bit, 0 / 255."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _column(model_input: Any) -> list:
    """The ``image`` column of whatever the scoring server or a caller hands ``predict``."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise RequestRejected(f"input has no column {IMAGE_COLUMN!r} ({len(model_input.columns)} other columns)")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, dict):
        if IMAGE_COLUMN not in model_input:
            raise RequestRejected(f"input has no key {IMAGE_COLUMN!r} ({len(model_input)} other keys)")
        values = model_input[IMAGE_COLUMN]
        return list(values) if isinstance(values, (list, tuple, np.ndarray, pd.Series)) else [values]
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        return [v[IMAGE_COLUMN] if isinstance(v, dict) else v for v in model_input]
    raise RequestRejected(
        f"unsupported input type {type(model_input).__name__}; send a table with column {IMAGE_COLUMN!r}"
    )


class MaskSupSegmenter:
    """Base64 image files in, base64 PNG masks at each image's size out (the served pyfunc model).

    Args:
        data_path: the pyfunc's data folder: ``network/`` (the registered model's files) and
            ``train.json`` (the bundle config whose ``resizing`` transforms are reused).
        config: ``image_size`` (``[W, H]`` the network was trained at, as the bundle's), ``threshold`` (0.5),
            ``device`` (``auto``: CUDA when available), ``tta_flips`` (average over flipped copies:
            :class:`~masksup_med.inference.FlipInferer`) and the :class:`InputLimits` values.
    """

    def __init__(self, data_path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> None:
        import torch
        from monai.bundle import ConfigParser
        from monai.transforms import Compose

        from masksup_med.inference import native_mask_postprocessing, segmentation_inferer
        from masksup_med.run.runtime import select_device
        from masksup_med.tracking.model_format import load_model

        config = dict(config or {})
        data_path = Path(data_path)
        self.limits = InputLimits.from_config(config)
        self.threshold = float(config.get("threshold", 0.5))
        self.device = select_device(config.get("device", "auto"))
        parser = ConfigParser()
        parser.read_config(str(data_path / BUNDLE_CONFIG))  # the local bundle's config, copied by build_serving_model
        if config.get("image_size"):
            parser["image_size"] = [int(s) for s in config["image_size"]]
        self.preprocessing = Compose(parser.get_parsed_content("resizing"))
        self.intensity = parser.get("intensity")  # None in a bundle config written before it had one
        self.postprocessing = Compose(native_mask_postprocessing(self.preprocessing, self.threshold))
        self.network = load_model(data_path / NETWORK_DIR, self.device)
        self.inferer = segmentation_inferer(bool(config.get("tta_flips", False)))
        self._torch = torch

    def _segment(self, encoded: str | bytes) -> dict[str, Any]:
        from monai.data import MetaTensor

        torch = self._torch
        image = MetaTensor(torch.as_tensor(decode_image(encoded, self.limits, self.intensity)))
        item = self.preprocessing({"image": image})
        with torch.no_grad():
            logits = self.inferer(item["image"].as_tensor()[None].to(self.device, torch.float32), self.network)
        item["pred"] = MetaTensor(logits[0].float().cpu())
        native = self.postprocessing(item)["pred_native"]
        mask = torch.as_tensor(native)[0].numpy().T > 0.5  # thresholded already; W, H -> H, W
        height, width = mask.shape
        return {
            "mask": encode_mask(mask),
            "width": int(width),
            "height": int(height),
            "foreground_fraction": float(mask.mean()),
        }

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """One row per input image: ``mask`` (base64 PNG), ``width``, ``height``, ``foreground_fraction``.

        A bad image raises :class:`RequestRejected` saying which; anything unexpected is logged here with
        its stack trace and answered as an internal error.
        """
        values = _column(model_input)
        if not values:
            raise RequestRejected(f"no images: column {IMAGE_COLUMN!r} is empty")
        if len(values) > self.limits.max_images:
            raise RequestRejected.too_many_images(len(values), self.limits.max_images)
        rows = []
        for index, value in enumerate(values):
            try:
                rows.append(self._segment(value))
            except RequestRejected as e:
                raise e.for_image(index, len(values)) from None
            except Exception:
                logger.exception("segmenting image %d of %d failed", index + 1, len(values))
                raise RequestRejected(
                    f"internal error while segmenting image {index + 1} of {len(values)}; "
                    "the server's log has the details",
                    500,
                ) from None
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> MaskSupSegmenter:
    """MLflow's pyfunc entry point for a folder written by :func:`build_serving_model`."""
    return MaskSupSegmenter(data_path, model_config)


def model_input_size(model_uri: str) -> list[int] | None:
    """``image_size`` (``[W, H]``) from a logged model's tensor signature ``(-1, C, W, H)``; None when it has none."""
    info = mlflow.models.get_model_info(model_uri)
    signature = info.signature
    if signature is None or signature.inputs is None:
        return None
    specs = signature.inputs.inputs
    shape = getattr(specs[0], "shape", None) if specs else None
    if not shape or len(shape) != 4:
        return None
    return [int(shape[2]), int(shape[3])]


def _checkpoint_model(checkpoint: Path, bundle_config: str | os.PathLike, path: Path) -> None:
    """A model folder at ``path`` (the registered-model format) for a checkpoint file of ``bundle_config``'s
    network (a training run's ``models/model.pt``, or the model a bundle ships, checked against its checksum)."""
    from monai.bundle import ConfigParser

    from masksup_med.tracking.model_format import build_network, network_definition, save_model
    from masksup_med.tracking.registry import load_checkpoint

    definition = network_definition(bundle_config)
    network = load_checkpoint(build_network(definition, str(bundle_config)), checkpoint)
    parser = ConfigParser()
    parser.read_config(str(bundle_config))
    save_model(
        path,
        state_dict=network.state_dict(),
        network=definition,
        input_shape=[int(network.in_channels), *(int(s) for s in parser.get_parsed_content("image_size"))],
        bundle=Path(bundle_config).resolve().parent.parent.name,
        threshold=float(parser.get_parsed_content("threshold")) if "threshold" in parser else 0.5,
    )


def build_serving_model(
    model_uri: str,
    bundle_config: str | os.PathLike,
    path: str | os.PathLike,
    device: str = "auto",
    threshold: float | None = None,
    tracking_uri: str | None = None,
    limits: InputLimits | None = None,
    tta_flips: bool = False,
) -> Path:
    """Write a pyfunc model serving ``model_uri`` into ``path``; returns ``path``.

    ``model_uri``: a registered model (``models:/masksup-glas@candidate``), whose files are downloaded into
    the pyfunc's data (the served folder needs no tracking server afterwards), or a checkpoint file of the
    bundle's network (a run's ``models/model.pt``, the model a bundle ships: no store needed), written in
    the same format. Either is checked by loading it once. ``bundle_config`` is the local bundle's
    ``train.json``. ``threshold`` None: the registered model's (a checkpoint's: the bundle's).
    ``tta_flips``: average each answer over flipped copies (:class:`~masksup_med.inference.FlipInferer`).
    """
    from masksup_med import __version__
    from masksup_med.tracking.model_format import flavor_config, load_model
    from masksup_med.tracking.store import using_store

    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix="masksup-serve-stage-"))
    try:
        data = staging / "serving"
        data.mkdir()
        if str(model_uri).startswith(("models:/", "runs:/")):
            with using_store(tracking_uri):
                downloaded = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging / "dl"))
            shutil.move(downloaded, data / NETWORK_DIR)
        else:
            _checkpoint_model(Path(model_uri), bundle_config, data / NETWORK_DIR)
        load_model(data / NETWORK_DIR)  # refuse a bad or unsafe model now, not in the server
        shutil.copy(bundle_config, data / BUNDLE_CONFIG)  # a bundle config is self-contained
        registered = flavor_config(data / NETWORK_DIR, model_uri)
        input_shape = registered.get("input_shape") or []
        if threshold is None:
            threshold = float(registered.get("threshold") or 0.5)
        config = {
            "image_size": [int(s) for s in input_shape[1:]] or None,
            "threshold": threshold,
            "device": device,
            "tta_flips": bool(tta_flips),
            **(limits or InputLimits()).as_config(),
        }
        mlflow.pyfunc.save_model(
            path=str(path),
            loader_module=__name__,
            data_path=str(data),
            model_config=config,
            signature=SIGNATURE,
            pip_requirements=[f"masksup-med=={__version__}"],  # served with the local environment: nothing installed
            metadata={"source_model": model_uri},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def segment_files(model_dir: str | os.PathLike, files: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Run a pyfunc folder written by :func:`build_serving_model` on image files (for scripts and tests)."""
    model = mlflow.pyfunc.load_model(str(model_dir))
    encoded = [base64.b64encode(Path(f).read_bytes()).decode("ascii") for f in files]
    return model.predict(pd.DataFrame({IMAGE_COLUMN: encoded}))
