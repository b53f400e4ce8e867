"""The real command line, a few steps, with one process and with torchrun."""
import importlib
import json
import subprocess
import sys

import pytest
import torch

from common import resnet
from conftest import ROOT, SMALL, env, free_port, metrics, run_cli, run_main, two_process_argv


STATS = {"simsiam": ("std_z", -1.0, 1.0), "simclr": ("pos_sim", 0.0, 10.0), "byol": ("tau", 0.0, 8.0),
         "barlow": ("c_diag", 0.0, 1e5), "vicreg": ("std", 0.0, 1e3), "unigrad": ("pos_sim", -1.0, 101.0)}  # a logged stat, the loss's range


TWO_PROCESS_LOSS = 1e-5  # relative; measured at most 2.8e-7 (see the tests that use it)


def check_run(out, steps, world=1, method="simsiam"):
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    stat, low, high = STATS[method]
    for r in train:
        assert {"step", "epoch", "loss", "lr", "img_per_s", stat} <= set(r)
        assert low <= r["loss"] <= high and r["lr"] >= 0 and r["img_per_s"] > 0
    assert train[-1]["lr"] > 0  # (a warmup starts from 0)
    knn = [r for r in rows if "knn_top1" in r]
    assert knn and knn[-1]["step"] == steps and 0.0 <= knn[-1]["knn_top1"] <= 1.0
    assert set(knn[-1]) == {"step", "epoch", "knn_top1", "time", "rank", "rank_z"}  # MoCo's second kNN feature is
    # MoCo's alone; the effective ranks of the backbone features and of the projector's (or expander's) output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == method and ckpt["step"] == steps and len(ckpt["rng"]) == world
    assert any(k.startswith(("projector.", "expander.")) for k in ckpt["model"])
    backbone = resnet.from_state_dict(torch.load(out / "backbone.pt", weights_only=True))
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["world_size"] == world


def lars_variant(out):
    """The LARS options main() chose, as its checkpoint records them (the same in every group)."""
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    options = [{k: g[k] for k in ("lr_in_momentum", "clip_lr", "eta")} for g in groups]
    assert all(o == options[0] for o in options)
    return options[0]


def test_simsiam_image_folder_one_process_then_linear_probe(image_folder, tmp_path):
    """`python simsiam.py ...`, then `python -m common.linear ...`, both in one process (tests/several.py:
    each command line as its own process would run it, one start-up of torch)."""
    out = tmp_path / "run"
    jobs = [["simsiam.py", "--dataset", "folder", "--data-dir", image_folder, "--epochs", "2", "--max-steps", "4",
             *SMALL, "--workers", "2", "--out", out],
            ["-m", "common.linear", "--backbone", out / "backbone.pt", "--protocol", "fast", "--dataset", "folder",
             "--data-dir", image_folder, "--epochs", "3", "--workers", "0"]]
    (tmp_path / "jobs.json").write_text(json.dumps([[str(a) for a in job] for job in jobs]))
    printed = run_cli(ROOT / "tests" / "several.py", tmp_path / "jobs.json").stdout
    p, probe = printed.split("== job 1: ")
    assert "kNN top-1" in p and "ETA" in p
    check_run(out, 4)
    assert "linear top-1" in probe and "(protocol fast: " in probe
    result = json.loads((out / "linear.json").read_text())["fast"]
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and result["image_size"] == 16  # the run's, from config.json
    config = json.loads((out / "config.json").read_text())
    assert config["command"].startswith("python simsiam.py --dataset folder") and "CPU" in config["hardware"]


def test_simsiam_synthetic_one_process(tmp_path):  # (the real process: the two-node test below)
    import simsiam
    run_main(simsiam, "--dataset", "synthetic", "--epochs", "1", "--max-steps", "2", *SMALL, "--out", tmp_path)
    check_run(tmp_path, 2)


