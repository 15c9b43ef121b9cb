"""Models and quantisers from plain configuration (nested dicts, as read from TOML/JSON).

``resolve_model_config(config)`` validates a model config and fills in every default, so the resolved
dict written to a run's ``config.json`` rebuilds exactly the same model with ``build_model``.

Model config keys (defaults are the paper's)::

    arch = "vqvae" | "vqvae2"       in_channels = 3     channels = 128     res_channels = 32
    num_res_blocks = 2              embed_dim = 64 (the code vector size D)
    [quantizer]  type = "ksom" | "ema" | "gradient" | "gdsom", codebook_size = 512, and the keyword
                 arguments of that quantiser class (e.g. neighborhood, shrink, sigma, decay, count_init).

Every level of a VQ-VAE-2 gets its own quantiser (codebook, grid, step counter) from the same config.
"""
from __future__ import annotations

import copy
import inspect
import json
import math

from ..errors import ConfigError
from ..quantizers import QUANTIZERS, KohonenQuantizer
from .vqvae import VQVAE, VQVAE2


ARCHITECTURES = {"vqvae": VQVAE, "vqvae2": VQVAE2}

MODEL_DEFAULTS = {
    "arch": "vqvae",
    "in_channels": 3,
    "channels": 128,
    "res_channels": 32,
    "num_res_blocks": 2,
    "embed_dim": 64,
}

#: arguments the model sets itself (not user options)
_MODEL_SET = {"self", "dim", "accept_image_fmap"}
#: EMAQuantizer forwards **kwargs to KohonenQuantizer; these are the ones that make sense without a neighbourhood
_EMA_EXTRA = ("grid_shape", "grid_dims", "periodic", "topology", "update_in_forward")
#: GradientQuantizer/GDSOMQuantizer forward **grid_kwargs to the grid
_GRID_EXTRA = ("periodic", "topology")
#: options that only exist with a neighbourhood, for a helpful message on the ema/gradient types
_NEIGHBOURHOOD_ONLY = ("neighborhood", "shrink", "sigma", "schedule", "schedule_kwargs", "smoothing")


def _signature_defaults(fn) -> dict:
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in _MODEL_SET or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = None if p.default is inspect.Parameter.empty else p.default
    return out


def quantizer_options(qtype: str) -> dict:
    """``{option: default}`` accepted in the ``[quantizer]`` table for quantiser ``qtype``."""
    if qtype not in QUANTIZERS:
        raise ConfigError(f"unknown quantizer.type {qtype!r}; choose one of {sorted(QUANTIZERS)}")
    cls = QUANTIZERS[qtype]
    opts = _signature_defaults(cls.__init__)
    extra = _EMA_EXTRA if qtype == "ema" else _GRID_EXTRA if qtype in ("gradient", "gdsom") else ()
    ksom = _signature_defaults(KohonenQuantizer.__init__)
    for name in extra:
        opts.setdefault(name, ksom[name])
    opts["codebook_size"] = 512
    return opts


def _json_safe(value):
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    return value


def resolve_quantizer_config(config: dict) -> dict:
    """Validate a ``[quantizer]`` table and fill in the defaults of its class; raises :class:`ConfigError`."""
    if not isinstance(config, dict):
        raise ConfigError(f"quantizer must be a table/dict, got {type(config).__name__}")
    cfg = dict(config)
    qtype = cfg.pop("type", "ksom")
    opts = quantizer_options(qtype)
    unknown = sorted(set(cfg) - set(opts))
    if unknown:
        hint = ""
        if set(unknown) & set(_NEIGHBOURHOOD_ONLY):
            hint = (f" ({', '.join(sorted(set(unknown) & set(_NEIGHBOURHOOD_ONLY)))} needs a neighbourhood: "
                    f"use type = \"ksom\" (or \"gdsom\"); EMA-VQ is ksom with neighborhood = \"none\")")
        raise ConfigError(f"quantizer.{unknown[0]} is not an option of the {qtype!r} quantizer{hint}. "
                          f"Valid quantizer keys: {', '.join(['type'] + sorted(opts))}")
    resolved = {"type": qtype}
    for name, default in opts.items():
        resolved[name] = _json_safe(cfg.get(name, default))
    shape = resolved.get("grid_shape")
    if shape is not None:
        if not (isinstance(shape, list) and shape and all(_is_positive_int(s) for s in shape)):
            raise ConfigError(f"quantizer.grid_shape must be a list of positive integers such as [32, 16], got {shape!r}")
        resolved["grid_shape"] = [int(s) for s in shape]
    for name, value in resolved.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"quantizer.{name} must be a finite number, got {value!r}")
    return resolved


