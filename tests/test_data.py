"""Loading paths: CIFAR-10 in torchvision's own format, ImageFolder, FakeData; and the kNN monitor."""
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import simsiam
from common import data, evaluate
from conftest import SMALL, metrics, run_main, write_cifar10


@pytest.fixture
def cifar10(tmp_path, monkeypatch):
    # The files are ours, not the published ones: skip torchvision's md5 check, in this test only.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    return write_cifar10(tmp_path / "cifar", per_batch=8, test=16)


def test_cifar10_loads_from_torchvision_format(cifar10):
    train = data.dataset("cifar10", cifar10, "pretrain")
    test = data.dataset("cifar10", cifar10, "test")
    assert len(train) == 40 and len(test) == 16
    image, label = train[0]
    assert image.size == (32, 32) and 0 <= label < 10
    v1, v2 = data.Views(train, simsiam.augment(simsiam.Args()), simsiam.augment(simsiam.Args()))[(0, 7)]
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32


def test_simsiam_trains_on_the_default_cifar10_path(cifar10, tmp_path):
    out = tmp_path / "run"
    run_main(simsiam, "--data-dir", cifar10, "--epochs", "1", "--max-steps", "2", *SMALL, "--out", out)
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and "knn_top1" in rows[-1]


def test_cifar10_absent_and_not_downloadable_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as e:
        data.dataset("cifar10", tmp_path / "empty", "train")
    message = str(e.value.code)
    assert message.startswith("error: cifar10 is not in") and "could not be downloaded" in message
    assert "--data-dir" in message and "\n" not in message


def test_image_folder_and_synthetic(image_folder):
    train = data.dataset("folder", image_folder, "train")
    assert len(train) == 24 and train.classes == ["class0", "class1", "class2"]
    assert len(data.dataset("folder", image_folder, "test")) == 24
    fake = data.dataset("synthetic", "unused", "train", image_size=16)
    fake_test = data.dataset("synthetic", "unused", "test", image_size=16)
    assert fake[0][0].size == (16, 16) and len(fake) == data.SYNTHETIC_SIZE["train"]
    assert not np.array_equal(np.asarray(fake[0][0]), np.asarray(fake_test[0][0]))


def test_knn_is_perfect_on_well_separated_features():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 32), dim=1) * 10
    labels = torch.arange(5).repeat_interleave(40)
    memory = torch.nn.functional.normalize(centres[labels] + torch.randn(200, 32), dim=1)
    q_labels = torch.arange(5).repeat_interleave(10)
    queries = torch.nn.functional.normalize(centres[q_labels] + torch.randn(50, 32), dim=1)
    assert torch.equal(evaluate.knn_predict(queries, memory, labels, k=200, t=0.1), q_labels)
    # and chance level when the labels carry no information
    shuffled = labels[torch.randperm(200)]
    acc = (evaluate.knn_predict(queries, memory, shuffled, k=20, t=0.1) == q_labels).float().mean()
    assert acc < 0.6


def test_knn_weighting_follows_exp_sim_over_t():
    """One query, two classes: three far neighbours of class 0 outvote... only without the weights."""
    memory = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]), dim=1)
    memory[0] = torch.nn.functional.normalize(torch.tensor([1.0, 0.05]), dim=0)
    labels = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    # weights: exp(0.9988/0.1) ≈ 21,600 for class 1 against 3·exp(0) = 3 for class 0
    assert evaluate.knn_predict(query, memory, labels, k=4, t=0.1).item() == 1
    assert evaluate.knn_predict(query, memory, labels, k=4, t=100.0).item() == 0  # near-uniform weights
