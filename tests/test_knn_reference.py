"""The kNN monitor (common/evaluate.py through Run.knn, at the end of a real run) and the offline kNN
(python -m common.knn) against the weighted kNN of Wu et al. 2018 ("Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", §3.4), written here from the paper with Python loops in float64:

    s_i = cos(v_i, f) = v_i·f / (‖v_i‖‖f‖)          the similarity of the query f to memory feature v_i
    N_k = the k memory features of largest s_i
    w_c = Σ_{i ∈ N_k, c_i = c} exp(s_i / τ)          the class votes
    prediction = argmax_c w_c

on features whose norms differ (by a factor of up to 8), so that a dot product (unnormalised features) gives
other neighbours and other votes. The features come from a backbone that reads each image's index off its
pixels and returns a row of a fixed table: every image's feature is known exactly.
"""
import json
import math

import numpy as np
import pytest
import torch

from conftest import run_main

from common import cli, data, evaluate, knn, train

K, T, CLASSES, MEMORY, QUERIES, DIM, SIZE = 5, 0.1, 3, 45, 30, 8, 8


def reference_knn(queries, memory, memory_labels, k, t, classes, cosine=True):
    """Wu et al. 2018, §3.4, one query at a time in float64. Returns the predictions and, per query, the gap
    between the k-th and the (k+1)-th similarity and the relative gap between the two largest votes (how
    far the answer is from a tie that float32 rounding could flip)."""
    predictions, margins = [], []
    for f in queries.tolist():
        sims = []
        for v in memory.tolist():
            dot = sum(a * b for a, b in zip(v, f))
            norm = math.sqrt(sum(a * a for a in v)) * math.sqrt(sum(b * b for b in f)) if cosine else 1.0
            sims.append(dot / norm)
        order = sorted(range(len(sims)), key=lambda i: -sims[i])
        votes = [0.0] * classes
        for i in order[:k]:
            votes[int(memory_labels[i])] += math.exp(sims[i] / t)
        best = max(range(classes), key=lambda c: votes[c])
        top_two = sorted(votes, reverse=True)[:2]
        predictions.append(best)
        margins.append((sims[order[k - 1]] - sims[order[k]], (top_two[0] - top_two[1]) / top_two[0]))
    return predictions, margins


def table_features(seed=7):
    """Memory and query features: class directions plus noise, each scaled by its own norm in [0.3, 2.4]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(CLASSES, DIM, generator=g, dtype=torch.float64), dim=1)
    memory_labels = torch.arange(MEMORY) % CLASSES
    query_labels = torch.randint(0, CLASSES, (QUERIES,), generator=g)

    def draw(labels):
        x = torch.nn.functional.normalize(centres[labels] + 0.9 * torch.randn(len(labels), DIM, generator=g,
                                                                           dtype=torch.float64), dim=1)
        return x * (0.3 * 8 ** torch.rand(len(labels), 1, generator=g, dtype=torch.float64))  # norms 0.3 .. 2.4
    return draw(memory_labels), memory_labels, draw(query_labels), query_labels


class TableBackbone(torch.nn.Module):
    """The feature of an image is a row of a table: the image's red value is its index, its green value its
    split (0: train, 255: test). Records the (split, index) of every image it sees, in order."""

    def __init__(self, memory, queries):
        super().__init__()
        self.register_buffer("memory", memory.float())
        self.register_buffer("queries", queries.float())
        mean, std = data.IMAGENET_MEAN_STD
        self.mean, self.std, self.seen = torch.tensor(mean), torch.tensor(std), []

    def forward(self, x):
        pixels = (x.float().mean((2, 3)) * self.std + self.mean) * 255  # (n, 3): the image's constant colour
        index, test = pixels[:, 0].round().long(), pixels[:, 1] > 127
        self.seen += [("test" if t else "train", int(i)) for t, i in zip(test, index)]
        return torch.where(test[:, None], self.queries[index.clamp(max=QUERIES - 1)], self.memory[index])


def write_table_folder(root, memory_labels, query_labels):
    """An ImageFolder whose image i of a split is one colour: red i, green 0 (train) or 255 (test)."""
    from PIL import Image
    for split, labels, green in (("train", memory_labels, 0), ("test", query_labels, 255)):
        for i, c in enumerate(labels.tolist()):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((SIZE, SIZE, 3), (i, green, 0), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    memory, memory_labels, queries, query_labels = table_features()  # (seed 7: no near-tie, see below)
    root = write_table_folder(tmp_path_factory.mktemp("table"), memory_labels, query_labels)
    expected, margins = reference_knn(queries, memory, memory_labels, K, T, CLASSES)
    # No answer near a tie: the k-th and (k+1)-th similarities at least 1e-3 apart and the winning vote at
    # least 1e-3 (relative) above the next, 1e4 times float32's rounding of a cosine and of a sum of 5 exps.
    assert min(m[0] for m in margins) > 1e-3 and min(m[1] for m in margins) > 1e-3, margins
    dot, _ = reference_knn(queries, memory, memory_labels, K, T, CLASSES, cosine=False)
    differ = sum(a != b for a, b in zip(expected, dot))
    assert differ >= 3, "the features must make a dot product answer otherwise than the cosine"
    accuracy = sum(p == y for p, y in zip(expected, query_labels.tolist())) / QUERIES
    dot_accuracy = sum(p == y for p, y in zip(dot, query_labels.tolist())) / QUERIES
    assert accuracy != dot_accuracy  # (so the logged top-1 alone tells the two apart)
    return {"root": root, "memory": memory, "queries": queries, "expected": expected, "top1": accuracy}


def _spy(monkeypatch):
    """Record the predictions of the real knn_predict (called through)."""
    calls, predict = [], evaluate.knn_predict

    def recorded(*args, **kwargs):
        calls.append(predict(*args, **kwargs))
        return calls[-1]
    monkeypatch.setattr(evaluate, "knn_predict", recorded)
    return calls


def _query_order(backbone):
    """The test images' indices in the order the queries were computed (the last pass over test/)."""
    tests = [i for split, i in backbone.seen if split == "test"]
    return tests[-QUERIES:]


