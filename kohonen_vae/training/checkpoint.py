"""Atomic files and checkpoints.

Every file is written to a temporary file in the destination folder, flushed and fsync'ed, then moved
over the destination with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsync'ed: a
process killed at any moment leaves either the previous file or the new one, never a torn one.

Checkpoint (``torch.save`` of a dict of plain types and tensors, loadable with ``weights_only=True``)::

    format      "kohonen-vae-checkpoint/1"
    step        optimiser steps done
    config      the fully resolved run config
    model       model.state_dict() (codebooks, EMA statistics and step counters included)
    optimizer   optimizer.state_dict()
    sampler     ShardedBatchSampler.state_dict() (epoch, position)
    rng         {"torch", "cuda" (list, may be empty), "numpy", "python"}
    trainer     {"best_recon", "best_step", "evals": [[step, val_recon], ...], "window": running log sums}
    normalizer  Normalizer.to_dict() of the run's data
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write, atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)

FORMAT = "kohonen-vae-checkpoint/1"


def save_checkpoint(path, state: dict) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (safe loader: tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kohonen-vae checkpoint (format {FORMAT})")
    return ckpt


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


def read_metrics(path) -> list[dict]:
    """Records of a ``metrics.jsonl``; a torn last line (process killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def load_model(run_or_checkpoint, which: str = "best", map_location="cpu"):
    """Rebuild a trained model from a run directory (``checkpoints/{which}.pt``) or a checkpoint file.

    Returns ``(model, checkpoint)``; the model is in eval mode on ``map_location``.
    """
    from ..models import build_model

    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = path / "checkpoints" / f"{which}.pt"
    ckpt = load_checkpoint(path, map_location=map_location)
    model = build_model(ckpt["config"]["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval(), ckpt