def _is_positive_int(v) -> bool:
    """An int (or an integral float such as 8.0 from JSON) >= 1; not a bool."""
    if isinstance(v, bool):
        return False
    return (isinstance(v, int) and v >= 1) or (isinstance(v, float) and v.is_integer() and v >= 1)


def resolve_model_config(config: dict) -> dict:
    """Validate a model config and fill in all defaults (quantiser included); raises :class:`ConfigError`."""
    if not isinstance(config, dict):
        raise ConfigError(f"model config must be a table/dict, got {type(config).__name__}")
    cfg = dict(config)
    unknown = sorted(set(cfg) - set(MODEL_DEFAULTS) - {"quantizer"})
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a model option. "
                          f"Valid model keys: {', '.join(sorted(list(MODEL_DEFAULTS) + ['quantizer']))}")
    resolved = {k: cfg.get(k, v) for k, v in MODEL_DEFAULTS.items()}
    if resolved["arch"] not in ARCHITECTURES:
        raise ConfigError(f"unknown model.arch {resolved['arch']!r}; choose one of {sorted(ARCHITECTURES)}")
    for k in ("in_channels", "channels", "res_channels", "num_res_blocks", "embed_dim"):
        v = resolved[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "num_res_blocks" else 1):
            raise ConfigError(f"model.{k} must be a positive integer, got {v!r}")
    if resolved["channels"] % 2:
        raise ConfigError(f"model.channels must be even (the first conv has channels/2 outputs), got {resolved['channels']}")
    resolved["quantizer"] = resolve_quantizer_config(cfg.get("quantizer", {}))
    _check_quantizer_builds(resolved["quantizer"], resolved["embed_dim"])
    return resolved


def _check_quantizer_builds(qcfg: dict, dim: int) -> None:
    """Build the quantiser once, so that every value its constructor rejects (a decay outside [0, 1), a
    grid that does not hold K codes ...) fails when the config is resolved, before any data is decoded.
    Memoised: configs are resolved several times per run."""
    key = json.dumps([qcfg, dim], sort_keys=True, default=str)
    if key not in _BUILD_CHECKED:
        build_quantizer(qcfg, dim)
        if len(_BUILD_CHECKED) > 256:
            _BUILD_CHECKED.clear()
        _BUILD_CHECKED.add(key)


_BUILD_CHECKED: set = set()


def build_quantizer(config: dict, dim: int):
    """One quantiser for ``dim``-channel feature maps ``(B, dim, H, W)`` from a ``[quantizer]`` table."""
    cfg = resolve_quantizer_config(config)
    cls = QUANTIZERS[cfg.pop("type")]
    if cfg.get("grid_shape") is not None:
        cfg["grid_shape"] = tuple(cfg["grid_shape"])
    try:
        return cls(dim=dim, accept_image_fmap=True, **cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid quantizer option: {e}") from e


def build_model(config: dict):
    """``VQVAE`` or ``VQVAE2`` from a model config, e.g.
    ``{"arch": "vqvae", "quantizer": {"type": "ksom", "neighborhood": "hard"}}``.

    The resolved config is kept as ``model.config`` (plain data, JSON-serialisable).
    """
    cfg = resolve_model_config(config)
    qcfg = copy.deepcopy(cfg["quantizer"])
    model = ARCHITECTURES[cfg["arch"]](
        lambda dim: build_quantizer(qcfg, dim),
        in_channels=cfg["in_channels"], channels=cfg["channels"], res_channels=cfg["res_channels"],
        num_res_blocks=cfg["num_res_blocks"], embed_dim=cfg["embed_dim"],
    )
    model.config = cfg
    return model


def check_image_size(config: dict, image_size: int, in_channels: int | None = None) -> None:
    """Raise :class:`ConfigError` if the architecture cannot run on ``image_size`` x ``image_size`` images
    (VQ-VAE: sides divisible by 4; VQ-VAE-2: at least 64 and divisible by 8) or the channel count differs."""
    cfg = resolve_model_config(config)
    cls = ARCHITECTURES[cfg["arch"]]
    big = max(cls.strides)
    if image_size < cls.min_image_size or image_size % big:
        raise ConfigError(
            f"model.arch = {cfg['arch']!r} needs images of at least {cls.min_image_size}x{cls.min_image_size} "
            f"with sides divisible by {big}; the dataset has {image_size}x{image_size}. "
            + ("Use arch = \"vqvae\" for 32x32 data (CIFAR-10), or set data.image_size = 64."
               if cfg["arch"] == "vqvae2" else "Set data.image_size to a multiple of 4.")
        )
    if in_channels is not None and in_channels != cfg["in_channels"]:
        raise ConfigError(f"model.in_channels = {cfg['in_channels']} but the dataset images have {in_channels} "
                          f"channels; set model.in_channels = {in_channels}")