def test_the_knn_monitor_of_a_real_run_is_wu_et_al_weighted_knn(table, monkeypatch, tmp_path):
    """simsiam.py's real loop, one step, with the monitor's backbone replaced by the table (Run.watch is
    given it): the final kNN evaluation (Run.knn: features, gather, knn_predict) predicts each query as the
    float64 reference does and logs the reference's top-1. Unnormalised features (a dot product), votes that
    are counts or sum the similarities without exp(s/t), or another k fail here."""
    import simsiam
    backbone = TableBackbone(table["memory"], table["queries"])
    watch = train.Run.watch
    monkeypatch.setattr(train.Run, "watch", lambda self, model, optimizer, **kw: watch(
        self, model, optimizer, **{**kw, "backbone": backbone}))
    monkeypatch.setattr(evaluate, "head", lambda model: None)  # the effective rank of z: the table has no projector input
    calls = _spy(monkeypatch)
    run_main(simsiam, "--dataset", "folder", "--data-dir", table["root"], "--image-size", SIZE, "--batch-size", "8",
             "--workers", "0", "--device", "cpu", "--epochs", "1", "--max-steps", "1", "--dim", "16", "--pred-dim",
             "8", "--knn-k", K, "--knn-t", T, "--out", tmp_path)
    assert len(calls) == 1
    order = _query_order(backbone)
    assert sorted(order) == list(range(QUERIES))
    assert [table["expected"][i] for i in order] == calls[0].tolist()
    rows = [r for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if "knn_top1" in r]
    assert json.loads(rows[-1])["knn_top1"] == pytest.approx(table["top1"], abs=1e-12)


def test_the_offline_knn_is_wu_et_al_weighted_knn(table, monkeypatch, tmp_path):
    """python -m common.knn's main with the table as the loaded backbone: the same predictions and top-1."""
    backbone = TableBackbone(table["memory"], table["queries"])
    monkeypatch.setattr(evaluate, "load_backbone", lambda path, device: (backbone.eval(), {"image_size": SIZE}))
    calls = _spy(monkeypatch)
    entry = knn.main(cli.parse(knn.Args, argv=["--backbone", str(tmp_path / "backbone.pt"), "--dataset", "folder",
                                               "--data-dir", str(table["root"]), "--k", str(K), "--t", str(T),
                                               "--workers", "0", "--device", "cpu"]))
    assert len(calls) == 1
    order = _query_order(backbone)
    assert [table["expected"][i] for i in order] == calls[0].tolist()
    assert entry["top1"] == pytest.approx(table["top1"], abs=1e-12) and entry["k"] == K and entry["t"] == T
