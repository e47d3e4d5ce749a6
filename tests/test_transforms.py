"""Random masking transforms: ratio, determinism, dictionary semantics, batch masking, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from masksup_med.transforms import (
    RandFreeFormMask,
    RandFreeFormMaskd,
    RandMaskBank,
    RandMaskBankd,
    RandPatchMask,
    RandPatchMaskd,
)

ARRAY_TRANSFORMS = {
    "free_form": lambda **kw: RandFreeFormMask(**kw),
    "patch": lambda **kw: RandPatchMask(patch_size=16, **kw),
    "bank": lambda **kw: RandMaskBank(bank_size=16, **kw),
}
DICT_TRANSFORMS = {
    "free_form": lambda **kw: RandFreeFormMaskd(**kw),
    "patch": lambda **kw: RandPatchMaskd(patch_size=16, **kw),
    "bank": lambda **kw: RandMaskBankd(bank_size=16, **kw),
}


def _image(shape=(3, 64, 64), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _sample(shape=(3, 64, 64), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(shape, generator=g),
        "label": (torch.rand((1, *shape[1:]), generator=g) > 0.5).float(),
    }


# ---------------------------------------------------------------------------------------------
# 1. masked ratio
# ---------------------------------------------------------------------------------------------


def test_free_form_default_ratio_within_tolerance_over_many_draws():
    t = RandFreeFormMask()
    t.set_random_state(0)
    img = _image((1, 64, 64))
    fractions = []
    for _ in range(100):
        _, holes = t.mask_with_holes(img)
        assert holes.dtype == torch.bool and holes.shape == (64, 64)
        fractions.append(holes.float().mean().item())
    fractions = np.asarray(fractions)
    assert fractions.min() >= 0.4 - 0.01, fractions.min()
    assert fractions.max() <= 0.6 + 0.04, fractions.max()
    assert abs(fractions.mean() - 0.5) <= 0.03, fractions.mean()
    # the ratio is drawn per image, not fixed
    assert fractions.std() > 0.03


def test_free_form_fixed_ratio_honoured():
    t = RandFreeFormMask(ratio_range=0.3)
    t.set_random_state(1)
    img = _image((1, 80, 64))
    for _ in range(30):
        frac = t.mask_with_holes(img)[1].float().mean().item()
        assert 0.3 - 0.01 <= frac <= 0.3 + 0.04, frac


def test_free_form_masked_pixels_carry_fill_value_and_rest_untouched():
    t = RandFreeFormMask(fill_value=-7.0)
    t.set_random_state(3)
    img = _image((3, 64, 64))
    out, holes = t.mask_with_holes(img)
    assert torch.all(out[:, holes] == -7.0)
    assert torch.equal(out[:, ~holes], img[:, ~holes])
    # the holes are a real fraction of the image and every channel shares them
    assert 0.39 <= holes.float().mean().item() <= 0.64


def test_free_form_ratio_zero_masks_nothing():
    t = RandFreeFormMask(ratio_range=0.0)
    t.set_random_state(0)
    img = _image()
    out, holes = t.mask_with_holes(img)
    assert not holes.any()
    assert torch.equal(out, img)


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.75])
def test_patch_exact_hidden_patch_count(ratio):
    t = RandPatchMask(ratio_range=ratio, patch_size=16, fill_value=-1.0)
    t.set_random_state(0)
    img = _image((2, 64, 96))  # 4 x 6 = 24 patches
    n_patches = 24
    for _ in range(10):
        out, holes = t.mask_with_holes(img)
        per_patch = holes.reshape(4, 16, 6, 16).permute(0, 2, 1, 3).reshape(n_patches, 256)
        # each patch is either fully hidden or fully visible
        assert torch.all(per_patch.all(1) | ~per_patch.any(1))
        assert int(per_patch.all(1).sum()) == round(ratio * n_patches)
        assert torch.all(out[:, holes] == -1.0)
        assert torch.equal(out[:, ~holes], img[:, ~holes])


def test_patch_ratio_range_count_in_range_and_varies():
    t = RandPatchMask(ratio_range=(0.2, 0.6), patch_size=8)
    t.set_random_state(0)
    img = _image((1, 64, 64))  # 64 patches
    counts = set()
    for _ in range(30):
        holes = t.mask_with_holes(img)[1]
        n_hidden = int(holes.reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64).all(1).sum())
        assert round(0.2 * 64) <= n_hidden <= round(0.6 * 64)
        assert holes.sum().item() == n_hidden * 64
        counts.add(n_hidden)
    assert len(counts) > 3


def test_patch_grid_not_divisible_cuts_edge_patches():
    t = RandPatchMask(ratio_range=0.5, patch_size=16)
    t.set_random_state(0)
    img = _image((1, 40, 50))  # grid 3 x 4, edge patches cut
    holes = t.mask_with_holes(img)[1]
    assert holes.shape == (40, 50)
    padded = torch.zeros(48, 64, dtype=torch.bool)
    padded[:40, :50] = holes
    blocks = padded.reshape(3, 16, 4, 16).permute(0, 2, 1, 3).reshape(3, 4, 256)
    hidden_grid = blocks.any(-1)
    assert int(hidden_grid.sum()) == round(0.5 * 12)
    # the visible part of every hidden patch is entirely hidden
    expected = hidden_grid.repeat_interleave(16, 0).repeat_interleave(16, 1)[:40, :50]
    assert torch.equal(holes, expected)


def test_patch_ratio_zero_masks_nothing():
    t = RandPatchMask(ratio_range=0.0, patch_size=8)
    t.set_random_state(0)
    img = _image()
    out, holes = t.mask_with_holes(img)
    assert not holes.any()
    assert torch.equal(out, img)


# ---------------------------------------------------------------------------------------------
# 2. determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARRAY_TRANSFORMS))
def test_array_determinism(name):
    img = _image()

    def run(seed):
        t = ARRAY_TRANSFORMS[name]()
        t.set_random_state(seed)
        return [t(img) for _ in range(3)]

    a, b, c = run(42), run(42), run(43)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, z) for x, z in zip(a, c))
    # successive draws of one seeded transform differ
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
def test_dict_determinism(name):
    data = _sample()

    def run(seed):
        t = DICT_TRANSFORMS[name](keys="image", hole_key="holes")
        t.set_random_state(seed)
        return [t(data) for _ in range(3)]

    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b):
        assert torch.equal(x["image_masked"], y["image_masked"])
        assert torch.equal(x["holes"], y["holes"])
    assert not all(torch.equal(x["holes"], z["holes"]) for x, z in zip(a, c))


def test_dict_determinism_through_compose_seed():
    data = _sample()

    def run(seed):
        pipeline = Compose([RandFreeFormMaskd(keys="image")])
        pipeline.set_random_state(seed)
        return pipeline(data)["image_masked"]

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


# ---------------------------------------------------------------------------------------------
# 3. dictionary version
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
def test_dict_source_and_label_untouched_masked_copy_and_holes(name):
    data = _sample()
    image_before, label_before = data["image"].clone(), data["label"].clone()
    t = DICT_TRANSFORMS[name](keys="image", hole_key="holes", fill_value=0.25)
    t.set_random_state(0)
    out = t(data)
    assert set(out) == {"image", "label", "image_masked", "holes"}
    # inputs bit-identical, not modified in place, and the output keeps the same source objects
    assert torch.equal(data["image"], image_before) and torch.equal(data["label"], label_before)
    assert torch.equal(out["image"], image_before) and torch.equal(out["label"], label_before)
    assert set(data) == {"image", "label"}
    holes = out["holes"]
    assert holes.shape == (1, 64, 64) and holes.dtype == torch.bool
    assert holes.any() and not holes.all()
    mask3 = holes.expand_as(out["image_masked"])
    assert torch.all(out["image_masked"][mask3] == 0.25)
    assert torch.equal(out["image_masked"][~mask3], image_before[~mask3])
    assert out["image_masked"].data_ptr() != data["image"].data_ptr()


def test_dict_custom_masked_keys_and_shared_holes_across_keys():
    g = torch.Generator().manual_seed(0)
    data = {"t1": torch.rand(1, 64, 64, generator=g), "t2": torch.rand(2, 64, 64, generator=g) + 5.0}
    data["t2"] = data["t2"][:1]  # same shape as t1
    t = RandFreeFormMaskd(keys=["t1", "t2"], masked_keys=["t1_m", "t2_m"], hole_key="h", fill_value=-1.0)
    t.set_random_state(0)
    out = t(data)
    assert "image_masked" not in out
    h = out["h"][0]
    for k in ("t1", "t2"):
        m = out[f"{k}_m"]
        assert torch.all(m[0][h] == -1.0)
        assert torch.equal(m[0][~h], data[k][0][~h])
    # both copies hidden at exactly the same places
    assert torch.equal(out["t1_m"] == -1.0, out["t2_m"] == -1.0)


def test_dict_keys_of_different_shapes_raise():
    data = {"a": torch.rand(1, 64, 64), "b": torch.rand(1, 32, 32)}
    with pytest.raises(ValueError, match="shape"):
        RandFreeFormMaskd(keys=["a", "b"], masked_keys=["a_m", "b_m"])(data)


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
def test_dict_prob_zero_gives_unmasked_copy(name):
    data = _sample()
    t = DICT_TRANSFORMS[name](keys="image", hole_key="holes", prob=0.0, fill_value=-3.0)
    t.set_random_state(0)
    for _ in range(3):
        out = t(data)
        assert torch.equal(out["image_masked"], data["image"])
        assert not out["holes"].any()


def test_dict_prob_half_masks_some_samples_only():
    data = _sample()
    t = RandPatchMaskd(keys="image", patch_size=16, prob=0.5, hole_key="holes")
    t.set_random_state(0)
    masked = [bool(t(data)["holes"].any()) for _ in range(40)]
    assert 5 < sum(masked) < 35


def test_array_prob_zero_returns_equal_copy():
    img = _image()
    t = RandFreeFormMask(prob=0.0)
    t.set_random_state(0)
    out = t(img)
    assert torch.equal(out, img)


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
def test_dict_metatensor_in_metatensor_out(name):
    affine = torch.diag(torch.tensor([0.5, 0.7, 1.0], dtype=torch.float64))
    image = MetaTensor(_image(), affine=affine, meta={"filename_or_obj": "case_001.png", "spacing": [0.5, 0.7]})
    label = MetaTensor(torch.zeros(1, 64, 64), affine=affine, meta={"filename_or_obj": "case_001_anno.png"})
    t = DICT_TRANSFORMS[name](keys="image", hole_key="holes")
    t.set_random_state(0)
    out = t({"image": image, "label": label})
    masked = out["image_masked"]
    assert isinstance(masked, MetaTensor)
    assert masked.meta["filename_or_obj"] == "case_001.png"
    assert masked.meta["spacing"] == [0.5, 0.7]
    assert torch.equal(masked.affine, affine)
    assert isinstance(out["holes"], MetaTensor)
    assert out["holes"].meta["filename_or_obj"] == "case_001.png"
    assert out["image"] is image and out["label"] is label
    # modifying the copy's meta does not leak into the source
    masked.meta["filename_or_obj"] = "changed"
    assert image.meta["filename_or_obj"] == "case_001.png"


def test_array_metatensor_in_metatensor_out():
    image = MetaTensor(_image(), meta={"filename_or_obj": "x.png"})
    t = RandPatchMask(patch_size=16)
    t.set_random_state(0)
    out = t(image)
    assert isinstance(out, MetaTensor)
    assert out.meta["filename_or_obj"] == "x.png"
    assert torch.equal(out.affine, image.affine)


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
@pytest.mark.parametrize(
    "dtype,fill",
    [(np.float32, 0.5), (np.float64, 0.5), (np.uint8, 128)],
)
def test_dict_numpy_in_numpy_out_dtype_kept(name, dtype, fill):
    rng = np.random.default_rng(0)
    if dtype == np.uint8:
        image = rng.integers(0, 100, size=(3, 64, 64)).astype(np.uint8)  # never 128 by itself
    else:
        image = rng.random((3, 64, 64)).astype(dtype)
    source = image.copy()
    t = DICT_TRANSFORMS[name](keys="image", hole_key="holes", fill_value=fill)
    t.set_random_state(0)
    out = t({"image": image, "label": np.zeros((1, 64, 64), np.uint8)})
    masked, holes = out["image_masked"], out["holes"]
    assert isinstance(masked, np.ndarray) and masked.dtype == dtype and masked.shape == image.shape
    assert isinstance(holes, np.ndarray) and holes.dtype == bool and holes.shape == (1, 64, 64)
    np.testing.assert_array_equal(image, source)
    assert out["image"] is image
    mask3 = np.broadcast_to(holes, image.shape)
    assert mask3.any()
    assert np.all(masked[mask3] == dtype(fill))
    np.testing.assert_array_equal(masked[~mask3], image[~mask3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.uint8])
def test_array_torch_dtype_kept(dtype):
    img = (_image() * 100).to(dtype)
    t = RandFreeFormMask(fill_value=200)
    t.set_random_state(0)
    out, holes = t.mask_with_holes(img)
    assert out.dtype == dtype and isinstance(out, torch.Tensor)
    assert torch.all(out[:, holes] == 200)
    assert torch.equal(out[:, ~holes], img[:, ~holes])


def test_free_form_2d_strokes_are_capsules():
    """The 2D drawing (Pillow) covers what the capsule definition says, up to the pixel grid at the edge."""
    from masksup_med.transforms.free_form import StrokeGeometry, _first_covering_segment

    geometry = StrokeGeometry(
        starts=np.array([[10.0, 12.0], [40.0, 50.0], [20.0, 70.0]]),
        ends=np.array([[40.0, 50.0], [60.0, 20.0], [22.0, 71.0]]),
        radii=np.array([4.0, 6.5, 3.0]),
        target_ratio=1.0,
    )  # target 1: every segment drawn
    shape = (72, 96)
    drawn = RandFreeFormMask().rasterize(geometry, shape, torch.device("cpu"))
    exact = _first_covering_segment(geometry.starts, geometry.ends, geometry.radii, shape, torch.device("cpu")) < 3
    assert drawn.dtype == torch.bool and drawn.shape == shape
    intersection, union = (drawn & exact).sum().item(), (drawn | exact).sum().item()
    assert intersection / union > 0.85
    # disagreements only on the rim: each differing pixel is within 1.5 px of a capsule's edge
    rows, cols = torch.nonzero(drawn ^ exact, as_tuple=True)
    points = torch.stack([rows, cols], 1).double()
    rims = []
    for a, b, r in zip(geometry.starts, geometry.ends, geometry.radii):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        t = ((points - a) @ (b - a) / max(float((b - a) @ (b - a)), 1e-12)).clamp(0, 1)
        rims.append(((points - a - t[:, None] * (b - a)).norm(dim=1) - r).abs())
    assert bool((torch.stack(rims).min(0).values <= 1.5).all())


def test_free_form_2d_stops_at_the_first_segment_reaching_the_target():
    from masksup_med.transforms.free_form import StrokeGeometry

    starts = np.array([[10.0, 10.0], [10.0, 50.0], [50.0, 10.0], [50.0, 50.0]])
    geometry = StrokeGeometry(starts=starts, ends=starts + 1.0, radii=np.full(4, 8.0), target_ratio=0.07)
    holes = RandFreeFormMask().rasterize(geometry, (64, 64), torch.device("cpu"))
    assert holes[10, 10] and holes[10, 50]  # two discs of ~200 px are needed for 7 % of 4096 px
    assert not holes[50, 10] and not holes[50, 50]


def test_free_form_3d():
    t = RandFreeFormMaskd(keys="image", hole_key="holes", fill_value=-1.0)
    t.set_random_state(0)
    data = {"image": torch.rand(2, 16, 20, 24), "label": torch.zeros(1, 16, 20, 24)}
    fractions = []
    for _ in range(3):
        out = t(data)
        holes = out["holes"]
        assert holes.shape == (1, 16, 20, 24)
        assert out["image_masked"].shape == (2, 16, 20, 24)
        assert torch.all(out["image_masked"][holes.expand(2, -1, -1, -1)] == -1.0)
        fractions.append(holes.float().mean().item())
    assert all(0.39 <= f <= 0.66 for f in fractions), fractions


def test_patch_3d_exact_count():
    t = RandPatchMask(ratio_range=0.5, patch_size=(4, 8, 8))
    t.set_random_state(0)
    img = torch.rand(1, 8, 16, 16)  # grid 2 x 2 x 2
    _, holes = t.mask_with_holes(img)
    assert holes.shape == (8, 16, 16)
    blocks = holes.reshape(2, 4, 2, 8, 2, 8).permute(0, 2, 4, 1, 3, 5).reshape(8, -1)
    assert torch.all(blocks.all(1) | ~blocks.any(1))
    assert int(blocks.all(1).sum()) == 4


# ---------------------------------------------------------------------------------------------
# 4. batch masking
# ---------------------------------------------------------------------------------------------


def _per_sample(transform, batch):
    outs, holes = [], []
    for sample in batch:
        o, h = transform.mask_with_holes(sample)
        outs.append(o)
        holes.append(h)
    return torch.stack(outs), torch.stack(holes)


@pytest.mark.parametrize("name", sorted(ARRAY_TRANSFORMS))
def test_mask_batch_equals_per_sample(name):
    batch = _image((4, 3, 64, 64))
    batched = ARRAY_TRANSFORMS[name]()
    batched.set_random_state(11)
    single = ARRAY_TRANSFORMS[name]()
    single.set_random_state(11)
    out_b, holes_b = batched.mask_batch(batch)
    out_s, holes_s = _per_sample(single, batch)
    assert out_b.shape == batch.shape and holes_b.shape == (4, 64, 64)
    assert torch.equal(holes_b, holes_s)
    assert torch.equal(out_b, out_s)
    # samples get different holes
    assert not torch.equal(holes_b[0], holes_b[1])
    # and the per-sample call also equals __call__ (same draws)
    again = ARRAY_TRANSFORMS[name]()
    again.set_random_state(11)
    assert torch.equal(torch.stack([again(s) for s in batch]), out_b)


def test_mask_batch_with_prob_matches_per_sample():
    batch = _image((6, 1, 32, 32))
    a, b = RandPatchMask(patch_size=8, prob=0.5), RandPatchMask(patch_size=8, prob=0.5)
    a.set_random_state(2)
    b.set_random_state(2)
    out_b, holes_b = a.mask_batch(batch)
    out_s, holes_s = _per_sample(b, batch)
    assert torch.equal(holes_b, holes_s) and torch.equal(out_b, out_s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(ARRAY_TRANSFORMS))
def test_mask_batch_cuda_matches_cpu(name):
    batch = _image((4, 3, 64, 64))
    cpu_t, gpu_t = ARRAY_TRANSFORMS[name](), ARRAY_TRANSFORMS[name]()
    cpu_t.set_random_state(5)
    gpu_t.set_random_state(5)
    out_c, holes_c = cpu_t.mask_batch(batch)
    out_g, holes_g = gpu_t.mask_batch(batch.to(torch.device("cuda")))
    assert out_g.device.type == "cuda" and holes_g.device.type == "cuda"
    holes_g, out_g = holes_g.cpu(), out_g.cpu()
    if name == "patch":
        assert torch.equal(holes_g, holes_c) and torch.equal(out_g, out_c)
    else:
        # float32 distances may round differently on a brush border: allow a handful of pixels
        mismatch = (holes_g != holes_c).float().mean().item()
        assert mismatch < 1e-3, mismatch
        agree = holes_g == holes_c
        assert torch.equal(out_g[agree.unsqueeze(1).expand_as(out_g)], out_c[agree.unsqueeze(1).expand_as(out_c)])


# ---------------------------------------------------------------------------------------------
# 5. bad parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RandFreeFormMask, RandFreeFormMaskd, RandPatchMask, RandPatchMaskd])
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, (0.6, 0.4), (-0.1, 0.5), (0.2, 1.0)])
def test_bad_ratio_raises(cls, ratio):
    with pytest.raises(ValueError, match="ratio_range"):
        cls(ratio_range=ratio)


@pytest.mark.parametrize("cls", [RandPatchMask, RandPatchMaskd])
@pytest.mark.parametrize("size", [0, -4, (16, 0)])
def test_non_positive_patch_size_raises(cls, size):
    with pytest.raises(ValueError, match="patch_size"):
        cls(patch_size=size)


def test_patch_larger_than_image_raises_at_first_call():
    t = RandPatchMask(patch_size=32)  # constructing is fine: the image size is unknown yet
    with pytest.raises(ValueError, match="patch_size"):
        t(torch.rand(1, 16, 64))
    td = RandPatchMaskd(keys="image", patch_size=(8, 128))
    with pytest.raises(ValueError, match="patch_size"):
        td({"image": torch.rand(1, 64, 64)})
    with pytest.raises(ValueError, match="patch_size"):
        RandPatchMask(patch_size=32).mask_batch(torch.rand(2, 1, 16, 16))


def test_patch_larger_than_image_raises_even_when_not_masking():
    # the shape check does not depend on the coin flip: a bad configuration fails on the first sample
    with pytest.raises(ValueError, match="patch_size"):
        RandPatchMask(patch_size=32, prob=0.0)(torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match="patch_size"):
        RandPatchMaskd(keys="image", patch_size=32, prob=0.0)({"image": torch.rand(1, 16, 16)})


@pytest.mark.parametrize("cls", [RandFreeFormMaskd, RandPatchMaskd])
def test_masked_keys_equal_keys_raise(cls):
    with pytest.raises(ValueError, match="masked_keys"):
        cls(keys="image", masked_keys="image")
    with pytest.raises(ValueError, match="masked_keys"):
        cls(keys=["a", "b"], masked_keys=["b", "c"])
    with pytest.raises(ValueError, match="hole_key"):
        cls(keys="image", hole_key="image_masked")


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
def test_missing_key(name):
    data = {"label": torch.zeros(1, 64, 64)}
    with pytest.raises(KeyError, match="image"):
        DICT_TRANSFORMS[name](keys="image")(data)
    out = DICT_TRANSFORMS[name](keys="image", allow_missing_keys=True, hole_key="h")(data)
    assert set(out) == {"label"}
    assert out["label"] is data["label"]


@pytest.mark.parametrize("name", sorted(ARRAY_TRANSFORMS))
@pytest.mark.parametrize("shape", [(1, 64), (1, 2, 16, 16, 16)])
def test_1d_and_4d_spatial_input_raise(name, shape):
    t = ARRAY_TRANSFORMS[name]()
    with pytest.raises(ValueError, match="2D or 3D"):
        t(torch.rand(shape))


@pytest.mark.parametrize("name", sorted(DICT_TRANSFORMS))
@pytest.mark.parametrize("prob", [1.0, 0.0])
def test_dict_1d_and_4d_spatial_input_raise(name, prob):
    t = DICT_TRANSFORMS[name](keys="image", prob=prob)
    for shape in [(1, 64), (1, 2, 16, 16, 16)]:
        with pytest.raises(ValueError, match="2D or 3D"):
            t({"image": torch.rand(shape)})


def test_free_form_other_bad_parameters():
    with pytest.raises(ValueError, match="brush_width"):
        RandFreeFormMask(brush_width=(0.0, 0.1))
    with pytest.raises(ValueError, match="step_length"):
        RandFreeFormMask(step_length=(0.3, 0.1))
    with pytest.raises(ValueError, match="vertices"):
        RandFreeFormMask(vertices=(0, 3))
    with pytest.raises(ValueError, match="turn"):
        RandFreeFormMask(turn=-1.0)


def test_randomize_false_with_other_shape_raises():
    t = RandPatchMask(patch_size=8)
    t(torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match="randomize=False"):
        t(torch.rand(1, 16, 16), randomize=False)
    # same shape: reuses the previous holes
    img = torch.rand(1, 32, 32)
    a = t(img)
    b = t(img, randomize=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [[0.3], [0.1, 0.2, 0.3]])
def test_ratio_range_of_wrong_length_names_the_parameter(bad):
    with pytest.raises(ValueError, match="ratio_range"):
        RandFreeFormMask(ratio_range=bad)


# ---------------------------------------------------------------------------------------------
# bank of pre-drawn masks (the fast path)
# ---------------------------------------------------------------------------------------------


def _coverage(holes: torch.Tensor) -> np.ndarray:
    return holes.float().flatten(1).mean(1).numpy()


def test_bank_coverage_follows_the_strokes_distribution():
    """Bank masks handed out with flips and offsets cover what fresh strokes cover (same histogram)."""
    from scipy.stats import ks_2samp

    shape = (64, 96)
    strokes = RandFreeFormMask(ratio_range=(0.2, 0.6))
    strokes.set_random_state(11)
    fresh = []
    for _ in range(200):
        strokes.randomize(shape)
        fresh.append(strokes.holes())
    bank = RandMaskBank(RandFreeFormMask(ratio_range=(0.2, 0.6)), bank_size=200, bank_seed=5)
    bank.set_random_state(3)
    handed_out = torch.cat([bank.mask_batch(torch.zeros(40, 1, *shape))[1] for _ in range(5)])
    fresh_cov, bank_cov = _coverage(torch.stack(fresh)), _coverage(handed_out)
    assert ks_2samp(fresh_cov, bank_cov).pvalue > 0.01
    assert bank_cov.min() >= 0.2 and abs(bank_cov.mean() - fresh_cov.mean()) < 0.03
    assert np.histogram(bank_cov, bins=4, range=(0.2, 0.6))[0].min() > 0  # the whole range, not one value


def test_bank_flips_and_offsets_keep_each_mask_coverage_and_move_its_holes():
    bank = RandMaskBank(bank_size=8, bank_seed=1)
    bank.set_random_state(0)
    shape = (48, 64)
    masks = bank.bank(shape)
    draw = bank.draw(32, shape)
    moved = bank.lookup(draw, shape, "cpu")
    np.testing.assert_allclose(_coverage(moved), _coverage(masks[torch.as_tensor(draw.index)]))
    assert not all(torch.equal(m, masks[i]) for m, i in zip(moved, draw.index))
    plain = bank.lookup(type(draw)(draw.index, np.zeros_like(draw.flips), np.zeros_like(draw.shifts)), shape, "cpu")
    assert torch.equal(plain, masks[torch.as_tensor(draw.index)])  # no flip, no offset: the bank mask itself


def test_bank_batch_masking_is_reproducible_and_leaves_unmasked_pixels_alone():
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run(seed):
        bank = RandMaskBank(bank_size=16, bank_seed=2, fill_value=0.25)
        bank.set_random_state(seed)
        return bank.mask_batch(images)

    (a, holes_a), (b, holes_b), (_, holes_c) = run(4), run(4), run(5)
    assert torch.equal(a, b) and torch.equal(holes_a, holes_b) and not torch.equal(holes_a, holes_c)
    per_pixel = holes_a.unsqueeze(1).expand_as(images)
    assert torch.all(a[per_pixel] == 0.25) and torch.equal(a[~per_pixel], images[~per_pixel])
    assert torch.equal(images, torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)))  # not in place


def test_bank_is_the_same_whatever_the_random_state():
    first, second = RandMaskBank(bank_size=4, bank_seed=9), RandMaskBank(bank_size=4, bank_seed=9)
    first.set_random_state(1)
    second.set_random_state(2)
    assert torch.equal(first.bank((32, 32)), second.bank((32, 32)))  # every process draws the same bank
    assert RandMaskBank(bank_size=4).hyperparameters()["mask_source"] == "RandFreeFormMask"
