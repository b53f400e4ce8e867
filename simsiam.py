"""SimSiam: Exploring Simple Siamese Representation Learning.
Xinlei Chen, Kaiming He. CVPR 2021. arXiv:2011.10566.

Two views of an image go through the same encoder f (backbone + projection MLP); a prediction MLP h
maps one view's output to the other's, whose gradient is stopped. There are neither negative pairs nor a
momentum encoder: the stop-gradient and the predictor together keep the representation from collapsing
(without the stop-gradient it collapses, §4.1; without h too, §4.2).

    uv run simsiam.py                                     # CIFAR-10, paper appendix D recipe
    uv run simsiam.py --dataset imagenet --data-dir DIR   # the paper's ImageNet recipe
    torchrun --nproc-per-node 8 simsiam.py                # 8 GPUs: --batch-size stays global
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 simsiam.py

Docs: docs/simsiam.md (each section below beside the paper's equations).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from common import cli, data, dist, optim, resnet
from common.train import Run, fp32


@dataclass
class Args(cli.System):
    epochs: int = 800  # CIFAR-10: 800 epochs; paper App. D
    batch_size: int = 512  # N, global over all ranks; paper App. D
    lr: float = 0.03  # base lr, scaled lr × N/256; CIFAR-10: paper App. D
    wd: float = 5e-4  # weight decay; CIFAR-10: paper App. D (ImageNet 1e-4)
    momentum: float = 0.9  # SGD momentum; paper §3, baseline settings
    proj_layers: int = 2  # CIFAR-10: 2-layer projection MLP; paper App. D (ImageNet 3)
    dim: int = 2048  # output dim of the projection MLP f (hidden: the backbone's width); paper §3, App. D
    pred_dim: int = 512  # hidden dim of the prediction MLP h (the bottleneck); paper §3
    fix_pred_lr: bool = False  # keep h at the initial lr; paper §4.2 (ImageNet only)
    blur: bool = False  # CIFAR-10: no Gaussian blur at 32 px; paper App. D
    crop_min: float = 0.2  # smallest crop area; official code's aug (0.2, 1)


PRESETS = {  # the paper's ImageNet recipe, §3 (baseline settings): ResNet-50, 100 epochs, batch 512, lr 0.05, wd 1e-4
    "imagenet": dict(arch="resnet50", epochs=100, lr=0.05, wd=1e-4, proj_layers=3, fix_pred_lr=True, blur=True),
}


def augment(args):
    """One view: the MoCo v2 augmentation the paper uses (§3, App. A)."""
    blur = [v2.RandomApply([data.PILGaussianBlur(sigma=(0.1, 2.0))], p=0.5)] if args.blur else []  # PIL's, as loader.py
    return v2.Compose([
        v2.RandomResizedCrop(args.image_size, scale=(args.crop_min, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # brightness, contrast, saturation, hue
        v2.RandomGrayscale(p=0.2),
        *blur,
        v2.RandomHorizontalFlip(),
        data.normalize(args.dataset),
    ])


def projection_mlp(in_dim, dim, layers):
    """f's projection MLP: BN on every layer, ReLU on all but the last, whose BN has no affine; §3. The hidden
    layers keep the backbone's width in_dim (2048 for ResNet-50, 512 for ResNet-18), as the official builder.py."""
    blocks = []
    for _ in range(layers - 1):
        blocks += [nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True)]
    # The official code keeps a frozen bias on the last Linear; a constant bias before BN does nothing.
    return nn.Sequential(*blocks, nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))


def prediction_mlp(dim, pred_dim):
    """h: a bottleneck MLP, dim -> pred_dim -> dim, no BN on its output; §3."""
    return nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                         nn.Linear(pred_dim, dim))


class SimSiam(nn.Module):
    def __init__(self, args):
        super().__init__()
        # torchvision ResNet, zero-init residual as the official code; CIFAR stem at 32 px (App. D)
        self.backbone = resnet.resnet(args.arch, resnet.uses_cifar_stem(args.image_size), zero_init_residual=True)
        self.projector = projection_mlp(self.backbone.dim, args.dim, args.proj_layers)
        self.predictor = prediction_mlp(args.dim, args.pred_dim)

    def forward(self, x1, x2):  # Alg. 1
        z1 = self.projector(self.backbone(x1))  # (n, dim): z = f(x), the encoder f is backbone + projector
        z2 = self.projector(self.backbone(x2))  # (n, dim); each view has its own BN statistics
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (n, dim): p = h(f(x))
        loss = D(p1, z2) / 2 + D(p2, z1) / 2  # Eq. 4: the symmetrised loss with stop-gradient
        std_z = F.normalize(fp32(z1.detach()), dim=1).std(dim=0).mean()  # ≈ 1/√dim when healthy, → 0 on collapse
        return loss, {"std_z": std_z}


def D(p, z):
    """Eq. 3: D(p, stopgrad(z)), the negative cosine similarity of Eq. 1 with z a constant, batch-averaged."""
    p = F.normalize(fp32(p), dim=1)  # p / ‖p‖₂, in float32 under autocast
    z = F.normalize(fp32(z.detach()), dim=1)  # stopgrad(z) / ‖z‖₂: z is a constant here
    return -(p * z).sum(dim=1).mean()


def build_model(args):
    return SimSiam(args)


def main(args):
    run = Run(args)  # torchrun set-up, seeds, run directory
    views = data.Views(data.dataset(args.dataset, args.data_dir, "pretrain", args.image_size),
                       augment(args), augment(args))  # the same augmentation for both views
    loader = data.train_loader(views, args.batch_size, args.workers, args.seed, run.device)
    model = run.prepare(build_model(args))  # SyncBN over all ranks: paper §3, baseline settings
    net = dist.unwrap(model)

    init_lr = args.lr * args.batch_size / 256  # linear scaling rule; paper §3
    groups = [{"params": [*net.backbone.parameters(), *net.projector.parameters()]},
              {"params": net.predictor.parameters(), **({"fixed_lr": init_lr} if args.fix_pred_lr else {})}]
    optimizer = torch.optim.SGD(groups, lr=init_lr, momentum=args.momentum, weight_decay=args.wd)
    run.watch(model, optimizer, backbone=net.backbone)  # resumes from OUT/checkpoint.pt if there is one

    for x1, x2 in run.batches(loader):
        lr = optim.cosine(run.epoch, args.epochs, init_lr)  # cosine decay per epoch, no warmup; paper §3
        optim.set_lr(optimizer, lr)
        with run.autocast():
            loss, stats = model(x1, x2)  # Eq. 4, stop-gradient inside D (Eq. 3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(loss, lr=lr, **stats)


if __name__ == "__main__":
    main(cli.parse(Args, PRESETS))
