"""Neighborhood kernels h_t(d) and their schedules.

A kernel gives the weight with which a code at grid distance ``d`` from the winner shares the winner's
update at training step ``t``. Every kernel has ``h_t(0) = 1`` (the diagonal of P_t is 1) and is **not
normalised**, as in the paper. A schedule gives a factor ``s(t)`` in (0, 1] that shrinks the kernel:

==============  ==========================================================  ============================
name            h_t(d) for d > 0                                            paper's name
==============  ==========================================================  ============================
``none``        0                                                           EMA-VQ ("no neighborhood")
``hard``        s(t) if d < radius (1.5: the Moore neighbours), else 0      "hard"
``exponential`` exp(-d / (sigma0 s(t)))                                     "Gaussian" (reference code)
``gaussian``    exp(-d^2 / (2 (sigma0 s(t))^2))                             classical SOM Gaussian
==============  ==========================================================  ============================

Schedules: ``harmonic`` s(t) = 1 / (1 + tau t) (the paper's; tau = ``shrink``), and ``exponential``
s(t) = floor + (1 - floor) exp(-t / time_constant) (classical SOM decay towards a floor).
With the harmonic schedule, ``exponential`` is exactly the reference's exp(-d (1 + tau t) / sigma0).
"""
from __future__ import annotations

import math

import torch

#: weights below this are treated as zero when a kernel is truncated to a finite stencil
DEFAULT_CUTOFF = 1e-7
#: float64 weights below this round to exactly 0 in float32 (half the smallest float32 subnormal, 2^-149):
#: the cutoff of a kernel's float32 *support*, used by the no-update variant (see GridSmoother.dilate)
FLOAT32_ZERO_CUTOFF = 2.0 ** -150


def finite_number(value, name: str) -> float:
    """``value`` as a finite float; a ``ValueError`` naming ``name`` for NaN, +-Inf or a non-number."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out


# ------------------------------------------------------------------------------------------- schedules
class HarmonicSchedule:
    """s(t) = 1 / (1 + tau t): the paper's schedule, tau = ``shrink`` (0.1 by default)."""

    def __init__(self, shrink: float = 0.1):
        shrink = finite_number(shrink, "shrink (tau)")
        if shrink < 0:
            raise ValueError(f"shrink (tau) must be >= 0, got {shrink}")
        self.shrink = shrink

    def __call__(self, step: float) -> float:
        return 1.0 / (1.0 + self.shrink * float(step))

    def to_dict(self) -> dict:
        """Plain-data description, e.g. ``{"name": "harmonic", "shrink": 0.1}``."""
        return {"name": "harmonic", "shrink": self.shrink}

    def __repr__(self) -> str:
        return f"HarmonicSchedule(shrink={self.shrink})"


