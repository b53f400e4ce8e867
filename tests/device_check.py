"""The one-shot device check: what matters most on a GPU, measured in one short command.

    python3 -m tests.device_check --data ../shared/data/cifar10-jpeg.tar.gz --out DIR     # on a GPU, ≤ 7 min
    python3 -m tests.device_check --data TARBALL --out DIR --tiny                          # the same code on CPU

It needs torch, torchvision and einops, nothing else (no pytest, no uv): the GPU machines have those. In
this order, each result written to DIR the moment it is measured, so that a run cut short still hands
back what it measured:

1. speed: every method, 30 training steps at batch 512 on the real CIFAR-10 (the JPEG copy, 50,000
   training images) with --gpu-augment, through common.bench: s/step, images/s, seconds per CIFAR-10
   epoch end to end, peak memory, the step's overhead over the bare two-view backbone;
2. learning: SimCLR, BYOL and VICReg trained 10 epochs (warmup 1 epoch where the method has one) and
   their final-epoch kNN top-1 (the monitor's: k 200, t 0.1, the test set against the training set);
3. SimCLR and SimSiam again with --compile (speed as in 1);
4. the loader at 224 px, every method's recipe on full-size JPEGs (the training images enlarged to 500 x 375):
   samples/s per GPU (one process, its --workers) with and without --gpu-augment, the batches on the GPU;
5. the other methods trained 10 epochs, as long as the time left allows.

An item whose estimated time does not fit in what is left of --budget is skipped and listed as such;
an item that fails is recorded with its error and the check goes on. DIR receives results.json,
results.md and logs.txt (every item's output and every run's metrics.jsonl), three files in all.
"""
import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import bench, cli  # noqa: E402

FIRST = ("simclr", "byol", "vicreg")  # trained first: the anchors at 10 epochs
COMPILED = ("simclr", "simsiam")
ANCHORS = {  # top-1 % after 10 epochs on CIFAR-10, EMP-SSL's baseline table (arXiv 2304.03977): a linear
    "simclr": 56.5, "byol": 48.9, "vicreg": 69.7,  # probe there, the kNN monitor here (it reads lower)
}
TRAIN_IMAGES = 50_000  # a CIFAR-10 epoch


@dataclasses.dataclass
class Settings:
    device: str
    batch_size: int
    steps: int  # timed steps per bench phase
    warmup: int
    image_size: int
    epochs: int
    workers: int
    backend: str  # torch.compile's backend
    small: bool  # tiny heads (the --tiny mode)
    loader_size: int  # item 4: the crop, from sources of loader_source (width, height), loader_batches timed
    loader_source: tuple  # batches of loader_batch after one untimed
    loader_batch: int
    loader_batches: int


FULL = Settings("cuda", 512, 30, 5, 32, 10, 8, "inductor", False, 224, (500, 375), 128, 3)
TINY = Settings("cpu", 8, 1, 1, 8, 1, 0, "eager", True, 16, (80, 60), 2, 1)  # 80 px: streamed, as full-size
SMALL_HEADS = {"mocov1": ["--dim", "16", "--K", "32", "--bn-splits", "2"], "mocov2": ["--dim", "16", "--K", "32",
               "--bn-splits", "2"], "simclr": ["--dim", "16"], "byol": ["--hidden-dim", "16", "--dim", "8"],
               "simsiam": ["--dim", "32", "--pred-dim", "8"], "barlow": ["--dim", "16"], "vicreg": ["--dim", "16"],
               "unigrad": ["--dim", "8"]}


def method_flags(name, s):
    flags = SMALL_HEADS[name] if s.small else []
    module = importlib.import_module(name)
    if "warmup_epochs" in module.Args.__annotations__:  # the warmup scaled to a 10-epoch run
        flags = [*flags, "--warmup-epochs", "1"]
    return flags


# --- the data ---------------------------------------------------------------------------------------

def prepare_data(source, work, tiny):
    """The CIFAR-10 JPEG tree (cifar10/train, cifar10/test) from a tarball or a folder; returns its root."""
    source = Path(source)
    if source.is_dir():
        return source / "cifar10" if (source / "cifar10").is_dir() else source
    if not source.is_file():
        raise SystemExit(f"error: no data at {source}; pass --data ../shared/data/cifar10-jpeg.tar.gz")
    dest = Path(work) / "data"
    dest.mkdir(parents=True, exist_ok=True)
    if tiny:
        from tests.learning import extract_subset
        return extract_subset(dest, {"train": 2, "test": 1}, source)  # 2 steps of 8 per epoch
    if shutil.which("tar"):
        subprocess.run(["tar", "-xzf", str(source), "-C", str(dest)], check=True)
    else:
        with tarfile.open(source) as tar:
            tar.extractall(dest, filter="data")
    return dest / "cifar10"


