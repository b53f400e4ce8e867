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
