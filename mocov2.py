"""MoCo v2: Improved Baselines with Momentum Contrastive Learning.
Xinlei Chen, Haoqi Fan, Ross Girshick, Kaiming He. 2020. arXiv:2003.04297.

MoCo v1 (arXiv:1911.05722) with four changes, and nothing else: two of SimCLR's design improvements, an MLP
projection head and stronger augmentation with blur ("aug+"); and two of its own, temperature 0.2
and a cosine learning-rate schedule.
`diff mocov1.py mocov2.py` shows exactly these.

    uv run mocov2.py                                     # CIFAR-10: the demo's K, m, τ, lr, wd
    uv run mocov2.py --dataset imagenet --data-dir DIR   # the paper's ImageNet recipe
    torchrun --nproc-per-node 8 mocov2.py                # 8 GPUs: --batch-size stays global
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 mocov2.py

Docs: docs/mocov2.md (each section below beside the paper's equations).
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce
from torchvision.transforms import v2

from common import cli, data, dist, optim, resnet
from common.train import Run, fp32


@dataclass
class Args(cli.System):
    epochs: int = 200  # CIFAR-10: 200 epochs; official CIFAR demo
    batch_size: int = 512  # N, global over all ranks; CIFAR-10: official CIFAR demo
    lr: float = 0.03  # base lr, scaled lr × N/256 (0.06 at 512: the CIFAR demo); paper §4
    wd: float = 5e-4  # weight decay on all parameters; CIFAR-10: official CIFAR demo (ImageNet 1e-4)
    momentum: float = 0.9  # SGD momentum; paper §4
    dim: int = 128  # feature dim of q and k; paper §3.3
    K: int = 4096  # queue size; CIFAR-10: official CIFAR demo (ImageNet 65536)
    m: float = 0.99  # momentum of the key encoder, Eq. 2; CIFAR-10: official CIFAR demo (ImageNet 0.999)
    tau: float = 0.1  # τ in Eq. 1; CIFAR-10: official CIFAR demo (ImageNet 0.07)
    blur: bool = False  # CIFAR-10: no Gaussian blur at 32 px (aug+ has it at 224); as SimSiam App. D
    bn_splits: int = 8  # one process: BN over this many sub-batches (SplitBN); official CIFAR demo


PRESETS = {  # the paper's ImageNet recipe, MoCo v2 §3: ResNet-50, 200 epochs, batch 256, τ 0.2, lr 0.03 (v1's)
    "imagenet": dict(arch="resnet50", epochs=200, batch_size=256, wd=1e-4, K=65536, m=0.999, tau=0.2, blur=True),
}


def augment(args):
    """One view (query and key alike): "aug+", MoCo v2 §3, SimCLR's augmentation with weaker jitter."""
    blur = [v2.RandomApply([data.PILGaussianBlur(sigma=(0.1, 2.0))], p=0.5)] if args.blur else []  # PIL's, as loader.py
    return v2.Compose([
        # differs from official code: the CIFAR demo crops at scale (0.08, 1); main_moco.py's (0.2, 1) is kept at every
        # size, so the recipe stays the ImageNet one; expected effect: milder crops than the demo's, not measured here
        v2.RandomResizedCrop(args.image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        *blur,
        v2.RandomHorizontalFlip(),
        # differs from official code: on CIFAR-10 the demo normalises with std (0.2023, 0.1994, 0.2010), not the
        # dataset's (0.2470, 0.2435, 0.2616) used here and in the evaluation; inputs ≈ 0.8× the demo's, which the BN
        # after the first convolution absorbs; expected effect: none
        data.normalize(args.dataset),
    ])


class SplitBatchNorm(nn.BatchNorm2d):
    """BN over `splits` interleaved sub-batches, standing in for S GPUs on one (official CIFAR demo)."""

    def __init__(self, num_features, splits):
        super().__init__(num_features)
        self.splits = splits

    def forward(self, x):
        if not self.training or self.splits == 1:
            return super().forward(x)
        S = self.splits
        mean, var = self.running_mean.repeat(S), self.running_var.repeat(S)  # one copy per sub-batch
        # sample i lands in sub-batch i % S: the S sub-batches side by side as S·C channels of one BN
        # (rearrange copies where a view cannot, as for a channels_last input)
        y = F.batch_norm(rearrange(x, "(n s) c h w -> n (s c) h w", s=S), mean, var,
                         self.weight.repeat(S), self.bias.repeat(S), True, self.momentum, self.eps)
        self.running_mean.copy_(reduce(mean, "(s c) -> c", "mean", s=S))  # the sub-batches' statistics, averaged
        self.running_var.copy_(reduce(var, "(s c) -> c", "mean", s=S))
        y = rearrange(y, "n (s c) h w -> (n s) c h w", s=S)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y  # in the input's layout


def encoder(args, splits):
    """f: torchvision ResNet with an MLP head, fc → ReLU → fc, no BN; MoCo v2 §3."""
    norm = (lambda c: SplitBatchNorm(c, splits)) if splits > 1 else nn.BatchNorm2d
    net = resnet.resnet(args.arch, resnet.uses_cifar_stem(args.image_size), norm_layer=norm)
    return nn.Sequential(net, nn.Linear(net.dim, net.dim), nn.ReLU(inplace=True), nn.Linear(net.dim, args.dim))


class MoCo(nn.Module):
    def __init__(self, args):
        super().__init__()
        splits = args.bn_splits if dist.world() == 1 else 1  # several ranks: each its own BN (ShuffleBN)
        self.encoder_q = encoder(args, splits)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)  # θ_k ← θ_q at the start
        self.register_buffer("queue", F.normalize(torch.randn(args.dim, args.K), dim=0))  # (dim, K)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.backbone = self.encoder_q[0]
        self.m, self.tau = args.m, args.tau

    def forward(self, x_q, x_k):  # Alg. 1
        q = F.normalize(self.encoder_q(x_q), dim=1)  # (n, dim)
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.m)  # Eq. 2, before the keys (official code)
            x_k, unshuffle = shuffle(x_k)  # ShuffleBN, §3.3: BN must not leak which key is positive
            k = unshuffle(F.normalize(self.encoder_k(x_k), dim=1))  # (n, dim), back in query order
        loss = info_nce(q, k, self.queue.clone(), self.tau)  # Eq. 1 against this step's queue
        dequeue_and_enqueue(self.queue, self.queue_ptr, k)
        return loss, {"pos_sim": (q * k).sum(1).mean().detach()}


