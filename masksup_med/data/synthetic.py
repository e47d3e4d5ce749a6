"""Deterministic synthetic look-alikes of GLaS (histology), CVC-ClinicDB and Kvasir-SEG (colonoscopy).

GLaS: H&E-coloured stroma with non-overlapping glands. Each gland is an irregular blob (a rotated
ellipse whose radius is perturbed by a few random harmonics): a ring of purple epithelium with dark
nuclei around a pale lumen. Annotations are instance-labelled (0 background, 1..N one id per
gland), as in the official GLaS release.

CVC-ClinicDB: reddish mucosa seen through an octagonal field of view (shading, vignette, dark
lumen, folds, vessels, glints), with one or two raised polyps (same irregular blobs, domed, tinted,
with a rim shadow and a specular highlight). Frames of one video sequence share the scene and
polyp and differ by a small camera and polyp motion. Masks are 0/255 with a faint halo (< 64).

Kvasir-SEG: the same colonoscopy scenes, one independent scene per image, each image of its own
size (the release's sizes vary), stored as the release stores them: ``images/NAME.jpg`` and
``masks/NAME.jpg`` (an RGB JPEG mask, so not strictly binary).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from masksup_med.run.files import atomic_path

from .cvc_clinicdb import builtin_sequence_table, sequence_of
from .errors import DatasetError
from .kvasir_seg import MIN_IMAGES as KVASIR_MIN_IMAGES

# Approximate H&E colours (RGB), measured by eye on real GLaS images.
_STROMA_LIGHT = np.array([236.0, 150.0, 214.0])
_STROMA_DARK = np.array([204.0, 98.0, 186.0])
_EPITHELIUM = np.array([152.0, 72.0, 168.0])
_LUMEN = np.array([246.0, 226.0, 244.0])
_NUCLEUS = np.array([74.0, 32.0, 120.0])

_SPLITS = ("train", "testA", "testB")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed noise rescaled to [0, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    field -= field.min()
    return field / max(field.max(), 1e-8)


def _blob(rng: np.random.Generator, shape: tuple[int, int], near_border: bool) -> tuple[np.ndarray, ...]:
    """Return (inside mask, normalised radius 0 at centre .. 1 at the edge) of one random gland."""
    h, w = shape
    base = rng.uniform(0.11, 0.22) * min(h, w)
    a, b = base, base * rng.uniform(0.55, 1.0)
    if near_border:  # centre within half a radius of a random edge, so the gland is clipped
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        edge = rng.integers(4)
        offset = rng.uniform(-0.5, 0.5) * b
        cy, cx = [(offset, cx), (h - 1 + offset, cx), (cy, offset), (cy, w - 1 + offset)][edge]
    else:
        cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    angle = rng.uniform(0, np.pi)
    harmonics = [(k, rng.uniform(0.02, 0.09), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
    rho = _irregular_ellipse(shape, cy, cx, a, b, angle, harmonics)[0]
    return rho <= 1, rho


def _irregular_ellipse(
    shape: tuple[int, int], cy: float, cx: float, a: float, b: float, angle: float, harmonics
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rho, theta, radius) of an ellipse rotated by ``angle`` whose radius is scaled by ``harmonics``.

    ``rho`` is the distance to (cy, cx) over the outline's radius in that direction (1 on the
    outline), ``theta`` the direction relative to ``angle``, ``radius`` the outline radius in pixels.
    ``harmonics`` is a sequence of (k, amplitude, phase): radius *= 1 + amplitude cos(k theta + phase).
    """
    h, w = shape
    yy, xx = np.ogrid[0:h, 0:w]
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx) - angle
    radius = a * b / np.hypot(b * np.cos(theta), a * np.sin(theta))
    for k, amplitude, phase in harmonics:
        radius *= 1 + amplitude * np.cos(k * theta + phase)
    return np.hypot(dy, dx) / radius, theta, radius


