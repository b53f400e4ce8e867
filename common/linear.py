"""Linear evaluation: a linear classifier on the frozen backbone of a run; top-1 and top-5 on the test set.

    python -m common.linear --backbone runs/simclr-cifar10/backbone.pt                    # the papers' protocol
    python -m common.linear --backbone runs/simclr-cifar10/backbone.pt --protocol fast    # minutes, not a paper's
    torchrun --nproc-per-node 8 -m common.linear --backbone runs/simsiam-imagenet/backbone.pt \\
        --dataset imagenet --data-dir /data/imagenet                                     # --batch-size is global

Two protocols, and every number printed or saved names the one that produced it:

* `standard`: the backbone stays frozen and in eval mode (BatchNorm uses its running statistics) while a
  linear layer learns on augmented crops (random resized crop and flip; the test images resized and
  centre-cropped). On ImageNet, the official linear recipe of the method that trained the backbone
  (`IMAGENET`, the method read from the run's config.json); on every other dataset, the SimCLR
  maintainers' CIFAR-10 protocol (`SMALL`), the only published linear protocol for small images.
  Runs on CPU, one GPU or under torchrun (the global batch sharded like the training loader), and resumes
  exactly from OUT/linear-standard.pt, written at every epoch end and at --max-steps.
* `fast`: features computed once without augmentation and standardised with the training set's mean and
  std (a fixed affine map, so the classifier stays linear), then SGD on the cached features. This is no
  paper's protocol; it reads a few points off the standard one and takes seconds after the features.

OUT/linear.json (OUT is the backbone's run directory by default) keeps one entry per protocol, with
every setting that produced the numbers.
"""
import json
import math
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from common import checkpoint, cli, data, dist, evaluate, optim, tf_image
from common.device import GpuPath

