"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction.
Jure Zbontar, Li Jing, Ishan Misra, Yann LeCun, Stéphane Deny. ICML 2021. arXiv:2103.03230.

Two views of a batch go through the same network; the cross-correlation matrix of their
batch-standardised embeddings is pulled towards the identity: the diagonal to 1 (invariance to the
augmentation), the off-diagonal to 0 (no redundancy between the embedding's dimensions). No negative
pairs, no predictor, no stop-gradient, no momentum encoder.

    uv run barlow.py                                     # CIFAR-10, solo-learn's tested recipe
    uv run barlow.py --dataset imagenet --data-dir DIR   # the paper's ImageNet recipe
    torchrun --nproc-per-node 8 barlow.py                # 8 GPUs: --batch-size stays global
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 barlow.py

Docs: docs/barlow.md (each section below beside the paper's equations).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import einsum
from torchvision.transforms import v2

from common import cli, data, dist, optim, resnet
from common.train import Run, fp32


@dataclass
class Args(cli.System):
    epochs: int = 1000  # CIFAR-10: 1000 epochs; solo-learn cifar/barlow.yaml (paper: 1000 on ImageNet)
    batch_size: int = 512  # N, global over all ranks; CIFAR-10: as the other methods here (paper 2048)
    lr: float = 0.3  # base lr of the weights, scaled lr × N/256; CIFAR-10: solo-learn (paper 0.2)
    lr_biases: float = 0.0048  # base lr of biases and BN parameters, × N/256; paper, Implementation details
    wd: float = 1e-4  # weight decay, BN and biases excluded; CIFAR-10: solo-learn (paper 1.5e-6)
    warmup_epochs: int = 10  # linear warmup, then cosine to 1e-3 × peak; paper, Implementation details
    lambd: float = 0.0051  # λ in Eq. 1, the weight of the redundancy term; official code (paper 5e-3)
    dim: int = 2048  # width of the three projector layers; CIFAR-10: solo-learn (paper 8192)
    crop_min: float = 0.08  # smallest crop area; paper, Implementation details (BYOL's augmentations)
    blur1: float = 0.0  # Gaussian blur probability, view 1; CIFAR-10: none at 32 px, solo-learn (paper 1.0)
    blur2: float = 0.0  # Gaussian blur probability, view 2; CIFAR-10: none at 32 px, solo-learn (paper 0.1)
    solarize1: float = 0.0  # solarization probability, view 1; paper, Implementation details
    solarize2: float = 0.2  # solarization probability, view 2; paper, Implementation details


# differs from official code: its gradient is 1/W of the global loss's (see forward), and the paper's lr-biases
# 0.0048 and weight decay 1.5e-6 were tuned under it with W = 32 GPUs ("distributed across 32 V100 GPUs");
# why: under our exact gradient the preset takes the official steps at W = 32 with lr-biases 0.0048/32 and
# weight decay 32 × 1.5e-6 (biases and BN step W× smaller; the decay weighs W× more against the gradient);
# effect: the same training as the official code on 32 GPUs, at any number of GPUs here
PRESETS = {  # the paper's ImageNet recipe: ResNet-50, LARS, N 2048, lr 0.2 / 0.0048, wd 1.5e-6, 8192-d
    "imagenet": dict(arch="resnet50", epochs=1000, batch_size=2048, lr=0.2, lr_biases=0.0048 / 32, wd=1.5e-6 * 32,
                     dim=8192, blur1=1.0, blur2=0.1),
}


def augment(args, blur, solarize):
    """One view, as BYOL ('s augmentations): the views differ only in blur and solarization probabilities."""
    return v2.Compose([
        v2.RandomResizedCrop(args.image_size, scale=(args.crop_min, 1.0), antialias=True,
                             interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # brightness, contrast, saturation, hue
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([data.PILGaussianBlur(sigma=(0.1, 2.0))], p=blur),  # PIL's GaussianBlur(σ), as main.py
        v2.RandomSolarize(threshold=128, p=solarize),  # x ← 255 − x where x ≥ 128 (0.5 in [0, 1])
        data.normalize(args.dataset),
    ])


def projector(in_dim, dim):
    """Three bias-free Linear layers of width dim, BN + ReLU after the first two only; paper."""
    return nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim, bias=False))


class BarlowTwins(nn.Module):
    def __init__(self, args):
        super().__init__()
        # torchvision ResNet, the last BN γ of each residual block zero-initialised as the official code
        self.backbone = resnet.resnet(args.arch, resnet.uses_cifar_stem(args.image_size), zero_init_residual=True)
        self.projector = projector(self.backbone.dim, args.dim)
        self.lambd = args.lambd

    def forward(self, y1, y2):  # Alg. 1
        z1 = self.projector(self.backbone(y1))  # (n, dim): z^A, n = N / world on this rank
        z2 = self.projector(self.backbone(y2))  # (n, dim): z^B
        # C is a statistic of the global batch: gather with gradient, so 1 GPU and W GPUs agree exactly.
        # differs from official code: it all-reduces C without gradient, so with W GPUs its gradients
        # are 1/W of the global loss's (DDP averages W partial gradients); see docs/barlow.md.
        z1_all, z2_all = dist.gather_with_grad(z1), dist.gather_with_grad(z2)  # (N, dim)
        loss = barlow_twins_loss(z1_all, z2_all, self.lambd)  # the same global value on every rank
        c_ii = (standardize(fp32(z1_all.detach())) * standardize(fp32(z2_all.detach()))).mean(dim=0)  # diag of C
        return loss, {"c_diag": c_ii.mean()}  # → 1 as the views' embeddings become invariant


def standardize(z, eps=1e-5):
    """Per-dimension batch standardisation: BatchNorm1d(affine=False) in training mode, biased variance."""
    # differs from paper: Alg. 1 divides by the unbiased std without ε; this is the official code's BatchNorm form,
    # biased variance and ε; effect: Alg. 1's C is (N − 1)/N times this one (0.998 at N = 512)
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def cross_correlation(z1, z2):
    """Eq. 2: C_ij = Σ_b ẑ^A_b,i ẑ^B_b,j / N, the ẑ standardised over the batch of N: (dim, dim)."""
    with torch.autocast(z1.device.type, enabled=False):  # float32 even under bf16 autocast
        z1, z2 = standardize(fp32(z1)), standardize(fp32(z2))
        return einsum(z1, z2, "b i, b j -> i j") / len(z1)  # Σ_b over the batch


def barlow_twins_loss(z1, z2, lambd):
    """Eq. 1: L_BT = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij², on the global batch z1, z2 (N, dim)."""
    c = cross_correlation(z1, z2)  # (dim, dim)
    on_diag = (1 - c.diagonal()).pow(2).sum()  # invariance term
    off_diag = c.pow(2).sum() - c.diagonal().pow(2).sum()  # redundancy reduction term
    return on_diag + lambd * off_diag


def build_model(args):
    return BarlowTwins(args)


def main(args):
    run = Run(args)  # torchrun set-up, seeds, run directory
    views = data.Views(data.dataset(args.dataset, args.data_dir, "pretrain", args.image_size),
                       augment(args, args.blur1, args.solarize1),
                       augment(args, args.blur2, args.solarize2))  # asymmetric views, as BYOL
    loader = data.train_loader(views, args.batch_size, args.workers, args.seed, run.device)
    model = run.prepare(build_model(args))  # SyncBN over all ranks, as the official code
    net = dist.unwrap(model)

    # LARS with two parameter groups (Implementation details): weights, and biases + BN parameters
    # (ndim == 1), which skip weight decay and the trust ratio and get their own, smaller learning rate.
    scale = args.batch_size / 256  # linear scaling rule; paper
    weights = [p for p in net.parameters() if p.ndim > 1]
    biases = [p for p in net.parameters() if p.ndim == 1]
    # differs from solo-learn, the source of the CIFAR-10 lr and wd: the paper's LARS (η 0.001, no clipping), where
    # solo-learn uses η 0.02 with each layer's rate clipped at the lr and scales the loss by 0.1; its accuracy is
    # for its whole recipe
    optimizer = optim.LARS([{"params": weights, "peak": args.lr * scale},
                            {"params": biases, "peak": args.lr_biases * scale}], weight_decay=args.wd, momentum=0.9)
    run.watch(model, optimizer, backbone=net.backbone)  # resumes from OUT/checkpoint.pt if there is one
    total, warmup = args.epochs * len(loader), args.warmup_epochs * len(loader)

    for y1, y2 in run.batches(loader):
        # warmup, then cosine per step down to 1e-3 × the peak; paper and official code
        factor = optim.warmup_cosine(run.step, total, warmup, 1.0, final=1e-3)
        for group in optimizer.param_groups:
            group["lr"] = factor * group["peak"]
        with run.autocast():
            loss, stats = model(y1, y2)  # Eq. 1 on the global batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(loss, lr=optimizer.param_groups[0]["lr"], **stats)


if __name__ == "__main__":
    main(cli.parse(Args, PRESETS))
