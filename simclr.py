"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.
Ting Chen, Simon Kornblith, Mohammad Norouzi, Geoffrey Hinton. ICML 2020. arXiv:2002.05709.

Two views of each image go through the same encoder f and projection head g; each view must pick
out its partner among all 2N views of the batch (the NT-Xent loss), the other 2(N−1) views being
its negatives. Large batches, strong colour distortion and a nonlinear head are what make it work.

    uv run simclr.py                                     # CIFAR-10, the official v1 README's recipe
    uv run simclr.py --dataset imagenet --data-dir DIR   # the paper's ImageNet recipe
    torchrun --nproc-per-node 8 simclr.py                # 8 GPUs: --batch-size stays global
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 simclr.py

Docs: docs/simclr.md (each section below beside the paper's equations).
"""
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
    # CIFAR-10: one source for the whole recipe, the v1 code that produced the paper's numbers and the
    # v1 README's CIFAR-10 command (google-research/simclr at 85e8552, README.md "Pretraining")
    epochs: int = 1000  # CIFAR-10: 1000 epochs; v1 README
    batch_size: int = 512  # N, global over all ranks; CIFAR-10: v1 README
    lr: float = 1.0  # base lr, scaled lr × N/256 (linear scaling, App. B.1); CIFAR-10: v1 README
    wd: float = 1e-6  # weight decay, BN and biases excluded; CIFAR-10: v1 README (v2 README 1e-4, for v2's 3-layer head)
    tau: float = 0.5  # τ in Eq. 1; CIFAR-10: v1 README (ImageNet 0.1)
    warmup_epochs: int = 10  # linear warmup, then cosine per step; paper §2.3 (default setting), v1 run.py
    dim: int = 128  # output dim of the projection head g; paper §2.3 (default setting), v1 run.py head_proj_dim
    s: float = 0.5  # colour distortion strength; CIFAR-10: v1 README (ImageNet 1.0)
    blur: bool = False  # CIFAR-10: no Gaussian blur at 32 px; v1 README
    crop_min: float = 0.08  # smallest crop area; paper App. A, v1 data_util.py


PRESETS = {  # the paper's ImageNet recipe: ResNet-50, LARS lr 0.3 × N/256, wd 1e-6, τ 0.1, N 4096 (1000 epochs for 69.3)
    "imagenet": dict(arch="resnet50", epochs=100, batch_size=4096, lr=0.3, wd=1e-6, tau=0.1, s=1.0, blur=True),
}


def augment(args):
    """One view: random crop and resize, flip, colour distortion of strength s (App. A), as the v1 code computes
    them (data_util.py preprocess_for_train at 85e8552, before its impl flag; blur in model.py): TF's operations,
    whose arithmetic is not torchvision's (common/tf_image.py)."""
    blur = [tf_image.Batched(partial(random_blur, kernel_size=args.image_size // 10))] if args.blur else []
    return v2.Compose([
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),  # pixels in [0, 1], tf.image.convert_image_dtype
        tf_image.Batched(partial(random_crop_and_resize, size=args.image_size, area_min=args.crop_min)),
        v2.RandomHorizontalFlip(),  # tf.image.random_flip_left_right
        tf_image.Batched(partial(color_distortion, s=args.s)),
        *blur,
        # differs from paper: inputs are normalised by the dataset's mean and std (the TF code feeds
        # pixels in [0, 1]); the first convolution's weights can absorb the scale, the BN after it the shift.
        data.normalize(args.dataset),
    ])


def random_crop_and_resize(x, g, size, area_min):
    """data_util.py crop_and_resize on a batch x (n, 3, H, W): TF's sample_distorted_bounding_box (area 8–100%,
    aspect 3/4–4/3 drawn uniformly, at least 10% of the image, 100 attempts, else the whole image), then TF1's
    resize_bicubic (not antialiased, legacy pixel grid), the values not clipped until the colour distortion."""
    top, left, h, w = tf_image.sample_distorted_bounding_box(g, len(x), *x.shape[-2:], area_range=(area_min, 1.0),
                                                             aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.1,
                                                             max_attempts=100, device=x.device)
    return tf_image.resize_bicubic(x, top, left, h, w, (size, size), half_pixel_centers=False)


def color_distortion(x, g, s):
    """App. A's pseudo-code on a batch x (n, 3, H, W) in [0, 1], strength s; each image draws its own parameters.
    The order is random and each result clipped, as the v1 code (data_util.py color_jitter_rand)."""
    def color_jitter(x):
        return tf_image.random_order(x, [
            (tf_image.adjust_brightness, tf_image.uniform(g, x, -0.8 * s, 0.8 * s)),  # x + δ, random_brightness
            (tf_image.adjust_contrast, tf_image.uniform(g, x, 1 - 0.8 * s, 1 + 0.8 * s)),  # each channel's mean
            (tf_image.adjust_saturation, tf_image.uniform(g, x, 1 - 0.8 * s, 1 + 0.8 * s)),  # S × f in HSV
            (tf_image.adjust_hue, tf_image.uniform(g, x, -0.2 * s, 0.2 * s)),  # H + δ in HSV
        ], g, clip=True)

    def color_drop(x):
        return tf_image.rgb_to_grayscale(x).expand_as(x)  # tf.tile to 3 channels

    x = tf_image.random_apply(color_jitter, x, p=0.8, g=g)
    x = tf_image.random_apply(color_drop, x, p=0.2, g=g)
    return x.clamp(0, 1)  # preprocess_for_train's last clip (the crop's bicubic overshoot, where no jitter ran)


def random_blur(x, g, kernel_size):
    """model.py batch_random_blur: with probability 0.5 a Gaussian blur of σ ∈ [0.1, 2], kernel ≈ 10% of the side,
    zero padding ('SAME'); App. A."""
    # differs from official code: σ is drawn per image, where batch_random_blur draws one σ per batch and view;
    # the same law per image, more variety within a batch; expected effect: none measurable
    sigma = tf_image.uniform(g, x, 0.1, 2.0)
    x = tf_image.random_apply(lambda x: tf_image.gaussian_blur(x, sigma, kernel_size), x, p=0.5, g=g)
    return x.clamp(0, 1)


def projection_head(in_dim, dim):
    """g: Linear → BN → ReLU → Linear → BN without β, linear layers bias-free; §2.1 and the official code."""
    last_bn = nn.BatchNorm1d(dim)
    last_bn.bias.requires_grad_(False)  # BN with γ but no β ("center=False" in the TF code): β stays 0
    g = nn.Sequential(nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                      nn.Linear(in_dim, dim, bias=False), last_bn)
    for layer in (g[0], g[3]):  # N(0, 0.01²) weights, as the official model_util.py linear_layer
        nn.init.normal_(layer.weight, std=0.01)
    return g


class SimCLR(nn.Module):
    def __init__(self, args):
        super().__init__()
        # torchvision ResNet, the last BN γ of each residual block zero-initialised as the official code
        self.backbone = resnet.resnet(args.arch, resnet.uses_cifar_stem(args.image_size), zero_init_residual=True)
        self.projector = projection_head(self.backbone.dim, args.dim)
        self.tau = args.tau

    def forward(self, x1, x2):  # Alg. 1
        n = len(x1)  # n = N / world on this rank
        # Both views in one batch of 2n, so that every BN normalises over the 2N views of the global batch
        # (official model.py: the views are concatenated with tf.concat before the network)
        z = self.projector(self.backbone(torch.cat([x1, x2])))  # (2n, dim): z = g(f(x))
        z1, z2 = z[:n], z[n:]  # (n, dim) each: the two views of this rank's images
        # Negatives come from every rank: gather with gradient, so 1 GPU and W GPUs agree exactly.
        z1_all, z2_all = dist.gather_with_grad(z1), dist.gather_with_grad(z2)  # (N, dim)
        # differs from paper: twice Eq. 1's L, the official objective.py's loss_a + loss_b (each a mean over
        # the anchors); why: the published runs train on that scale; effect: under LARS the BN parameters
        # take 2× the plain-SGD steps of L and the weight decay weighs half as much against the gradient
        loss = 2 * nt_xent(z1, z2, self.tau, z1_all, z2_all, start=dist.rank() * n)
        pos_sim = F.cosine_similarity(z1.detach(), z2.detach()).mean()
        return loss, {"pos_sim": pos_sim}


def nt_xent(z1, z2, tau, z1_all=None, z2_all=None, start=0):
    """Eq. 1 and Alg. 1: L = 1/(2N) Σ_k [ℓ(2k−1, 2k) + ℓ(2k, 2k−1)], with
    ℓ(i, j) = −log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ).

    z1, z2: this rank's two views (n, d), the anchors; z1_all, z2_all: the views of all ranks (N, d),
    the candidates (default: z1, z2); start: where z1[0] sits in z1_all. Returns this rank's mean over
    its 2n anchors, whose mean over ranks is L."""
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    n, N = len(z1), len(z1_all)
    with torch.autocast(z1.device.type, enabled=False):  # the loss in float32 even under bf16 autocast
        anchors = F.normalize(fp32(torch.cat([z1, z2])), dim=1)  # (2n, d); sim = cosine similarity
        candidates = F.normalize(fp32(torch.cat([z1_all, z2_all])), dim=1)  # (2N, d)
        logits = anchors @ candidates.T / tau  # (2n, 2N): sim(z_i, z_k)/τ
        i = torch.arange(n, device=z1.device) + start  # global index of each local sample
        self_index = torch.cat([i, i + N])  # where each anchor meets itself among the candidates
        positive = torch.cat([i + N, i])  # its partner view: z1 ↔ z2 of the same image
        logits[torch.arange(2 * n, device=z1.device), self_index] = float("-inf")  # k ≠ i in the denominator
        return F.cross_entropy(logits, positive)  # mean over the 2n anchors of −log softmax at the positive


def build_model(args):
    return SimCLR(args)


def main(args):
    run = Run(args)  # torchrun set-up, seeds, run directory
    views = data.Views(data.dataset(args.dataset, args.data_dir, "pretrain", args.image_size),
                       augment(args), augment(args))  # two views from the same family of augmentations
    loader = data.train_loader(views, args.batch_size, args.workers, args.seed, run.device)
    model = run.prepare(build_model(args))  # global BN over all ranks; paper §2.2 "Global BN"
    net = dist.unwrap(model)

    init_lr = args.lr * args.batch_size / 256  # linear scaling rule; App. B.1
    # LARS (§2.2); BN parameters and biases (ndim == 1) skip weight decay and the trust ratio, as in v1 run.py
    # The lr inside the momentum buffer as the official lars_optimizer.py (classic_momentum): v ← m·v + lr·g, w ← w − v
    optimizer = optim.LARS(net.parameters(), lr=init_lr, weight_decay=args.wd, momentum=0.9, lr_in_momentum=True)
    run.watch(model, optimizer, backbone=net.backbone)  # resumes from OUT/checkpoint.pt if there is one
    total, warmup = args.epochs * len(loader), args.warmup_epochs * len(loader)

    for x1, x2 in run.batches(loader):
        lr = optim.warmup_cosine(run.step, total, warmup, init_lr)  # warmup, then cosine per step; §2.3
        optim.set_lr(optimizer, lr)
        with run.autocast():
            loss, stats = model(x1, x2)  # 2 × Eq. 1 over all 2N views of the global batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(loss, lr=lr, **stats)


if __name__ == "__main__":
    main(cli.parse(Args, PRESETS))
