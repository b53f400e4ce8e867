"""Distributed paths against the single-process result, with real gloo processes on CPU."""
import copy
import importlib

import pytest
import torch

from common import data, dist, evaluate, train
from common.device import GpuPath


def contrastive_like(x_all, anchors):
    """A loss whose anchors see every sample: mean over anchors a of logsumexp_j(x_a·x_j)."""
    return torch.logsumexp(anchors @ x_all.T, dim=1).mean()


def _gather_channels_last(rank, world, x, weights):
    n = len(x) // world
    mine = x[rank * n:(rank + 1) * n].contiguous(memory_format=torch.channels_last).requires_grad_()
    everyone = dist.gather_with_grad(mine)
    (everyone * weights).sum().backward()
    return {"gathered": dist.gather(mine.detach()), "with_grad": everyone.detach(), "grad": mine.grad}


def test_gathers_of_a_channels_last_batch(gloo):
    """MoCo's ShuffleBN gathers the key images, which the GPU path holds in channels_last."""
    torch.manual_seed(0)
    x, weights = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    for r, res in enumerate(gloo(2).run(_gather_channels_last, x, weights)):
        torch.testing.assert_close(res["gathered"], x, rtol=0, atol=0)
        torch.testing.assert_close(res["with_grad"], x, rtol=0, atol=0)
        torch.testing.assert_close(res["grad"], 2 * weights[2 * r:2 * r + 2])  # both ranks' losses


def _gather_with_grad(rank, world, x):
    n = len(x) // world
    mine = x[rank * n:(rank + 1) * n].clone().requires_grad_()
    everyone = dist.gather_with_grad(mine)  # (N, d), rank order
    contrastive_like(everyone, mine).backward()
    return {"gathered": everyone.detach(), "grad": mine.grad}


@pytest.mark.parametrize("world", [2, 3])
def test_gather_with_grad_gives_the_single_process_gradient(world, gloo):
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    results = gloo(world).run(_gather_with_grad, x)
    # One process: the sum of the ranks' losses, each over its own anchors against all samples.
    x1 = x.clone().requires_grad_()
    n = len(x) // world
    sum(contrastive_like(x1, x1[r * n:(r + 1) * n]) for r in range(world)).backward()
    for r, res in enumerate(results):
        torch.testing.assert_close(res["gathered"], x, rtol=0, atol=0)
        torch.testing.assert_close(res["grad"], x1.grad[r * n:(r + 1) * n], rtol=1e-12, atol=1e-12)


def _method_step(rank, world, method, x1, x2, args):
    module = importlib.import_module(method)
    torch.manual_seed(0)
    gpu = GpuPath("cpu", amp=False, on=True)  # the ranks run the GPU path's layout, channels_last, in float64
    model = train.prepare(module.build_model(args).double(), gpu)  # as Run: device, global BN, DDP
    n = len(x1) // world
    loss, _ = model(gpu.inputs(x1[rank * n:(rank + 1) * n]), gpu.inputs(x2[rank * n:(rank + 1) * n]))
    loss.backward()
    net = dist.unwrap(model)
    return {"loss": dist.all_reduce_mean(loss.detach()),
            "grads": {k: p.grad for k, p in net.named_parameters()},
            "buffers": {k: b for k, b in net.named_buffers()}}


SMALL_ARGS = {
    "simsiam": lambda m: m.Args(image_size=16, dim=32, pred_dim=8),
    "simclr": lambda m: m.Args(image_size=16, dim=16),
    "byol": lambda m: m.Args(image_size=16, hidden_dim=16, dim=8),
    "barlow": lambda m: m.Args(image_size=16, dim=16),
    "vicreg": lambda m: m.Args(image_size=16, dim=16),
    "unigrad": lambda m: m.Args(image_size=16, dim=8),
}


