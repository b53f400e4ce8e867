"""python -m common.bench: one method, a few steps on CPU, its table and its JSON; bad flags."""
import json

import pytest

from common import bench

ARGV = ["--device", "cpu", "--methods", "simsiam", "--steps", "2", "--warmup", "1", "--image-size", "8",
        "--batch-size", "8", "--workers", "0"]
SMALL_HEADS = ["--", "--dim", "64", "--pred-dim", "16"]  # flags after -- go to the method's command line


def test_bench_measures_every_phase_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench.main([*ARGV, "--out", str(out), *SMALL_HEADS])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["command"].startswith("python -m common.bench --device cpu") and report["torch"]
    assert report["settings"]["batch_size"] == 8 and report["settings"]["methods"] == ["simsiam"]
    (row,) = report["results"]
    assert row["method"] == "simsiam" and row["optimizer"] == "SGD"
    assert 11.1 < row["params_m"] < 11.6  # ResNet-18 (11.2 M), the 512-wide projector hidden layer, small heads
    model, overhead = row["model"], row["overhead"]
    assert model["img_per_s"] > 0 and model["peak_mem_mib"] > 0
    assert model["img_per_s"] == pytest.approx(8 * 1000 / model["step_ms"])
    assert overhead["step_ms"] > 0 and overhead["bare_backbone_ms"] > 0
    assert overhead["overhead_pct"] == pytest.approx(100 * (overhead["step_ms"] / overhead["bare_backbone_ms"] - 1))
    assert row["loader"]["img_per_s"] > 0 and row["end_to_end"]["img_per_s"] > 0
    printed = capsys.readouterr().out
    assert "| simsiam " in printed and "end-to-end img/s" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize("argv,words", [(["--methods", "nosuch"], "invalid choice"),
                                        (["--steps", "0"], "--steps must be at least 1")])
def test_bench_bad_flags_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_loader_comparison_times_each_pipeline_against_the_reference(tmp_path, capsys):
    """--loaders, tiny: the methods' own pipelines (caught from their main()) and the reference at both sizes,
    from an archive laid out as CIFAR-10's JPEG files; no timing is asserted, only what is measured and shown."""
    import io
    import tarfile

    from PIL import Image
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(3):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(buffer, "JPEG")
            member = tarfile.TarInfo(f"cifar10/train/cat/{i:04d}.jpg")
            member.size = len(buffer.getvalue())
            tar.addfile(member, io.BytesIO(buffer.getvalue()))
    out = tmp_path / "loaders.json"
    report = bench.main(["--loaders", "--rounds", "1", "--samples", "2", "--methods", "simclr", "mocov2",
                         "--cifar10-jpeg", str(archive), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["data"].startswith("the first 2 CIFAR-10 training JPEGs of cifar10-jpeg.tar.gz")
    rows = {(r["size"], r["pipeline"]): r for r in report["results"]}
    assert set(rows) == {(s, p) for s in (32, 224) for p in ("reference", "simclr", "mocov2")}
    for (size, name), row in rows.items():
        assert row["samples_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["samples_per_s"] / rows[size, "reference"]["samples_per_s"])
    printed = capsys.readouterr().out
    assert "| 224 | simclr" in printed and "vs reference" in printed and f"wrote {out}" in printed


def test_loader_comparison_takes_each_methods_own_views():
    """The pipelines compared are the ones main() builds: BYOL's two views differ (blur 1.0 / 0.1 at 224 px),
    SimCLR's are its TF operations."""
    from common import tf_image
    t1, t2 = bench.method_views("byol", "imagenet")
    assert t1 is not t2 and any(isinstance(t, tf_image.Batched) for t in t1.transforms)
    t1, _ = bench.method_views("simsiam", "cifar10")
    assert not any(isinstance(t, tf_image.Batched) for t in t1.transforms)


def test_loader_comparison_bad_archive_is_one_line(tmp_path, capsys):
    (tmp_path / "x.tar.gz").write_text("not an archive")
    with pytest.raises(SystemExit) as e:
        bench.main(["--loaders", "--sizes", "32", "--samples", "1", "--rounds", "1", "--methods", "simsiam",
                    "--cifar10-jpeg", str(tmp_path / "x.tar.gz"), "--out", str(tmp_path / "o.json")])
    assert str(e.value).startswith("error: cannot read") and len(str(e.value).splitlines()) == 1
