"""Training: plain-data configs, the paper's protocol (AdamW, clipping, frozen-codebook validation),
deterministic resumable batches, checksummed atomic checkpoints, guarded run directories, data
parallelism under torchrun."""
from ..errors import CheckpointError, ConfigError, ResumeError
from .checkpoint import (CheckpointInfo, atomic_write, atomic_write_json, load_checkpoint, load_model, read_metrics,
                         save_checkpoint)
from .config import (BUNDLED_DIR, DATA_DEFAULTS, TRAIN_DEFAULTS, apply_overrides, bundled_configs, load_config_file,
                     parse_value, resolve_config)
from .loop import TrainingInterrupted, convergence_steps, evaluate, train
from .rundir import RunLockedError
from .sampler import ShardedBatchSampler

__all__ = [
    "train", "evaluate", "convergence_steps", "resolve_config", "load_config_file", "apply_overrides", "parse_value",
    "bundled_configs", "ShardedBatchSampler", "save_checkpoint", "load_checkpoint", "load_model", "read_metrics",
    "atomic_write", "atomic_write_json", "CheckpointInfo", "ConfigError", "ResumeError", "CheckpointError",
    "RunLockedError", "TrainingInterrupted", "TRAIN_DEFAULTS", "DATA_DEFAULTS", "BUNDLED_DIR",
]
