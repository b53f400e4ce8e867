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
Where the one image allows a cheaper form of the same arithmetic (a permutation applied directly, the crop
samplers in Python scalars, the resize's four-tap sums without a matrix), it takes it; tests/test_tf_augment.py
checks both forms against TF's kernels or against each other.
"""
import functools
import math
import struct

import torch
import torch.nn.functional as F


def uniform(g, x, low, high):
    """(n,) draws from U[low, high), one per sample of x, as tf.random.uniform([], low, high)."""
    return low + (high - low) * torch.rand(len(x), generator=g, device=x.device)


def _single(x):
    """The CPU loader's one image (a batch of 1 on the CPU), where Python may branch on a draw at no cost."""
    return x.device.type == "cpu" and len(x) == 1


def _where(chosen, fn, x):
    """fn(x) for the samples where `chosen` (n,) is True, x elsewhere. On the CPU loader (one image) fn runs
    only when it is chosen; on a device batch it runs on all and the result is selected (no host sync)."""
    if _single(x):
        return fn(x) if bool(chosen) else x
    return torch.where(chosen.view(-1, 1, 1, 1), fn(x), x)


def random_apply(fn, x, p, g=None):
    """fn(x) with probability p per sample (SimCLR data_util.py random_apply: u ~ U[0, 1) below p)."""
    return _where(torch.rand(len(x), generator=g, device=x.device) < p, fn, x)


def random_order(x, ops, g=None, clip=True):
    """Apply ops [(fn, parameter (n,)), ...] in a random order per sample, each result clipped to [0, 1]
    when `clip` (SimCLR color_jitter_rand: tf.random_shuffle(tf.range(4)); BYOL: jax.random.permutation)."""
    order = torch.rand(len(x), len(ops), generator=g, device=x.device).argsort(dim=1)  # a uniform permutation

    def step(x, k):
        y = ops[k][0](x, ops[k][1])
        return y.clamp(0, 1) if clip else y
    if _single(x):  # the CPU loader's one image: its permutation, op after op
        for k in order[0].tolist():
            x = step(x, k)
        return x
    for position in range(len(ops)):  # a batch: at each position, each sample's op (all run, one selected)
        for k in range(len(ops)):
            x = _where(order[:, position] == k, functools.partial(step, k=k), x)
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


def _or_one(t):
    """t (≥ 0) where it is positive, 1 where it is 0: t + (1 − sign t), exact. (The same as
    torch.where(t > 0, t, 1) in float arithmetic: on a CPU a comparison and torch.where's boolean mask cost
    several times an add.)"""
    return t + (1.0 - t.sign())


def adjust_saturation(x, factor):
    """tf.image.adjust_saturation: S ← clip(S·f, 0, 1) in HSV, H and V kept (the kernel converts each pixel to
    HSV, scales S, converts back: adjust_saturation_op.cc). Written without the round trip: with V = max and H
    held, every channel is V − S·V·g(H) for a g of the hue alone, so V − x scales with S, and
    x' = V − (V − x)·S'/S, where S'/S = min(f, V/(V − min)) (S·f reaches 1 exactly when f = V/(V − min)). The
    kernel's S is 0 where V ≤ 0 (x' = V, grey), and S' is clipped at 0 (f < 0): the ratio clamped at 0 covers
    both; where V = min the pixel is grey and V − x = 0, whatever the (finite) ratio: V/1 there."""
    v = x.amax(dim=-3, keepdim=True)
    ratio = torch.minimum(factor.view(-1, 1, 1, 1).to(x.dtype), v / _or_one(v - x.amin(dim=-3, keepdim=True)))
    return v - (v - x).mul_(ratio.clamp_(min=0))


# (R, G, B) read the hue circle at these sextant offsets: x = V − (V − min)·clamp(min(k, 4 − k), 0, 1) with
# k = (offset + H·6) mod 6, the hexcone's channels (R is max on sextants 5 and 0, G on 1-2, B on 3-4)
_HUE_OFFSETS = (5.0, 3.0, 1.0)


def adjust_hue(x, delta):
    """tf.image.adjust_hue: H ← (H + δ) mod 1, S and V kept. TF's kernel (adjust_hue_op.cc) holds each pixel's
    max and min and moves its middle channel along the hexcone; written here with the hue in sextants
    H·6 ∈ [0, 6) computed once for the three channels and each channel read off the hexcone at its offset
    (the same map: max, min and the hue's position within its sextant decide every channel)."""
    high, first = x.max(dim=-3, keepdim=True)  # (n, 1, H, W): V and the first channel holding it (r, g, then b)
    chroma = high - x.amin(dim=-3, keepdim=True)
    # the hue from that channel, as the kernel: (g − b)/C, (b − r)/C + 2 or (r − g)/C + 4, the numerator
    # gathered from (g − b, b − r, r − g) (each channel's next two, cyclically), the sextant's start 2·index
    numerator = (x.roll(-1, dims=-3) - x.roll(-2, dims=-3)).gather(-3, first)
    sextant = numerator.mul_(1.0 / _or_one(chroma)).add_(first * 2.0)
    sextant += delta.view(-1, 1, 1, 1).to(x.dtype) * 6.0  # grey: any hue
    k = sextant + _hue_offsets(x.dtype, x.device)  # (n, 3, H, W)
    # k mod 6: the same value as k.remainder(6.0) in faster operations (k / 6 rounds below m for every k < 6m,
    # so the floor is exact; k − 6m is then exact for m ≥ 0, and for m < 0 one rounding of the exact k − 6m,
    # as remainder's)
    k -= torch.floor(k / 6.0).mul_(6.0)
    return high - chroma * torch.minimum(k, 4.0 - k).clamp_(0, 1)


@functools.lru_cache(maxsize=8)
def _hue_offsets(dtype, device):
    return torch.tensor(_HUE_OFFSETS, dtype=dtype, device=device).view(3, 1, 1)


def rgb_to_grayscale(x):
    """tf.image.rgb_to_grayscale: (n, 1, H, W), 0.2989 R + 0.5870 G + 0.1140 B."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.5870 * g + 0.1140 * b).unsqueeze(-3)


# --- blur -------------------------------------------------------------------------------------------------

def gaussian_blur(x, sigma, kernel_size):
    """SimCLR's data_util.py gaussian_blur and BYOL's augmentations.py: the kernel exp(−t²/2σ²) at the
    integers |t| ≤ r, r = int(kernel_size / 2), normalised; two depthwise convolutions (along the width,
    then the height) with 'SAME' padding, which pads with zeros. sigma: (n,).

    A 1-D convolution with zero padding is the product of each line with a banded (Toeplitz) matrix,
    K[i, j] = k[i − j] for 0 ≤ i − j ≤ 2r and 0 elsewhere (k is symmetric: the convolution's flip changes
    nothing). Cut into blocks of B outputs, a block reads only its B + 2r inputs of the zero-padded line, and
    every block has the same (B + 2r, B) piece of the band: one product of all the blocks' windows with it
    (_convolve_lines), the same sums as the full line × K without its zeros."""
    r, block = int(kernel_size / 2), _BLOCK
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-t ** 2 / (2.0 * sigma.view(-1, 1).to(x.dtype) ** 2))  # (n, 2r + 1)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    d = torch.arange(block + 2 * r, device=x.device).view(-1, 1) - torch.arange(block, device=x.device)  # i − j
    band = torch.where((d >= 0) & (d <= 2 * r), kernel[:, d.clamp(0, 2 * r)], 0.0)  # (n, B + 2r, B)
    x = _convolve_lines(x, band)  # along the width
    return _convolve_lines(x.transpose(-1, -2), band).transpose(-1, -2)  # along the height


_BLOCK = 16  # B: outputs per block of the banded product (16 is the fastest on a CPU core at 224 px)


def _convolve_lines(x, band):
    """Each line x[i, c, h, :] (x: (n, c, H, W)) times its sample's band (n, B + 2r, B), blocks of B outputs."""
    n, c, height, width = x.shape
    inputs, block = band.shape[1:]
    blocks = -(-width // block)
    padded = F.pad(x, ((inputs - block) // 2, (inputs - block) // 2 + blocks * block - width))  # 'SAME': zeros
    windows = padded.unfold(-1, inputs, block).reshape(n, c * height * blocks, inputs)  # each block's inputs
    return torch.bmm(windows, band).view(n, c, height, blocks * block)[..., :width]


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
    u = torch.rand(n, max_attempts, 4, generator=g, device=device, dtype=torch.float64)  # per attempt: a, h, top, left
    box = (height, width, area_range, aspect_ratio_range, min_object_covered)
    if n == 1 and u.device.type == "cpu":  # the CPU loader's one image: attempt after attempt, as the kernel loops
        return torch.tensor(_bounding_box_one(u[0], *box)).view(4, 1).unbind(0)
    return _bounding_box(u, *box)


def _bounding_box(u, height, width, area_range, aspect_ratio_range, min_object_covered):
    """sample_distorted_bounding_box from the draws u (n, max_attempts, 4), every attempt of every image at once."""
    f32, i64, device = torch.float32, torch.int64, u.device
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


def _f32(v):
    """v rounded to float32. One operation on float32 operands computed in double (Python's float) and rounded
    once gives the float32 result (double carries more than twice float32's 24 bits), so _f32(a * b) is torch's
    float32 a * b."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _bounding_box_one(u, height, width, area_range, aspect_ratio_range, min_object_covered):
    """_bounding_box for one image, from its draws u (max_attempts, 4), in Python scalars: the same
    arithmetic step for step (float32 where the batched form computes in float32), stopping at the first attempt
    that passes, as the kernel's loop does; no tensor op per attempt (tests/test_tf_augment.py checks it against
    the batched form draw for draw)."""
    lo, hi = _f32(aspect_ratio_range[0]), _f32(aspect_ratio_range[1])
    min_area = _f32(_f32(_f32(area_range[0]) * width) * height)
    max_area = _f32(_f32(_f32(area_range[1]) * width) * height)
    attempts = (draw for first in range(0, len(u), 8) for draw in u[first:first + 8].tolist())  # (most pass at once)
    for u_a, u_h, u_top, u_left in attempts:
        a = _f32(_f32(_f32(u_a) * _f32(hi - lo)) + lo)
        h = round(_f32(math.sqrt(_f32(min_area / a))))  # round(): halves to even, as lrintf
        max_h = round(_f32(math.sqrt(_f32(max_area / a))))
        if round(_f32(max_h * a)) > width:
            max_h = int((width + 0.5 - 1e-7) / a)
            if round(_f32(max_h * a)) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        h += min(math.floor(u_h * (max_h - h + 1)), max_h - h)
        w = round(_f32(h * a))
        area = _f32(w * h)
        if area < min_area:
            h += 1
            w = round(_f32(h * a))
            area = _f32(w * h)
        if area > max_area:
            h -= 1
            w = round(_f32(h * a))
            area = _f32(w * h)
        ok = min_area <= area <= max_area and 0 < w <= width and 0 < h <= height
        if ok and area >= 1 and _f32(area / _f32(width * height)) >= _f32(min_object_covered):
            top = min(math.floor(u_top * (height - h)), height - h - 1) if h < height else 0
            left = min(math.floor(u_left * (width - w)), width - w - 1) if w < width else 0
            return top, left, h, w
    return 0, 0, height, width


def random_crop_clamped(g, n, height, width, area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3), device=None):
    """BYOL's crop (deepmind-research byol/utils/dataset.py _decode_and_random_crop), for n images of height ×
    width: (top, left, h, w), each (n,) int64. One draw, no retry: an area A uniform in area_range × H·W and an
    aspect ratio a log-uniform in ratio_range; w = round(√(A·a)) and h = round(√(A/a)), each clamped to the
    image's side; the corner uniform over the positions where the crop fits."""
    u = torch.rand(n, 4, generator=g, device=device, dtype=torch.float64)  # per image: area, ratio, left, top
    box = (height, width, area_range, ratio_range)
    if n == 1 and u.device.type == "cpu":  # the CPU loader's one image: in Python scalars
        return torch.tensor(_crop_clamped_one(u[0].tolist(), *box)).view(4, 1).unbind(0)
    return _crop_clamped(u, *box)


def _crop_clamped(u, height, width, area_range, ratio_range):
    """random_crop_clamped from the draws u (n, 4)."""
    f32, i64 = torch.float32, torch.int64
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


def _crop_clamped_one(u, height, width, area_range, ratio_range):
    """_crop_clamped for one image from its four draws u, in Python scalars: the same arithmetic step for step,
    each float32 operation rounded with _f32 (a torch scalar operand is rounded to float32 first, as torch does),
    the exponential torch's own on one float32 (tests/test_tf_augment.py checks it against the batched form)."""
    u_area, u_ratio, u_left, u_top = u
    area = _f32(_f32(_f32(u_area) * _f32(area_range[1] - area_range[0])) + _f32(area_range[0]))
    area = _f32(area * _f32(float(height * width)))
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    a = torch.exp(torch.tensor(_f32(_f32(_f32(u_ratio) * _f32(log_hi - log_lo)) + _f32(log_lo)))).item()
    w = min(max(round(_f32(math.sqrt(_f32(area * a)))), 1), width)  # round(): halves to even, as tf.round
    h = min(max(round(_f32(math.sqrt(_f32(area / a)))), 1), height)
    left = min(math.floor(u_left * (width - w + 1)), width - w)
    top = min(math.floor(u_top * (height - h + 1)), height - h)
    return top, left, h, w


@functools.lru_cache(maxsize=8)
def _coefficient_table(a, device, table_size=1024):
    """TF's bicubic coefficient table (resize_bicubic_op.cc InitCoeffsTable): for i = 0 .. table_size, the weight
    of a tap at distance i / table_size (near, |t| ≤ 1) and at 1 + i / table_size (far, 1 ≤ |t| ≤ 2), computed in
    double and stored as float as TF does: (table_size + 1, 2)."""
    t = torch.arange(table_size + 1, dtype=torch.float64, device=device) / table_size
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    return torch.stack([near, far], dim=-1).to(torch.float32)


def _coefficients(a, offset, table_size=1024):
    """The table read at `offset`, as the kernel does: the weights of the four taps at in_loc − 1, in_loc,
    in_loc + 1, in_loc + 2 (far and near at offset, near and far at table_size − offset)."""
    table = _coefficient_table(a, offset.device, table_size)
    near, far = table[offset].unbind(-1)
    near_back, far_back = table[table_size - offset].unbind(-1)
    return [far, near, near_back, far_back]


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


def _matrix(index, weight, size):
    """The taps of one axis as a matrix (n, out, size): row o holds the four weights of output pixel o at their
    input indices (added where Bound() repeated an edge pixel), so that Σ_k weight_k · x[index_k] along that
    axis is one matrix product, the same sum as the kernel's Interpolate1D (up to float32 rounding order)."""
    n, out = index.shape[:2]
    return torch.zeros(n, out, size, dtype=weight.dtype, device=weight.device).scatter_add_(2, index, weight)


@functools.lru_cache(maxsize=1024)
def _axis_taps(length, out, half_pixel_centers):
    """The taps of one axis of a window of `length` pixels, for one image: indices (4·out,), tap after tap, and the
    four taps' weights, each (out, 1, 1); the batched form's (kept: a window length recurs; at 224 px ~10 kB each)."""
    index, weight = _bicubic_taps(torch.zeros(1, dtype=torch.int64), torch.tensor([length]), out, half_pixel_centers)
    return index[0].T.flatten(), tuple(w.view(out, 1, 1) for w in weight[0].T.contiguous())


def _interpolate(x, index, weight):
    """TF's Interpolate1D along x's first dimension (x: (length, m, 3)): output pixel o is
    w0·x[i0] + w1·x[i1] + w2·x[i2] + w3·x[i3], summed left to right as the kernel's Compute(), for all the
    (m, 3) values at once: the four taps gathered (index_select), then weighted and added in that order."""
    t0, t1, t2, t3 = x.index_select(0, index).view(4, -1, *x.shape[1:]).unbind(0)  # each (out, m, 3)
    w0, w1, w2, w3 = weight
    return (t0 * w0).addcmul_(t1, w1).addcmul_(t2, w2).addcmul_(t3, w3)


def resize_bicubic(x, top, left, h, w, size, half_pixel_centers):
    """The crop (top, left, h, w) of each image, resized to `size` (out_h, out_w) by TF's ResizeBicubic kernel
    (resize_bicubic_op.cc), no antialiasing, values not clipped: half_pixel_centers=False is TF1's
    tf.image.resize_bicubic (SimCLR v1), True is TF2's tf.image.resize(..., BICUBIC) (BYOL). The kernel
    interpolates the rows, then the columns, each output pixel from four taps. A batch: each axis's taps are a
    matrix (rows R, columns C) and the resize is R · x · Cᵀ per image and channel. The CPU loader's one image:
    the four-tap sums themselves (_interpolate), which skip the matrices' zeros (at 224 px from a 500 × 375
    image, 4 of ~300 entries per row)."""
    if _single(x):
        # the CPU loader's one image, as the kernel loops over it: within the window only, in the decoded image's
        # (H, W, 3) layout (ToImage's tensor is a view of it), rows first (four input rows per output row, at every
        # input column), then columns; each pixel is the kernel's four-tap sum in its order (no matrix of zeros)
        top, left, h, w = int(top), int(left), int(h), int(w)
        window = x[0, :, top:top + h, left:left + w].permute(1, 2, 0)  # (h, w, 3)
        rows = _interpolate(window, *_axis_taps(h, size[0], half_pixel_centers))  # (out_h, w, 3)
        rows = rows.transpose(0, 1).contiguous()  # (w, out_h, 3): the columns' taps, gathered whole
        y = _interpolate(rows, *_axis_taps(w, size[1], half_pixel_centers))  # (out_w, out_h, 3)
        return y.permute(2, 1, 0).contiguous().unsqueeze(0)  # (1, 3, out_h, out_w), each channel's plane contiguous
    rows = _matrix(*_bicubic_taps(top, h, size[0], half_pixel_centers), x.shape[-2]).to(x.dtype)  # (n, out_h, H)
    cols = _matrix(*_bicubic_taps(left, w, size[1], half_pixel_centers), x.shape[-1]).to(x.dtype)  # (n, out_w, W)
    # the rows of all three channels in one product: x as (n, H, W·3), the layout a decoded image already has
    n, c, height, width = x.shape
    y = (rows @ x.permute(0, 2, 3, 1).reshape(n, height, width * c)).view(n, -1, width, c)  # (n, out_h, W, 3)
    return torch.einsum("npw,nowc->ncop", cols, y)  # then the columns: (n, 3, out_h, out_w)


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

