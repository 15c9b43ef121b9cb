"""A fitted :class:`~kohonen_vae.som.KohonenMap` on disk, without pickle: ``som.npz`` holds the arrays
(``codebook`` (K, D) float32, the ``init`` array if one was given, and any extra arrays such as the
``kohonen-vae som fit --standardize`` feature scaling), ``som.json`` the constructor parameters, the grid,
the schedule's position and the training history. Both are written atomically (temp file, fsync,
``os.replace``) and carry ``generator = "kohonen-vae som"``, by which :func:`is_ours` recognises them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write, atomic_write_json
from ..errors import ConfigError

GENERATOR = "kohonen-vae som"
FORMAT = 1
MAP_ARRAYS = "som.npz"
MAP_JSON = "som.json"
#: the HTML pages carry this tag (as the run reports carry theirs)
HTML_GENERATOR_TAG = f'<meta name="generator" content="{GENERATOR}">'


def _json_value(value):
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return "array"
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_map(som, folder, extra_arrays: dict | None = None, extra: dict | None = None) -> dict:
    """Write ``som`` (fitted) to ``folder/som.npz`` and ``folder/som.json``; returns ``{name: path}``.

    ``extra_arrays`` (name -> array) go into the npz, ``extra`` (JSON-able) into the JSON under "extra"."""
    som._check_fitted()
    folder = Path(folder)
    params = {k: _json_value(v) for k, v in som.get_params().items()}
    arrays = {"codebook": som.codebook_.detach().cpu().numpy().astype(np.float32),
              "generator": np.array(GENERATOR)}
    if isinstance(som.init, (np.ndarray, torch.Tensor)):
        arrays["init"] = np.asarray(som.init.detach().cpu() if isinstance(som.init, torch.Tensor) else som.init)
    for name, value in (extra_arrays or {}).items():
        if name in arrays:
            raise ValueError(f"extra array name {name!r} is reserved")
        arrays[name] = np.asarray(value)
    meta = {
        "generator": GENERATOR, "format": FORMAT, "params": params,
        "fitted": {"grid": som.grid_.to_dict(), "n_features_in": som.n_features_in_, "n_updates": som.n_updates_,
                   "total_updates": som.total_updates_, "updates_per_epoch": som.updates_per_epoch_, "sigma_next": som.sigma_, "history": som.history_},
        "extra": extra or {},
    }
    paths = {"arrays": folder / MAP_ARRAYS, "json": folder / MAP_JSON}
    atomic_write(paths["arrays"], lambda f: np.savez(f, **arrays))
    atomic_write_json(paths["json"], meta)
    return paths


def read_map_files(folder) -> tuple[dict, dict]:
    """``(meta, arrays)`` of a saved map; :class:`ConfigError` if the files are missing or not ours."""
    folder = Path(folder)
    jpath, npath = folder / MAP_JSON, folder / MAP_ARRAYS
    for p in (jpath, npath):
        if not p.is_file():
            raise ConfigError(f"{p} not found: a saved KohonenMap is a folder with {MAP_JSON} and {MAP_ARRAYS} "
                              "(written by KohonenMap.save or kohonen-vae som fit)")
    try:
        meta = json.loads(jpath.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{jpath} is not readable JSON ({e}); write the map again") from e
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR:
        raise ConfigError(f"{jpath} was not written by kohonen-vae (no generator {GENERATOR!r})")
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{jpath} has format {meta.get('format')!r}; this version reads format {FORMAT}")
    try:
        with np.load(npath, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{npath} is not a readable .npz without pickled objects ({e}); write the map again") from e
    if str(arrays.get("generator", "")) != GENERATOR:
        raise ConfigError(f"{npath} was not written by kohonen-vae (no generator {GENERATOR!r})")
    return meta, arrays


def load_map(folder, device=None):
    """The :class:`~kohonen_vae.som.KohonenMap` saved in ``folder``, fitted, its codebook on ``device``
    (default: the saved ``device`` parameter, else torch's default device)."""
    from .estimator import KohonenMap

    meta, arrays = read_map_files(folder)
    params = dict(meta["params"])
    if params.get("init") == "array":
        params["init"] = arrays["init"]
    if isinstance(params.get("grid_shape"), list):
        params["grid_shape"] = tuple(params["grid_shape"])
    som = KohonenMap(**params)
    fitted = meta["fitted"]
    codebook = torch.from_numpy(np.asarray(arrays["codebook"], dtype=np.float32))
    where = device if device is not None else (params.get("device") or torch.get_default_device())
    per_epoch = int(fitted.get("updates_per_epoch", 1))  # maps saved before it was stored: one per epoch
    som._build(int(fitted["total_updates"]) // per_epoch, per_epoch, fitted["n_features_in"], torch.device(where))
    if som.grid_.to_dict() != fitted["grid"] or tuple(codebook.shape) != (som.grid_.size, fitted["n_features_in"]):
        raise ConfigError(f"{folder}: the saved codebook {tuple(codebook.shape)} does not match the saved grid "
                          f"{fitted['grid']}; the files are inconsistent, write the map again")
    som.codebook_ = codebook.to(som.device_)
    som.n_updates_ = int(fitted["n_updates"])
    som.history_ = list(fitted.get("history", []))
    return som


def is_ours(path) -> bool:
    """True when ``path`` is a file that ``kohonen-vae som`` wrote: a JSON object, an npz or an HTML page
    carrying its generator tag. Anything else (or unreadable) is not ours and must not be replaced."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
            return isinstance(obj, dict) and obj.get("generator") == GENERATOR
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return "generator" in z.files and str(z["generator"]) == GENERATOR
        if path.suffix == ".html":
            with open(path, encoding="utf-8", errors="replace") as f:
                return HTML_GENERATOR_TAG in f.read(4096)
    except (OSError, ValueError):
        return False
    return False