@pytest.mark.parametrize("method, world", [(m, 2) for m in sorted(SMALL_ARGS)] + [("simclr", 3), ("vicreg", 3)])
def test_one_step_on_W_ranks_equals_one_process(method, world, gloo):
    """W ranks of N/W samples (global BN, DDP, gathers), in channels_last, give the loss, every parameter
    gradient and every BN running statistic of one process with all N samples in the default layout.
    (W = 3 for the two losses that gather with gradient, whose shards then differ most from W = 2.)"""
    module = importlib.import_module(method)
    args = SMALL_ARGS[method](module)
    torch.manual_seed(1)
    x1, x2 = torch.randn(12, 3, 16, 16, dtype=torch.float64), torch.randn(12, 3, 16, 16, dtype=torch.float64)
    results = gloo(world).run(_method_step, method, x1, x2, args)
    torch.manual_seed(0)
    model = module.build_model(args).double()
    loss, _ = model(x1, x2)
    loss.backward()
    for res in results:
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        for k, p in model.named_parameters():
            if p.grad is None:  # a frozen parameter (SimCLR's last BN β, BYOL's target) is frozen on every rank
                assert res["grads"][k] is None, k
            else:
                torch.testing.assert_close(res["grads"][k], p.grad, rtol=1e-8, atol=1e-10, msg=k)
        for k, b in model.named_buffers():
            torch.testing.assert_close(res["buffers"][k], b, rtol=1e-8, atol=1e-10, msg=k)


def _knn(rank, world, memory, memory_labels, queries, labels):
    class Identity(torch.nn.Module):
        def forward(self, x):
            return x
    pairs = lambda x, y: list(zip(x, y))  # noqa: E731 - a dataset of (feature, label)
    device = torch.device("cpu")
    mem = data.eval_loader(pairs(memory, memory_labels), 7, 0, device)
    test = data.eval_loader(pairs(queries, labels), 5, 0, device)
    return evaluate.knn(Identity(), mem, test, GpuPath(device), k=5, t=0.1)


def test_knn_over_ranks_equals_one_process(gloo):
    torch.manual_seed(0)
    memory, queries = torch.randn(41, 8), torch.randn(23, 8)  # sizes that do not divide by 2
    memory_labels, labels = torch.randint(0, 4, (41,)), torch.randint(0, 4, (23,))
    single = _knn(0, 1, memory, memory_labels, queries, labels)
    results = gloo(2).run(_knn, memory, memory_labels, queries, labels)
    assert results == [single, single]
    assert 0.0 < single < 1.0


def test_sampler_ranks_together_see_the_single_process_batches():
    """Step s of W ranks covers the same samples, with the same augmentation seeds, as step s of one."""
    n, batch, world = 40, 8, 2
    one = list(data.Sampler(range(n), seed=3, num_replicas=1, rank=0))
    ranks = [list(data.Sampler(range(n), seed=3, num_replicas=world, rank=r)) for r in range(world)]
    for step in range(n // batch):
        single = set(one[step * batch:(step + 1) * batch])
        per_rank = batch // world
        union = set().union(*[set(r[step * per_rank:(step + 1) * per_rank]) for r in ranks])
        assert union == single


def test_sampler_resumes_mid_epoch_and_reshuffles_each_epoch():
    s = data.Sampler(range(20), seed=0, num_replicas=1, rank=0)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, skip=6)
    assert list(s) == full[6:] and len(s) == 14
    s.set_epoch(2)
    assert [i for i, _ in s] != [i for i, _ in full]
    assert len({seed for _, seed in full}) == 20  # every sample its own seed