# The standard protocol. `lr` is the base lr, multiplied by batch_size/256 where `scale` is set; the
# schedule is a cosine to 0 (`milestones` None) or ×0.1 at each milestone epoch, applied per step or per
# epoch; `head` is the classifier's initialisation; `optimizer` "lars" is SGD whose gradients are first
# scaled by LARC's trust ratio (`larc_`). SGD momentum is 0.9 in every official code. `crop` is the training crop:
# "torchvision" (RandomResizedCrop at its defaults, area (0.08, 1), aspect (3/4, 4/3) log-uniform, with
# `interpolation`: the PyTorch codes' main_lincls.py / evaluate.py), "tf_bounding_box" (SimCLR's data_util.py
# crop_and_resize: TF's sample_distorted_bounding_box and TF1's resize_bicubic) or "clamped" (BYOL's dataset.py
# _decode_and_random_crop and TF2's bicubic resize); `interpolation` also resizes the test images.
SMALL = dict(  # google-research/simclr README.md, "Finetuning the linear head (linear eval)", CIFAR-10 command
    name="SimCLR CIFAR", optimizer="sgd",
    nesterov=True,  # --optimizer=momentum: MomentumOptimizer(use_nesterov=True), model_util.py get_optimizer
    lr=0.1, scale=True,  # --learning_rate=0.1, learning_rate_scaling 'linear' (× B/256), model_util.py
    batch_size=512, epochs=100,  # --train_batch_size=512 --train_epochs=100
    wd=0.0,  # --weight_decay=0.0
    milestones=None, per="step",  # --warmup_epochs=0, then cosine decay per step to 0, model_util.py
    head="zero",  # --zero_init_logits_layer=True
    crop="tf_bounding_box", interpolation="bicubic",  # data_util.py preprocess_for_train, finetune: crop_and_resize, flip
)  # (data.py disables the test crop at <= 32 px: the test image is used whole, as eval_transform does here)
IMAGENET = {
    # facebookresearch/moco main_lincls.py and README: SGD (no Nesterov) lr 30 at batch 256 (not scaled),
    # 100 epochs, ×0.1 at epochs 60 and 80, no weight decay, fc ~ N(0, 0.01), bias 0
    "mocov1": dict(name="MoCo", optimizer="sgd", nesterov=False, lr=30.0, scale=False, batch_size=256,
                   epochs=100, wd=0.0, milestones=(60, 80), per="epoch", head="normal", crop="torchvision",
                   interpolation="bilinear"),
    # google-research/simclr README.md, ImageNet linear head: momentum (Nesterov) lr 0.1 × B/256, batch 4096,
    # 90 epochs, weight decay 1e-6, no warmup, cosine per step, zero-init head
    "simclr": dict(name="SimCLR", optimizer="sgd", nesterov=True, lr=0.1, scale=True, batch_size=4096,
                   epochs=90, wd=1e-6, milestones=None, per="step", head="zero", crop="tf_bounding_box",
                   # differs from official code: the test images are resized by torchvision (shorter side to 256/224 of
                   # the crop, antialiased bicubic) and centre-cropped, where data_util.py center_crop crops 87.5% and
                   # resizes with TF1's resize_bicubic (no antialiasing); the same geometry, a smoother resampling
                   interpolation="bicubic"),
    # deepmind-research byol/configs/eval.py and utils/schedules.py: SGD Nesterov 0.9, base lr 0.2 × B/256,
    # 80 epochs, no warmup, cosine per step, no weight decay; batch 4096 (main_loop.py --batch_size);
    # haiku's default Linear init (truncated normal, std 1/√fan_in): torch's default init here
    "byol": dict(name="BYOL", optimizer="sgd", nesterov=True, lr=0.2, scale=True, batch_size=4096,
                 epochs=80, wd=0.0, milestones=None, per="step", head="torch", crop="clamped",
                 # differs from official code: the test images as SimCLR's above (dataset.py _decode_and_center_crop
                 # crops 224/256 of the shorter side and resizes with TF2's bicubic resize, no antialiasing)
                 interpolation="bicubic"),
    # facebookresearch/simsiam main_lincls.py and README (--lars): apex LARC (trust 0.001, clip False) over SGD,
    # lr 0.1 × B/256, batch 4096, 90 epochs, cosine per epoch, no weight decay, fc ~ N(0, 0.01), bias 0
    "simsiam": dict(name="SimSiam", optimizer="lars", nesterov=False, lr=0.1, scale=True, batch_size=4096,
                    epochs=90, wd=0.0, milestones=None, per="epoch", head="normal", crop="torchvision",
                    interpolation="bilinear"),
    # facebookresearch/barlowtwins evaluate.py and README: SGD lr-classifier 0.3 (not scaled), batch 256,
    # 100 epochs, weight decay 1e-6, CosineAnnealingLR stepped per epoch, fc ~ N(0, 0.01), bias 0
    "barlow": dict(name="Barlow Twins", optimizer="sgd", nesterov=False, lr=0.3, scale=False, batch_size=256,
                   epochs=100, wd=1e-6, milestones=None, per="epoch", head="normal", crop="torchvision",
                   interpolation="bilinear"),
    # facebookresearch/vicreg evaluate.py, with the README's linear-evaluation command (--lr-head 0.02; the
    # script's default is 0.3): batch 256, 100 epochs, weight decay 1e-6, cosine per epoch, fc ~ N(0, 0.01)
    "vicreg": dict(name="VICReg", optimizer="sgd", nesterov=False, lr=0.02, scale=False, batch_size=256,
                   epochs=100, wd=1e-6, milestones=None, per="epoch", head="normal", crop="torchvision",
                   interpolation="bilinear"),
}
IMAGENET["mocov2"] = {**IMAGENET["mocov1"], "name": "MoCo v2"}  # the same main_lincls.py and README command
# fundamentalvision/UniGrad lineval.py and run_linear.sh (--lars); README: "follows ... SimSiam"
IMAGENET["unigrad"] = {**IMAGENET["simsiam"], "name": "UniGrad"}
FAST = dict(name="cached features, no augmentation", epochs=100, batch_size=256, lr=0.1, wd=0.0)  # SGD momentum 0.9, cosine per step


