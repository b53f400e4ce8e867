"""Linear probe: a linear classifier trained on the frozen backbone's features, top-1 on the test set.

    python -m common.linear --backbone runs/simsiam-cifar10/backbone.pt --dataset cifar10

The backbone stays frozen and in eval mode (BN uses its running statistics): only the linear layer
learns. Features are computed once, without augmentation, and standardised with the training set's
mean and std (a fixed affine map, so the classifier stays linear). This is faster than the papers'
protocols, which train the classifier on augmented crops for 90-100 epochs (see the method pages).
"""
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cli, data, dist, evaluate, optim, resnet
from common.device import GpuPath


@dataclass
class Args:
    backbone: str = ""  # path of a backbone.pt written by a method's run
    dataset: typing.Literal[cli.DATASETS] = "cifar10"  # labelled dataset to probe on
    data_dir: str = "./data"  # dataset root, as for the method files
    image_size: int = 32  # input size (the pre-training crop size)
    epochs: int = 100  # epochs over the cached features
    batch_size: int = 256  # batch size of the linear classifier
    lr: float = 0.1  # SGD lr of the classifier, cosine-decayed
    wd: float = 0.0  # weight decay of the classifier
    workers: int = 4  # data loader processes for feature extraction
    seed: int = 0  # random seed
    device: str = "auto"  # auto, cuda or cpu


def probe(train_x, train_y, test_x, test_y, epochs=100, batch_size=256, lr=0.1, wd=0.0, seed=0):
    """Train a linear classifier on features (n, d) with labels (n,); return the test top-1 fraction."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    classes = int(train_y.max()) + 1
    fc = nn.Linear(train_x.shape[1], classes).to(train_x.device)
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = epochs * max(len(train_x) // batch_size, 1)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen).to(train_x.device)
        for idx in order.split(batch_size):
            optim.set_lr(opt, optim.cosine(step, steps, lr))
            loss = F.cross_entropy(fc(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        return (fc(test_x).argmax(1) == test_y).float().mean().item()


def main(args):
    device = dist.setup(args.device)
    torch.manual_seed(args.seed)
    path = Path(args.backbone)
    if not path.is_file():
        dist.fail(f"no backbone at {path!s}; pass --backbone RUN_DIR/backbone.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone = resnet.from_state_dict(state).to(device).eval()
    except Exception as e:
        dist.fail(f"{path} is not a backbone.pt state_dict ({type(e).__name__}); pass the backbone.pt of a run")
    for p in backbone.parameters():
        p.requires_grad_(False)
    t = data.eval_transform(args.dataset, args.image_size)
    sets = [data.Transformed(data.dataset(args.dataset, args.data_dir, s, args.image_size), t) for s in ("train", "test")]
    try:
        (train_x, train_y), (test_x, test_y) = [
            evaluate.features(backbone, data.eval_loader(d, 256, args.workers, device), GpuPath(device)) for d in sets]
    except data.DataError as e:
        dist.fail(data.DataError.line(e))
    top1 = probe(train_x, train_y, test_x, test_y, args.epochs, args.batch_size, args.lr, args.wd, args.seed)
    print(f"linear top-1 {100 * top1:.2f}% ({args.dataset}, {len(test_y)} test images, backbone {path})")
    result = {"backbone": str(path), "dataset": args.dataset, "linear_top1": top1, "args": vars(args)}
    (path.parent / "linear.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(cli.parse(Args))
