"""UniGrad: Exploring the Equivalence of Siamese Self-Supervised Learning via a Unified Gradient Framework.
Chenxin Tao, Honghui Wang, Xizhou Zhu, Jiahua Dong, Shiji Song, Gao Huang, Jifeng Dai. CVPR 2022. arXiv:2112.05141.

Contrastive, asymmetric (BYOL, SimSiam) and feature-decorrelation (Barlow Twins, VICReg) methods all
update the normalised online embedding u₁ with a gradient of one form: a positive term pulling u₁ to
the other view's target, plus λ times a negative term pushing it away from the other samples. UniGrad
writes that gradient directly: −u₂ᵐ + λ·F u₁, with F a moving average of the correlation matrix of the
momentum branch's embeddings, and trains with it through a surrogate loss whose gradient it is.

    uv run unigrad.py                                     # CIFAR-10 (no official CIFAR recipe: see Args)
    uv run unigrad.py --dataset imagenet --data-dir DIR   # the paper's ImageNet recipe
    torchrun --nproc-per-node 8 unigrad.py                # 8 GPUs: --batch-size stays global
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 unigrad.py

Docs: docs/unigrad.md (each section below beside the paper's equations).
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum
from torchvision.transforms import v2

from common import cli, data, dist, optim, resnet
from common.train import Run, fp32


@dataclass
class Args(cli.System):
    epochs: int = 800  # CIFAR-10: 800 epochs, as SimSiam App. D (paper: 100 on ImageNet)
    batch_size: int = 512  # N, global over all ranks; CIFAR-10: as the other methods here (paper 1024)
    lr: float = 0.05  # base lr, scaled lr × N/256; official configs/unigrad.py
    wd: float = 5e-4  # weight decay on all parameters; CIFAR-10: as SimSiam App. D (paper 1e-4)
    momentum: float = 0.9  # SGD momentum; official configs/unigrad.py
    warmup_epochs: int = 5  # linear warmup, then cosine per step to 1e-3 × peak; official pretrainer.py
    lambd: float = 100.0  # λ, the weight of the negative gradient; official configs/unigrad.py
    rho: float = 0.99  # ρ, the moving-average rate of F; official configs/unigrad.py
    m_base: float = 0.996  # momentum of the momentum encoder at step 0, cosine to 1; official configs
    dim: int = 2048  # width of the three projector layers; official configs/unigrad.py
    blur: bool = False  # CIFAR-10: no Gaussian blur at 32 px; as SimSiam App. D


PRESETS = {  # the paper's ImageNet recipe: ResNet-50, 100 epochs, N 1024, SGD lr 0.05 × N/256, wd 1e-4
    "imagenet": dict(arch="resnet50", epochs=100, batch_size=1024, wd=1e-4, blur=True),
}


def augment(args):
    """One view, both views alike: MoCo v2's augmentation, as the official code."""
    blur = [v2.RandomApply([data.PILGaussianBlur(sigma=(0.1, 2.0))], p=0.5)] if args.blur else []  # PIL's, as loader.py
    return v2.Compose([
        v2.RandomResizedCrop(args.image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # brightness, contrast, saturation, hue
        v2.RandomGrayscale(p=0.2),
        *blur,
        v2.RandomHorizontalFlip(),
        data.normalize(args.dataset),
    ])


def projector(in_dim, dim):
    """Three Linear layers of width dim: bias-free with BN + ReLU on the first two, the last with bias."""
    return nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim))


class UniGrad(nn.Module):
    def __init__(self, args):
        super().__init__()
        # online branch: torchvision ResNet, zero-init residual as the official code, and the projector
        self.backbone = resnet.resnet(args.arch, resnet.uses_cifar_stem(args.image_size), zero_init_residual=True)
        self.projector = projector(self.backbone.dim, args.dim)
        # momentum branch: a copy at the start, never given gradients; no predictor on either branch
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        # F, the moving average of the momentum embeddings' correlation matrix: state, saved and resumed
        self.register_buffer("F", torch.zeros(args.dim, args.dim, dtype=torch.float32))  # (dim, dim)
        self.register_buffer("F_ready", torch.zeros((), dtype=torch.bool))  # False until the first update
        self.register_buffer("m", torch.tensor(args.m_base))  # this step's momentum, set by the loop
        self.lambd, self.rho = args.lambd, args.rho

    def forward(self, x1, x2):
        z1 = F.normalize(self.projector(self.backbone(x1)), dim=1)  # (n, dim): u₁, the online embedding
        z2 = F.normalize(self.projector(self.backbone(x2)), dim=1)  # (n, dim): u₂
        with torch.no_grad():
            momentum_update(self.backbone, self.momentum_backbone, self.m)  # before its forward (official)
            momentum_update(self.projector, self.momentum_projector, self.m)
            z1m = F.normalize(self.momentum_projector(self.momentum_backbone(x1)), dim=1)  # (n, dim): u₁ᵐ
            z2m = F.normalize(self.momentum_projector(self.momentum_backbone(x2)), dim=1)  # (n, dim): u₂ᵐ
            update_F(self.F, self.F_ready, z1m, z2m, self.rho)  # with this step's batch, then the loss
        loss = unigrad_loss(z1, z2, z1m, z2m, self.F, self.lambd)
        pos_sim = ((z1 * z2m).sum(1).mean() + (z2 * z1m).sum(1).mean()).detach() / 2  # cos(u₁, u₂ᵐ)
        return loss, {"pos_sim": pos_sim}


