"""SimCLR's and BYOL's augmentation against their sources, not against ourselves.

The references here are transcriptions, in numpy and written in this file, of what the official code
computes: TF's kernels (tensorflow/core/kernels/image/: adjust_contrast, adjust_saturation, adjust_hue,
resize_bicubic, sample_distorted_bounding_box), the SimCLR v1 pipeline (data_util.py preprocess_for_train,
impl 'simclrv1') and BYOL's (byol/utils/dataset.py _decode_and_random_crop, augmentations.py). Each
operation is compared value for value given its random draw; the samplers and the whole pipelines in
distribution, with two-sample Kolmogorov-Smirnov tests at fixed seeds whose critical values sit at a
false-alarm rate of about 1e-5 (as tests/test_gpu_augment.py). torchvision's operations of the same
names (what simclr.py computed before) fail them: brightness multiplies, contrast blends with one grayscale
mean, saturation blends with the grayscale image, RandomResizedCrop draws the area uniformly and the
aspect log-uniformly and falls back to a centre crop."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import byol
import simclr
from common import gpu_augment as ga
from common import tf_image

KS = 2.47  # two-sided Kolmogorov-Smirnov coefficient at α = 1e-5


def ks(a, b):
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    points = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, points, "right") / len(a) - np.searchsorted(b, points, "right") / len(b)).max()


def ks_limit(n, m):
    return KS * math.sqrt((n + m) / (n * m))


def f32(x):
    return np.float32(x)


# --- TF's kernels, transcribed (float32 where the kernel computes in float) -----------------------------

def tf_rgb_to_hsv(r, g, b):  # adjust_saturation_op.cc internal::rgb_to_hsv, one pixel
    vv = max(r, max(g, b))
    rng = f32(vv - min(r, min(g, b)))
    s = f32(rng / vv) if vv > 0 else f32(0)
    norm = f32(1) / (f32(6) * rng) if rng > 0 else f32(0)
    if r == vv:
        hh = norm * (g - b)
    elif g == vv:
        hh = norm * (b - r) + f32(2.0 / 6.0)
    else:
        hh = norm * (r - g) + f32(4.0 / 6.0)
    if rng <= 0:
        hh = f32(0)
    if hh < 0:
        hh = hh + f32(1)
    return f32(hh), s, vv


def tf_hsv_to_rgb(h, s, v):  # internal::hsv_to_rgb, one pixel
    c = f32(s * v)
    m = f32(v - c)
    dh = f32(h * 6)
    category = int(dh)
    fmodu = dh
    while fmodu <= 0:
        fmodu += f32(2)
    while fmodu >= 2:
        fmodu -= f32(2)
    x = f32(c * (1 - abs(fmodu - 1)))
    rgb = {0: (c, x, 0), 1: (x, c, 0), 2: (0, c, x), 3: (0, x, c), 4: (x, 0, c), 5: (c, 0, x)}.get(category, (0, 0, 0))
    return [f32(t + m) for t in rgb]


def tf_adjust_saturation(image, scale):  # image (H, W, 3) float32
    out = np.empty_like(image)
    for i in np.ndindex(image.shape[:2]):
        h, s, v = tf_rgb_to_hsv(*image[i])
        out[i] = tf_hsv_to_rgb(h, min(f32(1), max(f32(0), f32(s * scale))), v)
    return out


def tf_adjust_hue(image, delta):  # adjust_hue_op.cc: hue turned with the pixel's max and min held
    out = np.empty_like(image)
    for i in np.ndindex(image.shape[:2]):
        r, g, b = image[i]
        if r < g:
            (vmax, vmid, vmin, cat) = (g, r, b, 1) if b < r else (b, g, r, 3) if b > g else (g, b, r, 2)
        else:
            (vmax, vmid, vmin, cat) = (r, g, b, 0) if b < g else (b, r, g, 4) if b > r else (r, b, g, 5)
        if vmax == vmin:
            h = f32(0)
        else:
            ratio = f32((vmid - vmin) / (vmax - vmin))
            h = f32(cat + (ratio if cat % 2 == 0 else 1 - ratio))
        h = f32(h + f32(delta) * 6)
        while h < 0:
            h += 6
        while h >= 6:
            h -= 6
        cat = int(h)
        ratio = f32(h - cat)
        if cat % 2:
            ratio = 1 - ratio
        vmid = f32(vmin + ratio * (vmax - vmin))
        out[i] = {0: (vmax, vmid, vmin), 1: (vmid, vmax, vmin), 2: (vmin, vmax, vmid), 3: (vmin, vmid, vmax),
                  4: (vmid, vmin, vmax)}.get(cat, (vmax, vmin, vmid))
    return out


def tf_adjust_contrast(image, factor):  # AdjustContrastv2: (x − mean_c)·f + mean_c, mean over the image per channel
    mean = image.mean(axis=(0, 1), keepdims=True, dtype=np.float64)
    return ((image - mean) * factor + mean).astype(np.float32)


def tf_grayscale(image):  # tf.image.rgb_to_grayscale, tiled to 3 channels
    return np.repeat(image @ np.array([0.2989, 0.5870, 0.1140], np.float32)[:, None], 3, axis=-1)


def tf_resize_bicubic(image, out_h, out_w, half_pixel_centers):
    """resize_bicubic_op.cc on an (H, W, 3) float32 image: the coefficient table (1024 steps; a = −0.75 legacy,
    −0.5 with half-pixel centres), the edge pixel repeated (legacy) or taps outside given no weight and the
    rest renormalised (half-pixel); rows first, then columns."""
    table_size = 1024

    def coeffs(a):
        table = np.zeros((table_size + 1, 2), np.float32)
        for i in range(table_size + 1):
            x = i * 1.0 / table_size
            table[i, 0] = ((a + 2) * x - (a + 3)) * x * x + 1
            x += 1.0
            table[i, 1] = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return table
    table = coeffs(-0.5 if half_pixel_centers else -0.75)

    def taps(out_loc, in_size, out_size):
        scale = f32(in_size / f32(out_size))
        loc = f32((f32(out_loc) + f32(0.5)) * scale - f32(0.5)) if half_pixel_centers else f32(f32(out_loc) * scale)
        in_loc = math.floor(loc)
        offset = int(np.rint(f32(f32(loc - in_loc) * table_size)))
        weights = [table[offset, 1], table[offset, 0], table[table_size - offset, 0], table[table_size - offset, 1]]
        index = [min(in_size - 1, max(0, in_loc + k)) for k in (-1, 0, 1, 2)]
        if half_pixel_centers:
            weights = [w if index[k] == in_loc + k - 1 else f32(0) for k, w in enumerate(weights)]
            total = f32(f32(f32(weights[0] + weights[1]) + weights[2]) + weights[3])
            weights = [f32(w * f32(1 / total)) for w in weights]
        return index, weights

    height, width = image.shape[:2]
    yi, yw = (np.array(v) for v in zip(*[taps(y, height, out_h) for y in range(out_h)]))  # (out_h, 4) each
    xi, xw = (np.array(v) for v in zip(*[taps(x, width, out_w) for x in range(out_w)]))
    rows = np.zeros((out_h, width, image.shape[2]), np.float32)
    for j in range(4):  # Interpolate1D over the rows, taps summed in order
        rows = rows + image[yi[:, j]] * yw[:, j, None, None]
    out = np.zeros((out_h, out_w, image.shape[2]), np.float32)
    for k in range(4):  # then over the columns
        out = out + rows[:, xi[:, k]] * xw[None, :, k, None]
    return out


def tf_blur(image, sigma, kernel_size):
    """data_util.py gaussian_blur (and BYOL's): separable, 'SAME' zero padding, width then height."""
    radius = int(kernel_size / 2)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-t ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    out = np.apply_along_axis(lambda row: np.convolve(row, k, "same"), 1, image.astype(np.float64))
    return np.apply_along_axis(lambda col: np.convolve(col, k, "same"), 0, out)


def tf_sample_distorted_bounding_box(rng, height, width, area_range=(0.08, 1.0), aspect_range=(0.75, 4 / 3),
                                     min_object_covered=0.1, max_attempts=100):
    """sample_distorted_bounding_box_op.cc with the whole image as the box: (top, left, h, w, found)."""
    min_area = f32(f32(area_range[0]) * width) * height
    max_area = f32(f32(area_range[1]) * width) * height
    for _ in range(max_attempts):
        a = f32(f32(rng.random()) * f32(f32(aspect_range[1]) - f32(aspect_range[0])) + f32(aspect_range[0]))
        h = int(np.rint(np.sqrt(f32(min_area / a), dtype=np.float32)))
        max_h = int(np.rint(np.sqrt(f32(max_area / a), dtype=np.float32)))
        if np.rint(f32(max_h * a)) > width:
            max_h = int((width + 0.5 - float(f32(1e-7))) / float(a))
            if np.rint(f32(max_h * a)) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += int(rng.integers(max_h - h + 1))
        w = int(np.rint(f32(h * a)))
        area = f32(w * h)
        if area < min_area:
            h += 1
            w = int(np.rint(f32(h * a)))
            area = f32(w * h)
        if area > max_area:
            h -= 1
            w = int(np.rint(f32(h * a)))
            area = f32(w * h)
        if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
            continue
        y = int(rng.integers(height - h)) if h < height else 0
        x = int(rng.integers(width - w)) if w < width else 0
        if area >= 1 and f32(area / f32(width * height)) >= f32(min_object_covered):
            return y, x, h, w, True
    return 0, 0, height, width, False


def byol_crop(rng, height, width):
    """byol/utils/dataset.py _decode_and_random_crop: one draw, the sides clamped to the image."""
    area = f32(rng.uniform(0.08, 1.0)) * f32(height * width)
    a = f32(np.exp(f32(rng.uniform(np.log(3 / 4), np.log(4 / 3)))))
    w = min(int(np.rint(np.sqrt(f32(area * a)))), width)
    h = min(int(np.rint(np.sqrt(f32(area / a)))), height)
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


# BYOL's augmentations.py colour functions (jnp in the source), on (H, W, 3)
def jax_rgb_to_hsv(r, g, b):
    vv = np.maximum(np.maximum(r, g), b)
    range_ = vv - np.minimum(np.minimum(r, g), b)
    sat = np.where(vv > 0, range_ / np.where(vv > 0, vv, 1), 0.0)
    norm = np.where(range_ != 0, 1.0 / (6.0 * np.where(range_ != 0, range_, 1)), 1e9)
    hue = np.where(r == vv, norm * (g - b), np.where(g == vv, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
    hue = hue * (range_ > 0)
    return hue + (hue < 0), sat, vv


def jax_hsv_to_rgb(h, s, v):
    c = s * v
    m = v - c
    dh = (h % 1.0) * 6.0
    x = c * (1 - np.abs(dh % 2.0 - 1))
    cat = np.floor(dh).astype(int)
    rr = np.where((cat == 0) | (cat == 5), c, np.where((cat == 1) | (cat == 4), x, 0)) + m
    gg = np.where((cat == 1) | (cat == 2), c, np.where((cat == 0) | (cat == 3), x, 0)) + m
    bb = np.where((cat == 3) | (cat == 4), c, np.where((cat == 2) | (cat == 5), x, 0)) + m
    return np.stack([rr, gg, bb], -1)


def jax_saturation(image, f):
    h, s, v = jax_rgb_to_hsv(*np.moveaxis(image, -1, 0))
    return jax_hsv_to_rgb(h, np.clip(s * f, 0, 1), v)


def jax_hue(image, delta):
    h, s, v = jax_rgb_to_hsv(*np.moveaxis(image, -1, 0))
    return jax_hsv_to_rgb((h + delta) % 1.0, s, v)


# --- helpers --------------------------------------------------------------------------------------------

def images(n=12, height=6, width=7, seed=0):
    """Random colour images in [0, 1] with grey pixels and ties among channels (the kernels' special cases)."""
    x = torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))
    x[:, :, 0, 0] = 0.4  # grey
    x[:, 1, 0, 1] = x[:, 0, 0, 1]  # r == g
    x[:, :, 0, 2] = 0.0  # black
    return x


def hwc(x):
    return x.permute(1, 2, 0).numpy().astype(np.float32)


def chw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32))).permute(2, 0, 1)


