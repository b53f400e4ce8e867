"""Where the suite's float32 and bf16 tolerances come from: the spread of each compared quantity across
seeds and CPU kernels, measured.

    python -m tests.spread gpu_path                  # this machine's kernels, 8 seeds
    python -m tests.spread --kernels all gpu_path    # the three kernel settings below, one process each

CPUs differ in the kernels torch runs: oneDNN (convolutions; bf16 natively where the CPU has it) picks
AVX-512, AVX2 or SSE4.1 code, and ATen's own vectorised loops AVX-512, AVX2 or none. A tolerance
measured on one machine can fail on another (BYOL's float32 gradient in channels_last, 3.6e-3 from float64
with AVX-512 kernels at tests/test_gpu_path.py's input, failed a bound of 1e-4 measured with AVX2), so each
is measured here under the three settings, the emulated ones through the variables that cap the
instruction sets:

    native    this machine's own kernels
    avx2      ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
    default   ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default

Each measurement prints one row per quantity: its worst value over the seeds (the largest error, the
lowest cosine), and with --kernels all the worst over the three settings beside each setting's.
The tests quote these figures where they set a tolerance.

Measurements:
  gpu_path  tests/test_gpu_path.py: one step of each method, float32 in either layout and bf16 autocast in
            channels_last, each against the same step in float64; and the layout alone in float64
  torchrun  tests/test_cli.py: the first logged loss of a real run on one process
            and under torchrun with 2 ranks (float32), `--seed` varied
  probe     tests/test_evaluation.py: the standard linear protocol's classifier on one process and on 2
            gloo ranks (float32)
  compile   tests/test_gpu_path.py: the losses of a real run on the GPU path (2 steps), eager and with --compile
            (aot_eager), `--seed` varied
"""
import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

KERNELS = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "default": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"},
}
METHODS = ["mocov1", "mocov2", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]


