"""Every recipe number pinned where it acts: one table per method and preset (the CIFAR-10 defaults and the
ImageNet preset), each value with its source, against what the real main() does in a few steps.

Each method's main() runs with its preset's flags on 15 CIFAR-10-format images or a 12-image folder (batches of 4:
3 steps an epoch) at 8 px (12 where a fixed 23-px blur kernel runs), for 4 steps (step 3 is the first of epoch 1),
with the preset's epochs and warmup kept; only the batch (4), the image size, the ImageNet arch (resnet18: the
zero-init of the preset's ResNet-50 is checked on its own, without steps), the loader workers, the MoCo queue and
BN splits (K 16, 2 splits) and the projector widths are overridden, and the lr is checked after the linear scaling
rule at that batch. What main() does is read where it acts: every optimiser step's parameter groups (a global
pre-hook on torch.optim.Optimizer.step), the momentum passed to each method's momentum_update, the model main()
builds (its BN modules after run.prepare, each residual block's last BN γ at initialisation), and the two views
main() hands to the loader, whose random parameters are drawn here from the transforms' own samplers. The BN kinds
at W = 2 come from main() itself on two real gloo ranks. The linear protocol (common.linear) is read the same way.

A missing or wrong number fails with its name, the value main() used, the recipe's value and its source."""
import importlib
import inspect
import math
import random

import numpy as np
import pytest
import torch
import torchvision
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision.transforms import v2

from conftest import SMALL, run_main

from common import cli, data, dist, linear, resnet, tf_image, train

METHODS = ["mocov1", "mocov2", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]
PRESETS = ["cifar10", "imagenet"]
B, S, STEPS = 4, 3, 4  # the batch of the tiny runs, its steps per epoch (12 or 15 images), the steps run

# --- the tables -----------------------------------------------------------------------------------------------
# optimizer: "SGD" or "LARS"; lr: the base lr before the scaling (× B/256 for every method here); schedule:
# "cosine/epoch" (no warmup), "step" (×0.1 at the milestones), "warmup-cosine/step"; warmup: epochs (the cosine's
# end, 0 or 1e-3 × peak, is not reached in 4 steps: tests/test_optim.py's schedules through the real loop pin
# it); groups: per parameter group, the model's top-level modules it holds and its settings; momentum: "m" /
# "tau", its value at step 0 and the schedule that moves it; zero_init: each residual block's last BN γ is 0 at
# initialisation; args: the preset's own hyper-parameters, as cli.parse gives them.

MOCO_V1 = "MoCo v1 §4 (main_moco.py: lr 0.03 at batch 256, wd 1e-4, SGD 0.9, ×0.1 at 120/160)"
MOCO_DEMO = "official CIFAR demo (moco colab/moco_cifar10_demo.ipynb: lr 0.06 at 512, wd 5e-4, m 0.99)"
SIMCLR_TF = "google-research/simclr v1 run.py/model_util.py (LARS, warmup 10 epochs, BN and biases excluded)"
BYOL_CFG = "deepmind-research byol/configs/byol.py (LARS η 1e-3, exclude bias and BN, warmup 10 epochs)"
SOLO = "solo-learn scripts/pretrain/cifar/*.yaml (the CIFAR-10 recipe)"
SIMSIAM = "facebookresearch/simsiam main_simsiam.py (SGD 0.9, cosine per epoch, --fix-pred-lr)"
BT = "facebookresearch/barlowtwins main.py (LARS two groups, warmup 10 epochs, cosine to 1e-3 × peak)"
VICREG = "facebookresearch/vicreg main_vicreg.py (LARS, ndim 1 excluded, warmup 10 epochs, cosine to 1e-3)"
UNIGRAD = "fundamentalvision/UniGrad configs/unigrad.py and pretrainer.py (SGD 0.9, warmup 5 epochs)"
PAPER_LARS = ("the official LARS (η 0.001, no clipping) at both presets; on CIFAR-10 it differs from solo-learn's "
              "(η 0.02, clip_lr), as marked in the method file")


def sgd(modules, wd, source, **extra):
    return dict(modules=modules, weight_decay=(wd, source), momentum=(0.9, source), nesterov=(False, source),
                **extra)


def lars(modules, wd, source, eta=0.001, clip_lr=False, lr_in_momentum=False, flags=None):
    flags = flags or source  # the source of the LARS flags, where it is not the lr's and wd's
    return dict(modules=modules, weight_decay=(wd, source), momentum=(0.9, source), eta=(eta, flags),
                clip_lr=(clip_lr, flags), lr_in_momentum=(lr_in_momentum, flags))


def recipe(optimizer, lr, schedule, groups, zero_init, warmup=(0, "no warmup"), momentum=None, milestones=None,
           **args):
    """One method's table at one preset; every value a (value, source) pair."""
    return dict(optimizer=optimizer, lr=lr, schedule=schedule, warmup=warmup, groups=groups, zero_init=zero_init,
                momentum=momentum, milestones=milestones, args=args)


