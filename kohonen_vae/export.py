"""A trained tokenizer as files that load without pickle: ``export_run`` and ``load_pretrained``.

Export layout (the Hugging Face Hub's: a folder with ``config.json`` beside ``model.safetensors``)::

    config.json         format "kohonen-vae-pretrained/1", the resolved model config, the normaliser,
                        the training image shape, per level K / grid / stride / latent shape, the data
                        config (name, image size, split; no local paths), the source checkpoint and step,
                        ``config_hash`` and ``weights_hash`` (below)
    model.safetensors   ``model.state_dict()``: every parameter and buffer (codebooks, EMA statistics and
                        step counters included), little-endian, in the safetensors format

``load_pretrained(folder)`` reads only these two files, with ``json`` and the safetensors reader of this
module: no ``torch.load``, no pickle, nothing executable. Files named ``pytorch_model.bin`` or ``*.pt`` in
the folder are never looked at.

Safetensors format (https://github.com/huggingface/safetensors, readable by the official library both
ways): 8 bytes little-endian u64 ``n``, an ``n``-byte JSON header ``{name: {"dtype": "F32", "shape": [...],
"data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded with spaces to a multiple of 8, then
the raw tensor bytes; offsets are relative to the end of the header and tile the data exactly.

Identity of a tokenizer (what a token file records and :mod:`kohonen_vae.tokens` checks):

* ``config_hash`` = sha256 of the canonical JSON (sorted keys, no spaces) of
  ``{"model": resolved model config, "normalizer": {"kind", "mean", "std"}}``: architecture, quantiser
  and pixel normalisation, i.e. what token values mean structurally;
* ``weights_hash`` = sha256 over the state dict in key order, each entry contributing its name, dtype,
  shape and little-endian bytes: the trained weights themselves (two seeds of one config differ here,
  as do the ``best`` and ``last`` checkpoints of one run; a run and its export agree).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write, atomic_write_json
from .errors import ConfigError

PRETRAINED_FORMAT = "kohonen-vae-pretrained/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
CHECKPOINTS = ("best", "last")
#: a header larger than this is refused (a real one is a few KiB; a garbage length must not allocate GiBs)
MAX_HEADER_BYTES = 100 * 1024 * 1024


# -- safetensors ----------------------------------------------------------------------------------------------
class SafetensorsError(ConfigError):
    """A file is not a valid safetensors file (the message names the file and what is wrong)."""


#: safetensors dtype code -> (torch dtype, little-endian numpy dtype of the same bytes)
_DTYPES = {
    "F64": (torch.float64, "<f8"), "F32": (torch.float32, "<f4"), "F16": (torch.float16, "<f2"),
    "BF16": (torch.bfloat16, "<i2"), "I64": (torch.int64, "<i8"), "I32": (torch.int32, "<i4"),
    "I16": (torch.int16, "<i2"), "I8": (torch.int8, "i1"), "U8": (torch.uint8, "u1"), "BOOL": (torch.bool, "?"),
}
_CODES = {t: code for code, (t, _) in _DTYPES.items()}


def tensor_le_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of a tensor (C order), whatever the host's byte order."""
    t = t.detach().cpu().contiguous()
    if t.dtype not in _CODES:
        raise TypeError(f"tensors of dtype {t.dtype} cannot be stored (supported: {sorted(map(str, _CODES))})")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same 2 bytes as int16
        t = t.view(torch.int16)
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: tensor}`` (and string ``metadata``) to ``path`` in the safetensors format, atomically.
    Tensors are laid out in name order; the header is padded with spaces to a multiple of 8 bytes."""
    header, blobs, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    for name in sorted(tensors):
        t = tensors[name]
        data = tensor_le_bytes(t)
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)

    atomic_write(path, write)


def load_safetensors(path) -> tuple[dict, dict]:
    """``({name: tensor}, metadata)`` of a safetensors file, every field validated before use: the header
    length against the file size, the JSON, each dtype and shape, and offsets that tile the data exactly.
    Raises :class:`SafetensorsError` naming the problem. Reads plain bytes and JSON only."""
    path = Path(path)
    size = path.stat().st_size

    def bad(why):
        return SafetensorsError(f"{path} is not a valid safetensors file: {why}")

    with open(path, "rb") as f:
        if size < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte limit")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(f"the header is not JSON ({e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    spans, tensors = [], {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} must have exactly dtype, shape and data_offsets")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in _DTYPES:
            raise bad(f"tensor {name!r} has dtype {code!r}; this reader knows {', '.join(_DTYPES)}")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= len(data)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r} outside the {len(data)} data bytes")
        dtype, np_dtype = _DTYPES[code]
        count = math.prod(shape)  # Python integers: a crafted shape cannot overflow into a match
        if offsets[1] - offsets[0] != count * np.dtype(np_dtype).itemsize:
            raise bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold shape {shape} of {code}")
        spans.append((offsets[0], offsets[1], name))
        arr = np.frombuffer(data, dtype=np_dtype, count=count, offset=offsets[0])
        t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True)).reshape(shape)
        tensors[name] = t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {end} (gap or overlap)")
        end = stop
    if end != len(data):
        raise bad(f"the tensors cover {end} of the {len(data)} data bytes")
    return tensors, metadata


# -- identity of a tokenizer ----------------------------------------------------------------------------------
def _canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def config_hash(model_config: dict, normalizer) -> str:
    """sha256 hex of the canonical JSON of ``{"model": resolved model config, "normalizer": {kind, mean, std}}``
    (``normalizer`` a :class:`~kohonen_vae.data.Normalizer` or its ``to_dict()``)."""
    from .data import Normalizer
    from .models.factory import resolve_model_config

    norm = normalizer if isinstance(normalizer, Normalizer) else Normalizer.from_dict(normalizer)
    return hashlib.sha256(_canonical_json({"model": resolve_model_config(model_config),
                                           "normalizer": norm.to_dict()})).hexdigest()


def weights_hash(state_dict: dict) -> str:
    """sha256 hex over ``state_dict`` in key order: each entry adds ``name``, dtype, shape (as text) and its
    little-endian bytes (:func:`tensor_le_bytes`)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(tensor_le_bytes(t))
    return h.hexdigest()


