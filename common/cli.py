"""Command line from a dataclass: `parse(Args, PRESETS)` turns each field into a `--kebab-case` flag.

Precedence, lowest first: the method's `Args` defaults, the dataset's defaults (`DATASET_DEFAULTS`),
the method's `PRESETS[dataset]`, then the flags given on the command line.
"""
import argparse
import dataclasses
import inspect
import os
import typing
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "folder", "synthetic")

# Crop size per dataset; the CIFAR stem of common.resnet follows from image sizes of 64 px and less.
DATASET_DEFAULTS = {
    "cifar10": dict(image_size=32),
    "cifar100": dict(image_size=32),
    "stl10": dict(image_size=96),
    "imagenet": dict(image_size=224, arch="resnet50"),
    "folder": dict(image_size=224),
    "synthetic": dict(image_size=32),
}


FULL_SIZE = 96  # from this --image-size up, a sample's decode, crop and resize cost milliseconds, not microseconds


def default_workers(image_size=32):
    """Loader processes per rank that the machine can run: the cores this process may use per rank of its node
    (the cores it may run on, shared by torchrun's LOCAL_WORLD_SIZE ranks), at least 1; for small images (below
    FULL_SIZE px) at most 4, which feed a step there. Full-size images take every core: at 224 px one core
    prepares a few dozen samples per second (python -m common.bench --loaders), far below what a GPU trains on.
    More than the process's cores makes PyTorch's DataLoader warn, and slows the step it feeds."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (macOS, Windows)
        cores = os.cpu_count() or 1
    per_rank = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return per_rank if image_size >= FULL_SIZE else min(4, per_rank)


@dataclass
class System:
    """Flags every method accepts: data, run directory, evaluation and engineering, no paper symbol."""

    dataset: typing.Literal[DATASETS] = "cifar10"  # dataset; `imagenet` also selects the paper's recipe
    data_dir: str = "./data"  # dataset root; folder/imagenet expect train/ and val/ (or test/)
    arch: typing.Literal["resnet18", "resnet50"] = "resnet18"  # backbone (CIFAR stem at <= 64 px)
    image_size: int = 32  # crop size in pixels
    workers: int = default_workers()  # loader processes per rank: 4 (fewer if fewer cores), every core from 96 px
    out: str = ""  # run directory (default runs/<method>-<dataset>)
    resume: bool = True  # continue from OUT/checkpoint.pt when it exists
    max_steps: int = 0  # stop after this many optimiser steps (0: run all epochs)
    knn_every: int = 10  # kNN monitor every this many epochs, and at the end (0: only at the end)
    save_every: float = 30.0  # minutes between checkpoints inside an epoch, at a log line (0: epoch ends only)
    knn_k: int = 200  # k of the weighted kNN monitor
    knn_t: float = 0.1  # temperature of the weighted kNN monitor
    seed: int = 0  # random seed
    log_every: int = 50  # steps between progress lines and metrics.jsonl rows (also after step 1, and within 30 s)
    tensorboard: bool = False  # also write the metrics.jsonl scalars to OUT/tensorboard (the tensorboard group)
    amp: bool = True  # bf16 autocast on CUDA (the losses stay float32)
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: trace only, no code generation)
    gpu_augment: bool = False  # augment whole batches on the device (<= 64 px held there; larger: crops in the loader)
    device: typing.Literal["auto", "cuda", "cpu"] = "auto"  # auto: cuda when available


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag_type(annotation):
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def _comments(cls):
    """The trailing comment of each field line, used as its --help text."""
    text = {}
    for klass in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
            if m:
                text[m[1]] = m[2]
    return text


def parse(Args, presets=None, argv=None):
    """Parse `argv` into an `Args` instance; see the module docstring for the precedence."""
    presets = presets or {}
    method = Path(inspect.getfile(Args)).stem
    parser = _Parser(prog=f"{method}.py", description=(inspect.getmodule(Args).__doc__ or "").split("\n")[0])
    own = [f for f in dataclasses.fields(Args) if f.name in Args.__annotations__]
    rest = [f for f in dataclasses.fields(Args) if f.name not in Args.__annotations__]
    hints, comments = typing.get_type_hints(Args), _comments(Args)
    for f in own + rest:  # the method's own hyper-parameters first in --help
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind, choices = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{comments.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, default=None, help=help_text)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    dataset = given.get("dataset", getattr(Args, "dataset", None))
    dataset_defaults = DATASET_DEFAULTS.get(dataset, {}) if issubclass(Args, System) else {}  # the methods' flags
    values = {**dataset_defaults, **presets.get(dataset, {}), **given}
    if dataset == "folder" and "image_size" in dataset_defaults and "image_size" not in given:
        values["image_size"] = folder_image_size(values.get("data_dir", Args.data_dir), values["image_size"])
    if issubclass(Args, System) and "workers" not in given:  # full-size images: every core of this rank
        values["workers"] = default_workers(values.get("image_size", Args.image_size))
    args = Args(**{k: v for k, v in values.items() if k in hints})
    if issubclass(Args, System) and not args.out:
        args.out = f"runs/{method}-{args.dataset}"
    for name in ("epochs", "batch_size", "image_size"):
        if given.get(name, 1) < 1:  # (a default below 1 means "decided later", as in common.linear)
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if argv is None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupted_while_starting)  # Run.batches takes over during training
        sys.excepthook = _one_line_for_bad_sizes
    return args


def folder_image_size(root, default, checked=64):
    """--image-size for a folder dataset when none is given. Up to `checked` images of root/train/ are looked at
    (their headers only, a few from each class): when they all have one size smaller than `default`, the
    crop is their own size (CIFAR-10's 32 px JPEGs train at 32 px, with the CIFAR stem, rather than upsampled
    to 224 px with the ImageNet stem at a quarter of the speed); when they have several sizes, all smaller, the
    default stays and one line says so. Either way one line tells how to choose. (No folder, or no readable
    image: the default; the dataset's own error comes later, with its one line.)"""
    from PIL import Image
    train = Path(root) / "train"
    try:
        classes = sorted(d.path for d in os.scandir(train) if d.is_dir())
        per_class = max(1, checked // max(1, len(classes)))
        paths = [f.path for d in classes[:checked] for _, f in zip(range(per_class), os.scandir(d)) if f.is_file()]
        sizes = set()
        for path in paths[:checked]:
            try:
                with Image.open(path) as image:
                    sizes.add(image.size)
            except OSError:  # not an image (a README): not counted
                pass
    except OSError:
        return default
    if not sizes or max(max(s) for s in sizes) >= default:
        return default
    if len(sizes) == 1:
        (width, height), = sizes
        size = min(width, height)
        from common.resnet import uses_cifar_stem
        stem = "the CIFAR stem" if uses_cifar_stem(size) else "the ImageNet stem"
        _say(f"--dataset folder: the images of {train} are {width}x{height} px: training at --image-size {size}, "
             f"their own size, with {stem} (pass --image-size to choose another)")
        return size
    largest = max(max(s) for s in sizes)
    _say(f"--dataset folder: the images of {train} have several sizes, up to {largest} px: training at "
         f"--image-size {default}, upsampled (pass --image-size to choose another)")
    return default


def _say(line):
    if os.environ.get("RANK", "0") == "0":  # (before torchrun's process group exists: its variable)
        print(line, flush=True)


def _one_line_for_bad_sizes(kind, error, tb):
    """A batch or an image too small for BatchNorm fails deep inside the model's step: say which flags
    to change, in one line, instead of the traceback. Any other error keeps its traceback."""
    if kind is ValueError and "Expected more than 1 value per channel when training" in str(error):
        shape = str(error).rsplit("input size ", 1)[-1]
        sys.stderr.write(f"error: a BatchNorm layer got one value per channel ({shape}): raise --batch-size or "
                         f"--image-size (or lower --bn-splits where the method has it)\n")
        return
    sys.__excepthook__(kind, error, tb)


def _interrupted_while_starting(signum, frame):
    raise SystemExit("interrupted before training; no checkpoint was changed")


