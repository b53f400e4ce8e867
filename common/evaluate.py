"""Weighted kNN monitor (Wu et al. 2018): k = 200 neighbours, weights exp(cos/t), t = 0.1.

Memory: the training set without augmentation; queries: the test set; both sharded over ranks."""
import torch
import torch.nn.functional as F

from common import dist


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
