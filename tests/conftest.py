"""Shared test helpers: small datasets in the real on-disk formats, gloo process groups, the CLI."""
import fcntl
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # a worker per core (-n auto): a thread each, not N threads in each of N workers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- small datasets in real formats -------------------------------------------------------------

def write_image_folder(root, splits=("train", "test"), classes=3, per_class=8, size=20, seed=0, ext="png"):
    """An ImageFolder tree: root/<split>/<class>/<i>.<ext>, each class its own mean colour plus noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = Path(root) / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, 3)
            for i in range(per_class):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.{ext}")
    return Path(root)


def write_cifar10(root, per_batch=20, test=20, seed=0):
    """CIFAR-10 in torchvision's own layout: cifar-10-batches-py/ with pickled batches."""
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(y) for y in rng.integers(0, 10, n)]}
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (d / "test_batch").write_bytes(pickle.dumps(batch(test)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return Path(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"))


# --- the real command line ----------------------------------------------------------------------

SMALL = ["--image-size", "16", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--device", "cpu"]


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT)
    return e


def run_cli(*argv, check=True, timeout=300):
    """Run `python argv...` in the project root; return the CompletedProcess (text output)."""
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def torchrun(*argv, nproc=2, check=True, timeout=300, extra=()):
    return run_cli("-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port", free_port(),
                   *extra, *argv, check=check, timeout=timeout)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# --- gloo process groups inside a test ------------------------------------------------------------

def _serve(rank, world, port, inbox, outbox):
    """A rank of a long-lived gloo group: runs fn(rank, world, *args) for each job it is sent."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from common import dist
    dist.setup("cpu")
    while (job := inbox.get()) is not None:
        fn, args = job
        try:
            outbox.put((rank, True, fn(rank, world, *args)))
        except BaseException:  # sent back to the test, which fails with it
            import traceback
            outbox.put((rank, False, traceback.format_exc()))
    dist.cleanup()


class Gloo:
    """`world` gloo processes started once and reused by every test. They are forked from a server process
    that imported torch, torchvision and the project once (multiprocessing's forkserver): a process that
    imports them itself spends about 10 s of CPU doing so."""

    def __init__(self, world):
        ctx = torch.multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torchvision", "common.train", "conftest"])
        self.world, self.outbox = world, ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout=240):
        """fn(rank, world, *args) on every rank; the list of results in rank order."""
        for q in self.inboxes:
            q.put((fn, args))
        results = dict()
        for _ in range(self.world):
            rank, ok, value = self.outbox.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
        return [results[r] for r in range(self.world)]

    def close(self):
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="session")
def gloo():
    """gloo(W) -> a Gloo group of W processes, shared by the whole session."""
    groups = {}

    def get(world):
        if world not in groups:
            groups[world] = Gloo(world)
        return groups[world]
    yield get
    for g in groups.values():
        g.close()


def run_main(module, *argv):
    """A method's real main() in this process: module.main(cli.parse(Args, PRESETS, argv))."""
    from common import cli
    return module.main(cli.parse(module.Args, getattr(module, "PRESETS", {}), [str(a) for a in argv]))


# --- one torchrun launch for the runs on two processes ----------------------------------------------

TWO_PROCESS_EXTRA = {"simclr": [], "byol": [], "barlow": [], "vicreg": [], "unigrad": [], "mocov1": ["--K", "16"],
                     "mocov2": ["--K", "16"]}


def two_process_argv(method, folder):
    """The command line that tests/test_cli.py and tests/test_moco.py run on one process and on two."""
    return ["--dataset", "folder", "--data-dir", str(folder), "--epochs", "2", "--max-steps", "3", *SMALL,
            *TWO_PROCESS_EXTRA[method]]


def elastic_argv(folder):
    """simsiam.py for 3 epochs of 3 steps, which tests/test_reliability.py runs straight and with a killed worker."""
    return ["simsiam.py", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "3", "--knn-every", "0", *SMALL]


TORCHRUN_JOBS = {  # name: the command line of a job of torchrun_runs, given the image folder
    **{m: lambda folder, m=m: [f"{m}.py", *two_process_argv(m, folder)] for m in TWO_PROCESS_EXTRA},
    "simsiam-straight": elastic_argv,
}


class TorchrunRuns:
    """One `torchrun --nproc-per-node 2` running the command lines of TORCHRUN_JOBS asked for, one after the other
    in the same two worker processes (tests/several.py): the agent and the workers start once, not once per run
    (about 30 s of CPU each time). It runs in the background while the tests run their single-process halves,
    and every pytest-xdist worker shares it: the first to ask starts it (under a file lock in the directory the
    workers share), the others find it started; `out(name)` waits for its end, as its exit file tells, and
    returns that job's run directory."""

    def __init__(self, names, folder, directory):
        self.names, self.directory, self.log, self.exit = list(names), directory, directory / "log.txt", directory / "exit"
        self.process = None
        directory.mkdir(exist_ok=True)
        with open(directory / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (directory / "jobs.json").exists():  # another worker started it
                return
            jobs = [[*map(str, TORCHRUN_JOBS[n](folder)), "--out", str(directory / n)] for n in names]
            (directory / "jobs.json").write_text(json.dumps(jobs))
            with open(self.log, "w") as log:  # (sh records torchrun's exit status for every worker to read)
                self.process = subprocess.Popen(
                    ["/bin/sh", "-c", '"$@"; echo $? > "$0"', str(self.exit), sys.executable, "-m",
                     "torch.distributed.run", "--nproc-per-node=2", "--master-port", str(free_port()),
                     str(ROOT / "tests" / "several.py"), str(directory / "jobs.json")],
                    cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout=900):
        """Until torchrun has ended; False if it has not within `timeout` seconds."""
        deadline = time.time() + timeout
        while not self.exit.exists() and time.time() < deadline:
            time.sleep(0.2)
        return self.exit.exists()

    def out(self, name):
        if not self.wait():
            raise AssertionError(f"torchrun has not ended after 900 s:\n{self.log.read_text()}")
        log = self.log.read_text()
        if f"== job {self.names.index(name)} ok" not in log:
            raise AssertionError(f"torchrun job {name} failed (exit {self.exit.read_text().strip()}):\n{log}")
        return self.directory / name


@pytest.fixture(scope="session")
def torchrun_runs(request, image_folder, tmp_path_factory):
    """The TorchrunRuns of the jobs of the selected tests (the marker `torchrun_job(name)`, or the test's
    `method` parameter), started at the first test that asks for it, in any worker. (Every worker collects
    every test, so all compute the same jobs.)"""
    names = []
    for item in request.session.items:
        if "torchrun_runs" in getattr(item, "fixturenames", ()):
            marker = item.get_closest_marker("torchrun_job")
            name = marker.args[0] if marker else item.callspec.params["method"]
            if name not in names:
                names.append(name)
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the directory of this run's workers
    runs = TorchrunRuns(names, image_folder, shared / "torchrun")
    yield runs
    if runs.process is not None and not runs.wait():  # the starter waits for the end: other workers read it
        os.killpg(runs.process.pid, signal.SIGKILL)


def pytest_configure(config):
    config.addinivalue_line("markers", "torchrun_job(name): the test reads that job of torchrun_runs (TORCHRUN_JOBS)")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (its worker adds them to the node ids)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadgroup), tests sharing a session fixture run on one worker, which then
    starts it once: the gloo process groups, the extracted CIFAR-10 subset; tests/test_docs.py groups its own
    tests (one site build, one Chromium measurement, while the other worker goes on). pytest-xdist records a
    group by appending "@group" to the node id, which pytest 9's structured node ids ignore (the groups are
    then silently dropped: pytest-dev/pytest-xdist#1386): pyproject.toml keeps pytest below 9 until it is fixed.
    (The torchrun launch is shared across workers by itself.)"""
    for item in items:
        for fixture, group in (("gloo", "gloo"), ("cifar_subset", "learning")):
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