def _nuclei_points(rng: np.random.Generator, rho: np.ndarray, inside: np.ndarray, band: tuple, n: int):
    """Pick ``n`` random pixel coordinates of ``inside`` whose rho lies in ``band``."""
    ys, xs = np.nonzero(inside & (rho >= band[0]) & (rho <= band[1]))
    if len(ys) == 0:
        return ys, xs
    pick = rng.choice(len(ys), size=min(n, len(ys)), replace=False)
    return ys[pick], xs[pick]


def render_glas_like(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Render one image (H, W, 3 uint8) and its instance label map (H, W uint8) of ``size`` (W, H)."""
    w, h = size
    shape = (h, w)
    labels = np.zeros(shape, np.uint8)
    epithelium = np.zeros(shape)
    lumen = np.zeros(shape)
    nuclei = np.zeros(shape)
    target = int(rng.integers(2, 7))
    margin = ndimage.generate_binary_structure(2, 1)
    for _ in range(60 * target):
        if labels.max() == target:
            break
        inside, rho = _blob(rng, shape, near_border=rng.random() < 0.35)
        if inside.sum() < 30 or (ndimage.binary_dilation(inside, margin, 2) & (labels > 0)).any():
            continue
        labels[inside] = labels.max() + 1
        inner = rng.uniform(0.45, 0.65)  # lumen radius as a fraction of the gland radius
        lumen[inside & (rho < inner)] = 1
        epithelium[inside & (rho >= inner)] = 1
        count = int(inside.sum() * 0.05)
        ys, xs = _nuclei_points(rng, rho, inside, (inner + 0.3 * (1 - inner), 0.95), count)
        nuclei[ys, xs] = 1
    ys, xs = _nuclei_points(rng, np.zeros(shape), labels == 0, (0, 1), int(0.003 * h * w))
    nuclei[ys, xs] = 1

    stroma_mix = 0.6 * _smooth_noise(rng, shape, 6) + 0.4 * _smooth_noise(rng, shape, 2)
    image = _STROMA_LIGHT + stroma_mix[..., None] * (_STROMA_DARK - _STROMA_LIGHT)
    for layer, colour in ((epithelium, _EPITHELIUM), (lumen, _LUMEN)):
        alpha = ndimage.gaussian_filter(layer, 0.7)[..., None]
        image = image * (1 - alpha) + alpha * colour
    alpha = np.clip(ndimage.gaussian_filter(nuclei, 0.9) * 5, 0, 1)[..., None]
    image = image * (1 - alpha) + alpha * _NUCLEUS
    image *= 1 + 0.08 * (_smooth_noise(rng, shape, 1.5)[..., None] - 0.5)
    image += rng.normal(0, 4, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def _save(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="BMP")


def make_glas_demo(
    out_dir: str | os.PathLike,
    n_train: int = 24,
    n_test_a: int = 8,
    n_test_b: int = 4,
    size: tuple[int, int] = (160, 120),
    seed: int = 0,
) -> Path:
    """Write a synthetic GLaS look-alike in the official release layout; return ``out_dir``.

    Files are ``train_1.bmp`` / ``train_1_anno.bmp`` ... ``testB_N``: RGB 8-bit images and
    8-bit instance-labelled annotations. Each image depends only on (seed, split, index), so the
    same seed gives byte-identical files. ``size`` is (width, height).
    """
    counts = dict(zip(_SPLITS, (n_train, n_test_a, n_test_b)))
    if any(int(n) != n or n < 0 for n in counts.values()):
        raise ValueError(f"image counts must be non-negative integers, got {counts}")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (width, height) with both >= 32, got {size!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"cannot write GLaS demo data: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for split_index, (split, n) in enumerate(counts.items()):
        for i in range(1, int(n) + 1):
            rng = np.random.default_rng([seed, split_index, i])
            image, labels = render_glas_like(rng, (int(size[0]), int(size[1])))
            _save(image, out / f"{split}_{i}.bmp")
            _save(labels, out / f"{split}_{i}_anno.bmp")
    return out


# --- CVC-ClinicDB look-alike -------------------------------------------------------------------

CVC_MIN_FRAMES = 3  # three sequences, so the default split (0.1 / 0.2 of sequences) has one of each part
_CVC_STREAM = 0xC7C  # random streams are (seed, _CVC_STREAM, sequence[, frame]): apart from GLaS ones
_MUCOSA = np.array([214.0, 120.0, 92.0])
_GLINT = np.array([255.0, 252.0, 246.0])
_OUTSIDE = 14.0  # the dark frame around the endoscope's octagonal field of view
_VESSEL = np.array([0.12, 0.4, 0.35])  # relative darkening of R, G, B along a vessel


def cvc_clinicdb_demo_frames(n_frames: int) -> list[int]:
    """Real CVC-ClinicDB frame numbers for a demo of ``n_frames`` frames, in increasing order.

    Two frames per video sequence (one more sequence for an odd count), at least
    :data:`CVC_MIN_FRAMES` sequences, spread evenly over the 29 sequences and, within each, over its
    frames; beyond 58 frames the extra frames go round the 29 sequences. 612 gives every frame.
    """
    table = builtin_sequence_table()
    last_frame = table[-1][1]
    if isinstance(n_frames, bool) or int(n_frames) != n_frames or not CVC_MIN_FRAMES <= n_frames <= last_frame:
        raise ValueError(
            f"n_frames must be an integer from {CVC_MIN_FRAMES} to {last_frame}, got {n_frames!r} (at least "
            f"{CVC_MIN_FRAMES} frames of {CVC_MIN_FRAMES} video sequences are needed for non-empty train, "
            "validation and test parts of the split by sequence)"
        )
    n_sequences = min(len(table), max(CVC_MIN_FRAMES, -(-int(n_frames) // 2)))
    rows = [table[i] for i in np.linspace(0, len(table) - 1, n_sequences).round().astype(int)]
    counts, left = [0] * n_sequences, int(n_frames)
    while left:
        for i, (first, last, _) in enumerate(rows):
            if left and counts[i] <= last - first:
                counts[i] += 1
                left -= 1
    frames = []
    for (first, last, _), count in zip(rows, counts):
        length = last - first + 1
        frames += [first + (2 * j + 1) * length // (2 * count) for j in range(count)]
    return sorted(frames)


def _spline_upsample(grid: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Cubic B-spline upsampling of ``grid`` along ``axis`` to ``n_out`` samples (knots spread evenly)."""
    n = grid.shape[axis]
    u = (np.arange(n_out) + 0.5) * n / n_out - 0.5
    start = np.floor(u).astype(int) - 1
    result = 0
    for k in range(4):  # the four knots around each sample, clamped at the borders
        t = np.abs(u - (start + k))
        weight = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, (2 - np.minimum(t, 2)) ** 3 / 6)
        taken = np.take(grid, np.clip(start + k, 0, n - 1), axis=axis)
        result = result + taken * np.expand_dims(weight, 1 - axis)
    return result


