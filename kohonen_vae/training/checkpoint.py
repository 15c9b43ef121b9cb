"""The checkpoint format (its one owner), atomic files and the run's metrics log.

Every file is written to a temporary file in the destination folder, flushed and fsync'ed, then moved
over the destination with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsync'ed: a
process killed at any moment leaves either the previous file or the new one, never a torn one.

Checkpoint (``torch.save`` of a dict of plain types and tensors, loadable with ``weights_only=True``)::

    format      "kohonen-vae-checkpoint/2"   (/1, without checksum and train_seconds, is still read)
    step        optimiser steps done
    config      the fully resolved run config
    model       model.state_dict() (codebooks, EMA statistics and step counters included)
    optimizer   optimizer.state_dict()
    sampler     ShardedBatchSampler.state_dict() (epoch, position)
    rng         {"torch", "cuda" (list, may be empty), "numpy", "python"}
    trainer     {"best_recon", "best_step", "evals": [[step, val_recon], ...], "window": running log sums,
                 "train_seconds": training time summed over every session}
    normalizer  Normalizer.to_dict() of the run's data
    checksum    sha256 of everything above (:func:`content_digest`): tensor bytes, dtypes, shapes and
                plain values in a canonical order, so flipped bytes anywhere are detected on load

:func:`make_checkpoint` builds this dict and :func:`restore_training_state` applies it; nothing else in
the package reads or writes its keys (readers use :func:`load_model` / :class:`CheckpointInfo`).
``checkpoints/last.pt`` keeps its predecessor as ``checkpoints/last.prev.pt`` (the fallback offered when
``last.pt`` is damaged).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..fileio import atomic_write, atomic_write_json, atomic_write_text, replace_keeping_previous  # noqa: F401

FORMAT = "kohonen-vae-checkpoint/2"
#: formats this version reads (older ones carry no checksum)
READABLE_FORMATS = ("kohonen-vae-checkpoint/1", FORMAT)


# -- content checksum ---------------------------------------------------------------------------------------
def content_digest(obj) -> str:
    """sha256 over a canonical walk of ``obj`` (dicts in key order, lists, tuples, tensors, numbers, strings,
    None): each tensor contributes its dtype, shape and raw bytes, each float its exact bits. Two objects
    with the same digest hold identical values; it does not depend on how ``torch.save`` lays out the file."""
    h = hashlib.sha256()
    _digest_into(h, obj)
    return h.hexdigest()


def _digest_into(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                     else t.numpy().tobytes())
    elif isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0])))
        h.update(f"D{len(items)}".encode())
        for k, v in items:
            _digest_into(h, k)
            _digest_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _digest_into(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(f"B{obj}".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj}".encode())
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        h.update(b"S" + obj.encode("utf-8", "surrogatepass") + b"\0")
    elif isinstance(obj, (np.ndarray, np.generic)):
        _digest_into(h, torch.as_tensor(np.asarray(obj)))
    else:
        raise TypeError(f"content_digest: unsupported type {type(obj).__name__}")


# -- saving and loading -------------------------------------------------------------------------------------
def save_checkpoint(path, state: dict, keep_previous: bool = False) -> None:
    """``torch.save(state + checksum)`` to ``path`` atomically. ``keep_previous``: an existing ``path`` is kept
    as ``<stem>.prev<suffix>`` (renamed, not copied) once the new file is complete."""
    state = {k: v for k, v in state.items() if k != "checksum"}
    state["checksum"] = content_digest(state)
    if keep_previous:
        replace_keeping_previous(path, lambda f: torch.save(state, f), previous_path(path))
    else:
        atomic_write(path, lambda f: torch.save(state, f))


def previous_path(path) -> Path:
    """Where :func:`save_checkpoint` keeps the predecessor of ``path``: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def load_checkpoint(path, map_location="cpu", verify: bool = True) -> dict:
    """Load and verify a checkpoint written by :func:`save_checkpoint` (safe loader: tensors and plain types
    only). Raises :class:`~kohonen_vae.errors.CheckpointError` (one line naming the file, and the previous
    checkpoint if there is an intact one) for a missing, truncated, foreign or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbled pickle, refused global, empty file ...
        raise CheckpointError(f"{path} is damaged and cannot be read ({type(e).__name__}: "
                              f"{_first_line(e)}){_fallback_hint(path)}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a kohonen-vae checkpoint (format {found!r}; this version reads "
                              f"{', '.join(READABLE_FORMATS)})")
    if verify and "checksum" in ckpt:
        stored = ckpt["checksum"]
        if content_digest({k: v for k, v in ckpt.items() if k != "checksum"}) != stored:
            raise CheckpointError(f"{path} is damaged: its content does not match its checksum"
                                  f"{_fallback_hint(path)}")
    elif verify and ckpt["format"] != READABLE_FORMATS[0]:
        raise CheckpointError(f"{path} has no checksum although its format {ckpt['format']} requires one")
    return ckpt


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no details"


def _fallback_hint(path: Path) -> str:
    prev = previous_path(path)
    if not prev.is_file() or prev == path:
        return ""
    try:
        step = load_checkpoint(prev)["step"]
    except CheckpointError:
        return f"; the previous checkpoint {prev} is damaged too"
    return (f"; the previous checkpoint {prev} (step {step}) is intact: continue from it with "
            f"`kohonen-vae train --resume --resume-from previous --out {path.parent.parent}`")


# -- the training state -------------------------------------------------------------------------------------
@dataclass
class TrainingProgress:
    """What the loop tracks besides model, optimiser, sampler and RNG: steps done, best validation MSE and
    its step, every evaluation ``(step, val_recon)``, the running log window and the training seconds
    summed over all sessions of the run."""

    step: int = 0
    best_recon: float = math.inf
    best_step: int | None = None
    evals: list = field(default_factory=list)
    window: torch.Tensor | None = None
    train_seconds: float = 0.0


def make_checkpoint(*, config: dict, model, optimizer, sampler, progress: TrainingProgress, normalizer) -> dict:
    """The checkpoint dict of the format above (the checksum is added by :func:`save_checkpoint`)."""
    p = progress
    return {"format": FORMAT, "step": int(p.step), "config": config, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng_state(),
            "trainer": {"best_recon": p.best_recon if p.best_step is not None else None, "best_step": p.best_step,
                        "evals": [list(e) for e in p.evals],
                        "window": p.window.detach().cpu() if p.window is not None else None,
                        "train_seconds": float(p.train_seconds)},
            "normalizer": normalizer.to_dict()}


def restore_training_state(ckpt: dict, model, optimizer, sampler, device=None) -> TrainingProgress:
    """Load model, optimiser, sampler and RNG states from ``ckpt`` and return its :class:`TrainingProgress`
    (an uninterrupted run would continue with exactly these batches and random numbers)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    sampler.load_state_dict(ckpt["sampler"])
    set_rng_state(ckpt["rng"])
    tr = ckpt["trainer"]
    window = tr.get("window")
    return TrainingProgress(
        step=int(ckpt["step"]),
        best_recon=tr["best_recon"] if tr["best_step"] is not None else math.inf,
        best_step=tr["best_step"], evals=[tuple(e) for e in tr["evals"]],
        window=window.to(device) if (window is not None and device is not None) else window,
        train_seconds=float(tr.get("train_seconds", 0.0)))


