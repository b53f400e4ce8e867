"""Results people can look at: a markdown table and PNG figures from run directories.

    python -m common.report runs/simclr-cifar10 runs/simsiam-cifar10 --out runs/report

From each run's config.json, metrics.jsonl and (when present) linear.json: OUT/report.md, one row per run
(method, dataset, epochs, global batch, the final epoch's kNN top-1, the best kNN top-1 with its epoch,
linear top-1 with its protocol, wall time, images/s, device, the command), and OUT/knn.png, OUT/loss.png
and OUT/stats.png: kNN top-1, loss and each method's own collapse statistic (the statistics it logs
beside the loss: std_z, pos_sim, c_diag, std, ...) against the epoch, every run overlaid; the wall time adds the
parts of a resumed run, each from its start. For each run with a backbone.pt, OUT/<run>/ holds common.inspect's
pictures (nearest neighbours, t-SNE map, spectrum) on the dataset the run names (--no-inspect: none). Needs
matplotlib and scikit-learn (the `plots` dependency group).
"""
import argparse
import json
import statistics
from pathlib import Path

RANKS = ("rank", "rank_z")  # the kNN evaluation's effective ranks (common.evaluate.ranks)
STANDARD = ("step", "epoch", "loss", "lr", "img_per_s", "data_share", "knn_top1", "time", "tau", "m")  # not statistics: schedules


class RunError(Exception):
    pass


def load(directory):
    """(config, metrics rows, linear results) of a run directory."""
    d = Path(directory)
    try:
        config = json.loads((d / "config.json").read_text())
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except OSError as e:
        raise RunError(f"{d} is not a run directory ({e.strerror}: {Path(e.filename).name}); pass the --out "
                       f"of a method's run") from None
    except ValueError:
        raise RunError(f"{d}: config.json or metrics.jsonl is not JSON; pass the --out of a method's run") from None
    linear = d / "linear.json"
    try:
        results = json.loads(linear.read_text()) if linear.exists() else {}
    except ValueError:
        results = {}
    return config, rows, results if isinstance(results, dict) else {}


