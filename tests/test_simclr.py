"""SimCLR: NT-Xent against a loop over explicit pairs, the sharded form, and the head."""
import math

import torch

import simclr


def naive_nt_xent(z1, z2, tau):
    """Eq. 1 written out: views ordered 2k−1, 2k; ℓ(i, j) over k ≠ i; L = 1/(2N) Σ_k ℓ(2k−1,2k) + ℓ(2k,2k−1)."""
    views = []
    for a, b in zip(z1.tolist(), z2.tolist()):
        views += [a, b]  # z_{2k−1}, z_{2k}

    def sim(u, v):
        return sum(x * y for x, y in zip(u, v)) / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))

    def ell(i, j):
        denominator = sum(math.exp(sim(views[i], views[k]) / tau) for k in range(len(views)) if k != i)
        return -math.log(math.exp(sim(views[i], views[j]) / tau) / denominator)
    N = len(z1)
    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(N)) / (2 * N)


def test_nt_xent_matches_the_loop_over_pairs():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for tau in (0.1, 0.5):
        assert math.isclose(simclr.nt_xent(z1, z2, tau).item(), naive_nt_xent(z1, z2, tau), rel_tol=1e-10)


def test_nt_xent_sharded_over_ranks_averages_to_the_global_loss():
    """What each of W ranks computes (its anchors against all 2N candidates), averaged, is L."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    full = simclr.nt_xent(z1, z2, 0.2)
    for world in (2, 3, 4):
        n = 12 // world
        parts = [simclr.nt_xent(z1[r * n:(r + 1) * n], z2[r * n:(r + 1) * n], 0.2, z1, z2, start=r * n)
                 for r in range(world)]
        assert math.isclose(sum(parts).item() / world, full.item(), rel_tol=1e-12)


def test_nt_xent_excludes_self_similarity_and_finds_the_partner():
    z = torch.nn.functional.normalize(torch.randn(4, 16, dtype=torch.float64), dim=1)
    # identical views: the positive is as similar as the anchor to itself; with self excluded and a
    # low temperature the loss goes to 0, where keeping self in the denominator would give log 2
    assert simclr.nt_xent(z, z.clone(), 0.01).item() < 1e-6


def test_projection_head_is_bias_free_with_a_last_bn_without_beta():
    model = simclr.build_model(simclr.Args(image_size=16))
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [(512, 512, None), (512, 128, None)]
    last = model.projector[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and last.weight.requires_grad and not last.bias.requires_grad
    assert torch.all(last.bias == 0)
    assert all(torch.all(b.bn2.weight == 0) for b in [model.backbone.layer1[0], model.backbone.layer4[1]])


def test_augmentation_strength_and_presets():
    from common import cli
    a = cli.parse(simclr.Args, simclr.PRESETS, [])
    assert (a.lr, a.wd, a.tau, a.s, a.blur, a.batch_size, a.epochs) == (1.0, 1e-4, 0.5, 0.5, False, 512, 1000)
    a = cli.parse(simclr.Args, simclr.PRESETS, ["--dataset", "imagenet"])
    assert (a.arch, a.lr, a.wd, a.tau, a.s, a.blur, a.batch_size) == ("resnet50", 0.3, 1e-6, 0.1, 1.0, True, 4096)
    jitter = [t for t in simclr.augment(simclr.Args(s=0.5)).transforms if isinstance(t, type(simclr.augment(
        simclr.Args()).transforms[2]))][0].transforms[0]
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)  # (0.8s, 0.8s, 0.8s, 0.2s) at s = 0.5
