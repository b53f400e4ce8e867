"""Evaluation and reporting: the linear protocols (common.linear), the offline kNN (common.knn), the report
(common.report) and --tensorboard, on tiny generated datasets whose classes are separable by colour."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_main

from common import cli, evaluate, inspect, knn, linear, optim, report, resnet

load_backbone = evaluate.load_backbone

SIZE = ["--image-size", "8", "--workers", "0", "--device", "cpu"]


def write_separable(root, classes=4, per_class=16, size=12, seed=0):
    """An ImageFolder tree whose classes keep one mean colour in train/ and test/ (noise differs)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (classes, 3))
    for split in ("train", "test"):
        for c in range(classes):
            d = Path(root) / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(colours[c] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return Path(root)


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """(data root, backbone.pt): a random-init ResNet-18 with the CIFAR stem in a run directory whose
    config.json names the method and the image size (8 px, read from there by common.linear)."""
    root = write_separable(tmp_path_factory.mktemp("separable"))
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save(resnet.resnet("resnet18", cifar_stem=True).state_dict(), run / "backbone.pt")
    (run / "config.json").write_text(json.dumps({"method": "simsiam", "image_size": 8}))
    return root, run / "backbone.pt"


def probe_main(root, backbone, out, *flags):
    return linear.main(cli.parse(linear.Args, argv=[
        "--backbone", str(backbone), "--dataset", "folder", "--data-dir", str(root), "--workers", "0",
        "--device", "cpu", "--out", str(out), *map(str, flags)]))


STANDARD = ["--protocol", "standard", "--epochs", "3", "--batch-size", "16", "--lr", "1"]  # 4 steps an epoch
FAST = ["--protocol", "fast", "--epochs", "10"]


# --- the linear protocols ------------------------------------------------------------------------------

def test_fast_probe_trains_every_batch_at_a_positive_lr(monkeypatch):
    """10 samples in batches of 4: three steps an epoch, the last one on 2 samples; the cosine must span
    all of them (it used to count full batches only, so the last steps ran at lr 0)."""
    lrs = []
    monkeypatch.setattr(optim, "set_lr", lambda opt, lr: (lrs.append(lr), [g.update(lr=lr) for g in opt.param_groups]))
    x, y = torch.randn(10, 5), torch.arange(10) % 2
    linear.probe(x, y, x, y, epochs=2, batch_size=4, lr=0.1)
    assert len(lrs) == 6 and lrs[0] == 0.1 and min(lrs) > 0
    assert lrs == sorted(lrs, reverse=True)


@pytest.fixture(scope="module")
def straight(separable, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return probe_main(*separable, out, *STANDARD), out


@pytest.mark.xdist_group("gloo")  # beside the two-process test, which shares `straight`
def test_standard_protocol_beats_chance_and_resumes_exactly(separable, straight, tmp_path, capsys, monkeypatch):
    entry, out = straight
    assert entry["top1"] > 0.6  # 4 classes: chance 0.25
    assert entry["protocol"] == "standard" and entry["name"].startswith("SimCLR CIFAR")
    assert entry["image_size"] == 8 and entry["nesterov"] and entry["epochs"] == 3 and entry["test_images"] == 64
    saved = json.loads((out / "linear.json").read_text())["standard"]
    assert saved == json.loads(json.dumps(entry))

    assert probe_main(*separable, tmp_path, *STANDARD, "--max-steps", "5") is None  # stops mid-epoch
    assert not (tmp_path / "linear.json").exists()
    loaded = []
    with monkeypatch.context() as m:  # the backbone the run trains on: frozen, in eval mode, never changed
        m.setattr(evaluate, "load_backbone", lambda *a: loaded.append(load_backbone(*a)) or loaded[-1])
        resumed = probe_main(*separable, tmp_path, *STANDARD)
    backbone = loaded[0][0]
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    on_disk = torch.load(separable[1], weights_only=True)
    assert all(torch.equal(v, on_disk[k]) for k, v in backbone.state_dict().items())  # BN statistics included
    printed = capsys.readouterr().out
    assert "resumed from" in printed and f"linear top-1 {100 * entry['top1']:.2f}% top-5" in printed
    assert "(protocol standard: SimCLR CIFAR, --epochs 3" in printed.splitlines()[-1]
    a, b = [torch.load(d / "linear-standard.pt", weights_only=True) for d in (out, tmp_path)]
    assert a["step"] == b["step"] == 12
    for name in a["fc"]:
        assert torch.equal(a["fc"][name], b["fc"][name]), name
    assert resumed["top1"] == entry["top1"] and resumed["top5"] == entry["top5"]

    with pytest.raises(SystemExit, match="other settings .*epochs"):  # a changed recipe is refused
        probe_main(*separable, tmp_path, *STANDARD[:3], "4", *STANDARD[4:])


def _two_ranks(rank, world, root, backbone, out):
    torch.set_num_threads(1)
    entries = [probe_main(root, backbone, Path(out) / p, *flags) for p, flags in (("s", STANDARD), ("f", FAST))]
    return entries, (torch.load(Path(out) / "s" / "linear-standard.pt", weights_only=True)["fc"] if rank == 0 else None)


def test_two_processes_give_the_one_process_result(separable, straight, gloo, tmp_path):
    """The global batch of 16 split over 2 ranks (8 each): the same steps, the same classifier."""
    one_fast = probe_main(*separable, tmp_path / "one", *FAST)
    assert one_fast["top1"] > 0.6
    (two_std, two_fast), fc = gloo(2).run(_two_ranks, *map(str, separable), str(tmp_path / "two"))[0]
    one_fc = torch.load(straight[1] / "linear-standard.pt", weights_only=True)["fc"]
    for name in one_fc:  # float32 on 1 and 2 processes: at most 3.3e-7 of the largest entry apart, measured over 3
        # seeds and 3 kernel settings (python -m tests.spread probe); 1e-5 of it allowed
        torch.testing.assert_close(fc[name], one_fc[name], rtol=0, atol=1e-5 * one_fc[name].abs().max().item())
    assert two_std["top1"] == straight[0]["top1"] and two_fast["top1"] == one_fast["top1"]
    assert two_std["test_images"] == two_fast["test_images"] == 64


def test_each_method_gets_its_official_imagenet_recipe():
    def recipe(method, *flags):
        args = cli.parse(linear.Args, argv=["--dataset", "imagenet", *flags])
        return linear.recipe(args, {"method": method})
    moco = recipe("mocov2")
    assert (moco["lr"], moco["scale"], moco["milestones"], moco["epochs"], moco["batch_size"]) == (30.0, False, (60, 80), 100, 256)
    simsiam = recipe("simsiam")
    assert simsiam["optimizer"] == "lars" and simsiam["batch_size"] == 4096 and recipe("unigrad")["optimizer"] == "lars"
    assert recipe("byol")["epochs"] == 80 and recipe("simclr")["wd"] == 1e-6
    assert recipe("barlow", "--epochs", "5")["name"] == "Barlow Twins, --epochs 5"
    assert linear.recipe(cli.parse(linear.Args, argv=[]), {"method": "mocov2"})["name"] == "SimCLR CIFAR"
    with pytest.raises(SystemExit, match="no ImageNet linear recipe for method 'nothere'; pass --method"):
        recipe("nothere")
    # MoCo: ×0.1 at epochs 60 and 80; the cosines per step and per epoch
    assert [linear.lr_at(moco, 30.0, e * 10, 10) for e in (0, 59, 60, 79, 80)] == pytest.approx([30, 30, 3, 3, 0.3])
    assert linear.lr_at(simsiam, 1.0, 45 * 10 + 9, 10) == pytest.approx(0.5)  # per epoch: constant inside epoch 45
    small = linear.recipe(cli.parse(linear.Args, argv=["--epochs", "2"]), {})
    assert linear.lr_at(small, 1.0, 5, 5) == pytest.approx(0.5)  # per step: half way through 2 × 5 steps


def test_larc_scales_each_gradient_by_its_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b = torch.nn.Parameter(torch.zeros(2))  # zero norm: left as it is, as apex's LARC does
    w.grad, b.grad = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    linear.larc_([w, b], trust=0.001)
    # (allclose's rtol 1e-5: the two float32 products differ by rounding, 6e-8 relative)
    assert torch.allclose(w.grad, torch.tensor([0.0, 2.0]) * 0.001 * 5 / 2) and torch.equal(b.grad, torch.ones(2))


class NotATensor:
    pass


@pytest.mark.parametrize("command", ["linear", "knn"])
@pytest.mark.parametrize("kind", ["missing", "checkpoint", "other network", "code"])
def test_a_missing_or_foreign_backbone_is_one_line(command, kind, separable, tmp_path):
    path = tmp_path / "backbone.pt"
    if kind == "checkpoint":
        torch.save({"method": "simsiam", "step": 3, "model": {}}, path)
    elif kind == "other network":
        torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    elif kind == "code":
        torch.save(NotATensor(), path)  # weights_only=True refuses to unpickle it
    expected = {"missing": "no backbone at", "checkpoint": "is a training checkpoint, not a backbone",
                "other network": "is not the state_dict of a ResNet backbone",
                "code": "is not a backbone.pt (UnpicklingError: only tensors are read)"}[kind]
    module = {"linear": linear, "knn": knn}[command]
    with pytest.raises(SystemExit) as e:
        module.main(cli.parse(module.Args, argv=["--backbone", str(path), "--dataset", "folder",
                                                 "--data-dir", str(separable[0]), *SIZE]))
    assert str(e.value.code).startswith("error: ") and expected in str(e.value.code) and "\n" not in str(e.value.code)


# --- a real run: the offline kNN, the report, --tensorboard ----------------------------------------------

@pytest.fixture(scope="module")
def real_run(separable, tmp_path_factory):
    """simsiam.py, 4 steps of 8 on the separable folder with --tensorboard: a real run directory."""
    import simsiam
    out = tmp_path_factory.mktemp("run")
    run_main(simsiam, "--dataset", "folder", "--data-dir", separable[0], *SIZE, "--batch-size", "8",
             "--epochs", "2", "--max-steps", "4", "--knn-every", "1", "--knn-k", "20", "--log-every", "1",
             "--dim", "64", "--pred-dim", "16", "--tensorboard", "--out", out)
    return out


@pytest.mark.xdist_group("evaluation-run")
def test_offline_knn_equals_the_monitor(real_run, separable):
    rows = [json.loads(r) for r in (real_run / "metrics.jsonl").read_text().splitlines()]
    monitor = [r for r in rows if "knn_top1" in r][-1]["knn_top1"]
    entry = knn.main(cli.parse(knn.Args, argv=["--backbone", str(real_run / "backbone.pt"), "--dataset", "folder",
                                               "--data-dir", str(separable[0]), "--k", "20", "--workers", "0",
                                               "--device", "cpu"]))
    assert entry["top1"] == monitor and entry["image_size"] == 8  # (read off the run's config.json)
    saved = json.loads((real_run / "knn.json").read_text())["folder k=20 t=0.1"]
    assert saved["protocol"] == "weighted kNN, k 20, t 0.1" and saved["top1"] == monitor


@pytest.mark.xdist_group("evaluation-run")
def test_tensorboard_events_hold_the_metrics(real_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(real_run / "tensorboard"))
    events.Reload()
    rows = [json.loads(r) for r in (real_run / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "epoch", "time"):
                expected.setdefault(k, []).append((r["step"], v))
    assert set(events.Tags()["scalars"]) == set(expected) >= {"loss", "lr", "std_z", "img_per_s", "data_share",
                                                              "knn_top1", "rank", "rank_z"}
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        # (tensorboard stores float32: the float64 rows rounded, relative error at most 2^-24 = 6e-8)
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_flag_without_tensorboard_is_one_line(separable, tmp_path, monkeypatch):
    import simsiam
    for name in [m for m in sys.modules if m.startswith(("torch.utils.tensorboard", "tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    with pytest.raises(SystemExit) as e:
        run_main(simsiam, "--dataset", "folder", "--data-dir", separable[0], *SIZE, "--tensorboard", "--out", tmp_path)
    assert "--tensorboard needs the tensorboard package" in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.xdist_group("evaluation-run")
def test_report_table_and_figures(real_run, tmp_path):
    other = tmp_path / "simclr-run"  # a second run, written by hand in the same format
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"method": "simclr", "dataset": "cifar10", "epochs": 3,
                                                   "batch_size": 512, "knn_k": 200, "knn_t": 0.1,
                                                   "hardware": "GPU ×1", "command": "python simclr.py --epochs 3"}))
    rows = [{"step": s, "epoch": s // 10, "loss": 5 - s / 10, "lr": 0.1, "img_per_s": 1000.0 + s, "pos_sim": s / 30,
             "time": 100.0 + s} for s in range(1, 31)]
    rows[10:10] = [{"step": 10, "epoch": 1, "knn_top1": 0.5}]
    rows[21:21] = [{"step": 20, "epoch": 2, "knn_top1": 0.7}]
    rows += [{"step": 30, "epoch": 3, "knn_top1": 0.6}]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (other / "linear.json").write_text(json.dumps({"standard": {"top1": 0.8123, "name": "SimCLR CIFAR"}}))

    runs = report.main([str(real_run), str(other), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| run | method | dataset | epochs | global batch |")
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells[:9] == ["simclr-run", "simclr", "cifar10", "3", "512", "60.00 (epoch 3)", "70.00 (epoch 2)",
                         "k 200, t 0.1", "81.23 (standard: SimCLR CIFAR)"]
    assert cells[9:] == ["0:00:29", "1016", "GPU ×1", "`python simclr.py --epochs 3`"]
    mine = [c.strip() for c in table[2].strip("|").split("|")]
    assert mine[1:5] == ["simsiam", "folder", "2", "8"] and "CPU" in mine[11] and mine[12] == "–"

    from PIL import Image
    for name in ("knn.png", "loss.png", "stats.png"):
        with Image.open(tmp_path / "report" / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 500
    figures = report.figures(runs)
    knn_lines = {line.get_label(): line for line in figures["knn.png"].axes[0].get_lines()}
    assert list(knn_lines["simclr-run (simclr, k 200, t 0.1)"].get_ydata()) == [50, 70, 60]
    assert list(knn_lines["simclr-run (simclr, k 200, t 0.1)"].get_xdata()) == [1, 2, 3]
    loss = {line.get_label(): line for line in figures["loss.png"].axes[0].get_lines()}
    assert list(loss["simclr-run (simclr)"].get_xdata())[:2] == [0.1, 0.2] and len(loss) == 2
    stats = {ax.get_ylabel(): [line.get_label() for line in ax.get_lines()] for ax in figures["stats.png"].axes}
    assert stats == {"pos_sim": ["simclr-run (simclr)"], "std_z": [f"{real_run.name} (simsiam)"],
                     "rank": [f"{real_run.name} (simsiam)"], "rank_z": [f"{real_run.name} (simsiam)"]}
    # common.inspect's pictures of each run that has a backbone.pt, on the data its config.json names
    for name in ("neighbours.png", "map.png"):
        assert (tmp_path / "report" / real_run.name / real_run.name / name).is_file()
    assert (tmp_path / "report" / real_run.name / "spectrum.png").is_file()
    assert not (tmp_path / "report" / "simclr-run").exists()


@pytest.mark.xdist_group("evaluation-run")
def test_inspect_draws_the_pictures_of_a_run_the_same_under_a_seed(real_run, separable, tmp_path):
    """common.inspect end to end on the real run's backbone.pt (SimSiam; the checkpoint.pt beside it gives the
    projector): the three PNGs and inspect.md with a caption for each; the backbone's RankMe equals the monitor's
    last one and the control's (the run's model rebuilt under its seed) the monitor's at step 0 (the same test set
    in eval mode, the same float32 features: equal to float64 rounding); the same seed draws the same files byte
    for byte, another seed other queries and another map."""
    flags = ["--backbone", str(real_run / "backbone.pt"), "--dataset", "folder", "--data-dir", str(separable[0]),
             "--workers", "0", "--device", "cpu", "--k", "4", "--map-points", "40"]
    ranks = inspect.main([*flags, "--out", str(tmp_path / "a")])
    inspect.main([*flags, "--out", str(tmp_path / "b")])
    inspect.main([*flags, "--out", str(tmp_path / "c"), "--seed", "1"])
    from PIL import Image
    name = real_run.name
    drawn = [f"{run}/{picture}" for run in (name, f"{name}-init") for picture in ("neighbours.png", "map.png")]
    for picture in [*drawn, "spectrum.png"]:
        with Image.open(tmp_path / "a" / picture) as image:
            image.verify()
            assert image.format == "PNG" and 300 < image.size[0] < 2000
        assert (tmp_path / "a" / picture).read_bytes() == (tmp_path / "b" / picture).read_bytes(), picture
    for picture in drawn:
        assert (tmp_path / "a" / picture).read_bytes() != (tmp_path / "c" / picture).read_bytes(), picture
    md = (tmp_path / "a" / "inspect.md").read_text()
    assert md.count("![") == 5 and "blue frame" in md and "t-SNE" in md and "RankMe" in md
    rows = [json.loads(r) for r in (real_run / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in rows if "rank" in r]
    assert monitored[0]["step"] == 0 and monitored[-1]["step"] == 4
    backbone, projector = ranks["backbone features"], ranks["projector output (the embedding the loss sees)"]
    assert backbone[name] == pytest.approx(monitored[-1]["rank"], rel=1e-9)
    assert projector[name] == pytest.approx(monitored[-1]["rank_z"], rel=1e-9)
    assert backbone[f"{name} at initialisation"] == pytest.approx(monitored[0]["rank"], rel=1e-9)
    assert projector[f"{name} at initialisation"] == pytest.approx(monitored[0]["rank_z"], rel=1e-9)


@pytest.mark.parametrize("kind", ["missing", "checkpoint", "unlabelled"])
def test_inspect_of_bad_input_is_one_line(kind, separable, tmp_path):
    path, root = tmp_path / "backbone.pt", separable[0]
    if kind == "checkpoint":
        torch.save({"method": "simsiam", "step": 3, "model": {}}, path)
    else:
        torch.save(resnet.resnet("resnet18", cifar_stem=True).state_dict(), path)
        path = path if kind == "unlabelled" else tmp_path / "absent.pt"
    if kind == "unlabelled":  # one class: images without labels
        root = tmp_path / "unlabelled"
        for split in ("train", "test"):
            (root / split).mkdir(parents=True)
            (root / split / "images").symlink_to(separable[0] / split / "class0")
    expected = {"missing": "no backbone at", "checkpoint": "is a training checkpoint, not a backbone",
                "unlabelled": "has one class: the pictures need labels"}[kind]
    with pytest.raises(SystemExit) as e:
        inspect.main(["--backbone", str(path), "--dataset", "folder", "--data-dir", str(root), "--workers", "0",
                      "--device", "cpu", "--out", str(tmp_path / "out")])
    assert str(e.value.code).startswith("error: ") and expected in str(e.value.code) and "\n" not in str(e.value.code)


def test_the_collapse_line_is_said_once(separable, tmp_path, monkeypatch, capsys):
    """The real loop, three kNN evaluations; the effective ranks (common.evaluate.ranks) are those of a network
    whose embedding collapses after the first steps (z's rank 4 against 50 at initialisation, under a tenth): one
    line says so, once, naming the embedding and what it means; the step-0 row keeps the control. A loop that says
    it at every evaluation, or never (no control), fails here."""
    import simsiam
    measured = []

    def ranks(backbone, loader, gpu, head=None):
        measured.append(head is not None)
        return {"rank": 100.0, "rank_z": 50.0} if len(measured) == 1 else {"rank": 90.0, "rank_z": 4.0}
    monkeypatch.setattr(evaluate, "ranks", ranks)
    run_main(simsiam, "--dataset", "folder", "--data-dir", separable[0], *SIZE, "--batch-size", "16", "--epochs", "3",
             "--knn-every", "1", "--knn-k", "20", "--log-every", "4", "--dim", "64", "--pred-dim", "16", "--out", tmp_path)
    out = capsys.readouterr().out
    assert measured == [True] * 4  # at step 0, then at each of the 3 evaluations, with SimSiam's projector
    said = [line for line in out.splitlines() if line.startswith("collapse:")]
    assert len(said) == 1 and "embedding the loss sees is 4.0" in said[0] and "50.0" in said[0], out
    assert "of z 4.0 (at init 50.0)" in out
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "epoch": 0, "rank": 100.0, "rank_z": 50.0, "time": rows[0]["time"]}


def test_report_of_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert str(e.value.code).startswith(f"error: {tmp_path} is not a run directory") and "\n" not in str(e.value.code)
