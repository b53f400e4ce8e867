"""Loading paths: CIFAR-10 in torchvision's own format, ImageFolder, FakeData; and the kNN monitor."""
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import simsiam
from common import bench, data, evaluate
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


# --- the data pipeline and the kNN monitor through the real loop ------------------------------------

def _record_the_loop(monkeypatch):
    """Wrap simsiam.build_model and ImageFolder.__getitem__: the two views of every step as the model sees
    them, and the order in which the loop's Views read the images (workers 0: the order of the batches)."""
    steps, order = [], []
    build, getitem = simsiam.build_model, torchvision.datasets.ImageFolder.__getitem__

    def build_model(args):
        model = build(args)
        model.register_forward_pre_hook(lambda m, inputs: steps.append([x.detach().clone() for x in inputs]))
        return model
    monkeypatch.setattr(simsiam, "build_model", build_model)
    monkeypatch.setattr(torchvision.datasets.ImageFolder, "__getitem__",
                        lambda self, i: (order.append(i), getitem(self, i))[1])
    return steps, order


def test_each_epoch_of_the_loop_draws_a_new_order_and_new_views(monkeypatch, image_folder, tmp_path):
    """simsiam.py's real loop, two epochs of the 24 images in batches of 8. Each epoch visits every image once,
    in a new order (the sampler's set_epoch); an image's two views are two draws of the augmentation, and its
    views in epoch 2 are not those of epoch 1 (each sample's seed depends on the epoch). A loop that ignores the
    epoch, a Views that returns one draw twice, or a per-sample seed without the epoch fails here."""
    steps, order = _record_the_loop(monkeypatch)
    run_main(simsiam, "--dataset", "folder", "--data-dir", image_folder, *SMALL, "--image-size", "8", "--epochs", "2",
             "--knn-every", "-1", "--dim", "16", "--pred-dim", "8", "--out", tmp_path)
    assert len(steps) == 6 and len(order) == 48  # 3 steps of 8 per epoch
    epochs = [order[:24], order[24:]]
    assert all(sorted(e) == list(range(24)) for e in epochs)  # every image once per epoch
    assert epochs[0] != epochs[1]  # a new order in the second epoch
    views = {}  # image index -> [(view 1, view 2) in epoch 1, ... in epoch 2]
    for s, (x1, x2) in enumerate(steps):
        for j in range(len(x1)):
            views.setdefault(order[8 * s + j], []).append((x1[j], x2[j]))
    for i, ((a1, a2), (b1, b2)) in views.items():
        assert not torch.equal(a1, a2) and not torch.equal(b1, b2), f"image {i}: its two views are one draw"
        assert not torch.equal(a1, b1) and not torch.equal(a2, b2), f"image {i}: the same views in both epochs"


def test_the_knn_monitor_votes_on_eval_mode_features_of_unaugmented_images(monkeypatch, image_folder, tmp_path):
    """The kNN monitor of the real loop (one step, then the final evaluation, --knn-k 5 --knn-t 0.5): its memory
    and queries are the L2-normalised features, in eval mode (BatchNorm's running statistics), of the training
    and test images resized and centre-cropped without augmentation, written out here from torchvision (not
    common.data); the vote gets the run's k and t; and the evaluation leaves the backbone as it found it (its
    running statistics unmoved, its mode restored). A monitor in training mode (batch statistics, running
    statistics moved by the evaluation), an augmented memory bank, or a vote that drops --knn-t fails here."""
    import copy

    from torchvision.transforms import v2
    calls, knn, knn_predict = [], evaluate.knn, evaluate.knn_predict

    def recorded_knn(backbone, *args, **kwargs):
        before = copy.deepcopy(backbone)
        top1 = knn(backbone, *args, **kwargs)
        calls.append({"before": before, "after": copy.deepcopy(backbone), "top1": top1})
        return top1

    def recorded_predict(queries, memory, memory_labels, k=200, t=0.1, num_classes=None, chunk=512):
        predictions = knn_predict(queries, memory, memory_labels, k, t, num_classes, chunk)
        votes.append({"queries": queries, "memory": memory, "labels": memory_labels, "k": k, "t": t,
                      "predictions": predictions})
        return predictions
    votes = []
    monkeypatch.setattr(evaluate, "knn", recorded_knn)
    monkeypatch.setattr(evaluate, "knn_predict", recorded_predict)
    run_main(simsiam, "--dataset", "folder", "--data-dir", image_folder, *SMALL, "--image-size", "8", "--epochs", "1",
             "--max-steps", "1", "--knn-every", "0", "--knn-k", "5", "--knn-t", "0.5", "--dim", "16", "--pred-dim", "8",
             "--out", tmp_path)
    assert len(calls) == len(votes) == 1
    call, vote = calls[0], votes[0]
    before, after = call["before"], call["after"]
    assert before.training and after.training  # the loop's mode, restored after the evaluation
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), f"the evaluation changed {name}"
    assert (vote["k"], vote["t"]) == (5, 0.5)  # the run's --knn-k and --knn-t
    # the features: eval mode, no augmentation, in float64 from the backbone as the evaluation found it
    reference = before.double().eval()
    mean, std = data.IMAGENET_MEAN_STD  # --dataset folder
    transform = v2.Compose([v2.Resize(8), v2.CenterCrop(8), v2.ToImage(), v2.ToDtype(torch.float64, scale=True),
                            v2.Normalize(mean, std)])
    for split, features, labels in [("train", vote["memory"], vote["labels"]), ("test", vote["queries"], None)]:
        folder = torchvision.datasets.ImageFolder(image_folder / split)
        images = torch.stack([transform(folder.loader(path)) for path, _ in folder.samples])
        with torch.no_grad():
            expected = torch.nn.functional.normalize(reference(images), dim=1)
        # float32 features against the float64 reference: at most 2.1e-7 measured (3 seeds, both splits, with the
        # AVX-512, AVX2 and SSE4.1 kernels); a monitor in training mode or on augmented crops is off by far more
        torch.testing.assert_close(features.double(), expected, rtol=0, atol=1e-4, msg=lambda m: f"{split}: {m}")
        if labels is not None:
            assert labels.tolist() == folder.targets
    test_labels = torchvision.datasets.ImageFolder(image_folder / "test").targets
    assert call["top1"] == (vote["predictions"] == torch.tensor(test_labels)).double().mean().item()
    assert metrics(tmp_path)[-1]["knn_top1"] == call["top1"]


