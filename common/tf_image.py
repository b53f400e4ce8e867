"""TensorFlow's image operations as TensorFlow computes them, batched: the plumbing of two official pipelines.

SimCLR's v1 code (data_util.py) augments with TF's image ops, and BYOL's JAX code (augmentations.py) with
ops written to match them. They share torchvision's names, not its arithmetic: brightness adds δ where
torchvision multiplies, contrast blends each channel with its own mean where torchvision blends with one
grayscale mean, saturation scales S in HSV (clipped to [0, 1]) where torchvision blends with the grayscale
image, the crop comes from TF's sample_distorted_bounding_box, and TF's bicubic resize has its own
kernel and pixel grid. Here each is written from TF's kernel source (tensorflow/core/kernels/image/).

Every function takes a batch x (n, 3, H, W) of floats, pixels in [0, 1], and per-sample parameters
(tensors of shape (n,)); the random draws come from a torch.Generator `g` on x's device (None: torch's
global generator). `Batched` runs such a function on the CPU loader's single image; --gpu-augment
(common/gpu_augment.py) calls the same function on the whole batch: both paths run one implementation.
"""
import math

import torch
import torch.nn.functional as F


def uniform(g, x, low, high):
    """(n,) draws from U[low, high), one per sample of x, as tf.random.uniform([], low, high)."""
    return low + (high - low) * torch.rand(len(x), generator=g, device=x.device)


def _where(chosen, fn, x):
    """fn(x) for the samples where `chosen` (n,) is True, x elsewhere. On the CPU loader (one image) fn runs
    only when it is chosen; on a device batch it runs on all and the result is selected (no host sync)."""
    if x.device.type == "cpu" and len(x) == 1:
        return fn(x) if bool(chosen) else x
    return torch.where(chosen.view(-1, 1, 1, 1), fn(x), x)


def random_apply(fn, x, p, g=None):
    """fn(x) with probability p per sample (SimCLR data_util.py random_apply: u ~ U[0, 1) below p)."""
    return _where(torch.rand(len(x), generator=g, device=x.device) < p, fn, x)


def random_order(x, ops, g=None, clip=True):
    """Apply ops [(fn, parameter (n,)), ...] in a random order per sample, each result clipped to [0, 1]
    when `clip` (SimCLR color_jitter_rand: tf.random_shuffle(tf.range(4)); BYOL: jax.random.permutation)."""
    order = torch.rand(len(x), len(ops), generator=g, device=x.device).argsort(dim=1)  # a uniform permutation
    for position in range(len(ops)):
        for k, (fn, parameter) in enumerate(ops):
            def step(x, fn=fn, parameter=parameter):
                y = fn(x, parameter)
                return y.clamp(0, 1) if clip else y
            x = _where(order[:, position] == k, step, x)
    return x


def _per_sample(t):
    return t.view(-1, 1, 1, 1)


# --- colour: TF's adjust_* ops ------------------------------------------------------------------------

def adjust_brightness(x, delta):
    """tf.image.adjust_brightness on floats: x + δ (no clipping inside the op)."""
    return x + _per_sample(delta)