@dataclass
class CheckpointInfo:
    """What readers of a checkpoint need besides the model: its file, step, run config and normaliser."""

    path: Path
    step: int
    config: dict
    normalizer: dict          # Normalizer.to_dict(); ``Normalizer.from_dict`` rebuilds it

    @classmethod
    def of(cls, ckpt: dict, path) -> "CheckpointInfo":
        return cls(path=Path(path), step=int(ckpt["step"]), config=ckpt["config"], normalizer=ckpt["normalizer"])


# -- RNG states as tensors and plain types (weights_only-loadable) ---------------------------------------
def rng_state() -> dict:
    """Torch (CPU and every CUDA device), numpy and python RNG states."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# -- metrics log --------------------------------------------------------------------------------------------
def read_metrics(path, warn=None) -> list[dict]:
    """Records of a ``metrics.jsonl``. A torn last line (process killed mid-write) is dropped quietly; a
    damaged line elsewhere is skipped, the valid records around it are kept, and ``warn(message)`` (default:
    a line on stderr) names the line numbers: nothing is lost silently."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records, damaged = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            records.append(record)
        except ValueError:
            damaged.append(i)
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    damaged_inside = [i for i in damaged if i != last]
    if damaged_inside:
        message = (f"warning: {path}: skipped {len(damaged_inside)} damaged line(s) ({', '.join(map(str, damaged_inside[:10]))}"
                   f"{' ...' if len(damaged_inside) > 10 else ''}); the {len(records)} valid records are kept")
        (warn or (lambda m: print(m, file=sys.stderr)))(message)
    return records


def load_model(run_or_checkpoint, which: str = "best", map_location="cpu"):
    """Rebuild a trained model from a run directory (``checkpoints/{which}.pt``) or a checkpoint file.

    Returns ``(model, info)``: the model in eval mode on ``map_location`` and its :class:`CheckpointInfo`.
    """
    from ..models import build_model

    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = path / "checkpoints" / f"{which}.pt"
    ckpt = load_checkpoint(path, map_location=map_location)
    model = build_model(ckpt["config"]["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval(), CheckpointInfo.of(ckpt, path)