def _moco(preset, v2_):
    imagenet = preset == "imagenet"
    src = ("MoCo v2 §3 (cosine)" if v2_ else MOCO_V1) if imagenet else MOCO_DEMO
    return recipe(
        ("SGD", MOCO_V1), (0.03, MOCO_V1 + "; the demo's 0.06 at 512 is the same rule"),
        ("cosine/epoch", "MoCo v2 §3: cosine lr") if v2_ else ("step", MOCO_V1),
        [sgd(["encoder_q"], 1e-4 if imagenet else 5e-4, src)],  # θ_q only: θ_k moves by Eq. 2
        (False, "main_moco.py: torchvision ResNet without zero_init_residual; the CIFAR demo's ResNet-18 too"),
        momentum=("m", 0.999 if imagenet else 0.99, "constant", "MoCo v1 §3.3 m 0.999; " + MOCO_DEMO),
        milestones=(None if v2_ else ("120,160", MOCO_V1)),
        K=(65536 if imagenet else 4096, "MoCo v1 §4 K 65536; " + MOCO_DEMO + " K 4096"),
        tau=((0.2 if v2_ else 0.07) if imagenet else 0.1, "v1 §4 τ 0.07, v2 §3 τ 0.2; " + MOCO_DEMO + " τ 0.1"),
        epochs=(200, "v1 §4, v2 §3: 200 epochs; the CIFAR demo: 200"),
        batch_size=(256 if imagenet else 512, "v1 §4: 256; the CIFAR demo: 512"),
        bn_splits=(8, "the CIFAR demo: SplitBatchNorm over 8 sub-batches on one GPU"),
    )


def _table(method, preset):
    imagenet = preset == "imagenet"
    if method in ("mocov1", "mocov2"):
        return _moco(preset, method == "mocov2")
    if method == "simclr":
        src = "SimCLR §B.1/§4: LARS lr 0.3 × B/256, wd 1e-6" if imagenet else "simclr v1 README CIFAR-10 command"
        return recipe(
            ("LARS", "SimCLR §2.2"), (0.3 if imagenet else 1.0, src), ("warmup-cosine/step", SIMCLR_TF),
            [lars(["backbone", "projector"], 1e-6, src, lr_in_momentum=True)],  # lars_optimizer.py classic_momentum
            (True, "simclr resnet.py: batch_norm_relu(init_zero=True) closes every block"),
            warmup=(10, SIMCLR_TF),
            tau=(0.1 if imagenet else 0.5, src), s=(1.0 if imagenet else 0.5, "SimCLR App. A (s 1); v1 README (s 0.5)"),
            batch_size=(4096 if imagenet else 512, src))
    if method == "byol":
        src = BYOL_CFG if imagenet else SOLO
        return recipe(
            ("LARS", "BYOL §3.3"), (0.2 if imagenet else 1.0, "BYOL §3.3 lr 0.2 × B/256" if imagenet else SOLO),
            ("warmup-cosine/step", "BYOL §3.3"),
            [lars(["backbone", "predictor", "projector"], 1.5e-6 if imagenet else 1e-5, src,
                  eta=1e-3 if imagenet else 0.02, clip_lr=not imagenet)],  # the target ξ is not optimised
            # haiku's ResNet BlockV1 zero-inits batchnorm_2's scale in bottleneck blocks (ResNet-50) only, so the
            # ResNet-18 of these runs has none; solo-learn's torchvision ResNet-18 has none either
            (False, "dm-haiku nets/resnet.py BlockV1: scale_init zeros on bottleneck blocks only (ResNet-18: none); "
                    "solo-learn: torchvision resnet18's default"),
            warmup=(10, "BYOL §3.3"),
            momentum=("tau", 0.996 if imagenet else 0.99, "cosine/step", "BYOL §3.3 τ_base 0.996; " + SOLO + " 0.99"),
            batch_size=(4096 if imagenet else 512, "BYOL §3.3: 4096"))
    if method == "simsiam":
        src = "SimSiam §3 baseline settings (lr 0.05, wd 1e-4)" if imagenet else "SimSiam App. D (lr 0.03, wd 5e-4)"
        pred = dict(fixed_lr=(True, "SimSiam §4.2 / main_simsiam.py --fix-pred-lr (ImageNet)")) if imagenet else \
            dict(fixed_lr=(False, "SimSiam App. D: no fixed predictor lr on CIFAR-10"))
        return recipe(
            ("SGD", SIMSIAM), (0.05 if imagenet else 0.03, src), ("cosine/epoch", SIMSIAM),
            [sgd(["backbone", "projector"], 1e-4 if imagenet else 5e-4, src, fixed_lr=(False, SIMSIAM)),
             sgd(["predictor"], 1e-4 if imagenet else 5e-4, src, **pred)],
            (True, "main_simsiam.py: models.__dict__[arch](zero_init_residual=True)"),
            proj_layers=(3 if imagenet else 2, "SimSiam §3 (3 layers); App. D (2 layers on CIFAR-10)"),
            epochs=(100 if imagenet else 800, src), batch_size=(512, src))
    if method == "barlow":
        # the ImageNet preset translates the official lr-biases and wd to the exact gradient (barlow.py's note):
        # lr-biases 0.0048/32 and wd 32 × 1.5e-6, the paper's values at W = 32 GPUs. (The paper's wd 1.5e-6 is
        # kept: main.py's default, which its README's command runs, is 1e-6.)
        src = BT + "; paper: wd 1.5e-6 (main.py default 1e-6); the preset's translation to the exact gradient " \
                   "at W = 32" if imagenet else SOLO
        groups = [lars(["backbone", "projector"], 1.5e-6 * 32 if imagenet else 1e-4, src, flags=PAPER_LARS),
                  lars(["backbone", "projector"], 1.5e-6 * 32 if imagenet else 1e-4, src, flags=PAPER_LARS)]
        groups[0]["ndim"], groups[1]["ndim"] = ("matrices", BT), ("vectors", BT)
        groups[1]["lr_ratio"] = ((0.0048 / 32) / 0.2 if imagenet else 0.0048 / 0.3, src)
        return recipe(
            ("LARS", BT), (0.2 if imagenet else 0.3, src), ("warmup-cosine/step", BT), groups,
            (True, "barlowtwins main.py: torchvision resnet50(zero_init_residual=True)"), warmup=(10, BT),
            lambd=(0.0051, BT), batch_size=(2048 if imagenet else 512, src), epochs=(1000, src))
    if method == "vicreg":
        src = VICREG + "; VICReg §4.2 (lr 0.2, wd 1e-6)" if imagenet else SOLO
        return recipe(
            ("LARS", "VICReg §4.2"), (0.2 if imagenet else 0.3, src), ("warmup-cosine/step", VICREG),
            [lars(["backbone", "expander"], 1e-6 if imagenet else 1e-4, src, flags=PAPER_LARS)],
            (True, "main_vicreg.py: resnet.__dict__[arch](zero_init_residual=True)"), warmup=(10, VICREG),
            sim_coeff=(25.0, VICREG), std_coeff=(25.0, VICREG), cov_coeff=(1.0, VICREG),
            batch_size=(2048 if imagenet else 512, src))
    if method == "unigrad":
        src = UNIGRAD if imagenet else UNIGRAD + "; CIFAR-10 wd 5e-4 as SimSiam App. D"
        return recipe(
            ("SGD", UNIGRAD), (0.05, UNIGRAD), ("warmup-cosine/step", UNIGRAD),
            [sgd(["backbone", "projector"], 1e-4 if imagenet else 5e-4, src)],  # the momentum branch is not optimised
            (True, "UniGrad project/model.py: zero_init_residual True by default"), warmup=(5, UNIGRAD),
            momentum=("m", 0.996, "cosine/step", UNIGRAD + " base_momentum 0.996"),
            lambd=(100.0, UNIGRAD), rho=(0.99, UNIGRAD), batch_size=(1024 if imagenet else 512, src))
    raise KeyError(method)


