"""--gpu-augment: a method's own augmentation, run on whole batches on the device.

The CPU loader, not the GPU, bounds the speed. With --gpu-augment each view's pipeline runs on a whole batch
at once on the device, every sample with its own random parameters. Small images (CIFAR-size) stay on the
device as uint8 and the whole pipeline runs there; full-size images (ImageNet) are decoded, cropped, resized
and flipped per image by the loader workers (the geometry, which must happen before the batch has one size)
and the device applies the colour, grayscale, blur and solarization to the batch. The pipeline is read off
the method's `v2.Compose` (crop scale and ratio, jitter ranges, probabilities, blur σ...), so the device path
cannot drift from the CPU path; a transform this module does not know is an error, never skipped. The steps
a method writes as batched functions (`tf_image.Batched`: SimCLR's and BYOL's TF operations) are called as
they are, on the batch: the CPU loader runs the very same function on one image.

Where it differs from the CPU path, by design:
- values stay float between operations, where PIL rounds to uint8 after each (PIL's blur, computed as PIL
  does, rounds as PIL: equal to PIL's on the same σ and image);
- the random numbers come from one generator per step on the device, seeded by (seed, rank, step):
  a resume is exact on the same device, but a sample's views depend on the batch it is in (the CPU
  path seeds each sample, so its views do not depend on the number of ranks or workers; streamed, the
  geometry still is drawn so, per sample);
- streamed, a flip that the recipe writes after its colour steps runs before them (they commute).
"""
import math

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

from common import data, dist, tf_image

MAX_SIDE = 64  # held on the device: the small-image datasets, those the CIFAR stem is for
MAX_BYTES = 4 * 2**30  # the most of a uint8 training set held on each device


class Unsupported(ValueError):
    """A dataset or a transform that --gpu-augment cannot take; the message is the one line to print."""


def _rand(g, *shape):
    return torch.rand(shape, generator=g, device=g.device)


def _uniform(g, shape, low, high):
    return low + (high - low) * _rand(g, *shape)  # as torch's uniform_(low, high)


def _per_sample(t):
    return t.view(-1, 1, 1, 1)


# --- random resized crop --------------------------------------------------------------------------

def crop_params(g, n, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.make_params for n samples at once: (top, left, h, w), each (n,).

    Ten tries of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, the first that
    fits is kept; when none fits, the central crop with the ratio clamped."""
    target = height * width * _uniform(g, (n, 10), *scale)
    aspect = torch.exp(_uniform(g, (n, 10), math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()  # round half to even, as round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (argmax returns the first maximum)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    if width / height < min(ratio):  # the fallback, as torchvision's
        fw, fh = width, round(width / min(ratio))
    elif width / height > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.minimum((_rand(g, n) * (height - h + 1)).floor(), height - h)  # uniform in 0 .. height − h
    left = torch.minimum((_rand(g, n) * (width - w + 1)).floor(), width - w)
    top, left = torch.where(found, top, (height - h) // 2), torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def _triangle(d):  # PIL's bilinear filter, support 1
    return (1 - d.abs()).clamp(min=0)


def _cubic(d, a=-0.5):  # PIL's bicubic filter (a = −0.5, as torch's antialiased bicubic), support 2
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = (((d - 5) * d + 8) * d - 4) * a
    return torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


FILTERS = {v2.InterpolationMode.BILINEAR: _triangle, v2.InterpolationMode.BICUBIC: _cubic}


def _resample_matrix(start, length, out, size, kernel):
    """(n, out, size): PIL's antialiased resampling of the pixels [start, start + length) of a line of
    `size` pixels to `out` pixels, as a matrix; when shrinking, the filter widens by the scale."""
    start, length = start.view(-1, 1, 1), length.view(-1, 1, 1)
    scale = length / out
    centre = start + (torch.arange(out, device=start.device).view(1, -1, 1) + 0.5) * scale  # (n, out, 1)
    pixel = torch.arange(size, device=start.device).view(1, 1, -1) + 0.5  # (1, 1, size)
    weight = kernel((pixel - centre) / scale.clamp(min=1.0))  # (n, out, size)
    weight = weight * ((pixel > start) & (pixel < start + length))  # only the crop's own pixels, as PIL
    return weight / weight.sum(-1, keepdim=True)


def resized_crop(x, top, left, h, w, size, interpolation=v2.InterpolationMode.BILINEAR):
    """Crop (top, left, h, w) of each image of x (n, c, H, W) and resize it to `size` (out_h, out_w) with
    PIL's antialiased filter, as torchvision does on PIL images. On CUDA the matmuls may run in TF32
    (errors about 1e-3, below the 1/255 step of the images)."""
    kernel = FILTERS[interpolation]
    rows = _resample_matrix(top, h, size[0], x.shape[-2], kernel).to(x.dtype)  # (n, out_h, H)
    cols = _resample_matrix(left, w, size[1], x.shape[-1], kernel).to(x.dtype)  # (n, out_w, W)
    n, c, height, width = x.shape
    # Two passes as PIL: along the width first, clipped to [0, 1] (PIL stores uint8 in between; the
    # bicubic filter overshoots), then along the height, clipped again.
    x = (x.reshape(n, c * height, width) @ cols.transpose(1, 2)).clamp_(0, 1)  # (n, c·H, out_w)
    x = rows @ x.view(n, c, height, size[1]).transpose(1, 2).reshape(n, height, c * size[1])  # (n, out_h, c·out_w)
    return x.view(n, size[0], c, size[1]).transpose(1, 2).clamp(0, 1)


# --- colour ---------------------------------------------------------------------------------------

def grayscale(x):
    """(n, 1, H, W): torchvision's rgb_to_grayscale, 0.2989 R + 0.587 G + 0.114 B."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(dim=-3)


def _blend(x, y, f):
    return (x * f + y * (1 - f)).clamp_(0, 1)


def adjust_brightness(x, f):
    return x.mul(f).clamp_(0, 1)


def adjust_contrast(x, f):
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, grayscale(x), f)


