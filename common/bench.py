"""Speed and memory of each method: `python -m common.bench [--methods simsiam simclr] [--device cuda]`.

Each method runs its own `main()`, so its real model, optimiser, schedule, after-step update (BYOL's
target) and logging, with `Run.batches` replaced by a driver that feeds the loop and times it, in four
phases, each after --warmup untimed steps:

  model       --steps steps on random tensors already on the device: images/s, and the peak memory
              above the process's before the method started (CUDA: torch.cuda.max_memory_allocated;
              CPU: the peak resident set, VmHWM, reset at the start of the timed steps);
  overhead    the method's step against the bare two-view forward and backward of its backbone
              alone, alternated step by step so that both see the same machine load (medians);
  loader      two-view batches per second from the method's real loader (data.Views and
              data.train_loader, or the on-device pipeline with --gpu-augment), moved to the device;
  end-to-end  the real loader feeding the training step, as in training.

With --loaders it compares instead each method's CPU pipeline, one view pair per sample, JPEG decode included,
on one thread (per core), with the plain-torchvision reference (RandomResizedCrop, flip, ColorJitter p 0.8,
grayscale p 0.2 and, at 224 px, PIL's GaussianBlur p 0.5, on PIL images, as the official PyTorch codes write
it): at 32 px on CIFAR-10's JPEGs (--cifar10-jpeg, the archive of the real images as JPEG files; else
synthetic 32-px JPEGs), at 224 px on 500 × 375 JPEGs (those images, or synthetic ones, upscaled bicubically
with grain added), in rounds that visit every pipeline in turn so that all see the same machine load; it
prints samples/s and the ratio to the reference. Each method's pipeline is what its main() builds (its
augment(args) for both views, with the dataset's recipe: cifar10 at 32 px, imagenet at 224 px).

An image is one pair of views (img/s as in the training log). On CUDA the model phase also counts the
host syncs of a step (torch.cuda.set_sync_debug_mode). Prints a table and writes --out (JSON); flags
after `--` go to every method's command line (e.g. `-- --K 4608`).
"""
import argparse
import ctypes
import importlib
import io
import itertools
import json
import platform
import random
import re
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from common import cli, data, train

