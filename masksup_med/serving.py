"""Serve a registered segmentation model over REST: images in, masks out.

The registered model (``mlflow.pytorch``, tensor in, logits out) knows nothing about image files.
:class:`MaskSupSegmenter` is an MLflow ``PythonModel`` that wraps it with the bundle's own
preprocessing, so that MLflow's scoring server (``/ping``, ``/invocations``) takes image files and
answers with masks:

- input: a table with one column ``image``: each cell one image file (PNG, JPEG, BMP or TIFF),
  base64-encoded. Any of the scoring server's JSON layouts works, e.g.
  ``{"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo…"]]}}`` or
  ``{"dataframe_records": [{"image": "iVBORw0KGgo…"}]}``.
- output: one row per image: ``mask`` (a base64 PNG, 8-bit, 0 = background, 255 = foreground, at
  the input image's own size), ``width``, ``height`` and ``foreground_fraction``. The server wraps
  them as ``{"predictions": [{"mask": …, "width": …, "height": …, "foreground_fraction": …}]}``.

Each image goes through the same code as the bundle's inference config: read with the project's
readers (so TIFFs work), channel first, grey to RGB (:class:`~masksup_med.transforms.EnsureRGB`), the
config's ``resizing`` transforms (intensity 0..255 to 0..1, resize to the model's training size),
the network, then :func:`masksup_med.inference.native_mask_postprocessing` (sigmoid, ``Invertd``
back to the image's size, threshold). The training size is read from the registered
model's signature (``(-1, C, W, H)``: MONAI's axes, the bundle's ``image_size`` order, width first),
so a model trained at 128 x 128 is run at 128 x 128.

:func:`build_serving_model` writes such a pyfunc model into a folder; ``masksup-med serve`` does that
in a temporary folder and starts ``mlflow models serve --env-manager local`` on it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

__all__ = [
    "MaskSupSegmenter",
    "build_serving_model",
    "decode_image",
    "encode_mask",
    "model_input_size",
    "sniff_suffix",
]

# what the scoring server's input and output columns are called
IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("mask", "width", "height", "foreground_fraction")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
    outputs=Schema([ColSpec("string", "mask"), ColSpec("long", "width"), ColSpec("long", "height"),
                    ColSpec("double", "foreground_fraction")]),
)

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"II+\x00", ".tif"),  # BigTIFF
    (b"MM\x00+", ".tif"),
)


def sniff_suffix(data: bytes) -> str:
    """The file suffix of an encoded image from its first bytes (PNG, JPEG, BMP, TIFF)."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    raise ValueError(
        f"not a PNG, JPEG, BMP or TIFF file (starts with {data[:8]!r}); send the image file's bytes, base64-encoded"
    )


def decode_image(encoded: str | bytes) -> np.ndarray:
    """Decode one base64-encoded image file into a channel-first array in MONAI's axes (``C, W, H``).

    The bytes are written to a temporary file and read with :func:`masksup_med.data.readers.read_array`,
    the same readers the bundles use. Grey images are repeated to three channels and an alpha channel
    is dropped, so any of them fits an RGB network.
    """
    from masksup_med.data.readers import read_array
    from masksup_med.transforms.channels import EnsureRGB

    if isinstance(encoded, str):
        encoded = encoded.encode("ascii", errors="strict")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"column {IMAGE_COLUMN!r} must hold base64-encoded image files: {e}") from e
    suffix = sniff_suffix(data)
    with tempfile.TemporaryDirectory(prefix="masksup-serve-") as tmp:
        path = Path(tmp) / f"image{suffix}"
        path.write_bytes(data)
        array = read_array(path)  # W, H[, C]
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return np.ascontiguousarray(EnsureRGB()(array))


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
            raise ValueError(f"input has no column {IMAGE_COLUMN!r} (columns: {list(model_input.columns)})")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, dict):
        if IMAGE_COLUMN not in model_input:
            raise ValueError(f"input has no key {IMAGE_COLUMN!r} (keys: {list(model_input)})")
        values = model_input[IMAGE_COLUMN]
        return list(values) if isinstance(values, (list, tuple, np.ndarray, pd.Series)) else [values]
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        return [v[IMAGE_COLUMN] if isinstance(v, dict) else v for v in model_input]
    raise TypeError(f"unsupported input type {type(model_input).__name__}; send a table with column {IMAGE_COLUMN!r}")


