"""Weighted kNN monitor (Wu et al. 2018): k = 200 neighbours, weights exp(cos/t), t = 0.1; and the effective rank
of the features (RankMe, Garrido et al. 2023), the monitor of dimensional collapse.

Memory: the training set without augmentation; queries: the test set; both sharded over ranks."""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from common import data, dist, resnet


@torch.no_grad()
def features(backbone, loader, gpu):
    """L2-normalised backbone features and labels of this rank's shard, on `gpu` (a common.device.GpuPath:
    its layout and autocast). (n, dim), (n,)"""
    feats, labels = [], []
    for x, y in loader:
        with gpu.autocast():
            f = backbone(gpu.inputs(x))
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(y.to(gpu.device))
    return torch.cat(feats), torch.cat(labels)


def gather_uneven(x):
    """`dist.gather` for shards whose first dimensions differ."""
    if dist.world() == 1:
        return x
    sizes = dist.gather(torch.tensor([len(x)], device=x.device)).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = dist.gather(padded).chunk(dist.world())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


@torch.no_grad()
def knn_predict(queries, memory, memory_labels, k=200, t=0.1, num_classes=None, chunk=512):
    """Class of each query by the votes of its k most similar memory features, weighted exp(sim/t)."""
    num_classes = num_classes or int(memory_labels.max()) + 1
    k = min(k, len(memory))
    preds = []
    for q in queries.split(chunk):
        sim, idx = (q @ memory.T).topk(k, dim=1)  # (b, k) cosine similarities of the nearest
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, memory_labels[idx], (sim / t).exp())  # (b, C)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


@torch.no_grad()
def knn(backbone, memory_loader, test_loader, gpu, k=200, t=0.1):
    """kNN top-1 accuracy (a fraction) of `backbone` over the whole test set, the same on all ranks."""
    training = backbone.training
    backbone.eval()
    memory, memory_labels = features(backbone, memory_loader, gpu)
    memory, memory_labels = gather_uneven(memory), gather_uneven(memory_labels)
    queries, labels = features(backbone, test_loader, gpu)
    num_classes = int(memory_labels.max()) + 1
    correct = (knn_predict(queries, memory, memory_labels, k, t, num_classes) == labels).sum()
    counts = torch.stack([correct, torch.tensor(len(labels), device=gpu.device)]).double()
    counts = dist.all_reduce_mean(counts) * dist.world()
    backbone.train(training)
    return (counts[0] / counts[1]).item()


def spectrum(f):
    """The singular values, largest first, of the features `f` (n, d), each row L2-normalised, then centred over
    the rows (float64): how much of the features' spread lies along each direction."""
    z = F.normalize(f.double(), dim=1)
    sigma = torch.linalg.svdvals(z - z.mean(0))
    # differs from RankMe's paper, which takes the features as they are: centred, the rows of a collapsed embedding
    # leave only their float32 rounding (about 1e-7 each), which RankMe, blind to scale, would count as spread; so
    # singular values under sqrt(n) * 1e-6 (rows that agree to 1e-6) count as 0
    return torch.where(sigma < len(z) ** 0.5 * 1e-6, 0.0, sigma)


def rankme(sigma, eps=1e-7):
    """The effective rank RankMe (Garrido et al., ICML 2023, Eq. 1) of the singular values `sigma`: exp of the
    entropy of p_k = σ_k / ‖σ‖₁ + ε (ε = 1e-7, the paper's). 1 when the features vary along one direction (or
    none), d when they spread evenly over all d."""
    p = sigma.double() / sigma.double().sum().clamp_min(1e-300) + eps  # (a collapsed embedding: σ = 0, p = ε)
    return torch.exp(-(p * p.log()).sum()).item()


@torch.no_grad()
def embed(backbone, loader, gpu, head=None):
    """The backbone's features of this rank's shard, as they leave it (not normalised), the labels, and with
    `head` (a projector) head(features), else None; in eval mode, the modes restored after. (n, dim), (n,), (n, d)"""
    modules = [m for m in (backbone, head) if m is not None]
    training = [m.training for m in modules]
    for m in modules:
        m.eval()
    f, y, z = [], [], []
    for x, labels in loader:
        with gpu.autocast():
            h = backbone(gpu.inputs(x))
            z += [head(h).float()] if head is not None else []
        f.append(h.float())
        y.append(labels.to(gpu.device))
    for m, mode in zip(modules, training):
        m.train(mode)
    return torch.cat(f), torch.cat(y), torch.cat(z) if head is not None else None


HEADS = ("projector", "expander")  # the module whose output the loss sees, by its paper's name (VICReg: expander)


def head(model):
    """The model's projector (or expander), whose output the loss sees; None where it has none (MoCo)."""
    return next((getattr(model, name) for name in HEADS if hasattr(model, name)), None)


def ranks(backbone, loader, gpu, head=None):
    """{"rank": RankMe of the backbone's features of `loader`'s images (all ranks' shards), and with `head` (the
    projector whose output the loss sees) "rank_z": of head(features)}, in eval mode."""
    f, _, z = embed(backbone, loader, gpu, head)
    out = {"rank": rankme(spectrum(gather_uneven(f)))}
    if head is not None:
        out["rank_z"] = rankme(spectrum(gather_uneven(z)))
    return out


def eval_sets(dataset, root, image_size):
    """The training and test sets without augmentation (resized, centre-cropped), as the monitor reads them."""
    t = data.eval_transform(dataset, image_size)
    return [data.Transformed(data.dataset(dataset, root, split, image_size), t) for split in ("train", "test")]


def load_backbone(path, device):
    """The backbone of a run's backbone.pt, frozen and in eval mode, and the run's config.json ({} when there is
    none). A missing or foreign file ends with one line. The file is read with weights_only=True: tensors only."""
    path = Path(path)
    if not path.is_file():
        dist.fail(f"no backbone at {path}; pass --backbone RUN_DIR/backbone.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        dist.fail(f"{path} is not a backbone.pt ({type(e).__name__}: only tensors are read); pass the backbone.pt "
                  f"of a run")
    if isinstance(state, dict) and "model" in state and "step" in state:
        dist.fail(f"{path} is a training checkpoint, not a backbone; pass the backbone.pt beside it")
    try:
        backbone = resnet.from_state_dict(state)
    except Exception as e:
        dist.fail(f"{path} is not the state_dict of a ResNet backbone ({type(e).__name__}); pass the backbone.pt "
                  f"of a run")
    for p in backbone.parameters():
        p.requires_grad_(False)
    try:
        config = json.loads((path.parent / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return backbone.to(device).eval(), config if isinstance(config, dict) else {}


def record(path, key, entry):
    """Add `entry` under `key` to the JSON results file at `path` (one entry per protocol), on rank 0."""
    if not dist.is_main():
        return
    path = Path(path)
    try:
        results = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # not JSON: start over
        results = {}
    results = results if isinstance(results, dict) else {}
    results[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
    except OSError as e:
        dist.fail(f"cannot write {path} ({e.strerror}); pass a writable --out")