@pytest.mark.torchrun_job("simclr")
def test_simclr_one_process_and_torchrun(image_folder, tmp_path, torchrun_runs):
    import simclr
    run_main(simclr, *two_process_argv("simclr", image_folder), "--out", tmp_path / "one")
    check_run(tmp_path / "one", 3, method="simclr")
    assert lars_variant(tmp_path / "one") == {"lr_in_momentum": True, "clip_lr": False, "eta": 0.001}  # official LARS
    two = torchrun_runs.out("simclr")  # torchrun --nproc-per-node=2 simclr.py (the same flags), run beside this test
    check_run(two, 3, world=2, method="simclr")
    one, two = ([r for r in metrics(out) if "loss" in r] for out in (tmp_path / "one", two))  # (step 0: the control)
    # the same samples and views per step on 1 and 2 processes: the first loss agrees to float32 precision,
    # within 2.8e-7 (relative) measured over 3 seeds and 3 kernel settings (python -m tests.spread torchrun)
    assert abs(one[0]["loss"] - two[0]["loss"]) < TWO_PROCESS_LOSS * abs(one[0]["loss"])


@pytest.mark.parametrize("method", ["byol", "barlow", "vicreg", "unigrad"])
def test_one_process_and_torchrun_agree(method, image_folder, tmp_path, torchrun_runs):
    module = importlib.import_module(method)
    run_main(module, *two_process_argv(method, image_folder), "--out", tmp_path / "one")
    check_run(tmp_path / "one", 3, method=method)
    if method != "unigrad":  # (SGD) BYOL's CIFAR-10 recipe takes solo-learn's LARS, Barlow Twins and VICReg the papers'
        clipped = method == "byol"
        assert lars_variant(tmp_path / "one") == {"lr_in_momentum": False, "clip_lr": clipped,
                                                  "eta": 0.02 if clipped else 0.001}
    two = torchrun_runs.out(method)  # torchrun --nproc-per-node=2 <method>.py (the same flags), run beside this test
    check_run(two, 3, world=2, method=method)
    one, two = ([r for r in metrics(out) if "loss" in r] for out in (tmp_path / "one", two))  # (step 0: the control)
    # the same samples and views per step on 1 and 2 processes: the first loss agrees to float32 precision,
    # within 2.8e-7 (relative) measured over 3 seeds and 3 kernel settings (python -m tests.spread torchrun)
    assert abs(one[0]["loss"] - two[0]["loss"]) < TWO_PROCESS_LOSS * abs(one[0]["loss"])


def test_two_nodes_on_localhost_with_c10d_rendezvous(tmp_path):
    """Two torchrun 'nodes' (one process each) meet through the c10d rendezvous and train a step."""
    port, out = free_port(), tmp_path / "nodes"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
         "simsiam.py", "--dataset", "synthetic", "--epochs", "1", "--max-steps", "1", *SMALL, "--out", str(out)],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    check_run(out, 1, world=2)


def test_help_lists_the_contract_flags(capsys):
    import simsiam
    with pytest.raises(SystemExit) as e:
        run_main(simsiam, "--help")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: simsiam.py")
    for flag in ["--dataset", "--data-dir", "--arch", "--image-size", "--epochs", "--batch-size", "--lr", "--wd",
                 "--workers", "--out", "--resume", "--no-resume", "--max-steps", "--knn-every", "--knn-k", "--knn-t",
                 "--seed", "--log-every", "--amp", "--compile", "--pred-dim", "--fix-pred-lr"]:
        assert flag in out, flag
    assert "App. D" in out  # help text comes from the comments naming each default's source


