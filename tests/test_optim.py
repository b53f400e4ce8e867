"""LARS against a hand-written step, and the schedules at their endpoints."""
import math

import pytest
import torch

from common import optim


def reference_lars_step(w, g, mu, lr, wd, momentum=0.9, eta=0.001):
    """RECIPES.md: g ← g + wd·w; g ← g·η‖w‖/‖g‖; μ ← momentum·μ + g; w ← w − lr·μ (ndim==1: no wd, no ratio)."""
    w, g, mu = w.clone(), g.clone(), mu.clone()
    if w.ndim > 1:
        g = g + wd * w
        wn, gn = w.norm().item(), g.norm().item()
        if wn > 0 and gn > 0:
            g = g * (eta * wn / gn)
    mu = momentum * mu + g
    return w - lr * mu, mu


@pytest.mark.parametrize("shape", [(5, 3), (4,), (2, 3, 3, 3)])
def test_lars_matches_reference_over_steps(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    opt = optim.LARS([w], lr=0.5, weight_decay=1e-2, momentum=0.9)
    ref_w, ref_mu = w.detach().clone(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(shape, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        ref_w, ref_mu = reference_lars_step(ref_w, g, ref_mu, lr=0.5, wd=1e-2)
        torch.testing.assert_close(w.detach(), ref_w, rtol=1e-12, atol=1e-12)


def test_lars_zero_norm_guard():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    opt = optim.LARS([w], lr=1.0, weight_decay=0.0)
    w.grad = torch.ones(3, 3)
    opt.step()  # ‖w‖ = 0: trust ratio 1, plain momentum step
    torch.testing.assert_close(w.detach(), -torch.ones(3, 3))
    w.grad = torch.zeros(3, 3)
    opt.step()  # ‖g‖ = 0: no division by zero
    assert torch.isfinite(w).all()


def test_warmup_cosine_endpoints():
    base, total, warmup = 0.6, 100, 10
    assert optim.warmup_cosine(0, total, warmup, base) == 0.0
    assert math.isclose(optim.warmup_cosine(5, total, warmup, base), base / 2)
    assert math.isclose(optim.warmup_cosine(warmup, total, warmup, base), base)  # peak right after warmup
    assert math.isclose(optim.warmup_cosine(total, total, warmup, base), 0.0, abs_tol=1e-15)
    assert math.isclose(optim.warmup_cosine(total, total, warmup, base, final=1e-3 * base), 1e-3 * base)
    mid = optim.warmup_cosine(warmup + (total - warmup) // 2, total, warmup, base)
    assert math.isclose(mid, base / 2)
    values = [optim.warmup_cosine(s, total, warmup, base) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after the warmup


def test_cosine_endpoints_and_fixed_lr_groups():
    assert optim.cosine(0, 800, 0.06) == 0.06
    assert math.isclose(optim.cosine(800, 800, 0.06), 0.0, abs_tol=1e-15)
    assert math.isclose(optim.cosine(400, 800, 0.06), 0.03)
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "fixed_lr": 0.06}], lr=0.06)
    optim.set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.06]  # SimSiam's fixed predictor lr


def reference_tf_lars_step(w, g, v, lr, wd, momentum=0.9, eta=0.001):
    """SimCLR's TF LARS (lars_optimizer.py, classic_momentum): v ← m·v + lr·trust·(g + wd·w); w ← w − v."""
    w, g, v = w.clone(), g.clone(), v.clone()
    trust = 1.0
    if w.ndim > 1:
        g = g + wd * w
        wn, gn = w.norm().item(), g.norm().item()
        trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
    v = momentum * v + lr * trust * g
    return w - v, v


def reference_larc_step(w, g, mu, lr, wd, momentum=0.9, eta=0.02):
    """solo-learn's LARS with clip_lr (solo/utils/lars.py): r = η‖w‖/(‖g‖ + wd‖w‖ + 1e-8), clipped to
    min(r/lr, 1), applied to g + wd·w where both norms are > 0; then PyTorch SGD momentum; w ← w − lr·μ."""
    w, g, mu = w.clone(), g.clone(), mu.clone()
    if w.ndim > 1:
        wn, gn = w.norm().item(), g.norm().item()
        if wn != 0 and gn != 0:
            r = eta * wn / (gn + wn * wd + 1e-8)
            r = min(r / lr, 1.0)
            g = (g + wd * w) * r
    mu = momentum * mu + g
    return w - lr * mu, mu


@pytest.mark.parametrize("shape", [(5, 3), (4,)])
@pytest.mark.parametrize("variant", ["lr_in_momentum", "clip_lr"])
def test_lars_variants_match_their_official_steps_while_the_lr_changes(variant, shape):
    """SimCLR's TF LARS and solo-learn's clipped LARS, over warmup-like steps whose lr changes."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    opt = optim.LARS([w], lr=0.0, weight_decay=1e-2, momentum=0.9, eta=0.02 if variant == "clip_lr" else 0.001,
                     **{variant: True})
    plain = optim.LARS([w0 := torch.nn.Parameter(w.detach().clone())], weight_decay=1e-2, momentum=0.9)
    reference = reference_tf_lars_step if variant == "lr_in_momentum" else reference_larc_step
    ref_w, ref_mu = w.detach().clone(), torch.zeros(shape, dtype=torch.float64)
    for lr in (0.1, 0.2, 30.0, 0.3):  # 30: the clipped variant's ratio/lr is below 1 at one step only
        g = torch.randn(shape, dtype=torch.float64)
        w.grad, w0.grad = g.clone(), g.clone()
        optim.set_lr(opt, lr)
        optim.set_lr(plain, lr)
        opt.step()
        plain.step()
        ref_w, ref_mu = reference(ref_w, g, ref_mu, lr=lr, wd=1e-2)
        torch.testing.assert_close(w.detach(), ref_w, rtol=1e-10, atol=1e-12)
    if variant == "lr_in_momentum" or len(shape) > 1:  # (clipping leaves biases and BN as the default)
        assert not torch.allclose(w.detach(), w0.detach())  # the default LARS takes other steps


def test_default_lars_is_unchanged_by_the_variants_when_the_lr_is_constant():
    """lr inside the buffer only matters when the lr changes: at a constant lr both steps agree."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = optim.LARS([a], lr=0.5, weight_decay=1e-3)
    opt_b = optim.LARS([b], lr=0.5, weight_decay=1e-3, lr_in_momentum=True)
    for _ in range(3):
        g = torch.randn(4, 3, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- each method's schedules through its real loop ----------------------------------------------------

def _cos(t, total, base, final=0.0):
    """Half a cosine from base at t = 0 to final at t = total, written out here (not optim.cosine)."""
    return final + (base - final) * (1 + math.cos(math.pi * t / total)) / 2


SCHEDULES = {  # flags of a tiny run (24 images in batches of 8: 3 steps an epoch), and what step k must use
    "byol": (["--epochs", "2", "--warmup-epochs", "1", "--max-steps", "5", "--hidden-dim", "16", "--dim", "8"], {
        # §3.3: lr warmup over 3 steps from 0, then a cosine to 0 over the other 3; τ: cosine over all 6 steps
        "lr": lambda k, b: b * k / 3 if k < 3 else _cos(k - 3, 3, b),
        "tau": lambda k, b: 1 - (1 - 0.99) * (math.cos(math.pi * k / 6) + 1) / 2,
        "groups": lambda k, b: [b * k / 3 if k < 3 else _cos(k - 3, 3, b)]}),
    "barlow": (["--epochs", "2", "--warmup-epochs", "1", "--max-steps", "5", "--dim", "16"], {
        # two LARS groups, weights at lr and biases + BN at lr_biases, both × the warmup-cosine factor to 1e-3
        "lr": lambda k, s: 0.3 * s * (k / 3 if k < 3 else _cos(k - 3, 3, 1.0, 1e-3)),
        "groups": lambda k, s: [f * s * (k / 3 if k < 3 else _cos(k - 3, 3, 1.0, 1e-3)) for f in (0.3, 0.0048)]}),
    "simsiam": (["--epochs", "2", "--max-steps", "4", "--fix-pred-lr", "--dim", "16", "--pred-dim", "8"], {
        # cosine per epoch, no warmup; the predictor's group stays at the initial lr (--fix-pred-lr, §4.2)
        "lr": lambda k, b: _cos(k // 3, 2, b),
        "groups": lambda k, b: [_cos(k // 3, 2, b), b]}),
    "mocov1": (["--epochs", "2", "--max-steps", "4", "--schedule", "100", "--K", "16", "--bn-splits", "2",
                "--dim", "16"], {
        # ×0.1 at epoch 100 of 200, scaled to --epochs 2: epoch 1
        "lr": lambda k, b: b * (0.1 if k >= 3 else 1.0),
        "groups": lambda k, b: [b * (0.1 if k >= 3 else 1.0)]}),
}
BASE = {"byol": 1.0, "barlow": 1.0, "simsiam": 0.03, "mocov1": 0.03}  # base lr (barlow: the scale alone), × 8/256


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_the_real_loop_follows_each_methods_schedules(method, image_folder, tmp_path):
    """The lr (and BYOL's τ) that the real loop logs at each step, and every parameter group's lr at the last
    step, against the papers' schedules written out here. A dropped warmup, a τ cosine over one epoch instead
    of the whole run (solo-learn#248), milestones not scaled to --epochs, a bias group at the weights' lr, or a
    predictor whose fixed lr decays with the rest fails here. The values are Python floats computed the same
    way in double precision: rel 1e-12."""
    import importlib

    from conftest import SMALL, metrics, run_main
    module = importlib.import_module(method)
    flags, expected = SCHEDULES[method]
    run_main(module, "--dataset", "folder", "--data-dir", image_folder, *SMALL, "--image-size", "8", "--knn-every",
             "-1", *flags, "--out", tmp_path)
    base = BASE[method] * 8 / 256
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    steps = int(flags[flags.index("--max-steps") + 1])
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:  # the row of step s was trained at k = s − 1
        for key in ("lr", "tau"):
            if key in expected:
                assert r[key] == pytest.approx(expected[key](r["step"] - 1, base), rel=1e-12), (key, r["step"])
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx(expected["groups"](steps - 1, base), rel=1e-12)
