"""torchrun plumbing with a single-process fallback; every helper is a no-op at world size 1."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


def setup(device="auto"):
    """Join the torchrun process group if there is one; return the torch.device of this rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but no CUDA device is visible (use --device cpu)")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend, timeout = "nccl" if device.startswith("cuda") else "gloo", timedelta(minutes=30)
        # torchrun's agent keeps its store across restarts (--max-restarts), and the workers of a restart could
        # read the addresses their killed predecessors left in it (seen with gloo: "Connection refused" on the
        # first restart): the process group's keys are kept apart per attempt
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return torch.device(device)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def gather(x):
    """Concatenate `x` of every rank along dim 0, in rank order, without gradient. (W·n, ...)"""
    if world() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on every rank's x: sum the gradients of all ranks, keep our slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world())[rank()]


def gather_with_grad(x):
    """Like `gather`, but the backward pass returns this rank's slice of the gradients summed over
    ranks, which is the gradient of the sum of all ranks' losses: with DDP's average over ranks this
    equals the single-process gradient of the loss on the global batch."""
    return x if world() == 1 else _GatherWithGrad.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_with_grad(x):
    return x if world() == 1 else _AllReduceSum.apply(x)


@torch.no_grad()
def all_reduce_mean(x):
    """Mean of a tensor over ranks (for logging and shared statistics), without gradient."""
    if world() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world()


def broadcast(x, src=0):
    if world() > 1:
        dist.broadcast(x, src)
    return x


def all_gather_object(obj):
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch of all ranks, on any device (torch's SyncBatchNorm
    runs on GPUs only); the statistics are all-reduced with gradient, so backward is exact."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        if not self.training or world() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = all_reduce_sum_with_grad(torch.tensor([x.numel() / x.size(1)], dtype=x.dtype, device=x.device))
        mean = all_reduce_sum_with_grad(x.sum(dims)) / n  # (C,)
        var = all_reduce_sum_with_grad(((x - mean.view(shape)) ** 2).sum(dims)) / n  # (C,) biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model, device):
    """Replace every BatchNorm by one over the global batch (torch's SyncBatchNorm on CUDA)."""
    if world() == 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            for name_, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(new, name_, tensor)  # the same tensors: an optimiser built before still holds them
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def wrap(model, device):
    """DistributedDataParallel when there is more than one rank (it averages gradients over ranks)."""
    if world() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model):
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def fail(message):
    """End the run with one line on stderr (from rank 0 only) and exit status 1: no traceback."""
    raise SystemExit(f"error: {message}" if is_main() else 1)