def info_nce(q, k, queue, tau):
    """Eq. 1: L_q = −log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_i exp(q·k_i/τ)), k_i the K keys of the queue."""
    with torch.autocast(q.device.type, enabled=False):  # the loss in float32 even under bf16 autocast
        q, k, queue = fp32(q), fp32(k), fp32(queue)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (n, 1): q·k₊
        l_neg = q @ queue  # (n, K): q·k_i
        logits = torch.cat([l_pos, l_neg], dim=1) / tau  # (n, 1+K)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))  # positive at 0


@torch.no_grad()
def momentum_update(encoder_q, encoder_k, m):
    """Eq. 2: θ_k ← m·θ_k + (1 − m)·θ_q (parameters; BN statistics are the key encoder's own)."""
    for p_q, p_k in zip(encoder_q.parameters(), encoder_k.parameters()):
        p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)


@torch.no_grad()
def dequeue_and_enqueue(queue, ptr, k):
    """Enqueue the keys of all ranks (global order), dequeue the oldest: a FIFO of K keys; §3.2."""
    keys = dist.gather(k)  # (N, dim)
    slots = ptr + torch.arange(len(keys), device=ptr.device)  # K is a multiple of N: the block never wraps
    queue.index_copy_(1, slots, keys.T.to(queue.dtype))  # (the pointer stays on the device: no host sync)
    ptr.add_(len(keys)).remainder_(queue.shape[1])


@torch.no_grad()
def shuffle(x):
    """Shuffle the key batch across ranks (in-batch on one process); return it and the inverse map."""
    x_all = dist.gather(x)  # (N, ...)
    perm = dist.broadcast(torch.randperm(len(x_all), device=x.device))  # made on rank 0
    mine = rearrange(perm, "(w n) -> w n", w=dist.world())[dist.rank()]  # this rank's slice of the shuffled batch
    inverse = rearrange(torch.argsort(perm), "(w n) -> w n", w=dist.world())[dist.rank()]

    def unshuffle(k):
        return dist.gather(k)[inverse]  # each key back beside its query
    return x_all[mine], unshuffle


def build_model(args):
    return MoCo(args)


def main(args):
    run = Run(args)  # torchrun set-up, seeds, run directory
    if args.K % args.batch_size:
        dist.fail(f"--K {args.K} is not a multiple of --batch-size {args.batch_size}: the queue takes whole "
                  f"batches (MoCo's official code asserts the same)")
    if dist.world() == 1 and args.batch_size % args.bn_splits:
        dist.fail(f"--batch-size {args.batch_size} is not divisible by --bn-splits {args.bn_splits}")
    views = data.Views(data.dataset(args.dataset, args.data_dir, "pretrain", args.image_size),
                       augment(args), augment(args))  # x_q and x_k: two views, the same augmentation
    loader = data.train_loader(views, args.batch_size, args.workers, args.seed, run.device)
    model = run.prepare(build_model(args), sync_bn=False)  # per-GPU BN: ShuffleBN needs it, §3.3
    net = dist.unwrap(model)

    init_lr = args.lr * args.batch_size / 256  # paper: 0.03 at batch 256, §4
    optimizer = torch.optim.SGD(net.encoder_q.parameters(), lr=init_lr, momentum=args.momentum, weight_decay=args.wd)
    run.watch(model, optimizer, backbone=net.backbone)  # the queue and its pointer are buffers of the model
    # kNN also on the 128-d output of the query encoder, the official CIFAR demo's monitor (its 82.6% / 88.7%)
    run.knn_also("knn_top1_q", net.encoder_q)

    for x_q, x_k in run.batches(loader):
        # differs from official code: the CIFAR demo counts epochs from 1, so its cosine runs one epoch ahead of
        # main_moco.py's (which this follows) and its last epoch trains at lr 0; expected effect: negligible
        lr = optim.cosine(run.epoch, args.epochs, init_lr)  # cosine per epoch; MoCo v2 §3
        optim.set_lr(optimizer, lr)
        with run.autocast():
            loss, stats = model(x_q, x_k)  # momentum update, keys, Eq. 1, enqueue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(loss, lr=lr, **stats)


if __name__ == "__main__":
    main(cli.parse(Args, PRESETS))
