"""Run configuration as plain data: defaults, TOML/JSON loading, ``--set key=value`` overrides, validation.

A config is a nested dict with four top-level entries::

    seed = 0                                    # model init and data order
    [data]   name, data_dir, image_size, val_fraction, split_seed, val_max_images, test_max_images
    [model]  arch, in_channels, channels, res_channels, num_res_blocks, embed_dim,
             [model.quantizer] type, codebook_size, ... (see kohonen_vae.models.factory)
    [train]  lr, batch_size, max_steps, ... (see TRAIN_DEFAULTS)

:func:`resolve_config` fills every default and validates every key; the result is what a run saves in
``config.json`` and what ``--config run_dir/config.json`` reproduces exactly.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from ..models.factory import MODEL_DEFAULTS, ConfigError, resolve_model_config

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.9/3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "configs"

DATA_DEFAULTS = {
    "name": "cifar10",        # cifar10 | utkface64 | mnist | sample | folder:PATH
    "data_dir": None,         # where the dataset lives (None: the data package's search path)
    "image_size": None,       # resize to this side (None: native size)
    "val_fraction": 0.2,      # the paper validates on a fixed random 20% of the training set
    "split_seed": 0,
    "val_max_images": None,   # evaluate on the first N validation images only (None: all)
    "test_max_images": None,  # same for the final test evaluation
    "download": False,        # cifar10 only: download the official archive if it is not found
}

TRAIN_DEFAULTS = {
    "lr": 1e-3,
    "batch_size": 256,        # global batch (split over data-parallel ranks)
    "max_steps": 30000,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "grad_clip": 1.0,         # global gradient-norm clipping (0 disables)
    "eval_every": 1000,       # validation (codebook frozen) every N steps and at the last step
    "eval_batch_size": 512,
    "log_every": 10,          # one "train" record per N steps (means over those steps)
    "checkpoint_every": 1000,  # checkpoints/last.pt every N steps and at the last step
    "device": "auto",         # auto (cuda if available, else cpu) | cpu | cuda | cuda:1 | mps ...
    "bf16": False,            # bf16 autocast (the paper trains in fp32)
    "data_on_device": "auto",  # keep the uint8 training set on the accelerator (auto: if it fits easily)
    "test_at_end": True,      # evaluate the final model on the test split if the dataset has one
    "progress": True,         # tqdm progress bar
    "tensorboard": False,     # also write TensorBoard events to <run>/tensorboard (needs tensorboard)
    "report": True,           # write <run>/report.html at the end (when the report hook is enabled, as the CLI does)
}

DEFAULTS = {"seed": 0, "data": DATA_DEFAULTS, "model": {}, "train": TRAIN_DEFAULTS}

#: keys that may differ when resuming a run (everything else must match the saved config.json)
RESUMABLE_CHANGES = {"train.max_steps", "train.progress", "train.tensorboard", "train.device", "data.data_dir",
                     "train.test_at_end", "train.data_on_device", "train.report"}

#: keys that do not change what a run computes (ignored when runs are grouped as seeds of one configuration)
NON_SEMANTIC_KEYS = {"train.device", "train.progress", "train.tensorboard", "train.data_on_device", "data.data_dir",
                     "data.download", "train.test_at_end", "train.checkpoint_every", "train.eval_batch_size",
                     "train.report"}


def flatten_config(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (empty tables stay as values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def semantic_key(config: dict) -> str:
    """A string equal for two configs iff they compute the same thing up to the seed (seeds of one
    configuration): the flattened config without ``seed`` and :data:`NON_SEMANTIC_KEYS`."""
    flat = {k: v for k, v in flatten_config(config).items() if k != "seed" and k not in NON_SEMANTIC_KEYS}
    return json.dumps(flat, sort_keys=True, default=str)


def _check_keys(section: str, given: dict, defaults: dict) -> None:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a {section} option. "
                          f"Valid {section} keys: {', '.join(sorted(defaults))}")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def resolve_config(config: dict) -> dict:
    """Validate ``config`` and return a new dict with every default filled in (raises :class:`ConfigError`)."""
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a table/dict, got {type(config).__name__}")
    _check_keys("top-level", config, DEFAULTS)
    for section in ("data", "model", "train"):
        if not isinstance(config.get(section, {}), dict):
            raise ConfigError(f"[{section}] must be a table, got {config[section]!r}")
    _check_keys("data", config.get("data", {}), DATA_DEFAULTS)
    _check_keys("train", config.get("train", {}), TRAIN_DEFAULTS)
    cfg = {
        "seed": config.get("seed", 0),
        "data": {**copy.deepcopy(DATA_DEFAULTS), **copy.deepcopy(config.get("data", {}))},
        "model": resolve_model_config(config.get("model", {})),
        "train": {**copy.deepcopy(TRAIN_DEFAULTS), **copy.deepcopy(config.get("train", {}))},
    }
    _require(_is_int(cfg["seed"]) and 0 <= cfg["seed"] < 2 ** 32,
             f"seed must be an integer in [0, 2**32) (numpy's seed range), got {cfg['seed']!r}")
    d, t = cfg["data"], cfg["train"]
    _require(isinstance(d["name"], str) and d["name"] != "", f"data.name must be a dataset name, got {d['name']!r}")
    try:
        from ..data import DATASETS
    except ImportError:  # pragma: no cover - data layer absent
        DATASETS = None
    if DATASETS is not None:
        _require(d["name"] in DATASETS or (d["name"].startswith("folder:") and len(d["name"]) > 7),
                 f"unknown data.name {d['name']!r}; valid: {', '.join(DATASETS)}, folder:PATH")
    _require(d["image_size"] is None or (_is_int(d["image_size"]) and d["image_size"] > 0),
             f"data.image_size must be a positive integer or absent, got {d['image_size']!r}")
    _require(_is_number(d["val_fraction"]) and 0 < d["val_fraction"] < 1,
             f"data.val_fraction must be in (0, 1), got {d['val_fraction']!r}")
    _require(_is_int(d["split_seed"]) and 0 <= d["split_seed"] < 2 ** 63,
             f"data.split_seed must be a non-negative integer, got {d['split_seed']!r}")
    _require(isinstance(d["download"], bool), "data.download must be true or false")
    for k in ("val_max_images", "test_max_images"):
        _require(d[k] is None or (_is_int(d[k]) and d[k] > 0), f"data.{k} must be a positive integer or absent")
    for k in ("batch_size", "max_steps", "eval_every", "eval_batch_size", "log_every", "checkpoint_every"):
        _require(_is_int(t[k]) and t[k] > 0, f"train.{k} must be a positive integer, got {t[k]!r}")
    _require(_is_number(t["lr"]) and 0 < t["lr"] <= 1,
             f"train.lr must be a number in (0, 1] (AdamW; the paper uses 1e-3), got {t['lr']!r}")
    _require(_is_number(t["weight_decay"]) and t["weight_decay"] >= 0,
             f"train.weight_decay must be a finite number >= 0, got {t['weight_decay']!r}")
    _require(_is_number(t["grad_clip"]) and t["grad_clip"] >= 0,
             f"train.grad_clip must be a finite number >= 0 (0 disables), got {t['grad_clip']!r}")
    betas = t["betas"]
    _require(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
             f"train.betas must be two numbers in [0, 1), got {betas!r}")
    t["betas"] = [float(b) for b in betas]
    t["lr"] = float(t["lr"])
    for k in ("bf16", "test_at_end", "progress", "tensorboard", "report"):
        _require(isinstance(t[k], bool), f"train.{k} must be true or false, got {t[k]!r}")
    _require(t["data_on_device"] in ("auto", True, False), "train.data_on_device must be auto, true or false")
    _require(isinstance(t["device"], str), f"train.device must be a string such as auto, cpu or cuda, got {t['device']!r}")
    _require(t["device"].split(":")[0] != "meta",
             "train.device = \"meta\" holds no data and cannot train; use \"auto\", \"cpu\" or \"cuda\"")
    return cfg


# -- files and overrides ---------------------------------------------------------------------------
def bundled_configs() -> list[str]:
    """Names of the configs shipped in ``kohonen_vae/configs`` (without ``.toml``)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.toml"))