def adjust_contrast(x, factor):
    """tf.image.adjust_contrast (AdjustContrastv2): each channel's mean μ_c over the image, then
    (x − μ_c)·f + μ_c (no clipping inside the op)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)  # (n, 3, 1, 1): one mean per channel
    return (x - mean) * _per_sample(factor) + mean


def rgb_to_hsv(x):
    """(h, s, v), each (n, H, W), as TF's adjust_saturation kernel converts (internal::rgb_to_hsv): h in
    [0, 1), 0 where the pixel is grey; s = (max − min)/max, 0 where max is 0."""
    r, g, b = x.unbind(dim=-3)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    s = torch.where(v > 0, chroma / torch.where(v > 0, v, 1.0), 0.0)
    norm = 1.0 / (6.0 * torch.where(chroma > 0, chroma, 1.0))
    h = torch.where(r == v, norm * (g - b), torch.where(g == v, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
    h = torch.where(chroma > 0, h, 0.0)
    return torch.where(h < 0, h + 1, h), s, v


def hsv_to_rgb(h, s, v):
    """(n, 3, H, W) from h, s, v (n, H, W), as TF's kernel (internal::hsv_to_rgb): the sextant of h·6 picks
    which channel is max (v), which is min (v − c) and which rises or falls in between."""
    c = s * v
    m = v - c
    dh = h * 6
    sextant = dh.trunc()  # static_cast<int>(dh)
    x = c * (1 - (dh.remainder(2.0) - 1).abs())
    zero = torch.zeros_like(c)
    rgb = {0: (c, x, zero), 1: (x, c, zero), 2: (zero, c, x), 3: (zero, x, c), 4: (x, zero, c), 5: (c, zero, x)}
    out = [zero, zero, zero]  # TF's default: a sextant outside 0..5 gives (m, m, m)
    for k, channels in rgb.items():
        out = [torch.where(sextant == k, new, old) for new, old in zip(channels, out)]
    return torch.stack(out, dim=-3) + m.unsqueeze(-3)


def adjust_saturation(x, factor):
    """tf.image.adjust_saturation: S ← clip(S·f, 0, 1) in HSV, H and V kept."""
    h, s, v = rgb_to_hsv(x)
    return hsv_to_rgb(h, (s * factor.view(-1, 1, 1)).clamp(0, 1), v)


def adjust_hue(x, delta):
    """tf.image.adjust_hue: H ← (H + δ) mod 1, S and V kept (TF's kernel turns the hue with max and min
    held, the same map)."""
    h, s, v = rgb_to_hsv(x)
    return hsv_to_rgb((h + delta.view(-1, 1, 1)).remainder(1.0), s, v)


def rgb_to_grayscale(x):
    """tf.image.rgb_to_grayscale: (n, 1, H, W), 0.2989 R + 0.5870 G + 0.1140 B."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.5870 * g + 0.1140 * b).unsqueeze(-3)


# --- blur -------------------------------------------------------------------------------------------------

def gaussian_blur(x, sigma, kernel_size):
    """SimCLR's data_util.py gaussian_blur and BYOL's augmentations.py: the kernel exp(−t²/2σ²) at the
    integers |t| ≤ r, r = int(kernel_size / 2), normalised; two depthwise convolutions (along the width,
    then the height) with 'SAME' padding, which pads with zeros. sigma: (n,)."""
    n, c, height, width = x.shape
    r = int(kernel_size / 2)
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-t ** 2 / (2.0 * sigma.view(-1, 1).to(x.dtype) ** 2))  # (n, 2r + 1)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # one per sample and channel
    x = x.reshape(1, n * c, height, width)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), padding=(0, r), groups=n * c)  # along the width
    x = F.conv2d(x, kernel.view(n * c, 1, -1, 1), padding=(r, 0), groups=n * c)  # along the height
    return x.view(n, c, height, width)


# --- crops ------------------------------------------------------------------------------------------------

def _lrint(t):
    return torch.round(t)  # lrintf: to the nearest, halves to even, as torch.round