def adjust_hue(x, f):
    """Rotate the hue by f (a fraction of the circle) in HSV space, as torchvision's adjust_hue."""
    r, g, _ = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    delta = maxc - minc
    ones = torch.ones_like(maxc)
    s = delta / torch.where(delta > 0, maxc, ones)
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / torch.where(delta > 0, delta, ones).unsqueeze(-3)).unbind(-3)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))  # sixths of the circle
    h = (h / 6.0 + 1.0).fmod(1.0)
    h = (h + f.view(-1, 1, 1)).remainder(1.0)
    # HSV → RGB: channel c = v·(1 − s·clamp(min(k, 4 − k), 0, 1)), k = (n_c + 6h) mod 6, n = 5, 3, 1 for R, G, B
    n_c = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # (made on the device: no copy)
    k = (n_c + 6.0 * h.unsqueeze(-3)).remainder(6.0)
    return maxc.unsqueeze(-3) * (1 - s.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp(0, 1))


JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x, g, ranges):
    """ColorJitter: brightness, contrast, saturation and hue factors uniform in `ranges` (None: that op is
    off), applied in a random order per sample, as torchvision's `randperm(4)`."""
    order = _rand(g, len(x), 4).argsort(dim=1)  # (n, 4): a uniform random permutation per sample
    factors = [None if r is None else _uniform(g, (len(x),), *r) for r in ranges]
    for position in range(4):
        for op, (adjust, f) in enumerate(zip(JITTER, factors)):
            if f is not None:
                x = torch.where(_per_sample(order[:, position] == op), adjust(x, _per_sample(f)), x)
    return x


def solarize(x, threshold):
    return torch.where(x >= threshold, 1.0 - x, x)


# --- blur -----------------------------------------------------------------------------------------

def gaussian_blur(x, kernel_size, sigma):
    """torchvision's gaussian_blur with a sigma per sample (n,): reflect padding, then the kernel
    exp(−t²/2σ²) normalised, applied as two 1-D convolutions (torchvision: one 2-D outer product)."""
    n, c, height, width = x.shape
    kx, ky = kernel_size
    x = F.pad(x, [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
    x = x.reshape(1, n * c, *x.shape[-2:])  # one group per sample and channel
    for k, shape in ((kx, (1, kx)), (ky, (ky, 1))):
        lim = (k - 1) / (2.0 * math.sqrt(2.0))
        t = torch.linspace(-lim, lim, k, device=x.device, dtype=x.dtype)
        kernel = torch.softmax(-(t / sigma.view(-1, 1).to(x.dtype)) ** 2, dim=1)  # (n, k), as torchvision's
        x = F.conv2d(x, kernel.repeat_interleave(c, dim=0).view(n * c, 1, *shape), groups=n * c)
    return x.view(n, c, height, width)


def pil_box_radius(sigma, passes=3):
    """Pillow's _gaussian_blur_radius (BoxBlur.c) per sample, in its float32 and double arithmetic: the radius of
    the extended box whose `passes`-fold repetition has the variance σ² (Gwosdek et al. 2011, Eq. 7, 11, 14); its
    integer part is the box, its fraction the weight of the two pixels just outside it."""
    sigma2 = sigma.to(torch.float32) ** 2 / passes  # σ arrives as a C float
    L = torch.sqrt(12.0 * sigma2.double() + 1.0).float()  # box length
    l = torch.floor((L.double() - 1.0) / 2.0).float()  # integer part of the radius  # noqa: E741
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))  # fractional part
    return l + a


