"""BYOL: Bootstrap Your Own Latent, a New Approach to Self-Supervised Learning.
Jean-Bastien Grill, Florian Strub, Florent Altché, et al. NeurIPS 2020. arXiv:2006.07733.

An online network (encoder f, projector g, predictor q) predicts, from one view, the projection of
the other view by a target network, a slowly moving average of the online one. There are no negative
pairs: the predictor, the stop-gradient into the target and the moving average keep it from collapsing.

    uv run byol.py                                     # CIFAR-10, solo-learn's tested recipe
    uv run byol.py --dataset imagenet --data-dir DIR   # the paper's ImageNet recipe
    torchrun --nproc-per-node 8 byol.py                # 8 GPUs: --batch-size stays global
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 byol.py

Docs: docs/byol.md (each section below beside the paper's equations).
"""
import copy
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from common import cli, data, dist, optim, resnet, tf_image
from common.train import Run, fp32


@dataclass
class Args(cli.System):
    epochs: int = 1000  # CIFAR-10: 1000 epochs; solo-learn cifar/byol.yaml (paper: 1000 on ImageNet)
    batch_size: int = 512  # N, global over all ranks; CIFAR-10: as the other methods here (paper 4096)
    lr: float = 1.0  # base lr, scaled lr × N/256; CIFAR-10: solo-learn (paper 0.2, §3.3)
    wd: float = 1e-5  # weight decay, BN and biases excluded; CIFAR-10: solo-learn (paper 1.5e-6, §3.3)
    eta: float = 0.02  # LARS trust coefficient η; CIFAR-10: solo-learn (official configs/byol.py 1e-3)
    clip_lr: bool = True  # LARS layer rate clipped at the lr, solo-learn's clip_lr; CIFAR-10: solo-learn (official: no)
    warmup_epochs: int = 10  # linear warmup, then cosine per step; paper §3.3
    tau_base: float = 0.99  # τ_base of the target's moving average, Eq. 1; CIFAR-10: solo-learn (paper 0.996)
    hidden_dim: int = 4096  # hidden width of the projector g and the predictor q; paper §3.3
    dim: int = 256  # output dim of g and q; paper §3.3
    crop_min: float = 0.08  # smallest crop area; paper App. B, Table 6
    blur1: float = 0.0  # Gaussian blur probability, view 1; CIFAR-10: none at 32 px, solo-learn (paper 1.0)
    blur2: float = 0.0  # Gaussian blur probability, view 2; CIFAR-10: none at 32 px, solo-learn (paper 0.1)
    solarize1: float = 0.0  # solarization probability, view 1; paper App. B, Table 6
    solarize2: float = 0.2  # solarization probability, view 2; paper App. B, Table 6
    jax_ops: bool = False  # the official JAX code's augmentation ops (ImageNet); CIFAR-10: solo-learn's torchvision ops


PRESETS = {  # the paper's ImageNet recipe, §3.3: ResNet-50, LARS lr 0.2 × N/256, wd 1.5e-6, N 4096, τ_base 0.996
    "imagenet": dict(arch="resnet50", epochs=1000, batch_size=4096, lr=0.2, wd=1.5e-6, tau_base=0.996,
                     eta=1e-3, clip_lr=False, blur1=1.0, blur2=0.1, jax_ops=True),
}