def full_size_data(root, work, s, count):
    """`count` of the training JPEGs enlarged to s.loader_source (bicubic), saved as JPEGs (quality 90): an
    ImageNet-size folder for the loader item; returns its root."""
    from PIL import Image
    dest = Path(work) / "full-size"
    sources = sorted((Path(root) / "train").rglob("*.jpg"))
    for i in range(count):
        source = sources[i % len(sources)]
        path = dest / "train" / source.parent.name / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            image.convert("RGB").resize(s.loader_source, Image.BICUBIC).save(path, quality=90)
    return dest


# --- the report --------------------------------------------------------------------------------------

class Report:
    """results.json and results.md, rewritten after every item; logs.txt, appended as things happen."""

    def __init__(self, out, info):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = {"info": info, "speed": {}, "train": {}, "compiled": {}, "loader": {}, "skipped": [],
                        "errors": []}
        self.log = open(self.out / "logs.txt", "a", buffering=1)

    def write(self, text):
        self.log.write(text)
        sys.__stdout__.write(text)
        sys.__stdout__.flush()

    def flush(self):
        self.log.flush()

    def save(self):
        for name, text in (("results.json", json.dumps(self.results, indent=2) + "\n"), ("results.md", self.markdown())):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def markdown(self):
        r, info = self.results, self.results["info"]
        lines = [f"# Device check, {info['date']}", "", f"`{info['command']}`", "",
                 f"{info['device']}; torch {info['torch']}, torchvision {info['torchvision']}; "
                 f"batch {info['settings']['batch_size']}, {info['settings']['image_size']} px, --gpu-augment, bf16 autocast and channels_last "
                 f"on CUDA; data: {info['data']}", ""]

        def num(v, fmt):
            return "-" if v is None else fmt.format(v)
        for title, section in (("Speed", "speed"), ("Speed with --compile", "compiled")):
            if r[section]:
                lines += [f"## {title}", "", "| method | s/step | images/s (model) | images/s (end to end) | s per epoch "
                          "| peak MiB | step vs bare backbone | host syncs/step |", "|---|---|---|---|---|---|---|---|"]
                for m, v in r[section].items():
                    lines.append(f"| {m} | {num(v.get('s_per_step'), '{:.4f}')} | {num(v.get('model_img_per_s'), '{:.0f}')} "
                                 f"| {num(v.get('end_to_end_img_per_s'), '{:.0f}')} | {num(v.get('epoch_s'), '{:.2f}')} "
                                 f"| {num(v.get('peak_mem_mib'), '{:.0f}')} | {num(v.get('overhead_pct'), '{:+.1f}%')} "
                                 f"| {num(v.get('host_syncs_per_step'), '{:g}')} |")
                lines.append("")
        if r["loader"]:
            first = next(iter(r["loader"].values()))
            lines += ["## Loader per GPU", "", f"{first['image_size']} px from full-size JPEGs, one process, "
                      f"{first['workers']} workers, batch {first['batch_size']}, the views on the device", "",
                      "| method | samples/s (CPU pipeline) | samples/s (--gpu-augment) |", "|---|---|---|"]
            for m, v in r["loader"].items():
                lines.append(f"| {m} | {v['cpu_samples_per_s']:.0f} | {v['gpu_augment_samples_per_s']:.0f} |")
            lines.append("")
        if r["train"]:
            lines += ["## Trained", "", "| method | epochs | final kNN top-1 (k 200, t 0.1) | anchor (EMP-SSL, linear) "
                      "| loss first → last | wall s | images/s |", "|---|---|---|---|---|---|---|"]
            for m, v in r["train"].items():
                anchor = ANCHORS.get(m)
                lines.append(f"| {m} | {v['epochs']} | {num(v.get('knn_top1'), '{:.1f}%')} | "
                             f"{'' if anchor is None else f'{anchor}%'} | {num(v.get('loss_first'), '{:.3f}')} → "
                             f"{num(v.get('loss_last'), '{:.3f}')} | {v['wall_s']:.0f} | {num(v.get('img_per_s'), '{:.0f}')} |")
            lines.append("")
        for title, key in (("Skipped", "skipped"), ("Errors", "errors")):
            if r[key]:
                lines += [f"## {title}", ""] + [f"- {e['item']}: {e['why']}" for e in r[key]] + [""]
        return "\n".join(lines)