def steps_per_epoch(config, rows):
    """From config.json, where the loop records it; in a run directory written before it did, read off the kNN
    rows written at epoch ends (step = epoch × steps per epoch, each other row's step//epoch larger: such runs
    logged the whole epochs done); None if there are none."""
    if config.get("steps_per_epoch"):
        return config["steps_per_epoch"]
    candidates = [r["step"] // r["epoch"] for r in rows if "knn_top1" in r and r["epoch"] > 0]
    return min(candidates) if candidates else None


def series(config, rows, key):
    """(epochs, values) of `key`; training rows at fractional epochs (step / steps per epoch)."""
    per = steps_per_epoch(config, rows)
    points = [(r["step"] / per if per else r["epoch"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _duration(seconds):
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def wall_time(config, rows):
    """Seconds the run took: from each start of its process (config.json's "starts", one per part of a resumed run)
    to the last row that part logged, summed; a run directory written before the starts were recorded: the span
    of its rows. None when there is nothing to measure."""
    times = sorted(r["time"] for r in rows if "time" in r)
    starts = sorted(config.get("starts") or [])
    if not starts:
        return times[-1] - times[0] if len(times) > 1 else None
    total = 0.0
    for start, following in zip(starts, [*starts[1:], float("inf")]):
        logged = [t for t in times if start <= t < following]
        total += (logged[-1] - start) if logged else 0.0
    return total


def row(name, config, rows, linear):
    """The table's cells for one run."""
    knn = [r for r in rows if "knn_top1" in r]
    steps = [r for r in rows if "img_per_s" in r]
    final = f"{100 * knn[-1]['knn_top1']:.2f} (epoch {knn[-1]['epoch']})" if knn else "–"
    best = max(knn, key=lambda r: r["knn_top1"]) if knn else None
    best = f"{100 * best['knn_top1']:.2f} (epoch {best['epoch']})" if best else "–"
    probes = [f"{100 * v['top1']:.2f} ({p}: {v.get('name', p)})" for p, v in linear.items()
              if isinstance(v, dict) and "top1" in v]
    seconds = wall_time(config, rows)
    knn_protocol = f"k {config.get('knn_k', 200)}, t {config.get('knn_t', 0.1)}"
    command = config.get("command")
    return [name, config.get("method", "?"), config.get("dataset", "?"), str(config.get("epochs", "?")),
            str(config.get("batch_size", "?")), final, best, knn_protocol, "; ".join(probes) or "–",
            _duration(seconds) if seconds is not None else "–",
            f"{statistics.median(r['img_per_s'] for r in steps):.0f}" if steps else "–",
            config.get("hardware", config.get("device", "–")), f"`{command}`" if command else "–"]


HEADER = ["run", "method", "dataset", "epochs", "global batch", "kNN top-1, final", "kNN top-1, best",
          "kNN protocol", "linear top-1 (protocol)", "wall time", "img/s (median)", "hardware", "command"]


def table(runs):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row(*run)) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def figures(runs):
    """{file name: matplotlib Figure}: kNN top-1, loss, and the collapse statistics against the epoch."""
    from matplotlib.figure import Figure
    stats = sorted({k for _, _, rows, _ in runs for r in rows for k in r if k not in STANDARD})
    out = {}
    for key, title, ylabel in (("knn_top1", "kNN top-1 (weighted kNN on the backbone features)", "top-1 (%)"),
                               ("loss", "training loss", "loss")):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for name, config, rows, _ in runs:
            x, y = series(config, rows, key)
            if key == "knn_top1":  # in %, the run's kNN protocol in its label
                y = [100 * v for v in y]
                label = f"{name} ({config.get('method')}, k {config.get('knn_k', 200)}, t {config.get('knn_t', 0.1)})"
            else:
                label = f"{name} ({config.get('method')})"
            if x:
                ax.plot(x, y, marker="o" if key == "knn_top1" else None, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        out[f"{key.split('_')[0]}.png"] = fig
    fig = Figure(figsize=(7, 3 * max(len(stats), 1)), layout="constrained")
    for i, stat in enumerate(stats):
        ax = fig.add_subplot(len(stats), 1, i + 1)
        for name, config, rows, _ in runs:
            x, y = series(config, rows, stat)
            if x:
                ax.plot(x, y, marker="o" if stat in RANKS else None, label=f"{name} ({config.get('method')})")
        what = (f"RankMe of the {'embedding' if stat == 'rank_z' else 'backbone features'} (epoch 0: at init)"
                if stat in RANKS else f"{stat} (logged by the method beside its loss)")
        ax.set(title=what, xlabel="epoch", ylabel=stat)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    out["stats.png"] = fig
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (a method's --out)")
    p.add_argument("--out", default="runs/report", help="where report.md and the PNGs go")
    p.add_argument("--inspect", action=argparse.BooleanOptionalAction, default=True,
                   help="also draw common.inspect's pictures of each run's backbone.pt in OUT/<run> (default: yes)")
    a = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: the figures need matplotlib: `uv sync --group plots` (or pip install matplotlib)")
    try:
        runs = [(Path(d).name, *load(d)) for d in a.runs]
    except RunError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(table(runs))
        for name, fig in figures(runs).items():
            fig.savefig(out / name, dpi=110)
    except OSError as e:
        raise SystemExit(f"error: cannot write to {out} ({e.strerror}); pass a writable --out") from None
    print(table(runs), end="")
    print(f"wrote {out / 'report.md'}, {', '.join(str(out / n) for n in ('knn.png', 'loss.png', 'stats.png'))}")
    if a.inspect:
        for (name, config, _, _), directory in zip(runs, a.runs):
            pictures(name, config, Path(directory), out / name)
    return runs


def pictures(name, config, directory, out):
    """common.inspect on a run's backbone.pt, with the data flags of its config.json; a run whose backbone or data
    is not at hand gets a line saying so instead."""
    from common import inspect
    if not (directory / "backbone.pt").is_file():
        print(f"no pictures of {name}: it has no backbone.pt")
        return
    flags = ["--backbone", str(directory / "backbone.pt"), "--out", str(out), "--dataset", config.get("dataset", "cifar10"),
             "--data-dir", config.get("data_dir", "./data"), "--image-size", str(config.get("image_size") or 0),
             "--workers", str(min(config.get("workers", 2), 2)), "--device", config.get("device", "auto")]
    try:
        inspect.main(flags)
    except SystemExit as e:
        print(f"no pictures of {name}: {str(e.code).removeprefix('error: ')}")


if __name__ == "__main__":
    main()