def _box_pass(q, r, ww, fw, r_max):
    """One pass of Pillow's ImagingLineBoxBlur32 along the last axis of the grey levels q (n, c, H, W), int64:
    out(x) = (ww·Σ_{|k|≤r} q(x+k) + fw·(q(x−r−1) + q(x+r+1)) + 2²³) >> 24, the image's edge pixels repeated
    beyond it; r, ww, fw (n, 1, 1, 1) per sample, each r in 0 .. r_max."""
    width, pad = q.shape[-1], r_max + 1
    clamped = torch.arange(-pad, width + pad, device=q.device).clamp_(0, width - 1)
    qp = q.index_select(-1, clamped)  # (n, c, H, W + 2·pad), the edges repeated
    sums = torch.cat([torch.zeros_like(qp[..., :1]), qp.cumsum(-1)], -1)  # sums[i] = Σ qp[:i]
    out = torch.zeros_like(q)
    for k in range(r_max + 1):  # each radius the batch may hold, as slices (r ≤ σ: one or two values)
        box = sums[..., pad + k + 1:pad + k + 1 + width] - sums[..., pad - k:pad - k + width]
        far = qp[..., pad - k - 1:pad - k - 1 + width] + qp[..., pad + k + 1:pad + k + 1 + width]
        out = torch.where(r == k, box * ww + far * fw, out)
    return (out + (1 << 23)) >> 24  # PIL's rounding to a grey level, after each pass


def pil_gaussian_blur(x, sigma, max_sigma=None, passes=3):
    """PIL's ImageFilter.GaussianBlur(radius=σ) with a σ per sample (n,), on x (n, c, H, W) in [0, 1]. Computed as
    Pillow's BoxBlur.c does, in its integer arithmetic: the pixels as grey levels (PIL holds uint8), three passes
    of an extended box filter along the width, then three along the height (ImagingBoxBlur), each pass rounded to
    grey levels; so the result equals PIL's on the same σ and image. `max_sigma` bounds σ (else read off it)."""
    radius = pil_box_radius(sigma, passes)  # (n,)
    r = radius.to(torch.int64)  # (int)floatRadius
    ww = (float(1 << 24) / (radius * 2 + 1)).to(torch.int64)  # the box's weight ×2²⁴, float32, truncated
    fw = ((1 << 24) - (r * 2 + 1) * ww) // 2  # the two far pixels' weight ×2²⁴
    r, ww, fw = (_per_sample(t) for t in (r, ww, fw))
    top = torch.tensor([max_sigma if max_sigma is not None else float(sigma.max())])
    r_max = int(pil_box_radius(top, passes))  # the radius grows with σ
    q = x.mul(255).round_().clamp_(0, 255).to(torch.int64)
    for _ in range(passes):
        q = _box_pass(q, r, ww, fw, r_max)
    q = q.transpose(-1, -2).contiguous()  # (ImagingTranspose) the height as the last axis
    for _ in range(passes):
        q = _box_pass(q, r, ww, fw, r_max)
    return q.transpose(-1, -2).to(x.dtype).div_(255)


# --- the method's pipeline, read off its transforms -----------------------------------------------

def _with_p(p, op):
    """Apply op to the samples whose draw is below p (torchvision: `torch.rand(1) < p`)."""
    def apply(x, g):
        chosen = _per_sample(_rand(g, len(x)) < p)
        return torch.where(chosen, op(x, g), x)
    return apply


