"""Runs that survive faults: a checkpoint cannot run code; a resume with a changed training flag is refused;
torchrun's elastic agent restarts a killed worker and the run resumes exactly; --save-every checkpoints inside
an epoch; all ranks agree on where they resume; a full disk keeps the last good checkpoint."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import simsiam
from conftest import ROOT, SMALL, elastic_argv, env, free_port, metrics, run_main
from test_cli import check_run
from test_resume import _sigint_inside_step, state

TINY = ["--epochs", "3", "--knn-every", "-1", *SMALL]  # 24 images of image_folder: 3 steps of 8 per epoch


def files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


def fails(*argv):
    with pytest.raises(SystemExit) as e:
        run_main(simsiam, *argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


class _Planted:
    """An object whose unpickling runs a shell command (pickle calls os.system with it)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_planted_checkpoint_runs_no_code_and_changes_nothing(image_folder, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "the-command-ran"
    out.mkdir()
    torch.save({"step": 3, "model": _Planted(f"touch {marker}")}, out / "checkpoint.pt")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 5, "loss": 0.5}\n')
    before = files(out)
    message = fails("--dataset", "folder", "--data-dir", image_folder, *TINY, "--out", out)
    assert message == (f"error: {out / 'checkpoint.pt'} is not a checkpoint of this project (it holds objects other "
                       f"than tensors and plain containers); nothing was read from it and nothing in {out} was "
                       f"changed: move it away, or pass another --out")
    assert not marker.exists() and files(out) == before
    torch.load(out / "checkpoint.pt", weights_only=False)  # what reading it as before this check did:
    assert marker.exists()  # the command ran


