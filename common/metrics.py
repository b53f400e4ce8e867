"""A run's log: progress lines, OUT/metrics.jsonl (one JSON object per event), and with --tensorboard the
same scalars in OUT/tensorboard. Rank 0 writes; every rank takes part in the means it logs.

    metrics = Metrics(directory, device, tensorboard=False)
    metrics.record(step, loss, lr=lr, **stats)   # each step: tensors stay on the device
    metrics.waited(seconds)                      # each step: the time the loop waited for the loader
    metrics.flush(step, epoch, ...)              # at each log line: one transfer, a line and a row
    metrics.write({"step": ..., "knn_top1": ...})

A row's `epoch`, as every line prints it, is the epoch its step belongs to, counted from 1 (Run.epoch_number).
Its `data_share` (the line's "data N%") is the part of the wall time since the last row that the loop spent
waiting for the loader's next batch, as the official MoCo and SimSiam scripts print "Data" time: near 1, the
loader, not the model, sets the pace.
"""
import json
import time
from pathlib import Path

import torch

from common import dist


clock = time.monotonic  # the clock of the intervals (speed, data share, the 30 s between lines)


class Metrics:
    def __init__(self, directory, device, tensorboard=False):
        self.path = Path(directory) / "metrics.jsonl"
        self.device = device
        self._logged, self._first_bad = {}, None
        self._tensorboard = _tensorboard(directory) if tensorboard and dist.is_main() else None
        self.start_timer(0)

    def start_timer(self, step):
        self._time, self._step0, self._waited = clock(), step, 0.0

    def waited(self, seconds):
        """Time the loop spent waiting for the loader's next batch."""
        self._waited += seconds

    def drop_after(self, step):
        """Forget the rows an interrupted run logged after its checkpoint at `step` (rank 0)."""
        if dist.is_main() and self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def first_row(self):
        """metrics.jsonl's first row ({"step": -1} when there is none), on rank 0."""
        try:
            return json.loads(self.path.read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return {"step": -1}

    def record(self, step, loss, **stats):
        """This step's loss and statistics, kept on the device until the next flush; the first step whose loss
        is not finite is remembered there too (no transfer, no wait)."""
        first = torch.where(~torch.isfinite(loss.detach()), step + 1, -1)  # steps count from 1, as printed
        self._first_bad = first if self._first_bad is None else torch.where(self._first_bad >= 0, self._first_bad, first)
        self._logged = {"loss": loss.detach(), **stats}

    def first_bad_step(self):
        """The first step of any rank whose loss was not finite, or None (a transfer: all ranks call it)."""
        if self._first_bad is None:
            return None
        bad = [s for s in dist.gather(self._first_bad.reshape(1)).tolist() if s >= 0]
        return min(bad) if bad else None

    def flush(self, step, epoch, epochs, total_steps, batch_size):
        """A progress line and a metrics.jsonl row, the values averaged over ranks in one transfer. Here and at
        the checkpoints the loop waits for the device; nowhere else. Returns the seconds per step since the last
        row, averaged over ranks (the same number on every rank)."""
        timing = (clock() - self._time, self._waited)  # the interval and its wait, averaged over ranks with the rest
        row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(())
                           for v in [*self._logged.values(), *timing]])
        *values, seconds, waited = dist.all_reduce_mean(row).tolist()
        values = dict(zip(self._logged, values))
        steps = step - self._step0
        speed = steps * batch_size / max(seconds, 1e-9)
        share = min(waited / max(seconds, 1e-9), 1.0)
        eta = (total_steps - step) * batch_size / max(speed, 1e-9)
        self.start_timer(step)
        self.write({"step": step, "epoch": epoch, **values, "img_per_s": speed, "data_share": share})
        if dist.is_main():
            shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(f"epoch {epoch}/{epochs} step {step}/{total_steps} {shown} | {rate(speed)} img/s | data {share:.0%} "
                  f"| ETA {int(eta // 3600)}:{time.strftime('%M:%S', time.gmtime(eta))}", flush=True)
        return seconds / max(steps, 1)

    def write(self, row):
        if not dist.is_main():
            return
        row = {**row, "time": time.time()}  # wall clock, for the report's wall time
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard:  # the same scalars, against the step
            for name, value in row.items():
                if name not in ("step", "epoch", "time"):
                    self._tensorboard.add_scalar(name, value, row["step"])
            self._tensorboard.flush()


def rate(per_s):
    """Images per second to the precision the figure needs: whole numbers from 100 up, 3 significant digits
    below (1234, 12.3, 0.5), never "0" for a slow but moving run."""
    return f"{per_s:.0f}" if per_s >= 99.95 else f"{per_s:.3g}"


def _tensorboard(directory):
    """A SummaryWriter on OUT/tensorboard, or one line saying how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        dist.fail("--tensorboard needs the tensorboard package: `uv sync --group tensorboard` "
                  "(or pip install tensorboard), or drop --tensorboard")
    return SummaryWriter(str(Path(directory) / "tensorboard"))
