"""``KohonenMap``: a stand-alone self-organising map (Kohonen's batch map) with scikit-learn conventions.

Each update assigns rows ``x_j`` to their best-matching unit ``c(j) = argmin_k ||x_j - w_k||``
(:func:`~kohonen_vae.quantizers.base.nearest_codes`, the quantisers' winner search), keeps
per-unit counts ``n_k`` and sums ``S_k = sum_{c(j)=k} x_j``, smooths them over the grid with the
neighbourhood matrix ``P_t[k, l] = h_t(d(k, l))`` (:class:`~kohonen_vae.smoothing.GridSmoother`, the same
convolution engine as the quantisers) and sets::

    w_k <- (P_t S)_k / (P_t n)_k  =  sum_j h_t(d(k, c(j))) x_j / sum_j h_t(d(k, c(j)))      (Kohonen's batch map)

A unit whose smoothed count ``(P_t n)_k`` is zero (no data within the kernel's reach: below the truncation
cutoff 1e-7) keeps its weights: the formula is 0/0 there.

**Updates within an epoch.** ``fit`` makes ``updates_per_epoch`` updates per pass over the data (default
4; 1 is the classical batch map). Each update searches the winners of one shuffled slice of the rows and
moves just those rows in ``n`` and ``S`` from their previous winner to the new one, so that ``n`` and ``S``
always count *every* row seen, each at its latest winner (at most one epoch old): the map moves several
times per epoch at the cost of one winner search per row, and without the noise of a mini-batch's
statistics (a batch map on independent slices of 1/16 of the data raised the topographic error 3-4x).

**Width.** ``sigma(t) = sigma0 s(p)`` with ``p = epoch / epochs`` (:class:`WidthSchedule`): constant within
an epoch, shrinking from ``sigma0`` (default half the map's larger side) towards the floor
``sigma_final`` (default 1, never zero, so that the map keeps its order), which it reaches when training
goes on past the planned epochs. The default ``"inverse"`` decay is MiniSom's ``inverse_decay_to_one``.
"""
from __future__ import annotations

import inspect
import math
import time

import numpy as np
import torch

from ..geometry import Grid
from ..metrics import code_usage, codebook_smoothness, quantization_errors, topographic_product, umatrix
from ..errors import ConfigError
from ..neighborhood import make_neighborhood
from ..quantizers.base import nearest_codes
from ..smoothing import METHODS, GridSmoother

#: the kernels a stand-alone map accepts (both have a width ``sigma``)
NEIGHBORHOODS = ("gaussian", "exponential")
#: how the width goes from sigma to sigma_final over the planned epochs (the first is the default)
DECAYS = ("inverse", "geometric", "linear")
INITS = ("pca", "random", "sample")
WINNER_SEARCHES = ("exact", "local")
#: half-width R of the window of the local winner search: the (2R + 1)^d units around the previous winner
LOCAL_SEARCH_RADIUS = 2
#: below this many units the local search is not used (the exact search of a small map is one small GEMM,
#: cheaper than gathering the windows)
LOCAL_SEARCH_MIN_UNITS = 1024
#: rows handled at once inside one update (bounds the (rows, D) temporaries; 64 MiB of float32 at D = 64)
CHUNK_ELEMENTS = 1 << 24
#: the FFT smoothing (chosen automatically only for hexagonal grids or the exponential kernel at large radii)
#: computes in float32 with an absolute error of about 3e-7 x the largest smoothed count (measured); a unit
#: whose smoothed count is below this share of the largest one keeps its weights rather than taking a
#: ratio of rounding noise
FFT_RELATIVE_FLOOR = 1e-4


#: updates per epoch of ``fit`` by default (see the module docstring; measured in docs/som.md)
UPDATES_PER_EPOCH = 4


class NotFittedError(ConfigError, AttributeError):
    """A :class:`KohonenMap` method that needs a fitted map was called before ``fit`` / ``partial_fit``."""


