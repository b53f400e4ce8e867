"""The learning check on real images: a short CPU run must lift kNN top-1 well above the same network
whose weights never moved.

    python -m tests.learning simsiam            # prints the two numbers (about 2 minutes on 2 cores)

Data: a per-class subset of the real CIFAR-10 (JPEG copy in ../shared/data). The control is the same
command with --lr 0 for one epoch: the weights stay at their initialisation while BatchNorm's running
statistics adapt to the data, so any gain of the trained run over it comes from learning, not from
BN statistics. Each method adds its small configuration to CONFIGS.
"""
import argparse
import collections
import importlib
import json
import tarfile
import tempfile
from pathlib import Path

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = {"train": 200, "test": 50}
COMMON = ["--dataset", "folder", "--image-size", "16", "--workers", "2", "--knn-k", "20", "--log-every", "5",
          "--knn-every", "0", "--device", "cpu", "--seed", "0"]

# method -> (flags of the short run, minimum gain in kNN top-1 over the control, in points)
CONFIGS = {
    "simsiam": (["--epochs", "5", "--batch-size", "128", "--lr", "0.1", "--dim", "512", "--pred-dim", "128"], 5.0),
}


def extract_subset(dest, tarball=TARBALL, per_class=PER_CLASS):
    """The first `per_class[split]` images of each class, in ImageFolder layout; returns the root."""
    root = Path(dest) / "cifar10"
    if (root / ".complete").exists():
        return root
    counts = collections.Counter()
    with tarfile.open(tarball) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and counts[parts[1], parts[2]] < per_class[parts[1]]:
                counts[parts[1], parts[2]] += 1
                tar.extract(member, dest, filter="data")
    (root / ".complete").touch()
    return root


def knn_of(module, flags, out):
    from common import cli
    module.main(cli.parse(module.Args, getattr(module, "PRESETS", {}), [*map(str, flags), "--out", str(out)]))
    rows = [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return 100 * [r for r in rows if "knn_top1" in r][-1]["knn_top1"]


def check(method, data_root, workdir):
    """Return (control kNN top-1, trained kNN top-1, required gain), in points."""
    module = importlib.import_module(method)
    flags, gain = CONFIGS[method]
    base = [*COMMON, "--data-dir", data_root, *flags]
    control = knn_of(module, [*base, "--lr", "0", "--epochs", "1"], Path(workdir) / "control")
    trained = knn_of(module, base, Path(workdir) / "trained")
    return control, trained, gain


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="+", choices=sorted(CONFIGS))
    parser.add_argument("--tarball", default=str(TARBALL))
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_subset(tmp, a.tarball)
        for m in a.methods:
            control, trained, gain = check(m, root, Path(tmp) / m)
            verdict = "ok" if trained - control >= gain else "FAILED"
            print(f"{m}: kNN top-1 {control:.1f}% with the weights at init, {trained:.1f}% trained "
                  f"(+{trained - control:.1f} points, {gain:.0f} needed): {verdict}")