def _coarse_field(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """Smooth random float32 field in [0, 1]: about ``cells`` bumps across the shorter side."""
    h, w = shape
    grid = rng.standard_normal(tuple(max(2, round(cells * n / min(h, w))) for n in (h, w)))
    field = _spline_upsample(_spline_upsample(grid, h, 0).astype(np.float32), w, 1).astype(np.float32)
    field -= field.min()
    return field / max(float(field.max()), 1e-8)


def _cvc_scene(seed: int, sequence: int, shape: tuple[int, int]) -> dict:
    """What all frames of one video sequence share: colours, textures, lumen, folds, polyps.

    Positions are in a canvas ``pad`` pixels larger than the frame on every side; each frame is a
    window of it (the camera moves a little between frames).
    """
    rng = np.random.default_rng([seed, _CVC_STREAM, sequence])
    h, w = shape
    s = min(h, w)
    pad = max(1, round(0.05 * s))
    canvas = (h + 2 * pad, w + 2 * pad)
    base = _MUCOSA * rng.uniform(0.85, 1.05) * np.array([1.0, rng.uniform(0.85, 1.12), rng.uniform(0.8, 1.15)])
    scene = {
        "shape": shape,
        "pad": pad,
        "base": base,
        "lumen": (
            rng.uniform(0, canvas[0]),
            rng.uniform(0, canvas[1]),
            rng.uniform(0.12, 0.22) * s,
            rng.uniform(0.4, 0.85),
        ),
        "folds": (rng.uniform(0.12, 0.22) * s, rng.uniform(0.04, 0.12), rng.uniform(0, 2 * np.pi)),
        "vessel_strength": rng.uniform(0.2, 0.6),
        "illumination": _coarse_field(rng, canvas, 2),
        "texture": _coarse_field(rng, canvas, 14),
        "vessels": _coarse_field(rng, canvas, 5),
        "warp": _coarse_field(rng, canvas, 3),
        "polyp_texture": _coarse_field(rng, canvas, 28),
        "polyps": [],
    }
    for n in range(1 + (rng.random() < 0.25)):
        a = rng.uniform(0.12, 0.24) * s if n == 0 else rng.uniform(0.06, 0.12) * s
        reach = (0.28, 0.72) if n == 0 else (0.18, 0.82)
        for _ in range(20):
            cy, cx = pad + rng.uniform(*reach) * h, pad + rng.uniform(*reach) * w
            if all(np.hypot(cy - p["cy"], cx - p["cx"]) > 1.5 * (a + p["a"]) for p in scene["polyps"]):
                break
        else:
            break
        pale = rng.random() < 0.3
        tint = (
            [rng.uniform(1.02, 1.1), rng.uniform(1.02, 1.15), rng.uniform(1.05, 1.2)]
            if pale
            else [rng.uniform(1.0, 1.1), rng.uniform(0.72, 0.9), rng.uniform(0.75, 0.92)]
        )
        scene["polyps"].append(
            {
                "cy": cy,
                "cx": cx,
                "a": a,
                "b": a * rng.uniform(0.65, 1.0),
                "angle": rng.uniform(0, np.pi),
                "harmonics": [(k, rng.uniform(0.02, 0.1), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)],
                "tint": np.array(tint),
                "light": rng.uniform(0, 2 * np.pi),
            }
        )
    return scene


def _add_spot(layer: np.ndarray, cy: float, cx: float, sigma: float, strength: float) -> None:
    """Add a Gaussian spot to ``layer`` in place (only within 4 sigma of its centre)."""
    h, w = layer.shape
    r = int(np.ceil(4 * sigma))
    y0, y1, x0, x1 = max(0, int(cy) - r), min(h, int(cy) + r + 2), max(0, int(cx) - r), min(w, int(cx) + r + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    layer[y0:y1, x0:x1] += strength * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def _field_of_view(shape: tuple[int, int]) -> np.ndarray:
    """Coverage (0..1, 1-pixel soft edge) of the octagonal field of view of CVC-ClinicDB frames."""
    h, w = shape
    left, right, top, bottom, cut = 0.1 * w, 0.92 * w, 0.035 * h, 0.965 * h, 0.1 * (w + h)
    yy, xx = np.ogrid[0:h, 0:w]
    x0, x1, y0, y1 = xx - left, right - xx, yy - top, bottom - yy
    sides = np.minimum(np.minimum(x0, x1), np.minimum(y0, y1))
    corners = np.minimum(np.minimum(x0 + y0, x1 + y0), np.minimum(x0 + y1, x1 + y1)) - cut
    return np.clip(np.minimum(sides, corners / np.sqrt(2)) + 0.5, 0, 1)


def _draw_polyp(image, coverage, glints, light, scene, polyp, origin, rng) -> None:
    """Draw one polyp of ``scene`` in place, seen from camera ``origin``, moved a little by ``rng``."""
    h, w = coverage.shape
    s = min(h, w)
    cy = polyp["cy"] - origin[0] + rng.normal(0, 0.015 * s)
    cx = polyp["cx"] - origin[1] + rng.normal(0, 0.015 * s)
    scale = rng.uniform(0.93, 1.07)
    a, b, angle = polyp["a"] * scale, polyp["b"] * scale, polyp["angle"] + rng.normal(0, 0.08)
    reach = 1.3 * a * np.prod([1 + amplitude for _, amplitude, _ in polyp["harmonics"]]) + 2  # rho 1.3 at most
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 2)
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 2)
    if y0 < y1 and x0 < x1:
        window = (slice(y0, y1), slice(x0, x1))
        rho, theta, radius = _irregular_ellipse((y1 - y0, x1 - x0), cy - y0, cx - x0, a, b, angle, polyp["harmonics"])
        away = 0.5 - 0.5 * np.cos(theta + angle - polyp["light"])  # 1 on the side away from the light
        shade = 1 - 0.45 * np.clip(1 - (rho - 1) / 0.3, 0, 1) * (rho > 1) * away  # rim shadow, outside
        dome = np.sqrt(np.clip(1 - rho**2, 0, 1))
        texture = 0.88 + 0.24 * scene["polyp_texture"][origin[0] : origin[0] + h, origin[1] : origin[1] + w][window]
        surface = (texture * light[window] * (0.72 + 0.4 * dome))[..., None] * (scene["base"] * polyp["tint"])
        alpha = np.clip((1 - rho) * radius + 0.5, 0, 1)
        blend = alpha[..., None]
        image[window] = image[window] * (shade[..., None] * (1 - blend)) + blend * surface
        coverage[window] = np.maximum(coverage[window], alpha)
    toward = polyp["light"] + rng.normal(0, 0.15)
    _add_spot(glints, cy + 0.4 * b * np.sin(toward), cx + 0.4 * b * np.cos(toward), max(0.7, 0.06 * a), 1.2)
    for _ in range(int(rng.integers(1, 4))):
        r, t = 0.7 * b * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        _add_spot(glints, cy + r * np.sin(t), cx + r * np.cos(t), rng.uniform(0.4, 1.0) * s / 288, 0.8)


