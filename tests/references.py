"""Independent reference formulations shared by several test modules (written out, not the library's)."""
import itertools
import math


def reference_distance(grid, j, k):
    """Grid distance from coordinates computed with divmod (first axis fastest), independent of Grid: the
    Euclidean distance of the coordinate difference (on a hexagonal grid, of its axial -> Cartesian image),
    the shortest over the wrap-arounds of a periodic grid."""
    def coords(i):
        out = []
        for s in grid.shape:
            i, c = divmod(i, s)
            out.append(c)
        return out

    cj, ck = coords(j), coords(k)
    best = math.inf
    for w in itertools.product(*[(-1, 0, 1) if grid.periodic else (0,)] * grid.ndim):
        delta = [b - a + wi * s for a, b, wi, s in zip(cj, ck, w, grid.shape)]
        if grid.topology == "hexagonal":
            delta = [delta[0] + delta[1] / 2, delta[1] * math.sqrt(3) / 2]
        best = min(best, math.sqrt(sum(v * v for v in delta)))
    return best