def test_views_are_a_function_of_the_seed_only():
    from torchvision.transforms import v2
    base = [(torch.rand(3, 12, 12), 0)]
    t = v2.Compose([v2.RandomResizedCrop(8, antialias=True), v2.RandomHorizontalFlip()])
    views = data.Views(base, t, t)
    caller = torch.get_rng_state()
    a1, a2 = views[(0, 123)]
    assert torch.equal(torch.get_rng_state(), caller)  # no loader workers: the loop's generator is untouched
    torch.rand(5)  # the caller's generator moves on: no effect on the views
    b1, b2 = views[(0, 123)]
    c1, _ = views[(0, 124)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, c1)
    assert not torch.equal(a1, a2)  # the two views draw different parameters
    with torch.random.fork_rng(devices=[]):  # the views of a seed are those torch.manual_seed(seed) gives,
        torch.manual_seed(123)  # as before data.seeded: a run resumes with the same views
        assert torch.equal(t(base[0][0]), a1) and torch.equal(t(base[0][0]), a2)


def _barlow_official_gradients(rank, world, y1, y2, args):
    """Barlow Twins' official distributed loss: C of the local batch divided by the global N, summed over
    ranks by an all_reduce *without* gradient; then DDP's average of the ranks' gradients."""
    import barlow
    torch.manual_seed(0)
    net = dist.sync_batchnorm(barlow.build_model(args).double(), torch.device("cpu"))
    n, N = len(y1) // world, len(y1)
    mine = slice(rank * n, (rank + 1) * n)
    z1, z2 = net.projector(net.backbone(y1[mine])), net.projector(net.backbone(y2[mine]))
    bn = dist.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(z1.shape[1], affine=False)).double(),
                             torch.device("cpu"))  # (a root BatchNorm would not be converted)
    c = bn(z1).T @ bn(z2) / N  # standardised with the global statistics (SyncBN), this rank's share of C
    total = c.detach().clone()
    torch.distributed.all_reduce(total)  # in place, outside autograd, as torch.distributed.all_reduce(c)
    c = c + (total - c.detach())  # C of the global batch, but the gradient only sees this rank's share
    on_diag = (1 - c.diagonal()).pow(2).sum()
    loss = on_diag + args.lambd * (c.pow(2).sum() - c.diagonal().pow(2).sum())
    loss.backward()
    return {k: dist.all_reduce_mean(p.grad) for k, p in net.named_parameters()}  # what DDP does


def test_barlow_official_distributed_gradient_is_one_over_world_of_the_global_gradient(gloo):
    """The difference barlow.py's docs page records: with W ranks the official code's gradients are
    1/W of the gradient of the global loss, which barlow.py computes at every world size."""
    import barlow
    args = SMALL_ARGS["barlow"](barlow)
    torch.manual_seed(1)
    y1, y2 = torch.randn(12, 3, 16, 16, dtype=torch.float64), torch.randn(12, 3, 16, 16, dtype=torch.float64)
    torch.manual_seed(0)
    model = barlow.build_model(args).double()
    loss, _ = model(y1, y2)
    loss.backward()
    for world in (2, 3):
        official = gloo(world).run(_barlow_official_gradients, y1, y2, args)[0]
        for k, p in model.named_parameters():
            torch.testing.assert_close(official[k] * world, p.grad, rtol=1e-7, atol=1e-9, msg=k)