def test_presets_by_dataset_and_explicit_flags_win():
    import simsiam
    from common import cli
    a = cli.parse(simsiam.Args, simsiam.PRESETS, [])
    assert (a.arch, a.image_size, a.epochs, a.lr, a.wd, a.proj_layers, a.blur, a.fix_pred_lr) == \
        ("resnet18", 32, 800, 0.03, 5e-4, 2, False, False)  # paper App. D, CIFAR-10
    assert a.out == "runs/simsiam-cifar10"
    a = cli.parse(simsiam.Args, simsiam.PRESETS, ["--dataset", "imagenet"])
    assert (a.arch, a.image_size, a.epochs, a.lr, a.wd, a.proj_layers, a.blur, a.fix_pred_lr) == \
        ("resnet50", 224, 100, 0.05, 1e-4, 3, True, True)  # paper §4, ImageNet
    a = cli.parse(simsiam.Args, simsiam.PRESETS, ["--dataset", "imagenet", "--epochs", "5", "--no-blur",
                                                  "--arch", "resnet18"])
    assert (a.epochs, a.blur, a.arch, a.lr) == (5, False, "resnet18", 0.05)
    assert cli.parse(simsiam.Args, simsiam.PRESETS, ["--dataset", "stl10"]).image_size == 96


def test_models_of_both_recipes_have_the_papers_shapes():
    import simsiam
    from common import cli
    cifar = simsiam.build_model(cli.parse(simsiam.Args, simsiam.PRESETS, []))
    assert cifar.backbone.conv1.kernel_size == (3, 3) and isinstance(cifar.backbone.maxpool, torch.nn.Identity)
    linears = [m for m in cifar.projector if isinstance(m, torch.nn.Linear)]
    # App. D: 2 layers, 2048-d outputs; the hidden width is the backbone's, as the official builder.py
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 2048)]
    assert [m.num_features for m in cifar.projector if isinstance(m, torch.nn.BatchNorm1d)] == [512, 2048]
    assert not cifar.projector[-1].affine  # last BN without affine
    assert [(m.in_features, m.out_features, m.bias is not None) for m in cifar.predictor
            if isinstance(m, torch.nn.Linear)] == [(2048, 512, False), (512, 2048, True)]
    assert all(torch.all(b.bn2.weight == 0) for b in [cifar.backbone.layer1[0], cifar.backbone.layer4[1]])
    imagenet = simsiam.build_model(cli.parse(simsiam.Args, simsiam.PRESETS, ["--dataset", "imagenet"]))
    assert imagenet.backbone.conv1.kernel_size == (7, 7)
    assert [(m.in_features, m.out_features) for m in imagenet.projector if isinstance(m, torch.nn.Linear)] == \
        [(2048, 2048)] * 3


