"""What a backbone learned, in pictures: nearest neighbours, an embedding map and the spectrum of its features.

    python -m common.inspect --backbone runs/simclr-cifar10/backbone.pt
    python -m common.inspect --backbone runs/simclr-cifar10/backbone.pt --compare runs/vicreg-cifar10/backbone.pt

For each backbone (the data flags as common.knn's; OUT is RUN/inspect beside the first backbone by default), on the
training and test sets without augmentation, in OUT/<run>/, and for the first run of each method also for the same
network at initialisation, the control, in OUT/<run>-init/ (--no-control: not):

* neighbours.png: one test image per class (chosen by --seed), each followed by its --k nearest training images by
  the cosine similarity of the backbone's features, framed blue where the class matches the query's, orange where
  it does not;
* map.png: --map-points test images' features in 2-D by t-SNE (scikit-learn: PCA initialisation, --seed), coloured
  by class;

and OUT/spectrum.png: the singular values of the centred, L2-normalised features of the test set, on a log scale,
with their effective rank RankMe (Garrido et al., ICML 2023), of each backbone and control; beside it, where the
checkpoint.pt next to a backbone.pt holds the method's model, the same for its projector's output (VICReg: its
expander's), the embedding the loss sees.

OUT/inspect.md lists the figures with the caption that says how to read each. Needs matplotlib and scikit-learn
(the `plots` dependency group).
"""
import argparse
import dataclasses
import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from common import checkpoint, cli, data, dist, evaluate, resnet
from common.device import GpuPath

MATCH, MISMATCH = "#1f77b4", "#ff7f0e"  # the neighbours' frames: blue, orange (told apart without red/green)


def parse(argv=None):
    p = cli._Parser(prog="python -m common.inspect", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help="the backbone.pt of a run")
    p.add_argument("--compare", nargs="*", default=[], help="other runs' backbone.pt (a control, another method)")
    p.add_argument("--dataset", choices=cli.DATASETS, default="cifar10", help="labelled dataset (default: cifar10)")
    p.add_argument("--data-dir", default="./data", help="dataset root, as for the method files (default: ./data)")
    p.add_argument("--image-size", type=int, default=0, help="input size (0: the run's, else the dataset's)")
    p.add_argument("--out", default="", help="where the figures go (default: inspect/ beside the backbone)")
    p.add_argument("--k", type=int, default=8, help="neighbours shown per query (default: 8)")
    p.add_argument("--map-points", type=int, default=2000, help="test images on the t-SNE map (default: 2000)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also draw the first run of each method at initialisation, the control (default: yes)")
    p.add_argument("--seed", type=int, default=0, help="the queries, the map's images and t-SNE (default: 0)")
    p.add_argument("--workers", type=int, default=cli.default_workers(), help="data loader processes")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    return p.parse_args(argv)


def nearest(queries, memory, k):
    """(cosine similarities, indices) of the k rows of `memory` most similar to each query, most similar first;
    both sides L2-normalised here. (q, k), (q, k)"""
    return (F.normalize(queries, dim=1) @ F.normalize(memory, dim=1).T).topk(min(k, len(memory)), dim=1)