@dataclass
class Args:
    backbone: str = ""  # path of a backbone.pt written by a method's run
    protocol: typing.Literal["standard", "fast"] = "standard"  # standard: the papers'; fast: cached features
    dataset: typing.Literal[cli.DATASETS] = "cifar10"  # labelled dataset to train and test on
    data_dir: str = "./data"  # dataset root, as for the method files
    image_size: int = 0  # input size (0: the run's --image-size from its config.json, else the dataset's)
    method: str = ""  # the method whose ImageNet recipe applies (default: the run's config.json)
    epochs: int = 0  # override the protocol's epochs (0: the protocol's)
    batch_size: int = 0  # override the protocol's global batch size (0: the protocol's)
    lr: float = 0.0  # override the protocol's base lr (0: the protocol's)
    out: str = ""  # where linear.json and the checkpoint go (default: the backbone's directory)
    resume: bool = True  # continue from OUT/linear-standard.pt when it exists
    max_steps: int = 0  # stop after this many steps, saving the checkpoint (0: run all epochs)
    workers: int = cli.default_workers()  # data loader processes per rank (4, or fewer on a machine with fewer cores)
    seed: int = 0  # random seed (classifier init, data order, augmentation)
    device: typing.Literal["auto", "cuda", "cpu"] = "auto"  # auto: cuda when available


def recipe(args, config):
    """The protocol's settings for this backbone, with the flags that override it; a plain dict."""
    if args.protocol == "fast":
        r = dict(FAST)
    elif args.dataset == "imagenet":
        method = args.method or config.get("method", "")
        if method not in IMAGENET:
            dist.fail(f"no ImageNet linear recipe for method {method!r}; pass --method "
                      f"({', '.join(IMAGENET)})")
        r = dict(IMAGENET[method])
    else:
        r = dict(SMALL)
    changed = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr)) if v}
    r.update(changed, protocol=args.protocol)
    r["name"] += "".join(f", --{k.replace('_', '-')} {v}" for k, v in changed.items())  # the name says so
    return r


# --- fast: cached features ---------------------------------------------------------------------------

def probe(train_x, train_y, test_x, test_y, epochs=100, batch_size=256, lr=0.1, wd=0.0, seed=0):
    """Train a linear classifier on features (n, d) with labels (n,); return the test logits."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    classes = int(train_y.max()) + 1
    fc = nn.Linear(train_x.shape[1], classes).to(train_x.device)
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = epochs * math.ceil(len(train_x) / batch_size)  # every batch, the last partial one included
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
        return fc(test_x)


def in_order(x):
    """Gather the shards of `data.eval_loader` (every W-th sample on each rank) into the dataset's order."""
    x = evaluate.gather_uneven(x)
    order = torch.cat([torch.arange(len(x))[r::dist.world()] for r in range(dist.world())])
    out = torch.empty_like(x)
    out[order.to(x.device)] = x
    return out


def fast(backbone, sets, r, args, device, gpu):
    """(test logits, test labels) of the probe on cached features, the same on every rank."""
    (train_x, train_y), (test_x, test_y) = [
        [in_order(t) for t in evaluate.features(backbone, data.eval_loader(s, 256, args.workers, device), gpu)]
        for s in sets]
    return probe(train_x, train_y, test_x, test_y, r["epochs"], r["batch_size"], r["lr"], r["wd"], args.seed), test_y


# --- standard: augmented crops through the frozen backbone --------------------------------------------

class Augmented(Dataset):
    """(image, label) -> (augmented image, label) for the keys (index, seed) of `data.Sampler`: each
    sample's crop is drawn from its own seed, so it is the same at any number of ranks and after a resume."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, seed = key
        image, label = self.base[i]
        with data.seeded(seed):
            return self.transform(image), label


@torch.no_grad()
def larc_(params, trust=0.001, eps=1e-8):
    """apex's LARC with clip=False and no weight decay, as SimSiam's and UniGrad's linear evaluations use it:
    each gradient scaled by trust·‖w‖/(‖g‖ + eps), except where either norm is 0."""
    for w in params:
        w_norm, g_norm = w.norm(), w.grad.norm()
        w.grad.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust * w_norm / (g_norm + eps), 1.0))  # no host sync


def lr_at(r, base, step, steps_per_epoch):
    """The protocol's lr at `step`: cosine to 0 or ×0.1 at each milestone, per step or per epoch."""
    epoch = step // steps_per_epoch
    if r["milestones"]:
        return base * 0.1 ** sum(epoch >= m for m in r["milestones"])
    if r["per"] == "epoch":
        return optim.cosine(epoch, r["epochs"], base)
    return optim.cosine(step, r["epochs"] * steps_per_epoch, base)


