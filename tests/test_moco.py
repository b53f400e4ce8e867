"""MoCo v1/v2: InfoNCE against an explicit queue, the momentum update, the FIFO queue, split BN and
ShuffleBN (one process and gloo ranks)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import mocov1
import mocov2
from common import cli
from conftest import SMALL, metrics, run_main, two_process_argv


def naive_info_nce(q, k, queue, tau):
    """Eq. 1 per query, with the queue's keys listed one by one."""
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ queue[:, j]) / tau) for j in range(queue.shape[1]))
        total += -math.log(pos / (pos + neg))
    return total / len(q)


@pytest.mark.parametrize("module", [mocov1, mocov2])
def test_info_nce_matches_the_explicit_queue(module):
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(8, 12, dtype=torch.float64), dim=0)
    for tau in (0.07, 0.2):
        assert math.isclose(module.info_nce(q, k, queue, tau).item(), naive_info_nce(q, k, queue, tau), rel_tol=1e-10)


def test_momentum_update_is_eq2():
    torch.manual_seed(0)
    q, k = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    before = [p.detach().clone() for p in k.parameters()]
    mocov1.momentum_update(q, k, 0.99)
    for b, p_k, p_q in zip(before, k.parameters(), q.parameters()):  # float64, weights below 1: the two ways of
        torch.testing.assert_close(p_k, 0.99 * b + 0.01 * p_q, rtol=0, atol=1e-14)  # writing it differ by ~1e-16


def test_queue_is_a_fifo_with_a_wrapping_pointer():
    queue, ptr = torch.zeros(2, 6), torch.zeros((), dtype=torch.long)
    for step in range(4):  # batches of 2 into K = 6: positions 0, 2, 4, then back to 0
        keys = torch.full((2, 2), float(step + 1))
        mocov1.dequeue_and_enqueue(queue, ptr, keys)
        assert int(ptr) == (2 * (step + 1)) % 6
    assert queue[0].tolist() == [4, 4, 2, 2, 3, 3]  # batch 1, the oldest, was replaced by batch 4


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_split_batchnorm_normalises_each_interleaved_sub_batch(layout):
    """Each sub-batch s (samples s, s+S, s+2S, ...) normalised by its own statistics with the shared γ and β,
    forward and backward, in either memory layout (the GPU path's channels_last included)."""
    torch.manual_seed(0)
    S = 4
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    split = mocov1.SplitBatchNorm(3, splits=S).double()
    with torch.no_grad():  # not the identity of a fresh BN
        split.weight.uniform_(0.5, 2.0)
        split.bias.normal_()
    y = split(x)
    assert y.is_contiguous(memory_format=layout)  # the output keeps the input's layout
    x_ref, w, b = (t.detach().clone().requires_grad_() for t in (x, split.weight, split.bias))
    y_ref = torch.stack([F.batch_norm(x_ref[s::S], None, None, w, b, training=True) for s in range(S)], dim=1)
    y_ref = y_ref.flatten(0, 1)  # (n/S, S, ...) -> sample a·S + s back at its place
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for got, want in [(x.grad, x_ref.grad), (split.weight.grad, w.grad), (split.bias.grad, b.grad)]:
        torch.testing.assert_close(got, want)
    sub = [x.detach()[s::S] for s in range(S)]
    torch.testing.assert_close(split.running_mean, 0.1 * sum(t.mean((0, 2, 3)) for t in sub) / S)
    torch.testing.assert_close(split.running_var, 0.9 + 0.1 * sum(t.var((0, 2, 3)) for t in sub) / S)
    plain = torch.nn.BatchNorm2d(3).double()
    plain(x.detach())
    assert not torch.allclose(plain.running_var, split.running_var)


def test_shuffle_keeps_every_key_with_its_query_on_one_process():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1)
    shuffled, unshuffle = mocov1.shuffle(x)
    assert not torch.equal(shuffled, x) and sorted(shuffled.view(-1).tolist()) == x.view(-1).tolist()
    torch.testing.assert_close(unshuffle(shuffled * 10), x * 10)  # a per-sample encoder, then back in order


