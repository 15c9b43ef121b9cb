"""Metrics on hand-checkable cases and against brute-force (loop) formulations."""
import itertools
import json
import math

import pytest
import torch

from kohonen_vae.data import Normalizer
from kohonen_vae.geometry import Grid
from kohonen_vae.metrics import (adjacent_pairs, code_usage, codebook_smoothness, decode_codebook, evaluate_codebook,
                                 map_smoothness, quantization_errors, topographic_error, topographic_product, umatrix)
from kohonen_vae.models import build_model

K = 10
ORDERED = torch.arange(K, dtype=torch.float32).view(-1, 1)  # e_k = k on a 1-D grid: a perfectly ordered map
PERM = torch.tensor([4, 1, 7, 5, 3, 9, 0, 8, 6, 2])
SHUFFLED = ORDERED[PERM]


# ------------------------------------------------------------------------------------------ brute force
def brute_adjacent(grid, i, j):
    d = float(grid.distance(torch.tensor(i), torch.tensor(j)))
    return 0 < d < 1.5


def brute_topographic_error(z, codebook, grid):
    bad = 0
    for zn in z:
        d = [float(((zn - e) ** 2).sum()) for e in codebook]
        order = sorted(range(len(d)), key=lambda k: (d[k], k))
        bad += not brute_adjacent(grid, order[0], order[1])
    return bad / len(z)


def brute_smoothness(x, grid):
    x = x.reshape(x.shape[0], -1).double()
    adj, allp = [], []
    for j, k in itertools.combinations(range(grid.size), 2):
        d = float((x[j] - x[k]).norm())
        allp.append(d)
        if brute_adjacent(grid, j, k):
            adj.append(d)
    return (sum(adj) / len(adj)) / (sum(allp) / len(allp))


def brute_topographic_product(e, grid):
    k = grid.size
    e = e.double()
    dv = lambda a, b: float((e[a] - e[b]).norm())  # noqa: E731
    da = lambda a, b: float(grid.distance(torch.tensor(a), torch.tensor(b)))  # noqa: E731
    total = 0.0
    for j in range(k):
        others = [i for i in range(k) if i != j]
        na = sorted(others, key=lambda i: (da(j, i), i))
        nv = sorted(others, key=lambda i: (dv(j, i), i))
        acc = 0.0
        for kk in range(1, k):
            l = kk - 1  # noqa: E741
            acc += math.log(dv(j, na[l]) / dv(j, nv[l])) + math.log(da(j, na[l]) / da(j, nv[l]))
            total += acc / (2 * kk)
    return total / (k * (k - 1))


# ------------------------------------------------------------------------------------------------ usage
def test_perplexity_of_uniform_usage_is_k_and_of_one_code_is_1():
    assert code_usage(torch.full((16,), 5.0))["perplexity"] == pytest.approx(16.0, rel=1e-6)
    one = torch.zeros(16)
    one[3] = 100
    assert code_usage(one)["perplexity"] == pytest.approx(1.0, abs=1e-6)


