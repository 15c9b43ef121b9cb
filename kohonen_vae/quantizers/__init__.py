"""Quantisers: KSOM (:class:`KohonenQuantizer`), EMA-VQ (:class:`EMAQuantizer`), the original VQ-VAE
(:class:`GradientQuantizer`) and the gradient-descent SOM baseline (:class:`GDSOMQuantizer`)."""
from torch import nn

from .base import NonFiniteInputError, QuantizerOutput, VectorQuantizerBase, nearest_codes, perplexity_from_counts
from .gradient import GDSOMQuantizer, GradientQuantizer
from .kohonen import EMAQuantizer, KohonenQuantizer, batch_statistics

QUANTIZERS = {
    "ksom": KohonenQuantizer,
    "ema": EMAQuantizer,
    "gradient": GradientQuantizer,
    "gdsom": GDSOMQuantizer,
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
    "KohonenQuantizer", "EMAQuantizer", "GradientQuantizer", "GDSOMQuantizer", "QuantizerOutput",
    "VectorQuantizerBase", "NonFiniteInputError", "nearest_codes", "perplexity_from_counts",
    "batch_statistics", "apply_pending_updates", "QUANTIZERS",
]
