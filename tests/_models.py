"""A tiny untrained network in the registered-model format, for serve and predict tests (no training)."""

from __future__ import annotations

import contextlib
import struct
import zlib
from pathlib import Path

import torch

from masksup_med.tracking.model_format import build_network
from masksup_med.tracking.registry import register_checkpoint

TINY_UNET = {
    "_target_": "UNet",
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 1,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}
TINY_MODEL = "models:/tiny@candidate"


def register_tiny(root: Path) -> str:
    """A SQLite store in ``root`` holding ``tiny`` version 1 (alias candidate, bundle glas, size 32 x 32); its URI."""
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    torch.save({"model": build_network(TINY_UNET).state_dict()}, checkpoint)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with contextlib.chdir(root):  # the artifacts go next to the store
        register_checkpoint(checkpoint, TINY_UNET, "tiny", uri, (3, 32, 32), bundle="glas")
    return uri


def png_bomb(width: int, height: int, depth: int = 1) -> bytes:
    """A valid grey PNG of ``width`` x ``height`` black pixels, ``depth`` bits each (1 or 8): a few KB (1-bit) or
    ~140 KB (8-bit, 12000 x 12000) that decode to width x height bytes or more."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width * depth + 7) // 8)  # filter byte + packed samples
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
