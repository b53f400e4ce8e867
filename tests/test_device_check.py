"""tests/device_check.py in its --tiny mode: the very code that runs on a GPU, on a tiny CIFAR-10 tarball."""
import json
import subprocess
import sys
import tarfile

from conftest import ROOT, env, write_image_folder

import device_check


def tiny_tarball(tmp_path):
    """cifar10/{train,test}/<class>/*.jpg, as ../shared/data/cifar10-jpeg.tar.gz, with 4 and 2 images per class."""
    write_image_folder(tmp_path / "src" / "cifar10", classes=10, per_class=4, size=32, ext="jpg")
    tarball = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10", arcname="cifar10")
    return tarball


def test_the_tiny_check_runs_every_item_with_plain_python(tmp_path):
    """`python -m tests.device_check --tiny` with pytest made unimportable: the GPU machine has no pytest."""
    tarball, out = tiny_tarball(tmp_path), tmp_path / "out"
    code = ("import runpy, sys; sys.modules['pytest'] = None; sys.argv = ['device_check', *sys.argv[1:]]; "
            "runpy.run_module('tests.device_check', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, "--tiny", "--data", str(tarball), "--out", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == ["logs.txt", "results.json", "results.md"]  # ≤ 8 files back
    r = json.loads((out / "results.json").read_text())
    assert r["errors"] == [] and r["skipped"] == [], r["errors"] or r["skipped"]
    methods = ["mocov1", "mocov2", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]
    assert list(r["speed"]) == methods and list(r["train"]) == ["simclr", "byol", "vicreg", "mocov1", "mocov2",
                                                                "simsiam", "barlow", "unigrad"]
    assert list(r["compiled"]) == ["simclr", "simsiam"]
    assert list(r["loader"]) == methods
    for row in r["loader"].values():
        assert row["cpu_samples_per_s"] > 0 and row["gpu_augment_samples_per_s"] > 0 and row["image_size"] == 16
    for row in [*r["speed"].values(), *r["compiled"].values()]:
        assert row["s_per_step"] > 0 and row["end_to_end_img_per_s"] > 0 and row["epoch_s"] > 0
        assert row["overhead_pct"] is not None and row["peak_mem_mib"] > 0
    for row in r["train"].values():
        assert 0 <= row["knn_top1"] <= 100 and row["wall_s"] > 0
    assert r["info"]["data"].startswith("20 training JPEGs") and r["info"]["torch"]
    md = (out / "results.md").read_text()
    assert "| simclr |" in md and "## Trained" in md and "## Speed with --compile" in md and "## Loader per GPU" in md
    logs = (out / "logs.txt").read_text()
    assert "=== speed mocov1" in logs and "--- vicreg metrics.jsonl ---" in logs and '"knn_top1"' in logs


def test_items_that_do_not_fit_the_budget_are_skipped_and_listed(tmp_path):
    out = tmp_path / "out"
    r = device_check.main(["--tiny", "--data", str(tiny_tarball(tmp_path)), "--out", str(out), "--budget", "0",
                           "--methods", "simclr", "mocov1"])
    assert r["speed"] == {} and r["train"] == {} and r["errors"] == []
    assert [s["item"] for s in r["skipped"]] == ["speed simclr", "speed mocov1", "train simclr", "compiled simclr",
                                                 "loader simclr", "loader mocov1", "train mocov1"]
    assert "## Skipped" in (out / "results.md").read_text()