def sample_distorted_bounding_box(g, n, height, width, area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
                                  min_object_covered=0.1, max_attempts=100, device=None):
    """tf.image.sample_distorted_bounding_box with the whole image as its one box, for n images of height × width:
    (top, left, h, w), each (n,) int64. The kernel (sample_distorted_bounding_box_op.cc), per attempt: an aspect
    ratio a uniform in the range; the height uniform over the integers between round(√(min_area/a)) and
    round(√(max_area/a)) (lowered so that round(h·a) fits the width, and capped at the height); the width
    round(h·a); one step up or down where rounding left the area outside the range; the crop must cover at least
    min_object_covered of the box (here: of the image); the corner uniform in [0, H − h) × [0, W − w) (never
    touching the bottom or right edge unless the crop spans it). The first of max_attempts that passes is kept;
    when none does, the whole image."""
    f32, i64 = torch.float32, torch.int64
    u = torch.rand(n, max_attempts, 4, generator=g, device=device, dtype=torch.float64)
    lo, hi = (torch.tensor(v, dtype=f32, device=device) for v in aspect_ratio_range)
    a = u[..., 0].to(f32) * (hi - lo) + lo  # RandFloat() · (max − min) + min, in float
    min_area = torch.tensor(area_range[0], dtype=f32, device=device) * width * height
    max_area = torch.tensor(area_range[1], dtype=f32, device=device) * width * height
    h = _lrint(torch.sqrt(min_area / a)).to(i64)
    max_h = _lrint(torch.sqrt(max_area / a)).to(i64)
    # the largest height whose rounded width fits: (W + 0.5 − 1e-7) / a in double, truncated, then one less if needed
    fit = ((width + 0.5 - 1e-7) / a.double()).to(i64)
    fit = torch.where(_lrint(fit * a) > width, fit - 1, fit)
    max_h = torch.where(_lrint(max_h * a) > width, fit, max_h).clamp(max=height)
    h = torch.minimum(h, max_h)
    h = h + (u[..., 1] * (max_h - h + 1)).floor().to(i64).clamp(max=max_h - h)  # Uniform(max_h − h + 1)
    w = _lrint(h * a).to(i64)
    area = (w * h).to(f32)
    small = area < min_area  # one step up, then one down, where rounding left the area outside the range
    h = torch.where(small, h + 1, h)
    w = torch.where(small, _lrint(h * a).to(i64), w)
    area = (w * h).to(f32)
    big = area > max_area
    h = torch.where(big, h - 1, h)
    w = torch.where(big, _lrint(h * a).to(i64), w)
    area = (w * h).to(f32)
    ok = (area >= min_area) & (area <= max_area) & (w <= width) & (h <= height) & (w > 0) & (h > 0)
    # SatisfiesOverlapConstraints with the image as the box: at least one pixel, and area / image area ≥ cover
    covered = area / torch.tensor(float(width * height), dtype=f32)
    ok &= (area >= 1) & (covered >= torch.tensor(min_object_covered, dtype=f32))
    top = torch.where(h < height, (u[..., 2] * (height - h)).floor().to(i64).clamp(max=height - h - 1), 0)
    left = torch.where(w < width, (u[..., 3] * (width - w)).floor().to(i64).clamp(max=width - w - 1), 0)
    first = ok.int().argmax(dim=1, keepdim=True)  # the first attempt that passed
    found = ok.any(dim=1)
    pick = lambda t, whole: torch.where(found, t.gather(1, first)[:, 0], whole)  # noqa: E731
    return pick(top, 0), pick(left, 0), pick(h, height), pick(w, width)


def random_crop_clamped(g, n, height, width, area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3), device=None):
    """BYOL's crop (deepmind-research byol/utils/dataset.py _decode_and_random_crop), for n images of height ×
    width: (top, left, h, w), each (n,) int64. One draw, no retry: an area A uniform in area_range × H·W and an
    aspect ratio a log-uniform in ratio_range; w = round(√(A·a)) and h = round(√(A/a)), each clamped to the
    image's side; the corner uniform over the positions where the crop fits."""
    f32, i64 = torch.float32, torch.int64
    u = torch.rand(n, 4, generator=g, device=device, dtype=torch.float64)
    area = (u[:, 0].to(f32) * (area_range[1] - area_range[0]) + area_range[0]) * float(height * width)
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    a = torch.exp(u[:, 1].to(f32) * (log_hi - log_lo) + log_lo)
    # tf.round (halves to even), then tf.minimum with the side; at least one pixel (only images under 17 px
    # in area could round to 0, where TF's decode_and_crop_jpeg would fail)
    w = _lrint(torch.sqrt(area * a)).to(i64).clamp(1, width)
    h = _lrint(torch.sqrt(area / a)).to(i64).clamp(1, height)
    left = (u[:, 2] * (width - w + 1)).floor().to(i64).clamp(max=width - w)  # uniform int in [0, W − w]
    top = (u[:, 3] * (height - h + 1)).floor().to(i64).clamp(max=height - h)
    return top, left, h, w

def _coefficients(a, offset, table_size=1024):
    """TF's bicubic coefficient table (resize_bicubic_op.cc InitCoeffsTable), read at `offset`: the weights of
    the four taps at in_loc − 1, in_loc, in_loc + 1, in_loc + 2, in double and stored as float as TF does."""
    def near(t):  # |t| ≤ 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):  # 1 ≤ |t| ≤ 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    t = offset.double() / table_size
    s = (table_size - offset).double() / table_size
    return [w.to(torch.float32) for w in (far(t + 1), near(t), near(s), far(s + 1))]


