"""The unified gradient view (UniGrad, arXiv:2112.05141), made executable.

For each method, the gradient of its loss, as implemented in its file, with respect to the online
embedding of view 1 in the form the loss takes it: the L2-normalised u₁ for MoCo, SimCLR, BYOL,
SimSiam and UniGrad (whose losses compare unit vectors), the raw embedding z₁ for Barlow Twins and
VICReg (whose losses standardise it over the batch or regularise its variance and covariance, and
never normalise it); written as

    ∂L/∂u₁ (or ∂L/∂z₁) = −positive + negative        (negative already carries its balance coefficient λ)

`tests/test_gradients.py` checks every form below against autograd on the real loss functions;
docs/gradients.md states them. Where a loss normalises its input itself, autograd with respect to a
unit vector u returns (I − uuᵀ)·∂L/∂u, the component tangent to the sphere; the test compares that.

The probe, `python -m common.gradients [--backbone DIR/backbone.pt]`, embeds one batch of two views
with a backbone (random-init by default), evaluates every form on the same embeddings, each fed as in
training (raw z to Barlow Twins and VICReg, z/‖z‖ to the others), and prints and saves (JSON and an
SVG figure) the norms of the positive and negative parts and the cosine between the gradients that the
methods' losses send to the same raw embedding z₁: for a loss of u = z/‖z‖, its part tangent to the
sphere at u₁ divided by ‖z₁‖ (the chain rule through the normalisation):

    uv run python -m common.gradients --dataset synthetic --out runs/gradients
    uv run python -m common.gradients --from-json docs/assets/gradients/gradients.json   # redraw the figure only
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


# --- the closed forms: each returns (positive, negative), both (N, d), for view 1 ------------------

def moco(q, k, queue, tau):
    """InfoNCE, one direction: ∂L/∂qᵢ = (1/(Nτ))·(−kᵢ + Σ_v s_v v), v over {kᵢ} ∪ queue, s = softmax(q·v/τ).
    q, k: (N, d) unit queries and keys; queue: (d, K)."""
    N = len(q)
    candidates = torch.cat([k.unsqueeze(1), queue.T.expand(N, -1, -1)], dim=1)  # (N, 1+K, d)
    s = torch.softmax(torch.einsum("nd,nkd->nk", q, candidates) / tau, dim=1)  # (N, 1+K)
    return k / (N * tau), torch.einsum("nk,nkd->nd", s, candidates) / (N * tau)


def simclr(u1, u2, tau):
    """NT-Xent over the 2N views, with u₁ᵢ both an anchor and a candidate of the other anchors:
    ∂L/∂u₁ᵢ = (1/(2Nτ))·(−2u₂ᵢ + Σ_{c≠u₁ᵢ} s(u₁ᵢ, c)·c + Σ_{a≠u₁ᵢ} s(a, u₁ᵢ)·a),
    s(a, c) = softmax over c ≠ a of a·c/τ."""
    N = len(u1)
    views = torch.cat([u1, u2])  # (2N, d)
    logits = views @ views.T / tau
    logits.fill_diagonal_(float("-inf"))  # k ≠ i
    s = torch.softmax(logits, dim=1)  # (2N, 2N): s[a, c]
    as_anchor = (s @ views)[:N]  # Σ_c s(u₁ᵢ, c)·c
    as_candidate = (s.T @ views)[:N]  # Σ_a s(a, u₁ᵢ)·a
    return 2 * u2 / (2 * N * tau), (as_anchor + as_candidate) / (2 * N * tau)


def byol(p1, z2):
    """Eq. 2 summed over both directions: ∂L/∂p̄₁ᵢ = −(2/N)·z̄′₂ᵢ, p̄₁ the normalised prediction and
    z̄′₂ the target network's normalised projection. No explicit negative term: BYOL's appears only
    through the predictor and the moving average (UniGrad §3)."""
    N = len(p1)
    return 2 * z2 / N, torch.zeros_like(p1)


def simsiam(p1, z2):
    """Eq. 4: ∂L/∂p̄₁ᵢ = −(1/(2N))·z̄₂ᵢ; as BYOL, no explicit negative term."""
    N = len(p1)
    return z2 / (2 * N), torch.zeros_like(p1)


def _standardize(z, eps=1e-5):
    mean, var = z.mean(0), z.var(0, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps), torch.sqrt(var + eps)


def _standardize_backward(g, z_hat, sigma):
    """The transpose of batch standardisation's Jacobian (BatchNorm's backward, biased variance)."""
    return (g - g.mean(0) - z_hat * (g * z_hat).mean(0)) / sigma


def barlow(z1, z2, lambd):
    """Barlow Twins, Eq. 1: in the standardised coordinates ẑ,
    ∂L/∂ẑ₁_b = (2/N)·(−ẑ₂_b + diag(C)·ẑ₂_b + λ·(C − diag(C))·ẑ₂_b),  C ẑ₂_b = Σ_v (ẑ₂_vᵀẑ₂_b / N)·ẑ₁_v,
    mapped back to z₁ by the transpose of the standardisation's Jacobian."""
    N = len(z1)
    h1, s1 = _standardize(z1)
    h2, _ = _standardize(z2)
    C = h1.T @ h2 / N  # (d, d)
    D = torch.diag(C.diagonal())
    positive = _standardize_backward(2 * h2 / N, h1, s1)
    negative = _standardize_backward(2 * h2 @ (D + lambd * (C - D)).T / N, h1, s1)
    return positive, negative