@pytest.mark.parametrize("name", ["mocov2", "simsiam", "unigrad", "byol", "barlow", "vicreg"])
def test_the_recipes_blur_with_pils_filter_as_their_official_code(name):
    """MoCo v2 (loader.py), SimSiam, UniGrad: PIL's GaussianBlur(σ), σ ~ U[0.1, 2], p 0.5 on each view; Barlow Twins
    (main.py), VICReg (augmentations.py) and BYOL's torchvision recipe (solo-learn): the same filter and σ, each
    view's own probability."""
    import importlib

    from torchvision.transforms import v2
    module = importlib.import_module(name)
    args = module.Args(**({"blur": True} if "blur" in module.Args.__dataclass_fields__ else {}))
    views = ([module.augment(args, p, 0.0) for p in (1.0, 0.1)] if hasattr(args, "blur1")
             else [module.augment(args)])
    for view, p in zip(views, (1.0, 0.1) if len(views) == 2 else (0.5,)):
        applied = [t for t in view.transforms if isinstance(t, v2.RandomApply)
                   and isinstance(t.transforms[0], data.PILGaussianBlur)]
        assert len(applied) == 1 and applied[0].p == p and applied[0].transforms[0].sigma == (0.1, 2.0), name
        assert not any(isinstance(t, v2.GaussianBlur) for t in view.modules())


def test_run_normalizes_as_the_three_transforms():
    """data.run on data.normalize (its kernels called directly): the values and type of the whole ToImage, ToDtype,
    Normalize, on a batched step's float output, a PIL image and uint8 pixels."""
    from PIL import Image
    from torchvision.transforms import v2
    whole = data.normalize("cifar10")

    def t(x):
        return data.run(whole, x)
    x = torch.rand(3, 8, 9, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    assert torch.equal(t(x), whole(x)) and type(t(x)) is type(whole(x))  # a batched step's plain float tensor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8))
    assert torch.equal(t(image), whole(image)) and type(t(image)) is type(whole(image))  # PIL: the three kernels
    pixels = v2.functional.pil_to_tensor(image)
    assert torch.equal(t(pixels), whole(pixels)) and type(t(pixels)) is type(whole(pixels))  # uint8


@pytest.mark.parametrize("workers", [0, 1])
def test_the_views_batch_is_an_ordinary_tensor_a_model_can_train_on(image_folder, workers):
    """The views are computed in inference mode (data.Views); the collated batch must not be an inference tensor,
    which autograd refuses to save for backward and which refuses in-place changes outside inference mode."""
    base = data.dataset("folder", image_folder, "pretrain", 16)
    views = data.Views(base, *bench.method_views("simsiam", "cifar10"))
    x1, x2 = next(iter(data.train_loader(views, 4, workers, 0, torch.device("cpu"))))
    assert not x1.is_inference() and not x2.is_inference()
    layer = torch.nn.Conv2d(3, 2, 3)
    layer(x1.mul_(1.0)).sum().backward()  # in place, then saved for backward
    assert layer.weight.grad is not None


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_views_run_each_pipeline_as_its_compose_does(dataset):
    """data.run, which calls the kernels of ToImage, ToDtype and RandomHorizontalFlip directly, gives every method's
    views the values and the random draws of the v2.Compose itself, sample for sample."""
    from PIL import Image
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    for name in bench.METHODS:
        for t in bench.method_views(name, dataset):
            for seed, image in enumerate(images):
                with data.seeded(seed):
                    ours, after = data.run(t, image), torch.rand(4)
                with data.seeded(seed):
                    theirs, expected = t(image), torch.rand(4)
                assert type(ours) is type(theirs) and torch.equal(ours, theirs), (name, dataset, seed)
                assert torch.equal(after, expected), (name, dataset, seed)  # the same draws, in the same number
