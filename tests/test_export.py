"""The exported backbone is the network each paper evaluates, and the kNN monitor reads that same network:
MoCo's θ_q (encoder_q's ResNet, not the momentum key encoder), BYOL's online θ (not the target ξ), UniGrad's
online network (not the momentum one), SimSiam's f, SimCLR's, Barlow Twins' and VICReg's single backbone.
Each method's real main(), two steps, after which the online and the momentum weights differ."""
import copy
import importlib

import pytest
import torch

from conftest import SMALL, run_main

from common import evaluate

EVALUATED = {  # method: (the evaluated backbone's prefix in the model, the momentum copy's prefix or None)
    "mocov1": ("encoder_q.0.", "encoder_k.0."),  # MoCo §4: the linear classifier on θ_q's features
    "mocov2": ("encoder_q.0.", "encoder_k.0."),
    "byol": ("backbone.", "target_backbone."),  # BYOL §3.1: "we only keep the encoder f_θ"
    "unigrad": ("backbone.", "momentum_backbone."),  # UniGrad: the online network is evaluated (official code)
    "simsiam": ("backbone.", None),
    "simclr": ("backbone.", None),
    "barlow": ("backbone.", None),
    "vicreg": ("backbone.", None),
}
EXTRA = {  # small heads (cheap steps); MoCo's queue takes whole batches of 8
    "mocov1": ["--K", "16", "--dim", "16"], "mocov2": ["--K", "16", "--dim", "16"],
    "byol": ["--hidden-dim", "16", "--dim", "8"], "unigrad": ["--dim", "8"], "simsiam": ["--dim", "32", "--pred-dim", "8"],
    "simclr": ["--dim", "16"], "barlow": ["--dim", "16"], "vicreg": ["--dim", "16"]}


@pytest.mark.parametrize("method", sorted(EVALUATED))
def test_backbone_pt_and_the_knn_monitor_hold_the_evaluated_encoder(method, image_folder, tmp_path, monkeypatch):
    module = importlib.import_module(method)
    seen, knn = [], evaluate.knn
    monkeypatch.setattr(evaluate, "knn", lambda backbone, *a, **kw: (
        seen.append(copy.deepcopy(backbone.state_dict())), knn(backbone, *a, **kw))[1])
    run_main(module, "--dataset", "folder", "--data-dir", image_folder, *SMALL, "--epochs", "1", "--max-steps", "2",
             *EXTRA[method], "--out", tmp_path)
    exported = torch.load(tmp_path / "backbone.pt", weights_only=True)
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    online, momentum = EVALUATED[method]
    encoder = {k.removeprefix(online): v for k, v in model.items() if k.startswith(online)}
    assert exported.keys() == encoder.keys()
    for k, v in exported.items():
        assert torch.equal(v, encoder[k]), f"backbone.pt's {k} is not the evaluated encoder's ({online}{k})"
    if momentum:  # the two copies differ after two steps: the test tells them apart
        other = {k.removeprefix(momentum): v for k, v in model.items() if k.startswith(momentum)}
        assert other.keys() == encoder.keys()
        assert any(not torch.equal(other[k], encoder[k]) for k in encoder if encoder[k].is_floating_point())
    # the monitor's kNN (the final evaluation, before the checkpoint) read the exported network
    first = seen[0]  # (MoCo then also evaluates encoder_q's 128-d output: knn_top1_q)
    assert first.keys() == exported.keys() and all(torch.equal(first[k], v) for k, v in exported.items())