def vicreg(x, y, sim_coeff, std_coeff, cov_coeff, eps=1e-4):
    """VICReg in its code form: ∂ℓ/∂x_b = −(2λ/(Nd))·y_b + (2λ/(Nd))·x_b
    − (μ/(2d(N−1)))·[1(std_j < 1)/std_j]_j ⊙ x̃_b + (4ν/(d(N−1)))·(C − diag C)·x̃_b,
    x̃ = x − x̄, std_j = √(Var x_j + ε), C = x̃ᵀx̃/(N−1): positive from invariance, negative from the
    invariance's self term, the variance hinge and the covariance."""
    N, d = x.shape
    xc = x - x.mean(0)
    std = torch.sqrt(x.var(0) + eps)
    C = xc.T @ xc / (N - 1)
    invariance_self = 2 * sim_coeff * x / (N * d)
    variance = -std_coeff / (2 * d * (N - 1)) * (std < 1).to(x.dtype) / std * xc
    covariance = 4 * cov_coeff / (d * (N - 1)) * xc @ (C - torch.diag(C.diagonal()))
    return 2 * sim_coeff * y / (N * d), invariance_self + variance + covariance


def unigrad(u1, u2m, F_, lambd):
    """UniGrad: ∂L/∂u₁ᵢ = ½·(−u₂ᵐᵢ + λ·F u₁ᵢ)/N (the ½ and 1/N of the symmetrised batch mean)."""
    N = len(u1)
    return u2m / (2 * N), lambd * u1 @ F_ / (2 * N)


# --- the probe -------------------------------------------------------------------------------------

RAW = ("barlow", "vicreg")  # the losses fed the embedding as it is, not L2-normalised


def forms(z1, z2, queue, args):
    """Every method's (positive, negative) on the same embeddings z1, z2 (N, d), each fed what its loss
    takes in training: Barlow Twins and VICReg the raw z, the others u = z/‖z‖. The other view stands
    for the target (momentum, target and key branches equal the online one here, predictors are the
    identity), the MoCo queue (d, K, unit columns) holds the keys of another batch, and F is the batch's
    correlation matrix."""
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    F_ = (u1.T @ u1 + u2.T @ u2) / (2 * len(u1))
    return {
        "moco": moco(u1, u2, queue, args.tau),
        "simclr": tuple(2 * t for t in simclr(u1, u2, args.tau)),  # simclr.py trains on 2 × nt_xent
        "byol": byol(u1, u2),
        "simsiam": simsiam(u1, u2),
        "barlow": barlow(z1, z2, args.lambd_barlow),
        "vicreg": vicreg(z1, z2, 25.0, 25.0, 1.0),
        "unigrad": unigrad(u1, u2, F_, args.lambd_unigrad),
    }