def tf_bounding_box_crop(x, g, size):
    """SimCLR's linear-evaluation crop (data_util.py crop_and_resize, then the last clip): TF's
    sample_distorted_bounding_box (area (0.08, 1), aspect (3/4, 4/3) uniform, 10% covered, 100 attempts, else the
    whole image) and TF1's resize_bicubic."""
    top, left, h, w = tf_image.sample_distorted_bounding_box(g, len(x), *x.shape[-2:], device=x.device)
    return tf_image.resize_bicubic(x, top, left, h, w, (size, size), half_pixel_centers=False).clamp(0, 1)


def clamped_crop(x, g, size):
    """BYOL's linear-evaluation crop (dataset.py _decode_and_random_crop, resize, clip): one draw, the sides clamped
    to the image, then TF2's bicubic resize."""
    top, left, h, w = tf_image.random_crop_clamped(g, len(x), *x.shape[-2:], device=x.device)
    return tf_image.resize_bicubic(x, top, left, h, w, (size, size), half_pixel_centers=True).clamp(0, 1)


def train_crop(r, size):
    """The recipe's training crop, as transforms before the flip."""
    if r["crop"] == "torchvision":  # scale (0.08, 1), aspect (3/4, 4/3): RandomResizedCrop's defaults, as those codes
        return [v2.RandomResizedCrop(size, interpolation=getattr(v2.InterpolationMode, r["interpolation"].upper()),
                                     antialias=True)]
    crop = {"tf_bounding_box": tf_bounding_box_crop, "clamped": clamped_crop}[r["crop"]]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), tf_image.Batched(partial(crop, size=size))]