@contextlib.contextmanager
def captured(report, item):
    """The item's output into logs.txt (and the terminal); its failure recorded, not raised."""
    report.write(f"\n=== {item} ({time.strftime('%H:%M:%S')}) ===\n")
    start = time.time()
    try:
        with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
            yield
    except (Exception, SystemExit) as e:  # a method's one-line error ends in SystemExit
        why = "".join(traceback.format_exception_only(type(e), e)).strip()
        report.write(traceback.format_exc())
        report.results["errors"].append({"item": item, "why": why})
    finally:
        report.write(f"=== {item}: {time.time() - start:.1f} s ===\n")
        report.save()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- the items ---------------------------------------------------------------------------------------

def speed(name, s, root, work, compile=False):
    """common.bench's four phases for one method on the real data, with --gpu-augment."""
    argv = ["--device", s.device, "--methods", name, "--steps", s.steps, "--warmup", s.warmup, "--batch-size",
            s.batch_size, "--workers", s.workers, "--dataset", "folder", "--data-dir", root, "--image-size",
            s.image_size, "--gpu-augment", "--out", Path(work) / "bench.json"]
    argv += ["--compile"] if compile else []
    opts, _ = bench.parse([str(a) for a in argv])
    extra = [*method_flags(name, s), *(["--compile-backend", s.backend] if compile else [])]
    row = bench.measure(name, opts, extra)
    model, e2e = row.get("model", {}), row.get("end_to_end", {})
    s_per_step = s.batch_size / e2e["img_per_s"] if e2e.get("img_per_s") else None
    return {"s_per_step": s_per_step, "step_ms_model": model.get("step_ms"),
            "model_img_per_s": model.get("img_per_s"), "end_to_end_img_per_s": e2e.get("img_per_s"),
            "epoch_s": None if s_per_step is None else TRAIN_IMAGES // s.batch_size * s_per_step,
            "peak_mem_mib": model.get("peak_mem_mib"), "overhead_pct": row.get("overhead", {}).get("overhead_pct"),
            "host_syncs_per_step": model.get("host_syncs_per_step"), "loader_img_per_s": row.get("loader", {}).get("img_per_s"),
            "params_m": row.get("params_m")}


def loader(name, s, root):
    """Samples/s of one process's loader at s.loader_size px, the method's own recipe (its ImageNet preset), with
    and without --gpu-augment: s.loader_batches batches of s.loader_batch after one untimed, the views on the
    device."""
    from common import data, gpu_augment
    module = importlib.import_module(name)
    argv = ["--dataset", "imagenet", "--data-dir", root, "--image-size", s.loader_size, "--device", s.device]
    args = cli.parse(module.Args, getattr(module, "PRESETS", {}), [str(a) for a in argv])
    if "blur1" in module.Args.__annotations__:
        t1, t2 = module.augment(args, args.blur1, args.solarize1), module.augment(args, args.blur2, args.solarize2)
    else:
        t1 = t2 = module.augment(args)
    views = data.Views(data.dataset("imagenet", root, "train"), t1, t2)
    device = torch.device(s.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"workers": s.workers, "batch_size": s.loader_batch, "image_size": s.loader_size}

    def timed(stream):  # one batch untimed
        return s.loader_batch * bench.per_second(stream, 1, s.loader_batches, sync)

    cpu = data.train_loader(views, s.loader_batch, s.workers, 0, device)
    cpu.sampler.set_epoch(0)
    out["cpu_samples_per_s"] = timed((x1.to(device, non_blocking=True), x2.to(device, non_blocking=True))
                                     for x1, x2 in cpu)
    made = gpu_augment.DeviceViews(views, device, 0, s.workers)
    if made.images is not None:
        raise RuntimeError("the full-size images were held on the device, not streamed through the loader")
    made_stream = made.epoch(cpu.sampler, s.loader_batch, 0)
    out["gpu_augment_samples_per_s"] = timed(made_stream)
    made_stream.close()
    del cpu, made  # their workers end
    return out