class MaskSupSegmenter(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: base64 image files in, base64 PNG masks at each image's size out.

    Artifacts: ``network`` (a folder holding the registered ``mlflow.pytorch`` model) and
    ``bundle_config`` (the bundle's ``train.json``, whose ``resizing`` transforms are reused).
    Model config: ``image_size`` (``[W, H]`` the network was trained at, as the bundle's), ``threshold`` (0.5) and
    ``device`` (``auto``: CUDA when available).
    """

    def load_context(self, context) -> None:
        import torch
        from monai.bundle import ConfigParser
        from monai.transforms import Compose

        from masksup_med.inference import native_mask_postprocessing
        from masksup_med.runtime import select_device

        config = dict(context.model_config or {})
        self.threshold = float(config.get("threshold", 0.5))
        self.device = select_device(config.get("device", "auto"))
        parser = ConfigParser()
        parser.read_config(context.artifacts["bundle_config"])
        if config.get("image_size"):
            parser["image_size"] = [int(s) for s in config["image_size"]]
        self.preprocessing = Compose(parser.get_parsed_content("resizing"))
        self.postprocessing = Compose(native_mask_postprocessing(self.preprocessing, self.threshold))
        self.network = mlflow.pytorch.load_model(context.artifacts["network"], map_location=self.device)
        self.network = self.network.to(self.device).eval()
        self._torch = torch

    def _segment(self, encoded: str | bytes) -> dict[str, Any]:
        from monai.data import MetaTensor

        torch = self._torch
        image = MetaTensor(torch.as_tensor(decode_image(encoded)))
        item = self.preprocessing({"image": image})
        with torch.no_grad():
            logits = self.network(item["image"].as_tensor()[None].to(self.device, torch.float32))
        item["pred"] = MetaTensor(logits[0].float().cpu())
        native = self.postprocessing(item)["pred_native"]
        mask = torch.as_tensor(native)[0].numpy().T > 0.5  # thresholded already; W, H -> H, W
        height, width = mask.shape
        return {"mask": encode_mask(mask), "width": int(width), "height": int(height),
                "foreground_fraction": float(mask.mean())}

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """One row per input image: ``mask`` (base64 PNG), ``width``, ``height``, ``foreground_fraction``."""
        rows = [self._segment(value) for value in _column(model_input)]
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


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


def build_serving_model(
    model_uri: str,
    bundle_config: str | os.PathLike,
    path: str | os.PathLike,
    device: str = "auto",
    threshold: float = 0.5,
    tracking_uri: str | None = None,
) -> Path:
    """Write a pyfunc model serving ``model_uri`` (e.g. ``models:/masksup-glas@candidate``) into ``path``.

    The registered model is downloaded into the pyfunc's artifacts (the served folder needs no
    tracking server afterwards). Returns ``path``.
    """
    from masksup_med import __version__
    from masksup_med.tracking import using_store

    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix="masksup-serve-stage-"))
    try:
        with using_store(tracking_uri):
            network_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                                   dst_path=str(staging / "network")))
        config = Path(shutil.copy(bundle_config, staging / "train.json"))  # a bundle config is self-contained
        image_size = model_input_size(str(network_dir))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=MaskSupSegmenter(),
            artifacts={"network": str(network_dir), "bundle_config": str(config)},
            model_config={"image_size": image_size, "threshold": threshold, "device": device},
            signature=SIGNATURE,
            pip_requirements=[f"masksup-med=={__version__}"],  # served with --env-manager local: nothing installed
            metadata={"source_model": model_uri},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def serve_command(model_dir: str | os.PathLike, host: str, port: int, workers: int = 1,
                  timeout: int | None = None) -> list[str]:
    """The ``mlflow models serve`` command (MLflow's scoring server) for a pyfunc folder, in this Python."""
    import sys

    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
           "--host", host, "--port", str(port), "--workers", str(workers)]
    if timeout:
        cmd += ["--timeout", str(timeout)]
    return cmd


def segment_files(model_dir: str | os.PathLike, files: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Run a pyfunc folder written by :func:`build_serving_model` on image files (for scripts and tests)."""
    model = mlflow.pyfunc.load_model(str(model_dir))
    encoded = [base64.b64encode(Path(f).read_bytes()).decode("ascii") for f in files]
    return model.predict(pd.DataFrame({IMAGE_COLUMN: encoded}))