def unigrad_loss(z1, z2, z1m, z2m, F, lambd):
    """A surrogate whose gradient is UniGrad's (the official README's table): ∂L/∂u₁ = ½(−u₂ᵐ + λ·F u₁)/n per
    sample, n the rows here (DDP's average over ranks makes it 1/N), and the same for view 2. z1, z2 online
    and z1m, z2m momentum embeddings, L2-normalised, (n, d); F (d, d), already updated with this batch.
    It is the gradient of −cos(u₁, u₂ᵐ) + (λ/2)·u₁ᵀF u₁ with F held fixed; the value is not that
    objective: only the gradient is meaningful."""
    with torch.autocast(z1.device.type, enabled=False):  # float32 even under bf16 autocast
        z1, z2, z1m, z2m = fp32(z1), fp32(z2), fp32(z1m), fp32(z2m)
        g1 = -z2m + lambd * z1 @ F  # (n, d): positive term −u₂ᵐ, negative term λ·F u₁ (F is symmetric)
        g2 = -z1m + lambd * z2 @ F  # (n, d)
        loss1 = (g1.detach() * z1).sum(dim=1).mean()  # ⟨sg(g₁), u₁⟩: its gradient in u₁ is g₁ / n
        loss2 = (g2.detach() * z2).sum(dim=1).mean()
        return (loss1 + loss2) / 2


@torch.no_grad()
def update_F(F, F_ready, z1m, z2m, rho):
    """F ← ρ·F + (1 − ρ)·F_batch, F_batch = (u₁ᵐᵀu₁ᵐ + u₂ᵐᵀu₂ᵐ)/(2N) over the global batch; F ← F_batch
    at the first step. In place, in float32."""
    with torch.autocast(z1m.device.type, enabled=False):
        z1m, z2m = fp32(z1m), fp32(z2m)
        F_batch = einsum(z1m, z1m, "n i, n j -> i j") + einsum(z2m, z2m, "n i, n j -> i j")  # (d, d)
        F_batch = F_batch / (2 * len(z1m))  # this rank's batch
        F_batch = dist.all_reduce_mean(F_batch)  # the global batch (every rank holds N / world samples)
        F.copy_(torch.where(F_ready, rho * F + (1 - rho) * F_batch, F_batch))
        F_ready.fill_(True)


@torch.no_grad()
def momentum_update(online, momentum, m):
    """θ_m ← m·θ_m + (1 − m)·θ (parameters; BN statistics are the momentum branch's own)."""
    for theta, theta_m in zip(online.parameters(), momentum.parameters()):
        theta_m.mul_(m).add_((1 - m) * theta.detach())


def momentum_schedule(k, K, m_base):
    """m = 1 − (1 − m_base)·(cos(πk/K) + 1)/2 at step k of K: m_base at the start, 1 at the end."""
    return 1 - (1 - m_base) * (math.cos(math.pi * k / K) + 1) / 2


def build_model(args):
    return UniGrad(args)


def main(args):
    run = Run(args)  # torchrun set-up, seeds, run directory
    views = data.Views(data.dataset(args.dataset, args.data_dir, "pretrain", args.image_size),
                       augment(args), augment(args))  # the same augmentation for both views
    loader = data.train_loader(views, args.batch_size, args.workers, args.seed, run.device)
    model = run.prepare(build_model(args))  # SyncBN over all ranks, as the official code
    net = dist.unwrap(model)

    init_lr = args.lr * args.batch_size / 256  # linear scaling rule
    online = [*net.backbone.parameters(), *net.projector.parameters()]
    optimizer = torch.optim.SGD(online, lr=init_lr, momentum=args.momentum, weight_decay=args.wd)
    run.watch(model, optimizer, backbone=net.backbone)  # F and the momentum branch are part of the model
    total, warmup = args.epochs * len(loader), args.warmup_epochs * len(loader)

    for x1, x2 in run.batches(loader):
        # differs from official code: the warmup starts at 0 (not 1e-3 × peak) and the cosine spans the
        # steps after it (the official one divides by all steps, so it ends near 0.7% of the peak)
        lr = optim.warmup_cosine(run.step, total, warmup, init_lr, final=1e-3 * init_lr)
        optim.set_lr(optimizer, lr)
        net.m.fill_(momentum_schedule(run.step, total, args.m_base))  # per step, from the step count
        with run.autocast():
            loss, stats = model(x1, x2)  # momentum update, F update, the surrogate loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(loss, lr=lr, m=net.m, **stats)


if __name__ == "__main__":
    main(cli.parse(Args, PRESETS))
