"""Training: plain-data configs, the paper's protocol (AdamW, clipping, frozen-codebook validation),
deterministic resumable batches, atomic checkpoints, data parallelism under torchrun."""
from .checkpoint import (atomic_write, atomic_write_json, load_checkpoint, load_model, read_metrics, save_checkpoint)
from .config import (BUNDLED_DIR, DATA_DEFAULTS, TRAIN_DEFAULTS, apply_overrides, bundled_configs, load_config_file,
                     parse_value, resolve_config)
from .loop import END_OF_TRAINING_HOOKS, ResumeError, convergence_steps, evaluate, train
from .sampler import ShardedBatchSampler
from ..models.factory import ConfigError

__all__ = [
    "train", "evaluate", "convergence_steps", "resolve_config", "load_config_file", "apply_overrides", "parse_value",
    "bundled_configs", "ShardedBatchSampler", "save_checkpoint", "load_checkpoint", "load_model", "read_metrics",
    "atomic_write", "atomic_write_json", "ConfigError", "ResumeError", "END_OF_TRAINING_HOOKS", "TRAIN_DEFAULTS",
    "DATA_DEFAULTS", "BUNDLED_DIR",
]