class ExponentialSchedule:
    """s(t) = floor + (1 - floor) exp(-t / time_constant): decays from 1 towards ``floor``."""

    def __init__(self, time_constant: float = 1000.0, floor: float = 0.01):
        time_constant = finite_number(time_constant, "time_constant")
        floor = finite_number(floor, "floor")
        if time_constant <= 0:
            raise ValueError(f"time_constant must be > 0, got {time_constant}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        self.time_constant = float(time_constant)
        self.floor = float(floor)

    def __call__(self, step: float) -> float:
        return self.floor + (1.0 - self.floor) * math.exp(-float(step) / self.time_constant)

    def to_dict(self) -> dict:
        """Plain-data description: name, time constant and floor."""
        return {"name": "exponential", "time_constant": self.time_constant, "floor": self.floor}

    def __repr__(self) -> str:
        return f"ExponentialSchedule(time_constant={self.time_constant}, floor={self.floor})"


SCHEDULES = {"harmonic": HarmonicSchedule, "exponential": ExponentialSchedule}


# --------------------------------------------------------------------------------------------- kernels
class Neighborhood:
    """Base class. Subclasses define :meth:`profile` for d > 0 and :meth:`radius`."""

    name = "base"
    #: True when h factorises over grid axes (a product of 1-D kernels on a rectangular grid)
    separable = False

    def __init__(self, schedule=None):
        self.schedule = schedule if schedule is not None else HarmonicSchedule()

    def profile(self, distance: torch.Tensor, step: float) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, distance: torch.Tensor, step: float) -> torch.Tensor:
        """h_t(d) for a tensor of grid distances, with h_t(0) = 1 exactly."""
        distance = torch.as_tensor(distance)
        w = self.profile(distance, step)
        return torch.where(distance == 0, torch.ones_like(w), w)

    def radius(self, step: float, cutoff: float = DEFAULT_CUTOFF) -> float:
        """Distance beyond which every weight is below ``cutoff`` (0 means: the identity)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r})"

    def to_dict(self) -> dict:
        """Plain-data description (kind, kernel parameters, schedule), stored in a quantiser's state so
        that a checkpoint of another neighbourhood is refused. A callable schedule is ``"custom"``."""
        sched = self.schedule.to_dict() if hasattr(self.schedule, "to_dict") else {"name": "custom"}
        return {"kind": self.name, **self._params(), "schedule": sched}

    def _params(self) -> dict:
        return {}


class NoNeighborhood(Neighborhood):
    """h(d) = [d == 0]: P = I, i.e. EMA-VQ."""

    name = "none"

    def profile(self, distance, step):
        return torch.zeros_like(distance, dtype=torch.get_default_dtype() if not distance.is_floating_point() else distance.dtype)

    def radius(self, step, cutoff=DEFAULT_CUTOFF):
        return 0.0

    def __repr__(self) -> str:
        return "NoNeighborhood()"

    def to_dict(self) -> dict:
        """``{"kind": "none"}``: no kernel and no schedule (every schedule gives the same P = I)."""
        return {"kind": "none"}


class HardNeighborhood(Neighborhood):
    """h_t(d) = s(t) for 0 < d < radius (1.5: the Moore neighbours on a square grid, 6 on a hexagonal one),
    0 beyond. The radius never shrinks; the neighbours' weight does."""

    name = "hard"

    def __init__(self, schedule=None, radius: float = 1.5):
        super().__init__(schedule)
        radius = finite_number(radius, "hard neighborhood radius")
        if radius <= 0:
            raise ValueError(f"hard neighborhood radius must be > 0, got {radius}")
        self.support = float(radius)

    def profile(self, distance, step):
        distance = distance.to(torch.float64) if not distance.is_floating_point() else distance
        return torch.where(distance < self.support, torch.full_like(distance, self.schedule(step)), torch.zeros_like(distance))

    def radius(self, step, cutoff=DEFAULT_CUTOFF):
        return self.support if self.schedule(step) >= cutoff else 0.0

    def __repr__(self) -> str:
        return f"HardNeighborhood(schedule={self.schedule!r}, radius={self.support})"

    def _params(self) -> dict:
        return {"radius": self.support}


class ExponentialNeighborhood(Neighborhood):
    """h_t(d) = exp(-d / (sigma0 s(t))): the paper's "Gaussian" as the reference code computes it."""

    name = "exponential"

    def __init__(self, schedule=None, sigma: float = 10.0):
        super().__init__(schedule)
        sigma = finite_number(sigma, "sigma")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def width(self, step) -> float:
        return self.sigma * self.schedule(step)

    def profile(self, distance, step):
        distance = distance.to(torch.float64) if not distance.is_floating_point() else distance
        return torch.exp(-distance / self.width(step))

    def radius(self, step, cutoff=DEFAULT_CUTOFF):
        return -math.log(cutoff) * self.width(step)

    def __repr__(self) -> str:
        return f"ExponentialNeighborhood(schedule={self.schedule!r}, sigma={self.sigma})"

    def _params(self) -> dict:
        return {"sigma": self.sigma}


class GaussianNeighborhood(ExponentialNeighborhood):
    """h_t(d) = exp(-d^2 / (2 sigma(t)^2)), sigma(t) = sigma0 s(t): the classical SOM kernel."""

    name = "gaussian"
    separable = True

    def profile(self, distance, step):
        distance = distance.to(torch.float64) if not distance.is_floating_point() else distance
        return torch.exp(-distance.square() / (2.0 * self.width(step) ** 2))

    def radius(self, step, cutoff=DEFAULT_CUTOFF):
        return math.sqrt(-2.0 * math.log(cutoff)) * self.width(step)

    def __repr__(self) -> str:
        return f"GaussianNeighborhood(schedule={self.schedule!r}, sigma={self.sigma})"