# ------------------------------------------------------------------------------------------------ schedule
class WidthSchedule:
    """Factor ``s`` of the initial width at update ``t``, when ``fit`` plans ``epochs`` passes of
    ``updates_per_epoch`` updates each; ``r = sigma_final / sigma0`` and ``p = min(floor(t / m) / E, 1)``
    (``m`` updates per epoch, ``E`` epochs)::

        inverse    s = 1 / (1 + (1 / r - 1) p)  (MiniSom's inverse_decay_to_one; the default)
        geometric  s = r ** p                   (equal numbers of epochs per halving of the width)
        linear     s = 1 + (r - 1) p            (MiniSom's linear_decay_to_one)

    The width changes once per epoch, as in a batch map with one update per epoch (MiniSom's
    ``train_batch_offline`` evaluates its decay at ``t / max_iter``, t = 0 .. max_iter - 1): the last planned
    epoch has ``p = (E - 1) / E`` (a 50x50 map, sigma0 = 25, inverse: 25, 4.3, 2.4, 1.6, 1.24 over 5 epochs;
    1.04 in the last of 20), and updates past the plan (``partial_fit`` after ``fit``) use the floor ``r``.
    ``s`` never goes below ``r``.
    """

    def __init__(self, kind: str, epochs: int, final_ratio: float, updates_per_epoch: int = 1):
        if kind not in DECAYS:
            raise ConfigError(f"decay={kind!r} is not a width schedule; choose one of {DECAYS}")
        if not 0 < final_ratio <= 1:
            raise ConfigError(f"sigma_final / sigma must be in (0, 1], got {final_ratio}")
        self.kind = kind
        self.epochs = max(int(epochs), 1)
        self.updates_per_epoch = max(int(updates_per_epoch), 1)
        self.final_ratio = float(final_ratio)

    @property
    def total_updates(self) -> int:
        return self.epochs * self.updates_per_epoch

    def progress(self, step: float) -> float:
        """``p = min(floor(t / m) / E, 1)`` (0 for t < 0)."""
        epoch = math.floor(max(float(step), 0.0) / self.updates_per_epoch)
        return min(epoch / self.epochs, 1.0)

    def __call__(self, step: float) -> float:
        p, r = self.progress(step), self.final_ratio
        if self.kind == "geometric":
            return r ** p
        if self.kind == "linear":
            return 1.0 + (r - 1.0) * p
        return 1.0 / (1.0 + (1.0 / r - 1.0) * p)

    def __repr__(self) -> str:
        return (f"WidthSchedule({self.kind!r}, epochs={self.epochs}, final_ratio={self.final_ratio}, "
                f"updates_per_epoch={self.updates_per_epoch})")


