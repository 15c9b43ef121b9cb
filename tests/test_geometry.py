import math

import pytest
import torch

from kohonen_vae.geometry import Grid, as_grid, auto_grid_shape
from references import reference_distance


@pytest.mark.parametrize("k, shape", [(512, (32, 16)), (1024, (32, 32)), (256, (16, 16)), (128, (16, 8)),
                                      (32, (8, 4)), (7, (7, 1)), (1, (1, 1))])
def test_auto_shape_2d_matches_spec(k, shape):
    assert auto_grid_shape(k, 2) == shape


def test_auto_shape_1d_and_3d():
    assert auto_grid_shape(512, 1) == (512,)
    assert auto_grid_shape(512, 3) == (8, 8, 8)  # 512 ** (1/3) is 7.999..., ceil must still give 8
    assert auto_grid_shape(1000, 3) == (10, 10, 10)
    for k in (96, 360, 4096):
        assert math.prod(auto_grid_shape(k, 3)) == k


def test_first_axis_varies_fastest():
    g = Grid((32, 16))
    assert g.index_to_coords(1).tolist() == [1, 0]
    assert g.index_to_coords(32).tolist() == [0, 1]
    assert g.index_to_coords(511).tolist() == [31, 15]
    k = torch.arange(512)
    c = g.index_to_coords(k)
    assert torch.equal(c[:, 0], k % 32) and torch.equal(c[:, 1], k // 32)


@pytest.mark.parametrize("shape", [(512,), (32, 16), (4, 5, 6), (3, 1, 2, 2)])
def test_index_coordinate_round_trip(shape):
    g = Grid(shape)
    k = torch.arange(g.size)
    assert torch.equal(g.coords_to_index(g.index_to_coords(k)), k)


def neighbour_counts(grid, radius=1.5):
    return torch.tensor([len(grid.neighbours(k, radius)) for k in range(grid.size)])


def test_moore_neighbour_counts_on_32x16():
    counts = neighbour_counts(Grid((32, 16)))
    assert int((counts == 8).sum()) == 420
    assert int((counts == 5).sum()) == 88
    assert int((counts == 3).sum()) == 4
    assert len(counts) == 512


def test_1d_neighbours():
    counts = neighbour_counts(Grid((10,)))
    assert counts.tolist() == [1] + [2] * 8 + [1]


def test_periodic_and_hexagonal_neighbour_counts():
    assert set(neighbour_counts(Grid((32, 16), periodic=True)).tolist()) == {8}
    assert set(neighbour_counts(Grid((10,), periodic=True)).tolist()) == {2}
    hexa = neighbour_counts(Grid((8, 6), topology="hexagonal"))
    # rhombus in axial coordinates: interior 6, edges 4, two acute corners 2, two obtuse corners 3
    assert int((hexa == 6).sum()) == 6 * 4
    assert int((hexa == 4).sum()) == 2 * (6 + 4)
    assert sorted(hexa.tolist()).count(2) == 2 and sorted(hexa.tolist()).count(3) == 2
    assert set(neighbour_counts(Grid((8, 6), topology="hexagonal", periodic=True)).tolist()) == {6}


def test_distances_hand_checked():
    g = Grid((10, 10))
    assert float(g.distance(g.coords_to_index([0, 0]), g.coords_to_index([3, 4]))) == pytest.approx(5.0)
    p = Grid((32, 16), periodic=True)
    assert float(p.distance(0, 31)) == pytest.approx(1.0)  # wraps along axis 0
    assert float(p.distance(0, 32 * 15)) == pytest.approx(1.0)  # wraps along axis 1
    assert float(p.offset_distance(torch.tensor([16, 8]))) == pytest.approx(math.hypot(16, 8))
    h = Grid((8, 8), topology="hexagonal")
    assert float(h.offset_distance(torch.tensor([1, -1]))) == pytest.approx(1.0)
    assert float(h.offset_distance(torch.tensor([1, 1]))) == pytest.approx(math.sqrt(3))
    assert float(h.offset_distance(torch.tensor([2, -1]))) == pytest.approx(math.sqrt(3))
    assert float(h.offset_distance(torch.tensor([0, 2]))) == pytest.approx(2.0)


def test_distance_matrix_symmetric_zero_diagonal():
    for g in (Grid((6, 4)), Grid((6, 4), periodic=True), Grid((5, 5), topology="hexagonal", periodic=True)):
        d = g.distance_matrix()
        assert torch.allclose(d, d.t())
        assert torch.all(d.diagonal() == 0)
        assert float(d[d > 0].min()) == pytest.approx(1.0)


def test_clamp_and_shift():
    g = Grid((32, 16))
    assert g.clamp(torch.tensor([[-3, 20], [40, 5]])).tolist() == [[0, 15], [31, 5]]
    assert int(g.shift(0, (-3, -3))) == 0
    assert int(g.shift(0, (3, 2))) == 3 + 2 * 32
    assert int(Grid((32, 16), periodic=True).shift(0, (-1, 0))) == 31


def test_lattice_offsets_dedupe_on_small_periodic_axes():
    # on a periodic axis of size 2, offsets +1 and -1 are the same neighbour: one tap, not two
    taps = Grid((2, 5), periodic=True).lattice_offsets(1.5)
    assert len(taps) == len({tuple(t) for t in taps.tolist()})
    assert len(taps) == 6  # (0 or 1) x (-1, 0, 1 mod 5)
    assert len(Grid((32, 16)).lattice_offsets(1.5)) == 9
    assert len(Grid((8, 8), topology="hexagonal").lattice_offsets(1.5)) == 7


def test_bad_grids_raise_clear_errors():
    with pytest.raises(ValueError, match="hexagonal grid must be 2-D"):
        Grid((4, 4, 4), topology="hexagonal")
    with pytest.raises(ValueError, match="unknown grid topology"):
        Grid((4, 4), topology="triangular")
    with pytest.raises(ValueError, match="holds 64 codes but codebook_size is 512"):
        as_grid((8, 8), 512)
    with pytest.raises(ValueError, match="outside"):
        Grid((4, 4)).coords_to_index(torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="out of range"):
        Grid((4, 4)).index_to_coords(16)


@pytest.mark.parametrize("grid", [Grid((5, 4)), Grid((5, 4), periodic=True), Grid((2, 3), periodic=True),
                                  Grid((4, 4), topology="hexagonal"), Grid((4, 3), topology="hexagonal", periodic=True),
                                  Grid((7,)), Grid((3, 2, 2))], ids=repr)
def test_random_neighbors_picks_uniformly_among_the_brute_force_neighbours(grid):
    g = torch.Generator().manual_seed(0)
    ks = torch.arange(grid.size).repeat_interleave(400)
    out = grid.random_neighbors(ks.view(-1, 400), g).flatten()  # any shape in, the same shape out
    for k in range(grid.size):
        # brute force: every j at grid distance 0 < d < 1.5 (divmod coordinates, explicit wrap-arounds)
        nb = [j for j in range(grid.size) if 0 < reference_distance(grid, k, j) < 1.5]
        got = out[ks == k]
        assert set(got.tolist()) == set(nb), (k, nb)
        freq = torch.bincount(got, minlength=grid.size)[nb].double() / 400
        assert torch.all((freq - 1 / len(nb)).abs() < 5 * math.sqrt(1 / len(nb) / 400))
    # u decides: the floor(u n)-th neighbour in index order
    u = torch.tensor([0.0, 0.999, 0.5])
    idx = torch.tensor([0, 0, grid.size - 1])
    picked = grid.random_neighbors(idx, u=u)
    for i, (k, uk) in enumerate(zip(idx.tolist(), u.tolist())):
        nb = [j for j in range(grid.size) if 0 < reference_distance(grid, k, j) < 1.5]
        assert int(picked[i]) == nb[int(uk * len(nb))]


def test_random_neighbors_of_a_single_code_and_bad_input():
    assert Grid((1,)).random_neighbors(torch.tensor([0, 0])).tolist() == [0, 0]
    with pytest.raises(ValueError, match="out of range"):
        Grid((4,)).random_neighbors(torch.tensor([4]))


@pytest.mark.parametrize("shape", [(8.5, 4), (8, 0), ("8", 4), (True, 4), "abc", (float("nan"), 2), ()])
def test_non_integer_or_non_positive_grid_sizes_are_refused(shape):
    with pytest.raises(ValueError, match="grid shape"):
        Grid(shape)
    assert Grid((8.0, 4)).shape == (8, 4)  # an integral float is an integer