def augment(args, blur, solarize):
    """One view, App. B Table 6: the two views differ only in their blur and solarization probabilities."""
    if args.jax_ops:  # ImageNet: the official code's operations (byol/utils/dataset.py, augmentations.py)
        return v2.Compose([
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),  # pixels in [0, 1]
            tf_image.Batched(partial(random_crop_and_resize, size=args.image_size, area_min=args.crop_min)),
            v2.RandomHorizontalFlip(),  # random_flip
            tf_image.Batched(partial(color_blur_solarize, blur=blur, solarize=solarize,
                                     kernel_size=args.image_size / 10)),  # kernel ≈ 10% of the side
            data.normalize(args.dataset),
        ])
    # CIFAR-10: solo-learn's pipeline (pretrain_dataloader.py), torchvision's operations on PIL images
    return v2.Compose([
        v2.RandomResizedCrop(args.image_size, scale=(args.crop_min, 1.0), antialias=True,
                             interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # brightness, contrast, saturation, hue
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([data.PILGaussianBlur(sigma=(0.1, 2.0))], p=blur),  # PIL's, as solo-learn (p 0 on CIFAR-10)
        v2.RandomSolarize(threshold=128, p=solarize),  # x ← 255 − x where x ≥ 128 (0.5 in [0, 1])
        data.normalize(args.dataset),
    ])


def random_crop_and_resize(x, g, size, area_min):
    """dataset.py _decode_and_random_crop on a batch x (n, 3, H, W): one draw of an area in [8%, 100%] and an aspect
    ratio log-uniform in [3/4, 4/3], the sides clamped to the image (no retry); then tf.image.resize, bicubic (not
    antialiased, half-pixel grid), clipped to [0, 1]."""
    top, left, h, w = tf_image.random_crop_clamped(g, len(x), *x.shape[-2:], area_range=(area_min, 1.0),
                                                   ratio_range=(3 / 4, 4 / 3), device=x.device)
    return tf_image.resize_bicubic(x, top, left, h, w, (size, size), half_pixel_centers=True).clamp(0, 1)


def color_blur_solarize(x, g, blur, solarize, kernel_size):
    """augmentations.py on a batch x (n, 3, H, W) in [0, 1], after the flip; each image draws its own parameters."""
    def color_jitter(x):  # in a random order, each result clipped (_color_transform_single_image)
        return tf_image.random_order(x, [
            (tf_image.adjust_brightness, tf_image.uniform(g, x, -0.4, 0.4)),  # x + δ
            (tf_image.adjust_contrast, tf_image.uniform(g, x, 0.6, 1.4)),  # about each channel's own mean
            (tf_image.adjust_saturation, tf_image.uniform(g, x, 0.8, 1.2)),  # S × f in HSV, clipped
            (tf_image.adjust_hue, tf_image.uniform(g, x, -0.1, 0.1)),  # H + δ in HSV
        ], g, clip=True)

    x = tf_image.random_apply(color_jitter, x, p=0.8, g=g)
    x = tf_image.random_apply(lambda x: tf_image.rgb_to_grayscale(x).expand_as(x), x, p=0.2, g=g).clamp(0, 1)
    sigma = tf_image.uniform(g, x, 0.1, 2.0)  # kernel int(H/10/2)·2 + 1 (23 at 224), zero padding ('SAME')
    x = tf_image.random_apply(lambda x: tf_image.gaussian_blur(x, sigma, kernel_size), x, p=blur, g=g)
    x = tf_image.random_apply(lambda x: torch.where(x < 0.5, x, 1 - x), x, p=solarize, g=g)  # x ≥ 0.5 → 1 − x
    return x.clamp(0, 1)


def mlp(in_dim, hidden_dim, out_dim):
    """g and q: Linear → BN → ReLU → Linear, no BN on the output (paper §3.3), no bias there (official code)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))


class BYOL(nn.Module):
    def __init__(self, args):
        super().__init__()
        # online network θ: torchvision ResNet (CIFAR stem at 32 px), projector g_θ, predictor q_θ; each block's
        # last BN γ starts at 0 where the official haiku ResNet zero-inits it: bottleneck blocks (ResNet-50), not
        # basic ones (solo-learn's CIFAR-10 ResNet-18 has none either)
        self.backbone = resnet.resnet(args.arch, resnet.uses_cifar_stem(args.image_size),
                                      zero_init_residual=args.arch == "resnet50")
        self.projector = mlp(self.backbone.dim, args.hidden_dim, args.dim)
        self.predictor = mlp(args.dim, args.hidden_dim, args.dim)
        # target network ξ: f_ξ and g_ξ, a copy of θ at the start, never given gradients
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x1, x2):  # §3.1
        z1 = self.projector(self.backbone(x1))  # (n, dim): z_θ = g_θ(f_θ(v))
        z2 = self.projector(self.backbone(x2))  # (n, dim): z̃_θ from the other view v′
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (n, dim): q_θ(z_θ)
        with torch.no_grad():  # sg(ξ): no gradient reaches the target network
            t1 = self.target_projector(self.target_backbone(x1))  # (n, dim): z̃′_ξ, the target for p2
            t2 = self.target_projector(self.target_backbone(x2))  # (n, dim): z′_ξ, the target for p1
        loss = regression_loss(p1, t2) + regression_loss(p2, t1)  # L^BYOL = L + L̃, §3.1
        std_z = F.normalize(fp32(z1.detach()), dim=1).std(dim=0).mean()  # ≈ 1/√dim when healthy, → 0 on collapse
        return loss, {"std_z": std_z}

    @torch.no_grad()
    def update_target(self, tau):
        """Eq. 1, called by the loop after each optimiser step."""
        momentum_update(self.backbone, self.target_backbone, tau)
        momentum_update(self.projector, self.target_projector, tau)


def regression_loss(p, z):
    """Eq. 2: ‖p̄ − z̄‖² = 2 − 2·⟨p, z⟩ / (‖p‖·‖z‖) per sample, averaged over the batch."""
    p = F.normalize(fp32(p), dim=1)  # p̄ = q_θ(z_θ) / ‖q_θ(z_θ)‖₂, in float32 under autocast
    z = F.normalize(fp32(z.detach()), dim=1)  # z̄′ = z′_ξ / ‖z′_ξ‖₂, a constant
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def target_decay(k, K, tau_base):
    """τ = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2 at step k of K: τ_base at the start, 1 at the end; §3.3."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / K) + 1) / 2


@torch.no_grad()
def momentum_update(online, target, tau):
    """Eq. 1: ξ ← τ·ξ + (1 − τ)·θ (parameters; BN running statistics are the target's own)."""
    for theta, xi in zip(online.parameters(), target.parameters()):
        xi.mul_(tau).add_(theta.detach(), alpha=1 - tau)


def build_model(args):
    return BYOL(args)


def main(args):
    run = Run(args)  # torchrun set-up, seeds, run directory
    views = data.Views(data.dataset(args.dataset, args.data_dir, "pretrain", args.image_size),
                       augment(args, args.blur1, args.solarize1),
                       augment(args, args.blur2, args.solarize2))  # asymmetric: T and T′, App. B
    loader = data.train_loader(views, args.batch_size, args.workers, args.seed, run.device)
    model = run.prepare(build_model(args))  # global BN over all ranks, online and target; official code
    net = dist.unwrap(model)

    init_lr = args.lr * args.batch_size / 256  # linear scaling rule; §3.3
    # LARS: BN parameters and biases (ndim == 1) skip weight decay and the trust ratio; §3.3. On CIFAR-10 the
    # recipe's own LARS (solo-learn's, with clip_lr); on ImageNet the official one (η 1e-3, no clipping)
    online = [*net.backbone.parameters(), *net.projector.parameters(), *net.predictor.parameters()]
    optimizer = optim.LARS(online, lr=init_lr, weight_decay=args.wd, momentum=0.9, eta=args.eta, clip_lr=args.clip_lr)
    run.watch(model, optimizer, backbone=net.backbone)  # the target network is part of the model's state
    total, warmup = args.epochs * len(loader), args.warmup_epochs * len(loader)

    for x1, x2 in run.batches(loader):
        lr = optim.warmup_cosine(run.step, total, warmup, init_lr)  # warmup, then cosine per step; §3.3
        optim.set_lr(optimizer, lr)
        tau = target_decay(run.step, total, args.tau_base)  # per step, from the step count: resumes exactly
        with run.autocast():
            loss, stats = model(x1, x2)  # L^BYOL, Eq. 2 in both directions
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # θ ← optimizer(θ, ∇_θ L^BYOL, η): Eq. 3, its first line
        net.update_target(tau)  # ξ ← τξ + (1 − τ)θ: Eq. 3's second line (Eq. 1), after the optimiser step
        run.log(loss, lr=lr, tau=tau, **stats)


if __name__ == "__main__":
    main(cli.parse(Args, PRESETS))
