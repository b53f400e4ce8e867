"""--gpu-augment: the batched device pipeline against torchvision's, op by op and in distribution.

Run on CPU tensors (the implementation is device-agnostic). Statistical checks use fixed seeds and
thresholds at a false-alarm rate of about 1e-5 for the sample sizes used, so a wrong range, rate or
order shows up and a right one passes."""
import importlib
import math

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import simsiam
from common import data, gpu_augment as ga
from conftest import ROOT, SMALL, metrics, run_main, write_image_folder

KS = 2.47  # two-sided Kolmogorov-Smirnov coefficient at α = 1e-5: sqrt(−ln(α/2)/2)


def same_distribution(ours, theirs, name):
    """Per channel, the views' means and standard deviations agree in distribution: the means within 5
    standard errors (+ 0.01 for PIL's uint8 rounding), and a two-sample KS statistic under KS·√(2/n)."""
    n = len(ours)
    assert ours.shape == theirs.shape
    for stat in (lambda v: v.mean((2, 3)), lambda v: v.std((2, 3))):
        a, b = stat(ours), stat(theirs)  # (n, 3)
        for c in range(3):
            se = math.sqrt(a[:, c].var() / n + b[:, c].var() / n)
            assert abs(a[:, c].mean() - b[:, c].mean()) < 5 * se + 0.01, (name, c)  # + PIL's uint8 rounding
            assert ks(a[:, c], b[:, c]) < KS * math.sqrt(2 / n), (name, c)


def ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic of 1-D tensors a and b."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def ks_uniform(x, low, high):
    """One-sample Kolmogorov-Smirnov statistic of x against the uniform law on [low, high]."""
    x = ((x.double() - low) / (high - low)).sort().values
    i = torch.arange(1, len(x) + 1, dtype=torch.float64)
    return max((i / len(x) - x).max().item(), (x - (i - 1) / len(x)).max().item())


