"""Exact resume, and checkpoints that survive a kill at any moment."""
import importlib
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SMALL, env, run_main

ARGS = ["--epochs", "3", "--knn-every", "-1", *SMALL]


def state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("method", ["simsiam", "simclr", "mocov1", "byol", "barlow", "vicreg", "unigrad"])
def test_interrupted_and_resumed_run_ends_with_the_weights_of_a_straight_run(method, image_folder, tmp_path):
    module = importlib.import_module(method)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["--K", "16"] if method == "mocov1" else []  # the queue and its pointer resume too
    run_main(module, "--dataset", "folder", "--data-dir", image_folder, *ARGS, *extra, "--max-steps", "7", "--out",
             straight)
    # Interrupted mid-epoch (3 steps per epoch), with other loader workers: per-sample seeds make
    # the views the same whatever the number of workers.
    run_main(module, "--dataset", "folder", "--data-dir", image_folder, *ARGS, *extra, "--max-steps", "4", "--out",
             resumed, "--workers", "2")
    assert state(resumed)["step"] == 4
    torch.manual_seed(12345)  # whatever the process did in between does not matter
    run_main(module, "--dataset", "folder", "--data-dir", image_folder, *ARGS, *extra, "--max-steps", "7", "--out",
             resumed)
    a, b = state(straight), state(resumed)
    assert a["step"] == b["step"] == 7 and a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():  # momentum buffers (SGD) or μ (LARS)
        assert v.keys() == b["optimizer"]["state"][k].keys()
        assert all(torch.equal(torch.as_tensor(t), torch.as_tensor(b["optimizer"]["state"][k][n])) for n, t in v.items())
    sa = torch.load(straight / "backbone.pt", weights_only=True)
    sb = torch.load(resumed / "backbone.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [r for r in (resumed / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert len(steps) == 7  # one row per step, none repeated by the resume
    starts = json.loads((resumed / "config.json").read_text())["starts"]  # the report's wall time adds the parts
    assert len(starts) == 2 and starts[0] < starts[1] and len(json.loads((straight / "config.json").read_text())["starts"]) == 1


WRITER = """
import sys, torch
from common.checkpoint import save_atomic
version = 0
while True:
    version += 1
    save_atomic({"version": version, "weights": torch.full((8_000_000,), float(version))}, sys.argv[1])
"""


def test_a_kill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, env=env())
    killed_mid_write = False
    try:
        deadline = time.time() + 120
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        for _ in range(20):  # kill at a random moment, until one kill lands inside a write
            time.sleep(random.uniform(0.0, 0.3))
            if (tmp_path / ".checkpoint.pt.tmp").exists():
                killed_mid_write = True
                break
    finally:
        p.kill()
        p.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["version"] >= 1 and torch.all(ckpt["weights"] == ckpt["version"])
    assert killed_mid_write  # the temporary file was being written when the process died


def test_a_write_that_dies_inside_run_save_leaves_the_last_checkpoint(monkeypatch, image_folder, tmp_path):
    """Run.save through the real loop: the second checkpoint's write dies half-way (part of a file
    written, then an error, as a kill or a full disk leaves it). checkpoint.pt is still the first
    epoch's whole checkpoint: the real save writes elsewhere and renames (save_atomic); a plain
    torch.save onto checkpoint.pt would have left the partial file in its place."""
    import contextlib
    import os
    import simsiam
    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) <= 2:  # the first epoch end (step 3): checkpoint.pt and backbone.pt
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as out:
            out.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(SystemExit, match="No space left on device"):  # one line (tests/test_reliability.py)
        run_main(simsiam, "--dataset", "folder", "--data-dir", image_folder, *SMALL, "--image-size", "8",
                 "--epochs", "2", "--max-steps", "4", "--knn-every", "-1", "--out", tmp_path)
    assert len(calls) == 3  # the write of the second checkpoint (step 4, the last) died
    try:
        ckpt = state(tmp_path)
    except Exception as e:
        pytest.fail(f"checkpoint.pt no longer loads after the failed write ({type(e).__name__}: {e})")
    assert (ckpt["step"], ckpt["epoch"]) == (3, 1)