def _translate(t, scale):
    """The batched ops of transform t, in order; `scale` is the largest pixel value at that point of the
    CPU pipeline (255 on PIL images, 1 after ToDtype), for the solarize threshold. Returns (ops, scale)."""
    if isinstance(t, v2.Compose):
        ops = []
        for inner in t.transforms:
            more, scale = _translate(inner, scale)
            ops += more
        return ops, scale
    if isinstance(t, v2.RandomResizedCrop):
        mode = getattr(t.interpolation, "value", t.interpolation)  # an InterpolationMode or its name
        if mode not in ("bilinear", "bicubic"):
            raise Unsupported(f"--gpu-augment resizes with the bilinear or bicubic filter, not {mode}; "
                              f"run without --gpu-augment")
        mode = v2.InterpolationMode(mode)

        def crop(x, g):
            top, left, h, w = crop_params(g, len(x), x.shape[-2], x.shape[-1], t.scale, t.ratio)
            return resized_crop(x, top, left, h, w, t.size, mode)
        return [crop], scale
    if isinstance(t, v2.RandomHorizontalFlip):
        return [_with_p(t.p, lambda x, g: x.flip(-1))], scale
    if isinstance(t, v2.RandomApply):
        inner, scale = _translate(v2.Compose(list(t.transforms)), scale)
        if any(isinstance(m, v2.RandomResizedCrop) for m in t.modules()):
            raise Unsupported("--gpu-augment cannot apply a crop to only some samples (RandomApply around a crop); "
                              "run without --gpu-augment")

        def run_all(x, g):
            for op in inner:
                x = op(x, g)
            return x
        return [_with_p(t.p, run_all)], scale
    if isinstance(t, v2.ColorJitter):
        ranges = (t.brightness, t.contrast, t.saturation, t.hue)
        return [lambda x, g: color_jitter(x, g, ranges)], scale
    if isinstance(t, v2.RandomGrayscale):
        return [_with_p(t.p, lambda x, g: grayscale(x).expand_as(x))], scale
    if isinstance(t, v2.RandomSolarize):
        threshold = t.threshold / scale  # in [0, 1], as the device pipeline's values
        return [_with_p(t.p, lambda x, g: solarize(x, threshold))], scale
    if isinstance(t, data.PILGaussianBlur):
        def pil_blur(x, g):
            return pil_gaussian_blur(x, _uniform(g, (len(x),), *t.sigma), max_sigma=max(t.sigma))
        return [pil_blur], scale
    if isinstance(t, v2.GaussianBlur):
        def blur(x, g):
            return gaussian_blur(x, t.kernel_size, _uniform(g, (len(x),), *t.sigma))
        return [blur], scale
    if isinstance(t, tf_image.Batched):
        if scale != 1.0:
            raise Unsupported("--gpu-augment runs a batched step on floats in [0, 1]: put ToDtype(float32, scale=True) "
                              "before it; run without --gpu-augment")
        return [t.fn], scale
    if isinstance(t, v2.Normalize):
        stats = {}

        def normalize(x, g):  # mean and std moved to the device once, not at every step
            if x.device not in stats:
                stats[x.device] = [torch.tensor(v, dtype=x.dtype).view(-1, 1, 1).to(x.device) for v in (t.mean, t.std)]
            mean, std = stats[x.device]
            return x.sub(mean).div_(std)
        return [normalize], scale
    if isinstance(t, v2.ToDtype) and t.dtype == torch.float32 and t.scale:
        return [], 1.0
    if isinstance(t, (v2.ToImage, v2.PILToTensor, v2.ToPureTensor, v2.Identity)):
        return [], scale
    raise Unsupported(f"--gpu-augment does not run torchvision's {type(t).__name__} on the device; "
                      f"run without --gpu-augment")


class Pipeline:
    """One view's torchvision v2 pipeline as batched ops: x (n, 3, H, W) float in [0, 1], a generator on
    x's device -> the views, each sample with its own random parameters."""

    def __init__(self, transform, scale=255.0):
        self.ops, scale = _translate(transform, scale)
        if scale != 1.0:
            raise Unsupported("--gpu-augment expects the pipeline to end with ToDtype(float32, scale=True) and "
                              "Normalize (data.normalize); run without --gpu-augment")

    def __call__(self, x, g):
        for op in self.ops:
            x = op(x, g)
        return x


def _flatten(t):
    return [u for inner in t.transforms for u in _flatten(inner)] if isinstance(t, v2.Compose) else [t]


def split(transform):
    """A view's pipeline cut in two for full-size images: (geometry, rest). The geometry, run per image by the
    loader workers before the batch has one size, is the crop and the flips (and the conversions before a
    batched crop: SimCLR's and BYOL's TF crop is their first batched step, on floats, its overshoot kept); the
    rest, run on the device on the whole batch, is the colour, grayscale, blur, solarization and normalisation,
    in the pipeline's order. A flip written after colour steps moves before them: it commutes with each of them
    (pointwise ops, the image mean, blurs symmetric under a mirror). Returns (a v2.Compose giving a plain tensor,
    a Pipeline)."""
    geometry, rest, scale = [], [], 255.0
    for t in _flatten(transform):
        batched_crop = isinstance(t, tf_image.Batched) and not rest and not any(
            isinstance(u, tf_image.Batched) for u in geometry)
        conversion = isinstance(t, (v2.ToImage, v2.ToDtype)) and not rest
        if isinstance(t, (v2.RandomResizedCrop, v2.RandomHorizontalFlip)) or batched_crop or conversion:
            geometry.append(t)
            if isinstance(t, v2.ToDtype):
                scale = 1.0
        else:
            rest.append(t)
    if not any(isinstance(t, (v2.RandomResizedCrop, tf_image.Batched)) for t in geometry):
        raise Unsupported("--gpu-augment on full-size images needs a crop that gives the batch one size; "
                          "run without --gpu-augment")
    return v2.Compose([*geometry, v2.ToImage(), v2.ToPureTensor()]), Pipeline(v2.Compose(rest), scale)


