"""Checkpoints that survive a kill or a full disk, that run no code when read, and that resume only the run
that wrote them.

    write({OUT/checkpoint.pt: state, OUT/backbone.pt: weights})   # each file the old one or the new one, whole
    state = read(OUT/checkpoint.pt, device)                         # tensors and plain containers only
    changed_flags(state["args"], args)                              # the training flags a resume may not change

A checkpoint holds tensors, numbers, strings and lists, tuples and dicts of them: `torch.load(...,
weights_only=True)` reads it, and refuses anything else, so a file planted in a run directory cannot
make the project run code.
"""
import dataclasses
import os
import random
from pathlib import Path

import torch

# How a run is carried out, not what it trains: free to change when a run resumes (so is the number of
# processes). Every other flag of Args must be the checkpoint's.
FREE_ON_RESUME = frozenset({"workers", "log_every", "max_steps", "knn_every", "knn_k", "knn_t", "compile",
                            "compile_backend", "device", "amp", "out", "resume", "data_dir", "save_every",
                            "tensorboard"})


class Unreadable(Exception):
    """A file that is not a checkpoint this project can read; str() is the reason, for the one-line error."""


def _temporary(path):
    return path.with_name(f".{path.name}.tmp")


def _write_temporary(obj, path):
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a write error, Ctrl-C: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write(files):
    """Write {path: object} with torch.save: every file to its temporary first, then each renamed over its
    path. A failure while writing (ENOSPC, any OSError) leaves every old file whole and no temporary file;
    a kill at any moment leaves each path the old file or the new one, never a part of one."""
    written = []
    try:
        for path, obj in files.items():
            written.append((_write_temporary(obj, Path(path)), Path(path)))
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in written:
        os.replace(tmp, path)


def save_atomic(obj, path):
    """One file, as `write`."""
    write({path: obj})


def read(path, device="cpu"):
    """The checkpoint at `path`, read with weights_only=True; Unreadable when it cannot be read as one."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise Unreadable(f"{type(e).__name__}: {e.strerror}") from None
    except Exception as e:  # a foreign object (weights_only refuses it), a truncated or corrupt file
        refused = "Weights only load failed" in str(e)
        raise Unreadable("it holds objects other than tensors and plain containers" if refused
                         else type(e).__name__) from None


def changed_flags(saved, args):
    """`--flag SAVED (now NEW)` for each training flag of `args` that differs from the checkpoint's `saved`."""
    now = dataclasses.asdict(args)
    return [f"--{k.replace('_', '-')} {saved[k]!r} (now {v!r})" for k, v in now.items()
            if k not in FREE_ON_RESUME and k in saved and saved[k] != v]


def rng_state():
    """The random generators a run draws from, as tensors and plain containers."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]  # (read back as lists where the pickle had tuples)
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
