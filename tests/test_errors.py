"""Bad input ends with one clear line, a non-zero exit, no traceback, and the last checkpoint intact."""

import importlib

import pytest
import torch

import simsiam
from conftest import SMALL, run_cli, run_main, torchrun, write_image_folder

TINY = ["--epochs", "2", "--knn-every", "-1", *SMALL]


def fails(*argv):
    """Run simsiam's main in-process; return the one-line message it exits with."""
    with pytest.raises(SystemExit) as e:
        run_main(simsiam, *argv)
    message = str(e.value.code)
    assert e.value.code not in (0, None) and message.startswith("error: ") and "\n" not in message, message
    return message


def one_line_error(p):
    """A real process's failure: exit status non-zero, stderr one line, no traceback."""
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("error:", "simsiam.py: error:")), p.stderr
    return lines[0]


@pytest.fixture
def trained(image_folder, tmp_path):
    """A run directory holding a checkpoint after 2 steps; returns (out, checkpoint bytes)."""
    out = tmp_path / "run"
    run_main(simsiam, "--dataset", "folder", "--data-dir", image_folder, *TINY, "--max-steps", "2", "--out", out)
    return out, (out / "checkpoint.pt").read_bytes()


# --- through the real process -----------------------------------------------------------------------

def test_unreadable_image_inside_a_loader_worker(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    (root / "train" / "class1" / "2.png").write_bytes(b"not an image")
    p = run_cli("simsiam.py", "--dataset", "folder", "--data-dir", root, *TINY, "--workers", "2",
                "--out", tmp_path / "run", check=False)
    line = one_line_error(p)
    assert "cannot read image" in line and "2.png" in line


@pytest.mark.parametrize("script, argv", [
    ("simsiam.py", ["--batch-size", "1"]),  # the projector's BatchNorm1d sees one sample
    ("mocov1.py", ["--batch-size", "8", "--image-size", "8"]),  # SplitBN: 1 image per split, 1x1 last map
])
def test_a_batch_too_small_for_batchnorm(script, argv, tmp_path):
    p = run_cli(script, "--dataset", "synthetic", *TINY, *argv, "--out", tmp_path, check=False)
    line = one_line_error(p)
    assert "one value per channel" in line and "--batch-size" in line and "--image-size" in line


def test_batch_not_divisible_by_the_world_size(image_folder, tmp_path):
    p = torchrun("simsiam.py", "--dataset", "folder", "--data-dir", image_folder, *TINY, "--batch-size", "7",
                 "--out", tmp_path, check=False)
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: --batch-size 7 is not divisible by the 2 processes; use a multiple of 2"]
    assert "simsiam.py\", line" not in p.stderr and "common/" not in p.stderr  # torchrun reports, we don't trace


# --- in-process: the same main(), the same SystemExit -------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--arch", "vgg16"], "argument --arch: invalid choice: 'vgg16'"),
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(simsiam, *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("simsiam.py: error: ") and expected in err, err


def test_unknown_flag_value(capsys):
    """One line naming the choices and --help (in-process: the process adds nothing to argparse's exit)."""
    with pytest.raises(SystemExit) as e:
        run_main(simsiam, "--dataset", "mnist")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("simsiam.py: error: "), err
    assert "invalid choice: 'mnist'" in err[0] and "cifar10" in err[0] and "--help" in err[0]


def test_missing_and_empty_datasets(tmp_path):
    assert "has no train/ folder" in fails("--dataset", "folder", "--data-dir", tmp_path / "nowhere", *TINY,
                                           "--out", tmp_path / "a")
    (tmp_path / "empty" / "train" / "class0").mkdir(parents=True)
    assert "no images found" in fails("--dataset", "folder", "--data-dir", tmp_path / "empty", *TINY,
                                      "--out", tmp_path / "b")


def test_dataset_smaller_than_one_batch(image_folder, tmp_path):
    assert "fewer than one batch" in fails("--dataset", "folder", "--data-dir", image_folder, *TINY,
                                           "--batch-size", "64", "--out", tmp_path)


def test_unwritable_run_directory(image_folder, tmp_path):
    (tmp_path / "file").write_text("a file where a directory should be")
    message = fails("--dataset", "folder", "--data-dir", image_folder, *TINY, "--out", tmp_path / "file" / "run")
    assert "cannot write to the run directory" in message and "--out" in message


def test_checkpoint_of_another_architecture_or_method(trained, image_folder):
    out, before = trained
    message = fails("--dataset", "folder", "--data-dir", image_folder, *TINY, "--arch", "resnet50", "--out", out)
    assert "was trained with other training flags: --arch 'resnet18' (now 'resnet50')" in message
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["method"] = "byol"
    torch.save(ckpt, out / "checkpoint.pt")
    assert "byol resnet18 checkpoint, not simsiam" in fails("--dataset", "folder", "--data-dir", image_folder,
                                                            *TINY, "--out", out)
    ckpt["method"] = "simsiam"
    del ckpt["model"]["predictor.0.weight"]  # a model of other options than its args say
    torch.save(ckpt, out / "checkpoint.pt")
    assert "does not fit this model" in fails("--dataset", "folder", "--data-dir", image_folder, *TINY, "--out", out)


def test_resume_with_another_global_batch(trained, image_folder):
    out, before = trained
    message = fails("--dataset", "folder", "--data-dir", image_folder, *TINY, "--batch-size", "4", "--out", out)
    assert "was trained with other training flags: --batch-size 8 (now 4)" in message
    assert (out / "checkpoint.pt").read_bytes() == before


def test_corrupt_checkpoint(trained, image_folder):
    out, _ = trained
    (out / "checkpoint.pt").write_bytes(b"garbage")
    assert "is not a checkpoint of this project" in fails("--dataset", "folder", "--data-dir", image_folder, *TINY,
                                                          "--out", out)
    assert (out / "checkpoint.pt").read_bytes() == b"garbage"  # left for the user to inspect


def test_no_resume_never_overwrites_a_checkpoint(trained, image_folder):
    out, before = trained
    assert "--no-resume" in fails("--dataset", "folder", "--data-dir", image_folder, *TINY, "--no-resume",
                                  "--out", out)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(monkeypatch, image_folder, tmp_path):
    out, small = tmp_path / "run", [*TINY, "--batch-size", "4"]  # 6 steps per epoch: no epoch end below
    run_main(simsiam, "--dataset", "folder", "--data-dir", image_folder, *small, "--max-steps", "2", "--out", out)
    before, backbone = (out / "checkpoint.pt").read_bytes(), (out / "backbone.pt").read_bytes()
    D, calls = simsiam.D, []

    def diverging(p, z):  # the loss turns non-finite at the fifth step (the lr cannot change on a resume)
        calls.append(1)
        return D(p, z) * (float("nan") if len(calls) > 4 else 1.0)
    monkeypatch.setattr(simsiam, "D", diverging)
    message = fails("--dataset", "folder", "--data-dir", image_folder, *small, "--max-steps", "6", "--out", out)
    assert message.startswith("error: the loss is not finite at step 5;") and "checkpoint.pt keeps the last good state" in message
    assert (out / "checkpoint.pt").read_bytes() == before and (out / "backbone.pt").read_bytes() == backbone
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert all("NaN" not in r and "Infinity" not in r for r in rows)  # nothing non-finite was logged


def test_non_finite_weights_are_never_saved(tmp_path):
    """Weights that an update made non-finite, found at a checkpoint: that checkpoint is not written."""
    from common import cli
    from common.train import Run
    run = Run(cli.parse(simsiam.Args, {}, ["--out", str(tmp_path), *TINY]))
    model = simsiam.build_model(run.args)
    run.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), model.backbone)
    run.save()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    run.step = 1
    with torch.no_grad():
        model.predictor[0].weight[0, 0] = float("inf")
    with pytest.raises(SystemExit) as e:
        run.save()
    assert "the weights are not finite after step 1" in str(e.value.code)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("method, flag", [("byol", "--tau-base"), ("barlow", "--lambd"), ("vicreg", "--std-coeff"),
                                          ("unigrad", "--lambd")])
def test_each_method_gives_the_same_one_line_errors(method, flag, trained, image_folder, capsys):
    module = importlib.import_module(method)
    with pytest.raises(SystemExit) as e:
        run_main(module, flag, "x")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"argument {flag}: invalid float value: 'x'" in err, err
    out, before = trained  # a simsiam checkpoint
    with pytest.raises(SystemExit) as e:
        run_main(module, "--dataset", "folder", "--data-dir", image_folder, *TINY, "--out", out)
    assert str(e.value.code) == (f"error: {out / 'checkpoint.pt'} is a simsiam resnet18 checkpoint, not {method} "
                                 f"resnet18; pass another --out")
    assert (out / "checkpoint.pt").read_bytes() == before
