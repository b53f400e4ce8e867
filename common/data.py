"""Datasets through torchvision, a two-view wrapper, and loaders that shard, resume and seed.

Every training sample draws its augmentation from its own seed, made of (seed, epoch, index): the
views are the same whatever the number of ranks or loader workers and wherever a run resumed."""
import contextlib
from pathlib import Path

import PIL.Image
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from common import dist

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SYNTHETIC_SIZE = {"train": 512, "test": 128}


class DataError(Exception):
    """An unreadable image, found in a loader worker; the training loop reports it as one line."""

    @staticmethod
    def line(e):
        """The one-line message, also when a loader worker re-raised it inside a longer text."""
        return str(e).strip().splitlines()[-1].split("DataError: ")[-1]


def normalize(dataset):
    """The per-channel normalisation that ends every pipeline."""
    mean, std = MEAN_STD.get(dataset, IMAGENET_MEAN_STD)
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class PILGaussianBlur(v2.Transform):
    """PIL's `ImageFilter.GaussianBlur(radius=σ)`, σ uniform in `sigma`, on a PIL image: the blur the official PyTorch
    codes apply (MoCo v2's loader.py GaussianBlur, and the codes that copy it). PIL approximates the Gaussian by
    three passes of an extended box filter along each axis (Pillow's BoxBlur.c), so it has no kernel size;
    common/gpu_augment.py pil_gaussian_blur computes the same on tensors."""

    def __init__(self, sigma=(0.1, 2.0)):
        super().__init__()
        self.sigma = sigma

    def make_params(self, flat_inputs):
        return {"sigma": torch.empty(1).uniform_(*self.sigma).item()}  # from torch's generator, as v2's transforms

    def transform(self, inpt, params):
        from PIL import Image, ImageFilter
        if not isinstance(inpt, Image.Image):
            raise TypeError(f"PILGaussianBlur takes PIL images, not {type(inpt).__name__}: put it before ToImage")
        return inpt.filter(ImageFilter.GaussianBlur(radius=params["sigma"]))


def eval_transform(dataset, image_size, interpolation="bilinear"):
    """No augmentation: resize (to 256/224 of the crop for large images; `interpolation` bilinear or bicubic) and
    centre-crop."""
    resize = image_size if image_size <= 64 else image_size * 256 // 224
    mode = v2.InterpolationMode(interpolation)
    return v2.Compose([v2.Resize(resize, interpolation=mode), v2.CenterCrop(image_size), normalize(dataset)])


def _folder(root, split):
    names = {"train": ["train"], "test": ["val", "test"]}[split]
    for name in names:
        if (Path(root) / name).is_dir():
            path = Path(root) / name
            break
    else:
        dist.fail(f"{root} has no {' or '.join(n + '/' for n in names)} folder; --dataset folder/imagenet "
                  f"expect train/ and val/ (or test/) in ImageFolder layout (one folder per class)")
    try:
        return torchvision.datasets.ImageFolder(path, loader=_load_rgb)
    except (FileNotFoundError, OSError) as e:
        dist.fail(f"no images found in {path} ({str(e).splitlines()[0]}); put one folder per class "
                  f"with .jpg/.png files in it")


def _load_rgb(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}); remove or replace the file") from None