# --- each operation against its kernel, value for value -------------------------------------------------

def test_colour_operations_equal_tf_kernels_given_the_draw():
    x = images()
    n = len(x)
    draw = torch.rand(n, generator=torch.Generator().manual_seed(1))
    cases = [
        (tf_image.adjust_brightness, draw * 0.8 - 0.4, lambda im, d: im + f32(d)),  # TF: x + δ
        (tf_image.adjust_contrast, draw * 0.8 + 0.6, tf_adjust_contrast),
        (tf_image.adjust_saturation, draw * 0.8 + 0.6, tf_adjust_saturation),
        (tf_image.adjust_hue, draw * 0.2 - 0.1, tf_adjust_hue),
    ]
    for op, parameter, reference in cases:
        ours = op(x, parameter)
        for i in range(n):
            expected = chw(reference(hwc(x[i]), float(parameter[i])))
            torch.testing.assert_close(ours[i], expected, rtol=0, atol=2e-6, msg=f"{op.__name__} sample {i}")
    torch.testing.assert_close(tf_image.rgb_to_grayscale(x).expand_as(x)[3], chw(tf_grayscale(hwc(x[3]))), rtol=0, atol=1e-6)


def test_hsv_operations_equal_byol_jax_code():
    """BYOL's augmentations.py writes its own HSV conversion (to match TF's): the same values."""
    x = images(seed=2)
    f = torch.rand(len(x), generator=torch.Generator().manual_seed(3)) * 0.4 + 0.8
    delta = torch.rand(len(x), generator=torch.Generator().manual_seed(4)) * 0.2 - 0.1
    sat, hue = tf_image.adjust_saturation(x, f), tf_image.adjust_hue(x, delta)
    for i in range(len(x)):
        torch.testing.assert_close(sat[i], chw(jax_saturation(hwc(x[i]), float(f[i]))), rtol=0, atol=2e-6)
        torch.testing.assert_close(hue[i], chw(jax_hue(hwc(x[i]), float(delta[i]))), rtol=0, atol=2e-6)


