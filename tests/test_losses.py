"""Each loss against a naive reference written from the paper's equation."""
import math

import torch

import simsiam


def naive_D(p, z):
    """Eq. 1 of SimSiam, one sample at a time: D(p, z) = −(p/‖p‖₂)·(z/‖z‖₂), averaged over the batch."""
    total = 0.0
    for i in range(len(p)):
        pi, zi = p[i].tolist(), z[i].tolist()
        dot = sum(a * b for a, b in zip(pi, zi))
        total += -dot / (math.sqrt(sum(a * a for a in pi)) * math.sqrt(sum(b * b for b in zi)))
    return total / len(p)


def test_D_matches_naive_reference():
    torch.manual_seed(0)
    p, z = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    assert math.isclose(simsiam.D(p, z).item(), naive_D(p, z), rel_tol=1e-12)
    assert math.isclose(simsiam.D(z, z).item(), -1.0, rel_tol=1e-12)  # identical directions: −1
    assert math.isclose(simsiam.D(z, -3 * z).item(), 1.0, rel_tol=1e-12)  # opposite: +1, scale-free


def test_D_stops_the_gradient_of_z():
    p = torch.randn(4, 6, requires_grad=True)
    z = torch.randn(4, 6, requires_grad=True)
    simsiam.D(p, z).backward()
    assert z.grad is None  # stopgrad(z): no gradient flows into the target branch
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_simsiam_forward_is_the_symmetrised_loss_of_eq4():
    torch.manual_seed(0)
    args = simsiam.Args(image_size=16, dim=32, pred_dim=8)
    model = simsiam.build_model(args).double()
    x1, x2 = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randn(6, 3, 16, 16, dtype=torch.float64)
    loss, stats = model(x1, x2)
    z1 = model.projector(model.backbone(x1))
    z2 = model.projector(model.backbone(x2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    expected = naive_D(p1, z2) / 2 + naive_D(p2, z1) / 2  # L = ½D(p1, z2) + ½D(p2, z1)
    assert math.isclose(loss.item(), expected, rel_tol=1e-10)
    assert set(stats) == {"std_z"}


def test_stop_gradient_holds_in_the_model():
    """The gradient of ½D(p1, sg(z2)) reaches the encoder only through p1 = h(z1), never through z2."""
    torch.manual_seed(0)
    args = simsiam.Args(image_size=16, dim=32, pred_dim=8)
    model = simsiam.build_model(args).double()
    x1, x2 = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    z1 = model.projector(model.backbone(x1))
    z2 = model.projector(model.backbone(x2))
    z2.retain_grad()
    z1.retain_grad()
    simsiam.D(model.predictor(z1), z2).backward()
    assert z2.grad is None or z2.grad.abs().sum() == 0
    assert z1.grad.abs().sum() > 0


def test_std_z_is_the_collapse_monitor():
    """std of the L2-normalised z: ≈ 1/√d for spread outputs, 0 for collapsed ones."""
    d = 256
    z = torch.randn(4096, d)
    std = torch.nn.functional.normalize(z, dim=1).std(0).mean().item()
    assert abs(std - 1 / math.sqrt(d)) < 0.1 / math.sqrt(d)  # (each std over 4096 samples: within ~1% of it)
    collapsed = torch.randn(1, d).repeat(64, 1)
    assert torch.nn.functional.normalize(collapsed, dim=1).std(0).mean().item() < 1e-6
