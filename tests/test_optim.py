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
