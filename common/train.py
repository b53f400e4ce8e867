"""The run around a method's training step: the run directory, the loop, checkpoints and resume, kNN.

    run = Run(args)                          # torchrun set-up, seeds, run directory, the checkpoint to resume
    model = run.prepare(build_model(args))   # device, SyncBN and DDP when distributed, compile
    run.watch(model, optimizer, backbone)    # resumes from OUT/checkpoint.pt when there is one
    for x1, x2 in run.batches(loader):       # epochs; kNN and a checkpoint at epoch ends and every
        ...the method's step...              #   --save-every minutes; --max-steps
        run.log(loss, lr=lr, **stats)        # progress line and metrics.jsonl every --log-every steps

The files a checkpoint is made of, and how they are read, are common/checkpoint.py's; the log is
common/metrics.py's; what runs only on a GPU is common/device.py's.
"""
import contextlib
import dataclasses
import json
import os
import platform
import random
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from common import checkpoint, data, dist, evaluate, gpu_augment
from common.device import GpuPath
from common import metrics
from common.metrics import Metrics

LINE_EVERY_S = 30  # a progress line at least this often (at the last interval's pace), whatever --log-every


def fp32(x):
    """Losses run in float32 at least: bf16/fp16 activations from autocast are upcast, float64 stays."""
    return x if x.dtype == torch.float64 else x.float()


def prepare(model, gpu, compile=False, sync_bn=True, backend="inductor"):
    """On the device (channels_last on the GPU path), global BatchNorm (unless sync_bn=False) and DDP when
    distributed, compiled with --compile."""
    model = gpu.model(model)
    if sync_bn:
        model = dist.sync_batchnorm(model, gpu.device)
    model = dist.wrap(model, gpu.device)
    return torch.compile(model, backend=backend) if compile else model