# -- a trained tokenizer, from a run or an export ---------------------------------------------------------------
@dataclass
class Tokenizer:
    """A trained model ready to encode/decode, with what token files record about it.

    kind: "run" (a run directory or checkpoint file) or "export" (an :func:`export_run` folder);
    checkpoint/step: which checkpoint the weights come from; data: the run's data config (name,
    image_size, val_fraction, split_seed, and data_dir for runs); image_shape: ``[C, H, W]`` of the
    training images when known.
    """

    model: torch.nn.Module
    normalizer: object
    source: Path
    kind: str
    checkpoint: str | None
    step: int | None
    data: dict = field(default_factory=dict)
    image_shape: list | None = None
    config_hash: str = ""
    weights_hash: str = ""

    def levels(self, image_shape=None) -> list[dict]:
        """Per level: name, codebook_size K, grid (shape, periodic, topology), stride and, for an image
        shape ``(C, H, W)``, the latent ``shape`` ``[H / stride, W / stride]``."""
        shape = image_shape if image_shape is not None else self.image_shape
        n = len(self.model.quantizers)
        latents = self.model.latent_shapes(tuple(shape[-2:])) if shape is not None else [None] * n
        return [{"name": name, "codebook_size": int(q.codebook_size), "grid": q.grid.to_dict(), "stride": int(s),
                 **({"shape": list(lat)} if lat is not None else {})}
                for name, q, s, lat in zip(self.model.level_names, self.model.quantizers, self.model.strides, latents)]

    def describe(self) -> str:
        """e.g. ``runs/ksom (checkpoint best, step 1000)`` or ``exports/ksom (export of checkpoint best, step 1000)``."""
        what = "export of checkpoint" if self.kind == "export" else "checkpoint"
        return f"{self.source} ({what} {self.checkpoint}, step {self.step})"