@pytest.mark.parametrize("module", [mocov1, mocov2])
def test_forward_pairs_each_query_with_the_key_of_its_own_image(module):
    """The model's real forward: with per-sample BN statistics out of play (plain BN over the whole
    batch, which a permutation does not change), the keys after ShuffleBN and its undoing are those of
    an unshuffled key encoder, in query order: the loss is Eq. 1 on them, and the queue receives them.
    A forward that drops the unshuffle pairs q_i with another image's key and fails."""
    torch.manual_seed(0)
    model = module.build_model(module.Args(image_size=8, dim=16, K=16, bn_splits=1)).double()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x_q, x_k = (torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    queue = model.queue.clone()
    loss, stats = model(x_q, x_k)
    with torch.no_grad():
        module.momentum_update(reference.encoder_q, reference.encoder_k, reference.m)
        q = torch.nn.functional.normalize(reference.encoder_q(x_q), dim=1)
        k = torch.nn.functional.normalize(reference.encoder_k(x_k), dim=1)  # no shuffle at all
    assert math.isclose(loss.item(), naive_info_nce(q, k, queue, model.tau), rel_tol=1e-9)
    torch.testing.assert_close(model.queue[:, :8].T, k)  # the keys enqueued in query order
    torch.testing.assert_close(stats["pos_sim"], (q * k).sum(1).mean())


def _shuffle_and_enqueue(rank, world, x, k):
    n = len(x) // world
    torch.manual_seed(rank)  # rank 0's permutation must win
    shuffled, unshuffle = mocov1.shuffle(x[rank * n:(rank + 1) * n])
    back = unshuffle(shuffled * 10)
    queue, ptr = torch.zeros(k.shape[1], 2 * len(k)), torch.zeros((), dtype=torch.long)
    mocov1.dequeue_and_enqueue(queue, ptr, k[rank * n:(rank + 1) * n])
    return {"shuffled": shuffled, "back": back, "queue": queue, "ptr": int(ptr)}


def test_shufflebn_and_queue_across_two_ranks(gloo):
    x = torch.arange(8.0).view(8, 1)
    k = torch.randn(8, 3)
    results = gloo(2).run(_shuffle_and_enqueue, x, k)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["back"], x[r * 4:(r + 1) * 4] * 10)  # every key back with its query
    moved = torch.cat([res["shuffled"] for res in results]).view(-1)
    assert sorted(moved.tolist()) == x.view(-1).tolist()  # a permutation of the global batch
    assert any(v >= 4 for v in results[0]["shuffled"].view(-1).tolist())  # keys do cross ranks
    queue, ptr = torch.zeros(3, 16), torch.zeros((), dtype=torch.long)
    mocov1.dequeue_and_enqueue(queue, ptr, k)  # one process given all 8 keys in global order
    for res in results:
        torch.testing.assert_close(res["queue"], queue)
        assert res["ptr"] == int(ptr) == 8


def test_mocov2_is_mocov1_plus_the_four_changes():
    v1 = cli.parse(mocov1.Args, mocov1.PRESETS, ["--dataset", "imagenet"])
    v2 = cli.parse(mocov2.Args, mocov2.PRESETS, ["--dataset", "imagenet"])
    assert (v1.tau, v2.tau, v1.K, v1.m, v1.lr * v1.batch_size / 256) == (0.07, 0.2, 65536, 0.999, 0.03)
    m1, m2 = mocov1.build_model(mocov1.Args(image_size=16)), mocov2.build_model(mocov2.Args(image_size=16))
    assert [type(m).__name__ for m in m1.encoder_q[1:]] == ["Linear"]
    assert [type(m).__name__ for m in m2.encoder_q[1:]] == ["Linear", "ReLU", "Linear"]
    assert not any(p.requires_grad for p in m1.encoder_k.parameters())
    assert all(torch.equal(a, b) for a, b in zip(m1.encoder_q.parameters(), m1.encoder_k.parameters()))
    assert m1.queue.shape == (128, 4096) and torch.allclose(m1.queue.norm(dim=0), torch.ones(4096))  # (float32: 1 ± 1e-7)


@pytest.mark.parametrize("method", ["mocov1", "mocov2"])
def test_command_line_one_and_two_processes(method, image_folder, tmp_path, monkeypatch, torchrun_runs):
    from common import evaluate
    module = {"mocov1": mocov1, "mocov2": mocov2}[method]
    flags = two_process_argv(method, image_folder)  # ... "--K", "16"
    widths, features = [], evaluate.features

    def recorded(*args, **kwargs):  # the width of the features each kNN evaluation reads
        f, labels = features(*args, **kwargs)
        widths.append(f.shape[1])
        return f, labels
    monkeypatch.setattr(evaluate, "features", recorded)
    run_main(module, *flags, "--out", tmp_path / "one")
    assert widths == [512, 512, 128, 128]  # memory and queries: the backbone, then the demo's 128-d q
    two = torchrun_runs.out(method)  # torchrun --nproc-per-node=2 <method>.py (the same flags), run beside this test
    for out, world in [(tmp_path / "one", 1), (two, 2)]:
        rows = metrics(out)
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
        assert {"knn_top1", "knn_top1_q"} <= set(rows[-1]) and 0 <= rows[-1]["knn_top1_q"] <= 1
        assert all(0 < r["loss"] < 10 and "pos_sim" in r for r in rows if "loss" in r)
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["method"] == method and int(ckpt["model"]["queue_ptr"]) == (3 * 8) % 16
        assert len(ckpt["rng"]) == world