NEIGHBORHOODS = {
    "none": NoNeighborhood,
    "hard": HardNeighborhood,
    "exponential": ExponentialNeighborhood,
    "gaussian": GaussianNeighborhood,
}


def _parameters(cls) -> list[str]:
    """Keyword parameters of a kernel's or schedule's constructor (the schedule argument excluded)."""
    import inspect

    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "schedule") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def make_schedule(schedule="harmonic", shrink: float = 0.1, **kwargs):
    """A schedule from a name in :data:`SCHEDULES` (its constructor's parameters from ``shrink`` and
    ``kwargs``: ``harmonic`` takes ``shrink``, ``exponential`` ``time_constant`` and ``floor``) or a callable
    ``step -> factor`` passed through. Unknown parameters are refused with the valid ones."""
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)} or pass a callable")
    cls = SCHEDULES[schedule]
    allowed = _parameters(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not an option of the {schedule!r} schedule; its options: "
                         f"{', '.join(allowed)}")
    args = dict(kwargs)
    if "shrink" in allowed:
        args.setdefault("shrink", shrink)
    return cls(**args)


def make_neighborhood(neighborhood="hard", *, shrink: float = 0.1, sigma: float = 10.0, schedule="harmonic",
                      **options) -> Neighborhood:
    """A kernel from a name in :data:`NEIGHBORHOODS`, a table ``{"kind": name, **options}`` (as a config
    writes it: ``neighborhood = {kind = "hard", radius = 2.5}``), or a :class:`Neighborhood` (returned as is).

    Every option goes to whichever takes it by name: the kernel's constructor (``radius`` of ``hard``,
    ``sigma`` of ``exponential``/``gaussian``) or the schedule's (``shrink``, ``time_constant``, ``floor``).
    So a kernel with a new parameter needs a change here only: the quantisers and the config pass the
    table through. An option that neither takes is refused with the valid ones."""
    if isinstance(neighborhood, Neighborhood):
        return neighborhood
    options = dict(options)
    if isinstance(neighborhood, dict):
        table = dict(neighborhood)
        if "kind" not in table:
            raise ValueError(f"a neighborhood table needs a 'kind' ({', '.join(NEIGHBORHOODS)}), got {neighborhood!r}")
        neighborhood = table.pop("kind")
        options.update(table)
    if neighborhood in ("gauss", "paper-gaussian"):
        raise ValueError(
            f"ambiguous neighborhood {neighborhood!r}: use 'exponential' for the paper's \"Gaussian\" "
            "(exp(-d (1 + tau t) / sigma0)) or 'gaussian' for the classical exp(-d^2 / (2 sigma^2))"
        )
    if not isinstance(neighborhood, str) or neighborhood not in NEIGHBORHOODS:
        raise ValueError(f"unknown neighborhood {neighborhood!r}; choose one of {list(NEIGHBORHOODS)}")
    cls = NEIGHBORHOODS[neighborhood]
    kernel_params = _parameters(cls)
    schedule = options.pop("schedule", schedule)
    shrink = options.pop("shrink", shrink)
    sched_params = _parameters(SCHEDULES[schedule]) if isinstance(schedule, str) and schedule in SCHEDULES else []
    kernel_args = {k: options.pop(k) for k in list(options) if k in kernel_params}
    sched_args = {k: options.pop(k) for k in list(options) if k in sched_params}
    if options:
        valid = sorted(set(kernel_params) | set(sched_params) | {"shrink", "schedule"})
        raise ValueError(f"{sorted(options)[0]!r} is not an option of the {neighborhood!r} neighborhood with the "
                         f"{schedule if isinstance(schedule, str) else 'custom'!r} schedule; valid: {', '.join(valid)}")
    if "sigma" in kernel_params:
        kernel_args.setdefault("sigma", sigma)
    return cls(make_schedule(schedule, shrink, **sched_args), **kernel_args)