@pytest.mark.parametrize("half_pixel_centers", [False, True])
def test_resize_bicubic_equals_tf_kernel(half_pixel_centers):
    """Up and down, in a crop window: SimCLR v1's TF1 resize_bicubic (legacy grid) and BYOL's TF2 resize."""
    x = torch.rand(3, 3, 13, 17, generator=torch.Generator().manual_seed(5))
    windows = [(2, 3, 9, 11, (16, 14)), (0, 0, 13, 17, (5, 6)), (4, 1, 7, 16, (7, 16))]
    for i, (top, left, h, w, size) in enumerate(windows):
        ours = tf_image.resize_bicubic(x[i:i + 1], *(torch.tensor([v]) for v in (top, left, h, w)), size, half_pixel_centers)
        expected = tf_resize_bicubic(hwc(x[i])[top:top + h, left:left + w], *size, half_pixel_centers)
        torch.testing.assert_close(ours[0], chw(expected), rtol=0, atol=2e-6)
    # the batched path (several windows at once, as on the device) gives the same values
    top, left, h, w = (torch.tensor(v) for v in zip(*[(t, l, hh, ww) for t, l, hh, ww, _ in windows]))
    both = tf_image.resize_bicubic(x, top, left, h, w, (8, 9), half_pixel_centers)
    for i in range(3):
        one = tf_image.resize_bicubic(x[i:i + 1], top[i:i + 1], left[i:i + 1], h[i:i + 1], w[i:i + 1], (8, 9), half_pixel_centers)
        torch.testing.assert_close(both[i], one[0], rtol=0, atol=1e-6)