def rel(a, b):
    """‖a − b‖ / ‖b‖, in float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


# --- the measurements: each yields (quantity, value, worse) with worse "max" or "min" -----------------

def gpu_path(seeds, methods=METHODS):
    from test_gpu_path import SMALL, inputs, step
    from common.device import GpuPath
    for method in methods:
        module = importlib.import_module(method)
        args = SMALL[method](module)
        worst = {}

        def keep(key, value, worse=max):
            worst[key] = worse(worst.get(key, value), value)
        for seed in seeds:
            x1, x2 = inputs(seed)
            ref_loss, ref_grads, _, _ = step(module, args, x1, x2, GpuPath("cpu", on=False), torch.float64)
            loss, grads, _, _ = step(module, args, x1, x2, GpuPath("cpu", amp=False, on=True), torch.float64)
            keep("float64 layout: loss", abs(loss - ref_loss).item() / abs(ref_loss).item())
            keep("float64 layout: gradient", rel(grads, ref_grads))
            for name, on in (("default", False), ("channels_last", True)):
                loss, grads, _, _ = step(module, args, x1, x2, GpuPath("cpu", amp=False, on=on))
                keep(f"float32 {name}: loss", abs(loss.double() - ref_loss).item() / (abs(ref_loss).item() + 0.01))
                keep(f"float32 {name}: gradient", rel(grads, ref_grads))
            loss, grads, _, _ = step(module, args, x1, x2, GpuPath("cpu", amp=True, on=True))
            keep("bf16: loss", abs(loss.double() - ref_loss).item() / (abs(ref_loss).item() + 0.01))
            keep("bf16: gradient cosine", torch.nn.functional.cosine_similarity(
                grads.double(), ref_grads, dim=0).item(), min)
        for key, value in worst.items():
            yield f"{method} {key}", value, "min" if "cosine" in key else "max"


def _real_runs(jobs, nproc, environ=None):
    """Run tests/several.py on `jobs` (one process, or torchrun with nproc ranks)."""
    from conftest import env, free_port
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[str(a) for a in job] for job in jobs], f)
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port", str(free_port())] \
        if nproc > 1 else []
    p = subprocess.run([sys.executable, *launcher, str(ROOT / "tests" / "several.py"), f.name], cwd=ROOT,
                       env={**env(), **(environ or {})}, capture_output=True, text=True)
    os.unlink(f.name)
    if p.returncode:
        raise SystemExit(f"{jobs[0]} ... failed:\n{p.stdout}\n{p.stderr}")


def torchrun(seeds, methods=METHODS):
    from conftest import metrics, write_image_folder
    from conftest import two_process_argv
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_folder(Path(tmp) / "folder")
        # (MoCo: per-rank BN by design, no such test)
        methods = [m for m in methods if m in ("simclr", "byol", "barlow", "vicreg", "unigrad")]
        jobs = {(m, s): [f"{m}.py", *two_process_argv(m, folder), "--seed", s, "--max-steps", "1", "--knn-every", "-1"]
                for m in methods for s in seeds}
        for nproc in (1, 2):
            _real_runs([[*argv, "--out", Path(tmp) / f"{m}-{s}-{nproc}"] for (m, s), argv in jobs.items()], nproc)
        for m in methods:
            def first_loss(d):  # the first step's row (a step-0 row holds the effective ranks at initialisation)
                return next(r["loss"] for r in metrics(d) if "loss" in r)
            worst = max(abs(first_loss(Path(tmp) / f"{m}-{s}-2") - first_loss(Path(tmp) / f"{m}-{s}-1"))
                        / abs(first_loss(Path(tmp) / f"{m}-{s}-1")) for s in seeds)
            yield f"{m} first loss, 2 ranks against 1: relative difference", worst, "max"


def _probe_two_ranks(rank, world, root, backbone, out, seed):
    from test_evaluation import STANDARD, probe_main
    torch.set_num_threads(1)
    probe_main(root, backbone, out, *STANDARD, "--seed", seed)
    return torch.load(Path(out) / "linear-standard.pt", weights_only=True)["fc"] if rank == 0 else None


def probe(seeds, methods=None):
    from conftest import Gloo
    from test_evaluation import STANDARD, probe_main, write_separable
    from common import resnet
    with tempfile.TemporaryDirectory() as tmp:
        root = write_separable(Path(tmp) / "separable")
        (root / "run").mkdir()
        torch.manual_seed(0)
        torch.save(resnet.resnet("resnet18", cifar_stem=True).state_dict(), root / "run" / "backbone.pt")
        (root / "run" / "config.json").write_text(json.dumps({"method": "simsiam", "image_size": 8}))
        group, worst = Gloo(2), {}
        try:
            for seed in seeds:
                probe_main(root, root / "run" / "backbone.pt", Path(tmp) / f"one{seed}", *STANDARD, "--seed", seed)
                one = torch.load(Path(tmp) / f"one{seed}" / "linear-standard.pt", weights_only=True)["fc"]
                two = group.run(_probe_two_ranks, str(root), str(root / "run" / "backbone.pt"),
                                str(Path(tmp) / f"two{seed}"), seed)[0]
                for name in one:
                    worst[name] = max(worst.get(name, 0.0), ((two[name] - one[name]).abs().max()
                                                             / one[name].abs().max()).item())
        finally:
            group.close()
    for name, value in worst.items():
        yield f"classifier {name}, 2 ranks against 1: largest difference / largest entry", value, "max"


def compile(seeds, methods=None):
    from conftest import metrics, write_image_folder
    from test_gpu_path import CLI_FLAGS
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_folder(Path(tmp) / "folder")
        for name, extra in (("eager", []), ("compiled", ["--compile", "--compile-backend", "aot_eager"])):
            _real_runs([[*CLI_FLAGS(folder), "--seed", s, *extra, "--out", Path(tmp) / f"{name}{s}"] for s in seeds], 1,
                       {"SSL_GPU_PATH_ON_CPU": "1"})
        worst = [0.0, 0.0]
        for s in seeds:
            eager, compiled = [[r["loss"] for r in metrics(Path(tmp) / f"{n}{s}") if "loss" in r]
                               for n in ("eager", "compiled")]
            worst = [max(w, abs(c - e)) for w, e, c in zip(worst, eager, compiled)]
    for step, value in enumerate(worst, 1):  # (SimSiam's loss lies in [-1, 1])
        yield f"simsiam loss at step {step}, compiled against eager: |difference|", value, "max"


MEASUREMENTS = {"gpu_path": gpu_path, "torchrun": torchrun, "probe": probe, "compile": compile}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("measurements", nargs="+", choices=sorted(MEASUREMENTS))
    p.add_argument("--seeds", type=int, default=8, help="seeds 1..N (default 8)")
    p.add_argument("--kernels", choices=["this", "all"], default="this")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="gpu_path and torchrun: these only")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one JSON row per line (--kernels all)
    a = p.parse_args()
    seeds = list(range(1, a.seeds + 1))
    if a.kernels == "this":
        torch.set_num_threads(1)
        for name in a.measurements:
            for key, value, worse in MEASUREMENTS[name](seeds, a.methods):
                print("SPREAD " + json.dumps([key, value, worse]) if a.json else f"{key}: {value:.3g}", flush=True)
        return
    table = {}
    for kernel, variables in KERNELS.items():
        out = subprocess.run([sys.executable, "-m", "tests.spread", *a.measurements, "--seeds", str(a.seeds), "--json",
                              "--methods", *a.methods],
                             cwd=ROOT, env={**os.environ, **variables, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(f"{kernel}: {out.stderr}")
        for line in out.stdout.splitlines():
            if not line.startswith("SPREAD "):  # (what the runs print)
                continue
            key, value, worse = json.loads(line.removeprefix("SPREAD "))
            table.setdefault(key, {"worse": worse})[kernel] = value
    print(f"worst over seeds 1..{a.seeds}: " + ", ".join(f"{k}: {' '.join(f'{n}={v}' for n, v in e.items()) or 'this machine'}"
                                                         for k, e in KERNELS.items()))
    print(f"{'quantity':75s} {'native':>9s} {'avx2':>9s} {'default':>9s} {'worst':>9s}")
    for key, row in table.items():
        values = [row[k] for k in KERNELS]
        worst = max(values) if row["worse"] == "max" else min(values)
        print(f"{key:75s} " + " ".join(f"{v:9.3g}" for v in values) + f" {worst:9.3g}")


if __name__ == "__main__":
    main()
