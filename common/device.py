"""Every choice that a GPU run makes and a CPU run does not, made in one place: the GPU path.

    gpu = GpuPath(device, amp=args.amp)
    model = gpu.model(model)          # to the device, 4-D weights in channels_last
    x = gpu.inputs(x)                 # a non-blocking copy to the device, images in channels_last
    with gpu.autocast():              # bf16 autocast (--amp); the losses upcast to float32 themselves
        loss, stats = model(x1, x2)

The path is on for CUDA devices, and on the CPU when the environment sets SSL_GPU_PATH_ON_CPU=1 (or
`on=True` is passed): then the CPU runs the very lines a GPU runs, with CPU autocast (bf16) in place of
CUDA's, which is how the test suite checks them. Two CUDA-only things cannot run on a CPU and follow the
device type alone: pinned loader memory (common.data) and torch's SyncBatchNorm over several GPUs
(common.dist; the CPU uses common.dist.GlobalBatchNorm, which the gloo tests check).
"""
import contextlib
import os

import torch

ON_CPU = "SSL_GPU_PATH_ON_CPU"  # set to 1: the GPU path on the CPU (tests, tests/device_check.py --tiny)


class GpuPath:
    def __init__(self, device, amp=True, on=None):
        self.device = torch.device(device)
        self.on = (self.device.type == "cuda" or os.environ.get(ON_CPU) == "1") if on is None else on
        self.memory_format = torch.channels_last if self.on else torch.preserve_format
        self.dtype = torch.bfloat16 if amp and self.on else None  # the autocast dtype; None: float32
        if self.on:  # TF32 for the matmuls and convolutions that stay float32; cuDNN times its kernels
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    def model(self, module):
        """The module on the device, its 4-D weights (convolutions) in the path's memory format."""
        return module.to(self.device, memory_format=self.memory_format)

    def inputs(self, x):
        """A batch on the device (from pinned memory on CUDA: the copy does not wait), images (N, C, H, W)
        in the path's memory format."""
        layout = self.memory_format if x.dim() == 4 else torch.preserve_format
        return x.to(self.device, non_blocking=self.on, memory_format=layout)

    def autocast(self):
        """bf16 autocast on the path with --amp (the default); nothing otherwise."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self):
        """What a run's config.json records of its device."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "name": name, "gpu_path": self.on,
                "channels_last": self.memory_format == torch.channels_last,
                "autocast": str(self.dtype).removeprefix("torch.") if self.dtype else None,
                "torch": torch.__version__}