def dataset(name, root, split, image_size=32):
    """The `split` ('train', 'test' or 'pretrain') of a dataset as (PIL image, label) pairs."""
    tv = torchvision.datasets
    if name in ("folder", "imagenet"):
        return _folder(root, "test" if split == "test" else "train")
    if name == "synthetic":
        return tv.FakeData(SYNTHETIC_SIZE["test" if split == "test" else "train"], (3, image_size, image_size),
                           num_classes=10, random_offset=10**6 if split == "test" else 0)
    if name not in ("cifar10", "cifar100", "stl10"):
        dist.fail(f"unknown dataset {name!r}")
    make = {"cifar10": lambda **kw: tv.CIFAR10(root, train=split != "test", **kw),
            "cifar100": lambda **kw: tv.CIFAR100(root, train=split != "test", **kw),
            "stl10": lambda **kw: tv.STL10(root, split={"pretrain": "train+unlabeled", "train": "train",
                                                        "test": "test"}[split], **kw)}[name]
    if dist.is_main():  # one rank downloads when the files are absent, the others wait
        try:
            make(download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            try:
                make(download=True)
            except Exception as e:  # no network, or a broken download
                dist.fail(f"{name} is not in {root} and could not be downloaded ({_why(e)}); "
                          f"download it there or pass --data-dir")
    dist.barrier()
    try:
        return make(download=False)
    except Exception as e:
        dist.fail(f"cannot read {name} in {root} ({_why(e)}); delete it to download it again, or pass --data-dir")


def _why(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


@contextlib.contextmanager
def seeded(seed):
    """torch's CPU generator, which the transforms draw from, seeded with `seed` inside the block; the
    caller's state is back after it. (What torch.random.fork_rng and torch.manual_seed do for the CPU, without
    their visits to every other device's generators, which cost a loader part of its samples per
    second.)"""
    generator = torch.random.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class Views(Dataset):
    """(image, label) -> (view 1, view 2), each sample's augmentation drawn from its own seed."""

    def __init__(self, base, t1, t2):
        self.base, self.t1, self.t2 = base, t1, t2

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, seed = key
        image, _ = self.base[i]
        # the caller's generator untouched (the loop's, when there are no loader workers); inference mode: the views
        # never need autograd, and on a small image its per-operation bookkeeping is a sizeable share of the work
        # (the batch collated from them is an ordinary tensor)
        with seeded(seed), torch.inference_mode():
            return run(self.t1, image), run(self.t2, image)


def run(t, x):
    """t(x) on one image, as v2.Compose runs it, with the kernels of the simplest steps called directly: ToImage,
    ToDtype on an Image, RandomHorizontalFlip (its one draw, torch.rand(1) < p, then the kernel), Normalize. The
    same kernels, draws and values (tests/test_data.py), without torchvision's per-transform dispatch, which on a
    CIFAR-size image costs about a tenth of a view's time."""
    kind = type(t)
    if kind is v2.Compose:
        for step in t.transforms:
            x = run(step, x)
        return x
    if kind is v2.ToImage and isinstance(x, (PIL.Image.Image, torch.Tensor)):
        return v2.functional.to_image(x)
    if kind is v2.ToDtype and isinstance(t.dtype, torch.dtype) and type(x) is tv_tensors.Image:
        return v2.functional.to_dtype(x, t.dtype, scale=t.scale)
    if kind is v2.RandomHorizontalFlip and isinstance(x, (PIL.Image.Image, tv_tensors.Image)):
        return v2.functional.horizontal_flip(x) if torch.rand(1) < t.p else x
    if kind is v2.Normalize and type(x) is tv_tensors.Image:
        return v2.functional.normalize(x, t.mean, t.std, t.inplace)
    return t(x)


class Transformed(Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return run(self.transform, image), label


class Sampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (`skip` samples of this rank) and yields
    (index, seed) keys, the seed fixed by (seed, epoch, index)."""

    def __init__(self, data, seed, num_replicas=None, rank=None):
        super().__init__(data, num_replicas=num_replicas or dist.world(), rank=dist.rank() if rank is None else rank,
                         shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        for i in list(super().__iter__())[self.skip:]:
            yield i, hash((self.seed, self.epoch, i)) % 2**62

    def __len__(self):
        return self.num_samples - self.skip


def train_loader(data, batch_size, workers, seed, device):
    """Loader of two-view batches for pre-training: `batch_size` is global, each rank gets its share."""
    if batch_size % dist.world():
        dist.fail(f"--batch-size {batch_size} is not divisible by the {dist.world()} processes; "
                  f"use a multiple of {dist.world()}")
    per_rank = batch_size // dist.world()
    sampler = Sampler(data, seed)
    if len(sampler) < per_rank:
        dist.fail(f"the dataset has {len(data)} images, fewer than one batch of {batch_size}; "
                  f"lower --batch-size or add images")
    return DataLoader(data, per_rank, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))  # leaves the global generator alone


def eval_loader(data, batch_size, workers, device):
    """This rank's shard of `data` (every W-th sample): every sample exactly once over all ranks."""
    shard = torch.utils.data.Subset(data, range(len(data))[dist.rank()::dist.world()])
    return DataLoader(shard, batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator())  # leaves the global generator alone