def test_ctrl_c_ends_with_one_line_and_a_whole_checkpoint(image_folder, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "simsiam.py", "--dataset", "folder", "--data-dir", str(image_folder), "--epochs", "1000",
            *SMALL, "--knn-every", "-1", "--out", str(out)]
    p = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:  # the first epoch end (3 steps of 8)
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "interrupted at step" in err and "resumes from" in err, err
    step = state(out)["step"]
    assert step >= 3 and step % 3 == 0  # an epoch end: the last whole checkpoint


def _sigint_inside_step(module, monkeypatch, at_call, times):
    """Wrap module.build_model so that the model's forward sends itself Ctrl-C `times` times at
    forward call `at_call`: the signal lands in the middle of the method's step."""
    import os
    import threading
    assert threading.current_thread() is threading.main_thread()  # Python delivers signals there only
    build, calls = module.build_model, []

    def build_model(args):
        model = build(args)

        def hook(*_):
            calls.append(1)
            if len(calls) == at_call:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)  # the handler runs at the next bytecode boundary
                torch.ones(1).sum()  # ...of the step, which is still under way
        model.register_forward_pre_hook(hook)
        return model
    monkeypatch.setattr(module, "build_model", build_model)
    return calls


def test_ctrl_c_inside_a_step_ends_after_that_step_with_one_line(monkeypatch, image_folder, tmp_path):
    import simsiam
    calls = _sigint_inside_step(simsiam, monkeypatch, at_call=5, times=1)  # epoch 1 ends at step 3
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        run_main(simsiam, "--dataset", "folder", "--data-dir", image_folder, *ARGS, "--out", tmp_path)
    assert str(e.value) == f"interrupted at step 5; the same command resumes from {tmp_path / 'checkpoint.pt'} " \
                          "(step 3)"
    assert len(calls) == 5 and state(tmp_path)["step"] == 3  # the step under way finished; nothing was saved after
    assert signal.getsignal(signal.SIGINT) is previous  # the run's handler is gone with the run


def test_a_second_ctrl_c_ends_the_step_at_once(monkeypatch, image_folder, tmp_path):
    import simsiam
    _sigint_inside_step(simsiam, monkeypatch, at_call=2, times=2)
    with pytest.raises(SystemExit) as e:
        run_main(simsiam, "--dataset", "folder", "--data-dir", image_folder, *ARGS, "--out", tmp_path)
    assert str(e.value) == "interrupted at step 1; no checkpoint was written yet"
    assert not (tmp_path / "checkpoint.pt").exists()


def test_ctrl_c_before_training_ends_with_one_line(monkeypatch):
    import os
    import simsiam
    from common import cli
    previous = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "argv", ["simsiam.py", "--dataset", "synthetic"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # parse() sets its own; undone after the test
    try:
        cli.parse(simsiam.Args, simsiam.PRESETS)  # the real command line: the handler is installed
        with pytest.raises(SystemExit, match="^interrupted before training; no checkpoint was changed$"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_moco_resumes_mid_queue_with_its_queue_and_pointer(image_folder, tmp_path):
    """MoCo v2 with K = 24 and batches of 8, interrupted after step 1: the pointer then sits mid-queue (8, where
    the test above, at K 16 and step 4, finds it back at 0). Resumed, the run ends with the weights, queue and
    pointer of a straight run; a checkpoint without the queue or its pointer (buffers left out of the
    state_dict) starts the resumed run from a fresh queue or from slot 0, and fails here."""
    import mocov2
    argv = ["--dataset", "folder", "--data-dir", image_folder, *ARGS, "--image-size", "8", "--K", "24", "--dim", "16",
            "--bn-splits", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main(mocov2, *argv, "--max-steps", "3", "--out", straight)
    run_main(mocov2, *argv, "--max-steps", "1", "--out", resumed)
    pointer = state(resumed)["model"].get("queue_ptr")
    run_main(mocov2, *argv, "--max-steps", "3", "--out", resumed)
    a, b = state(straight)["model"], state(resumed)["model"]
    for k in a.keys() & b.keys():
        assert torch.equal(a[k], b[k]), k  # the queue, and the weights trained against it
    assert a.keys() == b.keys() and {"queue", "queue_ptr"} <= a.keys() and int(pointer) == 8