# The augmentation of each view: crop's smallest area; colour jitter's probability and strengths (brightness,
# contrast, saturation as the largest change |f − 1| of torchvision's factors or TF's contrast/saturation
# factors, and TF's additive brightness δ; hue as the largest |shift|, in turns); grayscale, blur and solarize
# probabilities; the blur's σ range.
MOCO_AUG = "MoCo v1 §3.3 (main_moco.py aug: crop (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.4), grayscale 0.2)"
AUG_PLUS = "MoCo v2 aug+ (main_moco.py --aug-plus: jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur 0.5)"
BYOL_T6 = "BYOL App. B Table 6 (jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur 1.0/0.1, solarize 0/0.2)"


def view(crop, jitter, strengths, gray, blur, solarize, source):
    b, c, s, h = strengths
    return dict(crop_min=crop, jitter_p=jitter, brightness=b, contrast=c, saturation=s, hue=h, gray_p=gray,
                blur_p=blur, solarize_p=solarize, source=source)


def _views(method, preset):
    imagenet = preset == "imagenet"
    cifar_blur = " (CIFAR-10: no blur at 32 px)"
    if method == "mocov1":
        v = view(0.2, 1.0, (0.4, 0.4, 0.4, 0.4), 0.2, 0.0, 0.0, MOCO_AUG)
        return v, v
    if method in ("mocov2", "unigrad", "simsiam"):
        source = AUG_PLUS + ("" if imagenet else cifar_blur) + {"unigrad": "; UniGrad: MoCo v2's augmentation",
                                                                "simsiam": "; SimSiam App. A, App. D"}.get(method, "")
        v = view(0.2, 0.8, (0.4, 0.4, 0.4, 0.1), 0.2, 0.5 if imagenet else 0.0, 0.0, source)
        return v, v
    if method == "simclr":
        s = 1.0 if imagenet else 0.5
        v = view(0.08, 0.8, (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), 0.2, 0.5 if imagenet else 0.0, 0.0,
                 f"SimCLR App. A color_distortion(s = {s}) (data_util.py), crop area (0.08, 1); blur 0.5 on ImageNet, "
                 f"none in the v1 README's CIFAR-10 command")
        return v, v
    if method in ("byol", "barlow", "vicreg"):
        crop = 0.2 if method == "vicreg" and not imagenet else 0.08
        if imagenet:
            return (view(crop, 0.8, (0.4, 0.4, 0.2, 0.1), 0.2, 1.0, 0.0, BYOL_T6),
                    view(crop, 0.8, (0.4, 0.4, 0.2, 0.1), 0.2, 0.1, 0.2, BYOL_T6))
        solar = (0.1, 0.1) if method == "vicreg" else (0.0, 0.2)
        return (view(crop, 0.8, (0.4, 0.4, 0.2, 0.1), 0.2, 0.0, solar[0], SOLO + cifar_blur),
                view(crop, 0.8, (0.4, 0.4, 0.2, 0.1), 0.2, 0.0, solar[1], SOLO + cifar_blur))
    raise KeyError(method)


# --- what the real main() does --------------------------------------------------------------------------------

SMALL_HEADS = {"mocov1": ["--dim", "16", "--K", "16", "--bn-splits", "2"],
               "mocov2": ["--dim", "16", "--K", "16", "--bn-splits", "2"],
               "simclr": ["--dim", "16"], "byol": ["--hidden-dim", "16", "--dim", "8"],
               "simsiam": ["--dim", "16", "--pred-dim", "8"], "barlow": ["--dim", "16"], "vicreg": ["--dim", "16"],
               "unigrad": ["--dim", "16"]}


def image_size(method, preset):
    """8 px, or 12 where torchvision's blur of a fixed 23-px kernel runs (it needs a side above 11)."""
    fixed_kernel = any(isinstance(t, v2.GaussianBlur) and max(t.kernel_size) > 8
                       for view in augment_of(method, preset) for t in flat(view))
    return "12" if fixed_kernel else "8"


def augment_of(method, preset):
    """The two view pipelines that the method's augment() builds from its preset's Args."""
    module = importlib.import_module(method)
    args = cli.parse(module.Args, module.PRESETS, ["--dataset", preset, "--image-size", "8"])
    if "blur1" in inspect.signature(module.augment).parameters or hasattr(args, "blur1"):
        return module.augment(args, args.blur1, args.solarize1), module.augment(args, args.blur2, args.solarize2)
    return module.augment(args), module.augment(args)