def test_usage_by_hand():
    u = code_usage(torch.tensor([3.0, 0.0, 1.0, 0.0]))
    assert u["used_codes"] == 2
    assert u["dead_fraction"] == 0.5
    assert u["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        code_usage(torch.tensor([1.0, -1.0]))


# ------------------------------------------------------------------------------------ quantisation error
def test_quantization_error_by_hand():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 0.5], [2.0, 1.0]])  # nearest: code 0 at distance 0.5, code 1 at distance 1
    r = quantization_errors(z, codebook, Grid((2,)))
    assert r["quantization_mse"] == pytest.approx((0.25 + 1.0) / 4)  # per element: N*D = 4
    assert r["quantization_error"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["topographic_error"] == 0.0  # the two codes are neighbours on a 2-code line


# -------------------------------------------------------------------------------------- topographic error
def test_topographic_error_ordered_map_is_zero_shuffled_map_is_not():
    z = torch.linspace(0, K - 1, 50).view(-1, 1) + 0.01
    grid = Grid((K,))
    assert topographic_error(z, ORDERED, grid) == 0.0
    te = topographic_error(z, SHUFFLED, grid)
    assert te > 0.5
    assert te == pytest.approx(brute_topographic_error(z, SHUFFLED, grid))


def test_topographic_error_hand_case():
    # codes on a 1-D grid at positions [0, 2, 1]: value 0.4 -> best code 0 (0), second code 2 (value 1): grid
    # distance 2, not adjacent; value 1.4 -> best code 2 (1), second code 1 (2): adjacent.
    codebook = torch.tensor([[0.0], [2.0], [1.0]])
    z = torch.tensor([[0.4], [1.4]])
    assert topographic_error(z, codebook, Grid((3,))) == 0.5


@pytest.mark.parametrize("grid", [Grid((5, 4)), Grid((5, 4), periodic=True), Grid((5, 4), topology="hexagonal")])
def test_topographic_error_adjacency_matches_brute_force(grid):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(grid.size, 3, generator=g)
    z = torch.randn(200, 3, generator=g)
    assert topographic_error(z, codebook, grid) == pytest.approx(brute_topographic_error(z, codebook, grid))


def test_adjacency_is_8_neighbour_rectangular_6_hexagonal_and_wraps_when_periodic():
    def n_pairs(grid):
        return adjacent_pairs(grid).shape[0]

    # 4x3 rectangular: 9 horizontal + 8 vertical + 12 diagonal pairs
    assert n_pairs(Grid((4, 3))) == 29
    assert n_pairs(Grid((4, 4), periodic=True)) == 16 * 8 // 2
    assert n_pairs(Grid((4, 4), topology="hexagonal")) == 12 + 12 + 9
    for grid in (Grid((4, 3)), Grid((3, 3), periodic=True), Grid((4, 3), topology="hexagonal"), Grid((6,))):
        expected = {(j, k) for j, k in itertools.combinations(range(grid.size), 2) if brute_adjacent(grid, j, k)}
        assert {tuple(p) for p in adjacent_pairs(grid).tolist()} == expected


# ---------------------------------------------------------------------------------------------- smoothness
def test_map_smoothness_ordered_line_is_3_over_k_plus_1():
    # adjacent pairs are at distance 1; the mean |i - j| over all pairs i != j of 0..K-1 is (K + 1) / 3
    assert map_smoothness(ORDERED, Grid((K,))) == pytest.approx(3 / (K + 1))
    assert codebook_smoothness(ORDERED, Grid((K,))) == pytest.approx(3 / (K + 1))


def test_map_smoothness_shuffled_is_about_one_and_matches_brute_force():
    s = map_smoothness(SHUFFLED, Grid((K,)))
    assert s == pytest.approx(brute_smoothness(SHUFFLED, Grid((K,))))
    assert s > 0.9
    grid = Grid((4, 3), topology="hexagonal")
    x = torch.randn(12, 2, 3, generator=torch.Generator().manual_seed(1))  # any per-code shape is flattened
    assert map_smoothness(x, grid) == pytest.approx(brute_smoothness(x, grid))


def test_map_smoothness_of_2d_ordered_map_is_well_below_one():
    grid = Grid((8, 8))
    e = grid.coords().float()  # e_k = its own grid coordinates
    assert codebook_smoothness(e, grid) < 0.5
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert codebook_smoothness(e[perm], grid) == pytest.approx(1.0, abs=0.15)


def test_umatrix_matches_brute_force():
    grid = Grid((4, 3))
    e = torch.randn(12, 5, generator=torch.Generator().manual_seed(2))
    u = umatrix(e, grid)
    for k in range(12):
        nb = [j for j in range(12) if brute_adjacent(grid, j, k)]
        assert float(u[k]) == pytest.approx(sum(float((e[j] - e[k]).norm()) for j in nb) / len(nb), rel=1e-5)
    assert torch.allclose(umatrix(ORDERED, Grid((K,))), torch.ones(K))


def test_topographic_product_zero_when_ordered_and_matches_brute_force():
    assert topographic_product(ORDERED, Grid((K,))) == pytest.approx(0.0, abs=1e-12)
    p = topographic_product(SHUFFLED, Grid((K,)))
    assert abs(p) > 1e-3
    assert p == pytest.approx(brute_topographic_product(SHUFFLED, Grid((K,))), rel=1e-9)
    grid = Grid((3, 3))
    e = torch.randn(9, 2, generator=torch.Generator().manual_seed(3))
    assert topographic_product(e, grid) == pytest.approx(brute_topographic_product(e, grid), rel=1e-9)
    assert topographic_product(torch.zeros(9, 2), grid) is None  # coinciding codes: undefined


# ---------------------------------------------------------------------------------------- evaluation
TINY = {"arch": "vqvae", "channels": 8, "res_channels": 4, "num_res_blocks": 1, "embed_dim": 4}


def tiny_model(seed=0, **quantizer):
    torch.manual_seed(seed)
    q = {"type": "ksom", "neighborhood": "hard", "codebook_size": 8, **quantizer}
    return build_model({**TINY, "quantizer": q})


def images_and_norm(n=12, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images, Normalizer([0.5, 0.4, 0.3], [0.25, 0.2, 0.3])


def test_evaluate_codebook_matches_independent_computation_and_changes_nothing():
    model = tiny_model()
    model.train()
    images, norm = images_and_norm()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r, counts = evaluate_codebook(model, images, norm, batch_size=5, return_counts=True)
    json.dumps(r)  # plain JSON-serialisable values
    assert model.training and all(m.training for m in model.modules())  # modes restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # no codebook, statistic or step counter changed

    # independent: one full batch through the public API
    model.eval()
    with torch.no_grad():
        x = norm.normalize(images)
        idx = model.encode_indices(x)[0].flatten()
        recon = model(x).reconstruction
        z = model.pre_quantizer(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 4)
    c = torch.bincount(idx, minlength=8).double()
    assert torch.equal(counts[0], c)
    usage = code_usage(c)
    assert r["num_images"] == 12
    assert r["recon_mse"] == pytest.approx(float(((recon - x) ** 2).mean()), rel=1e-5)
    assert r["bottom/perplexity"] == pytest.approx(usage["perplexity"], rel=1e-6)
    assert r["bottom/used_codes"] == usage["used_codes"]
    assert r["bottom/dead_fraction"] == usage["dead_fraction"]
    assert r["bottom/most_used_code"] == int(c.argmax())
    q = model.quantizers[0]
    ref = quantization_errors(z, q.codebook, q.grid)
    for key in ("quantization_mse", "quantization_error", "topographic_error"):
        assert r[f"bottom/{key}"] == pytest.approx(ref[key], rel=1e-5, abs=1e-9)
    assert r["bottom/codebook_smoothness"] == pytest.approx(codebook_smoothness(q.codebook, q.grid))
    assert r["bottom/topographic_product"] == pytest.approx(topographic_product(q.codebook, q.grid))
    dec = norm.denormalize(decode_codebook(model, 0, 8))
    assert r["bottom/map_smoothness"] == pytest.approx(map_smoothness(dec, q.grid), rel=1e-5)
    # batch size does not matter
    r2 = evaluate_codebook(model, images, norm, batch_size=100)
    for key, v in r.items():
        assert r2[key] == pytest.approx(v, rel=1e-5, abs=1e-9), key


def test_decoded_map_smoothness_separates_ordered_from_shuffled_codebook():
    # a 1-D map whose codes lie in order along a line: grid neighbours decode to similar images
    model = tiny_model(codebook_size=16, grid_shape=[16])
    q = model.quantizers[0]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, generator=g) * 3, torch.randn(4, generator=g) * 3
    t = torch.linspace(0, 1, 16).view(-1, 1)
    q.codebook.copy_(a + t * (b - a))
    images, norm = images_and_norm(n=4, size=8)
    ordered = evaluate_codebook(model, images, norm)["bottom/map_smoothness"]
    q.codebook.copy_(q.codebook[torch.randperm(16, generator=g)])
    shuffled = evaluate_codebook(model, images, norm)["bottom/map_smoothness"]
    assert ordered < 0.5
    assert shuffled > 0.8
    assert ordered < shuffled


def test_evaluate_codebook_two_levels_and_decode_codebook():
    torch.manual_seed(0)
    model = build_model({**TINY, "arch": "vqvae2", "quantizer": {"type": "ema", "codebook_size": 8}})
    images, norm = images_and_norm(n=3, size=64)
    r = evaluate_codebook(model, images, norm, batch_size=2)
    for level in ("top", "bottom"):
        for key in ("perplexity", "used_codes", "dead_fraction", "quantization_mse", "quantization_error",
                    "topographic_error", "map_smoothness", "codebook_smoothness", "topographic_product"):
            assert f"{level}/{key}" in r
    dec = decode_codebook(model, 1, 64, fixed_codes=[5, 0], batch_size=3)
    assert dec.shape == (8, 3, 64, 64)
    with torch.no_grad():
        ref = model.decode_indices([torch.full((1, 8, 8), 5), torch.full((1, 16, 16), 6)])
    assert torch.allclose(dec[6:7], ref, atol=1e-5)


def test_evaluate_codebook_rejects_float_images():
    model = tiny_model()
    _, norm = images_and_norm()
    with pytest.raises(ValueError, match="uint8"):
        evaluate_codebook(model, torch.rand(2, 3, 8, 8), norm)


# ------------------------------------------------------------------------------ index perturbation
def test_perturbation_mse_ratio_matches_a_brute_force_loop_and_ignores_batch_size():
    """Every index of one level moved to a random grid neighbour (picked from the brute-force neighbour list
    with the metric's seeded uniforms), decoded, MSE over the clean reconstruction's MSE."""
    from kohonen_vae.metrics import perturbation_uniforms
    model = tiny_model(codebook_size=8, grid_shape=[4, 2])
    images, norm = images_and_norm(n=6)
    r = evaluate_codebook(model, images, norm, batch_size=4, decode=False, perturbation_seed=3)
    model.eval()
    q = model.quantizers[0]
    with torch.no_grad():
        x = norm.normalize(images)
        idx = model.encode_indices(x)[0]
        clean = ((model(x).reconstruction - x) ** 2).sum()
        u = perturbation_uniforms(3, 0, torch.arange(idx.numel())).tolist()
        moved = []
        for k, uk in zip(idx.flatten().tolist(), u):
            nb = [j for j in range(8) if 0 < float(q.grid.distance(torch.tensor(k), torch.tensor(j))) < 1.5]
            moved.append(nb[int(uk * len(nb))])
        rec = model.decode_indices([torch.tensor(moved).view_as(idx)])
        expected = float(((rec - x) ** 2).sum() / clean)
    assert r["bottom/perturbation_mse_ratio"] == pytest.approx(expected, rel=1e-5)
    assert evaluate_codebook(model, images, norm, batch_size=6, decode=False,
                             perturbation_seed=3)["bottom/perturbation_mse_ratio"] == pytest.approx(expected, rel=1e-5)
    other = evaluate_codebook(model, images, norm, decode=False, perturbation_seed=4)["bottom/perturbation_mse_ratio"]
    assert other != pytest.approx(expected, rel=1e-9)  # the seed matters


def test_perturbation_mse_ratio_separates_ordered_from_shuffled_codebook():
    # codes in order along a line on a 1-D grid: a neighbour decodes to almost the same image
    model = tiny_model(codebook_size=16, grid_shape=[16])
    q = model.quantizers[0]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, generator=g) * 3, torch.randn(4, generator=g) * 3
    q.codebook.copy_(a + torch.linspace(0, 1, 16).view(-1, 1) * (b - a))
    images, norm = images_and_norm(n=4, size=8)
    ordered = evaluate_codebook(model, images, norm, decode=False)["bottom/perturbation_mse_ratio"]
    q.codebook.copy_(q.codebook[torch.randperm(16, generator=g)])
    shuffled = evaluate_codebook(model, images, norm, decode=False)["bottom/perturbation_mse_ratio"]
    assert ordered < shuffled


