"""Weighted kNN on any backbone.pt, offline: the training monitor's protocol (common/evaluate.py).

    python -m common.knn --backbone runs/simclr-cifar10/backbone.pt                 # k 200, t 0.1: the monitor
    python -m common.knn --backbone runs/simclr-cifar10/backbone.pt --k 20 --t 0.07 # solo-learn's setting
    torchrun --nproc-per-node 8 -m common.knn --backbone ... --dataset imagenet --data-dir /data/imagenet

Memory: the training set without augmentation; queries: the test set; cosine similarity of L2-normalised
backbone features in eval mode. OUT/knn.json (the backbone's directory by default) keeps one entry per
(k, t, dataset) with the protocol beside the number.
"""
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, dist, evaluate
from common.device import GpuPath


@dataclass
class Args:
    backbone: str = ""  # path of a backbone.pt written by a method's run
    dataset: typing.Literal[cli.DATASETS] = "cifar10"  # labelled dataset: memory from train, queries from test
    data_dir: str = "./data"  # dataset root, as for the method files
    image_size: int = 0  # input size (0: the run's --image-size from its config.json, else the dataset's)
    k: int = 200  # neighbours (the monitor's --knn-k)
    t: float = 0.1  # temperature of the weights exp(cos/t) (the monitor's --knn-t)
    out: str = ""  # where knn.json goes (default: the backbone's directory)
    workers: int = cli.default_workers()  # data loader processes per rank (4, or fewer on a machine with fewer cores)
    device: typing.Literal["auto", "cuda", "cpu"] = "auto"  # auto: cuda when available


def main(args):
    device = dist.setup(args.device)
    gpu = GpuPath(device)  # the monitor's layout and autocast on CUDA (common.device)
    backbone, config = evaluate.load_backbone(args.backbone, device)
    args.image_size = args.image_size or config.get("image_size") or cli.DATASET_DEFAULTS[args.dataset]["image_size"]
    memory, queries = [data.eval_loader(s, 256, args.workers, device)
                       for s in evaluate.eval_sets(args.dataset, args.data_dir, args.image_size)]
    try:
        top1 = evaluate.knn(gpu.model(backbone), memory, queries, gpu, args.k, args.t)
    except data.DataError as e:
        dist.fail(data.DataError.line(e))
    protocol = f"weighted kNN, k {args.k}, t {args.t}"
    entry = {"top1": top1, "protocol": protocol, "k": args.k, "t": args.t, "dataset": args.dataset,
             "image_size": args.image_size, "test_images": len(queries.dataset.dataset), "backbone": args.backbone,
             "method": config.get("method")}
    if dist.is_main():
        print(f"kNN top-1 {100 * top1:.2f}% ({protocol}; {args.dataset}, {entry['test_images']} test images; "
              f"backbone {args.backbone})", flush=True)
        evaluate.record(Path(args.out or Path(args.backbone).parent) / "knn.json",
                        f"{args.dataset} k={args.k} t={args.t}", entry)
    return entry


if __name__ == "__main__":
    main(cli.parse(Args))
    dist.cleanup()
