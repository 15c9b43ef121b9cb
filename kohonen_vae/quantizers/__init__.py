"""Quantisers: KSOM (:class:`KohonenQuantizer`), EMA-VQ (:class:`EMAQuantizer`), the original VQ-VAE
(:class:`GradientQuantizer`), the gradient-descent SOM baseline (:class:`GDSOMQuantizer`) and
vector-quantize-pytorch's quantisers behind the same interface (:class:`VQPQuantizer`, optional extra)."""
from torch import nn

from .base import (COMPILE_TRAINING_REASON, GeometryMismatchError, NonFiniteInputError, QuantizerOutput,
                   VectorQuantizerBase, batch_statistics, nearest_codes, perplexity_from_counts)
from .collapse import CODEBOOK_INITS, initial_codebook
from .gradient import GDSOMQuantizer, GradientQuantizer
from .kohonen import EMAQuantizer, KohonenQuantizer
from .vqp import VQP_CLASSES, VQPQuantizer

QUANTIZERS = {
    "ksom": KohonenQuantizer,
    "ema": EMAQuantizer,
    "gradient": GradientQuantizer,
    "gdsom": GDSOMQuantizer,
    "vqp": VQPQuantizer,
}


def apply_pending_updates(module: nn.Module) -> int:
    """Call :meth:`KohonenQuantizer.apply_update` on every quantiser in ``module`` built with
    ``update_in_forward=False``; returns how many were updated. Call once per optimiser step."""
    n = 0
    for m in module.modules():
        if isinstance(m, KohonenQuantizer) and not m.update_in_forward:
            m.apply_update()
            n += 1
    return n


__all__ = [
    "KohonenQuantizer", "EMAQuantizer", "GradientQuantizer", "GDSOMQuantizer", "VQPQuantizer", "QuantizerOutput",
    "VectorQuantizerBase", "NonFiniteInputError", "GeometryMismatchError", "nearest_codes", "perplexity_from_counts",
    "batch_statistics", "apply_pending_updates", "QUANTIZERS", "VQP_CLASSES", "CODEBOOK_INITS", "initial_codebook",
    "COMPILE_TRAINING_REASON",
]