def default_device():
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _resolve_device(device):
    if device is None or device == "auto":
        return default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r} ({e}); use cpu, cuda, cuda:1, mps or auto") from None


def is_export(folder) -> bool:
    """True if ``folder`` holds an :func:`export_run` export (``config.json`` of our format + weights)."""
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() and _read_export_config(folder, strict=False) is not None


def _read_export_config(folder: Path, strict: bool = True):
    path = folder / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if strict:
            raise ConfigError(f"{path} cannot be read as JSON ({e}); export the run again with kohonen-vae "
                              "export") from None
        return None
    if not isinstance(cfg, dict) or cfg.get("format") != PRETRAINED_FORMAT:
        if strict:
            found = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
            raise ConfigError(f"{path} is not a kohonen-vae export (format {found!r}, expected {PRETRAINED_FORMAT!r})")
        return None
    return cfg


def load_tokenizer(source, checkpoint: str | None = "best", device=None) -> Tokenizer:
    """The :class:`Tokenizer` of a run directory (``checkpoints/{checkpoint}.pt``, loaded by the training
    module's safe loader), a checkpoint file, or an export folder (``checkpoint`` is then ignored: an export
    holds one). The model is in eval mode on ``device`` (default: CUDA if available, else CPU).
    Raises :class:`ConfigError` naming what was looked for."""
    source = Path(source)
    device = _resolve_device(device)
    if source.is_dir() and (source / WEIGHTS_FILE).is_file():
        model = load_pretrained(source, device=device)
        info = model.pretrained_config
        return Tokenizer(model=model, normalizer=model.normalizer, source=source, kind="export",
                         checkpoint=info.get("source", {}).get("checkpoint"), step=info.get("source", {}).get("step"),
                         data=dict(info.get("data") or {}), image_shape=info.get("image_shape"),
                         config_hash=config_hash(model.config, model.normalizer),
                         weights_hash=weights_hash(model.state_dict()))
    checkpoint = checkpoint or "best"
    if source.is_dir():
        if checkpoint not in CHECKPOINTS:
            raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
        path = source / "checkpoints" / f"{checkpoint}.pt"
        if not path.is_file():
            there = [c for c in CHECKPOINTS if (source / "checkpoints" / f"{c}.pt").is_file()]
            raise ConfigError(f"{source} has no checkpoint {checkpoint!r} ({path} is missing"
                              + (f"; it has {', '.join(there)}: pass --checkpoint {there[0]})" if there else
                                 "). Give a run directory written by kohonen-vae train (config.json + checkpoints/) "
                                 "or a folder written by kohonen-vae export (config.json + model.safetensors)"))
        run_dir = source
    elif source.is_file():
        path, run_dir, checkpoint = source, source.parent.parent, source.stem
    else:
        raise ConfigError(f"{source} does not exist; give a run directory (config.json + checkpoints/), a "
                          "checkpoint file or an export folder (config.json + model.safetensors)")
    model, ckpt_config, normalizer, step = _load_checkpoint_model(path, device)
    from .data import Normalizer

    norm = Normalizer.from_dict(normalizer)
    image_shape = None
    try:  # the training images' shape is in the run's data.json (absent for a bare checkpoint file)
        image_shape = json.loads((run_dir / "data.json").read_text()).get("image_shape")
    except (OSError, ValueError):
        size = (ckpt_config.get("data") or {}).get("image_size")
        image_shape = [model.config["in_channels"], size, size] if size else None
    return Tokenizer(model=model, normalizer=norm, source=source, kind="run", checkpoint=checkpoint, step=step,
                     data=dict(ckpt_config.get("data") or {}), image_shape=image_shape,
                     config_hash=config_hash(model.config, norm), weights_hash=weights_hash(model.state_dict()))