def _render_cvc_frame(scene: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One frame of ``scene``: camera offset, polyp motion, glints and noise drawn from ``rng``."""
    h, w = scene["shape"]
    s, pad = min(h, w), scene["pad"]
    oy, ox = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))

    def crop(name):
        return scene[name][oy : oy + h, ox : ox + w]

    yy, xx = (np.arange(n, dtype=np.float32) for n in (h, w))
    yy, xx = yy[:, None], xx[None, :]
    ly, lx, lumen_sigma, lumen_depth = scene["lumen"]
    to_lumen = np.hypot(yy - np.float32(ly - oy), xx - np.float32(lx - ox))
    period, fold_amplitude, phase = scene["folds"]
    folds = 1 + fold_amplitude * np.sin(
        np.float32(2 * np.pi) * (to_lumen / np.float32(period) + crop("warp")) + np.float32(phase)
    )
    lumen = 1 - lumen_depth * np.exp(-0.5 * (to_lumen / np.float32(lumen_sigma)) ** 2)
    vignette = 1 - 0.28 * (((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2)
    light = (vignette * (0.8 + 0.35 * crop("illumination"))).astype(np.float32)
    vessel = np.exp(-(((crop("vessels") - 0.5) / 0.02) ** 2)) * np.float32(scene["vessel_strength"])
    brightness = (light * lumen * folds * (0.9 + 0.2 * crop("texture")))[..., None]
    image = brightness * (1 - vessel[..., None] * _VESSEL.astype(np.float32)) * scene["base"].astype(np.float32)

    glints = np.zeros((h, w), np.float32)
    coverage = np.zeros((h, w), np.float32)
    for polyp in scene["polyps"]:
        _draw_polyp(image, coverage, glints, light, scene, polyp, (oy, ox), rng)
    for _ in range(int(rng.integers(4, 14))):
        _add_spot(glints, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.5, 1.6) * s / 288, rng.uniform(0.5, 1.0))
    view = _field_of_view((h, w)).astype(np.float32)
    glints = np.clip(glints, 0, 1) * view
    grain = 1 + 0.06 * (_smooth_noise(rng, (h, w), 1.0).astype(np.float32) - 0.5)
    image = image * (grain * view * (1 - glints))[..., None] + (
        glints[..., None] * _GLINT.astype(np.float32) + (_OUTSIDE * (1 - view))[..., None]
    )
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(2.5)
    coverage *= view
    mask = np.where(coverage >= 0.5, 255, np.rint(coverage * 60))  # faint halo below 30, like the real masks
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask.astype(np.uint8)


def _check_size_and_seed(size: tuple[int, int], seed: int) -> tuple[int, int]:
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (width, height) with both >= 32, got {size!r}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(size[0]), int(size[1])


def _cvc_frame_rng(seed: int, sequence: int, frame: int) -> np.random.Generator:
    return np.random.default_rng([seed, _CVC_STREAM, sequence, frame])


def _sequence_of_frame(frame: int) -> int:
    sequence = sequence_of(str(frame), builtin_sequence_table())
    if isinstance(frame, bool) or sequence is None:
        raise ValueError(
            f"frame must be a CVC-ClinicDB frame number (1..{builtin_sequence_table()[-1][1]}), got {frame!r}"
        )
    return sequence


def render_cvc_clinicdb_like(
    frame: int, size: tuple[int, int] = (384, 288), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render CVC-ClinicDB look-alike frame number ``frame``: RGB (H, W, 3) uint8 and mask (H, W) uint8.

    The mask is 255 on the polyp(s), 0 elsewhere but for a faint halo (< 30) along the outline.
    Frames of the same video sequence (by the release's table) show the same scene and polyp(s).
    ``size`` is (width, height); the result depends only on (seed, frame, size).
    """
    w, h = _check_size_and_seed(size, seed)
    sequence = _sequence_of_frame(frame)
    return _render_cvc_frame(_cvc_scene(int(seed), sequence, (h, w)), _cvc_frame_rng(int(seed), sequence, int(frame)))


def _save_tiff(array: np.ndarray, path: Path) -> None:
    """Write as the release does: uncompressed, 16-row strips, 'min-is-black' even for RGB frames."""
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp, array, photometric="minisblack", planarconfig="contig", rowsperstrip=16, metadata=None, software=False
        )