def test_blur_equals_the_official_blur_with_zero_padding():
    x = images(n=4, height=9, width=10, seed=6)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    for kernel_size in (3.2, 22.4 / 4, 7):
        ours = tf_image.gaussian_blur(x, sigma, kernel_size)
        for i in range(4):
            expected = np.stack([tf_blur(x[i, c].numpy(), float(sigma[i]), kernel_size) for c in range(3)])
            torch.testing.assert_close(ours[i], torch.from_numpy(expected).float(), rtol=0, atol=1e-6)



def test_blur_equals_the_official_blur_across_blocks():
    """Lines longer than one block of the banded product (and not a whole number of blocks), the 224-px kernel."""
    x = images(n=2, height=37, width=50, seed=7)
    sigma = torch.tensor([0.4, 2.0])
    for kernel_size in (22.4, 7):
        ours = tf_image.gaussian_blur(x, sigma, kernel_size)
        for i in range(2):
            expected = np.stack([tf_blur(x[i, c].numpy(), float(sigma[i]), kernel_size) for c in range(3)])
            torch.testing.assert_close(ours[i], torch.from_numpy(expected).float(), rtol=0, atol=1e-6)
        one = tf_image.gaussian_blur(x[1:], sigma[1:], kernel_size)  # the one image alone: the same values
        torch.testing.assert_close(one[0], ours[1], rtol=0, atol=0)