def test_queue_size_not_a_multiple_of_the_batch(image_folder, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_main(mocov1, "--dataset", "folder", "--data-dir", image_folder, *SMALL, "--K", "20", "--out", tmp_path)
    assert str(e.value.code) == ("error: --K 20 is not a multiple of --batch-size 8: the queue takes whole "
                                 "batches (MoCo's official code asserts the same)")


@pytest.mark.parametrize("module", [mocov1, mocov2], ids=["mocov1", "mocov2"])
def test_split_bn_of_each_file_keeps_the_statistics_of_every_sub_batch_in_the_real_forward(module):
    """Each file's own SplitBatchNorm (shared by design, so each copy is tested), through the model's real
    forward on one process: the query encoder's first BN normalises each interleaved sub-batch by its own
    statistics, and its running mean and variance move by the average over the sub-batches of their
    statistics (the official demo's SplitBatchNorm). A copy that keeps only the first sub-batch's statistics
    fails here. In float64: the tolerance is torch.testing's float64 default."""
    torch.manual_seed(0)
    S = 4
    model = module.build_model(module.Args(image_size=8, dim=16, K=16, bn_splits=S)).double()
    bn = model.encoder_q[0].bn1
    assert type(bn) is module.SplitBatchNorm  # this file's own class
    seen = {}

    def keep(m, inputs, output):  # copies: the ReLU after this BN works in place
        seen.update(x=inputs[0].detach().clone(), y=output.detach().clone())
    bn.register_forward_hook(keep)
    g = torch.Generator().manual_seed(1)
    x_q, x_k = (torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    model(x_q, x_k)
    x = seen["x"]
    sub = [x[s::S] for s in range(S)]  # sub-batch s: samples s, s + S, ...
    y_ref = torch.stack([F.batch_norm(t, None, None, bn.weight.detach(), bn.bias.detach(), training=True)
                         for t in sub], dim=1).flatten(0, 1)
    torch.testing.assert_close(seen["y"], y_ref)
    m = bn.momentum
    torch.testing.assert_close(bn.running_mean, (1 - m) * mean0 + m * sum(t.mean((0, 2, 3)) for t in sub) / S)
    torch.testing.assert_close(bn.running_var, (1 - m) * var0 + m * sum(t.var((0, 2, 3)) for t in sub) / S)


@pytest.mark.parametrize("module", [mocov1, mocov2], ids=["mocov1", "mocov2"])
def test_forward_moves_the_key_encoder_by_eq2_before_it_computes_the_keys(module):
    """The real forward with a query encoder that differs from the key encoder (as after any step): θ_k ←
    m·θ_k + (1 − m)·θ_q happens first, and the keys enqueued are those of the moved key encoder (official
    builder.py: the momentum update, then the keys). A forward that moves θ_k after the keys, or not at all,
    enqueues the keys of the old θ_k and fails. (BN over the whole batch, which ShuffleBN's permutation does
    not change, so that the keys can be computed here without the shuffle.) In float64."""
    torch.manual_seed(0)
    model = module.build_model(module.Args(image_size=8, dim=16, K=16, bn_splits=1, m=0.5)).double()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x_q, x_k = (torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    model(x_q, x_k)
    for p_k, p_k0, p_q in zip(model.encoder_k.parameters(), reference.encoder_k.parameters(),
                              reference.encoder_q.parameters()):
        torch.testing.assert_close(p_k, 0.5 * p_k0 + 0.5 * p_q)  # Eq. 2 with m = 0.5
    with torch.no_grad():
        module.momentum_update(reference.encoder_q, reference.encoder_k, 0.5)
        k = torch.nn.functional.normalize(reference.encoder_k(x_k), dim=1)
    torch.testing.assert_close(model.queue[:, :8].T, k)  # the keys of the moved key encoder