def to_floats(x):
    """The workers' geometry as the device pipeline's floats: uint8 scaled to [0, 1] (torchvision's ToDtype(float32,
    scale=True)); floats (a TF crop's, overshoot included) as they are."""
    return x.to(torch.float32).mul_(1.0 / 255) if x.dtype == torch.uint8 else x


# --- the training set on the device ---------------------------------------------------------------

def fits(base):
    """Whether the training set can be held on the device: images of at most MAX_SIDE px (their first's size),
    at most MAX_BYTES in all."""
    width, height = base[0][0].size  # a PIL image
    return max(width, height) <= MAX_SIDE and len(base) * 3 * height * width <= MAX_BYTES


def load(base, device, workers=0):
    """The images of a dataset of (PIL image, label) pairs as one uint8 tensor (N, 3, H, W) on `device`; None
    when they do not all have one size."""
    if isinstance(base, torchvision.datasets.CIFAR10):  # and CIFAR100: already one uint8 array (N, H, W, 3)
        return torch.from_numpy(base.data).permute(0, 3, 1, 2).contiguous().to(device)
    loader = torch.utils.data.DataLoader(data.Transformed(base, v2.PILToTensor()), batch_size=256, num_workers=workers)
    try:
        return torch.cat([x for x, _ in loader]).to(device)
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        return None


class DeviceViews:
    """The two-view batches of a `data.Views` made on the device, each view's pipeline applied to the whole batch.

    Small images of one size (CIFAR-size: `fits`) are held on the device as uint8 and the whole pipeline runs
    there, crop included. Other images (ImageNet, a folder) are streamed: the loader workers decode each image
    and apply its views' geometry (`split`: the crop, resize and flip, each sample's own draws from its seed, as
    the CPU path), and hand the batch over as uint8 (floats after a TF crop); the device applies the rest."""

    def __init__(self, views, device, seed, workers=0):
        if not isinstance(views, data.Views):
            raise Unsupported("--gpu-augment takes the loader of a data.Views dataset; run without --gpu-augment")
        self.device, self.seed, self.workers = device, seed, workers
        self.generator = torch.Generator(device)
        self.images = None
        if fits(views.base):
            self.t1, self.t2 = Pipeline(views.t1), Pipeline(views.t2)  # unsupported transforms fail before the load
            self.images = load(views.base, device, workers)
        if self.images is None:  # streamed
            (g1, self.t1), (g2, self.t2) = split(views.t1), split(views.t2)
            self.geometry = data.Views(views.base, g1, g2)
            self.loader = None

    def _generator(self, step):
        return self.generator.manual_seed(hash((self.seed, dist.rank(), step)) % 2**62)

    def views(self, index, step):
        """The two views of images[index] (index on the device) at global step `step` (held images)."""
        g = self._generator(step)
        x = self.images[index].to(torch.float32).mul_(1.0 / 255)  # torchvision's ToDtype(float32, scale=True)
        return self.t1(x, g), self.t2(x, g)

    def streamed(self, x1, x2, step):
        """The two views at global step `step` from the workers' geometry x1, x2 (uint8, or floats)."""
        g = self._generator(step)
        x1, x2 = (to_floats(x.to(self.device, non_blocking=True)) for x in (x1, x2))
        return self.t1(x1, g), self.t2(x2, g)

    def epoch(self, sampler, batch_size, step):
        """The rest of the sampler's epoch (its indices, this rank's) in batches, the first at `step`."""
        if self.images is None:
            if self.loader is None:  # made once: its workers persist over the epochs, the sampler is the run's
                self.loader = torch.utils.data.DataLoader(
                    self.geometry, batch_size, sampler=sampler, num_workers=self.workers, drop_last=True,
                    pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                    generator=torch.Generator().manual_seed(self.seed))  # leaves the global generator alone
            for b, (x1, x2) in enumerate(self.loader):
                yield self.streamed(x1, x2, step + b)
            return
        order = torch.tensor([i for i, _ in sampler]).to(self.device)  # one copy per epoch
        for b in range(len(order) // batch_size):
            yield self.views(order[b * batch_size:(b + 1) * batch_size], step + b)