def test_perturbation_two_levels_and_off_switch():
    torch.manual_seed(0)
    model = build_model({**TINY, "arch": "vqvae2", "quantizer": {"type": "ksom", "codebook_size": 8}})
    images, norm = images_and_norm(n=2, size=32)
    r = evaluate_codebook(model, images, norm, decode=False)
    assert r["top/perturbation_mse_ratio"] > 0 and r["bottom/perturbation_mse_ratio"] > 0
    assert r["top/perturbation_mse_ratio"] != r["bottom/perturbation_mse_ratio"]
    assert "bottom/perturbation_mse_ratio" not in evaluate_codebook(model, images, norm, decode=False, perturbation=False)


def test_perturbation_uniforms_are_uniform_and_counter_based():
    from kohonen_vae.metrics import perturbation_uniforms
    u = perturbation_uniforms(0, 0, torch.arange(100_000))
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert torch.all((hist - 10_000).abs() < 500)  # +-5 sigma of a binomial(1e5, 0.1)
    assert torch.equal(perturbation_uniforms(0, 0, torch.arange(50_000, 50_010)), u[50_000:50_010])
    assert not torch.equal(perturbation_uniforms(1, 0, torch.arange(10)), u[:10])
    assert not torch.equal(perturbation_uniforms(0, 1, torch.arange(10)), u[:10])