def _cvc_readme(frames: list[int], size: tuple[int, int], seed: int) -> str:
    rows = "\n".join(
        f"       |    {first:3d} to {last:3d}    |  {seq:2d}  |" for first, last, seq in builtin_sequence_table()
    )
    return (
        "CVC-ClinicDB look-alike: SYNTHETIC DATA, not the CVC-ClinicDB release\n\n"
        f"Written by `masksup-med data demo cvc-clinicdb` (seed {seed}): {len(frames)} frames of "
        f"{size[0]}x{size[1]} pixels,\nOriginal/N.tif (RGB) + Ground Truth/N.tif (0/255 polyp mask), "
        "named by real frame numbers.\n\n"
        "The correspondence between the number of frame and the video sequence is as follows\n"
        "(the release's table; only some of its frames are here):\n\n"
        f"       |   Frame Number   | Sequence |\n{rows}\n"
    )


def make_cvc_clinicdb_demo(
    out_dir: str | os.PathLike, n_frames: int = 24, size: tuple[int, int] = (384, 288), seed: int = 0
) -> Path:
    """Write a synthetic CVC-ClinicDB look-alike in the official release layout; return ``out_dir``.

    Files are ``Original/N.tif`` (RGB 8-bit, stored like the release's frames) and
    ``Ground Truth/N.tif`` (8-bit 0/255 mask) for the real frame numbers N of
    :func:`cvc_clinicdb_demo_frames`, spread over several video sequences so the split by sequence
    has train, validation and test parts; plus a ``README.txt`` that says the data is synthetic and
    holds the frame-to-sequence table. Each frame depends only on (seed, frame number), so the same
    seed gives byte-identical files. ``size`` is (width, height).
    """
    frames = cvc_clinicdb_demo_frames(n_frames)
    w, h = _check_size_and_seed(size, seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"cannot write CVC-ClinicDB demo data: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    scenes: dict[int, dict] = {}  # the same as render_cvc_clinicdb_like, each scene built once
    for frame in frames:
        sequence = _sequence_of_frame(frame)
        if sequence not in scenes:
            scenes[sequence] = _cvc_scene(int(seed), sequence, (h, w))
        image, mask = _render_cvc_frame(scenes[sequence], _cvc_frame_rng(int(seed), sequence, frame))
        _save_tiff(image, out / "Original" / f"{frame}.tif")
        _save_tiff(mask, out / "Ground Truth" / f"{frame}.tif")
    with atomic_path(out / "README.txt") as tmp:
        tmp.write_text(_cvc_readme(frames, (w, h), int(seed)), encoding="ascii")
    return out


# --- Kvasir-SEG look-alike ---------------------------------------------------------------------

_KVASIR_STREAM = 0x4B5  # random streams are (seed, _KVASIR_STREAM, image): apart from GLaS and CVC ones
KVASIR_SIZE_SPREAD = 0.2  # each side of an image is the asked size times 1 +- up to this


def kvasir_seg_demo_sizes(n_images: int, size: tuple[int, int] = (160, 136), seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of each demo image: ``size`` with each side scaled by 1 +- ``KVASIR_SIZE_SPREAD``."""
    w, h = _check_size_and_seed(size, seed)
    sizes = []
    for i in range(1, int(n_images) + 1):
        factors = np.random.default_rng([int(seed), _KVASIR_STREAM, i, 0]).uniform(-1, 1, 2) * KVASIR_SIZE_SPREAD
        sizes.append(tuple(max(32, round(side * (1 + f))) for side, f in zip((w, h), factors)))
    return sizes


def make_kvasir_seg_demo(
    out_dir: str | os.PathLike, n_images: int = 24, size: tuple[int, int] = (160, 136), seed: int = 0
) -> Path:
    """Write a synthetic Kvasir-SEG look-alike in the release layout; return ``out_dir``.

    Files are ``images/synthetic_NNNN.jpg`` (RGB) and ``masks/synthetic_NNNN.jpg`` (the polyp mask as an
    RGB JPEG, 255 on the polyp before compression), sizes around ``size`` (width, height) and each of
    its own (:func:`kvasir_seg_demo_sizes`), plus a ``README.txt`` saying the data is synthetic. Each
    image depends only on (seed, index, size), so the same seed gives byte-identical files.
    """
    if isinstance(n_images, bool) or int(n_images) != n_images or n_images < KVASIR_MIN_IMAGES:
        raise ValueError(
            f"n_images must be an integer >= {KVASIR_MIN_IMAGES} (for non-empty train, validation and "
            f"test parts of the default split), got {n_images!r}"
        )
    sizes = kvasir_seg_demo_sizes(n_images, size, seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"cannot write Kvasir-SEG demo data: {out} exists and is not a folder")
    for index, (w, h) in enumerate(sizes, start=1):
        scene = _cvc_scene(int(seed), _KVASIR_STREAM * 1000 + index, (h, w))
        image, mask = _render_cvc_frame(scene, np.random.default_rng([int(seed), _KVASIR_STREAM, index, 1]))
        name = f"synthetic_{index:04d}.jpg"
        for folder, array in (("images", image), ("masks", np.repeat(mask[..., None], 3, axis=-1))):
            with atomic_path(out / folder / name) as tmp:
                Image.fromarray(array).save(tmp, format="JPEG", quality=90)
    with atomic_path(out / "README.txt") as tmp:
        tmp.write_text(
            f"Kvasir-SEG look-alike: SYNTHETIC DATA, not the Kvasir-SEG release\n\nWritten by `masksup-med data "
            f"demo kvasir-seg` (seed {seed}): {len(sizes)} images of about {size[0]}x{size[1]} pixels,\n"
            "images/NAME.jpg (RGB) + masks/NAME.jpg (RGB JPEG polyp mask).\n",
            encoding="ascii",
        )
    return out
