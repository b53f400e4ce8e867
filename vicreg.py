"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning.
Adrien Bardes, Jean Ponce, Yann LeCun. ICLR 2022. arXiv:2105.04906.

Two views go through the same network; three terms on the embeddings: invariance (the views'
embeddings are close), variance (each dimension keeps a standard deviation of at least 1 over the
batch, which prevents collapse) and covariance (the dimensions are decorrelated). Each embedding
batch is regularised on its own: no negative pairs, no predictor, no stop-gradient, no momentum encoder.

    uv run vicreg.py                                     # CIFAR-10, solo-learn's tested recipe
    uv run vicreg.py --dataset imagenet --data-dir DIR   # the paper's ImageNet recipe
    torchrun --nproc-per-node 8 vicreg.py                # 8 GPUs: --batch-size stays global
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 vicreg.py

Docs: docs/vicreg.md (each section below beside the paper's equations).
"""
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
    epochs: int = 1000  # CIFAR-10: 1000 epochs; solo-learn cifar/vicreg.yaml (paper: 1000 on ImageNet)
    batch_size: int = 512  # N, global over all ranks; CIFAR-10: as the other methods here (paper 2048)
    lr: float = 0.3  # base lr, scaled lr × N/256; CIFAR-10: solo-learn (paper 0.2, §4.2)
    wd: float = 1e-4  # weight decay, BN and biases excluded; CIFAR-10: solo-learn (paper 1e-6, §4.2)
    warmup_epochs: int = 10  # linear warmup, then cosine to 1e-3 × peak; paper §4.2 and official code
    sim_coeff: float = 25.0  # λ in Eq. 6, the invariance weight; paper §4.2
    std_coeff: float = 25.0  # μ in Eq. 6, the variance weight (on the halved term); paper §4.2
    cov_coeff: float = 1.0  # ν in Eq. 6, the covariance weight; paper §4.2
    dim: int = 2048  # width of the three expander layers; CIFAR-10: solo-learn (paper 8192)
    crop_min: float = 0.2  # smallest crop area; CIFAR-10: solo-learn (paper 0.08)
    blur1: float = 0.0  # Gaussian blur probability, view 1; CIFAR-10: none at 32 px, solo-learn (paper 1.0)
    blur2: float = 0.0  # Gaussian blur probability, view 2; CIFAR-10: none at 32 px, solo-learn (paper 0.1)
    solarize1: float = 0.1  # solarization probability, view 1; CIFAR-10: solo-learn (paper 0.0)
    solarize2: float = 0.1  # solarization probability, view 2; CIFAR-10: solo-learn (paper 0.2)


PRESETS = {  # the paper's ImageNet recipe, §4.2: ResNet-50, LARS lr 0.2 × N/256, wd 1e-6, N 2048, 8192-d
    "imagenet": dict(arch="resnet50", epochs=1000, batch_size=2048, lr=0.2, wd=1e-6, dim=8192, crop_min=0.08,
                     blur1=1.0, blur2=0.1, solarize1=0.0, solarize2=0.2),
}


def augment(args, blur, solarize):
    """One view, official augmentations.py (BYOL's): the views differ only in blur and solarization probabilities."""
    return v2.Compose([
        v2.RandomResizedCrop(args.image_size, scale=(args.crop_min, 1.0), antialias=True,
                             interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # brightness, contrast, saturation, hue
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([data.PILGaussianBlur(sigma=(0.1, 2.0))], p=blur),  # PIL's GaussianBlur(σ), as augmentations.py
        v2.RandomSolarize(threshold=128, p=solarize),  # x ← 255 − x where x ≥ 128 (0.5 in [0, 1])
        data.normalize(args.dataset),
    ])


def expander(in_dim, dim):
    """h_φ: three Linear layers of width dim, BN + ReLU after the first two (§4.2); the last without bias
    (official code)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim, bias=False))


class VICReg(nn.Module):
    def __init__(self, args):
        super().__init__()
        # torchvision ResNet, the last BN γ of each residual block zero-initialised as the official code
        self.backbone = resnet.resnet(args.arch, resnet.uses_cifar_stem(args.image_size), zero_init_residual=True)
        self.expander = expander(self.backbone.dim, args.dim)
        self.coeffs = args.sim_coeff, args.std_coeff, args.cov_coeff

    def forward(self, x1, x2):  # Fig. 1, Alg. 1
        z = self.expander(self.backbone(x1))  # (n, dim): Z = h_φ(f_θ(X)), n = N / world on this rank
        z_ = self.expander(self.backbone(x2))  # (n, dim): Z′
        # Variance and covariance are statistics of the global batch: gather with gradient, as the
        # official code does, so 1 GPU and W GPUs agree exactly.
        z_all, z_all_ = dist.gather_with_grad(z), dist.gather_with_grad(z_)  # (N, dim)
        loss = vicreg_loss(z_all, z_all_, *self.coeffs)  # the same global value on every rank
        std = torch.sqrt(fp32(z_all.detach()).var(dim=0) + 1e-4).mean()  # → 0 on collapse; the hinge aims at ≥ 1
        return loss, {"std": std, "inv": F.mse_loss(fp32(z_all.detach()), fp32(z_all_.detach()))}


def variance(z, gamma=1.0, eps=1e-4):
    """Eq. 1 and 2: v(Z) = (1/d) Σ_j max(0, γ − S(z^j, ε)), S(x, ε) = √(Var(x) + ε), unbiased Var."""
    std = torch.sqrt(z.var(dim=0) + eps)  # (d,)
    return F.relu(gamma - std).mean()


def covariance(z):
    """Eq. 3 and 4: c(Z) = (1/d) Σ_{i≠j} C(Z)²_ij, C(Z) = (1/(N−1)) Σ_b (z_b − z̄)(z_b − z̄)ᵀ."""
    N, d = z.shape
    z = z - z.mean(dim=0)
    cov = einsum(z, z, "b i, b j -> i j") / (N - 1)  # (d, d): Σ_b over the batch
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d


def vicreg_loss(x, y, sim_coeff, std_coeff, cov_coeff):
    """Eq. 6 in the official code's form (its coefficients are tuned for it), on the global batch (N, d):
    ℓ = λ·mse(Z, Z′) + μ·[v(Z) + v(Z′)]/2 + ν·[c(Z) + c(Z′)]."""
    with torch.autocast(x.device.type, enabled=False):  # the loss in float32 even under bf16 autocast
        x, y = fp32(x), fp32(y)
        # differs from paper: the invariance term is the mean over N·d entries (Eq. 5 sums over d) and
        # the variance terms are halved (official code, vicreg#26); the paper's λ, μ, ν are for this form.
        repr_loss = F.mse_loss(x, y)  # invariance, Eq. 5 divided by d
        std_loss = variance(x) / 2 + variance(y) / 2  # variance, Eq. 1, halved
        cov_loss = covariance(x) + covariance(y)  # covariance, Eq. 4
        return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def build_model(args):
    return VICReg(args)


def main(args):
    run = Run(args)  # torchrun set-up, seeds, run directory
    views = data.Views(data.dataset(args.dataset, args.data_dir, "pretrain", args.image_size),
                       augment(args, args.blur1, args.solarize1),
                       augment(args, args.blur2, args.solarize2))  # asymmetric views (official augmentations.py)
    loader = data.train_loader(views, args.batch_size, args.workers, args.seed, run.device)
    model = run.prepare(build_model(args))  # SyncBN over all ranks, as the official code
    net = dist.unwrap(model)

    init_lr = args.lr * args.batch_size / 256  # linear scaling rule; §4.2
    # LARS: BN parameters and biases (ndim == 1) skip weight decay and the trust ratio; §4.2
    # differs from solo-learn, the source of the CIFAR-10 lr and wd: the paper's LARS (η 0.001, no clipping), where
    # solo-learn uses η 0.02 with each layer's rate clipped at the lr; its accuracy is for its whole recipe
    optimizer = optim.LARS(net.parameters(), lr=init_lr, weight_decay=args.wd, momentum=0.9)
    run.watch(model, optimizer, backbone=net.backbone)  # resumes from OUT/checkpoint.pt if there is one
    total, warmup = args.epochs * len(loader), args.warmup_epochs * len(loader)

    for x1, x2 in run.batches(loader):
        # warmup, then cosine per step down to 1e-3 × the peak; official code
        lr = optim.warmup_cosine(run.step, total, warmup, init_lr, final=1e-3 * init_lr)
        optim.set_lr(optimizer, lr)
        with run.autocast():
            loss, stats = model(x1, x2)  # Eq. 6 on the global batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(loss, lr=lr, **stats)


if __name__ == "__main__":
    main(cli.parse(Args, PRESETS))
