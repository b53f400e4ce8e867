"""BYOL, Barlow Twins and VICReg: each loss against a naive reference, the target network's update and
its schedule, the heads, and the augmentations' asymmetry."""
import copy
import math

import pytest
import torch

import barlow
import byol
import vicreg


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- BYOL -----------------------------------------------------------------------------------------

def test_byol_regression_loss_is_the_squared_distance_of_the_normalised_vectors():
    p, z = rand(7, 5, seed=1), rand(7, 5, seed=2)
    naive = sum(sum((a / p[i].norm() - b / z[i].norm()) ** 2 for a, b in zip(p[i], z[i])) for i in range(len(p))) / 7
    assert math.isclose(byol.regression_loss(p, z).item(), naive.item(), rel_tol=1e-12)  # Eq. 2: ‖p̄ − z̄‖²
    assert math.isclose(byol.regression_loss(z, 5 * z).item(), 0.0, abs_tol=1e-12)  # scale-free, 0 when aligned
    assert math.isclose(byol.regression_loss(z, -z).item(), 4.0, rel_tol=1e-12)  # 2 − 2·(−1)


def test_byol_regression_loss_stops_the_gradient_of_the_target():
    p, z = rand(4, 6, seed=1).requires_grad_(), rand(4, 6, seed=2).requires_grad_()
    byol.regression_loss(p, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0


def test_byol_target_decay_follows_the_cosine_schedule_from_tau_base_to_one():
    assert byol.target_decay(0, 100, 0.996) == pytest.approx(0.996)  # τ_base at k = 0
    assert byol.target_decay(100, 100, 0.996) == pytest.approx(1.0)  # 1 at k = K
    assert byol.target_decay(50, 100, 0.996) == pytest.approx(0.998)  # half-way: 1 − (1 − τ_base)/2
    taus = [byol.target_decay(k, 100, 0.99) for k in range(101)]
    assert all(a < b for a, b in zip(taus, taus[1:]))  # increasing


def test_byol_momentum_update_is_the_ema_of_eq1():
    online, target = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    xi = [p.detach().clone() for p in target.parameters()]
    byol.momentum_update(online, target, 0.9)
    for theta, old, new in zip(online.parameters(), xi, target.parameters()):  # float64, weights below 1: the two
        torch.testing.assert_close(new, 0.9 * old + 0.1 * theta.detach(), rtol=0, atol=1e-14)  # orders differ by ~1e-16


def small_byol():
    torch.manual_seed(0)
    return byol.build_model(byol.Args(image_size=16, hidden_dim=16, dim=8)).double()


def test_byol_forward_is_the_symmetrised_loss_and_only_the_online_network_learns():
    model = small_byol()
    x1, x2 = rand(6, 3, 16, 16, seed=1), rand(6, 3, 16, 16, seed=2)
    loss, stats = model(x1, x2)
    online = lambda x: model.predictor(model.projector(model.backbone(x)))  # noqa: E731
    target = lambda x: model.target_projector(model.target_backbone(x))  # noqa: E731
    with torch.no_grad():
        expected = byol.regression_loss(online(x1), target(x2)) + byol.regression_loss(online(x2), target(x1))
    torch.testing.assert_close(loss.detach(), expected)
    assert 0.0 <= loss.item() <= 8.0 and 0.0 < stats["std_z"] < 1.0
    loss.backward()
    assert all(p.grad is None for p in [*model.target_backbone.parameters(), *model.target_projector.parameters()])
    assert all(p.grad is not None for p in [*model.backbone.parameters(), *model.predictor.parameters()])


def test_byol_target_starts_as_the_online_copy_and_moves_only_through_update_target():
    model = small_byol()
    for a, b in zip(model.backbone.state_dict().values(), model.target_backbone.state_dict().values()):
        assert torch.equal(a, b)
    before = copy.deepcopy(model.target_projector.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss, _ = model(rand(6, 3, 16, 16, seed=1), rand(6, 3, 16, 16, seed=2))
    loss.backward()
    optimizer.step()  # θ moves; ξ does not
    weight = "3.weight"  # the projector's last Linear
    assert torch.equal(model.target_projector.state_dict()[weight], before[weight])
    theta = model.projector.state_dict()[weight].clone()
    model.update_target(0.99)
    torch.testing.assert_close(model.target_projector.state_dict()[weight], 0.99 * before[weight] + 0.01 * theta)


def test_byol_heads_have_the_papers_shapes():
    from common import cli
    model = byol.build_model(cli.parse(byol.Args, byol.PRESETS, ["--dataset", "imagenet"]))
    shapes = lambda mlp: [(m.in_features, m.out_features, m.bias is not None) for m in mlp  # noqa: E731
                          if isinstance(m, torch.nn.Linear)]
    assert shapes(model.projector) == [(2048, 4096, True), (4096, 256, False)]
    assert shapes(model.predictor) == [(256, 4096, True), (4096, 256, False)]
    assert not any(p.requires_grad for p in model.target_backbone.parameters())


def apply_probabilities(pipeline):
    """(blur p, solarize p) of a BYOL-style view pipeline: torchvision's transforms, or the batched step of BYOL's
    ImageNet preset (byol.color_blur_solarize, its probabilities as arguments)."""
    steps = [t.fn.keywords for t in pipeline.transforms if type(t).__name__ == "Batched" and "blur" in t.fn.keywords]
    if steps:
        return steps[0]["blur"], steps[0]["solarize"]
    blur = [t.p for t in pipeline.transforms if type(t).__name__ == "RandomApply"
            and type(t.transforms[0]).__name__ == "PILGaussianBlur"]
    solarize = [t.p for t in pipeline.transforms if type(t).__name__ == "RandomSolarize"]
    return blur[0], solarize[0]


@pytest.mark.parametrize("module", [byol, barlow, vicreg])
def test_the_two_views_are_asymmetric_as_the_papers(module):
    """ImageNet: blur 1.0 / 0.1, solarize 0.0 / 0.2 (BYOL Table 6); CIFAR-10: no blur at 32 px."""
    from common import cli
    a = cli.parse(module.Args, module.PRESETS, ["--dataset", "imagenet"])
    views = module.augment(a, a.blur1, a.solarize1), module.augment(a, a.blur2, a.solarize2)
    assert [apply_probabilities(v) for v in views] == [(1.0, 0.0), (0.1, 0.2)]
    c = cli.parse(module.Args, module.PRESETS, [])
    assert (c.blur1, c.blur2, c.image_size, c.arch) == (0.0, 0.0, 32, "resnet18")


# --- Barlow Twins -----------------------------------------------------------------------------------

def naive_barlow(z1, z2, lambd, eps=1e-5):
    """Eq. 1 and 2 with explicit loops: standardise each dimension over the batch, then C_ij and L_BT."""
    N, d = z1.shape

    def standardised(z):
        out = [[0.0] * d for _ in range(N)]
        for j in range(d):
            col = [z[b][j].item() for b in range(N)]
            mean = sum(col) / N
            var = sum((v - mean) ** 2 for v in col) / N  # biased, as BatchNorm in training mode
            for b in range(N):
                out[b][j] = (col[b] - mean) / math.sqrt(var + eps)
        return out
    a, b_ = standardised(z1), standardised(z2)
    C = [[sum(a[b][i] * b_[b][j] for b in range(N)) / N for j in range(d)] for i in range(d)]
    on = sum((1 - C[i][i]) ** 2 for i in range(d))
    off = sum(C[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


def test_barlow_twins_loss_matches_the_loops_of_eq1_and_eq2():
    z1, z2 = rand(9, 5, seed=1), rand(9, 5, seed=2)
    for lambd in (0.0051, 0.5):
        assert math.isclose(barlow.barlow_twins_loss(z1, z2, lambd).item(), naive_barlow(z1, z2, lambd), rel_tol=1e-10)
    # identical views, decorrelated dimensions: C = I and L = 0
    a = rand(8, 4, seed=3)
    q, _ = torch.linalg.qr(a - a.mean(0))  # orthogonal columns, each centred: uncorrelated dimensions
    z = 10 * q
    # C_ii = var/(var + ε) with BN's ε = 1e-5 and var = 100/8 (float64): 1 − 8e-7, hence the 1e-6
    torch.testing.assert_close(barlow.cross_correlation(z, z), torch.eye(4, dtype=z.dtype), atol=1e-6, rtol=0)
    assert barlow.barlow_twins_loss(z, z, 0.0051).item() < 1e-10


def test_barlow_projector_is_bias_free_with_bn_on_hidden_layers_only():
    model = barlow.build_model(barlow.Args(image_size=16, dim=32))
    layers = list(model.projector)
    assert [type(m).__name__ for m in layers] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert all(m.bias is None for m in layers if isinstance(m, torch.nn.Linear))


# --- VICReg --------------------------------------------------------------------------------------------

def naive_terms(x, y):
    """Eq. 1–5 with loops: invariance (mean over N·d), variance of each embedding, covariance of each."""
    N, d = x.shape
    inv = sum((x[b][j] - y[b][j]).item() ** 2 for b in range(N) for j in range(d)) / (N * d)

    def var_term(z):
        total = 0.0
        for j in range(d):
            col = [z[b][j].item() for b in range(N)]
            mean = sum(col) / N
            std = math.sqrt(sum((v - mean) ** 2 for v in col) / (N - 1) + 1e-4)  # S(x, ε), unbiased
            total += max(0.0, 1.0 - std)  # hinge at γ = 1
        return total / d

    def cov_term(z):
        means = [sum(z[b][j].item() for b in range(N)) / N for j in range(d)]
        C = [[sum((z[b][i].item() - means[i]) * (z[b][j].item() - means[j]) for b in range(N)) / (N - 1)
              for j in range(d)] for i in range(d)]
        return sum(C[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return inv, var_term(x), var_term(y), cov_term(x), cov_term(y)


def test_vicreg_each_term_and_the_loss_match_the_loops():
    x, y = 0.3 * rand(10, 6, seed=1), 0.3 * rand(10, 6, seed=2)  # std below 1: the hinge is active
    inv, vx, vy, cx, cy = naive_terms(x, y)
    assert math.isclose(vicreg.variance(x).item(), vx, rel_tol=1e-10) and vx > 0
    assert math.isclose(vicreg.covariance(x).item(), cx, rel_tol=1e-10)
    assert math.isclose(torch.nn.functional.mse_loss(x, y).item(), inv, rel_tol=1e-12)
    for coeffs in [(25.0, 25.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]:
        s, m, n = coeffs
        expected = s * inv + m * (vx / 2 + vy / 2) + n * (cx + cy)  # the code form, variance halved
        assert math.isclose(vicreg.vicreg_loss(x, y, *coeffs).item(), expected, rel_tol=1e-10), coeffs
    wide = 5 * rand(10, 6, seed=4)  # every std above 1: the hinge is off
    assert vicreg.variance(wide).item() == 0.0


def test_vicreg_expander_has_biases_except_the_last_layer():
    model = vicreg.build_model(vicreg.Args(image_size=16, dim=32))
    linears = [m for m in model.expander if isinstance(m, torch.nn.Linear)]
    assert [m.bias is not None for m in linears] == [True, True, False]
    assert [type(m).__name__ for m in model.expander] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]


def _barlow_lars(net, lr, lr_biases, wd):
    """barlow.main's optimiser: two LARS groups, weights and biases + BN (ndim == 1), at their peaks."""
    from common import optim
    weights = [p for p in net.parameters() if p.ndim > 1]
    biases = [p for p in net.parameters() if p.ndim == 1]
    return optim.LARS([{"params": weights, "lr": lr}, {"params": biases, "lr": lr_biases}], weight_decay=wd,
                      momentum=0.9)


def test_barlow_imagenet_preset_takes_the_official_steps_of_32_gpus():
    """The official gradient on W GPUs is 1/W of the exact one (tests/test_distributed.py). LARS steps of the
    official lr-biases and weight decay on g/32 equal the preset's steps on g, for every parameter; the
    official values on g (the preset before the translation) take other steps. (The projector alone: it
    has both kinds of parameters, weight matrices and BN.)"""
    from common import cli
    a = cli.parse(barlow.Args, barlow.PRESETS, ["--dataset", "imagenet"])
    scale, W = a.batch_size / 256, 32
    torch.manual_seed(0)
    model = barlow.projector(32, 16).double()
    official, untranslated = copy.deepcopy(model), copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    ours = _barlow_lars(model, a.lr * scale, a.lr_biases * scale, a.wd)
    theirs = _barlow_lars(official, 0.2 * scale, 0.0048 * scale, 1.5e-6)  # the paper's values, official gradient
    plain = _barlow_lars(untranslated, 0.2 * scale, 0.0048 * scale, 1.5e-6)  # the paper's values, exact gradient
    barlow.barlow_twins_loss(model(rand(8, 32, seed=1)), model(rand(8, 32, seed=2)), a.lambd).backward()
    for p, q, r in zip(model.parameters(), official.parameters(), untranslated.parameters()):
        q.grad, r.grad = p.grad / W, p.grad.clone()
    for opt in (ours, theirs, plain):
        opt.step()
    names = [n for n, _ in model.named_parameters()]
    steps = [[p.detach() - p0 for p, p0 in zip(m.parameters(), start)] for m in (model, official, untranslated)]
    for name, d_ours, d_official in zip(names, steps[0], steps[1]):
        torch.testing.assert_close(d_ours, d_official, rtol=1e-7, atol=1e-14,
                                   msg=lambda m, name=name: f"{name}: {m}")
    differs = {n for n, d_ours, d_plain in zip(names, steps[0], steps[2])
               if not torch.allclose(d_ours, d_plain, rtol=1e-3, atol=0)}
    assert {"1.weight", "6.weight"} <= differs  # a BN γ and a weight matrix


def test_byol_main_moves_the_target_after_each_step_with_the_cosine_tau(monkeypatch, image_folder, tmp_path):
    """Through the real loop: after optimiser step k the target is ξ ← τ_k ξ + (1 − τ_k) θ, with θ the
    online weights *after* that step and τ_k the cosine schedule of §3.3 written out here (not
    byol.target_decay). A τ held at τ_base, or a target update before the optimiser step, fails."""
    from conftest import SMALL, run_main
    snapshots, build = [], byol.build_model

    def build_model(args):
        model = build(args)
        model.register_forward_pre_hook(lambda m, _: snapshots.append(copy.deepcopy(m.state_dict())))
        return model
    monkeypatch.setattr(byol, "build_model", build_model)
    K, tau_base = 3, 0.5  # one epoch of 3 steps (24 images, batch 8); a τ_base far from 1
    run_main(byol, "--dataset", "folder", "--data-dir", image_folder, *SMALL, "--image-size", "8", "--epochs", "1",
             "--knn-every", "-1", "--hidden-dim", "16", "--dim", "8", "--tau-base", str(tau_base),
             "--warmup-epochs", "0", "--out", tmp_path)
    snapshots.append(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"])
    assert len(snapshots) == K + 1
    for k in range(K):
        tau = 1 - (1 - tau_base) * (math.cos(math.pi * k / K) + 1) / 2
        before, after = snapshots[k], snapshots[k + 1]
        for name in ["backbone.conv1.weight", "projector.0.weight", "projector.1.weight"]:
            theta = after[name]  # the online weights after step k
            assert not torch.allclose(theta, before[name])  # (the step moved them)
            xi = before["target_" + name]
            expected = tau * xi.double() + (1 - tau) * theta.double()  # in float64
            # the loop's float32 update rounds τ, 1 − τ, both products and the sum: at most 3 float32 roundings
            # (2^-24 each) of |ξ| + |θ|; 4 are allowed
            error = (after["target_" + name].double() - expected).abs()
            assert (error <= 4 * 2**-24 * (xi.abs() + theta.abs()).double()).all(), (k, name, error.max())

class _Built(Exception):
    """Raised by the test below once main() has built its two-view dataset."""


@pytest.mark.parametrize("module", [byol, barlow, vicreg], ids=["byol", "barlow", "vicreg"])
def test_main_builds_the_two_asymmetric_views_of_the_paper(module, monkeypatch, image_folder, tmp_path):
    """main() itself, with the ImageNet recipe: the dataset of two views it builds pairs view 1 (blur 1.0,
    no solarization) with view 2 (blur 0.1, solarization 0.2), BYOL Table 6. A main() that builds both views
    from one pipeline (lucidrains/byol-pytorch#31) fails here. (It stops at the loader: no training.)"""
    from common import data
    from conftest import run_main
    built = []

    def stop(views, *args, **kwargs):
        built.append(views)
        raise _Built
    monkeypatch.setattr(data, "train_loader", stop)
    with pytest.raises(_Built):
        run_main(module, "--dataset", "imagenet", "--data-dir", image_folder, "--workers", "0", "--device", "cpu",
                 "--out", tmp_path)
    views = built[0]
    assert [apply_probabilities(views.t1), apply_probabilities(views.t2)] == [(1.0, 0.0), (0.1, 0.2)]