def embed(args):
    from torchvision.transforms import v2

    from common import data, resnet
    if args.backbone:
        backbone = resnet.from_state_dict(torch.load(args.backbone, map_location="cpu", weights_only=True))
    else:
        torch.manual_seed(args.seed)
        backbone = resnet.resnet(args.arch, resnet.uses_cifar_stem(args.image_size))
    view = v2.Compose([v2.RandomResizedCrop(args.image_size, scale=(0.2, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                       v2.RandomGrayscale(p=0.2), data.normalize(args.dataset)])
    base = data.dataset(args.dataset, args.data_dir, "pretrain", args.image_size)
    views = data.Views(base, view, view)
    pairs = [views[(i, args.seed * 100_003 + i)] for i in range(min(2 * args.batch_size, len(base)))]
    x1, x2 = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    backbone.train()  # batch statistics, as in a training step
    with torch.no_grad():
        return backbone(x1).double(), backbone(x2).double()  # raw embeddings z, (2N, d) each


def plot(result, path):
    """The figure of a probe's result: the cosines as an annotated heat map, the norms of the positive and negative
    parts as bars on a log scale (the losses differ by 10⁴), where a part that is exactly 0 (BYOL's and SimSiam's
    negative) is marked at the axis and labelled. An SVG with its text as text, 7.5 in (720 px) wide: read at its
    natural size, no label is below 11 pt."""
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure
    names = list(result["norms"])
    cosine = [[result["cosine"][a][b] for b in names] for a in names]
    style = {"svg.fonttype": "none", "svg.hashsalt": "gradients", "font.size": 11, "font.family": "sans-serif",
             "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"], "axes.titlesize": 12, "axes.labelsize": 11}
    with matplotlib.rc_context(style):
        fig = Figure(figsize=(7.5, 10), layout="constrained")
        heat, bars = fig.subplots(2, 1, height_ratios=[1.3, 1])
        image = heat.pcolormesh(cosine, cmap="RdBu_r", vmin=-1, vmax=1, edgecolors="white", linewidth=1)  # vector cells
        heat.set_aspect("equal")
        heat.invert_yaxis()
        heat.set(xticks=[i + 0.5 for i in range(len(names))], xticklabels=names,
                 yticks=[i + 0.5 for i in range(len(names))], yticklabels=names,
                 xlabel="method B", ylabel="method A", title="cosine between the gradients that methods A and B\n"
                                                             "send to the same raw embedding z₁ (one batch)")
        heat.tick_params(axis="x", labelrotation=30)
        for i, row in enumerate(cosine):
            for j, c in enumerate(row):
                heat.text(j + 0.5, i + 0.5, f"{c:+.2f}", ha="center", va="center", fontsize=11,
                          color="white" if abs(c) > 0.6 else "black")
        scale = fig.colorbar(image, ax=heat, shrink=0.85, label="cosine")
        scale.solids.set(rasterized=False, edgecolor="face")  # vector, without seams between its steps
        y = range(len(names))
        parts = {key: [result["norms"][a][key] for a in names] for key in ("positive", "negative")}
        low = min(v for values in parts.values() for v in values if v > 0) / 4
        for offset, key, colour in ((-0.2, "positive", "tab:blue"), (0.2, "negative", "tab:red")):
            values = parts[key]
            bars.barh([i + offset for i in y], [v if v > 0 else 0 for v in values], height=0.4, color=colour,
                      label=f"mean ‖{key} part‖")
            for i, v in enumerate(values):
                if v == 0:  # a log axis has no 0: mark it at the axis and say it
                    bars.plot([low], [i + offset], marker="D", color=colour, clip_on=False, zorder=3)
                    bars.annotate("0: no negative term", (low, i + offset), xytext=(8, 0), textcoords="offset points",
                                  va="center", fontsize=11, color=colour)
        bars.set(yticks=list(y), yticklabels=names, xscale="log", xlim=(low, None), ylabel="method",
                 xlabel="mean norm over the batch (log scale)", title="size of the positive and negative parts")
        bars.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 0.001, not 10⁻³
        bars.invert_yaxis()
        bars.legend(loc="upper right", fontsize=11)
        fig.savefig(path, format="svg", metadata={"Date": None})


def main(argv=None):
    p = argparse.ArgumentParser(description="Positive and negative gradient components of every method on one batch.")
    p.add_argument("--backbone", help="a backbone.pt (default: a random-init ResNet)")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--dataset", default="synthetic", choices=["cifar10", "cifar100", "stl10", "imagenet", "folder",
                                                               "synthetic"])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--tau", type=float, default=0.2, help="τ of MoCo and SimCLR")
    p.add_argument("--lambd-barlow", type=float, default=0.0051)
    p.add_argument("--lambd-unigrad", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/gradients")
    p.add_argument("--from-json", metavar="JSON", help="only redraw the figure of a saved gradients.json, beside it")
    args = p.parse_args(argv)
    from common import data
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: the figure needs matplotlib: `uv sync --group plots` (or pip install matplotlib)")
    if args.from_json:
        saved = Path(args.from_json)
        try:
            result = json.loads(saved.read_text())
            plot(result, saved.with_name("gradients.svg"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: cannot draw {saved} ({type(e).__name__}: {e}); pass a gradients.json the probe wrote")
        print(f"wrote {saved.with_name('gradients.svg')}")
        return result
    try:
        z1, z2 = embed(args)  # two batches: the second one's keys are MoCo's queue
        if len(z1) < 4:
            raise SystemExit(f"error: the dataset has {len(z1)} images; the probe needs at least 4")
        n = len(z1) // 2
        z1, z2, queue = z1[:n], z2[:n], F.normalize(z2[n:], dim=1).T
    except data.DataError as e:
        raise SystemExit(data.DataError.line(e)) from None
    except (OSError, RuntimeError, KeyError) as e:
        raise SystemExit(f"error: cannot load {args.backbone} ({type(e).__name__}); pass a backbone.pt") from None
    totals, norms = {}, {}
    u1 = F.normalize(z1, dim=1)
    for name, (positive, negative) in forms(z1, z2, queue, args).items():
        total = negative - positive
        if name not in RAW:  # ∂L/∂u reaches z through u = z/‖z‖: its part tangent at u₁, divided by ‖z₁‖
            total = (total - (total * u1).sum(1, keepdim=True) * u1) / z1.norm(dim=1, keepdim=True)
        totals[name] = total.flatten()
        norms[name] = {"positive": positive.norm(dim=1).mean().item(), "negative": negative.norm(dim=1).mean().item()}
    cosine = {a: {b: F.cosine_similarity(totals[a], totals[b], dim=0).item() for b in totals} for a in totals}
    result = {"batch": len(z1), "dim": z1.shape[1], "backbone": args.backbone or f"random-init {args.arch}",
              "norms": norms, "cosine": cosine}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradients.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "gradients.svg")
    print(f"{'method':8} {'|positive|':>11} {'|negative|':>11}  cosine with: " + " ".join(f"{n:>7}" for n in totals))
    for a in totals:
        print(f"{a:8} {norms[a]['positive']:11.3e} {norms[a]['negative']:11.3e}               "
              + " ".join(f"{cosine[a][b]:+7.2f}" for b in totals))
    print(f"wrote {out / 'gradients.json'} and {out / 'gradients.svg'}")
    return result


if __name__ == "__main__":
    main()
