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
