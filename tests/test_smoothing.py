"""Every smoothing method against an explicit P built here from the kernel formulas of the spec."""
import math

import pytest
import torch

from kohonen_vae.geometry import Grid
from kohonen_vae.neighborhood import (ExponentialSchedule, HarmonicSchedule, make_neighborhood)
from kohonen_vae.smoothing import GridSmoother
from references import reference_distance

TAU, SIGMA = 0.1, 10.0


def reference_weight(name, d, t, tau=TAU, sigma=SIGMA):
    """h_t(d) written straight from the spec, one float at a time."""
    if d == 0:
        return 1.0
    if name == "none":
        return 0.0
    if name == "hard":
        return 1.0 / (1.0 + tau * t) if d < 1.5 else 0.0
    if name == "exponential":
        return math.exp(-d * (1.0 + tau * t) / sigma)
    if name == "gaussian":
        width = sigma / (1.0 + tau * t)
        return math.exp(-d * d / (2 * width * width))
    raise AssertionError(name)


def reference_matrix(grid, name, t):
    k = grid.size
    return torch.tensor([[reference_weight(name, reference_distance(grid, i, j), t) for j in range(k)]
                         for i in range(k)], dtype=torch.float64)


GRIDS = [Grid((12,)), Grid((6, 5)), Grid((6, 5), periodic=True), Grid((6, 5), topology="hexagonal"),
         Grid((5, 6), topology="hexagonal", periodic=True), Grid((3, 4, 2)), Grid((2, 3), periodic=True)]


@pytest.mark.parametrize("grid", GRIDS, ids=repr)
@pytest.mark.parametrize("name", ["none", "hard", "exponential", "gaussian"])
@pytest.mark.parametrize("t", [0, 7, 60])
def test_every_method_equals_explicit_matrix(grid, name, t):
    torch.manual_seed(0)
    stats = torch.rand(grid.size, 5) * 10
    expected = (reference_matrix(grid, name, t) @ stats.double()).float()
    kernel = make_neighborhood(name, shrink=TAU, sigma=SIGMA)
    methods = ["dense", "stencil", "fft"]
    if name == "gaussian" and grid.topology == "rectangular":
        methods.append("separable")
    for method in methods:
        out = GridSmoother(grid, kernel, method=method)(stats, t)
        # the stencil truncates weights below 1e-7; fft is float32 arithmetic
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-4), (method, (out - expected).abs().max())
    auto = GridSmoother(grid, kernel)(stats, t)
    assert torch.allclose(auto, expected, rtol=1e-5, atol=1e-4)


def test_matrix_is_symmetric_with_unit_diagonal_and_not_normalised():
    grid = Grid((8, 4))
    p = GridSmoother(grid, make_neighborhood("exponential")).matrix(0)
    assert torch.allclose(p, p.t())
    assert torch.all(p.diagonal() == 1)
    # at t = 0 an input at the centre of 32x16 writes total weight ~215 (the spec's figure), ~5 at t = 100
    big = GridSmoother(Grid((32, 16)), make_neighborhood("exponential")).matrix(0)
    assert float(big.sum(0).max()) == pytest.approx(215, abs=1)
    late = GridSmoother(Grid((32, 16)), make_neighborhood("exponential")).matrix(100)
    assert float(late.sum(0).max()) == pytest.approx(5.4, abs=0.1)


def test_auto_method_choice():
    big = Grid((128, 64))
    assert GridSmoother(big, make_neighborhood("none")).choose(0) == "identity"
    assert GridSmoother(big, make_neighborhood("hard")).choose(0) == "stencil"
    assert GridSmoother(big, make_neighborhood("exponential")).choose(0) == "fft"
    assert GridSmoother(big, make_neighborhood("gaussian")).choose(0) == "separable"
    # late in training the exponential kernel has no weight left beyond the winner: EMA-VQ
    assert GridSmoother(big, make_neighborhood("exponential")).choose(100_000) == "identity"
    assert GridSmoother(big, make_neighborhood("exponential")).choose(500) == "stencil"
    assert GridSmoother(Grid((32, 16)), make_neighborhood("hard")).choose(0) == "stencil"
    assert GridSmoother(Grid((32, 16)), make_neighborhood("exponential")).choose(0) == "fft"
    assert GridSmoother(Grid((32, 16)), make_neighborhood("gaussian")).choose(0) == "separable"