def one_per_class(labels, seed):
    """The index of one sample of each class present, drawn with `seed`, in class order."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        where = (labels == c).nonzero().flatten()
        picks.append(where[torch.randint(len(where), (1,), generator=g)].item())
    return picks


def controls(backbone_path, backbone, config, device):
    """(the run's trained projector or None, the control backbone, the control projector or None). The control is
    the same network at initialisation, built under the run's --seed: the method's own model where the checkpoint.pt
    beside the backbone.pt names it (read with weights_only; its projector is the embedding the loss sees), else the
    bare ResNet of the same architecture. Both in eval mode."""
    path = Path(backbone_path).parent / "checkpoint.pt"
    try:
        ckpt = checkpoint.read(path)
        module = importlib.import_module(ckpt["method"])  # the method's own file builds its model
        names = {f.name for f in dataclasses.fields(module.Args)}
        args = module.Args(**{k: v for k, v in ckpt["args"].items() if k in names})
        torch.manual_seed(args.seed)  # the run's own initialisation
        control, trained = module.build_model(args), module.build_model(args)
        trained.load_state_dict(ckpt["model"])
    except (checkpoint.Unreadable, ImportError, KeyError, TypeError, RuntimeError, AttributeError):
        torch.manual_seed(config.get("seed", 0))
        state = backbone.state_dict()
        bare = resnet.resnet("resnet50" if "layer1.0.conv3.weight" in state else "resnet18",
                             cifar_stem=state["conv1.weight"].shape[-1] == 3)
        return None, bare.to(device).eval(), None
    on = lambda m: m.to(device).eval() if m is not None else None  # noqa: E731
    return on(evaluate.head(trained)), on(control.backbone), on(evaluate.head(control))


def images(dataset, indices, name):
    """The images at `indices` of an eval set, as the network saw them, normalisation undone. (n, H, W, 3)"""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data.MEAN_STD.get(name, data.IMAGENET_MEAN_STD))
    return torch.stack([(dataset[i][0] * std + mean).clamp(0, 1).permute(1, 2, 0) for i in indices])


def neighbours_figure(query_images, neighbour_images, query_labels, neighbour_labels, sims, classes, title):
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    rows, k = neighbour_labels.shape
    fig = Figure(figsize=(1.0 * (k + 1) + 1.2, 1.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for r in range(rows):
        for c in range(k + 1):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            ax.imshow(query_images[r] if c == 0 else neighbour_images[r, c - 1])
            if c == 0:
                ax.set_ylabel(classes[query_labels[r]], rotation=0, ha="right", va="center", fontsize=8)
                for spine in ax.spines.values():
                    spine.set(color="black", linewidth=2)
                continue
            colour = MATCH if neighbour_labels[r, c - 1] == query_labels[r] else MISMATCH
            ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor=colour, linewidth=5))
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_title(f"{sims[r, c - 1]:.2f}", fontsize=6, pad=1)
    axes[0, 0].set_title("query", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def map_figure(points, labels, classes, title):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    cmap = __import__("matplotlib").colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for c, name in enumerate(classes):
        at = labels == c
        if at.any():
            ax.scatter(points[at, 0], points[at, 1], s=4, color=cmap(c % cmap.N), label=name)
    ax.set(title=title, xticks=[], yticks=[])
    if len(classes) <= 20:
        ax.legend(fontsize="x-small", markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    return fig


def spectrum_figure(curves):
    """curves: {panel title: [(label, singular values), ...]}."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6 * len(curves), 4.2), layout="constrained")
    for i, (panel, lines) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), i + 1)
        for label, sigma in lines:
            ax.semilogy(range(1, len(sigma) + 1), (sigma / sigma[0]).clamp_min(1e-12).tolist(),
                        label=f"{label}: RankMe {evaluate.rankme(sigma):.1f}",
                        linestyle="--" if "initialisation" in label else "-")
        ax.set(title=panel, xlabel="singular value index k", ylabel="σ_k / σ_1 (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return fig


CAPTIONS = {
    "neighbours": "Each row: a test image (left, black frame), then the {k} training images whose backbone features "
                  "are most similar to it (cosine similarity above each), most similar first. A blue frame: the "
                  "neighbour's class is the query's; orange: another class. A representation that groups images "
                  "by content has mostly blue rows; one that groups by colour or texture shows neighbours that "
                  "look alike but are orange.",
    "map": "The backbone features of {n} test images, placed in 2-D by t-SNE (PCA initialisation, seed {seed}) so "
           "that images with similar features lie close; the colour is the true class, which the network never "
           "saw. Separate clusters of one colour mean the features tell those classes apart; a single mixed cloud "
           "means they do not. t-SNE keeps neighbourhoods, not distances: the size of a cluster and the gaps "
           "between clusters mean little.",
    "spectrum": "The singular values of the test set's features (each L2-normalised, then centred), largest first, "
                "divided by the largest, on a log scale, with the effective rank RankMe (exp of the entropy of the "
                "normalised singular values; Garrido et al., ICML 2023) in the legend. Dashed: the same network at "
                "initialisation, the control. A curve that drops steeply after a few values, or a RankMe far below "
                "the control's, means the features vary along few directions: dimensional collapse (Jing et al., "
                "ICLR 2022). Contrastive and redundancy-reducing methods are expected to keep a flatter curve than "
                "a collapsed one.",
}


def main(argv=None):
    a = parse(argv)
    try:
        import matplotlib  # noqa: F401
        from sklearn.manifold import TSNE
    except ImportError:
        dist.fail("the pictures need matplotlib and scikit-learn: `uv sync --group plots` "
                  "(or pip install matplotlib scikit-learn)")
    for flag in ("k", "map_points"):
        if getattr(a, flag) < 1:
            dist.fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    gpu = GpuPath(device)
    paths = [a.backbone, *a.compare]
    loaded = [evaluate.load_backbone(p, device) for p in paths]  # (one line for a missing or foreign file)
    config = loaded[0][1]
    image_size = a.image_size or config.get("image_size") or cli.DATASET_DEFAULTS[a.dataset]["image_size"]
    train_set, test_set = evaluate.eval_sets(a.dataset, a.data_dir, image_size)
    classes = list(getattr(train_set.base, "classes", None) or [str(c) for c in range(10)])
    out = Path(a.out or Path(a.backbone).parent / "inspect")
    loaders = [data.eval_loader(s, 256, a.workers, device) for s in (train_set, test_set)]
    names = [_name(p, paths) for p in paths]
    if len(classes) < 2 or len({label for _, label in getattr(train_set.base, "samples", [(0, 0), (0, 1)])}) < 2:
        dist.fail(f"the {a.dataset} training set in {a.data_dir} has one class: the pictures need labels (one folder "
                  f"per class); pass a labelled dataset")
    panels = ["backbone features", "projector output (the embedding the loss sees)"]
    spectra, captions, subjects = {panel: [] for panel in panels}, [], []
    for (backbone, run_config), path, name in zip(loaded, paths, names):  # each run, and the control of each method
        head, control, control_head = controls(path, backbone, run_config, device)
        method = run_config.get("method", "backbone")
        subjects.append((name, name, backbone, head, method))
        if a.control and method not in {s[4] for s in subjects[:-1]}:
            subjects.append((f"{name}-init", f"{name} at initialisation", control, control_head, f"{method} at init"))
    try:
        for folder, label, backbone, head, method in subjects:
            memory, memory_labels, _ = evaluate.embed(gpu.model(backbone), loaders[0], gpu)
            f, labels, z = evaluate.embed(gpu.model(backbone), loaders[1], gpu, head)
            where = out / folder
            where.mkdir(parents=True, exist_ok=True)
            title = f"{label} ({method}), {a.dataset} {image_size} px"
            # nearest neighbours
            queries = one_per_class(labels.cpu(), a.seed)
            sims, idx = nearest(f[queries], memory, a.k)
            shown = images(train_set, idx.flatten().tolist(), a.dataset).view(*idx.shape, image_size, image_size, 3)
            fig = neighbours_figure(images(test_set, queries, a.dataset), shown, labels[queries].tolist(),
                                    memory_labels[idx].cpu(), sims.cpu(), classes,
                                    f"nearest training images by backbone features: {title}")
            fig.savefig(where / "neighbours.png", dpi=80)
            captions.append((where / "neighbours.png", CAPTIONS["neighbours"].format(k=idx.shape[1])))
            # the t-SNE map
            chosen = torch.randperm(len(f), generator=torch.Generator().manual_seed(a.seed))[: a.map_points]
            n = len(chosen)
            points = TSNE(2, init="pca", random_state=a.seed, perplexity=min(30.0, (n - 1) / 3)).fit_transform(
                F.normalize(f[chosen], dim=1).cpu().double().numpy())
            fig = map_figure(points, labels[chosen].cpu().numpy(), classes, f"t-SNE of backbone features: {title}")
            fig.savefig(where / "map.png", dpi=80)
            captions.append((where / "map.png", CAPTIONS["map"].format(n=n, seed=a.seed)))
            # the spectra
            for panel, features in zip(panels, (f, z)):
                if features is not None:
                    spectra[panel].append((label, evaluate.spectrum(features).cpu()))
    except data.DataError as e:
        dist.fail(data.DataError.line(e))
    out.mkdir(parents=True, exist_ok=True)
    fig = spectrum_figure({k: v for k, v in spectra.items() if v})
    fig.savefig(out / "spectrum.png", dpi=80)
    captions.append((out / "spectrum.png", CAPTIONS["spectrum"]))
    ranks = {panel: {label: evaluate.rankme(s) for label, s in lines} for panel, lines in spectra.items() if lines}
    (out / "inspect.md").write_text("".join(f"![{p.stem}]({p.relative_to(out)})\n\n{c}\n\n" for p, c in captions))
    (out / "ranks.json").write_text(json.dumps(ranks, indent=2))
    for path, _ in captions:
        print(f"wrote {path}", flush=True)
    for panel, values in ranks.items():
        print(f"RankMe of the {panel}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()), flush=True)
    return ranks


def _name(path, paths):
    """The run directory's name, the path's parts above it where two runs share it."""
    p = Path(path)
    names = [Path(q).parent.name for q in paths]
    return p.parent.name if names.count(p.parent.name) == 1 else "-".join(p.parent.parts[-2:])


if __name__ == "__main__":
    main()
