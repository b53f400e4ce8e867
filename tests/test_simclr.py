"""SimCLR: NT-Xent against a loop over explicit pairs, the sharded form, the model's forward against
the equation (one batch of 2N, candidates with gradient, the official scale), the head, the optimiser."""
import copy
import math

import torch
import torch.nn.functional as F

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
    for m in linears:  # N(0, 0.01²), the official linear_layer's initializer; over 65,536 weights (the smaller
        # layer) the sample mean and std spread by 0.01/256 = 4e-5 and 0.01/362 = 3e-5: the bounds are 25 and 18 of
        # those, whatever the CPU's random kernels; PyTorch's default init (std 0.0255 here) is 0.0155 off
        assert abs(m.weight.mean().item()) < 1e-3 and abs(m.weight.std().item() - 0.01) < 5e-4
    assert all(torch.all(b.bn2.weight == 0) for b in [model.backbone.layer1[0], model.backbone.layer4[1]])


def test_augmentation_strength_and_presets():
    from common import cli
    a = cli.parse(simclr.Args, simclr.PRESETS, [])
    assert (a.lr, a.wd, a.tau, a.s, a.blur, a.batch_size, a.epochs) == (1.0, 1e-6, 0.5, 0.5, False, 512, 1000)
    a = cli.parse(simclr.Args, simclr.PRESETS, ["--dataset", "imagenet"])
    assert (a.arch, a.lr, a.wd, a.tau, a.s, a.blur, a.batch_size) == ("resnet50", 0.3, 1e-6, 0.1, 1.0, True, 4096)
    from common import tf_image
    steps = [t.fn for t in simclr.augment(simclr.Args(s=0.5)).transforms if isinstance(t, tf_image.Batched)]
    assert [f.func for f in steps] == [simclr.random_crop_and_resize, simclr.color_distortion]
    assert steps[1].keywords["s"] == 0.5  # the ranges (0.8s, 0.8s, 0.8s, 0.2s): tests/test_tf_augment.py


def differentiable_eq1(z1, z2, tau):
    """Eq. 1 as a loop over the 2N views, every view an anchor and a candidate, with gradient."""
    views = F.normalize(torch.cat([z1, z2]), dim=1)  # views i and i ± N are the two views of an image
    N2 = len(views)
    total = 0
    for i in range(N2):
        j = (i + N2 // 2) % N2
        others = torch.stack([views[i] @ views[k] / tau for k in range(N2) if k != i])
        total = total - (views[i] @ views[j] / tau - torch.logsumexp(others, dim=0))
    return total / N2


def small_model(seed=0):
    torch.manual_seed(seed)
    return simclr.build_model(simclr.Args(image_size=8, dim=16)).double()


def views(N=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64))


def test_forward_gradient_is_the_gradient_of_twice_eq1_through_every_candidate():
    """The model's real forward against the equation: every parameter's gradient. A forward whose
    gathered candidates were detached (negatives without gradient, lightning-bolts#179) loses the
    candidate path and fails here; test_distributed then ties W ranks to this one process."""
    model = small_model()
    reference = copy.deepcopy(model)
    x1, x2 = views()
    loss, _ = model(x1, x2)
    loss.backward()
    z = reference.projector(reference.backbone(torch.cat([x1, x2])))  # one batch of 2N, as the official model
    expected = 2 * differentiable_eq1(z[:4], z[4:], model.tau)  # the official scale: loss_a + loss_b
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_every_batchnorm_normalises_over_both_views_at_once():
    """The official model concatenates the views before the network: each BN sees 2N samples once
    per step, and its running statistics are those of the 2N views."""
    model = small_model()
    seen = []
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.register_forward_pre_hook(lambda m, inputs: seen.append(len(inputs[0])))
    x1, x2 = views()
    expected_mean = 0.1 * model.backbone.conv1(torch.cat([x1, x2])).mean((0, 2, 3)).detach()
    model(x1, x2)
    assert seen == [8] * len(bns)  # one call per BN, on 2N = 8 samples
    assert all(int(bn.num_batches_tracked) == 1 for bn in bns)
    torch.testing.assert_close(model.backbone.bn1.running_mean, expected_mean)