def rate_ok(hits, n, p):
    return abs(hits / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)  # 4.5 σ: α ≈ 7e-6


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def picture(height=32, width=32):
    """A fixed colour image in [0, 1] (multiples of 1/255): gradients, a bright square, a dark bar."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    img = torch.stack([x, y, 1 - (x + y) / 2])
    img[:, height // 4:height // 2, width // 4:width // 2] = torch.tensor([0.95, 0.85, 0.2]).view(3, 1, 1)
    img[:, -height // 5:, :] *= 0.3
    return (img * 255).round() / 255


def to_pil(x):
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())


# --- deterministic ops against torchvision's functional ---------------------------------------------

def test_flip_grayscale_solarize_normalize_equal_torchvision_exactly():
    x = torch.rand(6, 3, 12, 10, generator=gen()).mul(255).round().div(255)
    mean, std = data.MEAN_STD["cifar10"]
    pipeline = ga.Pipeline(v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.RandomGrayscale(p=1.0),
                                       v2.RandomSolarize(threshold=128, p=1.0), data.normalize("cifar10")]))
    expected = TF.normalize(TF.solarize(TF.rgb_to_grayscale(TF.horizontal_flip(x), 3), 128 / 255), mean, std)
    assert torch.equal(pipeline(x, gen()), expected)
    # and after ToDtype the threshold is read in [0, 1]
    to_float = v2.ToDtype(torch.float32, scale=True)
    after = ga.Pipeline(v2.Compose([v2.ToImage(), to_float, v2.RandomSolarize(0.3, p=1.0)]))
    assert torch.equal(after(x, gen()), TF.solarize(x, 0.3))


def test_jitter_ops_match_torchvision_with_per_sample_factors():
    """In float64, where the two implementations may differ by rounding only (~1e-15 measured; 1e-12 allowed)
    and a wrong formula shows however small. (torchvision's adjust_hue computes in float32 whatever the input:
    its own HSV conversions, run in float64, are the reference for hue.)"""
    from torchvision.transforms.v2.functional import _color
    x = torch.rand(32, 3, 8, 8, generator=gen(1), dtype=torch.float64)
    x[0] = 0.5  # grey: hue and saturation undefined
    factor = torch.rand(32, generator=gen(2), dtype=torch.float64) * 1.6
    for ours, theirs in [(ga.adjust_brightness, TF.adjust_brightness), (ga.adjust_contrast, TF.adjust_contrast),
                         (ga.adjust_saturation, TF.adjust_saturation)]:
        expected = torch.stack([theirs(x[i], float(factor[i])) for i in range(32)])
        torch.testing.assert_close(ours(x, factor.view(-1, 1, 1, 1)), expected, rtol=0, atol=1e-12)

    def adjust_hue(image, hue_factor):  # TF.adjust_hue's body without its cast to float32
        h, s, v = _color._rgb_to_hsv(image).unbind(dim=-3)
        return _color._hsv_to_rgb(torch.stack(((h + hue_factor).remainder(1.0), s, v), dim=-3))
    hue = torch.rand(32, generator=gen(3), dtype=torch.float64) - 0.5
    expected = torch.stack([adjust_hue(x[i], float(hue[i])) for i in range(32)])
    torch.testing.assert_close(ga.adjust_hue(x, hue.view(-1, 1, 1, 1)), expected, rtol=0, atol=1e-12)
    x32 = x[1:4].float()  # (and that reference is torchvision's adjust_hue: in float32, the same operations)
    assert torch.equal(torch.stack([adjust_hue(x32[i], float(hue[i + 1])) for i in range(3)]),
                       torch.stack([TF.adjust_hue(x32[i], float(hue[i + 1])) for i in range(3)]))


def test_blur_matches_torchvision_per_sigma():
    x = torch.rand(8, 3, 16, 16, generator=gen(4), dtype=torch.float64)  # float64: rounding ~1e-15 (measured)
    sigma = torch.rand(8, generator=gen(5), dtype=torch.float64) * 1.9 + 0.1
    for kernel in [(3, 3), (5, 7), (23, 23)]:
        expected = torch.stack([TF.gaussian_blur(x[i], list(kernel), [float(sigma[i])] * 2) for i in range(8)])
        torch.testing.assert_close(ga.gaussian_blur(x, kernel, sigma), expected, rtol=0, atol=1e-12)


def pil_blur(image, sigma):
    """PIL's ImageFilter.GaussianBlur(radius=σ) on a uint8 image (3, H, W), as the official codes call it."""
    from PIL import ImageFilter
    return TF.pil_to_tensor(TF.to_pil_image(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


@pytest.mark.parametrize("height,width,n", [(1, 1, 4), (1, 6, 4), (5, 2, 4), (9, 7, 8), (32, 32, 8), (17, 61, 4),
                                            (224, 224, 2)])
def test_pil_blur_equals_pil_exactly(height, width, n):
    """PIL's blur as Pillow computes it (integer box passes, each rounded to grey levels): equal to PIL's own on the
    same σ and image, every pixel (0 grey levels apart; a sampled Gaussian, a missing rounding or a wrong box
    radius moves pixels by one or more). σ at both ends of the recipes' range, beyond it (a box wider than the
    tiny images) and drawn; through the pipeline, whose σ the test redraws from the same generator."""
    image = torch.randint(0, 256, (n, 3, height, width), generator=gen(30), dtype=torch.uint8)
    x = image.float() / 255
    sigma = torch.tensor([0.1, 2.0, 0.6, 7.5] + [0.1 + 1.9 * i / n for i in range(n - 4)])[:n]
    ours = (ga.pil_gaussian_blur(x, sigma) * 255).round().byte()
    for i in range(n):
        assert torch.equal(ours[i], pil_blur(image[i], float(sigma[i]))), (i, float(sigma[i]))
    transform = v2.Compose([v2.RandomApply([data.PILGaussianBlur(sigma=(0.1, 2.0))], p=1.0),
                            v2.ToDtype(torch.float32, scale=True)])
    ours = (ga.Pipeline(transform)(x, gen(31)) * 255).round().byte()
    g = gen(31)
    ga._rand(g, n)  # RandomApply's draws
    sigma = ga._uniform(g, (n,), 0.1, 2.0)
    for i in range(n):
        assert torch.equal(ours[i], pil_blur(image[i], float(sigma[i]))), (i, float(sigma[i]))


def test_pil_blur_transform_is_pils_filter_with_sigma_from_torch():
    """The CPU path's transform: PIL's filter with the σ it drew from torch's generator, uniform in its range."""
    image = torch.randint(0, 256, (3, 12, 10), generator=gen(32), dtype=torch.uint8)
    blur = data.PILGaussianBlur(sigma=(0.1, 2.0))
    torch.manual_seed(5)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    torch.manual_seed(5)
    assert torch.equal(TF.pil_to_tensor(blur(TF.to_pil_image(image))), pil_blur(image, sigma))
    with pytest.raises(TypeError, match="PIL images"):
        blur(image)


@pytest.mark.parametrize("mode", [v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC])
def test_resized_crop_matches_pil_as_the_cpu_path_does_it(mode):
    """The CPU path crops and resizes PIL images: the pipeline's float result is within PIL's rounding
    to uint8 (once between its two passes, once at the end), for the crops it drew."""
    image = torch.randint(0, 256, (3, 24, 40), generator=gen(6), dtype=torch.uint8)
    pil = TF.to_pil_image(image)
    transform = v2.Compose([v2.RandomResizedCrop((32, 30), scale=(0.08, 1.0), interpolation=mode),
                            v2.ToDtype(torch.float32, scale=True)])
    ours = ga.Pipeline(transform)((image.float() / 255).expand(40, -1, -1, -1), gen(7))
    top, left, h, w = ga.crop_params(gen(7), 40, 24, 40, (0.08, 1.0), (3 / 4, 4 / 3))  # the draws it made
    for i in range(40):
        crop = [int(top[i]), int(left[i]), int(h[i]), int(w[i])]
        theirs = TF.pil_to_tensor(TF.resized_crop(pil, *crop, [32, 30], mode)).float() / 255
        assert (ours[i] - theirs).abs().max() <= 1.5 / 255, (i, crop)


# --- random parameters against torchvision's ---------------------------------------------------------

@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.2, 1.0)), (24, 40, (0.08, 1.0))])
def test_crop_parameters_follow_torchvision_in_distribution(height, width, scale):
    n = 3000
    ratio = (3 / 4, 4 / 3)
    top, left, h, w = ga.crop_params(gen(8), n, height, width, scale, ratio)
    torch.manual_seed(0)
    t = v2.RandomResizedCrop(16, scale=scale, ratio=ratio)
    image = [tv_tensors.Image(torch.zeros(3, height, width))]
    draws = [t.make_params(image) for _ in range(n)]
    tv = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in draws])
    ours = torch.stack([top, left, h, w], 1)
    assert ((ours[:, 2] >= 1) & (ours[:, 0] + ours[:, 2] <= height) & (ours[:, 1] + ours[:, 3] <= width)).all()
    limit = KS * math.sqrt(2 / n)
    for name, f in [("area", lambda p: p[:, 2] * p[:, 3] / (height * width)),
                    ("log aspect", lambda p: torch.log(p[:, 3] / p[:, 2])),
                    ("top", lambda p: p[:, 0] / (height - p[:, 2] + 1)),
                    ("left", lambda p: p[:, 1] / (width - p[:, 3] + 1))]:
        assert ks(f(ours.double()), f(tv.double())) < limit, name