# ------------------------------------------------------------------------------------------------ input
def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def as_data_matrix(X, what: str = "X", n_features: int | None = None, device=None) -> torch.Tensor:
    """``X`` (numpy, torch or nested lists) as a finite float32 ``(N, D)`` tensor on ``device`` (default: its own).

    Raises :class:`ConfigError` naming the problem and the fix for a non-numeric, non-2-D or empty array,
    a wrong number of features, and rows holding NaN or +-Inf (or values beyond the float32 range).
    """
    if _is_tensor(X):
        t = X.detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise ConfigError(f"{what} must hold real numbers, got a {t.dtype} tensor: convert it with .float()")
    else:
        try:
            arr = np.asarray(X)
        except Exception as e:  # noqa: BLE001 - ragged lists etc.: report as a user error
            raise ConfigError(f"{what} cannot be read as a numeric array ({e}); pass a 2-D numpy array or tensor "
                              "of shape (n_samples, n_features)") from e
        if arr.dtype.kind not in "fiu":
            raise ConfigError(f"{what} must hold real numbers, got dtype {arr.dtype}: convert it, e.g. "
                              "np.asarray(X, dtype=np.float32) (text columns must be encoded first)")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() != 2:
        if t.dim() == 1:
            raise ConfigError(f"{what} must be 2-D (n_samples, n_features), got a 1-D array of shape "
                              f"{tuple(t.shape)}: use X.reshape(-1, 1) for one feature or X.reshape(1, -1) "
                              "for one sample")
        raise ConfigError(f"{what} must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}: flatten "
                          "each sample, e.g. X.reshape(len(X), -1)")
    if t.shape[0] == 0:
        raise ConfigError(f"{what} is empty (0 rows, shape {tuple(t.shape)}): pass at least one sample")
    if t.shape[1] == 0:
        raise ConfigError(f"{what} has no features (shape {tuple(t.shape)}): pass at least one column")
    if n_features is not None and t.shape[1] != n_features:
        raise ConfigError(f"{what} has {t.shape[1]} features but this KohonenMap was fitted with {n_features}: "
                          "pass data with the same columns, in the same order, as in fit")
    t = t.to(device=device if device is not None else t.device, dtype=torch.float32)
    finite = torch.isfinite(t).all(1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        rows = ", ".join(str(int(i)) for i in bad[:5]) + (", ..." if bad.numel() > 5 else "")
        raise ConfigError(f"{what} has {bad.numel()} row(s) with NaN or +-Inf (or values beyond the float32 range "
                          f"+-3.4e38), e.g. row(s) {rows}: drop or impute them first, e.g. "
                          "X = X[np.isfinite(X).all(axis=1)]")
    return t


def _output_like(X, values: torch.Tensor):
    """Results for input ``X``: a tensor on X's device for tensor input, numpy otherwise."""
    if _is_tensor(X):
        return values.to(X.device)
    return values.cpu().numpy()


def _parse_grid_shape(grid_shape) -> tuple[int, ...]:
    if isinstance(grid_shape, str):
        parts = grid_shape.lower().split("x")
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"grid_shape {grid_shape!r} is not of the form '20x20'") from None
    if isinstance(grid_shape, (int, np.integer)):
        return (int(grid_shape),)
    try:
        shape = tuple(int(s) for s in grid_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"grid_shape must be a tuple of positive integers such as (20, 20), got {grid_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"grid_shape must be a non-empty tuple of positive integers such as (20, 20), got {grid_shape!r}")
    return shape


# ------------------------------------------------------------------------------------------ initialisation
def pca_codebook(X: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Units on the plane (hyperplane for 3-D maps) of the leading principal components, as in Kohonen's
    batch-map practice: ``w_k = mean + sum_i a_i(k) sqrt(lambda_i) v_i``, where grid axis i (the longest
    axis first) is paired with the i-th principal component ``(lambda_i, v_i)`` of the data covariance and
    ``a_i(k)`` runs linearly from -1 to 1 along that axis (0 on an axis of size 1). The map so spans one
    standard deviation each way along the leading components. Eigenvector signs are fixed (largest entry
    positive) so that the result is deterministic. Computed in float64; returns float32 ``(K, D)``."""
    x = X.double()
    mean = x.mean(0)
    n, d = x.shape
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    rows = max(1, CHUNK_ELEMENTS // max(d, 1))
    for s in range(0, n, rows):
        xc = x[s:s + rows] - mean
        cov.addmm_(xc.t(), xc)
    cov /= max(n - 1, 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigvals, descending=True)
    eigvals, eigvecs = eigvals[order].clamp(min=0), eigvecs[:, order]
    signs = torch.sign(eigvecs.gather(0, eigvecs.abs().argmax(0, keepdim=True)))
    eigvecs = eigvecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    coords = grid.coords(x.device).double()
    w = mean.expand(grid.size, d).clone()
    axes = sorted(range(grid.ndim), key=lambda a: (-grid.shape[a], a))  # longest axis <-> first component
    for component, axis in enumerate(axes):
        if component >= d or grid.shape[axis] == 1:
            continue
        a = 2.0 * coords[:, axis] / (grid.shape[axis] - 1) - 1.0
        w += a[:, None] * (eigvals[component].sqrt() * eigvecs[:, component])[None, :]
    return w.float()


def initial_codebook(init, X: torch.Tensor, grid: Grid, generator: torch.Generator) -> torch.Tensor:
    """The starting codebook ``(K, D)`` float32 on X's device: ``"pca"`` (:func:`pca_codebook`), ``"random"``
    (uniform in the bounding box of the data, per feature), ``"sample"`` (K distinct rows of X, drawn with
    replacement only when X has fewer than K rows), or an explicit ``(K, D)`` array."""
    k, d = grid.size, X.shape[1]
    if isinstance(init, str):
        if init == "pca":
            return pca_codebook(X, grid)
        if init == "random":
            lo, hi = X.min(0).values, X.max(0).values
            u = torch.rand(k, d, generator=generator).to(X.device)
            return lo + u * (hi - lo)
        if init == "sample":
            n = X.shape[0]
            rows = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(0, n, (k,), generator=generator)
            return X[rows.to(X.device)].clone()
        raise ConfigError(f"init={init!r} is not an initialisation; choose one of {INITS} or pass a (K, D) array")
    w = as_data_matrix(init, "init", device=X.device)
    if tuple(w.shape) != (k, d):
        raise ConfigError(f"init array must have shape (K, D) = ({k}, {d}) for this grid and data, got {tuple(w.shape)}")
    return w.clone()


# ------------------------------------------------------------------------------------------------ estimator
class KohonenMap:
    """A self-organising map trained with Kohonen's batch map on the library's grid/kernel/smoothing engine.

    scikit-learn conventions: the constructor only stores its arguments; :meth:`fit` learns, and fitted
    attributes end with ``_``. ``sklearn.base.clone``, ``get_params`` / ``set_params`` and pipelines work
    without scikit-learn being needed here. Inputs are numpy arrays, torch tensors or nested lists of shape
    ``(n_samples, n_features)``; everything is computed in float32 on ``device``.

    Args:
        grid_shape: map shape, e.g. ``(20, 20)`` (any number of axes; the first varies fastest in the unit
            index, as everywhere in the library).
        neighborhood: ``"gaussian"`` ``exp(-d^2 / (2 sigma^2))`` (classical) or ``"exponential"``
            ``exp(-d / sigma)``.
        sigma: initial width; None = half the map's larger side (at least ``sigma_final``).
        sigma_final: the floor the width shrinks towards over the planned epochs (and uses after them).
        decay: how the width goes from ``sigma`` to ``sigma_final``, once per epoch: ``"inverse"``
            (default), ``"geometric"`` or ``"linear"`` (see :class:`WidthSchedule`).
        topology: ``"rectangular"`` or ``"hexagonal"`` (2-D).
        periodic: toroidal map.
        init: ``"pca"``, ``"random"``, ``"sample"`` or a ``(K, D)`` array (see :func:`initial_codebook`).
        epochs: passes over the data in :meth:`fit` (fit's own ``epochs=`` overrides it).
        batch_size: rows per update; None = ``ceil(N / updates_per_epoch)``. Given, it overrides
            ``updates_per_epoch`` (``ceil(N / batch_size)`` updates per epoch).
        updates_per_epoch: updates per pass over the data (default 4; 1 = the classical batch map, every
            row's winner searched, then one update). Each update searches the winners of a shuffled slice of
            the rows and moves them in the per-unit counts and sums, which always cover every row seen.
        winner_search: ``"exact"`` (every unit is compared with every row) or ``"local"``: from the second
            epoch of :meth:`fit` on, each row's winner is searched among the 5^d units around its previous
            winner and accepted if it lies in the window's inner 3^d units (then it beats all its grid
            neighbours); a row whose best lies on the window's edge gets the exact search. Kohonen's
            shortcut for ordered maps: far cheaper on large maps, but it keeps a row at a local minimum when a
            better unit lies elsewhere on the map (measured: 4-12 % of the winners of a 200x200 map differ
            from the exact ones, and its topographic error after 5 epochs was 2x that of the exact search).
            Maps of fewer than 1,024 units always search exactly, and so do ``predict`` and every metric.
        smoothing: how ``P_t`` is applied (:mod:`kohonen_vae.smoothing`); ``"auto"`` picks the fastest.
        device: where to compute; None = the input tensor's device, or torch's default device for numpy.
        seed: seeds the ``"random"``/``"sample"`` initialisations and the mini-batch order.
        progress: tqdm progress bar: True, False, or None (only when stderr is a terminal).

    Fitted attributes: ``codebook_`` ``(K, D)`` float32 tensor (unit k at grid coordinates
    ``grid_.index_to_coords(k)``), ``grid_``, ``n_features_in_``, ``n_updates_``, ``total_updates_`` and
    ``updates_per_epoch_`` (the horizon of the width schedule), ``sigma_`` (the width of the next update),
    ``history_`` (per update: epoch, width and the quantisation error of its rows before the update),
    ``device_``, ``neighborhood_``, ``smoother_``.

    Defaults, measured against MiniSom's batch map at equal epochs and equal PCA initialisation
    (docs/som.md, "Quality at equal epochs"): the width follows MiniSom's ``inverse_decay_to_one`` per
    epoch, and the 4 updates per epoch bring the map closer to each width's fixed point than one does. That
    gave both errors at or below MiniSom's (quantisation error 0.5-1 % lower, topographic error on average
    about 10 % lower on the 100,000 x 64 mixture at 5 epochs, lower on digits). A width that reaches the
    floor early and stays there (a two-phase schedule) gave a lower quantisation error but a higher
    topographic error at equal epochs; so did the old geometric schedule reaching the floor at the last
    update (2.6x MiniSom's TE at 5 epochs).
    """

    def __init__(self, grid_shape=(10, 10), neighborhood="gaussian", sigma=None, sigma_final=1.0,
                 decay="inverse", topology="rectangular", periodic=False, init="pca", epochs=20,
                 batch_size=None, updates_per_epoch=UPDATES_PER_EPOCH, winner_search="exact", smoothing="auto",
                 device=None, seed=None, progress=None):
        self.grid_shape = grid_shape
        self.neighborhood = neighborhood
        self.sigma = sigma
        self.sigma_final = sigma_final
        self.decay = decay
        self.topology = topology
        self.periodic = periodic
        self.init = init
        self.epochs = epochs
        self.batch_size = batch_size
        self.updates_per_epoch = updates_per_epoch
        self.winner_search = winner_search
        self.smoothing = smoothing
        self.device = device
        self.seed = seed
        self.progress = progress

    # -- parameters (scikit-learn protocol) ----------------------------------------------------------
    @classmethod
    def _get_param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor arguments as stored (the same objects), by name."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> "KohonenMap":
        """Set constructor arguments by name (validated at the next ``fit``); returns self."""
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for KohonenMap; valid parameters: {valid}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        shown = []
        for name in self._get_param_names():
            value = getattr(self, name)
            default = defaults[name]
            same = value is default or (not isinstance(value, (np.ndarray, torch.Tensor)) and
                                        not isinstance(default, (np.ndarray, torch.Tensor)) and value == default)
            if name == "grid_shape" or not same:
                shown.append(f"{name}={'<array>' if isinstance(value, (np.ndarray, torch.Tensor)) else repr(value)}")
        return f"KohonenMap({', '.join(shown)})"

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "codebook_")

    def __sklearn_tags__(self):
        """scikit-learn (>= 1.6) estimator tags, for pipelines and meta-estimators: an unsupervised
        clusterer and transformer of dense 2-D float input. Only scikit-learn calls this, so importing it
        here adds no dependency."""
        from sklearn.utils import Tags, TargetTags, TransformerTags

        return Tags(estimator_type="clusterer", target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=[]), non_deterministic=self.seed is None)

    # -- validation ------------------------------------------------------------------------------------
    def _grid(self) -> Grid:
        shape = _parse_grid_shape(self.grid_shape)
        if self.topology not in ("rectangular", "hexagonal"):
            raise ConfigError(f"topology={self.topology!r}; choose 'rectangular' or 'hexagonal'")
        if self.topology == "hexagonal" and len(shape) != 2:
            raise ConfigError(f"a hexagonal map must be 2-D, got grid_shape={shape}")
        return Grid(shape, periodic=bool(self.periodic), topology=self.topology)

    def _widths(self, grid: Grid) -> tuple[float, float]:
        final = self.sigma_final
        if not (isinstance(final, (int, float)) and math.isfinite(final) and final > 0):
            raise ConfigError(f"sigma_final must be a positive number (the width's floor), got {final!r}")
        sigma = self.sigma
        if sigma is None:
            sigma = max(max(grid.shape) / 2.0, float(final))
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"sigma must be a positive number or None (half the map's larger side), got {sigma!r}")
        if final > sigma:
            raise ConfigError(f"sigma_final ({final}) is larger than sigma ({sigma}); the width only shrinks: "
                              "lower sigma_final or raise sigma")
        return float(sigma), float(final)

    def _check_settings(self) -> None:
        if self.neighborhood not in NEIGHBORHOODS:
            raise ConfigError(f"neighborhood={self.neighborhood!r}; choose one of {NEIGHBORHOODS}")
        if self.decay not in DECAYS:
            raise ConfigError(f"decay={self.decay!r}; choose one of {DECAYS}")
        if self.smoothing not in METHODS:
            raise ConfigError(f"smoothing={self.smoothing!r}; choose one of {METHODS}")
        if self.smoothing == "separable" and not (self.neighborhood == "gaussian" and self.topology == "rectangular"):
            raise ConfigError("smoothing='separable' needs the gaussian kernel on a rectangular grid; use 'auto'")
        if self.winner_search not in WINNER_SEARCHES:
            raise ConfigError(f"winner_search={self.winner_search!r}; choose one of {WINNER_SEARCHES}")
        if isinstance(self.init, str) and self.init not in INITS:
            raise ConfigError(f"init={self.init!r}; choose one of {INITS} or pass a (K, D) array")

    @staticmethod
    def _positive_int(value, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        return int(value)

    def _resolve_device(self, X) -> torch.device:
        if self.device is not None:
            try:
                return torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError(f"device={self.device!r} is not a torch device ({e}); use e.g. 'cpu' or 'cuda'") from e
        if _is_tensor(X):
            return X.device
        return torch.get_default_device()

    def _check_fitted(self) -> None:
        if not hasattr(self, "codebook_"):
            raise NotFittedError("this KohonenMap is not fitted yet: call fit(X) (or partial_fit(X)) before using it")

    # -- training ----------------------------------------------------------------------------------------
    def _build(self, epochs: int, updates_per_epoch: int, n_features: int, device: torch.device) -> None:
        """Validate the settings and build grid, kernel (with the schedule's horizon: ``epochs`` of
        ``updates_per_epoch`` updates) and smoother."""
        self._check_settings()
        grid = self._grid()
        sigma, final = self._widths(grid)
        schedule = WidthSchedule(self.decay, epochs, final / sigma, updates_per_epoch)
        neighborhood = make_neighborhood(self.neighborhood, sigma=sigma, schedule=schedule)
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(self.seed))
        self.grid_ = grid
        self.neighborhood_ = neighborhood
        self.smoother_ = GridSmoother(grid, neighborhood, method=self.smoothing)
        self.total_updates_ = schedule.total_updates
        self.updates_per_epoch_ = schedule.updates_per_epoch
        self.n_updates_ = 0
        self.n_features_in_ = int(n_features)
        self.device_ = torch.device(device)
        self.history_ = []
        self._generator = generator
        self._search_cache = (None,)

    def _start(self, X: torch.Tensor, epochs: int, updates_per_epoch: int) -> None:
        """:meth:`_build`, then the initial codebook from ``X``."""
        self._build(epochs, updates_per_epoch, X.shape[1], X.device)
        self.codebook_ = initial_codebook(self.init, X, self.grid_, self._generator)

    @property
    def sigma_(self) -> float:
        """Width of the kernel at the next update (``sigma0 s(n_updates_)``)."""
        self._check_fitted()
        return float(self.neighborhood_.width(self.n_updates_))

    def _statistics(self) -> torch.Tensor:
        """Zero per-unit statistics ``(K, 1 + D)``: column 0 the counts, then the sums. float64 (float32 on
        MPS, which has no float64), so that moving rows in and out many times adds no visible rounding."""
        dtype = torch.float32 if self.device_.type == "mps" else torch.float64
        return torch.zeros(self.grid_.size, 1 + self.n_features_in_, dtype=dtype, device=self.device_)

    @torch.no_grad()
    def _winners(self, X: torch.Tensor, previous: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """``(c, sum_j ||x_j - w_c(j)||)``: every row's winner (``(N,)`` long) and the sum of the distances.
        ``previous``: the rows' winners at their last update, for ``winner_search="local"``."""
        w = self.codebook_
        k, d = w.shape
        error = torch.zeros((), dtype=torch.float64, device=w.device)
        winners = torch.empty(X.shape[0], dtype=torch.long, device=w.device)
        local = previous is not None and self.winner_search == "local" and k >= LOCAL_SEARCH_MIN_UNITS
        rows = max(1, CHUNK_ELEMENTS // (d * (LOCAL_SEARCH_RADIUS * 2 + 1) ** self.grid_.ndim if local else d))
        for s in range(0, X.shape[0], rows):
            x = X[s:s + rows]
            idx = self._local_winners(x, w, previous[s:s + rows]) if local else nearest_codes(x, w)
            winners[s:s + rows] = idx
            error += (x - w[idx]).norm(dim=1).double().sum()
        return winners, float(error)

    @staticmethod
    def _move_rows(stats: torch.Tensor, X: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> None:
        """``stats`` += the rows of ``X`` counted at their ``new`` winners and taken out of their ``old``
        ones (``old = -1``: not counted yet): ``n_k += #{new = k} - #{old = k}``, ``S_k`` likewise with the
        rows. Rows whose winner did not change are skipped; a unit left with no rows gets exact zero sums."""
        moved = new != old
        if not bool(moved.all()):
            X, new, old = X[moved], new[moved], old[moved]
        rows = max(1, CHUNK_ELEMENTS // (2 * X.shape[1] + 2))  # bounds the float64 copy of the rows
        taken_out = False
        for s in range(0, X.shape[0], rows):
            x, to, fro = X[s:s + rows], new[s:s + rows], old[s:s + rows]
            packed = torch.cat([torch.ones(x.shape[0], 1, dtype=stats.dtype, device=x.device), x.to(stats.dtype)], 1)
            stats.index_add_(0, to, packed)
            counted = fro >= 0
            if bool(counted.any()):
                stats.index_add_(0, fro[counted], packed[counted], alpha=-1.0)
                taken_out = True
        if taken_out:  # a unit that lost all its rows: exact zeros rather than the sums' rounding residue
            stats[stats[:, 0] < 0.5] = 0.0  # counts are whole numbers

    @torch.no_grad()
    def _apply(self, stats: torch.Tensor, epoch: int, rows: int, error: float) -> None:
        """One batch-map update from the per-unit statistics: ``w_k = (P_t S)_k / (P_t n)_k`` where the
        smoothed count is above the floor, else ``w_k`` unchanged; appends to ``history_``."""
        step = self.n_updates_
        smoothed = self.smoother_(stats.float(), step)
        counts, sums = smoothed[:, 0], smoothed[:, 1:]
        floor = self.smoother_.cutoff
        if self.smoother_.choose(step) == "fft":
            floor = max(floor, FFT_RELATIVE_FLOOR * float(counts.max()))
        hit = counts > floor  # the others have no data within the kernel's reach: keep their weights
        self.codebook_ = torch.where(hit[:, None], sums / counts.clamp(min=floor)[:, None], self.codebook_)
        self.history_.append({"update": step, "epoch": epoch, "sigma": float(self.neighborhood_.width(step)),
                              "quantization_error": error / rows, "units_updated": int(hit.sum())})
        self.n_updates_ = step + 1

    def _local_winners(self, x: torch.Tensor, w: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Winners searched among the units within Chebyshev distance R of each row's previous winner;
        a best unit farther than R - 1 from it (so that some of its grid neighbours were not compared) is
        replaced by the exact search's."""
        grid, r = self.grid_, LOCAL_SEARCH_RADIUS
        key = str(w.device)
        if getattr(self, "_search_cache", (None,))[0] != key:  # the (K, M) window of every unit, built once
            offsets = torch.cartesian_prod(*[torch.arange(-r, r + 1)] * grid.ndim).reshape(-1, grid.ndim)
            coords = grid.coords()
            window = grid.coords_to_index(grid.clamp(coords[:, None, :] + offsets[None]))  # clamped repeats
            self._search_cache = (key, coords.to(w.device), window.to(w.device))
        _, coords, window = self._search_cache
        candidates = window[previous]  # (n, M)
        centre = coords[previous]
        e = w[candidates]  # (n, M, D)
        scores = e.square().sum(-1) - 2.0 * torch.einsum("nd,nmd->nm", x, e)
        best = candidates.gather(1, scores.argmin(1, keepdim=True)).squeeze(1)
        delta = (coords[best] - centre).abs()
        if grid.periodic:
            sizes = torch.tensor(grid.shape, device=delta.device)
            delta = torch.minimum(delta, sizes - delta)
        edge = (delta > r - 1).any(1)
        if bool(edge.any()):
            best[edge] = nearest_codes(x[edge], w)
        return best

    def fit(self, X, y=None, epochs=None, batch_size=None) -> "KohonenMap":
        """Initialise and train for ``epochs`` passes over ``X``, ``updates_per_epoch`` updates each (or
        ``ceil(N / batch_size)``): every update searches the winners of a slice of the shuffled rows, moves
        those rows in the per-unit counts and sums (which count every row seen, at its latest winner) and
        sets ``w = P_t S / P_t n``. With one update per epoch this is the classical batch map. ``y`` is
        ignored. Returns self."""
        epochs = self._positive_int(self.epochs if epochs is None else epochs, "epochs")
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size is not None:
            batch_size = self._positive_int(batch_size, "batch_size")
        updates = self._positive_int(self.updates_per_epoch, "updates_per_epoch")
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("_")]:
            delattr(self, name)  # a refit starts from scratch
        data = as_data_matrix(X, "X", device=self._resolve_device(X))
        n = data.shape[0]
        rows_per_update = min(n, batch_size if batch_size is not None else math.ceil(n / updates))
        per_epoch = math.ceil(n / rows_per_update)
        self._start(data, epochs, per_epoch)
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * per_epoch, desc=f"KohonenMap {'x'.join(map(str, self.grid_.shape))}",
                   unit="update", disable=None if self.progress is None else not self.progress)
        stats = self._statistics()
        last = torch.full((n,), -1, dtype=torch.long, device=data.device)  # every row's latest winner
        try:
            for epoch in range(epochs):
                order = None if per_epoch == 1 else torch.randperm(n, generator=self._generator).to(data.device)
                for s in range(0, n, rows_per_update):
                    rows = None if order is None else order[s:s + rows_per_update]
                    batch = data if rows is None else data[rows]
                    old = last if rows is None else last[rows]
                    # from the second epoch on every row has a winner to start the local search from
                    new, error = self._winners(batch, previous=old if epoch > 0 else None)
                    self._move_rows(stats, batch, new, old)
                    if rows is None:
                        last = new
                    else:
                        last[rows] = new
                    self._apply(stats, epoch, batch.shape[0], error)
                    latest = self.history_[-1]
                    bar.set_postfix(epoch=epoch + 1, sigma=f"{latest['sigma']:.3g}",
                                    qe=f"{latest['quantization_error']:.4g}", refresh=False)
                    bar.update(1)
        finally:
            bar.close()
        return self

    def partial_fit(self, X, y=None) -> "KohonenMap":
        """One batch-map update from the rows of ``X`` alone (``n`` and ``S`` of this call's winners). On an
        unfitted map it first initialises from ``X`` with a width schedule of ``epochs`` updates, one per
        call; after :meth:`fit` (or ``epochs`` calls) it continues at ``sigma_final``. Returns self."""
        if not hasattr(self, "codebook_"):
            data = as_data_matrix(X, "X", device=self._resolve_device(X))
            self._start(data, self._positive_int(self.epochs, "epochs"), 1)
        else:
            data = as_data_matrix(X, "X", self.n_features_in_, self.device_)
        winners, error = self._winners(data)
        stats = self._statistics()
        self._move_rows(stats, data, winners, torch.full_like(winners, -1))
        self._apply(stats, self.history_[-1]["epoch"] + 1 if self.history_ else 0, data.shape[0], error)
        return self

    # -- using a fitted map ----------------------------------------------------------------------------
    def _data(self, X) -> torch.Tensor:
        self._check_fitted()
        return as_data_matrix(X, "X", self.n_features_in_, self.device_)

    @torch.no_grad()
    def predict(self, X):
        """Best-matching unit ``argmin_k ||x - w_k||`` of every row: int64 ``(N,)`` (numpy for numpy input,
        a tensor on the input's device for tensor input)."""
        return _output_like(X, nearest_codes(self._data(X), self.codebook_))

    @torch.no_grad()
    def transform(self, X):
        """Grid coordinates ``(N, d)`` int64 of every row's best-matching unit (axial coordinates on a
        hexagonal map), i.e. ``grid_.index_to_coords(predict(X))``."""
        idx = nearest_codes(self._data(X), self.codebook_)
        return _output_like(X, self.grid_.index_to_coords(idx.cpu()))

    def fit_predict(self, X, y=None, **fit_params):
        """``fit(X, **fit_params).predict(X)``."""
        return self.fit(X, **fit_params).predict(X)

    def fit_transform(self, X, y=None, **fit_params):
        """``fit(X, **fit_params).transform(X)``."""
        return self.fit(X, **fit_params).transform(X)

    @torch.no_grad()
    def hit_counts(self, X):
        """Rows of ``X`` per unit (the hit map): ``(K,)`` int64, numpy or tensor like the input."""
        idx = nearest_codes(self._data(X), self.codebook_)
        return _output_like(X, torch.bincount(idx, minlength=self.grid_.size))

    def quantization_error(self, X) -> float:
        """Mean distance of the rows to their best-matching unit, ``(1/N) sum_n ||x_n - w_c(n)||``."""
        return quantization_errors(self._data(X), self.codebook_, self.grid_)["quantization_error"]

    def topographic_error(self, X) -> float | None:
        """Share of rows whose best and second-best units are not grid neighbours (0 < d < 1.5)."""
        return quantization_errors(self._data(X), self.codebook_, self.grid_)["topographic_error"]

    def score(self, X, y=None) -> float:
        """Minus the quantisation error (scikit-learn's "greater is better")."""
        return -self.quantization_error(X)

    def umatrix(self) -> torch.Tensor:
        """U-matrix ``(K,)``: mean distance of each unit's weights to those of its grid neighbours."""
        self._check_fitted()
        return umatrix(self.codebook_, self.grid_)

    def save(self, folder, **extra) -> dict:
        """Write the fitted map to ``folder`` (``som.npz`` arrays + ``som.json`` parameters; no pickle),
        atomically; ``extra``: see :func:`kohonen_vae.som.storage.save_map`. Returns the paths written."""
        from .storage import save_map

        return save_map(self, folder, **extra)

    @classmethod
    def load(cls, folder, device=None) -> "KohonenMap":
        """A fitted map read back from what :meth:`save` wrote (``device``: where to put the codebook)."""
        from .storage import load_map

        return load_map(folder, device=device)

    def evaluate(self, X) -> dict:
        """Every map metric on ``X`` as plain numbers: quantisation error and MSE, topographic error,
        perplexity, used units, dead share, codebook smoothness and topographic product (None above 4096
        units); see :mod:`kohonen_vae.metrics`."""
        data = self._data(X)
        out = dict(quantization_errors(data, self.codebook_, self.grid_))
        idx = nearest_codes(data, self.codebook_)
        usage = code_usage(torch.bincount(idx, minlength=self.grid_.size))
        out.update(perplexity=usage["perplexity"], used_units=usage["used_codes"],
                   dead_fraction=usage["dead_fraction"], n_samples=int(data.shape[0]),
                   codebook_smoothness=codebook_smoothness(self.codebook_, self.grid_) if self.grid_.size > 1 else None,
                   topographic_product=topographic_product(self.codebook_.cpu(), self.grid_))
        return out


def timed_fit(som: KohonenMap, X, **fit_params) -> float:
    """Seconds ``som.fit(X, **fit_params)`` took (synchronising an accelerator before reading the clock)."""
    t0 = time.perf_counter()
    som.fit(X, **fit_params)
    if som.device_.type == "cuda":
        torch.cuda.synchronize(som.device_)
    return time.perf_counter() - t0
