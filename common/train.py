"""The run around a method's training step: run directory, logging, checkpoints, resume, kNN.

    run = Run(args)                          # torchrun set-up, seeds, run directory, config.json
    model = run.prepare(build_model(args))   # device, SyncBN and DDP when distributed, compile
    run.watch(model, optimizer, backbone)    # resumes from OUT/checkpoint.pt when there is one
    for x1, x2 in run.batches(loader):       # epochs; kNN, checkpoint at epoch ends; --max-steps
        ...the method's step...
        run.log(loss, lr=lr, **stats)        # progress line and metrics.jsonl every --log-every steps
"""
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from common import data, dist, evaluate, gpu_augment


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill at any moment leaves the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C back while checkpoint files are written; it takes effect right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fp32(x):
    """Losses run in float32 at least: bf16/fp16 activations from autocast are upcast, float64 stays."""
    return x if x.dtype == torch.float64 else x.float()


def prepare(model, device, compile=False, sync_bn=True):
    """Move to the device (channels_last on CUDA), global BatchNorm (unless sync_bn=False) and DDP when
    distributed, compile."""
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    model = dist.wrap(dist.sync_batchnorm(model, device) if sync_bn else model, device)
    return torch.compile(model) if compile else model


class Run:
    def __init__(self, args):
        self.args = args
        self.method = Path(sys.modules[type(args).__module__].__file__ or "method").stem
        if self.method == "__main__":
            self.method = Path(sys.argv[0]).stem
        self.device = dist.setup(args.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        random.seed(args.seed)
        self.dir = Path(args.out)
        self.step = self.epoch = 0
        self._logged, self._first_bad = {}, None
        self._knn_data, self._knn_also = None, {}
        if dist.is_main():
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if not args.resume and (self.dir / "checkpoint.pt").exists():
                    dist.fail(f"{self.dir / 'checkpoint.pt'} exists and --no-resume was given; pass a new --out, "
                              f"or delete that checkpoint to start over")
                (self.dir / "config.json").write_text(json.dumps(
                    {"method": self.method, "world_size": dist.world(), **dataclasses.asdict(args)}, indent=2))
            except OSError as e:
                dist.fail(f"cannot write to the run directory {self.dir} ({e.strerror}); pass a writable --out")
        dist.barrier()

    def autocast(self):
        """bf16 autocast on CUDA when --amp (the default); nothing on CPU."""
        if self.args.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model, sync_bn=True):
        return prepare(model, self.device, self.args.compile, sync_bn)

    # --- checkpoints -------------------------------------------------------------------------------

    def watch(self, model, optimizer, backbone, **extra):
        """Register what a checkpoint holds, and resume from OUT/checkpoint.pt when there is one."""
        self.model, self.optimizer, self.backbone, self.extra = dist.unwrap(model), optimizer, backbone, extra
        path = self.dir / "checkpoint.pt"
        if not (self.args.resume and path.exists()):
            return
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:
            dist.fail(f"cannot read {path} ({type(e).__name__}); move it away or pass another --out")
        if ckpt.get("method") != self.method or ckpt.get("arch") != self.args.arch:
            dist.fail(f"{path} is a {ckpt.get('method')} {ckpt.get('arch')} checkpoint, not {self.method} "
                      f"{self.args.arch}; pass another --out")
        if ckpt["args"]["batch_size"] != self.args.batch_size:
            dist.fail(f"{path} was trained with --batch-size {ckpt['args']['batch_size']}; resume with the same "
                      f"global batch (any number of processes), or pass another --out")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for name, obj in extra.items():
                obj.load_state_dict(ckpt[name])
        except (RuntimeError, KeyError, ValueError) as e:
            dist.fail(f"{path} does not fit this model ({str(e).splitlines()[0]}); it was made with other "
                      f"options: pass the same options or another --out")
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        rng = ckpt["rng"]
        _set_rng_state(rng[dist.rank()] if len(rng) == dist.world() else rng[0])
        if dist.is_main():
            metrics = self.dir / "metrics.jsonl"
            if metrics.exists():  # drop rows logged after the checkpoint by the interrupted run
                rows = [r for r in metrics.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
                metrics.write_text("".join(r + "\n" for r in rows))
            print(f"resumed from {path} at epoch {self.epoch}, step {self.step}", flush=True)

    def save(self):
        """Write OUT/checkpoint.pt and OUT/backbone.pt atomically (rank 0), after checking the losses."""
        self._check_finite()
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            dist.fail(f"the weights are not finite after step {self.step}; stopped without saving, so "
                      f"{self.dir / 'checkpoint.pt'} keeps the last good state (lower --lr)")
        rng = dist.all_gather_object(_rng_state())
        if dist.is_main():
            with _sigint_deferred():
                save_atomic({"method": self.method, "arch": self.args.arch, "args": dataclasses.asdict(self.args),
                             "step": self.step, "epoch": self.epoch, "rng": rng,
                             "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                             **{name: obj.state_dict() for name, obj in self.extra.items()}},
                            self.dir / "checkpoint.pt")
                save_atomic(self.backbone.state_dict(), self.dir / "backbone.pt")
        dist.barrier()

    # --- the loop ----------------------------------------------------------------------------------

    def batches(self, loader):
        """Yield the two views of each step on the device, from the resumed step to the end of training.

        Ctrl-C is taken between steps: the step under way finishes, then the run ends with one line
        (a second Ctrl-C ends it at once). The last checkpoint is never touched by the interruption."""
        args = self.args
        self.steps_per_epoch = loader.sampler.num_samples // loader.batch_size
        self.total_steps = args.epochs * self.steps_per_epoch
        stop = min(args.max_steps or self.total_steps, self.total_steps)
        self._time, self._step0 = time.time(), self.step
        with self._interrupt_between_steps() as interrupted:
            try:
                epoch_views = self.views(loader)
                while self.step < stop:
                    loader.sampler.set_epoch(self.epoch, skip=(self.step % self.steps_per_epoch) * loader.batch_size)
                    for x1, x2 in epoch_views(self.step):
                        if interrupted:
                            raise KeyboardInterrupt
                        yield x1, x2
                        self.step += 1
                        if interrupted:
                            raise KeyboardInterrupt
                        if self.step % args.log_every == 0 or self.step == stop:
                            self._flush()
                        if self.step == stop:
                            break
                    if self.step % self.steps_per_epoch == 0:  # an epoch ended
                        self.epoch += 1
                        if self.step < stop:  # the last epoch's evaluation and checkpoint follow the loop
                            if args.knn_every > 0 and self.epoch % args.knn_every == 0:
                                self.knn()
                            self.save()
                self.knn()
                self.save()
            except data.DataError as e:
                dist.fail(data.DataError.line(e))
            except KeyboardInterrupt:
                raise SystemExit(self._interrupted_line()) from None
        if dist.is_main():
            print(f"done: {self.dir / 'backbone.pt'}", flush=True)
        dist.cleanup()

    def _interrupted_line(self):
        ckpt = self.dir / "checkpoint.pt"
        return f"interrupted at step {self.step}; " + (
            f"the same command resumes from {ckpt} (the last epoch end)" if ckpt.exists()
            else "no checkpoint was written yet")

    @contextlib.contextmanager
    def _interrupt_between_steps(self):
        """A Ctrl-C handler that only raises a flag, so that the interruption is raised inside batches(),
        not in the middle of the method's step (which would end the run with a traceback)."""
        interrupted = []
        if threading.current_thread() is not threading.main_thread():
            yield interrupted
            return

        def handler(signum, frame):
            if interrupted:  # the second Ctrl-C: end now
                raise SystemExit(self._interrupted_line())
            interrupted.append(signum)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield interrupted
        finally:
            signal.signal(signal.SIGINT, previous)

    def views(self, loader):
        """step -> the rest of the epoch's view pairs, on the device: the loader's batches, or with
        --gpu-augment, made on the device from the loader's dataset and sampler (common.gpu_augment)."""
        if not self.args.gpu_augment:
            return lambda step: ((self._to_device(x1), self._to_device(x2)) for x1, x2 in loader)
        try:
            made = gpu_augment.DeviceViews(loader.dataset, self.device, self.args.seed, self.args.workers)
        except gpu_augment.Unsupported as e:
            dist.fail(str(e))
        return lambda step: ((self._to_device(x1), self._to_device(x2))
                             for x1, x2 in made.epoch(loader.sampler, loader.batch_size, step))

    def _to_device(self, x):
        if self.device.type == "cuda":  # (a copy from pinned memory; on-device views change layout only)
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x

    def knn(self):
        if self.args.knn_every < 0:
            return
        if self._knn_data is None:
            a = self.args
            t = data.eval_transform(a.dataset, a.image_size)
            self._knn_data = [data.eval_loader(data.Transformed(data.dataset(a.dataset, a.data_dir, split, a.image_size), t),
                                               256, a.workers, self.device) for split in ("train", "test")]
        top1 = evaluate.knn(self.backbone, *self._knn_data, self.device, self.args.knn_k, self.args.knn_t, self.args.amp)
        row = {"step": self.step, "epoch": self.epoch, "knn_top1": top1}
        for key, encoder in self._knn_also.items():
            row[key] = evaluate.knn(encoder, *self._knn_data, self.device, self.args.knn_k, self.args.knn_t, self.args.amp)
        self._write(row)
        if dist.is_main():
            also = "".join(f", {key} {100 * row[key]:.2f}%" for key in self._knn_also)
            print(f"epoch {self.epoch} step {self.step}: kNN top-1 {100 * top1:.2f}%{also}", flush=True)

    def knn_also(self, key, encoder):
        """At each kNN evaluation, also log the kNN top-1 on `encoder`'s output under `key` (a method that
        compares with a published kNN number taken on another feature than the backbone's)."""
        self._knn_also[key] = encoder

    # --- logging -----------------------------------------------------------------------------------

    def log(self, loss, **stats):
        """Record this step's loss and statistics (tensors stay on the device until the next log line)."""
        bad = ~torch.isfinite(loss.detach())
        first = torch.where(bad, self.step + 1, -1)  # steps count from 1, as printed
        self._first_bad = first if self._first_bad is None else torch.where(self._first_bad >= 0, self._first_bad, first)
        self._logged = {"loss": loss.detach(), **stats}

    def _check_finite(self):
        if self._first_bad is None:
            return
        bad = [s for s in dist.gather(self._first_bad.reshape(1)).tolist() if s >= 0]
        if bad:
            dist.fail(f"the loss is not finite at step {min(bad)}; stopped without saving, so "
                      f"{self.dir / 'checkpoint.pt'} keeps the last good state (lower --lr, or check the data)")

    def _flush(self):
        """A progress line and a metrics.jsonl row. Here and at the checkpoints of epoch ends the loop waits
        for the device; nowhere else (`log` keeps tensors on the device)."""
        self._check_finite()
        row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(())
                           for v in self._logged.values()])
        values = dict(zip(self._logged, dist.all_reduce_mean(row).tolist()))  # one transfer for all values
        now = time.time()
        speed = (self.step - self._step0) * self.args.batch_size / max(now - self._time, 1e-9)
        eta = (self.total_steps - self.step) * self.args.batch_size / max(speed, 1e-9)
        self._time, self._step0 = now, self.step
        self._write({"step": self.step, "epoch": self.epoch, **values, "img_per_s": speed})
        if dist.is_main():
            shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(f"epoch {self.epoch + 1}/{self.args.epochs} step {self.step}/{self.total_steps} {shown} "
                  f"| {speed:.0f} img/s | ETA {int(eta // 3600)}:{time.strftime('%M:%S', time.gmtime(eta))}", flush=True)

    def _write(self, row):
        if dist.is_main():
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