@pytest.mark.parametrize("topology", ["rectangular", "hexagonal"])
@pytest.mark.parametrize("t", [0, 20, 200])
def test_fft_padded_by_the_kernel_radius_equals_explicit_matrix(topology, t):
    """Once the kernel's radius is below the grid size the FFT pads by the radius, not by the grid size
    (smaller transforms); the result still equals P_t X up to the cutoff-level truncation."""
    grid = Grid((40, 30), topology=topology)
    kernel = make_neighborhood("exponential", shrink=0.1, sigma=2.0)
    smoother = GridSmoother(grid, kernel, method="fft")
    radius = kernel.radius(t, smoother.cutoff)
    lengths = smoother._fft_lengths([30, 40], radius)
    if t > 0:
        assert lengths[0] < 60 and lengths[1] < 80  # really shorter than the exact 2 s padding
    torch.manual_seed(0)
    stats = torch.rand(grid.size, 4) * 10
    expected = GridSmoother(grid, kernel, method="dense").matrix(t).double() @ stats.double()
    out = smoother(stats, t)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-4), (out.double() - expected).abs().max()


def test_fast_fft_sizes():
    from kohonen_vae.smoothing import _fast_fft_size
    for n in range(1, 400):
        m = _fast_fft_size(n)
        assert m >= n
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1  # only factors 2, 3, 5
        assert all(not _is_235(k) for k in range(n, m))  # and the smallest such size


def _is_235(k):
    for p in (2, 3, 5):
        while k % p == 0:
            k //= p
    return k == 1


def test_large_grid_fast_methods_agree_with_each_other():
    # 4096 codes: no explicit matrix in the test either; compare stencil/fft/separable pairwise
    grid = Grid((64, 64))
    torch.manual_seed(1)
    stats = torch.rand(grid.size, 3)
    hard = make_neighborhood("hard")
    a = GridSmoother(grid, hard, "stencil")(stats, 3)
    b = GridSmoother(grid, hard, "fft")(stats, 3)
    assert torch.allclose(a, b, atol=1e-4)
    gauss = make_neighborhood("gaussian", sigma=3.0)
    c = GridSmoother(grid, gauss, "separable")(stats, 0)
    d = GridSmoother(grid, gauss, "fft")(stats, 0)
    assert torch.allclose(c, d, rtol=1e-4, atol=1e-3)


def test_schedules():
    h = HarmonicSchedule(0.1)
    assert h(0) == 1.0 and h(10) == pytest.approx(0.5) and h(90) == pytest.approx(0.1)
    e = ExponentialSchedule(time_constant=100, floor=0.2)
    assert e(0) == 1.0 and e(100) == pytest.approx(0.2 + 0.8 / math.e) and e(1e9) == pytest.approx(0.2)
    k = make_neighborhood("gaussian", sigma=4.0, schedule="exponential", time_constant=10, floor=0.5)
    assert float(k.weights(torch.tensor(2.0), 0)) == pytest.approx(math.exp(-4 / 32))
    assert float(k.weights(torch.tensor(2.0), 1e9)) == pytest.approx(math.exp(-4 / 8))


def test_bad_neighbourhood_arguments():
    with pytest.raises(ValueError, match="unknown neighborhood"):
        make_neighborhood("mexican-hat")
    with pytest.raises(ValueError, match="'exponential' for the paper"):
        make_neighborhood("gauss")
    with pytest.raises(ValueError, match="unknown schedule"):
        make_neighborhood("hard", schedule="cosine")
    with pytest.raises(ValueError, match="separable"):
        GridSmoother(Grid((4, 4), topology="hexagonal"), make_neighborhood("gaussian"), "separable")
    with pytest.raises(ValueError, match=r"\(16, C\)"):
        GridSmoother(Grid((4, 4)), make_neighborhood("hard"))(torch.zeros(15, 2), 0)


def test_fft_keeps_non_negative_columns_non_negative():
    # winners in one corner, wide exponential kernel: far codes get ~1e-9 exactly, FFT rounding gives +-1e-5
    grid = Grid((32, 16))
    stats = torch.zeros(grid.size, 2)
    stats[:100, 0] = 50.0
    stats[:100, 1] = -3.0  # a column with negative entries is left as computed
    out = GridSmoother(grid, make_neighborhood("exponential"), "fft")(stats, 200)
    exact = GridSmoother(grid, make_neighborhood("exponential"), "dense")(stats, 200)
    assert bool((out[:, 0] >= 0).all())
    assert torch.allclose(out, exact, atol=1e-3)