METHODS = ("mocov1", "mocov2", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad")
ROOT = Path(__file__).resolve().parents[1]


# --- memory ---------------------------------------------------------------------------------------

def _status_mib(field):
    """VmRSS (now) or VmHWM (peak) of this process in MiB; None where /proc is not there."""
    try:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024
    except (OSError, TypeError):
        return None


def memory_now(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # give freed heap back to the system first, so that the next reading starts low
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _status_mib("VmRSS")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS
    except OSError:
        pass


def peak(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mib("VmHWM")


# --- the driver that replaces Run.batches ---------------------------------------------------------

def _stream(run, loader):
    """The run's view pairs on the device (the loader's, or made there with --gpu-augment), epoch after epoch."""
    views, step = run.views(loader), 0
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        for pair in views(step):
            step += 1
            yield pair


def per_second(stream, warmup, count, sync):
    """Items of `stream` per second: `count` timed after `warmup` untimed, `sync` (the device's) around the timing."""
    for _ in range(warmup):
        next(stream)
    sync()
    start = time.perf_counter()
    for _ in range(count):
        next(stream)
    sync()
    return count / (time.perf_counter() - start)


def drive(run, loader, opts, result, base_memory):
    """Run.batches for the bench: yields the batches of the four phases, timing the loop around it."""
    device, n, size = run.device, loader.batch_size, run.args.image_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x1, x2 = (run.gpu.inputs(torch.randn(n, 3, size, size, device=device)) for _ in range(2))

    def timed(batches):
        """Yield the batches to the loop; return the seconds the loop took over them."""
        sync()
        start = time.perf_counter()
        yield from batches
        sync()
        return time.perf_counter() - start

    # model: random tensors on the device
    for _ in range(opts.warmup):
        yield x1, x2
    reset_peak(device)
    seconds = yield from timed((x1, x2) for _ in range(opts.steps))
    model = {"img_per_s": n * opts.steps / seconds, "step_ms": 1000 * seconds / opts.steps}
    top = peak(device)
    model["peak_mem_mib"] = None if top is None or base_memory is None else top - base_memory
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(3):
                    yield x1, x2
            finally:
                torch.cuda.set_sync_debug_mode(0)
        model["host_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught) / 3
    result["model"] = model

    # overhead: the method's step and the bare backbone's, alternated
    backbone = torch.compile(run.backbone, backend=run.args.compile_backend) if run.args.compile else run.backbone

    def bare():
        with run.autocast():
            out = backbone(x1).float().mean() + backbone(x2).float().mean()
        out.backward()
        for p in run.backbone.parameters():
            p.grad = None
        sync()

    for _ in range(opts.warmup):
        bare()
    method_s, bare_s = [], []
    for _ in range(opts.steps):
        sync()
        start = time.perf_counter()
        yield x1, x2
        sync()
        method_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare()
        bare_s.append(time.perf_counter() - start)
    step, backbone_only = statistics.median(method_s), statistics.median(bare_s)
    result["overhead"] = {"step_ms": 1000 * step, "bare_backbone_ms": 1000 * backbone_only,
                          "overhead_pct": 100 * (step / backbone_only - 1)}

    # loader alone, then the loader feeding the step
    stream = _stream(run, loader)
    try:
        result["loader"] = {"img_per_s": n * per_second(stream, opts.warmup, opts.steps, sync)}
        for _ in range(opts.warmup):
            yield next(stream)
        seconds = yield from timed(next(stream) for _ in range(opts.steps))
        result["end_to_end"] = {"img_per_s": n * opts.steps / seconds}
    finally:
        stream.close()  # stops the loader's workers


def measure(name, opts, extra):
    """Bench one method through its own main(); returns its row of results."""
    module = importlib.import_module(name)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--dataset", opts.dataset, "--data-dir", opts.data_dir, "--batch-size", opts.batch_size,
                "--workers", opts.workers, "--device", opts.device, "--knn-every", "-1", "--no-resume",
                "--out", out, "--amp" if opts.amp else "--no-amp", "--compile" if opts.compile else "--no-compile",
                "--gpu-augment" if opts.gpu_augment else "--no-gpu-augment"]
        argv += ["--image-size", opts.image_size] if opts.image_size else []
        argv += ["--arch", opts.arch] if opts.arch else []
        args = cli.parse(module.Args, getattr(module, "PRESETS", {}), [str(a) for a in argv + extra])
        device = torch.device("cuda" if opts.cuda else "cpu")
        result = {"method": name}
        base = memory_now(device)
        # enough synthetic images for both loader phases within one epoch
        images = max(data.SYNTHETIC_SIZE["train"], args.batch_size * (2 * (opts.warmup + opts.steps) + 1))

        def batches(run, loader):
            result.update(params_m=sum(p.numel() for p in run.model.parameters()) / 1e6,
                          optimizer=type(run.optimizer).__name__)
            return drive(run, loader, opts, result, base)
        with mock.patch.object(train.Run, "batches", batches), mock.patch.dict(data.SYNTHETIC_SIZE, train=images):
            module.main(args)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --- the loader comparison: each method's CPU pipeline against plain torchvision ------------------

class PILGaussianBlur:
    """PIL's ImageFilter.GaussianBlur(radius=σ), σ ~ U[0.1, 2.0]: the blur of the official PyTorch codes."""

    def __call__(self, image):
        from PIL import ImageFilter
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def reference(size, dataset):
    """The plain-torchvision recipe on PIL images, as a user of lightly or solo-learn writes it."""
    from torchvision import transforms as T
    mean, std = data.MEAN_STD.get(dataset, data.IMAGENET_MEAN_STD)
    blur = [T.RandomApply([PILGaussianBlur()], p=0.5)] if size >= 224 else []
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                      *blur, T.ToTensor(), T.Normalize(mean, std)])


class _Captured(Exception):
    pass


def method_views(name, dataset):
    """(t1, t2): the two view pipelines the method's main() builds for `dataset` (its data.Views call, caught)."""
    module = importlib.import_module(name)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--dataset", dataset, "--device", "cpu", "--knn-every", "-1", "--no-resume", "--out", out,
                "--workers", "0"]
        args = cli.parse(module.Args, getattr(module, "PRESETS", {}), argv)

        def capture(base, t1, t2):
            raise _Captured(t1, t2)
        with mock.patch.object(data, "Views", capture), mock.patch.object(data, "dataset", lambda *a, **k: []):
            try:
                module.main(args)
            except _Captured as c:
                return c.args
    raise RuntimeError(f"{name}.main() built no data.Views")