def test_the_default_loader_workers_fit_the_machine(monkeypatch):
    """--workers defaults to what this process's cores can run per rank (PyTorch's DataLoader warns above
    the cores it may use); the flag still overrides it."""
    import os
    import warnings
    import simsiam
    from common import cli
    for cores, local_world, expected in [(2, None, 2), (16, None, 4), (16, "8", 2), (2, "2", 1), (1, None, 1),
                                         (3, "4", 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        if local_world:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        else:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert cli.default_workers() == expected, (cores, local_world)
    monkeypatch.undo()
    args = cli.parse(simsiam.Args, simsiam.PRESETS, [])
    assert args.workers == cli.default_workers() == cli.System.workers  # this machine's, shown by --help
    assert cli.parse(simsiam.Args, simsiam.PRESETS, ["--workers", "7"]).workers == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's "This DataLoader will create N worker processes..." fails here
        torch.utils.data.DataLoader(range(4), num_workers=args.workers).check_worker_number_rationality()
    with pytest.warns(UserWarning, match="worker processes in total"):  # (one worker more than the cores warns)
        torch.utils.data.DataLoader(range(4), num_workers=len(os.sched_getaffinity(0)) + 1) \
            .check_worker_number_rationality()


def test_a_folder_of_small_images_trains_at_their_size(image_folder, tmp_path, capsys):
    """--dataset folder without --image-size: images of one size below the folder default (224 px) train at
    their own size (with the CIFAR stem at <= 64 px), said in one line; several sizes keep 224, said too;
    large images and an explicit --image-size say nothing."""
    import simsiam
    from common import cli
    from conftest import write_image_folder

    def parse(root, *argv):
        args = cli.parse(simsiam.Args, simsiam.PRESETS, ["--dataset", "folder", "--data-dir", str(root), *argv])
        return args.image_size, capsys.readouterr().out.splitlines()
    jpegs = write_image_folder(tmp_path / "jpegs", splits=("train",), classes=2, per_class=2, size=32, ext="jpg")
    size, lines = parse(jpegs)
    assert size == 32 and lines == [f"--dataset folder: the images of {jpegs / 'train'} are 32x32 px: training at "
                                    f"--image-size 32, their own size, with the CIFAR stem (pass --image-size to "
                                    f"choose another)"]
    assert parse(jpegs, "--image-size", "24") == (24, [])
    write_image_folder(tmp_path / "jpegs", splits=("train",), classes=1, per_class=2, size=40, ext="jpg")  # class0: 40 px
    size, lines = parse(jpegs)
    assert size == 224 and len(lines) == 1 and "several sizes, up to 40 px: training at --image-size 224" in lines[0]
    large = write_image_folder(tmp_path / "large", splits=("train",), classes=1, per_class=2, size=240)
    assert parse(large) == (224, [])
    assert parse(tmp_path / "nowhere") == (224, [])  # (the dataset's own error comes when it is read)
    # through the real main: the 20-px PNGs of image_folder train at 20 px, with the CIFAR stem
    run_main(simsiam, "--dataset", "folder", "--data-dir", image_folder, "--epochs", "1", "--max-steps", "1",
             *[a for a in SMALL if a not in ("--image-size", "16")], "--knn-every", "-1", "--out", tmp_path / "run")
    assert capsys.readouterr().out.startswith(f"--dataset folder: the images of {image_folder / 'train'} are 20x20")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_size"] == 20
    backbone = torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)
    assert backbone["conv1.weight"].shape[-2:] == (3, 3)  # the CIFAR stem


def test_every_line_and_row_numbers_the_epochs_alike(image_folder, tmp_path, capsys):
    """The progress lines, the kNN lines, the resume line and metrics.jsonl's `epoch` all give the epoch of the
    last step, counted from 1 (3 steps an epoch here: steps 1-3 are epoch 1); the report places the rows by
    step / steps per epoch; the speed has the digits it needs below 100 img/s."""
    import re
    import simsiam
    from common import report
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data-dir", image_folder, "--epochs", "2", *SMALL, "--knn-every", "1",
            "--out", out]
    run_main(simsiam, *argv, "--max-steps", "5")
    run_main(simsiam, *argv)  # resumed at step 5, inside epoch 2
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("epoch", "resumed"))]
    said = [re.match(r"epoch (\d+)/2 step (\d+)/6(: kNN)?", line) for line in printed]
    assert [(m[2], m[1], bool(m[3])) if m else line.split(" at ")[1] for m, line in zip(said, printed)] == [
        ("1", "1", False), ("2", "1", False), ("3", "1", False), ("3", "1", True), ("4", "2", False),
        ("5", "2", False), ("5", "2", True), "epoch 2, step 5", ("6", "2", False), ("6", "2", True)]
    rows = metrics(out)
    assert [(r["step"], r["epoch"]) for r in rows] == [(0, 0), (1, 1), (2, 1), (3, 1), (3, 1), (4, 2), (5, 2),
                                                       (5, 2), (6, 2), (6, 2)]  # (step 0: the control's ranks)
    speeds = [float(line.split(" | ")[1].removesuffix(" img/s")) for line in printed if " img/s" in line]
    logged = [r["img_per_s"] for r in rows if "img_per_s" in r]
    assert len(speeds) == len(logged) == 6
    for shown, value in zip(speeds, logged):  # 3 significant digits below 100 img/s (these run at a few)
        assert abs(shown - value) <= (0.005 * value if value < 100 else 0.5), (shown, value)
    config, rows, _ = report.load(out)
    assert config["steps_per_epoch"] == 3
    assert report.series(config, rows, "knn_top1")[0] == [1.0, 5 / 3, 2.0]
    assert "(epoch 2)" in report.row("run", config, rows, {})[5]  # the final kNN's epoch
