"""The unified gradient view: for each of the eight methods, the autograd gradient of the loss as
implemented in its file, with respect to the L2-normalised online embedding, equals the closed form
"−positive + negative" of common/gradients.py, the form docs/gradients.md states.

Where the loss normalises its input itself (SimCLR, BYOL, SimSiam), autograd at a unit vector u
returns the closed form's part tangent to the sphere, (I − uuᵀ)·∂L/∂u; elsewhere the two are equal."""
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import barlow
import byol
import mocov1
import mocov2
import simclr
import simsiam
import unigrad
import vicreg
from common import gradients

N, d = 8, 6
ROOT = Path(__file__).resolve().parents[1]


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def autograd(loss_of_u1, u1):
    u1 = u1.clone().requires_grad_()
    loss_of_u1(u1).backward()
    return u1.grad


def tangent(g, u):
    return g - (g * u).sum(1, keepdim=True) * u


def closed(form):
    positive, negative = form
    return -positive + negative


@pytest.mark.parametrize("module", [mocov1, mocov2])
def test_moco(module):
    q, k, queue = unit(N, d, seed=1), unit(N, d, seed=2), unit(d, 20, seed=3)
    for tau in (0.07, 0.2):
        g = autograd(lambda u: module.info_nce(u, k, queue, tau), q)
        torch.testing.assert_close(g, closed(gradients.moco(q, k, queue, tau)), rtol=1e-10, atol=1e-12)


def test_simclr_anchor_and_candidate_paths():
    u1, u2 = unit(N, d, seed=1), unit(N, d, seed=2)
    for tau in (0.1, 0.5):
        g = autograd(lambda u: simclr.nt_xent(u, u2, tau), u1)
        torch.testing.assert_close(g, tangent(closed(gradients.simclr(u1, u2, tau)), u1), rtol=1e-10, atol=1e-12)


def test_byol_both_directions():
    p1, p2, t1, t2 = (unit(N, d, seed=s) for s in range(4))
    g = autograd(lambda u: byol.regression_loss(u, t2) + byol.regression_loss(p2, t1), p1)
    torch.testing.assert_close(g, tangent(closed(gradients.byol(p1, t2)), p1), rtol=1e-10, atol=1e-12)


def test_simsiam_eq4():
    p1, p2, z1, z2 = (unit(N, d, seed=s) for s in range(4))
    g = autograd(lambda u: simsiam.D(u, z2) / 2 + simsiam.D(p2, z1) / 2, p1)
    torch.testing.assert_close(g, tangent(closed(gradients.simsiam(p1, z2)), p1), rtol=1e-10, atol=1e-12)


def test_barlow_twins_through_the_batch_standardisation():
    u1, u2 = unit(N, d, seed=1), unit(N, d, seed=2)
    for lambd in (0.0051, 0.3):
        g = autograd(lambda u: barlow.barlow_twins_loss(u, u2, lambd), u1)
        torch.testing.assert_close(g, closed(gradients.barlow(u1, u2, lambd)), rtol=1e-8, atol=1e-10)