def _jpeg(image, quality=90):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_sources(n, archive=None, seed=0):
    """{32: n CIFAR-size JPEG files' bytes, 224: n 500 × 375 JPEGs} and a line saying what they are. From the
    archive of CIFAR-10 as JPEG files (the first n training images) where given; else synthetic images (a
    random 4 × 4 colour grid upscaled, with grain). The 500 × 375 ones are those upscaled bicubically with
    grain added (σ 6 grey levels), so that they decode like photographs rather than flat colour."""
    from PIL import Image
    rng = torch.Generator().manual_seed(seed)
    if archive:
        small = []
        try:
            with tarfile.open(archive) as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg")) and "/train/" in member.name:
                        small.append(tar.extractfile(member).read())
                        if len(small) == n:
                            break
        except (OSError, tarfile.TarError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "not a readable tar archive"
            raise SystemExit(f"error: cannot read {archive} ({why}); pass CIFAR-10 as JPEG files (.tar.gz)") from None
        if len(small) < n:
            raise SystemExit(f"error: {archive} holds {len(small)} training JPEGs, fewer than {n}")
        what = f"the first {n} CIFAR-10 training JPEGs of {Path(archive).name}"
    else:
        def synthetic():
            grid = (torch.rand(3, 4, 4, generator=rng) * 255).to(torch.uint8)
            image = torch.nn.functional.interpolate(grid[None].float(), size=(32, 32), mode="bicubic")[0]
            image = image + 12 * torch.randn(image.shape, generator=rng)
            return Image.fromarray(image.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        small = [_jpeg(synthetic()) for _ in range(n)]
        what = f"{n} synthetic 32-px JPEGs"

    def large(jpeg):
        image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((500, 375), Image.BICUBIC)
        grain = 6 * torch.randn(375, 500, 3, generator=rng)
        pixels = torch.from_numpy(__import__("numpy").asarray(image).copy()).float() + grain
        return _jpeg(Image.fromarray(pixels.clamp(0, 255).round().to(torch.uint8).numpy()))
    return {32: small, 224: [large(j) for j in small]}, what + "; at 224 px the same upscaled to 500 × 375 with grain"


class _Decoded(torch.utils.data.Dataset):
    """JPEG bytes -> (PIL image, 0), decoded at each access as a loader's dataset does."""

    def __init__(self, jpegs):
        self.jpegs = jpegs

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        from PIL import Image
        return Image.open(io.BytesIO(self.jpegs[i])).convert("RGB"), 0


def compare_loaders(opts):
    """Samples/s of each pipeline per core, rounds interleaved; returns the rows."""
    jpegs, what = jpeg_sources(opts.samples, opts.cifar10_jpeg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: a loader worker's one thread
    rows = []
    try:
        for size in opts.sizes:
            dataset = "cifar10" if size == 32 else "imagenet"
            base = _Decoded(jpegs[size])
            pipelines = {"reference": data.Views(base, reference(size, dataset), reference(size, dataset))}
            for name in opts.methods:
                pipelines[name] = data.Views(base, *method_views(name, dataset))
            seconds = dict.fromkeys(pipelines, 0.0)
            for views in pipelines.values():  # one untimed sample each: imports, caches
                views[0, 0]
            for r in range(opts.rounds):
                for name, views in pipelines.items():
                    start = time.perf_counter()
                    for i in range(len(base)):
                        views[i, r * len(base) + i]
                    seconds[name] += time.perf_counter() - start
            samples = opts.rounds * len(base)
            ref = samples / seconds["reference"]
            for name in pipelines:
                rate = samples / seconds[name]
                rows.append({"size": size, "pipeline": name, "samples_per_s": rate, "ratio": rate / ref})
    finally:
        torch.set_num_threads(threads)
    return rows, what


def loader_table(rows):
    head = ["px", "pipeline", "samples/s per core", "vs reference"]
    cells = [[str(r["size"]), r["pipeline"], f"{r['samples_per_s']:.1f}", f"{r['ratio']:.2f} x"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


# --- command line ---------------------------------------------------------------------------------

def parse(argv):
    p = cli._Parser(prog="python -m common.bench", description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: every method file present")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed steps per phase (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each phase (default 5)")
    p.add_argument("--image-size", type=int, help="default: the dataset's")
    p.add_argument("--arch", choices=("resnet18", "resnet50"), help="default: the dataset's")
    p.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 32 on CPU")
    p.add_argument("--workers", type=int, default=cli.System.workers, help="loader processes")
    p.add_argument("--dataset", choices=cli.DATASETS, default="synthetic")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--gpu-augment", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--out", help="JSON file (default runs/bench-<device>.json, runs/bench-loaders.json)")
    p.add_argument("--loaders", action="store_true", help="compare each method's CPU pipeline with plain torchvision")
    p.add_argument("--sizes", type=int, nargs="+", choices=(32, 224), default=[32, 224], help="with --loaders")
    p.add_argument("--rounds", type=int, default=5, help="with --loaders: interleaved rounds (default 5)")
    p.add_argument("--samples", type=int, default=48, help="with --loaders: samples per pipeline per round")
    p.add_argument("--cifar10-jpeg", help="with --loaders: CIFAR-10 as JPEG files (.tar.gz); default synthetic")
    split = argv.index("--") if "--" in argv else len(argv)
    opts, extra = p.parse_args(argv[:split]), argv[split + 1:]
    if opts.rounds < 1 or opts.samples < 1:
        p.error("--rounds and --samples must be at least 1")
    if opts.steps < 1 or opts.warmup < 0 or (opts.compile and opts.warmup < 1):
        p.error("--steps must be at least 1 and --warmup at least 0 (1 with --compile)")
    opts.cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
    opts.batch_size = opts.batch_size or (256 if opts.cuda else 32)
    opts.out = opts.out or f"runs/bench-{'loaders' if opts.loaders else 'cuda' if opts.cuda else 'cpu'}.json"
    missing = [m for m in opts.methods or () if not (ROOT / f"{m}.py").exists()]
    if missing:
        p.error(f"{', '.join(m + '.py' for m in missing)} not in {ROOT}")
    opts.methods = opts.methods or [m for m in METHODS if (ROOT / f"{m}.py").exists()]
    return opts, extra


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        name = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())[1]
    except (OSError, TypeError):
        name = platform.processor() or "CPU"
    return f"{name}, {torch.get_num_threads()} threads"


def table(results):
    def num(row, phase, key, fmt="{:.0f}"):
        value = row.get(phase, {}).get(key)
        return "-" if value is None else fmt.format(value)
    head = ["method", "model img/s", "step ms", "peak MiB", "step vs bare backbone", "loader img/s", "end-to-end img/s"]
    rows = [[r["method"], num(r, "model", "img_per_s"), num(r, "model", "step_ms", "{:.1f}"),
             num(r, "model", "peak_mem_mib"),
             f"{num(r, 'overhead', 'step_ms', '{:.1f}')} vs {num(r, 'overhead', 'bare_backbone_ms', '{:.1f}')} ms "
             f"({num(r, 'overhead', 'overhead_pct', '{:+.1f}')}%)",
             num(r, "loader", "img_per_s"), num(r, "end_to_end", "img_per_s")] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def write(report, out):
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise SystemExit(f"error: cannot write {out} ({e.strerror}); pass a writable --out") from None
    print(f"wrote {out}")


def main(argv=None):
    opts, extra = parse(sys.argv[1:] if argv is None else argv)
    command = "python -m common.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if opts.loaders:
        rows, what = compare_loaders(opts)
        report = {"command": command, "device": device_name(torch.device("cpu")).rsplit(",", 1)[0] + ", 1 thread",
                  "torch": torch.__version__, "data": what, "rounds": opts.rounds, "samples": opts.samples,
                  "results": rows}
        print(f"{what}; rounds: {opts.rounds} of {opts.samples} samples (two views each), one thread")
        print(loader_table(rows))
        write(report, opts.out)
        return report
    results = []
    for name in opts.methods:
        print(f"{name}...", flush=True)
        results.append(measure(name, opts, extra))
    report = {"command": command,
              "device": device_name(torch.device("cuda" if opts.cuda else "cpu")), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(opts).items() if k not in ("out", "cuda")}, "results": results}
    print(table(results))
    write(report, opts.out)
    return report


if __name__ == "__main__":
    main()