def load_config_file(name_or_path) -> dict:
    """Read a TOML or JSON config from a path, or a bundled config by name (``cifar10-ksom-hard``)."""
    path = Path(name_or_path)
    if not path.is_file():
        bundled = BUNDLED_DIR / f"{name_or_path}.toml"
        if bundled.is_file():
            path = bundled
        elif (BUNDLED_DIR / str(name_or_path)).is_file():
            path = BUNDLED_DIR / str(name_or_path)
        else:
            raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a bundled config; "
                              f"bundled configs: {', '.join(bundled_configs())}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"cannot read the config {path}: {e.strerror or e}") from e
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if tomllib is None:
        raise ConfigError("reading TOML configs needs Python >= 3.11 or the tomli package (pip install tomli)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def parse_value(text: str):
    """``--set`` value parsing: ints, floats, true/false, null, JSON lists and objects; anything else is a string
    (``none`` stays the string "none", a valid neighbourhood name)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip().startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            kind = "list" if text.strip().startswith("[") else "table"
            raise ConfigError(f"cannot parse {kind} value {text!r} (JSON expected): {e}") from e
    return text


def expand_key(key: str) -> list[str]:
    """Dotted key -> path, with two shorthands: ``quantizer.X`` means ``model.quantizer.X`` and a bare
    option name of [train], [data] or [model] (``lr``, ``max_steps``, ``arch``) means that section's key."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set: malformed key {key!r}")
    if parts[0] == "quantizer":
        return ["model"] + parts
    if len(parts) == 1 and parts[0] not in DEFAULTS:
        owners = [s for s, keys in (("train", TRAIN_DEFAULTS), ("data", DATA_DEFAULTS), ("model", MODEL_DEFAULTS))
                  if parts[0] in keys]
        if len(owners) == 1:
            return owners + parts
    return parts


def apply_overrides(config: dict, assignments) -> dict:
    """Return a copy of ``config`` with ``["train.lr=3e-4", "model.quantizer.neighborhood=hard", ...]``
    applied (dotted paths create missing tables; key validity is checked by :func:`resolve_config`).
    An empty value (``quantizer.neighborhood=``) removes the key, i.e. restores its default."""
    cfg = copy.deepcopy(config)
    for item in assignments or ():
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.lr=3e-4), got {item!r}")
        key, value = item.split("=", 1)
        parts = expand_key(key.strip())
        node = cfg
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is a value, not a table")
            node = nxt
        if value == "":
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = parse_value(value)
    return cfg


def resolve_saved_config(saved: dict) -> dict:
    """A config saved by a run (possibly of an earlier version), resolved with today's defaults: options added
    since then take their defaults, so that they do not count as changes when the run is resumed. A config
    that no longer resolves (an option that was removed) is returned as it is (its keys then show up as
    changes, and the resume is refused with their names)."""
    try:
        return resolve_config(saved)
    except ConfigError:
        return saved


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    a, b = flatten_config(old), flatten_config(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
