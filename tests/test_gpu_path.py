"""The GPU path on the CPU: every method's training step with model and inputs in channels_last, in float32
and under bf16 autocast (common.device.GpuPath, CPU autocast in place of CUDA's), each against the same step
in float64 in the default layout. (Two float32 results are not compared with each other: how far each is
from the exact step depends on the input and the CPU's kernels. With this CPU's AVX-512 kernels, BYOL's
float32 gradient at this test's input is 8e-6 from float64 in the default layout and 3.6e-3 in
channels_last, which failed a bound of 1e-4 between the two measured on an AVX2 machine; over 8 inputs the
default layout's worst is 5.2e-3.)

The bounds come from the spread measured by `python -m tests.spread --kernels all gpu_path`: this test's
configuration, input seeds 1-8, with this CPU's AVX-512 kernels, with AVX2 and with no vector extensions;
worst case over all of them and every method:
- channels_last alone, in float64: loss within 2.6e-14 and gradient within 8.4e-14 (relative norm) of the
  default layout; allowed 1e-10. A layout-dependent error shows here, exactly.
- float32 in either layout: loss within 5.3e-6 of float64 (relative to |loss| + 0.01, for losses near 0),
  gradient within 5.4e-3 (MoCo v1, MoCo v2 and BYOL, whose BatchNorm over 16 samples of 8-px images amplifies
  rounding at some inputs; 2e-6 to 1.5e-5 for the others); allowed 2e-5 and 2e-2.
- bf16 autocast in channels_last: loss within 0.060 of float64 (relative to |loss| + 0.01; SimSiam and MoCo v2,
  0.001-0.026 for the others), the cosine between the gradients (all parameters, flattened) at least 0.741
  (BYOL with AVX2; 0.87-0.99 for the others); allowed 0.2 and 0.5 (twice the worst 1 − cosine). These catch
  non-finite values, a wrong gradient and a loss left off the GPU path; the dtype checks catch a loss left
  in bf16, and the float64 check above a wrong layout.
- compiled (aot_eager) against eager, the losses of the command-line test below (SimSiam's, in [-1, 1]): equal
  at step 1 (the same forward) and within 1.95e-3 at step 2 (`--kernels all compile`, seeds 1-6); allowed
  1e-6 and 5e-3. (The bound before, 2% of the loss + 1e-3, failed at seed 1 without vector extensions.)"""
import importlib
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common.device import GpuPath
from conftest import ROOT, env, metrics

LAYOUT, FLOAT32_LOSS, FLOAT32_GRAD, BF16_LOSS, BF16_COSINE = 1e-10, 2e-5, 2e-2, 0.2, 0.5  # the module docstring
COMPILED = (1e-6, 5e-3)  # compiled against eager, the losses of steps 1 and 2 (the module docstring)

METHODS = ["mocov1", "mocov2", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]
SMALL = {  # tiny heads; MoCo with 2 BN splits so that each holds 8 samples (16 with bn_splits 8 hold 2)
    "mocov1": lambda m: m.Args(image_size=8, dim=16, K=32, bn_splits=2),
    "mocov2": lambda m: m.Args(image_size=8, dim=16, K=32, bn_splits=2),
    "simclr": lambda m: m.Args(image_size=8, dim=16),
    "byol": lambda m: m.Args(image_size=8, hidden_dim=16, dim=8),
    "simsiam": lambda m: m.Args(image_size=8, dim=32, pred_dim=8),
    "barlow": lambda m: m.Args(image_size=8, dim=16),
    "vicreg": lambda m: m.Args(image_size=8, dim=16),
    "unigrad": lambda m: m.Args(image_size=8, dim=8),
}


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)


def step(module, args, x1, x2, gpu, dtype=torch.float32):
    """One forward and backward of the method's model as Run does it: gpu.model, gpu.inputs, gpu.autocast,
    with the model and the inputs in `dtype`. Returns the loss, the flattened gradients, and the dtype and
    layout the first convolution saw."""
    torch.manual_seed(0)  # the same initial weights, and the same random draws in forward (MoCo's shuffle)
    model = gpu.model(module.build_model(args).to(dtype))
    x1, x2 = x1.to(dtype), x2.to(dtype)
    seen = []

    def record(conv, inputs, output):
        channels_last = [t.is_contiguous(memory_format=torch.channels_last) for t in (inputs[0], conv.weight)]
        seen.append((output.dtype, *channels_last))
    hook = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(record)
    with gpu.autocast():
        loss, stats = model(gpu.inputs(x1), gpu.inputs(x2))
    loss.backward()
    hook.remove()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads, seen[0], stats