def _load_checkpoint_model(path: Path, device):
    """``(model, run config, normaliser dict, step)`` via the training module's ``load_model`` (torch.load
    with ``weights_only=True``: tensors and plain types only, a pickle's code is refused, never run)."""
    from .training import load_model

    try:
        model, info = load_model(path, map_location=device)
    except ConfigError:
        raise
    except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or ["no details"])[0][:300]
        raise ConfigError(f"cannot load the checkpoint {path} ({type(e).__name__}: {first})") from e
    if isinstance(info, dict):  # load_model of checkpoint format 1 returned the checkpoint dict itself
        return model, info["config"], info["normalizer"], int(info["step"])
    return model, info.config, info.normalizer, int(info.step)


# -- export and load ----------------------------------------------------------------------------------------------
def _check_export_folder(out: Path) -> None:
    """Refuse a file, or a folder holding anything but an earlier export of ours (whose two files we replace)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the export")
    if not out.is_dir():
        return
    entries = [p.name for p in sorted(out.iterdir()) if not _TEMP_NAME.match(p.name)]
    foreign = [e for e in entries if e not in EXPORT_FILES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ConfigError(f"{out} holds files that kohonen-vae export did not write ({shown}); export into a new "
                          "or empty folder, or into an earlier export, whose config.json and model.safetensors "
                          "are then replaced")
    if entries and (CONFIG_FILE not in entries or _read_export_config(out, strict=False) is None):
        raise ConfigError(f"{out} holds {', '.join(entries)} but no config.json of a kohonen-vae export: these "
                          "files were not written by kohonen-vae export and are left alone; choose another --out")


#: temporary files of our atomic writes (fileio: ``.NAME.XXXXXXXX.tmp``)
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,12}\.tmp$")


def export_run(run_dir, out_dir, checkpoint: str = "best") -> Path:
    """Write ``model.safetensors`` + ``config.json`` (module docstring) of a run's checkpoint into
    ``out_dir`` and return it. ``out_dir`` must be new, empty, or an earlier export (whose two files are
    replaced, each atomically: the weights first, then the config that names their hash, so a kill in
    between is detected by :func:`load_pretrained`); a folder with any other file is refused."""
    out = Path(out_dir)
    _check_export_folder(out)
    tok = load_tokenizer(run_dir, checkpoint, device="cpu")
    if tok.kind == "export" and Path(run_dir).resolve() == out.resolve():
        raise ConfigError(f"{out} is the export being read; give another --out")
    from . import __version__

    state = {k: v.detach().cpu().contiguous() for k, v in tok.model.state_dict().items()}
    data = {k: tok.data.get(k) for k in ("name", "image_size", "val_fraction", "split_seed") if k in tok.data}
    if isinstance(data.get("name"), str) and data["name"].startswith("folder:"):
        data["name"] = "folder:" + Path(data["name"][len("folder:"):]).name  # no local paths in a shared export
    config = {
        "format": PRETRAINED_FORMAT,
        "library_name": "kohonen-vae",
        "kohonen_vae_version": __version__,
        "model": tok.model.config,
        "normalizer": tok.normalizer.to_dict(),
        "image_shape": tok.image_shape,
        "levels": tok.levels(),
        "data": data,
        "source": {"checkpoint": tok.checkpoint, "step": tok.step},
        "config_hash": tok.config_hash,
        "weights_hash": tok.weights_hash,
        "weights": {"file": WEIGHTS_FILE, "tensors": len(state),
                    "parameters": int(sum(v.numel() for v in state.values()))},
        "exported": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    save_safetensors(out / WEIGHTS_FILE, state, metadata={"format": "pt", "kohonen_vae": PRETRAINED_FORMAT,
                                                          "weights_hash": tok.weights_hash})
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def load_pretrained(folder, device=None):
    """Rebuild a model from an :func:`export_run` folder without unpickling anything: ``config.json`` is
    read with ``json`` and ``model.safetensors`` with :func:`load_safetensors`. Returns the model in eval
    mode on ``device`` (default CPU) with ``model.normalizer`` (a :class:`~kohonen_vae.data.Normalizer`)
    and ``model.pretrained_config`` (the config dict). Raises :class:`ConfigError` for a missing or foreign
    file, weights that do not fit the config, or weights whose hash differs from the recorded one."""
    from .data import Normalizer
    from .models.factory import build_model

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give a folder written by kohonen-vae export")
    cfg = _read_export_config(folder) if (folder / CONFIG_FILE).is_file() else None
    if cfg is None:
        raise ConfigError(f"{folder} has no {CONFIG_FILE}; give a folder written by kohonen-vae export")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{folder} has no {WEIGHTS_FILE} (pickled weights such as pytorch_model.bin or *.pt are "
                          "never loaded); export the run again with kohonen-vae export")
    model = build_model(cfg["model"])
    tensors, _ = load_safetensors(weights)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{weights} does not fit the model of {folder / CONFIG_FILE}: "
                          + "; ".join(w for w in (f"missing {', '.join(missing[:5])}" if missing else "",
                                                  f"unexpected {', '.join(unexpected[:5])}" if unexpected else "") if w))
    for name, t in expected.items():
        if tensors[name].shape != t.shape or tensors[name].dtype != t.dtype:
            raise ConfigError(f"{weights}: tensor {name} is {tensors[name].dtype} {tuple(tensors[name].shape)}, the "
                              f"model of {folder / CONFIG_FILE} needs {t.dtype} {tuple(t.shape)}")
    model.load_state_dict(tensors, strict=True)
    found = weights_hash(model.state_dict())
    if found != cfg.get("weights_hash"):
        raise ConfigError(f"{weights} has weights hash {found[:12]}, but {folder / CONFIG_FILE} records "
                          f"{str(cfg.get('weights_hash'))[:12]}: the folder is damaged or mixes two exports; "
                          "export the run again")
    model.normalizer = Normalizer.from_dict(cfg["normalizer"])
    model.pretrained_config = cfg
    return model.to(_resolve_device(device) if device is not None else torch.device("cpu")).eval()


# -- command line -----------------------------------------------------------------------------------------------
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """``kohonen-vae export RUN_DIR --out DIR [--checkpoint best|last]``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by kohonen-vae train")
    p.add_argument("--out", required=True, help="folder for config.json + model.safetensors (new, empty, or an "
                                                "earlier export)")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="which checkpoint (default: best)")


def run_export(args) -> int:
    """Run ``kohonen-vae export``; prints what was written."""
    out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint)
    cfg = json.loads((out / CONFIG_FILE).read_text())
    size = (out / WEIGHTS_FILE).stat().st_size
    print(f"exported {args.run_dir} (checkpoint {cfg['source']['checkpoint']}, step {cfg['source']['step']}): "
          f"{out / WEIGHTS_FILE} ({cfg['weights']['parameters']:,} values, {size / 2**20:.1f} MiB) + "
          f"{out / CONFIG_FILE}")
    print(f"config hash {cfg['config_hash'][:12]}, weights hash {cfg['weights_hash'][:12]}; "
          f"load with kohonen_vae.load_pretrained({str(out)!r})")
    return 0


#: ``cli.SUBCOMMANDS`` entry
SUBCOMMAND = ("export a run's checkpoint as model.safetensors + config.json (loads without pickle)",
              add_export_arguments, run_export)

__all__ = ["export_run", "load_pretrained", "load_tokenizer", "Tokenizer", "save_safetensors", "load_safetensors",
           "SafetensorsError", "config_hash", "weights_hash", "PRETRAINED_FORMAT", "add_export_arguments", "run_export"]