def _bicubic_taps(start, length, out, half_pixel_centers):
    """The four (index, weight) pairs of TF's ResizeBicubic for each output pixel along one axis of the window
    [start, start + length): indices (n, out, 4) into the full line, weights (n, out, 4) float32."""
    scale = length.to(torch.float32).view(-1, 1) / out  # CalculateResizeScale: in / out, in float
    o = torch.arange(out, device=length.device, dtype=torch.float32).view(1, -1)
    position = (o + 0.5) * scale - 0.5 if half_pixel_centers else o * scale  # HalfPixelScaler or LegacyScaler
    in_loc = position.floor()
    offset = _lrint((position - in_loc) * 1024).to(torch.int64)  # lrintf(delta · kTableSize)
    taps = in_loc.to(torch.int64).unsqueeze(-1) + torch.arange(-1, 3, device=length.device)  # (n, out, 4)
    bounded = torch.minimum(taps.clamp(min=0), length.view(-1, 1, 1) - 1)  # Bound(): repeat the edge pixel
    # half_pixel_centers (TF2's tf.image.resize): Keys' a = −0.5, taps outside the window get no weight and the
    # rest are renormalised; legacy (TF1's resize_bicubic): a = −0.75, the edge pixel repeated
    weight = torch.stack(_coefficients(-0.5 if half_pixel_centers else -0.75, offset), dim=-1)
    if half_pixel_centers:
        weight = torch.where(bounded == taps, weight, 0.0)
        w0, w1, w2, w3 = weight.unbind(-1)
        weight = weight * (1.0 / (((w0 + w1) + w2) + w3)).unsqueeze(-1)
    return bounded + start.view(-1, 1, 1), weight


def _interpolate(x, index, weight, dim):
    """Σ_k weight_k · x[index_k] along `dim` (-2 rows, -1 columns), the four taps summed in TF's order."""
    n, out = index.shape[:2]
    if dim == -2:
        taps = x.gather(-2, index.view(n, 1, out * 4, 1).expand(n, x.shape[1], out * 4, x.shape[-1]))
        taps = taps.view(n, x.shape[1], out, 4, x.shape[-1])
        w = weight.view(n, 1, out, 4, 1)
        return ((taps[:, :, :, 0] * w[:, :, :, 0] + taps[:, :, :, 1] * w[:, :, :, 1])
                + taps[:, :, :, 2] * w[:, :, :, 2]) + taps[:, :, :, 3] * w[:, :, :, 3]
    taps = x.gather(-1, index.view(n, 1, 1, out * 4).expand(n, x.shape[1], x.shape[2], out * 4))
    taps = taps.view(n, x.shape[1], x.shape[2], out, 4)
    w = weight.view(n, 1, 1, out, 4)
    return ((taps[..., 0] * w[..., 0] + taps[..., 1] * w[..., 1]) + taps[..., 2] * w[..., 2]) + taps[..., 3] * w[..., 3]


def resize_bicubic(x, top, left, h, w, size, half_pixel_centers):
    """The crop (top, left, h, w) of each image, resized to `size` (out_h, out_w) by TF's ResizeBicubic kernel
    (resize_bicubic_op.cc), no antialiasing, values not clipped: half_pixel_centers=False is TF1's
    tf.image.resize_bicubic (SimCLR v1), True is TF2's tf.image.resize(..., BICUBIC) (BYOL). The rows are
    interpolated first, then the columns, as the kernel does."""
    if len(x) == 1:  # the CPU loader's one image: interpolate within the window only
        x = x[..., int(top):int(top + h), int(left):int(left + w)]
        top, left = torch.zeros_like(top), torch.zeros_like(left)
    rows = _bicubic_taps(top, h, size[0], half_pixel_centers)
    cols = _bicubic_taps(left, w, size[1], half_pixel_centers)
    return _interpolate(_interpolate(x, *rows, dim=-2), *cols, dim=-1)


class Batched(torch.nn.Module):
    """One step of a view's pipeline written as a batched function fn(x, g) -> x on (n, 3, H, W) floats in [0, 1]
    (after ToImage and ToDtype). The CPU loader calls it on its one image, the random draws from torch's
    global generator (which common.data.Views seeds per sample); --gpu-augment finds `fn` and calls it on the
    whole batch with the step's generator."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, image):
        x = image.as_subclass(torch.Tensor)  # a plain tensor: torchvision's tv_tensors would rewrap each op
        return self.fn(x.unsqueeze(0), None)[0]

    def extra_repr(self):
        return getattr(self.fn, "__name__", None) or repr(self.fn)

