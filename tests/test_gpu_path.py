"""The GPU path on the CPU: every method's training step with model and inputs in channels_last under bf16
autocast (common.device.GpuPath, CPU autocast in place of CUDA's), against the default layout in float32.

The tolerances were measured (tests/test_gpu_path.py's configuration, 4 input seeds per method, CPU):
- channels_last alone, float32: the loss within 2.2e-6 and the gradient within 1.6e-5 (relative norm) of
  the default layout: a layout-dependent error shows here, exactly.
- channels_last and bf16 autocast: the loss within 2% (MoCo; 0.3% SimCLR), or 0.006 absolute where it
  starts near 0 (SimSiam); the cosine between the gradients (all parameters, flattened) at least 0.82
  (BYOL, the lowest; 0.89-0.99 for the others). BatchNorm over 16 samples of 8-px images amplifies the
  rounding of bf16, so these are loose; they catch a loss left in bf16, non-finite values and a wrong
  gradient, and the float32 check above catches a wrong layout."""
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


def step(module, args, x1, x2, gpu):
    """One forward and backward of the method's model as Run does it: gpu.model, gpu.inputs, gpu.autocast.
    Returns the loss, the flattened gradients, and the dtype and layout the first convolution saw."""
    torch.manual_seed(0)  # the same initial weights, and the same random draws in forward (MoCo's shuffle)
    model = gpu.model(module.build_model(args))
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
    module = importlib.import_module(method)
    args = SMALL[method](module)
    torch.manual_seed(1)
    x1, x2 = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    loss, grads, (dtype, x_cl, w_cl), _ = step(module, args, x1, x2, GpuPath("cpu", on=False))
    assert (dtype, x_cl, w_cl) == (torch.float32, False, False)

    # channels_last in float32: the same numbers as the default layout
    cl_loss, cl_grads, (dtype, x_cl, w_cl), _ = step(module, args, x1, x2, GpuPath("cpu", amp=False, on=True))
    assert (dtype, x_cl, w_cl) == (torch.float32, True, True)
    assert abs(cl_loss - loss) <= 1e-5 * abs(loss) + 1e-6
    assert (cl_grads - grads).norm() <= 1e-4 * grads.norm()

    # channels_last under bf16 autocast: what a GPU runs with --amp (the default)
    bf_loss, bf_grads, (dtype, x_cl, w_cl), stats = step(module, args, x1, x2, GpuPath("cpu", amp=True, on=True))
    assert (dtype, x_cl, w_cl) == (torch.bfloat16, True, True)  # the path is really on
    assert bf_loss.dtype == torch.float32 and torch.isfinite(bf_loss)  # the losses upcast to float32
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())
    assert abs(bf_loss - loss) <= 0.05 * abs(loss) + 0.01, (bf_loss, loss)
    assert torch.isfinite(bf_grads).all() and F.cosine_similarity(bf_grads, grads, dim=0) >= 0.75


def test_the_command_line_on_the_gpu_path_with_and_without_compile(image_folder, tmp_path):
    """Run's own lines on the GPU path (SSL_GPU_PATH_ON_CPU=1): model and inputs moved by GpuPath, bf16
    autocast in the step and in the kNN monitor, config.json's record; and --compile through the real
    command line (backend aot_eager on the CPU: Dynamo and AOTAutograd trace the step as on a GPU, without
    inductor's C++ code generation, which takes minutes on two cores), its losses those of the eager run."""
    flags = ["simsiam.py", "--dataset", "folder", "--data-dir", image_folder, "--epochs", "1", "--max-steps", "2",
             "--image-size", "8", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--device", "cpu",
             "--dim", "32", "--pred-dim", "8"]
    environ = dict(env(), SSL_GPU_PATH_ON_CPU="1")
    runs = {name: subprocess.Popen([sys.executable, *map(str, flags), "--out", str(tmp_path / name), *extra],
                                   cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, extra in [("eager", []), ("compiled", ["--compile", "--compile-backend", "aot_eager"])]}
    for name, p in runs.items():
        log = p.communicate(timeout=400)[0]
        assert p.returncode == 0, f"{name}:\n{log}"
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
    for eager, compiled in zip(losses["eager"], losses["compiled"]):
        assert abs(eager - compiled) <= 0.02 * abs(eager) + 1e-3, losses
