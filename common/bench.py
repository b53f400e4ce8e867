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

An image is one pair of views (img/s as in the training log). On CUDA the model phase also counts the
host syncs of a step (torch.cuda.set_sync_debug_mode). Prints a table and writes --out (JSON); flags
after `--` go to every method's command line (e.g. `-- --K 4608`).
"""
import argparse
import ctypes
import importlib
import itertools
import json
import platform
import re
import statistics
import sys
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
        for _ in range(opts.warmup):
            next(stream)
        sync()
        start = time.perf_counter()
        for _ in range(opts.steps):
            next(stream)
        sync()
        result["loader"] = {"img_per_s": n * opts.steps / (time.perf_counter() - start)}
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
    p.add_argument("--out", help="JSON file (default runs/bench-<device>.json)")
    split = argv.index("--") if "--" in argv else len(argv)
    opts, extra = p.parse_args(argv[:split]), argv[split + 1:]
    if opts.steps < 1 or opts.warmup < 0 or (opts.compile and opts.warmup < 1):
        p.error("--steps must be at least 1 and --warmup at least 0 (1 with --compile)")
    opts.cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
    opts.batch_size = opts.batch_size or (256 if opts.cuda else 32)
    opts.out = opts.out or f"runs/bench-{'cuda' if opts.cuda else 'cpu'}.json"
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


def main(argv=None):
    opts, extra = parse(sys.argv[1:] if argv is None else argv)
    results = []
    for name in opts.methods:
        print(f"{name}...", flush=True)
        results.append(measure(name, opts, extra))
    report = {"command": "python -m common.bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": device_name(torch.device("cuda" if opts.cuda else "cpu")), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(opts).items() if k not in ("out", "cuda")}, "results": results}
    print(table(results))
    try:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise SystemExit(f"error: cannot write {opts.out} ({e.strerror}); pass a writable --out") from None
    print(f"wrote {opts.out}")
    return report


if __name__ == "__main__":
    main()