def test_a_changed_training_flag_is_refused_and_system_flags_are_free(image_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data-dir", image_folder, *TINY, "--out", out]
    run_main(simsiam, *argv, "--max-steps", "2")
    before = files(out)
    message = fails(*argv, "--max-steps", "3", "--lr", "0.5", "--wd", "0.1", "--seed", "1")
    assert message == (f"error: {out / 'checkpoint.pt'} was trained with other training flags: --seed 0 (now 1), "
                       f"--lr 0.03 (now 0.5), --wd 0.0005 (now 0.1); resume with the checkpoint's (any number of "
                       f"processes), or pass another --out")
    assert files(out) == before  # config.json included: the refused run wrote nothing
    run_main(simsiam, *argv, "--max-steps", "3", "--workers", "1", "--log-every", "2", "--knn-every", "0",
             "--save-every", "5", "--no-amp", "--device", "cpu")
    assert state(out)["step"] == 3 and state(out)["args"]["workers"] == 1


def _children(pid):
    """The processes whose parent is `pid` (torchrun's workers), with their LOCAL_RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                environ = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode().split("\0") if "=" in v)
                found[int(entry.name)] = environ.get("LOCAL_RANK")
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.torchrun_job("simsiam-straight")
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_exactly(image_folder, tmp_path, torchrun_runs):
    """A worker SIGKILLed after the first checkpoint: torchrun's agent (--max-restarts) starts the workers
    again, they resume by themselves, and the run ends with the weights of one that was never interrupted
    (the same command, run by the shared torchrun launch of tests/conftest.py), each step once in
    metrics.jsonl."""
    argv = [str(a) for a in elastic_argv(image_folder)]

    def launch(out):
        # the c10d rendezvous, as on a cluster (getting-started.md); on the CPU's gloo the first restart's
        # process group sometimes fails to connect (connection refused) and the agent's next restart succeeds
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=3",
                                 "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={out.name}",
                                 *argv, "--out", str(out)],
                                cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elastic = launch(tmp_path / "elastic")
    deadline, killed = time.time() + 300, None
    while killed is None and time.time() < deadline and elastic.poll() is None:
        if (tmp_path / "elastic" / "checkpoint.pt").exists():  # the first epoch end (step 3 of 9)
            workers = _children(elastic.pid)
            killed = next((pid for pid, rank in workers.items() if rank == "1"), None)
            if killed:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    log = elastic.communicate(timeout=400)[0]
    assert elastic.returncode == 0, log
    assert killed and "resumed from" in log, log
    straight = torchrun_runs.out("simsiam-straight")
    a, b = state(straight), state(tmp_path / "elastic")
    assert a["step"] == b["step"] == 9
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = [r["step"] for r in metrics(tmp_path / "elastic") if "loss" in r]
    assert steps == list(range(1, 10))  # none lost, none repeated
    check_run(straight, 9, world=2)  # and simsiam.py under torchrun, as tests/test_cli.py checks runs
    assert json.loads((straight / "config.json").read_text())["command"].startswith(
        "torchrun --nproc-per-node=2 simsiam.py --dataset folder")


def test_save_every_checkpoints_inside_an_epoch_and_the_resume_is_exact(monkeypatch, image_folder, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = ["--dataset", "folder", "--data-dir", image_folder, *TINY, "--max-steps", "7"]
    run_main(simsiam, *argv, "--out", straight)
    _sigint_inside_step(simsiam, monkeypatch, at_call=6, times=1)  # Ctrl-C in step 6, mid-epoch 2
    with pytest.raises(SystemExit) as e:  # a save at every log line inside an epoch: after step 4 and 5
        run_main(simsiam, *argv, "--out", resumed, "--save-every", "1e-6")
    assert str(e.value) == f"interrupted at step 6; the same command resumes from {resumed / 'checkpoint.pt'} (step 5)"
    assert state(resumed)["step"] == 5 and state(resumed)["epoch"] == 1  # inside the second epoch
    monkeypatch.undo()
    run_main(simsiam, *argv, "--out", resumed)
    a, b = state(straight), state(resumed)
    assert a["step"] == b["step"] == 7
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["step"] for r in metrics(resumed) if "loss" in r] == list(range(1, 8))


def _start_a_run(rank, world, outs, argv):
    from common import cli
    from common.train import Run
    try:
        Run(cli.parse(simsiam.Args, {}, [*argv, "--out", str(outs[rank])]))
        return None
    except SystemExit as e:
        return str(e.code)


def test_a_rank_that_cannot_read_the_checkpoint_ends_the_whole_run(gloo, image_folder, tmp_path):
    """Rank 0 finds a checkpoint; rank 1 (a node without the shared disk: here, another --out) cannot read
    it: every rank stops with rank 0's one line, none starts from step 0 beside ranks that resumed."""
    argv = ["--dataset", "folder", "--data-dir", str(image_folder), *map(str, TINY)]
    run_main(simsiam, *argv, "--max-steps", "2", "--out", tmp_path / "shared")
    (tmp_path / "elsewhere").mkdir()
    results = gloo(2).run(_start_a_run, [tmp_path / "shared", tmp_path / "elsewhere"], argv)
    path = tmp_path / "shared" / "checkpoint.pt"
    assert results == [f"error: rank 1 cannot read {path} (FileNotFoundError: No such file or directory), which "
                       f"rank 0 resumes from: every rank must see the run directory (on several nodes, a shared "
                       f"disk); pass an --out they all see", "1"]


def test_a_full_disk_keeps_both_files_and_leaves_no_temporary(monkeypatch, image_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data-dir", image_folder, *TINY, "--out", out]
    run_main(simsiam, *argv, "--max-steps", "3")  # a checkpoint at step 3
    before = files(out)
    save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):  # checkpoint.pt's temporary is written whole, backbone.pt's is not
        calls.append(getattr(f, "name", f))
        if len(calls) == 2:
            f.write(b"part of a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    message = fails(*argv, "--max-steps", "7")  # the next epoch end, step 6, cannot be written
    assert message == (f"error: cannot write a checkpoint in {out} at step 6 (No space left on device); "
                       f"{out / 'checkpoint.pt'} and backbone.pt keep step 3: free space there, then run the same "
                       f"command to resume")
    assert [Path(c).name for c in calls] == [".checkpoint.pt.tmp", ".backbone.pt.tmp"]
    now = files(out)
    assert now[Path("checkpoint.pt")] == before[Path("checkpoint.pt")]
    assert now[Path("backbone.pt")] == before[Path("backbone.pt")]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6  # (the rows after step 3 are dropped when the run resumes)
