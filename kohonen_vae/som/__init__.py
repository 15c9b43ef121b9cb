"""A stand-alone self-organising map on the library's engine: :class:`KohonenMap` (Kohonen's batch map with
scikit-learn conventions), its figures and HTML page, and the ``kohonen-vae som`` command."""
from .estimator import KohonenMap, NotFittedError, WidthSchedule, as_data_matrix, initial_codebook, pca_codebook

__all__ = ["KohonenMap", "NotFittedError", "WidthSchedule", "as_data_matrix", "initial_codebook", "pca_codebook"]