def test_crop_fallback_is_torchvision_central_crop():
    """No try fits a 4 x 64 image at these scales: both fall back to the same central crop."""
    torch.manual_seed(0)
    expected = v2.RandomResizedCrop(8, scale=(0.9, 1.0)).make_params([tv_tensors.Image(torch.zeros(3, 4, 64))])
    top, left, h, w = ga.crop_params(gen(), 5, 4, 64, (0.9, 1.0), (3 / 4, 4 / 3))
    assert (top == expected["top"]).all() and (left == expected["left"]).all()
    assert (h == expected["height"]).all() and (w == expected["width"]).all()


def test_flip_grayscale_and_solarize_rates():
    n = 4000
    x = picture(8, 8).expand(n, -1, -1, -1)

    def run(transform, seed):
        return ga.Pipeline(v2.Compose([transform, v2.ToDtype(torch.float32, scale=True)]))(x, gen(seed))
    flipped = run(v2.RandomHorizontalFlip(p=0.5), 9)
    assert rate_ok(int((flipped != x).flatten(1).any(1).sum()), n, 0.5)
    gray = run(v2.RandomGrayscale(p=0.2), 10)
    assert rate_ok(int((gray[:, 0] == gray[:, 2]).flatten(1).all(1).sum()), n, 0.2)
    solar = run(v2.RandomSolarize(128, p=0.2), 11)
    assert rate_ok(int((solar != x).flatten(1).any(1).sum()), n, 0.2)
    applied = run(v2.RandomApply([v2.RandomGrayscale(p=1.0)], p=0.8), 12)
    assert rate_ok(int((applied[:, 0] == applied[:, 2]).flatten(1).all(1).sum()), n, 0.8)