def test_resize_of_a_full_size_window_equals_tf_kernel():
    """The one image's four-tap sums at the sizes of the ImageNet recipes: a 224-px view from a large window."""
    x = torch.rand(1, 3, 120, 150, generator=torch.Generator().manual_seed(8))
    for half_pixel_centers in (False, True):
        top, left, h, w = 7, 11, 101, 133
        ours = tf_image.resize_bicubic(x, *(torch.tensor([v]) for v in (top, left, h, w)), (64, 72), half_pixel_centers)
        expected = tf_resize_bicubic(hwc(x[0])[top:top + h, left:left + w], 64, 72, half_pixel_centers)
        torch.testing.assert_close(ours[0], chw(expected), rtol=0, atol=2e-6)

def test_colour_operations_equal_tf_kernels_outside_the_unit_range():
    """SimCLR's crop leaves the bicubic overshoot unclipped, so the first jitter op can see values below 0 and
    above 1: saturation and hue (written without TF's HSV round trip) still equal the kernels there, including
    pixels whose max is ≤ 0 (saturation's S is 0 there, a grey pixel; hue turns them, max and min held)."""
    x = images(seed=12) * 1.6 - 0.3  # [−0.3, 1.3]
    x[:, :, 1, :3] = torch.tensor([[-0.2], [-0.05], [-0.1]])  # max < 0
    x[:, :, 1, 3] = torch.tensor([0.0, -0.1, -0.2])  # max = 0
    draw = torch.rand(len(x), generator=torch.Generator().manual_seed(13))
    cases = [(tf_image.adjust_saturation, draw * 1.6 + 0.2, tf_adjust_saturation),
             (tf_image.adjust_hue, draw * 0.4 - 0.2, tf_adjust_hue)]
    for op, parameter, reference in cases:
        ours = op(x, parameter)
        for i in range(len(x)):
            expected = chw(reference(hwc(x[i]), float(parameter[i])))
            # as above: float32 rounding of ours against the kernel's order of operations (6e-7 measured at most)
            torch.testing.assert_close(ours[i], expected, rtol=0, atol=2e-6, msg=f"{op.__name__} sample {i}")


def test_one_image_bounding_box_equals_the_batched_sampler():
    """The CPU loader's one image takes the Python-scalar form of the sampler: the same box as the batched form
    from the same draws, attempt for attempt (fallback and narrow ranges included)."""
    cases = [(32, 32, {}), (24, 40, {}), (375, 500, {}), (4, 64, {}),
             (30, 30, dict(area_range=(0.5, 0.502), aspect_ratio_range=(0.1, 10.0))),
             (17, 9, dict(area_range=(0.2, 0.6), aspect_ratio_range=(0.5, 2.0), min_object_covered=0.3))]
    for height, width, kw in cases:
        kw = {"area_range": (0.08, 1.0), "aspect_ratio_range": (3 / 4, 4 / 3), "min_object_covered": 0.1, **kw}
        u = torch.rand(1000, 100, 4, generator=torch.Generator().manual_seed(height), dtype=torch.float64)
        batched = torch.stack(tf_image._bounding_box(u, height, width, *kw.values()), dim=1)
        one = torch.tensor([tf_image._bounding_box_one(u[i], height, width, *kw.values()) for i in range(len(u))])
        assert torch.equal(one, batched), (height, width, (one != batched).any(dim=1).sum())
        single = tf_image.sample_distorted_bounding_box(torch.Generator().manual_seed(5), 1, height, width, **kw)
        u = torch.rand(1, 100, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        assert torch.equal(torch.stack(single, dim=1), torch.stack(tf_image._bounding_box(u, height, width, *kw.values()), 1))

# --- the crop samplers against the kernels, in distribution ---------------------------------------------

def crop_statistics(top, left, h, w, height, width):
    top, left, h, w = (np.asarray(v, np.float64) for v in (top, left, h, w))
    return {"area": h * w / (height * width), "aspect": w / h, "top": top / height, "left": left / width,
            "bottom gap": (height - top - h) / height}


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40)])
def test_bounding_box_sampler_follows_tf_kernel(height, width):
    n = 4000
    top, left, h, w = tf_image.sample_distorted_bounding_box(torch.Generator().manual_seed(7), n, height, width)
    rng = np.random.default_rng(0)
    ref = np.array([tf_sample_distorted_bounding_box(rng, height, width) for _ in range(n)])
    ours = crop_statistics(top, left, h, w, height, width)
    theirs = crop_statistics(*ref[:, :4].T, height, width)
    for key in ours:
        assert ks(ours[key], theirs[key]) < ks_limit(n, n), key
    # TF's corner never reaches H − h (nor W − w) unless the crop spans the whole side
    assert ((top + h <= height - 1) | (h == height)).all() and ((left + w <= width - 1) | (w == width)).all()
    assert ours["area"].min() >= 0.1  # min_object_covered


