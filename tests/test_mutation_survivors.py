"""Tests written for the semantic survivors of the mutation run (README, "Mutation testing"): the schedules and
LARS at the values that the other tests do not reach (a final value other than 0, parameter and gradient norms
below 1, a clipped LARC ratio, a zero matrix, a zero gradient, the lr of 0 at the first warmup step), each against the formula
written out in float64."""
import math

import pytest
import torch

from common import data, optim


def test_cosine_ends_at_its_final_value():
    """final + (base − final)·(1 + cos(π t/T))/2, with final ≠ 0 (BYOL's τ and the fixed floors use one)."""
    for t in (0, 3, 5, 10, 12):
        expected = 0.2 + (1.0 - 0.2) * 0.5 * (1 + math.cos(math.pi * min(t, 10) / 10))
        assert optim.cosine(t, 10, 1.0, 0.2) == pytest.approx(expected, rel=1e-15)
    assert optim.cosine(10, 10, 0.996, 1.0) == pytest.approx(1.0, rel=1e-15)  # an upward cosine (BYOL's τ)


def reference_lars(w, g, lr, wd, eta, momentum, mu, clip_lr):
    """One LARS step for one matrix, written from common/optim.py's docstring (You et al. 2017; LARC for clip_lr)."""
    w_norm, g_norm = w.norm().item(), g.norm().item()
    if clip_lr:
        if w_norm > 0 and g_norm > 0:
            ratio = eta * w_norm / (g_norm + wd * w_norm + 1e-8)
            d = (g + wd * w) * (min(ratio / lr, 1.0) if lr > 0 else 1.0)
        else:
            d = g.clone()  # left as it is, no decay either
    else:
        d = g + wd * w
        d_norm = d.norm().item()
        d = d * (eta * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0)
    mu = momentum * mu + d
    return w - lr * mu, mu


@pytest.mark.parametrize("clip_lr", [False, True])
def test_lars_at_small_norms_clipped_ratios_zero_matrices_and_lr_zero(clip_lr):
    """LARS (and LARC with clip_lr) over three steps, against reference_lars in float64."""
    torch.manual_seed(0)
    shapes = [(4, 3)] * 5
    ws = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ws[0] *= 0.01  # ‖w‖ < 1
    ws[1] *= 10.0  # ‖w‖ > 1
    ws[2].zero_()  # a zero matrix: ratio 1 (and for LARC no decay)
    gs = [torch.randn(s, dtype=torch.float64) * scale for s, scale in zip(shapes, (0.001, 0.01, 0.1, 1e-4, 0.0))]
    # (the last gradient is zero: for LARC the matrix is left as it is, not decayed)
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    eta, wd, momentum = (0.02, 1e-4, 0.9) if clip_lr else (0.001, 1e-2, 0.9)
    opt = optim.LARS(params, lr=0.0, weight_decay=wd, momentum=momentum, eta=eta, clip_lr=clip_lr)
    mus = [torch.zeros_like(w) for w in ws]
    clipped = []
    for lr in (0.0, 0.05, 0.5):  # the first warmup step's lr of 0; a clipped and an unclipped LARC ratio
        optim.set_lr(opt, lr)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for i in range(len(ws)):
            if clip_lr and lr > 0 and ws[i].norm() > 0:
                clipped.append(eta * ws[i].norm().item() / (gs[i].norm().item() + wd * ws[i].norm().item()) / lr > 1)
            ws[i], mus[i] = reference_lars(ws[i], gs[i], lr, wd, eta, momentum, mus[i], clip_lr)
        for i, (p, w) in enumerate(zip(params, ws)):  # (float64 throughout: the two differ by rounding only)
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-15, msg=f"matrix {i} at lr {lr}")
    if clip_lr:
        assert any(clipped) and not all(clipped)  # both sides of the clip are exercised


def test_the_sampler_order_follows_the_seed_and_no_rank_repeats_a_sample():
    """The run's --seed orders the samples (not torch's default seed 0); with N not divisible by W the tail is
    dropped, not padded with repeats: every step of W ranks sees distinct samples (drop_last, as the loop's
    global batch of distinct images)."""
    order = {s: [i for i, _ in data.Sampler(range(40), seed=s, num_replicas=1, rank=0)] for s in (0, 1)}
    assert order[0] != order[1]
    ranks = [[i for i, _ in data.Sampler(range(10), seed=3, num_replicas=3, rank=r)] for r in range(3)]
    everyone = [i for r in ranks for i in r]
    assert [len(r) for r in ranks] == [3, 3, 3] and len(set(everyone)) == 9