# ------------------------------------------------- which codes an update reaches (no-update variant)
def authors_float32_matrix(grid, name, t, tau=TAU, sigma=SIGMA):
    """P_t as the authors' code builds it, in float32: distances of float32 coordinates, the kernel in
    float32 arithmetic with a float32 step counter, diagonal 1 (kernels per the spec)."""
    c = torch.tensor([[float(v) for v in _coords(grid, i)] for i in range(grid.size)], dtype=torch.float32)
    k = grid.size
    d = torch.tensor([[reference_distance(grid, i, j) for j in range(k)] for i in range(k)], dtype=torch.float32)
    if grid.topology == "rectangular" and not grid.periodic:
        d = (c.unsqueeze(0) - c.unsqueeze(1)).norm(dim=-1)
    step = torch.tensor(float(t))
    if name == "none":
        p = torch.zeros_like(d)
    elif name == "hard":
        p = (d < 1.5).float() / (1.0 + step * tau)
    elif name == "exponential":
        p = (d * ((1 + step * tau) / (-sigma))).exp()
    else:  # classical gaussian: exp(-d^2 / (2 w^2)), w = sigma / (1 + tau t)
        w = sigma / (1 + step * tau)
        p = (-(d * d) / (2 * w * w)).exp()
    p.fill_diagonal_(1.0)
    return p


def _coords(grid, i):
    out = []
    for s in grid.shape:
        i, r = divmod(i, s)
        out.append(r)
    return out


@pytest.mark.parametrize("grid", GRIDS + [Grid((32, 16))], ids=repr)
@pytest.mark.parametrize("name", ["none", "hard", "exponential", "gaussian"])
def test_dilate_equals_float32_one_hot_matmul_positive(grid, name):
    """hit = one_hot(winners) @ P_t > 0 with the authors' float32 P_t, at steps where far weights are tiny
    but positive, where they underflow to 0, and late."""
    kernel = make_neighborhood(name, shrink=TAU, sigma=SIGMA)
    smoother = GridSmoother(grid, kernel)
    gen = torch.Generator().manual_seed(grid.size)
    for t in (0, 150, 300, 400, 1000, 3000, 10_000):
        p = authors_float32_matrix(grid, name, t)
        for n_winners in (1, 3):
            winners = torch.zeros(grid.size, dtype=torch.bool)
            winners[torch.randperm(grid.size, generator=gen)[:n_winners]] = True
            expected = (winners.float() @ p) > 0
            got = smoother.dilate(winners, t)
            assert torch.equal(got, expected), (t, n_winners, (got != expected).nonzero().flatten())
    assert not bool(smoother.dilate(torch.zeros(grid.size, dtype=torch.bool), 0).any())


def test_dilate_reaches_beyond_the_smoothing_cutoff():
    # at t = 200 on 32x16 the far corner's exponential weight is ~1e-31: below the 1e-7 truncation of the
    # smoothing, but a positive float32 number, so the authors' code counts the code as updated
    grid = Grid((32, 16))
    smoother = GridSmoother(grid, make_neighborhood("exponential"))
    winners = torch.zeros(grid.size, dtype=torch.bool)
    winners[0] = True
    smoothed = smoother(winners.float().unsqueeze(1), 200)[:, 0]
    assert bool((smoothed <= smoother.cutoff).any())
    assert bool(smoother.dilate(winners, 200).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_neighbourhood_numbers_must_be_finite(bad):
    for kwargs in ({"shrink": bad}, {"sigma": bad}):
        with pytest.raises(ValueError, match="finite"):
            make_neighborhood("exponential", **kwargs)
    with pytest.raises(ValueError, match="finite"):
        make_neighborhood("gaussian", schedule="exponential", time_constant=bad)
    with pytest.raises(ValueError, match="finite"):
        make_neighborhood("gaussian", schedule="exponential", floor=bad)


def test_neighbourhood_descriptions_are_plain_data():
    import json
    d = make_neighborhood("exponential", shrink=0.2, sigma=3.0).to_dict()
    assert d == {"kind": "exponential", "sigma": 3.0, "schedule": {"name": "harmonic", "shrink": 0.2}}
    assert make_neighborhood("hard").to_dict()["radius"] == 1.5
    assert make_neighborhood("none").to_dict() == {"kind": "none"}
    assert make_neighborhood("hard", schedule=lambda t: 1.0).to_dict()["schedule"] == {"name": "custom"}
    json.dumps(make_neighborhood("gaussian", schedule="exponential").to_dict())
