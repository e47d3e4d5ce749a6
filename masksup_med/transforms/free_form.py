"""Free-form brush-stroke masking, the kind of masking the MaskSup paper uses.

Strokes are random walks of straight segments drawn with a round brush (each segment is a
capsule: every pixel within the brush radius of the segment). Segments are added one by one until
the covered fraction of the image reaches a target drawn from ``ratio_range``; the stroke lengths and
brush widths are fractions of the image's shortest side, so the look does not depend on resolution.
Works for 2D and 3D images: 2D strokes are drawn with Pillow's line and ellipse rasteriser on the
CPU (a few milliseconds an image), 3D strokes with a vectorised capsule test in torch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from PIL import Image, ImageDraw

from masksup_med.transforms.base import RandMask, RandMaskd, check_ratio

__all__ = ["RandFreeFormMask", "RandFreeFormMaskd", "StrokeGeometry"]

_MAX_SEGMENTS = 20_000
_CHUNK = 32  # segments rasterised together; drawing stops at the first chunk that reaches the target


@dataclass(frozen=True)
class StrokeGeometry:
    """Segments of all strokes, in drawing order, and the masked-area fraction to reach."""

    starts: np.ndarray  # (S, ndim) voxel coordinates
    ends: np.ndarray  # (S, ndim)
    radii: np.ndarray  # (S,)
    target_ratio: float


def _capsule_volume(length: float, radius: float, ndim: int) -> float:
    """Area (2D) or volume (3D) of a segment drawn with a round brush, ignoring overlaps."""
    if ndim == 2:
        return 2 * radius * length + math.pi * radius**2
    return math.pi * radius**2 * length + 4.0 / 3.0 * math.pi * radius**3


def _first_covering_segment(
    starts: np.ndarray, ends: np.ndarray, radii: np.ndarray, spatial_shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """For every voxel, the index of the first segment whose brush covers it (``S`` where none does).

    The segments are evaluated together, each on a window of the largest segment's bounding-box
    size placed at its own bounding box, and merged with a scatter-min: no per-segment loop and no
    host-device synchronisation.
    """
    n_segments, ndim = starts.shape
    lo = np.clip(np.floor(np.minimum(starts, ends) - radii[:, None]), 0, None).astype(np.int64)
    hi = np.ceil(np.maximum(starts, ends) + radii[:, None]).astype(np.int64) + 1
    window = np.minimum(hi - lo, np.asarray(spatial_shape)).max(axis=0)

    start = torch.as_tensor(starts, dtype=torch.float32, device=device)
    direction = torch.as_tensor(ends, dtype=torch.float32, device=device) - start
    lo_t = torch.as_tensor(lo, device=device)
    coords, offsets = [], []
    per_segment = [n_segments] + [1] * ndim  # broadcasts a per-segment value over its window
    for d in range(ndim):
        along_d = [1] * (ndim + 1)
        along_d[d + 1] = int(window[d])
        coord = lo_t[:, d].reshape(per_segment) + torch.arange(int(window[d]), device=device).reshape(along_d)
        coords.append(coord)
        offsets.append(coord.float() - start[:, d].reshape(per_segment))
    seg = [direction[:, d].reshape(per_segment) for d in range(ndim)]
    length_sq = sum(s * s for s in seg).clamp_min(1e-12)
    t = (sum(o * s for o, s in zip(offsets, seg)) / length_sq).clamp(0.0, 1.0)
    dist_sq = sum((o - t * s) ** 2 for o, s in zip(offsets, seg))
    radius_sq = torch.as_tensor(radii**2, dtype=torch.float32, device=device).reshape(per_segment)
    inside = dist_sq <= radius_sq
    flat = torch.zeros_like(coords[0])
    for d in range(ndim):
        inside = inside & (coords[d] < spatial_shape[d])
        flat = flat * spatial_shape[d] + coords[d]
    n_voxels = math.prod(spatial_shape)
    sink = n_voxels  # out-of-brush window voxels are sent to one extra slot that is dropped
    index = torch.where(inside, flat, torch.full_like(flat, sink)).flatten()
    order = torch.arange(n_segments, device=device).reshape(per_segment).expand_as(flat).flatten()
    first = torch.full((n_voxels + 1,), n_segments, dtype=torch.long, device=device)
    first.scatter_reduce_(0, index, order, reduce="amin")
    return first[:n_voxels].reshape(spatial_shape)


def _unit(vector: Sequence[float]) -> list[float]:
    """``vector`` scaled to length 1 (left as is when it is ~0); plain floats: strokes have 2 or 3 axes."""
    norm = max(math.hypot(*vector), 1e-12)
    return [v / norm for v in vector]


def _draw_2d(geometry: StrokeGeometry, spatial_shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the shortest prefix of the segments that covers the target fraction.

    Each segment is a line as wide as the brush with a disc at each end. A segment adds at most the
    area of its capsule grown by one pixel, so the covered pixels are counted only once the area
    drawn since the last count could close the gap to the target.
    """
    height, width = spatial_shape
    needed = math.ceil(geometry.target_ratio * height * width)
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    covered, pending = 0, 0.0
    for (r0, c0), (r1, c1), radius in zip(geometry.starts.tolist(), geometry.ends.tolist(), geometry.radii.tolist()):
        draw.line([(c0, r0), (c1, r1)], fill=1, width=max(1, round(2 * radius)))
        for row, col in ((r0, c0), (r1, c1)):
            draw.ellipse([col - radius, row - radius, col + radius, row + radius], fill=1)
        pending += _capsule_volume(math.hypot(r1 - r0, c1 - c0), radius + 1, 2)  # drawn pixels lie within 1 px
        if covered + pending >= needed:
            covered, pending = int(np.count_nonzero(np.asarray(canvas))), 0.0
            if covered >= needed:
                break
    return np.array(canvas, dtype=bool)