def _torch_sync_batchnorm(rank, world, method, args):
    module = importlib.import_module(method)
    model = module.build_model(args)
    before = dict(model.named_parameters())
    frozen = {k for k, p in before.items() if not p.requires_grad}
    converted = dist.sync_batchnorm(model, torch.device("cuda"))  # what a GPU run gets (no forward: CUDA only)
    norms = [type(m).__name__ for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    after = dict(converted.named_parameters())
    return {"norms": set(norms), "same": all(after[k] is p for k, p in before.items()) and after.keys() == before.keys(),
            "frozen": {k for k, p in after.items() if not p.requires_grad} == frozen and bool(frozen) == (method == "simclr")}


@pytest.mark.parametrize("method", ["simclr", "simsiam"])
def test_on_cuda_every_batchnorm_becomes_torchs_sync_batchnorm_with_the_same_parameters(method, gloo):
    """The one multi-GPU line the CPU cannot run (SyncBatchNorm's kernels are CUDA's): the conversion keeps
    every parameter object, so the optimiser built after it trains them, and SimCLR's frozen β stays frozen."""
    args = SMALL_ARGS[method](importlib.import_module(method))
    for res in gloo(2).run(_torch_sync_batchnorm, method, args):
        assert res == {"norms": {"SyncBatchNorm"}, "same": True, "frozen": True}


def _moco_keys(rank, world, method, x_q, x_k, sync_bn):
    """The key encoder's outputs on this rank (before the unshuffle) for the global key batch x_k ("base"), then
    for x_k with one sample changed: "to rank 1", a sample of rank 0's batch that the shuffle sends to rank 1;
    "to rank 0", one of rank 1's that it sends to rank 0. Each from the same start (weights, queue, and the
    same permutation, drawn on rank 0)."""
    module = importlib.import_module(method)
    args = module.Args(image_size=16, dim=8, K=16)
    torch.manual_seed(0)
    gpu = GpuPath("cpu", amp=False, on=True)  # float64, channels_last, as _method_step
    model = train.prepare(module.build_model(args).double(), gpu, sync_bn=sync_bn)  # as main's run.prepare
    net = dist.unwrap(model)
    start = copy.deepcopy(net.state_dict())
    seen = []
    net.encoder_k.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].detach(), out.detach())))
    n = len(x_k) // world
    mine = slice(rank * n, (rank + 1) * n)

    def keys(x):
        net.load_state_dict(start)
        torch.manual_seed(1)  # the same permutation on rank 0 at every forward
        model(gpu.inputs(x_q[mine]), gpu.inputs(x[mine]))
        return seen[-1]
    inputs, base = keys(x_k)
    here = [int((x_k - row).flatten(1).abs().amax(1).argmin()) for row in inputs]  # the samples sent here
    assert all(torch.equal(x_k[i], row) for i, row in zip(here, inputs))
    everyone = dist.gather(torch.tensor(here)).view(world, n).tolist()  # the shuffled sub-batch of each rank
    crossing = {"to rank 1": [i for i in everyone[1] if i // n == 0],  # start on rank 0, shuffled to rank 1
                "to rank 0": [i for i in everyone[0] if i // n == 1]}
    if not all(crossing.values()):
        return {"crossing": False}  # (the shuffle keeps every key image on its rank)
    changed = {"crossing": True}
    for name, (j, *_) in crossing.items():
        x = x_k.clone()
        x[j] += 1.0
        changed[name] = keys(x)[1]
    return {"base": base, **changed}


@pytest.mark.parametrize("method", ["mocov1", "mocov2"])
def test_moco_keys_on_a_rank_depend_on_its_shuffled_sub_batch_only(method, gloo):
    """ShuffleBN (MoCo §3.3): per-GPU BN in the key encoder over the shuffled sub-batch. With 2 ranks, changing
    a key image that the shuffle sends to rank 1 (from rank 0's own batch) leaves every key rank 0 computes
    bitwise unchanged and changes every key of rank 1 (its BN statistics), and the other way round; with global
    BN (the key's statistics would see its positive's batch again) rank 0's keys change too."""
    torch.manual_seed(2)
    x_q, x_k = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randn(8, 3, 16, 16, dtype=torch.float64)
    per_gpu = gloo(2).run(_moco_keys, method, x_q, x_k, False)
    for rank, res in enumerate(per_gpu):
        assert res["crossing"], "no key image crosses ranks: the keys are not shuffled across GPUs"
        unchanged, changed = ("to rank 1", "to rank 0") if rank == 0 else ("to rank 0", "to rank 1")
        assert torch.equal(res[unchanged], res["base"]), f"rank {rank}: keys depend on the other rank's sub-batch"
        assert (res[changed] != res["base"]).any(1).all(), f"rank {rank}: a key ignores its own sub-batch's BN"
    global_bn = gloo(2).run(_moco_keys, method, x_q, x_k, True)  # the control: the test tells the two apart
    assert not torch.equal(global_bn[0]["to rank 1"], global_bn[0]["base"])