def test_bounding_box_sampler_falls_back_to_the_whole_image():
    """On a 4 x 64 strip no crop of aspect 3/4 to 4/3 covers 10%: TF returns the whole image (torchvision a centre crop)."""
    top, left, h, w = tf_image.sample_distorted_bounding_box(torch.Generator().manual_seed(8), 50, 4, 64)
    expected = tf_sample_distorted_bounding_box(np.random.default_rng(1), 4, 64)
    assert expected == (0, 0, 4, 64, False)
    assert (top == 0).all() and (left == 0).all() and (h == 4).all() and (w == 64).all()
    # where most attempts fail (area 50–50.2%, aspect 1/10 to 10), the fallback's rate is the kernel's
    n, box = 1000, dict(area_range=(0.5, 0.502), aspect_ratio_range=(0.1, 10.0))
    rng = np.random.default_rng(2)
    whole = 1 - np.mean([tf_sample_distorted_bounding_box(rng, 30, 30, (0.5, 0.502), (0.1, 10.0))[4] for _ in range(n)])
    top, left, h, w = tf_image.sample_distorted_bounding_box(torch.Generator().manual_seed(9), n, 30, 30, **box)
    ours = ((h == 30) & (w == 30)).double().mean().item()  # a found crop is half the image: whole means fallback
    assert 0.05 < whole < 0.3 and abs(ours - whole) < 4.5 * math.sqrt(2 * whole * (1 - whole) / n)


@pytest.mark.parametrize("height,width", [(375, 500), (32, 32)])
def test_byol_crop_sampler_follows_official_code(height, width):
    n = 4000
    top, left, h, w = tf_image.random_crop_clamped(torch.Generator().manual_seed(10), n, height, width)
    rng = np.random.default_rng(3)
    ref = np.array([byol_crop(rng, height, width) for _ in range(n)])
    ours, theirs = crop_statistics(top, left, h, w, height, width), crop_statistics(*ref.T, height, width)
    for key in ours:
        assert ks(ours[key], theirs[key]) < ks_limit(n, n), key
    if height != width:  # clamping, not retrying: many crops take the full height of a landscape image
        assert abs(np.mean(ours["area"]) - 0.52) < 0.02 and (h == height).float().mean() > 0.2