def train(name, s, root, work, report):
    """The method's real main() for s.epochs epochs; the final-epoch kNN top-1 from its metrics.jsonl."""
    module = importlib.import_module(name)
    out = Path(work) / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--dataset", "folder", "--data-dir", root, "--image-size", s.image_size, "--epochs", s.epochs,
            "--batch-size", s.batch_size, "--workers", s.workers, "--device", s.device, "--gpu-augment",
            "--knn-every", "0", "--log-every", "20", "--out", out, *method_flags(name, s)]
    start = time.time()
    module.main(cli.parse(module.Args, getattr(module, "PRESETS", {}), [str(a) for a in argv]))
    wall = time.time() - start
    text = (out / "metrics.jsonl").read_text()
    report.write(f"--- {name} metrics.jsonl ---\n{text}")
    rows = [json.loads(r) for r in text.splitlines()]
    steps = [r for r in rows if "loss" in r]
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    return {"epochs": s.epochs, "knn_top1": 100 * knn[-1] if knn else None, "wall_s": wall,
            "loss_first": steps[0]["loss"] if steps else None, "loss_last": steps[-1]["loss"] if steps else None,
            "img_per_s": sum(r["img_per_s"] for r in steps[1:]) / len(steps[1:]) if len(steps) > 1 else None}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.device_check", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"),
                   help="the CIFAR-10 JPEG tarball (or its extracted folder)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and logs.txt")
    p.add_argument("--tiny", action="store_true", help="a few images and steps on the CPU (the test suite)")
    p.add_argument("--budget", type=float, help="seconds for the whole check (default 420; --tiny: no limit)")
    p.add_argument("--compile-estimate", type=float, default=150.0, help="seconds a --compile item is expected to take")
    p.add_argument("--methods", nargs="+", choices=bench.METHODS, default=list(bench.METHODS))
    a = p.parse_args(argv)
    s = TINY if a.tiny else FULL
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device is visible; the device check is for a GPU (--tiny runs it on the CPU)")
    start = time.time()
    deadline = start + (a.budget if a.budget is not None else (float("inf") if a.tiny else 420.0))
    import torchvision
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python3 -m tests.device_check " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": bench.device_name(torch.device(s.device)), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "settings": dataclasses.asdict(s),
            "budget_s": None if deadline == float("inf") else deadline - start, "data": None}
    with tempfile.TemporaryDirectory() as work:
        report = Report(a.out, info)
        with captured(report, "data"):
            root = prepare_data(a.data, work, a.tiny)
            info["data"] = f"{sum(1 for _ in (root / 'train').rglob('*.jpg'))} training JPEGs from {a.data}"
        if info["data"] is None:  # (its error is in results.json)
            return report.results
        step_s = {}

        def run(item, estimate, section, key, fn):
            left = deadline - time.time()
            if estimate > left:
                report.results["skipped"].append({"item": item, "why": f"about {estimate:.0f} s needed, {left:.0f} s left"})
                report.save()
                return
            with captured(report, item):
                report.results[section][key] = fn()

        def train_estimate(name):  # the epochs at the measured speed, plus the data load and the kNN
            return s.epochs * (TRAIN_IMAGES // s.batch_size) * step_s.get(name, 0.1) + 20 if not a.tiny else 0

        for name in a.methods:  # 1. speed
            run(f"speed {name}", 0 if a.tiny else 15, "speed", name, lambda: speed(name, s, root, work))
            step_s[name] = report.results["speed"].get(name, {}).get("s_per_step") or 0.1
        ordered = [m for m in FIRST if m in a.methods]
        for name in ordered:  # 2. the anchors' methods, 10 epochs
            run(f"train {name}", train_estimate(name), "train", name, lambda: train(name, s, root, work, report))
        for name in [m for m in COMPILED if m in a.methods]:  # 3. --compile
            run(f"compiled {name}", 0 if a.tiny else a.compile_estimate, "compiled", name,
                lambda: speed(name, s, root, work, compile=True))
        full_size = []

        def loader_item(name):
            if not full_size:  # made for the first loader item that runs
                full_size.append(full_size_data(root, work, s, (1 + s.loader_batches) * s.loader_batch))  # one epoch
            return loader(name, s, full_size[0])
        for name in a.methods:  # 4. the loader at 224 px
            run(f"loader {name}", 0 if a.tiny else 15, "loader", name, lambda: loader_item(name))
        for name in [m for m in a.methods if m not in ordered]:  # 5. the others, as time allows
            run(f"train {name}", train_estimate(name), "train", name, lambda: train(name, s, root, work, report))
        info["wall_s"] = time.time() - start
        report.save()
        report.write(f"\nwrote {report.out / 'results.json'}, results.md, logs.txt in {info['wall_s']:.0f} s\n")
        return report.results


if __name__ == "__main__":
    main()