def test_blur_rate_and_sigma_follow_torchvision():
    """The centre of a blurred impulse is the kernel's centre weight, a function of σ (1 when not
    blurred): its distribution over draws matches torchvision's on the same tensor."""
    n = 2000
    transform = v2.Compose([v2.RandomApply([v2.GaussianBlur(7, sigma=(0.1, 2.0))], p=0.5),
                            v2.ToDtype(torch.float32, scale=True)])
    impulse = torch.zeros(1, 3, 9, 9)
    impulse[..., 4, 4] = 1.0
    ours = ga.Pipeline(transform)(impulse.expand(n, -1, -1, -1), gen(16))[:, 0, 4, 4]
    torch.manual_seed(0)
    theirs = torch.stack([transform(impulse[0])[0, 4, 4] for _ in range(n)])
    assert rate_ok(int((ours < 1).sum()), n, 0.5)
    assert ks(ours, theirs) < KS * math.sqrt(2 / n)


def test_pil_blur_rate_and_sigma_follow_the_cpu_path():
    """The centre of a blurred impulse is a function of σ (255 when not blurred): its distribution over draws on the
    device matches the CPU path's (PIL's filter on the PIL image), and the rate is RandomApply's."""
    n = 2000
    transform = v2.Compose([v2.RandomApply([data.PILGaussianBlur(sigma=(0.1, 2.0))], p=0.5),
                            v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    impulse = torch.zeros(1, 3, 11, 11)
    impulse[..., 5, 5] = 1.0
    ours = ga.Pipeline(transform)(impulse.expand(n, -1, -1, -1), gen(33))[:, 0, 5, 5]
    pil = to_pil(impulse[0])
    torch.manual_seed(0)
    theirs = torch.stack([transform(pil)[0, 5, 5] for _ in range(n)])
    assert rate_ok(int((ours < 1).sum()), n, 0.5) and rate_ok(int((theirs < 1).sum()), n, 0.5)
    assert ks(ours, theirs) < KS * math.sqrt(2 / n)


def test_jitter_factors_are_uniform_in_torchvision_ranges():
    n = 3000
    limit = KS / math.sqrt(n)

    def factors(jitter, pixel, recover):
        x = torch.tensor(pixel).view(1, 3, 1, 1).expand(n, 3, 2, 2).clone()
        x[:, :, 1, 1] = 0.3  # a second colour, so that contrast has something to stretch
        return recover(ga.color_jitter(x, gen(13), (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)))

    b = factors(v2.ColorJitter(brightness=0.4), (0.5, 0.5, 0.5), lambda y: y[:, 0, 0, 0] / 0.5)
    # (1e-6: the factor is read back from float32 pixels, each within 6e-8 of its value)
    assert 0.6 - 1e-6 <= b.min() and b.max() <= 1.4 + 1e-6 and ks_uniform(b, 0.6, 1.4) < limit
    mean = (0.2989 + 0.587 + 0.114) * (3 * 0.5 + 0.3) / 4  # of the grayscale image
    c = factors(v2.ColorJitter(contrast=0.4), (0.5, 0.5, 0.5), lambda y: (y[:, 0, 0, 0] - mean) / (0.5 - mean))
    assert ks_uniform(c, 0.6, 1.4) < limit
    gray = 0.2989 * 0.6 + 0.587 * 0.5 + 0.114 * 0.4
    s = factors(v2.ColorJitter(saturation=0.2), (0.6, 0.5, 0.4), lambda y: (y[:, 0, 0, 0] - gray) / (0.6 - gray))
    assert ks_uniform(s, 0.8, 1.2) < limit
    # pure red turned by h: (1, 6h, 0) for h > 0, (1, 0, −6h) for h < 0
    h = factors(v2.ColorJitter(hue=0.1), (1.0, 0.0, 0.0), lambda y: (y[:, 1, 0, 0] - y[:, 2, 0, 0]) / 6)
    assert ks_uniform(h, -0.1, 0.1) < limit


def test_jitter_order_is_random_per_sample():
    """Brightness ×2 and saturation 0 give different pixels in the two orders; each order half the time."""
    n = 4000
    x = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    y = ga.color_jitter(x, gen(14), ((2.0, 2.0), None, (0.0, 0.0), None))
    # isclose's rtol 1e-5 over float32 pixels (rounding 6e-8): the two orders' values differ by 0.2
    brightness_first = torch.isclose(y[:, 0, 0, 0], torch.tensor(0.2989 + 0.587 * 0.4 + 0.114 * 0.4))
    saturation_first = torch.isclose(y[:, 0, 0, 0], torch.tensor(2 * (0.2989 * 0.8 + 0.587 * 0.2 + 0.114 * 0.2)))
    assert (brightness_first | saturation_first).all()
    assert rate_ok(int(brightness_first.sum()), n, 0.5)


# --- whole pipelines against torchvision's, on a fixed image ------------------------------------------

def pipelines():
    """Every view pipeline of the method files present, blur on where the method has it."""
    out = []
    for name in ("mocov1", "mocov2", "simclr", "simsiam", "byol", "barlow", "vicreg", "unigrad"):
        if not (ROOT / f"{name}.py").exists():
            continue
        module = importlib.import_module(name)
        fields = module.Args.__dataclass_fields__
        args = module.Args(**({"blur": True} if "blur" in fields else {}))
        if "blur1" in fields:  # per-view blur and solarization probabilities (BYOL and followers)
            out += [(f"{name}-view{v}", module.augment(args, getattr(args, f"blur{v}"), getattr(args, f"solarize{v}")))
                    for v in (1, 2)]
        else:
            out.append((name, module.augment(args)))
    return out


@pytest.mark.parametrize("name,transform", pipelines(), ids=lambda p: p if isinstance(p, str) else "")
def test_pipeline_output_statistics_match_torchvision(name, transform):
    """Per-sample channel means and standard deviations of the views of one fixed image: their
    distributions over 600 draws match those of torchvision applied to the PIL image one by one."""
    n = 600
    x = picture()
    ours = ga.Pipeline(transform)(x.expand(n, -1, -1, -1).contiguous(), gen(15))
    pil = to_pil(x)
    torch.manual_seed(0)
    theirs = torch.stack([transform(pil) for _ in range(n)])
    same_distribution(ours, theirs, name)


# --- full-size images: the geometry in the loader workers, the rest on the device ------------------------------

def streamed_views(transform, image, seeds):
    """What --gpu-augment does with a full-size image: each sample's geometry on the CPU from its own seed (as the
    loader workers, data.Views), the rest of the pipeline on the batch with one generator."""
    geometry, rest = ga.split(transform)
    batch = []
    for seed in seeds:
        with data.seeded(seed):
            batch.append(geometry(image))
    assert [type(t).__name__ for t in geometry.transforms] == ["RandomResizedCrop", "RandomHorizontalFlip",
                                                                 "ToImage", "ToPureTensor"]  # the rest on the device
    x = torch.stack(batch)
    assert x.dtype == torch.uint8 and type(x) is torch.Tensor
    return rest(ga.to_floats(x), gen(17))


def pil_pipelines():
    from common import tf_image
    return [(name, t) for name, t in pipelines() if not any(isinstance(u, tf_image.Batched) for u in ga._flatten(t))]


@pytest.mark.parametrize("name,transform", pil_pipelines(), ids=lambda p: p if isinstance(p, str) else "")
def test_streamed_pipeline_statistics_match_the_cpu_pipeline(name, transform):
    """As the held-image test above, the geometry now in the workers: per-sample channel means and standard
    deviations of 400 views of one 40 x 48 image match the CPU pipeline's in distribution. (The TF pipelines:
    equal per sample, the next test.)"""
    n = 400
    pil = to_pil(picture(40, 48))
    ours = streamed_views(transform, pil, range(n))
    torch.manual_seed(0)
    theirs = torch.stack([transform(pil) for _ in range(n)])
    same_distribution(ours, theirs, name)


def tf_pipelines():
    import byol
    import simclr
    return [("simclr", simclr.augment(simclr.Args(image_size=16, blur=True))),
            ("byol-view1", byol.augment(byol.Args(image_size=16, jax_ops=True), 1.0, 0.0)),
            ("byol-view2", byol.augment(byol.Args(image_size=16, jax_ops=True), 0.1, 0.2))]


@pytest.mark.parametrize("name,transform", tf_pipelines(), ids=lambda p: p if isinstance(p, str) else "")
def test_streamed_tf_pipelines_equal_the_cpu_pipeline_per_sample(name, transform):
    """SimCLR's and BYOL's TF operations run the same batched functions on both paths: given the same draws (the
    geometry's, then the rest's, from one generator) a streamed view equals the CPU pipeline's exactly. The
    crop's floats are handed over unclipped (SimCLR's bicubic overshoot, clipped only after its colour
    distortion, as data_util.py)."""
    image = to_pil(picture(40, 48))
    geometry, rest = ga.split(transform)
    for seed in range(12):
        torch.manual_seed(seed)
        expected = transform(image)
        torch.manual_seed(seed)
        x = geometry(image)
        assert x.dtype == torch.float32
        x = ga.to_floats(x.unsqueeze(0))
        assert torch.equal(rest(x, torch.random.default_generator)[0], expected), (name, seed)
    assert [type(t).__name__ for t in geometry.transforms] == ["ToImage", "ToDtype", "Batched", "RandomHorizontalFlip",
                                                             "ToImage", "ToPureTensor"]  # the rest on the device


# --- errors, and the training loop with --gpu-augment ---------------------------------------------------

def test_unsupported_transform_is_named():
    with pytest.raises(ga.Unsupported, match="RandomRotation"):
        ga.Pipeline(v2.Compose([v2.RandomRotation(10), data.normalize("cifar10")]))
    with pytest.raises(ga.Unsupported, match="nearest"):
        ga.Pipeline(v2.Compose([v2.RandomResizedCrop(8, interpolation=v2.InterpolationMode.NEAREST)]))


def test_device_views_are_fixed_by_the_step():
    base = data.dataset("synthetic", "unused", "train", image_size=16)
    views = ga.DeviceViews(data.Views(base, simsiam.augment(simsiam.Args(image_size=16)),
                                      simsiam.augment(simsiam.Args(image_size=16))), torch.device("cpu"), seed=0)
    assert views.images.shape == (len(base), 3, 16, 16) and views.images.dtype == torch.uint8
    assert torch.equal(views.images[3], TF.pil_to_tensor(base[3][0]))
    index = torch.tensor([5, 1, 7])
    a1, a2 = views.views(index, step=4)
    b1, b2 = views.views(index, step=4)
    c1, _ = views.views(index, step=5)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, c1) and not torch.equal(a1, a2)


def test_streamed_device_views_are_each_samples_cpu_geometry():
    """Full-size images are streamed: the batches of an epoch (resumed mid-way) are the CPU path's geometry of
    each sample, from its own seed, view by view; with no colour step, exactly the CPU path's views."""
    base = data.dataset("synthetic", "unused", "train", image_size=80)  # 80 px: more than held on the device
    t = v2.Compose([v2.RandomResizedCrop(16, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(), data.normalize("cifar10")])
    views = data.Views(base, t, t)
    made = ga.DeviceViews(views, torch.device("cpu"), seed=0)
    assert made.images is None
    sampler = data.Sampler(views, seed=0, num_replicas=1, rank=0)
    sampler.set_epoch(1, skip=8)
    keys = list(sampler)[:8]
    x1, x2 = next(made.epoch(sampler, 8, step=9))
    expected = [views[k] for k in keys]
    assert torch.equal(x1, torch.stack([e[0] for e in expected]))
    assert torch.equal(x2, torch.stack([e[1] for e in expected]))
    assert not torch.equal(x1, x2)


@pytest.mark.parametrize("size", [16, 80])
def test_gpu_augment_trains_and_resumes_exactly(tmp_path, size):
    """3 steps per epoch; interrupted at step 4 and resumed to 5: the weights of a straight run. 16-px images are
    held on the device; 80-px ones streamed (the geometry in the loader, the rest on the device)."""
    folder = write_image_folder(tmp_path / "data", splits=("train", "test"), classes=3, per_class=8, size=size)
    common = ["--dataset", "folder", "--data-dir", folder, "--epochs", "2", "--knn-every", "-1", *SMALL,
              "--image-size", "8", "--dim", "64", "--pred-dim", "16", "--gpu-augment"]
    run_main(simsiam, *common, "--max-steps", "5", "--out", tmp_path / "straight")
    run_main(simsiam, *common, "--max-steps", "4", "--out", tmp_path / "resumed")
    run_main(simsiam, *common, "--max-steps", "5", "--out", tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["step"] for r in metrics(tmp_path / "resumed") if "loss" in r] == [1, 2, 3, 4, 5]


def test_gpu_augment_without_a_crop_on_full_size_images_is_one_line():
    with pytest.raises(ga.Unsupported, match="needs a crop"):
        ga.split(v2.Compose([v2.RandomHorizontalFlip(), data.normalize("imagenet")]))


# --- the TF operations (SimCLR, BYOL's ImageNet preset) on the batch ---------------------------------------

def test_tf_colour_distortion_on_the_batch_draws_per_sample():
    """SimCLR's colour distortion on a batch of grey images: only brightness acts there (contrast, saturation and
    hue leave a flat grey image alone), so each view is v + δ where the jitter ran (p 0.8): δ uniform in
    [−0.8s, 0.8s] (TF's random_brightness adds it), one δ per sample, the rate 0.8."""
    import simclr
    n, s = 3000, 0.5
    x = torch.full((n, 3, 4, 4), 0.5)
    y = simclr.color_distortion(x, gen(20), s)
    assert (y.flatten(1).amax(1) - y.flatten(1).amin(1)).max() < 1e-6  # still flat and grey
    delta = y[:, 0, 0, 0] - 0.5
    moved = delta[delta.abs() > 2e-4]  # grayscale alone moves grey by −5e-5 (TF's weights sum to 0.9999)
    assert rate_ok(len(moved), n, 0.8)
    assert ks_uniform(moved, -0.8 * s, 0.8 * s) < KS / math.sqrt(len(moved))


def test_tf_random_order_is_per_sample():
    """Contrast 0 (each channel to its own mean) and saturation 0 (each pixel to its max) do not commute on two
    pixels (0.8, 0.2, 0.2) and (0.2, 0.8, 0.2): 0.5 when contrast runs first, 0.8 when saturation does; each
    order half the time, drawn per sample on the batch."""
    from common import tf_image
    n = 4000
    x = torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.2, 0.2]]).view(1, 3, 1, 2).expand(n, 3, 1, 2)
    ops = [(tf_image.adjust_contrast, torch.zeros(n)), (tf_image.adjust_saturation, torch.zeros(n))]
    y = tf_image.random_order(x, ops, gen(21))[:, 0, 0, 0]
    contrast_first, saturation_first = torch.isclose(y, torch.tensor(0.5)), torch.isclose(y, torch.tensor(0.8))
    assert (contrast_first | saturation_first).all()
    assert rate_ok(int(contrast_first.sum()), n, 0.5)
