"""UniGrad: the surrogate's gradient, the F update, the momentum branch and its schedule."""
import pytest
import torch

import unigrad


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(*shape, seed=0):
    return torch.nn.functional.normalize(rand(*shape, seed=seed), dim=1)


def test_the_surrogate_has_unigrads_gradient():
    n, d, lambd = 6, 5, 100.0
    z1, z2 = unit(n, d, seed=1).requires_grad_(), unit(n, d, seed=2).requires_grad_()
    z1m, z2m = unit(n, d, seed=3), unit(n, d, seed=4)
    a = rand(d, d, seed=5)
    F = a @ a.T / d  # symmetric, as a correlation matrix
    unigrad.unigrad_loss(z1, z2, z1m, z2m, F, lambd).backward()
    for i in range(n):  # per sample: ½(−u₂ᵐ + λ·F u₁)/n
        torch.testing.assert_close(z1.grad[i], 0.5 * (-z2m[i] + lambd * F @ z1[i].detach()) / n)
        torch.testing.assert_close(z2.grad[i], 0.5 * (-z1m[i] + lambd * F @ z2[i].detach()) / n)


def test_F_starts_as_the_batch_correlation_then_moves_as_an_average():
    d, rho = 4, 0.9
    F, ready = torch.zeros(d, d, dtype=torch.float32), torch.zeros((), dtype=torch.bool)

    def batch_corr(z1m, z2m):  # (Σ_b u₁ᵐu₁ᵐᵀ + Σ_b u₂ᵐu₂ᵐᵀ) / (2N), written as a sum of outer products
        return sum(torch.outer(u, u) for u in [*z1m, *z2m]) / (2 * len(z1m))
    # F is float32, its references float64 (unit vectors: entries below 1): F may differ from them by a few
    # float32 roundings (2^-24 ≈ 6e-8 each, of ρ, ρF and the result), 1e-6 is 16 of them
    a1, a2 = unit(8, d, seed=1), unit(8, d, seed=2)
    unigrad.update_F(F, ready, a1, a2, rho)
    torch.testing.assert_close(F.double(), batch_corr(a1, a2), rtol=0, atol=1e-6)
    assert bool(ready) and F.dtype == torch.float32
    b1, b2 = unit(8, d, seed=3), unit(8, d, seed=4)
    expected = rho * F.double() + (1 - rho) * batch_corr(b1, b2)
    unigrad.update_F(F, ready, b1, b2, rho)
    torch.testing.assert_close(F.double(), expected, rtol=0, atol=1e-6)


def test_momentum_schedule_from_m_base_to_one():
    assert unigrad.momentum_schedule(0, 10, 0.996) == pytest.approx(0.996)
    assert unigrad.momentum_schedule(10, 10, 0.996) == pytest.approx(1.0)
    assert unigrad.momentum_schedule(5, 10, 0.996) == pytest.approx(0.998)


def small():
    torch.manual_seed(0)
    return unigrad.build_model(unigrad.Args(image_size=16, dim=8)).double()


def test_the_momentum_branch_is_updated_before_its_forward_and_never_learns():
    model = small()
    with torch.no_grad():  # make the online branch differ from the momentum copy
        for p in model.projector.parameters():
            p.add_(0.1)
    model.m.fill_(0.0)  # m = 0: the momentum branch becomes the online one, before it runs
    x1, x2 = rand(6, 3, 16, 16, seed=1), rand(6, 3, 16, 16, seed=2)
    loss, stats = model(x1, x2)
    online = torch.nn.functional.normalize(model.projector(model.backbone(x1)), dim=1)
    momentum = torch.nn.functional.normalize(model.momentum_projector(model.momentum_backbone(x1)), dim=1)
    torch.testing.assert_close(online, momentum)
    # u₁ᵐ = u₁ and u₂ᵐ = u₂ here, so pos_sim is the mean cos(u₁, u₂) of the online branch
    z2 = torch.nn.functional.normalize(model.projector(model.backbone(x2)), dim=1)
    torch.testing.assert_close(stats["pos_sim"], (online * z2).sum(1).mean().detach())
    loss.backward()
    assert all(p.grad is None for p in [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()])
    assert all(p.grad is not None for p in model.projector.parameters())
    assert bool(model.F_ready) and torch.allclose(model.F, model.F.T)  # (float64 here: symmetric to rounding)


def test_F_is_part_of_the_checkpointed_state_and_the_projector_has_the_papers_shape():
    model = small()
    assert {"F", "F_ready", "m"} <= set(model.state_dict())
    layers = [type(m).__name__ for m in model.projector]
    assert layers == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert [m.bias is not None for m in model.projector if isinstance(m, torch.nn.Linear)] == [False, False, True]


def test_forward_uses_F_updated_with_this_batch():
    """The real forward against its parts in the official order (pretrainer.py loss_unigrad): the
    momentum update, the momentum embeddings, F ← ρF + (1 − ρ)F_batch with this batch, then the
    surrogate with that F. Every online parameter's gradient must match; a forward that updates F after
    the loss (the surrogate then sees last step's F) fails."""
    import copy
    model = small()
    F_prev = rand(8, 8, seed=7)
    model.F.copy_(F_prev @ F_prev.T / 8)  # a previous F, far from this batch's correlation
    model.F_ready.fill_(True)
    model.m.fill_(0.9)
    reference = copy.deepcopy(model)
    x1, x2 = rand(6, 3, 8, 8, seed=1), rand(6, 3, 8, 8, seed=2)
    loss, _ = model(x1, x2)
    loss.backward()
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        unigrad.momentum_update(reference.backbone, reference.momentum_backbone, 0.9)
        unigrad.momentum_update(reference.projector, reference.momentum_projector, 0.9)
        z1m = normalize(reference.momentum_projector(reference.momentum_backbone(x1)), dim=1)
        z2m = normalize(reference.momentum_projector(reference.momentum_backbone(x2)), dim=1)
        F_batch = (z1m.T @ z1m + z2m.T @ z2m) / (2 * len(z1m))
        F = reference.rho * reference.F + (1 - reference.rho) * F_batch
    z1 = normalize(reference.projector(reference.backbone(x1)), dim=1)
    z2 = normalize(reference.projector(reference.backbone(x2)), dim=1)
    expected = unigrad.unigrad_loss(z1, z2, z1m, z2m, F, reference.lambd)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.F, F.to(model.F.dtype))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
