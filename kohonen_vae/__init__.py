"""kohonen-vae: self-organising discrete representation learning (KSOM vector quantisation) in PyTorch.

Layout: geometry (grids) -> neighborhood (kernels, schedules) -> smoothing (P_t as a grid convolution)
-> quantizers -> models -> training -> metrics/figures/report -> cli.
"""
from .geometry import Grid, auto_grid_shape
from .neighborhood import (ExponentialNeighborhood, ExponentialSchedule, GaussianNeighborhood, HardNeighborhood,
                           HarmonicSchedule, Neighborhood, NoNeighborhood, make_neighborhood)
from .errors import GeometryMismatchError, NonFiniteInputError
from .quantizers import (EMAQuantizer, GDSOMQuantizer, GradientQuantizer, KohonenQuantizer, QuantizerOutput,
                         VQPQuantizer, apply_pending_updates)
from .smoothing import GridSmoother
from .som import KohonenMap
from .export import export_run, load_pretrained
from .tokens import decode_tokens, encode_dataset, load_tokens

__version__ = "0.1.0"

__all__ = [
    "Grid", "auto_grid_shape", "Neighborhood", "NoNeighborhood", "HardNeighborhood", "ExponentialNeighborhood",
    "GaussianNeighborhood", "HarmonicSchedule", "ExponentialSchedule", "make_neighborhood", "GridSmoother",
    "KohonenQuantizer", "EMAQuantizer", "GradientQuantizer", "GDSOMQuantizer", "QuantizerOutput",
    "NonFiniteInputError", "GeometryMismatchError", "VQPQuantizer", "apply_pending_updates", "export_run", "load_pretrained", "encode_dataset",
    "decode_tokens", "load_tokens", "KohonenMap", "__version__",
]