def standard(backbone, sets, r, args, device, out, gpu):
    """(test logits, test labels) of a linear layer trained on augmented crops; resumes from the checkpoint.
    Returns None when --max-steps stopped it before the end."""
    train_set, test_set = sets
    augment = v2.Compose([*train_crop(r, args.image_size), v2.RandomHorizontalFlip(), data.normalize(args.dataset)])
    loader = data.train_loader(Augmented(train_set.base, augment), r["batch_size"], args.workers, args.seed, device)
    steps_per_epoch = loader.sampler.num_samples // loader.batch_size
    total = r["epochs"] * steps_per_epoch
    stop = min(args.max_steps or total, total)
    classes = len(getattr(train_set.base, "classes", None) or range(train_set.base.num_classes))  # FakeData
    fc = nn.Linear(backbone.dim, classes)
    if r["head"] != "torch":
        nn.init.zeros_(fc.bias)
        nn.init.zeros_(fc.weight) if r["head"] == "zero" else nn.init.normal_(fc.weight, std=0.01)
    fc = fc.to(device)
    opt = torch.optim.SGD(fc.parameters(), lr=0.0, momentum=0.9, nesterov=r["nesterov"], weight_decay=r["wd"])
    base = r["lr"] * r["batch_size"] / 256 if r["scale"] else r["lr"]
    path, step = out / "linear-standard.pt", 0
    if args.resume and path.exists():
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
            saved = ckpt["settings"]
        except Exception as e:
            dist.fail(f"cannot read {path} ({type(e).__name__}); move it away or pass --no-resume")
        if saved != settings(r, args):
            changed = sorted(k for k in {**saved, **settings(r, args)} if saved.get(k) != settings(r, args).get(k))
            dist.fail(f"{path} was trained with other settings ({', '.join(changed)}); pass the same ones, "
                      f"another --out, or --no-resume")
        fc.load_state_dict(ckpt["fc"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if dist.is_main():
            print(f"resumed from {path} at step {step}", flush=True)
    model = dist.wrap(fc, device)  # DDP averages the gradients over ranks: the global batch's mean loss

    def save():
        if dist.is_main():
            checkpoint.save_atomic({"settings": settings(r, args), "step": step, "fc": fc.state_dict(),
                               "optimizer": opt.state_dict()}, path)
        dist.barrier()

    for epoch in range(step // steps_per_epoch, r["epochs"]):
        if step >= stop:
            break
        loader.sampler.set_epoch(epoch, skip=(step - epoch * steps_per_epoch) * loader.batch_size)
        for x, y in loader:
            optim.set_lr(opt, lr_at(r, base, step, steps_per_epoch))
            with torch.no_grad(), gpu.autocast():  # the GPU path's layout and bf16 autocast, as the kNN monitor
                features = backbone(gpu.inputs(x)).float()  # eval mode: BN's running statistics
            loss = F.cross_entropy(model(features), y.to(device))
            opt.zero_grad()
            loss.backward()
            if r["optimizer"] == "lars":
                larc_(fc.parameters())
            opt.step()
            step += 1
            if step == stop:
                break
        save()
        if dist.is_main():
            print(f"epoch {epoch + 1}/{r['epochs']} step {step}/{total} loss {loss.item():.4f}", flush=True)
    if step < total:
        return None
    logits, labels = [], []
    with torch.no_grad():
        for x, y in data.eval_loader(test_set, 256, args.workers, device):
            with gpu.autocast():
                f = backbone(gpu.inputs(x)).float()
            logits.append(fc(f))
            labels.append(y.to(device))
    return in_order(torch.cat(logits)), in_order(torch.cat(labels))


def settings(r, args):
    """What must not change across a resume."""
    return {**r, "backbone": str(Path(args.backbone).resolve()), "dataset": args.dataset,
            "image_size": args.image_size, "seed": args.seed}


def topk(logits, labels):
    """(top-1, top-5) fractions; top-5 is top-k over all classes when there are fewer than 5."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (top[:, 0] == labels).float().mean().item(), (top == labels[:, None]).any(1).float().mean().item()


def main(args):
    device = dist.setup(args.device)
    gpu = GpuPath(device)  # channels_last and bf16 autocast for the frozen backbone on CUDA (common.device)
    torch.manual_seed(args.seed)
    backbone, config = evaluate.load_backbone(args.backbone, device)
    backbone = gpu.model(backbone)
    args.image_size = args.image_size or config.get("image_size") or cli.DATASET_DEFAULTS[args.dataset]["image_size"]
    r = recipe(args, config)
    out = Path(args.out or Path(args.backbone).parent)
    if dist.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            dist.fail(f"cannot write to {out} ({e.strerror}); pass a writable --out")
    dist.barrier()
    t = data.eval_transform(args.dataset, args.image_size, r.get("interpolation", "bilinear"))  # as the recipe resizes
    sets = [data.Transformed(data.dataset(args.dataset, args.data_dir, split, args.image_size), t)
            for split in ("train", "test")]
    try:
        result = fast(backbone, sets, r, args, device, gpu) if args.protocol == "fast" else \
            standard(backbone, sets, r, args, device, out, gpu)
    except data.DataError as e:
        dist.fail(data.DataError.line(e))
    if result is None:
        if dist.is_main():
            print(f"stopped at --max-steps {args.max_steps}; the same command resumes from {out / 'linear-standard.pt'}")
        return None
    top1, top5 = topk(*result)
    entry = {"top1": top1, "top5": top5, "test_images": len(result[1]), "method": config.get("method"),
             **settings(r, args)}
    if dist.is_main():
        print(f"linear top-1 {100 * top1:.2f}% top-5 {100 * top5:.2f}% (protocol {r['protocol']}: {r['name']}; "
              f"{args.dataset}, {len(result[1])} test images; backbone {args.backbone})", flush=True)
        evaluate.record(out / "linear.json", r["protocol"], entry)
    return entry


if __name__ == "__main__":
    main(cli.parse(Args))
    dist.cleanup()