class RandFreeFormMask(RandMask):
    """Hide free-form brush strokes covering a random fraction of a channel-first image.

    Args:
        ratio_range: (low, high) of the masked-area fraction, drawn uniformly per image; a single
            float fixes it. Must lie in [0, 1). Default (0.4, 0.6): heavy masking, as in MaskSup.
        brush_width: (low, high) brush width as a fraction of the shortest image side.
        vertices: (low, high) number of segments per stroke.
        step_length: (low, high) segment length as a fraction of the shortest image side.
        turn: how sharply a stroke turns between segments (std of the direction change).
        fill_value: value written into the holes (default 0.5, the mid value of [0, 1] images).
        prob: probability of masking at all.
    """

    def __init__(
        self,
        ratio_range: float | Sequence[float] = (0.4, 0.6),
        brush_width: Sequence[float] = (0.04, 0.10),
        vertices: Sequence[int] = (4, 12),
        step_length: Sequence[float] = (0.05, 0.2),
        turn: float = 0.6,
        fill_value: float = 0.5,
        prob: float = 1.0,
    ) -> None:
        super().__init__(fill_value=fill_value, prob=prob)
        self.ratio_range = check_ratio(ratio_range, "ratio_range")
        self.brush_width = self._positive_range(brush_width, "brush_width")
        self.step_length = self._positive_range(step_length, "step_length")
        low, high = (int(v) for v in vertices)
        if not 1 <= low <= high:
            raise ValueError(f"vertices must be (low, high) with 1 <= low <= high, got {vertices!r}.")
        self.vertices = (low, high)
        if turn < 0:
            raise ValueError(f"turn must be >= 0, got {turn!r}.")
        self.turn = float(turn)

    @staticmethod
    def _positive_range(value: Sequence[float], name: str) -> tuple[float, float]:
        low, high = (float(v) for v in value)
        if not 0 < low <= high:
            raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {value!r}.")
        return low, high

    def sample_geometry(self, spatial_shape: tuple[int, ...]) -> StrokeGeometry:
        """Draw strokes until their summed area comfortably exceeds the target (overlaps included)."""
        ndim = len(spatial_shape)
        upper = np.asarray(spatial_shape, dtype=float) - 1
        limits = upper.tolist()
        side = float(min(spatial_shape))
        target = float(self.R.uniform(*self.ratio_range))
        # For randomly placed shapes, covering a fraction f needs about -ln(1 - f) image areas of
        # drawn area; three times that makes falling short (then all strokes are used) very unlikely.
        budget = -math.log1p(-target) * 3.0 * float(np.prod(spatial_shape))
        starts, ends, radii = [], [], []
        drawn = 0.0
        while drawn < budget and len(starts) < _MAX_SEGMENTS:
            radius = max(0.5, self.R.uniform(*self.brush_width) * side / 2)
            point = (self.R.uniform(0, 1, size=ndim) * upper).tolist()
            direction = _unit(self.R.normal(size=ndim).tolist())
            n_vertices = self.R.randint(self.vertices[0], self.vertices[1] + 1)
            turns = (self.turn * self.R.normal(size=(n_vertices, ndim))).tolist()  # drawn per stroke: few RNG calls
            steps = (self.R.uniform(*self.step_length, size=n_vertices) * side).tolist()
            for turn, step in zip(turns, steps):
                direction = _unit([d + t for d, t in zip(direction, turn)])
                nxt = [min(max(p + step * d, 0.0), u) for p, d, u in zip(point, direction, limits)]
                starts.append(point)
                ends.append(nxt)
                radii.append(radius)
                drawn += _capsule_volume(math.dist(nxt, point), radius, ndim)
                point = nxt
        empty = np.zeros((0, ndim))
        return StrokeGeometry(
            starts=np.asarray(starts) if starts else empty,
            ends=np.asarray(ends) if ends else empty,
            radii=np.asarray(radii, dtype=float),
            target_ratio=target,
        )

    def rasterize(self, geometry: StrokeGeometry, spatial_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Draw segments in order and keep the shortest prefix that covers the target fraction."""
        n_segments = len(geometry.radii)
        if n_segments == 0:
            return torch.zeros(spatial_shape, dtype=torch.bool, device=device)
        if len(spatial_shape) == 2:
            return torch.as_tensor(_draw_2d(geometry, spatial_shape)).to(device)
        needed = math.ceil(geometry.target_ratio * math.prod(spatial_shape))
        first = torch.full(spatial_shape, n_segments, dtype=torch.long, device=device)
        for lo in range(0, n_segments, _CHUNK):
            hi = min(lo + _CHUNK, n_segments)
            chunk = _first_covering_segment(
                geometry.starts[lo:hi], geometry.ends[lo:hi], geometry.radii[lo:hi], spatial_shape, device
            )
            first = torch.minimum(first, torch.where(chunk < hi - lo, chunk + lo, n_segments))
            if int((first < n_segments).sum()) >= needed:
                break
        covered_by_prefix = torch.bincount(first.flatten(), minlength=n_segments + 1)[:n_segments].cumsum(0)
        stop = torch.searchsorted(covered_by_prefix, torch.tensor([needed], device=device))
        return first <= stop.clamp(max=n_segments - 1)


class RandFreeFormMaskd(RandMaskd):
    """Dictionary version of :class:`RandFreeFormMask`: writes the masked copy of ``keys`` to ``masked_keys``.

    ``keys``, ``masked_keys``, ``hole_key``, ``prob`` and ``allow_missing_keys`` are those of
    :class:`~masksup_med.transforms.base.RandMaskd`; the masking arguments those of :class:`RandFreeFormMask`.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        ratio_range: float | Sequence[float] = (0.4, 0.6),
        brush_width: Sequence[float] = (0.04, 0.10),
        vertices: Sequence[int] = (4, 12),
        step_length: Sequence[float] = (0.05, 0.2),
        turn: float = 0.6,
        fill_value: float = 0.5,
        masked_keys: KeysCollection = "image_masked",
        hole_key: Hashable | None = None,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        masker = RandFreeFormMask(ratio_range, brush_width, vertices, step_length, turn, fill_value)
        super().__init__(keys, masker, masked_keys, hole_key, prob, allow_missing_keys)