@pytest.mark.parametrize("method", METHODS)
def test_a_step_on_the_gpu_path_agrees_with_float32(method):
    """float32 and bf16 on the GPU path, each against the same step in float64 (see the module docstring)."""
    module = importlib.import_module(method)
    args = SMALL[method](module)
    x1, x2 = inputs(1)
    loss, grads, (dtype, x_cl, w_cl), _ = step(module, args, x1, x2, GpuPath("cpu", on=False), torch.float64)
    assert (dtype, x_cl, w_cl) == (torch.float64, False, False)

    # channels_last alone, in float64: the same numbers as the default layout, to rounding
    cl_loss, cl_grads, (dtype, x_cl, w_cl), _ = step(module, args, x1, x2, GpuPath("cpu", amp=False, on=True),
                                                     torch.float64)
    assert (dtype, x_cl, w_cl) == (torch.float64, True, True)
    assert abs(cl_loss - loss) <= LAYOUT * abs(loss) and (cl_grads - grads).norm() <= LAYOUT * grads.norm()

    # float32 in either layout: what a GPU runs with --no-amp
    for on in (False, True):
        f_loss, f_grads, (dtype, x_cl, w_cl), _ = step(module, args, x1, x2, GpuPath("cpu", amp=False, on=on))
        assert (dtype, x_cl, w_cl) == (torch.float32, on, on)
        assert abs(f_loss.double() - loss) <= FLOAT32_LOSS * (abs(loss) + 0.01), (on, f_loss, loss)
        assert (f_grads.double() - grads).norm() <= FLOAT32_GRAD * grads.norm(), on

    # channels_last under bf16 autocast: what a GPU runs with --amp (the default)
    bf_loss, bf_grads, (dtype, x_cl, w_cl), stats = step(module, args, x1, x2, GpuPath("cpu", amp=True, on=True))
    assert (dtype, x_cl, w_cl) == (torch.bfloat16, True, True)  # the path is really on
    assert bf_loss.dtype == torch.float32 and torch.isfinite(bf_loss)  # the losses upcast to float32
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())
    assert abs(bf_loss.double() - loss) <= BF16_LOSS * (abs(loss) + 0.01), (bf_loss, loss)
    assert torch.isfinite(bf_grads).all() and F.cosine_similarity(bf_grads.double(), grads, dim=0) >= BF16_COSINE


def CLI_FLAGS(folder):
    """The command line of the test below (tests/spread.py measures its spread)."""
    return ["simsiam.py", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", "--max-steps", "2",
            "--image-size", "8", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--device", "cpu",
            "--dim", "32", "--pred-dim", "8"]


def test_the_command_line_on_the_gpu_path_with_and_without_compile(image_folder, tmp_path):
    """Run's own lines on the GPU path (SSL_GPU_PATH_ON_CPU=1): model and inputs moved by GpuPath, bf16
    autocast in the step and in the kNN monitor, config.json's record; and --compile through the real
    command line (backend aot_eager on the CPU: Dynamo and AOTAutograd trace the step as on a GPU, without
    inductor's C++ code generation, which takes minutes on two cores), its losses those of the eager run. Both
    command lines run in one process, one after the other (tests/several.py: one start-up of torch)."""
    runs = {"eager": [], "compiled": ["--compile", "--compile-backend", "aot_eager"]}
    jobs = [[*CLI_FLAGS(image_folder), "--out", str(tmp_path / name), *extra] for name, extra in runs.items()]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "several.py"), str(tmp_path / "jobs.json")], cwd=ROOT,
                       env=dict(env(), SSL_GPU_PATH_ON_CPU="1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "== job 1 ok" in p.stdout, p.stdout + p.stderr
    losses = {}
    for name in runs:
        out = tmp_path / name
        hardware = json.loads((out / "config.json").read_text())["gpu_path"]
        assert hardware | {"torch": None} == {"device": "cpu", "name": "cpu", "gpu_path": True, "channels_last": True,
                                              "autocast": "bfloat16", "torch": None}
        rows = metrics(out)
        losses[name] = [r["loss"] for r in rows if "loss" in r]
        assert len(losses[name]) == 2 and all(math.isfinite(v) for v in losses[name])
        assert 0.0 <= rows[-1]["knn_top1"] <= 1.0  # the monitor ran, under the path's autocast
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["model"]["backbone.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    for step, (eager, compiled) in enumerate(zip(losses["eager"], losses["compiled"])):
        assert abs(eager - compiled) <= COMPILED[step], losses