class Run:
    def __init__(self, args):
        self.args = args
        self.method = Path(sys.modules[type(args).__module__].__file__ or "method").stem
        if self.method == "__main__":
            self.method = Path(sys.argv[0]).stem
        self.device = dist.setup(args.device)
        self.gpu = GpuPath(self.device, args.amp)  # channels_last, bf16 autocast, TF32: on CUDA (common.device)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        random.seed(args.seed)
        self.dir = Path(args.out)
        self.checkpoint = self.dir / "checkpoint.pt"
        self.step = self.epoch = 0  # optimiser steps taken; whole epochs done (the schedules' epoch, from 0)
        self._resumed = False
        self._knn_data, self._knn_also = None, {}
        self._rank_control, self._collapse_said = {}, False  # the collapse line's control, and whether it was said
        if dist.is_main():
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                dist.fail(f"cannot write to the run directory {self.dir} ({e.strerror}); pass a writable --out")
            if not args.resume and self.checkpoint.exists():
                dist.fail(f"{self.checkpoint} exists and --no-resume was given; pass a new --out, "
                          f"or delete that checkpoint to start over")
        self._resume = self._read_checkpoint()  # before anything in the run directory changes
        self._starts = [*(_config(self.dir).get("starts", []) if self._resume else []), time.time()]  # the report's
        # wall time adds the parts of a resumed run, each from its start
        self._saved_at, self._saved_step = time.time(), self._resume["step"] if self._resume else None
        self._write_config()
        self.metrics = Metrics(self.dir, self.device, args.tensorboard)
        dist.barrier()

    def _write_config(self, **extra):
        """OUT/config.json (rank 0): the method, the world size, the command, the hardware and every flag; the
        loop adds its steps per epoch, which the report needs to place each row at its fractional epoch."""
        if not dist.is_main():
            return
        try:
            (self.dir / "config.json").write_text(json.dumps(
                {"method": self.method, "world_size": dist.world(), "command": _command(self.method),
                 "hardware": _device_name(self.device), "gpu_path": self.gpu.describe(), "starts": self._starts,
                 **dataclasses.asdict(self.args), **extra}, indent=2))
        except OSError as e:
            dist.fail(f"cannot write to the run directory {self.dir} ({e.strerror}); pass a writable --out")

    def autocast(self):
        """bf16 autocast on the GPU path when --amp (the default); nothing on the CPU."""
        return self.gpu.autocast()

    def prepare(self, model, sync_bn=True):
        return prepare(model, self.gpu, self.args.compile, sync_bn, self.args.compile_backend)

    # --- checkpoints -------------------------------------------------------------------------------

    def _read_checkpoint(self):
        """The checkpoint this run resumes from, or None. Rank 0 decides whether there is one and every rank
        follows; each rank reads it (weights_only: no file can make the project run code), and the run ends
        with one line when any rank cannot, when it is another run's, or when a training flag changed."""
        path = self.checkpoint
        if not dist.all_gather_object(self.args.resume and path.exists())[0]:  # rank 0's answer
            return None
        try:
            ckpt, why = checkpoint.read(path, self.device), None
            if not (isinstance(ckpt, dict) and {"method", "arch", "args", "step", "epoch", "rng", "model"} <= ckpt.keys()):
                ckpt, why = None, "not the dictionary a run writes"
        except checkpoint.Unreadable as e:
            ckpt, why = None, str(e)
        whys = dist.all_gather_object(why)
        if whys[0] is not None:
            dist.fail(f"{path} is not a checkpoint of this project ({whys[0]}); nothing was read from it and "
                      f"nothing in {self.dir} was changed: move it away, or pass another --out")
        if any(whys):
            rank = next(r for r, w in enumerate(whys) if w)
            dist.fail(f"rank {rank} cannot read {path} ({whys[rank]}), which rank 0 resumes from: every rank "
                      f"must see the run directory (on several nodes, a shared disk); pass an --out they all see")
        steps = dist.all_gather_object(ckpt["step"])
        if len(set(steps)) > 1:
            dist.fail(f"the ranks read different checkpoints at {path} (steps {steps} by rank): every rank must see "
                      f"the same run directory (on several nodes, a shared disk)")
        if ckpt["method"] != self.method:
            dist.fail(f"{path} is a {ckpt['method']} {ckpt['arch']} checkpoint, not {self.method} {self.args.arch}; "
                      f"pass another --out")
        changed = checkpoint.changed_flags(ckpt["args"], self.args)
        if changed:
            dist.fail(f"{path} was trained with other training flags: {', '.join(changed)}; resume with the "
                      f"checkpoint's (any number of processes), or pass another --out")
        return ckpt

    def watch(self, model, optimizer, backbone, **extra):
        """Register what a checkpoint holds, and resume from the checkpoint read at the start, if any."""
        self.model, self.optimizer, self.backbone, self.extra = dist.unwrap(model), optimizer, backbone, extra
        ckpt, self._resume = self._resume, None
        if ckpt is None:
            return
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for name, obj in extra.items():
                obj.load_state_dict(ckpt[name])
        except (RuntimeError, KeyError, ValueError) as e:
            dist.fail(f"{self.checkpoint} does not fit this model ({str(e).splitlines()[0]}); it was made with "
                      f"other options: pass the same options or another --out")
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        rng = ckpt["rng"]
        checkpoint.set_rng_state(rng[dist.rank()] if len(rng) == dist.world() else rng[0])
        self.metrics.drop_after(self.step)  # the rows the interrupted run logged after its checkpoint
        self._resumed = True  # said by batches(), which knows the epochs' length

    def save(self):
        """Write OUT/checkpoint.pt and OUT/backbone.pt (rank 0), after checking the losses and the weights.
        A failed write (a full disk) keeps both previous files and ends the run with one line, on every rank."""
        self._check_finite()
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            dist.fail(f"the weights are not finite after step {self.step}; stopped without saving, so "
                      f"{self.checkpoint} keeps the last good state (lower --lr)")
        rng = dist.all_gather_object(checkpoint.rng_state())
        why = None
        if dist.is_main():
            state = {"method": self.method, "arch": self.args.arch, "args": dataclasses.asdict(self.args),
                     "step": self.step, "epoch": self.epoch, "rng": rng,
                     "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     **{name: obj.state_dict() for name, obj in self.extra.items()}}
            try:
                with _sigint_deferred():
                    checkpoint.write({self.checkpoint: state, self.dir / "backbone.pt": self.backbone.state_dict()})
            except OSError as e:
                why = e.strerror or str(e)
        why = dist.all_gather_object(why)[0]  # (also the barrier: the other ranks wait for the files)
        if why:
            kept = (f"{self.checkpoint} and backbone.pt keep step {self._saved_step}" if self._saved_step is not None
                    else "no checkpoint was written yet")
            dist.fail(f"cannot write a checkpoint in {self.dir} at step {self.step} ({why}); {kept}: free space "
                      f"there, then run the same command to resume")
        self._saved_at, self._saved_step = time.time(), self.step

    def _save_due(self):
        """--save-every minutes have passed since the last checkpoint, by rank 0's clock (all ranks agree)."""
        if self.args.save_every <= 0:
            return False
        due = torch.tensor(float(time.time() - self._saved_at >= 60 * self.args.save_every), device=self.device)
        return bool(dist.broadcast(due).item())

    # --- the loop ----------------------------------------------------------------------------------

    def batches(self, loader):
        """Yield the two views of each step on the device, from the resumed step to the end of training.

        A checkpoint is written at each epoch end and, at the log line after --save-every minutes, inside an
        epoch (a resume there continues exactly). Ctrl-C is taken between steps: the step under way finishes,
        then the run ends with one line (a second Ctrl-C ends it at once); the last checkpoint stays."""
        args = self.args
        self.steps_per_epoch = loader.sampler.num_samples // loader.batch_size
        self.total_steps = args.epochs * self.steps_per_epoch
        stop = min(args.max_steps or self.total_steps, self.total_steps)
        self._write_config(steps_per_epoch=self.steps_per_epoch)
        if self._resumed and dist.is_main():
            print(f"resumed from {self.checkpoint} at epoch {self.epoch_number()}, step {self.step}", flush=True)
        self._measure_control()
        self.metrics.start_timer(self.step)
        line = self.step + 1  # the step of the next progress line: the first comes after the first step
        with self._interrupt_between_steps() as interrupted:
            try:
                epoch_views = self.views(loader)
                while self.step < stop:
                    loader.sampler.set_epoch(self.epoch, skip=(self.step % self.steps_per_epoch) * loader.batch_size)
                    for x1, x2 in self._waiting(epoch_views(self.step)):
                        if interrupted:
                            raise KeyboardInterrupt
                        yield x1, x2
                        self.step += 1
                        if interrupted:
                            raise KeyboardInterrupt
                        if self.step >= line or self.step == stop:
                            line = self._next_line(self._flush())
                            inside_epoch = self.step % self.steps_per_epoch != 0  # (an epoch end saves anyway)
                            if self.step < stop and inside_epoch and self._save_due():
                                self.save()
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

    def _waiting(self, batches):
        """The loader's batches, the time the loop waits for each counted (the log's data share)."""
        try:
            while True:
                start = metrics.clock()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                self.metrics.waited(metrics.clock() - start)
                yield batch
        finally:
            batches.close()  # the loader's iterator ends with the loop, as it did without this wrapper

    def _next_line(self, seconds_per_step):
        """The step of the next progress line: the next multiple of --log-every, or sooner where that is more than
        LINE_EVERY_S away at the last interval's pace (averaged over ranks: every rank picks the same step)."""
        every = self.args.log_every
        return min((self.step // every + 1) * every, self.step + max(1, int(LINE_EVERY_S / max(seconds_per_step, 1e-9))))

    def _interrupted_line(self):
        return f"interrupted at step {self.step}; " + (
            f"the same command resumes from {self.checkpoint} (step {self._saved_step})"
            if self._saved_step is not None else "no checkpoint was written yet")

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
            return lambda step: ((self.gpu.inputs(x1), self.gpu.inputs(x2)) for x1, x2 in loader)
        try:
            made = gpu_augment.DeviceViews(loader.dataset, self.device, self.args.seed, self.args.workers)
        except gpu_augment.Unsupported as e:
            dist.fail(str(e))
        # (gpu.inputs: a copy from pinned memory on CUDA; views made on the device change layout only)
        return lambda step: ((self.gpu.inputs(x1), self.gpu.inputs(x2))
                             for x1, x2 in made.epoch(loader.sampler, loader.batch_size, step))

    # --- kNN and the log -------------------------------------------------------------------------------

    def knn(self):
        if self.args.knn_every < 0:
            return
        top1 = evaluate.knn(self.backbone, *self._knn_loaders(), self.gpu, self.args.knn_k, self.args.knn_t)
        row = {"step": self.step, "epoch": self.epoch_number(), "knn_top1": top1}
        for key, encoder in self._knn_also.items():
            row[key] = evaluate.knn(encoder, *self._knn_loaders(), self.gpu, self.args.knn_k, self.args.knn_t)
        row.update(self._ranks())
        self.metrics.write(row)
        if dist.is_main():
            also = "".join(f", {key} {100 * row[key]:.2f}%" for key in self._knn_also)
            print(f"epoch {row['epoch']}/{self.args.epochs} step {self.step}/{self.total_steps}: kNN top-1 "
                  f"{100 * top1:.2f}%{also}; {_ranks_said(row, self._rank_control)}", flush=True)
            self._say_collapse(row)

    def _knn_loaders(self):
        """The monitor's training and test sets without augmentation, made once."""
        if self._knn_data is None:
            a = self.args
            t = data.eval_transform(a.dataset, a.image_size)
            self._knn_data = [data.eval_loader(data.Transformed(data.dataset(a.dataset, a.data_dir, split, a.image_size), t),
                                               256, a.workers, self.device) for split in ("train", "test")]
        return self._knn_data

    def _ranks(self):
        """The effective rank (RankMe) of the test set's backbone features and, where the model has a projector (or
        expander), of the embedding the loss sees: {"rank": ..., "rank_z": ...}. One pass over the test set."""
        return evaluate.ranks(self.backbone, self._knn_loaders()[1], self.gpu, evaluate.head(self.model))

    def _measure_control(self):
        """Before the first step of a fresh run: the effective ranks of the network at initialisation, the control
        the collapse line compares with, as metrics.jsonl's step-0 row; a resumed run reads that row back."""
        if self.args.knn_every < 0:
            return
        if self.step == 0:
            self._rank_control = self._ranks()
            self.metrics.write({"step": 0, "epoch": 0, **self._rank_control})
            if dist.is_main():
                print(f"at initialisation: {_ranks_said(self._rank_control)}", flush=True)
        elif dist.is_main():
            first = self.metrics.first_row()
            self._rank_control = {k: v for k, v in first.items() if k in ("rank", "rank_z")} if first["step"] == 0 else {}

    def _say_collapse(self, row):
        """One line, once, when an effective rank falls under a tenth of the control's."""
        for key, name in (("rank", "backbone features"), ("rank_z", "embedding the loss sees")):
            control = self._rank_control.get(key)
            if self._collapse_said or control is None or key not in row or row[key] >= control / COLLAPSE:
                continue
            self._collapse_said = True
            print(f"collapse: the effective rank of the {name} is {row[key]:.1f}, under 1/{COLLAPSE} of the "
                  f"{control:.1f} of the same network at initialisation: they vary along few directions, so they "
                  f"tell few images apart (dimensional collapse); usual causes: a learning rate too high, too "
                  f"small a batch, a missing stop-gradient or predictor, a variance or redundancy term too weak",
                  flush=True)

    def knn_also(self, key, encoder):
        """At each kNN evaluation, also log the kNN top-1 on `encoder`'s output under `key` (a method that
        compares with a published kNN number taken on another feature than the backbone's)."""
        self._knn_also[key] = encoder

    def log(self, loss, **stats):
        """Record this step's loss and statistics (tensors stay on the device until the next log line)."""
        self.metrics.record(self.step, loss, **stats)

    def _check_finite(self):
        bad = self.metrics.first_bad_step()
        if bad is not None:
            dist.fail(f"the loss is not finite at step {bad}; stopped without saving, so "
                      f"{self.checkpoint} keeps the last good state (lower --lr, or check the data)")

    def epoch_number(self):
        """The epoch the last step taken belongs to, counted from 1: steps 1..S are epoch 1 (S steps per epoch).
        Every line the run prints and every metrics.jsonl row say this number (a kNN evaluation after step S
        reads "epoch 1", as the progress line of step S did); 0 before the first step."""
        return -(-self.step // self.steps_per_epoch)

    def _flush(self):
        self._check_finite()
        return self.metrics.flush(self.step, self.epoch_number(), self.args.epochs, self.total_steps, self.args.batch_size)


COLLAPSE = 10  # the collapse line: an effective rank under 1/COLLAPSE of the control's


def _ranks_said(row, control=None):
    """The kNN line's part: effective rank 41.2 (at init 290.7), of z 12.3 (at init 88.0)."""
    said = []
    for key, name in (("rank", "effective rank"), ("rank_z", "of z")):
        if key in row:
            at_init = f" (at init {control[key]:.1f})" if control and key in control else ""
            said.append(f"{name} {row[key]:.1f}{at_init}")
    return ", ".join(said)


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


def _config(directory):
    """A run directory's config.json, {} when there is none or it is not JSON."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _command(method):
    """The command line that started this run, or None when main() was called from Python (tests)."""
    if Path(sys.argv[0]).stem != method:
        return None
    launcher = ["python"]
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun (its rendezvous flags are not recorded)
        nodes = int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ["LOCAL_WORLD_SIZE"])
        launcher = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []),
                    f"--nproc-per-node={os.environ['LOCAL_WORLD_SIZE']}"]
    return shlex.join([*launcher, *sys.argv])


def _device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ×{dist.world()}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads) ×{dist.world()}"
