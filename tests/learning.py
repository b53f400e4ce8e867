"""Learning checks on real images: a per-class subset of the real CIFAR-10 (the JPEG copy in
../shared/data), ResNet-18 with the CIFAR stem, 16 px by default, on the CPU by default.

* The short check (tests/test_learning.py, in the suite): a minute of training on real images makes
  the loss fall by a method-specific amount without collapse and leaves kNN top-1 well above chance.
  It catches a broken pipeline, a wrong sign or a frozen model; it does not show that the
  representation got better.
* The kNN check (this command): a run must lift kNN top-1 by GAIN points above a control, the same
  run with --lr 0, whose weights stay at their initialisation while BatchNorm's running statistics
  adapt to the data, so that the gain comes from learning and not from BN statistics:

      python -m tests.learning simsiam                                   # the CPU configuration
      python -m tests.learning simsiam --device cuda --image-size 32 --train-per-class 5000 --epochs 30

  With the CPU configuration (10,000 images at 16 px, 780 steps of 128, about 20 minutes on 2 cores)
  SimCLR (28.9% -> 41.6%) and VICReg (29.6% -> 38.9%) learn; Barlow Twins (+3.7) passes the 3-point bar and
  BYOL (+2.6) misses it, both within the check's own noise (the control reads 25.5% and 26.9% at seeds 0
  and 1, on 1,000 test images); SimSiam stays within about 2 points of its control and UniGrad below
  it, which shows nothing either way: non-contrastive methods start slowly, and random convolutional
  features are a strong kNN baseline on small images (README, "What the learning checks show"). The
  GPU device check's 10-epoch runs decide; run SimSiam on a GPU with the second line.

Each method adds its configurations to CONFIGS.
"""
import argparse
import collections
import importlib
import json
import tarfile
import tempfile
from pathlib import Path

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
COMMON = ["--dataset", "folder", "--image-size", "16", "--workers", "2", "--knn-k", "20", "--log-every", "1",
          "--knn-every", "0", "--device", "cpu", "--seed", "0"]

CONFIGS = {
    "simsiam": {
        "short": ["--epochs", "1", "--batch-size", "64", "--lr", "0.2", "--dim", "512", "--pred-dim", "128"],
        "loss_drop": 0.06,  # the loss starts near 0 (random p, z): measured 0.001 -> -0.121 in one epoch, 31 steps
        # (-0.224 in two, which the suite's time no longer allows); half of that is asked. The same -0.121 with
        # AVX-512, AVX2 and no vector extensions (README: the suite under three kernel settings)
        "knn": ["--epochs", "10", "--batch-size", "128", "--lr", "0.1", "--dim", "512", "--pred-dim", "128"],
        "gain": 3.0,
    },
    "simclr": {
        "short": ["--epochs", "1", "--batch-size", "64", "--warmup-epochs", "0", "--dim", "128"],
        "loss_drop": 0.16,  # measured 9.409 -> 9.172 in one epoch, 31 steps (the official scale 2 × L;
        # 2 log 127 ≈ 9.69 at random) with the v1 code's augmentation; 9.174 with AVX2 kernels, 9.177 without
        # vector extensions: drops of 0.232-0.237, of which about two thirds is asked. (With torchvision's colour
        # operations and crop it fell further, 9.16 -> 8.82: the official distortion is about twice as strong.)
        "knn": ["--epochs", "10", "--batch-size", "128", "--warmup-epochs", "1", "--dim", "128"],
        "gain": 3.0,
    },
    # The kNN check only (no short check in the suite, to keep it under 10 minutes)
    "byol": {"knn": ["--epochs", "10", "--batch-size", "128", "--warmup-epochs", "1", "--hidden-dim", "1024",
                     "--dim", "128"], "gain": 3.0},
    "barlow": {"knn": ["--epochs", "10", "--batch-size", "128", "--warmup-epochs", "1", "--dim", "512"], "gain": 3.0},
    # the paper's head and λ (d 2048, λ 100); other settings measured (README): --dim 512 at λ 100 and 25
    "unigrad": {"knn": ["--epochs", "10", "--batch-size", "128", "--warmup-epochs", "1", "--lr", "0.2",
                        "--m-base", "0.99"], "gain": 3.0},
    "vicreg": {"knn": ["--epochs", "10", "--batch-size", "128", "--warmup-epochs", "1", "--dim", "512"], "gain": 3.0},
    "mocov1": {"knn": ["--epochs", "10", "--batch-size", "128", "--K", "4096"], "gain": 3.0},
    "mocov2": {"knn": ["--epochs", "10", "--batch-size", "128", "--K", "4096"], "gain": 3.0},
}
SHORT_DATA = {"train": 200, "test": 50}  # images per class
KNN_DATA = {"train": 1000, "test": 100}


def extract_subset(dest, per_class, tarball=TARBALL):
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


def train(method, flags, data_root, out):
    """Run the method's real main() in this process; return its metrics rows."""
    from common import cli
    module = importlib.import_module(method)
    argv = [*COMMON, "--data-dir", str(data_root), *flags, "--out", str(out)]
    module.main(cli.parse(module.Args, getattr(module, "PRESETS", {}), argv))
    return [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def knn_top1(rows):
    return 100 * [r for r in rows if "knn_top1" in r][-1]["knn_top1"]


def knn_check(method, data_root, workdir, extra=()):
    """(control kNN top-1, trained kNN top-1, required gain), in points."""
    config = CONFIGS[method]
    control = knn_top1(train(method, [*config["knn"], *extra, "--lr", "0", "--max-steps", "30"], data_root,
                             Path(workdir) / "control"))
    trained = knn_top1(train(method, [*config["knn"], *extra], data_root, Path(workdir) / "trained"))
    return control, trained, config["gain"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="+", choices=sorted(CONFIGS))
    parser.add_argument("--tarball", default=str(TARBALL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=KNN_DATA["train"])
    parser.add_argument("--epochs", type=int, help="override the configuration's epochs")
    a = parser.parse_args()
    extra = ["--device", a.device, "--image-size", str(a.image_size), *(["--epochs", str(a.epochs)] if a.epochs else [])]
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_subset(tmp, {**KNN_DATA, "train": a.train_per_class}, a.tarball)
        for m in a.methods:
            control, trained, gain = knn_check(m, root, Path(tmp) / m, extra)
            verdict = "ok" if trained - control >= gain else "FAILED"
            print(f"{m}: kNN top-1 {control:.1f}% with the weights at init, {trained:.1f}% trained "
                  f"(+{trained - control:.1f} points, {gain:.0f} needed): {verdict}", flush=True)