def flat(t):
    """Every transform inside a v2 pipeline (Compose, RandomApply)."""
    yield t
    for child in getattr(t, "transforms", []):
        yield from flat(child)


def tiny_argv(method, preset, folder):
    return ["--dataset", preset, "--data-dir", str(folder), *SMALL, "--batch-size", str(B),
            "--image-size", image_size(method, preset), "--arch", "resnet18",
            "--knn-every", "-1", *SMALL_HEADS[method]]


def last_bns(backbone):
    """Each residual block's last BN (BasicBlock.bn2, Bottleneck.bn3): the γ that zero-init sets to 0."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return [m.bn3 if isinstance(m, Bottleneck) else m.bn2 for m in backbone.modules()
            if isinstance(m, (BasicBlock, Bottleneck))]


def bn_kinds(model):
    """{top-level module: sorted set of the BN classes in it}."""
    kinds = {}
    for name, m in dist.unwrap(model).named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            kinds.setdefault(name.split(".")[0], set()).add(type(m).__name__)
    return {k: sorted(v) for k, v in kinds.items()}


class Observed:
    """What one run of main() did: optimiser groups per step, momenta, the model at build, views."""

    def __init__(self):
        self.steps, self.momenta, self.views, self.zero, self.bn, self.names = [], {}, None, None, None, {}


def observe(module, argv, mp, tmp_path):
    seen = Observed()
    build = module.build_model

    def build_model(args):
        model = build(args)
        seen.zero = [bool((bn.weight == 0).all()) for bn in last_bns(model.backbone)]
        seen.nonzero = [bool((bn.weight != 0).all()) for bn in last_bns(model.backbone)]
        seen.names = {id(p): n for n, p in model.named_parameters()}
        return model
    mp.setattr(module, "build_model", build_model)

    def step_hook(opt, args, kwargs):
        seen.steps.append((type(opt).__name__, [
            {**{k: v for k, v in g.items() if k != "params"}, "fixed": "fixed_lr" in g,
             "modules": sorted({seen.names[id(p)].split(".")[0] for p in g["params"]}),
             "ndim": sorted({p.ndim for p in g["params"]})} for g in opt.param_groups]))
    handle = register_optimizer_step_pre_hook(step_hook)

    if hasattr(module, "momentum_update"):
        update = module.momentum_update

        def momentum_update(online, target, m):
            seen.momenta.setdefault(len(seen.steps), float(m))
            return update(online, target, m)
        mp.setattr(module, "momentum_update", momentum_update)

    loader = data.train_loader

    def train_loader(views, *a, **k):
        seen.views = views
        return loader(views, *a, **k)
    mp.setattr(data, "train_loader", train_loader)
    watch = train.Run.watch

    def watch_(self, model, *a, **k):
        seen.bn = bn_kinds(model)
        return watch(self, model, *a, **k)
    mp.setattr(train.Run, "watch", watch_)
    mp.setattr(train.Run, "save", lambda self: None)  # (no checkpoint: not a recipe number, and 90 MB a run)
    try:
        run_main(module, *argv, "--out", tmp_path)
    finally:
        handle.remove()
    return seen


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """preset -> data root: CIFAR-10 in torchvision's format (15 images), an ImageFolder (12 images of 16 px):
    3 steps of 4 an epoch."""
    from conftest import write_cifar10, write_image_folder
    return {"cifar10": write_cifar10(tmp_path_factory.mktemp("cifar10"), per_batch=3, test=4),
            "imagenet": write_image_folder(tmp_path_factory.mktemp("imagenet"), classes=3, per_class=4, size=16)}


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    """(method, preset) -> Observed, one run of main() each, shared by the tests below."""
    cache = {}

    def get(method, preset):
        if (method, preset) not in cache:
            module = importlib.import_module(method)
            with pytest.MonkeyPatch.context() as mp:
                # the CIFAR-10 files are ours, not the published ones: torchvision's md5 check skipped (test_data.py)
                mp.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
                mp.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
                cache[method, preset] = observe(module, [*tiny_argv(method, preset, folders[preset]),
                                                         "--max-steps", str(STEPS)], mp,
                                                tmp_path_factory.mktemp(f"{method}-{preset}"))
        return cache[method, preset]
    return get


def expected_lr(r, args, k):
    """The peak group's lr at step k, written from the recipe (not from common.optim)."""
    peak = r["lr"][0] * B / 256  # the linear scaling rule, lr × N/256
    E, kind = args.epochs, r["schedule"][0]
    if kind == "cosine/epoch":
        return peak * (1 + math.cos(math.pi * (k // S) / E)) / 2
    if kind == "step":
        milestones = [int(e) * E // 200 for e in r["milestones"][0].split(",")]
        return peak * 0.1 ** sum(k // S >= m for m in milestones)
    warmup = r["warmup"][0] * S
    assert k < warmup  # (4 steps: inside every warmup here)
    return peak * k / warmup


CASES = [(m, p) for m in METHODS for p in PRESETS]
IDS = [f"{m}-{p}" for m, p in CASES]


@pytest.mark.parametrize("method,preset", CASES, ids=IDS)
def test_each_recipe_number_arrives_at_the_step(method, preset, runs, folders):
    """The optimiser, its lr at steps 0-3 after the scaling rule (warmup, schedule, fixed predictor lr), weight
    decay, momentum, Nesterov and the LARS flags of every parameter group, which modules each group holds (and
    which not: θ_k, ξ, the momentum branch), τ / m at each step, each residual block's last BN γ at
    initialisation, the BN classes at W = 1, and the preset's own hyper-parameters. The lr values are Python
    floats computed in double precision both here and in main(): rel 1e-12."""
    module = importlib.import_module(method)
    r = _table(method, preset)
    args = cli.parse(module.Args, module.PRESETS, tiny_argv(method, preset, folders[preset]))
    seen = runs(method, preset)
    wrong = []

    def check(name, got, value, source, close=False):
        # close: Python floats computed in double precision here and in main(), rel 1e-12; "float32": a value
        # main() holds in a float32 tensor (UniGrad's m buffer), one rounding, rel 2^-24
        rel = 2**-24 if close == "float32" else 1e-12
        ok = got is not None and math.isclose(got, value, rel_tol=rel, abs_tol=1e-15) if close else got == value
        if not ok:
            wrong.append(f"{method} {preset}: {name} is {got!r}, the recipe says {value!r} ({source})")

    assert len(seen.steps) == STEPS, f"{method} {preset}: {len(seen.steps)} optimiser steps, not {STEPS}"
    check("optimizer", seen.steps[0][0], *r["optimizer"])
    for k, (_, groups) in enumerate(seen.steps):
        lr = expected_lr(r, args, k)
        what = f"lr at step {k} ({r['lr'][0]} × B/256, {r['schedule'][0]}, warmup {r['warmup'][0] or 0} epochs)"
        check(what, groups[0]["lr"], lr, r["lr"][1] + "; " + r["schedule"][1], close=True)
        if len(groups) != len(r["groups"]):
            wrong.append(f"{method} {preset}: {len(groups)} parameter groups, the recipe has {len(r['groups'])}")
            break
        for i, (g, want) in enumerate(zip(groups, r["groups"])):
            check(f"group {i}'s modules", g["modules"], want["modules"], r["optimizer"][1])
            if "ndim" in want:  # Barlow Twins: weights (ndim > 1) in one group, biases and BN (ndim 1) in the other
                kind = "vectors" if g["ndim"] == [1] else "matrices" if 1 not in g["ndim"] else "both"
                check(f"group {i}'s parameters", kind, *want["ndim"])
            for key in ("weight_decay", "momentum", "nesterov", "eta", "clip_lr", "lr_in_momentum"):
                if key in want:
                    check(f"group {i}'s {key}", g.get(key), *want[key], close=isinstance(want[key][0], float))
            if "fixed_lr" in want:
                check(f"group {i}'s fixed lr", g["fixed"], *want["fixed_lr"])
                if want["fixed_lr"][0]:
                    check(f"group {i}'s lr at step {k} (fixed at the initial lr)", g["lr"], r["lr"][0] * B / 256,
                          want["fixed_lr"][1], close=True)
                elif i > 0:
                    check(f"group {i}'s lr at step {k}", g["lr"], lr, want["fixed_lr"][1], close=True)
            if "lr_ratio" in want:
                check(f"group {i}'s lr at step {k} (lr-biases)", g["lr"], lr * want["lr_ratio"][0], want["lr_ratio"][1],
                      close=True)
    if r["momentum"]:
        name, base, schedule, source = r["momentum"]
        total = args.epochs * S
        for k in range(STEPS):
            # the official codes' cosine from base to 1 over all K steps (BYOL §3.3, UniGrad's pretrainer.py)
            want = base if schedule == "constant" else 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2
            # (BYOL moves ξ after step k's optimiser step, Eq. 1 after Eq. 3: recorded under k + 1)
            check(f"{name} at step {k} ({schedule})", seen.momenta.get(k + (method == "byol")), want, source,
                  close="float32" if method == "unigrad" else True)
    zero, source = r["zero_init"]
    check("residual blocks in the backbone", len(seen.zero), 8, "torchvision resnet18: 8 blocks")  # (never vacuous)
    check("every block's last BN γ zero at initialisation" if zero else "no block's last BN γ zero at initialisation",
          all(seen.zero) if zero else all(seen.nonzero), True, source)
    moco = method.startswith("moco")
    expected_bn = "SplitBatchNorm" if moco else None  # one process: MoCo's SplitBN (the CIFAR demo); else plain BN
    check("modules holding BN", "backbone" in seen.bn or "encoder_q" in seen.bn, True, "every method's ResNet")
    for part, kinds in seen.bn.items():
        if moco and part in ("encoder_q", "encoder_k"):
            check(f"BN classes of {part} at W = 1", kinds, [expected_bn], MOCO_DEMO + ": SplitBatchNorm")
        else:
            check(f"BN classes of {part} at W = 1", all(k.startswith("BatchNorm") for k in kinds), True,
                  "one process: PyTorch's BatchNorm over the whole batch")
    preset_args = cli.parse(module.Args, module.PRESETS, ["--dataset", preset])
    for name, (value, source) in r["args"].items():
        check(f"--{name.replace('_', '-')}", getattr(preset_args, name), value, source,
              close=isinstance(value, float))
    if r["warmup"][0]:
        check("--warmup-epochs", preset_args.warmup_epochs, *r["warmup"])
    if r["milestones"]:
        check("--schedule", preset_args.schedule, *r["milestones"])
    if preset == "imagenet":
        check("--arch", preset_args.arch, "resnet50", "every paper's ImageNet ResNet-50")
    assert not wrong, "\n".join(wrong)


ZERO_INIT_R50 = {  # the ImageNet ResNet-50: each bottleneck's bn3 γ zero at initialisation
    "mocov1": (False, "main_moco.py: torchvision resnet50 without zero_init_residual"),
    "mocov2": (False, "main_moco.py: torchvision resnet50 without zero_init_residual"),
    "simclr": (True, "simclr resnet.py bottleneck_block: batch_norm_relu(init_zero=True)"),
    "byol": (True, "dm-haiku nets/resnet.py BlockV1 (bottleneck): batchnorm_2 scale_init zeros"),
    "simsiam": (True, "main_simsiam.py: models.__dict__[arch](zero_init_residual=True)"),
    "barlow": (True, "barlowtwins main.py: torchvision resnet50(zero_init_residual=True)"),
    "vicreg": (True, "main_vicreg.py: resnet.__dict__[arch](zero_init_residual=True)"),
    "unigrad": (True, "UniGrad project/model.py: zero_init_residual True by default"),
}


@pytest.mark.parametrize("method", METHODS)
def test_the_imagenet_resnet50_zero_inits_where_the_official_code_does(method, monkeypatch):
    """The preset's ResNet-50 (the runs above use a ResNet-18): every bottleneck's last BN γ is 0 at initialisation
    where the official code zero-inits it, and none is where it does not. (The convolutions' random init, which
    sets no BN γ, is skipped: a second a model.)"""
    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", lambda t, *a, **k: t)
    module = importlib.import_module(method)
    args = cli.parse(module.Args, module.PRESETS, ["--dataset", "imagenet", "--image-size", "8",
                                                   *SMALL_HEADS[method]])
    assert args.arch == "resnet50"
    gammas = [bn.weight for bn in last_bns(module.build_model(args).backbone)]
    zero, source = ZERO_INIT_R50[method]
    got = all((g == 0).all() for g in gammas) if zero else all((g != 0).all() for g in gammas)
    assert len(gammas) == 16 and got, f"{method} imagenet: each bottleneck's last BN γ {'' if zero else 'non'}zero " \
                                      f"at initialisation: not so ({source})"


# --- the augmentation, drawn --------------------------------------------------------------------------------

class Draws:
    """The random parameters each view's transforms drew, read at their own samplers (torchvision's make_params,
    PIL's GaussianBlur, common.tf_image's ops and crops), whichever implementation a view uses."""

    def __init__(self):
        self.crop, self.jitter, self.blur, self.gray, self.solarize = [], [], [], 0, 0


def _record(mp, d):
    from PIL import ImageFilter
    from torchvision.transforms.v2._utils import query_size

    def wrap(owner, name, after):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            out = original(*a, **k)
            after(out, *a, **k)
            return out
        mp.setattr(owner, name, wrapper)

    def crop(out, self, flat):
        height, width = query_size(flat)
        d.crop.append(out["height"] * out["width"] / (height * width))
    wrap(v2.RandomResizedCrop, "make_params", crop)
    wrap(v2.ColorJitter, "make_params", lambda out, *a: d.jitter.append(dict(
        brightness=abs(out["brightness_factor"] - 1), contrast=abs(out["contrast_factor"] - 1),
        saturation=abs(out["saturation_factor"] - 1), hue=abs(out["hue_factor"]))))
    wrap(v2.RandomGrayscale, "make_params", lambda *a: setattr(d, "gray", d.gray + 1))
    wrap(v2.RandomSolarize, "transform", lambda *a: setattr(d, "solarize", d.solarize + 1))
    wrap(v2.GaussianBlur, "make_params", lambda out, *a: d.blur.append(out["sigma"][0]))
    init = ImageFilter.GaussianBlur.__init__  # PIL's blur, GaussianBlur(radius=σ) as the official PyTorch codes

    def pil_blur(self, radius=2, *a, **k):
        d.blur.append(float(radius[0] if isinstance(radius, (tuple, list)) else radius))
        init(self, radius, *a, **k)
    mp.setattr(ImageFilter.GaussianBlur, "__init__", pil_blur)
    # TF's operations (SimCLR, BYOL's ImageNet pipeline), each called on its one image when it is applied
    jitter = {}
    for op, key, centre in (("adjust_brightness", "brightness", 0.0), ("adjust_contrast", "contrast", 1.0),
                            ("adjust_saturation", "saturation", 1.0), ("adjust_hue", "hue", 0.0)):
        def after(out, x, parameter, key=key, centre=centre):
            jitter[key] = abs(float(parameter) - centre)
            if len(jitter) == 4:
                d.jitter.append(dict(jitter))
                jitter.clear()
        wrap(tf_image, op, after)
    wrap(tf_image, "rgb_to_grayscale", lambda *a: setattr(d, "gray", d.gray + 1))
    wrap(tf_image, "gaussian_blur", lambda out, x, sigma, k: d.blur.append(float(sigma)))
    for sampler in ("sample_distorted_bounding_box", "random_crop_clamped"):
        wrap(tf_image, sampler, lambda out, g, n, height, width, *a, **k: d.crop.append(
            float(out[2] * out[3]) / (height * width)))
    apply = tf_image.random_apply

    def random_apply(fn, x, p, g=None):  # BYOL's solarization is a lambda: x ≥ 0.5 → 1 − x with torch.where
        if "where" in fn.__code__.co_names and "gaussian_blur" not in fn.__code__.co_names:
            def counted(x, fn=fn):
                d.solarize += 1
                return fn(x)
            return apply(counted, x, p, g)
        return apply(fn, x, p, g)
    mp.setattr(tf_image, "random_apply", random_apply)


N = 200  # images drawn per view


def draw(t, seed=0):
    """Apply the view `t` to N random 32-px images; the parameters it drew."""
    from PIL import Image
    d = Draws()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    random.seed(seed)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(N)]
    with pytest.MonkeyPatch.context() as mp:
        _record(mp, d)
        for image in images:
            t(image)
    return d


def probability_ok(count, p):
    """count of N draws against probability p: exact at 0 and 1, else within 4.5 binomial standard deviations
    (a false failure about once in 10^5 seeds)."""
    if p in (0.0, 1.0):
        return count == p * N
    return abs(count / N - p) <= 4.5 * math.sqrt(p * (1 - p) / N)


@pytest.mark.parametrize("method,preset", CASES, ids=IDS)
def test_each_views_augmentation_draws_the_recipes_parameters(method, preset, runs):
    """The two views main() hands to the loader, each applied to N images: the smallest crop area drawn, the
    probability of the colour jitter, grayscale, blur and solarization, the largest brightness, contrast,
    saturation and hue changes drawn, and the blur's σ range, against each view's recipe. Bounds: the crop's
    smallest area lies in [0.85·min, min + 0.05] (the sides are rounded to whole pixels of 32: area within 11%;
    a draw below min + 0.05 has probability ≥ 5%, missed in N = 200 draws about once in 10^5); the largest
    jitter change of about 160 draws lies in [0.9·s, s] (missed with probability 0.9^160 ≈ 5·10^-8); σ lies in
    [0.1, 2] and spans half of it over 20 draws or more."""
    wrong = []
    for i, (t, want) in enumerate(zip((runs(method, preset).views.t1, runs(method, preset).views.t2),
                                      _views(method, preset)), start=1):
        d, source = draw(t), want["source"]
        say = lambda name, got, value: wrong.append(  # noqa: E731
            f"{method} {preset} view {i}: {name} is {got}, the recipe says {value} ({source})")
        lo = min(d.crop, default=None)
        if lo is None or not 0.85 * want["crop_min"] <= lo <= want["crop_min"] + 0.05:
            say("the smallest crop area drawn", lo, f"{want['crop_min']} (crop area ({want['crop_min']}, 1))")
        for name, count in (("jitter", len(d.jitter)), ("grayscale", d.gray), ("blur", len(d.blur)),
                            ("solarize", d.solarize)):
            p = want[{"jitter": "jitter_p", "grayscale": "gray_p", "blur": "blur_p", "solarize": "solarize_p"}[name]]
            if not probability_ok(count, p):
                say(f"the {name} probability", count / N, p)
        for key in ("brightness", "contrast", "saturation", "hue"):
            top = max((j[key] for j in d.jitter), default=0.0)
            if not 0.9 * want[key] <= top <= want[key] * (1 + 1e-6) + 1e-7:
                say(f"the largest {key} change drawn", round(top, 4), f"±{want[key]}")
        if d.blur and not (min(d.blur) >= 0.1 - 1e-6 and max(d.blur) <= 2.0 + 1e-6
                           and (len(d.blur) < 20 or max(d.blur) - min(d.blur) >= 0.95)):
            say("the blur's σ range", (round(min(d.blur), 3), round(max(d.blur), 3)), "σ ~ U[0.1, 2.0]")
    assert not wrong, "\n".join(wrong)


# --- BN across ranks ------------------------------------------------------------------------------------------

class _Built(Exception):
    """Raised once main() has prepared its model on a rank."""


def _bn_on_a_rank(rank, world, method, argv):
    """main() on this gloo rank up to run.watch: the BN classes of the model it prepared."""
    module = importlib.import_module(method)
    seen = {}

    def watch(self, model, *a, **k):
        seen.update(bn_kinds(model))
        raise _Built
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Run, "watch", watch)
        try:
            run_main(module, *argv, "--out", f"{argv[argv.index('--data-dir') + 1]}-{method}-run")
        except _Built:
            pass
    return seen


BN_AT_W2 = {  # the BN of every module at W = 2: global (GlobalBatchNorm on CPU, SyncBatchNorm on CUDA) or per GPU
    "mocov1": ("per-GPU", "MoCo §3.3 Shuffling BN: each GPU's own BN (main_moco.py keeps BatchNorm; SyncBN leaks, "
                          "moco#46)"),
    "mocov2": ("per-GPU", "MoCo v2: as v1, main_moco.py keeps per-GPU BN with ShuffleBN"),
    "simclr": ("global", "SimCLR §2.2 Global BN"),
    "byol": ("global", "BYOL App. B: BN statistics over all devices (cross_replica_axis)"),
    "simsiam": ("global", "main_simsiam.py: convert_sync_batchnorm; SimSiam §4.4 / Table 5"),
    "barlow": ("global", "barlowtwins main.py: convert_sync_batchnorm"),
    "vicreg": ("global", "main_vicreg.py: convert_sync_batchnorm"),
    "unigrad": ("global", "UniGrad project/pretrainer.py: convert_sync_batchnorm"),
}


@pytest.mark.parametrize("method", METHODS)
def test_the_bn_of_every_module_on_two_ranks(method, gloo, folders):
    """main() on two real gloo ranks builds every BN over the global batch where the official code converts to
    SyncBN, and keeps each GPU's own BN in both MoCo encoders (ShuffleBN needs it). (main() stops once its model
    is prepared.)"""
    argv = tiny_argv(method, "imagenet", folders["imagenet"])
    kind, source = BN_AT_W2[method]
    want = {"GlobalBatchNorm"} if kind == "global" else {"BatchNorm1d", "BatchNorm2d"}
    for rank, kinds in enumerate(gloo(2).run(_bn_on_a_rank, method, argv)):
        assert kinds, f"{method}: no BN module found on rank {rank}"
        wrong = {part: k for part, k in kinds.items() if not set(k) <= want}
        assert not wrong, f"{method} at W = 2, rank {rank}: BN classes {wrong}, the recipe says {kind} BN " \
                          f"({sorted(want)}) ({source})"


# --- the linear protocol (common.linear) ----------------------------------------------------------------------

SIMCLR_LIN = "google-research/simclr README, linear eval (--optimizer=momentum: Nesterov; learning_rate_scaling linear)"
LINEAR = {  # per protocol: optimiser settings, the base lr and whether it scales by B/256, epochs, the schedule
    "cifar10": dict(nesterov=True, lr=0.1, scale=True, wd=0.0, epochs=100, per="step", lars=False,
                    source=SIMCLR_LIN + ", CIFAR-10 command: lr 0.1, wd 0, 100 epochs, cosine per step"),
    "mocov1": dict(nesterov=False, lr=30.0, scale=False, wd=0.0, epochs=100, per="milestones", lars=False,
                   source="moco main_lincls.py: SGD lr 30 (not scaled), wd 0, 100 epochs, ×0.1 at 60, 80"),
    "mocov2": dict(nesterov=False, lr=30.0, scale=False, wd=0.0, epochs=100, per="milestones", lars=False,
                   source="moco main_lincls.py (MoCo v2 README: the same command)"),
    "simclr": dict(nesterov=True, lr=0.1, scale=True, wd=1e-6, epochs=90, per="step", lars=False,
                   source=SIMCLR_LIN + ", ImageNet: lr 0.1 × B/256, wd 1e-6, 90 epochs, cosine per step"),
    "byol": dict(nesterov=True, lr=0.2, scale=True, wd=0.0, epochs=80, per="step", lars=False,
                 source="deepmind-research byol/configs/eval.py: Nesterov, 0.2 × B/256, wd 0, 80 epochs, cosine"),
    "simsiam": dict(nesterov=False, lr=0.1, scale=True, wd=0.0, epochs=90, per="epoch", lars=True,
                    source="simsiam main_lincls.py --lars: LARC over SGD, init_lr = 0.1 × B/256, wd 0, 90 epochs, "
                           "cosine per epoch"),
    "unigrad": dict(nesterov=False, lr=0.1, scale=True, wd=0.0, epochs=90, per="epoch", lars=True,
                    source="UniGrad lineval.py / run_linear.sh --lars (SimSiam's protocol)"),
    "barlow": dict(nesterov=False, lr=0.3, scale=False, wd=1e-6, epochs=100, per="epoch", lars=False,
                   source="barlowtwins evaluate.py: lr-classifier 0.3 (not scaled), wd 1e-6, 100 epochs, "
                          "CosineAnnealingLR per epoch"),
    "vicreg": dict(nesterov=False, lr=0.02, scale=False, wd=1e-6, epochs=100, per="epoch", lars=False,
                   source="vicreg README linear evaluation (--lr-head 0.02), evaluate.py: wd 1e-6, 100 epochs, "
                          "cosine per epoch"),
}


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
    """A run directory with a random ResNet-18 (CIFAR stem) backbone.pt and its config.json (8 px)."""
    import json
    run = tmp_path_factory.mktemp("linear-run")
    torch.manual_seed(0)
    torch.save(resnet.resnet("resnet18", cifar_stem=True).state_dict(), run / "backbone.pt")
    (run / "config.json").write_text(json.dumps({"method": "simsiam", "image_size": 8}))
    return run


@pytest.mark.parametrize("protocol", list(LINEAR))
def test_the_linear_protocols_lr_and_schedule_at_the_step(protocol, backbone_run, folders, tmp_path):
    """common.linear's standard protocol for CIFAR-10 and for each method's ImageNet recipe, 4 steps at batch 4
    (3 steps an epoch): the lr the optimiser uses at each step (base lr, × B/256 where the official code scales,
    cosine per step or per epoch, or constant before the milestones), Nesterov, momentum, weight decay, and
    LARC's scaling before each step where the official code uses it. Floats in double precision: rel 1e-12."""
    want = LINEAR[protocol]
    steps, larc = [], []
    dataset = ["--dataset", "imagenet", "--method", protocol] if protocol != "cifar10" else ["--dataset", "folder"]
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: steps.append(dict(opt.param_groups[0], params=None)))
    try:
        with pytest.MonkeyPatch.context() as mp:
            larc_ = linear.larc_
            mp.setattr(linear, "larc_", lambda *a, **k: (larc.append(len(steps)), larc_(*a, **k)))
            linear.main(cli.parse(linear.Args, argv=[
                "--backbone", str(backbone_run / "backbone.pt"), *dataset, "--data-dir", str(folders["imagenet"]),
                "--batch-size", str(B), "--max-steps", str(STEPS), "--workers", "0", "--device", "cpu",
                "--image-size", "8", "--out", str(tmp_path)]))
    finally:
        handle.remove()
    base = want["lr"] * B / 256 if want["scale"] else want["lr"]
    E, wrong = want["epochs"], []
    for k, g in enumerate(steps):
        lr = {"step": base * (1 + math.cos(math.pi * k / (E * S))) / 2,
              "epoch": base * (1 + math.cos(math.pi * (k // S) / E)) / 2,
              "milestones": base}[want["per"]]  # (×0.1 from epoch 60: pinned by test_evaluation's lr_at test)
        if not math.isclose(g["lr"], lr, rel_tol=1e-12):
            wrong.append(f"lr at step {k} is {g['lr']!r}, the recipe says {lr!r} ({want['lr']}"
                         f"{' × B/256' if want['scale'] else ', not scaled'}, cosine per {want['per']}, {E} epochs)")
        for key, value in (("nesterov", want["nesterov"]), ("momentum", 0.9), ("weight_decay", want["wd"])):
            if g[key] != value:
                wrong.append(f"{key} at step {k} is {g[key]!r}, the recipe says {value!r}")
    if len(steps) != STEPS:
        wrong.append(f"{len(steps)} steps, not {STEPS}")
    if larc != (list(range(STEPS)) if want["lars"] else []):
        wrong.append(f"LARC ran before steps {larc}, the recipe says {'every step' if want['lars'] else 'none'}")
    assert not wrong, f"linear protocol {protocol}: " + "\n".join(wrong) + f"\n({want['source']})"