def test_one_image_byol_crop_equals_the_batched_sampler():
    """The CPU loader's one image takes the Python-scalar form of BYOL's crop: the same box as the batched form
    computes for that image's draws."""
    u = torch.rand(3000, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    for height, width, area_range in [(375, 500, (0.08, 1.0)), (32, 32, (0.08, 1.0)), (4, 64, (0.08, 1.0)),
                                      (17, 9, (0.2, 0.6)), (500, 333, (0.01, 1.0))]:
        box = (height, width, area_range, (3 / 4, 4 / 3))
        one = torch.tensor([tf_image._crop_clamped_one(u[i].tolist(), *box) for i in range(len(u))])
        batched = torch.stack([torch.cat(tf_image._crop_clamped(u[i:i + 1], *box)) for i in range(len(u))])
        assert torch.equal(one, batched), (height, width, (one != batched).any(dim=1).sum())
    single = tf_image.random_crop_clamped(torch.Generator().manual_seed(5), 1, 375, 500)
    u = torch.rand(1, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(torch.cat(single), torch.cat(tf_image._crop_clamped(u, 375, 500, (0.08, 1.0), (3 / 4, 4 / 3))))

# --- the method files' pipelines against the official pipelines, in distribution --------------------------

def picture(height=32, width=32):
    """A fixed colour image in [0, 1]: gradients, a bright square, a dark bar (as tests/test_gpu_augment.py)."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    img = np.stack([x, y, 1 - (x + y) / 2], -1)
    img[height // 4:height // 2, width // 4:width // 2] = [0.95, 0.85, 0.2]
    img[-height // 5:] *= 0.3
    return (np.round(img * 255) / 255).astype(np.float32)


def simclr_reference(rng, image, size, s):
    """data_util.py preprocess_for_train (impl 'simclrv1', no blur: the CIFAR-10 recipe), in numpy."""
    top, left, h, w, _ = tf_sample_distorted_bounding_box(rng, *image.shape[:2])
    x = tf_resize_bicubic(image[top:top + h, left:left + w], size, size, half_pixel_centers=False)
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if rng.random() < 0.8:  # color_jitter_rand: a random order, each result clipped
        ops = [lambda x: x + f32(rng.uniform(-0.8 * s, 0.8 * s)),
               lambda x: tf_adjust_contrast(x, rng.uniform(1 - 0.8 * s, 1 + 0.8 * s)),
               lambda x: jax_saturation(x, rng.uniform(1 - 0.8 * s, 1 + 0.8 * s)),
               lambda x: jax_hue(x, rng.uniform(-0.2 * s, 0.2 * s))]
        for k in rng.permutation(4):
            x = np.clip(ops[k](x), 0, 1)
    if rng.random() < 0.2:
        x = tf_grayscale(x)
    return np.clip(x, 0, 1)


def byol_reference(rng, image, size, blur, solarize):
    """dataset.py and augmentations.py (the ImageNet pipeline), in numpy."""
    top, left, h, w = byol_crop(rng, *image.shape[:2])
    x = np.clip(tf_resize_bicubic(image[top:top + h, left:left + w], size, size, half_pixel_centers=True), 0, 1)
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if rng.random() < 0.8:
        ops = [lambda x: x + rng.uniform(-0.4, 0.4), lambda x: tf_adjust_contrast(x, rng.uniform(0.6, 1.4)),
               lambda x: jax_saturation(x, rng.uniform(0.8, 1.2)), lambda x: jax_hue(x, rng.uniform(-0.1, 0.1))]
        for k in rng.permutation(4):
            x = np.clip(ops[k](x), 0, 1)
    if rng.random() < 0.2:
        x = tf_grayscale(x)
    x = np.clip(x, 0, 1)
    if rng.random() < blur:
        x = np.stack([tf_blur(x[..., c], rng.uniform(0.1, 2.0), size / 10) for c in range(3)], -1)
    if rng.random() < solarize:
        x = np.where(x < 0.5, x, 1 - x)
    return np.clip(x, 0, 1)


def cpu_views(transform, image, n):
    """The CPU loader's views of one image: the method's transform on the PIL image, a seed per sample."""
    pil = Image.fromarray(np.round(image * 255).astype(np.uint8))
    out, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker: one image, one thread
    try:
        for i in range(n):
            torch.manual_seed(i)
            out.append(transform(pil))
    finally:
        torch.set_num_threads(threads)
    return torch.stack(out)


def unnormalize(views, dataset="cifar10"):
    from common import data
    mean, std = data.MEAN_STD.get(dataset, data.IMAGENET_MEAN_STD)
    return views * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def compare(ours, theirs, name):
    """Per-view channel means, channel standard deviations and the mean absolute change from the input: their
    distributions over the draws must match (two-sample KS)."""
    n, m = len(ours), len(theirs)
    for stat in ("mean", "std"):
        a = getattr(ours, stat)(dim=(2, 3)).numpy()
        b = getattr(theirs, stat)(dim=(2, 3)).numpy()
        for c in range(3):
            assert ks(a[:, c], b[:, c]) < ks_limit(n, m), (name, stat, c)


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_simclr_views_follow_the_v1_pipeline(s):
    n = 400
    image = picture(24, 24)
    ours = unnormalize(cpu_views(simclr.augment(simclr.Args(s=s, image_size=16)), image, n))
    rng = np.random.default_rng(4)
    theirs = torch.stack([chw(simclr_reference(rng, image, 16, s)) for _ in range(n)])
    compare(ours, theirs, f"simclr s={s}")


def test_simclr_brightness_adds_delta():
    """On a grey image contrast, saturation and hue do nothing: a view is clip(v + δ) with δ ~ U[−0.8s, 0.8s]
    (TF, the v1 code) where jitter ran, then perhaps grayscale (no change); torchvision would give v·f."""
    n, s = 1000, 0.5
    grey = np.full((8, 8, 3), 128 / 255, np.float32)
    ours = unnormalize(cpu_views(simclr.augment(simclr.Args(s=s, image_size=8)), grey, n))[:, 0].flatten(1)
    assert (ours.max(1).values - ours.min(1).values).max() < 1e-5  # still flat
    change = (ours[:, 0] - 128 / 255).numpy()
    moved = change[np.abs(change) > 2e-4]  # grayscale alone moves grey by −5e-5 (its weights sum to 0.9999)
    assert abs(len(moved) / n - 0.8) < 4.5 * math.sqrt(0.16 / n)
    assert ks(moved, np.random.default_rng(5).uniform(-0.8 * s, 0.8 * s, 20000)) < ks_limit(len(moved), 20000)


@pytest.mark.parametrize("view", [1, 2])
def test_byol_imagenet_views_follow_the_official_pipeline(view):
    n = 400
    image = picture(30, 40)
    args = byol.Args(**byol.PRESETS["imagenet"], image_size=16, dataset="imagenet")
    blur, solarize = getattr(args, f"blur{view}"), getattr(args, f"solarize{view}")
    ours = unnormalize(cpu_views(byol.augment(args, blur, solarize), image, n), "imagenet")
    rng = np.random.default_rng(6 + view)
    theirs = torch.stack([chw(byol_reference(rng, image, 16, blur, solarize)) for _ in range(n)])
    compare(ours, theirs, f"byol view {view}")


def test_byol_brightness_adds_delta():
    """BYOL's ImageNet view 1 on a grey image (its blur kernel is 1 px at 8 px, no solarization): v + δ with
    δ ~ U[−0.4, 0.4] where the jitter ran (augmentations.py adds it); torchvision's v·f would move it half as far."""
    n = 1000
    grey = np.full((12, 12, 3), 128 / 255, np.float32)
    args = byol.Args(**byol.PRESETS["imagenet"], image_size=8, dataset="imagenet")
    ours = unnormalize(cpu_views(byol.augment(args, args.blur1, args.solarize1), grey, n), "imagenet")[:, 0].flatten(1)
    assert (ours.max(1).values - ours.min(1).values).max() < 1e-5  # still flat
    change = (ours[:, 0] - 128 / 255).numpy()
    moved = change[np.abs(change) > 2e-4]  # grayscale alone moves grey by −5e-5 (its weights sum to 0.9999)
    assert abs(len(moved) / n - 0.8) < 4.5 * math.sqrt(0.16 / n)
    assert ks(moved, np.random.default_rng(8).uniform(-0.4, 0.4, 20000)) < ks_limit(len(moved), 20000)


def test_byol_cifar10_recipe_keeps_solo_learns_torchvision_ops():
    names = [type(t).__name__ for t in byol.augment(byol.Args(), 0.0, 0.2).transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"] and "RandomSolarize" in names


# --- the device path runs the same functions on the batch ---------------------------------------------------

@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_device_pipeline_matches_the_cpu_views_in_distribution(method):
    """The batched path (every sample its own draws) against the CPU loader's one-image calls: same statistics."""
    n = 400
    image = picture(24, 24)
    if method == "simclr":
        transform = simclr.augment(simclr.Args(s=1.0, image_size=16, blur=True))
    else:
        transform = byol.augment(byol.Args(jax_ops=True, image_size=16), 1.0, 0.2)
    cpu = cpu_views(transform, image, n)
    device = ga.Pipeline(transform)(torch.from_numpy(image).permute(2, 0, 1).expand(n, -1, -1, -1).contiguous(),
                                    torch.Generator().manual_seed(11))
    compare(device, cpu, method)
