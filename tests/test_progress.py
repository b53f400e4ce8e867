"""The progress lines and metrics.jsonl rows: when they come (after the first step, then every --log-every
steps or 30 seconds, whichever first), the share of each interval spent waiting for the loader, and the
loader's default worker count. Through the real command line and Run loop, on a fake clock: no timing."""
import os

import pytest

import simsiam
from common import cli, data, metrics
from conftest import metrics as rows_of
from conftest import run_main

TINY = ["--image-size", "8", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--dim", "32",
        "--pred-dim", "8", "--knn-every", "0", "--no-amp", "--dataset", "synthetic"]


class FakeClock:
    """metrics.clock, moved on only by the test: `load` seconds per sample the loader prepares (inside the loop's
    wait for the next batch), `step` seconds per training step (at the step's Metrics.record)."""

    def __init__(self, monkeypatch, load, step):
        self.now = 0.0
        monkeypatch.setattr(metrics, "clock", lambda: self.now)
        get = data.Views.__getitem__

        def slow_sample(views, key):
            self.now += load
            return get(views, key)
        monkeypatch.setattr(data.Views, "__getitem__", slow_sample)
        record = metrics.Metrics.record

        def slow_step(m, *args, **kwargs):
            self.now += step
            return record(m, *args, **kwargs)
        monkeypatch.setattr(metrics.Metrics, "record", slow_step)


def run(tmp_path, *argv):
    out = tmp_path / "run"
    run_main(simsiam, *TINY, *argv, "--out", out)
    return [r for r in rows_of(out) if "loss" in r]


def test_data_share_is_the_loaders_part_of_each_interval(tmp_path, monkeypatch, capsys):
    """A loader that takes 1 s per sample (4 s a batch) and a step of 12 s: a quarter of the time is the wait
    (16 s a step: a line after every step, the 30 s rule)."""
    FakeClock(monkeypatch, load=1.0, step=12.0)
    rows = run(tmp_path, "--max-steps", "4", "--log-every", "2")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["data_share"] == pytest.approx(0.25)
        assert r["img_per_s"] == pytest.approx(4 / 16)  # 4 images per 16 s step
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ") and "img/s" in line]
    assert len(lines) == 4 and all("| data 25% |" in line for line in lines)


def test_a_loader_bound_run_shows_a_data_share_near_one(tmp_path, monkeypatch):
    FakeClock(monkeypatch, load=5.0, step=0.01)
    rows = run(tmp_path, "--max-steps", "3", "--log-every", "1")
    assert all(r["data_share"] > 0.99 for r in rows)


def test_the_first_line_comes_after_the_first_step_then_every_log_every_steps(tmp_path, monkeypatch):
    FakeClock(monkeypatch, load=0.0, step=0.5)  # 3 steps in 1.5 s: --log-every decides
    rows = run(tmp_path, "--max-steps", "8", "--log-every", "3")
    assert [r["step"] for r in rows] == [1, 3, 6, 8]


def test_slow_steps_give_a_line_every_30_seconds(tmp_path, monkeypatch):
    """10 s a step with --log-every 50: a line after step 1, then every 3 steps (30 s at that pace), and the last."""
    FakeClock(monkeypatch, load=0.0, step=10.0)
    rows = run(tmp_path, "--max-steps", "8", "--log-every", "50")
    assert [r["step"] for r in rows] == [1, 4, 7, 8]


@pytest.mark.parametrize("cores,ranks,argv,expected", [
    (16, "2", ["--dataset", "cifar10"], 4),  # small images: at most 4, as before
    (16, "2", ["--dataset", "imagenet"], 8),  # full-size: every core of the rank's share
    (16, "2", ["--dataset", "folder", "--image-size", "96"], 8),
    (2, "1", ["--dataset", "imagenet"], 2),  # the 2-core machine: unchanged
    (2, "1", ["--dataset", "cifar10"], 2),
    (16, "1", ["--dataset", "imagenet", "--workers", "3"], 3),  # given: kept
    (3, "4", ["--dataset", "imagenet"], 1),  # at least one
])
def test_default_workers_follow_the_cores_per_rank_and_the_image_size(monkeypatch, cores, ranks, argv, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    assert cli.parse(simsiam.Args, simsiam.PRESETS, [*argv, "--data-dir", "unused"]).workers == expected