def test_vicreg_every_term():
    u1, u2 = unit(N, d, seed=1), unit(N, d, seed=2)
    wide = u1 * torch.tensor([0.5, 1, 3, 5, 8, 0.1], dtype=torch.float64)  # some stds above 1: hinge off there
    for x in (u1, wide):
        for coeffs in [(25.0, 25.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]:
            g = autograd(lambda u: vicreg.vicreg_loss(u, u2, *coeffs), x)
            torch.testing.assert_close(g, closed(gradients.vicreg(x, u2, *coeffs)), rtol=1e-8, atol=1e-12,
                                       msg=str(coeffs))


def test_unigrad():
    u1, u2, u1m, u2m = (unit(N, d, seed=s) for s in range(4))
    F_ = (u1m.T @ u1m + u2m.T @ u2m) / (2 * N)
    g = autograd(lambda u: unigrad.unigrad_loss(u, u2, u1m, u2m, F_, 100.0), u1)
    torch.testing.assert_close(g, closed(gradients.unigrad(u1, u2m, F_, 100.0)), rtol=1e-10, atol=1e-12)


def test_a_wrong_form_would_fail():
    """The comparison is sharp: the SimCLR form without its candidate path is off."""
    u1, u2 = unit(N, d, seed=1), unit(N, d, seed=2)
    g = autograd(lambda u: simclr.nt_xent(u, u2, 0.5), u1)
    positive, negative = gradients.simclr(u1, u2, 0.5)
    anchor_only = -positive / 2 + negative  # a plausible but wrong form
    assert not torch.allclose(g, tangent(anchor_only, u1), rtol=1e-3, atol=1e-6)


def figure_text(path):
    """The figure's words (its text is text: svg.fonttype none) and every font size in it, in points."""
    svg = path.read_text(encoding="utf-8")
    root = ET.fromstring(svg)
    assert not root.findall(".//{http://www.w3.org/2000/svg}image"), "no bitmap inside the figure"
    words = [" ".join(t.itertext()).strip() for t in root.iter("{http://www.w3.org/2000/svg}text")]
    return words, [float(x) for x in re.findall(r"font-size: ([0-9.]+)px", svg)]


def test_the_probe_writes_json_and_an_svg_figure_that_says_what_it_omits(tmp_path):
    result = gradients.main(["--dataset", "synthetic", "--batch-size", "12", "--image-size", "16",
                             "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gradients.json").read_text())
    assert saved == json.loads(json.dumps(result))
    methods = ["moco", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]
    assert list(saved["norms"]) == methods and saved["batch"] == 12
    for a in methods:
        assert saved["cosine"][a][a] == pytest.approx(1.0)
        assert saved["norms"][a]["positive"] > 0
        for b in methods:
            assert saved["cosine"][a][b] == pytest.approx(saved["cosine"][b][a])
    words, sizes = figure_text(tmp_path / "gradients.svg")
    assert min(sizes) >= 11, "every label at least 11 pt at the figure's natural size"
    for label in ("method A", "method B", "cosine", "method", "mean norm over the batch (log scale)"):
        assert label in words, f"axis label {label!r} missing"
    zeros = [a for a in methods if saved["norms"][a]["negative"] == 0]
    assert zeros == ["byol", "simsiam"]  # no explicit negative term: a log axis cannot draw them, the figure says so
    assert words.count("0: no negative term") == len(zeros)


def test_the_docs_figure_is_drawn_from_its_json(tmp_path):
    """docs/assets/gradients/gradients.svg is what `--from-json` draws from the JSON beside it (numbers compared
    to 0.01 pt), and its width keeps 11 pt labels at 11 pt in a page column of 720 px."""
    docs = ROOT / "docs" / "assets" / "gradients"
    assert not (docs / "gradients.png").exists()
    shutil.copy(docs / "gradients.json", tmp_path / "gradients.json")
    gradients.main(["--from-json", str(tmp_path / "gradients.json")])

    def rounded(path):
        return re.sub(r"-?\d+\.\d+", lambda m: f"{float(m[0]):.2f}", path.read_text(encoding="utf-8"))
    assert rounded(tmp_path / "gradients.svg") == rounded(docs / "gradients.svg"), \
        "stale figure: `uv run python -m common.gradients --from-json docs/assets/gradients/gradients.json`"
    assert float(ET.parse(docs / "gradients.svg").getroot().get("width").removesuffix("pt")) <= 540


def test_a_json_the_figure_cannot_read_is_one_line(tmp_path):
    (tmp_path / "gradients.json").write_text("{}")
    for path in (tmp_path / "gradients.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as e:
            gradients.main(["--from-json", str(path)])
        assert str(e.value).startswith("error: cannot draw") and "\n" not in str(e.value)


def test_the_probe_feeds_each_loss_what_it_sees_in_training(tmp_path, monkeypatch):
    """Barlow Twins and VICReg take the raw embedding in training (their files never normalise it), the
    other losses unit vectors: the probe's real run hands each form the same kind of input."""
    seen = {}
    for name in ["moco", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]:
        form = getattr(gradients, name)

        def recording(first, *rest, _name=name, _form=form):
            seen[_name] = first.norm(dim=1)
            return _form(first, *rest)
        monkeypatch.setattr(gradients, name, recording)
    gradients.main(["--dataset", "synthetic", "--batch-size", "12", "--image-size", "16", "--out", str(tmp_path)])
    for name, norms in seen.items():
        unit = torch.allclose(norms, torch.ones_like(norms))  # (rtol 1e-5: a normalised float32 vector's norm is 1 ± 1e-7)
        assert unit == (name not in ("barlow", "vicreg")), name
    torch.testing.assert_close(seen["barlow"], seen["vicreg"])  # both the same raw embeddings
