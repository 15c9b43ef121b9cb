"""Codebook and topology metrics: is the codebook used, does it fit the data, is the grid organised?

Notation: ``z_n`` (n = 1..N) the pre-quantisation vectors of an evaluation set (every spatial position of
every image), ``e_k`` (k = 0..K-1) the codes, ``k1(n)`` / ``k2(n)`` the nearest and second-nearest code of
``z_n``, ``c_k`` the number of vectors assigned to code k, ``d(j, k)`` the grid distance
(:meth:`Grid.offset_distance`), and *adjacent* means ``0 < d(j, k) < 1.5``. On a rectangular grid that is
the 8 Moore neighbours (2 in 1-D), on a hexagonal grid the 6 neighbours, and on a periodic grid the
wrap-around neighbours are adjacent too. It is the support of the paper's hard neighbourhood.

==========================  =====================================================================================
metric                      formula
==========================  =====================================================================================
perplexity                  exp(-sum_k p_k log(p_k + 1e-10)), p_k = c_k / sum_j c_j  (K for uniform use, 1 for
                            a single code; over the whole evaluation set, not one batch)
used_codes                  #{k : c_k > 0}
dead_fraction               #{k : c_k = 0} / K
quantization_mse            (1 / (N D)) sum_n ||z_n - e_{k1(n)}||^2    (the commitment loss divided by beta)
quantization_error          (1 / N) sum_n ||z_n - e_{k1(n)}||          (the SOM literature's QE)
topographic_error           (1 / N) #{n : k1(n), k2(n) not adjacent}   (Kiviluoto 1996)
map_smoothness              mean_{adjacent j<k} ||x_j - x_k|| / mean_{all j<k} ||x_j - x_k||, x_k the image decoded
                            from a latent map filled with code k. The denominator is the mean over all distinct
                            pairs, i.e. the expectation over uniformly random pairs. Well below 1: grid neighbours
                            decode to similar images (organised map); about 1: the grid order means nothing.
codebook_smoothness         the same ratio on the code vectors e_k themselves (no decoder needed)
topographic_product         Bauer & Pawelzik (1992), see :func:`topographic_product`; 0 for a perfectly
                            ordered map, < 0 when the map is too small-dimensional, > 0 when too high.
perturbation_mse_ratio      index-perturbation robustness: MSE(decode(indices with every index of this level
                            moved to a uniformly random grid neighbour), x) / MSE(reconstruction, x), other
                            levels kept. About 1-2 for an organised map (a neighbour decodes to nearly the same
                            image), much larger when the grid order means nothing. Seeded and independent of
                            the batch size (:func:`perturbation_uniforms`).
==========================  =====================================================================================

The quantisation and topographic errors are measured in each quantiser's *assignment space*
(``quantizer.assignment_space``): the code vectors themselves for this package's quantisers, FSQ's bounded
pre-rounding values and its lattice for a wrapped FSQ (where nearest-code assignment holds).

:func:`evaluate_codebook` computes all of them for every level of a model over a whole image set.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .geometry import Grid

#: codes compared by the exact all-pairs mean up to this K; above it a fixed-seed sample of pairs is used
EXACT_PAIRS_MAX_CODES = 4096
#: number of random pairs sampled above EXACT_PAIRS_MAX_CODES
SAMPLED_PAIRS = 1 << 18
#: topographic product is O(K^2 log K); skipped (None) above this K
TOPOGRAPHIC_PRODUCT_MAX_CODES = 4096
#: rows of the N x K distance matrix handled at once (elements), as in quantizers.base
DISTANCE_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------------------ usage
def code_usage(counts: torch.Tensor) -> dict:
    """Usage metrics of assignment counts ``c`` (K,) accumulated over a whole evaluation set.

    ``perplexity = exp(-sum_k p_k log(p_k + 1e-10))`` with ``p = c / sum(c)``; ``used_codes = #{c_k > 0}``;
    ``dead_fraction = #{c_k = 0} / K``. Returns plain floats/ints.
    """
    counts = torch.as_tensor(counts).detach().double().flatten()
    if counts.numel() == 0:
        raise ValueError("code_usage needs counts for at least one code")
    if bool((counts < 0).any()):
        raise ValueError("code_usage: counts must be non-negative")
    total = float(counts.sum())
    p = counts / max(total, 1e-12)
    used = int((counts > 0).sum())
    return {
        "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum())) if total > 0 else 0.0,
        "used_codes": used,
        "dead_fraction": 1.0 - used / counts.numel(),
    }


# ------------------------------------------------------------------------------------ nearest two codes
def nearest_two(vectors: torch.Tensor, codebook: torch.Tensor,
                chunk_elements: int = DISTANCE_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k1, k2, sq_dist1)``: for every row z_n of ``vectors`` (N, D) the nearest code, the second-nearest
    code (== k1 when K = 1) and ``||z_n - e_{k1}||^2``, computed in float32 in row chunks (argmin of
    ``||e_k||^2 - 2 z.e_k``, the same ordering the quantisers use)."""
    z = vectors.detach().float()
    e = codebook.detach().float().to(z.device)
    if z.dim() != 2 or e.dim() != 2 or z.shape[1] != e.shape[1]:
        raise ValueError(f"nearest_two needs vectors (N, D) and a codebook (K, D), got {tuple(z.shape)} "
                         f"and {tuple(e.shape)}")
    e_sq = e.square().sum(1)
    k = e.shape[0]
    rows = max(1, chunk_elements // max(k, 1))
    k1 = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    k2 = torch.empty_like(k1)
    d1 = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[0], rows):
        zc = z[start:start + rows]
        scores = torch.addmm(e_sq, zc, e.t(), alpha=-2.0)
        top = scores.topk(min(2, k), dim=1, largest=False)
        k1[start:start + rows] = top.indices[:, 0]
        k2[start:start + rows] = top.indices[:, -1]
        # exact squared distance of the winner (the scores lack ||z||^2 and lose precision)
        d1[start:start + rows] = (zc - e[top.indices[:, 0]]).square().sum(1)
    return k1, k2, d1


def adjacent(grid: Grid, i: torch.Tensor, j: torch.Tensor, radius: float = 1.5) -> torch.Tensor:
    """Boolean tensor: codes ``i`` and ``j`` are grid neighbours, ``0 < d(i, j) < radius``."""
    coords = grid.coords(i.device)
    d = grid.offset_distance(coords[j] - coords[i])
    return (d > 0) & (d < radius)


def quantization_errors(vectors: torch.Tensor, codebook: torch.Tensor, grid: Grid) -> dict:
    """``quantization_mse``, ``quantization_error`` and ``topographic_error`` of vectors (N, D) (see the
    module table): mean squared error per element, mean Euclidean distance to the winner, and the share of
    vectors whose best and second-best codes are not grid-adjacent (0 < d < 1.5)."""
    k1, k2, d1 = nearest_two(vectors, codebook)
    n, dim = vectors.shape
    if n == 0:
        raise ValueError("quantization_errors needs at least one vector")
    te = None if codebook.shape[0] < 2 else float((~adjacent(grid, k1, k2)).double().mean())
    return {
        "quantization_mse": float(d1.double().sum() / (n * dim)),
        "quantization_error": float(d1.double().sqrt().mean()),
        "topographic_error": te,
    }


def topographic_error(vectors: torch.Tensor, codebook: torch.Tensor, grid: Grid) -> float:
    """TE = (1/N) #{n : k1(n) and k2(n) are not adjacent}, adjacency 0 < d(k1, k2) < 1.5 (8 Moore
    neighbours on a rectangular grid, 6 on a hexagonal one, wrap-around on periodic ones)."""
    return quantization_errors(vectors, codebook, grid)["topographic_error"]


# ---------------------------------------------------------------------------------------- grid pairs
def adjacent_pairs(grid: Grid, radius: float = 1.5) -> torch.Tensor:
    """All unordered pairs ``(j, k)``, j < k, of grid-adjacent codes (0 < d(j, k) < radius), as (P, 2) long.

    Built from the lattice offsets of the grid, so it is O(K) and works on periodic and hexagonal grids.
    """
    coords = grid.coords()
    sizes = torch.tensor(grid.shape)
    pairs = []
    for off in grid.lattice_offsets(radius):
        if float(grid.offset_distance(off)) == 0:
            continue
        target = coords + off
        if grid.periodic:
            target = target % sizes
            ok = torch.ones(grid.size, dtype=torch.bool)
        else:
            ok = ((target >= 0) & (target < sizes)).all(1)
        src = torch.arange(grid.size)[ok]
        dst = grid.coords_to_index(target[ok])
        pairs.append(torch.stack([src, dst], 1))
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long)
    p = torch.cat(pairs)
    p = p[p[:, 0] != p[:, 1]]
    p = torch.sort(p, dim=1).values
    return torch.unique(p, dim=0)


def _mean_pair_distance(x: torch.Tensor, pairs: torch.Tensor, chunk: int = 4096) -> float:
    total = 0.0
    for s in range(0, pairs.shape[0], chunk):
        p = pairs[s:s + chunk].to(x.device)
        total += float((x[p[:, 0]] - x[p[:, 1]]).norm(dim=1).double().sum())
    return total / max(pairs.shape[0], 1)


def _mean_all_pairs_distance(x: torch.Tensor, seed: int = 0) -> float:
    """Mean ||x_j - x_k|| over all j < k (exact up to EXACT_PAIRS_MAX_CODES rows, else a seeded sample)."""
    k = x.shape[0]
    if k <= EXACT_PAIRS_MAX_CODES:
        total = 0.0
        for s in range(0, k, 256):
            d = torch.cdist(x[s:s + 256].double(), x.double())  # (rows, K)
            total += float(d.sum())
        return total / (k * (k - 1))  # the diagonal is 0; every unordered pair is counted twice
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, k, (SAMPLED_PAIRS,), generator=g)
    b = (a + torch.randint(1, k, (SAMPLED_PAIRS,), generator=g)) % k  # b != a, uniform over the others
    return _mean_pair_distance(x, torch.stack([a, b], 1))


def map_smoothness(features: torch.Tensor, grid: Grid, radius: float = 1.5) -> float:
    """S = mean_{adjacent j<k} ||x_j - x_k|| / mean_{all j<k} ||x_j - x_k||, x_k = ``features[k]`` (any shape
    per code, flattened). With decoded images (see :func:`decode_codebook`) this is the *map smoothness*;
    with code vectors the *codebook smoothness*. About 1 for a map whose grid order is random, well below 1
    for an organised one. Pairs: every grid-adjacent pair (0 < d < radius) vs all distinct pairs (exact up to
    4096 codes, a fixed-seed sample of 2^18 pairs above)."""
    x = torch.as_tensor(features).detach().float().reshape(features.shape[0], -1)
    if x.shape[0] != grid.size:
        raise ValueError(f"map_smoothness needs one row per code ({grid.size} for {grid!r}), got {x.shape[0]}")
    if grid.size < 2:
        raise ValueError("map_smoothness needs at least two codes")
    pairs = adjacent_pairs(grid, radius)
    if pairs.shape[0] == 0:
        raise ValueError(f"{grid!r} has no adjacent code pairs within radius {radius}")
    denom = _mean_all_pairs_distance(x)
    if denom == 0:
        return 1.0  # every code identical: no order to speak of
    return _mean_pair_distance(x, pairs) / denom


def codebook_smoothness(codebook: torch.Tensor, grid: Grid, radius: float = 1.5) -> float:
    """:func:`map_smoothness` on the code vectors e_k (K, D): no decoder needed."""
    return map_smoothness(codebook, grid, radius)


def umatrix(codebook: torch.Tensor, grid: Grid, radius: float = 1.5) -> torch.Tensor:
    """U-matrix (per code): U_k = mean_{j adjacent to k} ||e_j - e_k||, (K,) float32 (0 for isolated codes).
    High ridges separate clusters of similar codes."""
    e = codebook.detach().float()
    pairs = adjacent_pairs(grid, radius).to(e.device)
    d = (e[pairs[:, 0]] - e[pairs[:, 1]]).norm(dim=1)
    total = torch.zeros(grid.size, device=e.device).index_add_(0, pairs[:, 0], d).index_add_(0, pairs[:, 1], d)
    n = torch.zeros(grid.size, device=e.device).index_add_(0, pairs[:, 0], torch.ones_like(d)).index_add_(
        0, pairs[:, 1], torch.ones_like(d))
    return total / n.clamp(min=1)


def topographic_product(codebook: torch.Tensor, grid: Grid) -> float | None:
    """Topographic product (Bauer & Pawelzik 1992)::

        Q1(j, l) = dV(e_j, e_{nA_l(j)}) / dV(e_j, e_{nV_l(j)})
        Q2(j, l) = dA(j, nA_l(j))       / dA(j, nV_l(j))
        P        = 1 / (K (K - 1)) sum_j sum_{k=1}^{K-1} (1 / 2k) sum_{l=1}^{k} log(Q1(j, l) Q2(j, l))

    with nA_l(j) / nV_l(j) the l-th nearest code of j on the grid (dA = grid distance) / in code space
    (dV = Euclidean). Ties change neither ratio. 0 for a perfectly ordered map. O(K^2 log K); returns None
    above 4096 codes or when two codes coincide (a ratio would be 0/0).
    """
    k = grid.size
    if codebook.shape[0] != k:
        raise ValueError(f"topographic_product needs {k} codes for {grid!r}, got {codebook.shape[0]}")
    if k < 2 or k > TOPOGRAPHIC_PRODUCT_MAX_CODES:
        return None
    e = codebook.detach().double().cpu()
    dv = torch.cdist(e, e)
    c = grid.coords()
    da = grid.offset_distance(c[None, :, :] - c[:, None, :])  # float64, unlike grid.distance_matrix()
    eye = torch.eye(k, dtype=torch.bool)
    if bool((dv[~eye] == 0).any()):
        return None
    big = float("inf")
    nv = dv.masked_fill(eye, big).argsort(dim=1, stable=True)[:, :-1]  # (K, K-1): nearest first, self excluded
    na = da.masked_fill(eye, big).argsort(dim=1, stable=True)[:, :-1]
    log_q1 = torch.log(dv.gather(1, na) / dv.gather(1, nv))
    log_q2 = torch.log(da.gather(1, na) / da.gather(1, nv))
    cum = (log_q1 + log_q2).cumsum(1)
    order = torch.arange(1, k, dtype=torch.float64)
    p3 = cum / (2 * order)
    return float(p3.mean())


# ------------------------------------------------------------------------------ decoding the codebook
def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def decode_codebook(model, level: int, image_size, fixed_codes: Sequence[int] | None = None,
                    batch_size: int = 64) -> torch.Tensor:
    """Images (K, C, H, W), normalised space, on the model's device: image k is decoded from latent maps
    where level ``level`` is filled entirely with code k and every other level with ``fixed_codes[level]``
    (default: code 0). Decoded in batches of ``batch_size`` codes, under ``torch.no_grad()``."""
    levels = len(model.quantizers)
    if not 0 <= level < levels:
        raise ValueError(f"level must be in [0, {levels}), got {level}")
    fixed = list(fixed_codes) if fixed_codes is not None else [0] * levels
    if len(fixed) != levels:
        raise ValueError(f"fixed_codes needs one code per level ({levels}), got {fixed}")
    shapes = model.latent_shapes(image_size)
    device = _model_device(model)
    k = model.quantizers[level].codebook_size
    out = []
    with torch.no_grad():
        for start in range(0, k, batch_size):
            codes = torch.arange(start, min(start + batch_size, k), device=device)
            maps = []
            for i, (h, w) in enumerate(shapes):
                if i == level:
                    maps.append(codes.view(-1, 1, 1).expand(-1, h, w))
                else:
                    maps.append(torch.full((codes.numel(), h, w), int(fixed[i]), dtype=torch.long, device=device))
            out.append(model.decode_indices(maps))
    return torch.cat(out)


def _downsample(images: torch.Tensor, max_side: int | None) -> torch.Tensor:
    if max_side is None or max(images.shape[-2:]) <= max_side:
        return images
    scale = max_side / max(images.shape[-2:])
    size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


# ------------------------------------------------------------------------------ index perturbation
def perturbation_uniforms(seed: int, stream: int, positions) -> torch.Tensor:
    """Uniform numbers in [0, 1), float64, one per integer position: ``splitmix64(position + seed c1 + stream
    c2) / 2^64`` (53 bits). A counter-based generator: the number of a position does not depend on how the
    positions are batched, so :func:`evaluate_codebook`'s perturbation does not depend on the batch size."""
    x = np.asarray(torch.as_tensor(positions).reshape(-1).cpu().numpy(), dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(seed % (1 << 64)) * np.uint64(0xD1B54A32D192ED03) + np.uint64(stream) * np.uint64(0x8CB92BA72F3D8DD7)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


def perturb_indices(grid: Grid, indices: torch.Tensor, seed: int, stream: int, first_position: int = 0) -> torch.Tensor:
    """``indices`` (B, ...) with every index moved to a uniformly random grid neighbour
    (:meth:`Grid.random_neighbors`), the choice of element ``j`` (in C order) drawn from
    :func:`perturbation_uniforms` at position ``first_position + j``."""
    u = perturbation_uniforms(seed, stream, torch.arange(first_position, first_position + indices.numel()))
    return grid.random_neighbors(indices, u=u.reshape(indices.shape))


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_codebook(model, images: torch.Tensor, normalizer, batch_size: int = 256, decode: bool = True,
                      smoothness_max_side: int | None = 64, progress: bool = False, return_counts: bool = False,
                      perturbation: bool = True, perturbation_seed: int = 0):
    """All metrics of every quantiser level over a whole uint8 image set (N, C, H, W).

    Runs ``model(normalizer.normalize(batch))`` under ``torch.no_grad()`` with the model in eval mode (no
    codebook changes; every module's previous mode is restored), capturing each quantiser's input z with a
    forward hook. Returns a flat JSON-serialisable dict::

        num_images, recon_mse                       # MSE(reconstruction, normalised image), mean over pixels
        {level}/perplexity, /used_codes, /dead_fraction, /quantization_mse, /quantization_error,
        {level}/topographic_error, /codebook_smoothness, /topographic_product, /most_used_code,
        {level}/map_smoothness                      # with decode=True; pixels in [0, 1], at most
                                                    # smoothness_max_side px a side (area-downsampled)
        {level}/perturbation_mse_ratio              # with perturbation=True (one more decode per level and
                                                    # batch); seeded by perturbation_seed; None when K = 1

    ``level`` is ``model.level_names[i]`` ("bottom" for VQ-VAE, "top" and "bottom" for VQ-VAE-2). For VQ-VAE-2
    the decoded images of one level fix the other level to its most used code.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise ValueError("evaluate_codebook needs a non-empty uint8 (N, C, H, W) image tensor (ImageSet.images); "
                         f"got {getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    names = list(getattr(model, "level_names", [f"level{i}" for i in range(len(model.quantizers))]))
    quantizers = list(model.quantizers)
    before = [q.codebook.detach().clone() for q in quantizers]
    counts = [torch.zeros(q.codebook_size, dtype=torch.float64, device=device) for q in quantizers]
    sums = [dict(sq=0.0, norm=0.0, te=0.0, n=0, dim=q.dim) for q in quantizers]
    recon_sq, recon_n = 0.0, 0
    perturb = perturbation and hasattr(model, "decode_indices")
    perturbed_sq = [0.0 for _ in quantizers]

    def make_hook(i):
        def hook(module, inputs, output):
            z, _ = module._to_vectors(inputs[0])
            if hasattr(module, "assignment_space"):
                z, codes = module.assignment_space(z)
            else:
                codes = module.codebook
            k1, k2, d1 = nearest_two(z, codes)
            counts[i].add_(torch.bincount(k1, minlength=module.codebook_size).double())
            s = sums[i]
            s["sq"] += float(d1.double().sum())
            s["norm"] += float(d1.double().sqrt().sum())
            if module.codebook_size > 1:
                s["te"] += float((~adjacent(module.grid, k1, k2)).double().sum())
            s["n"] += z.shape[0]
        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [q.register_forward_hook(make_hook(i)) for i, q in enumerate(quantizers)]
    try:
        model.eval()
        batches = range(0, len(images), batch_size)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="evaluating codebook", unit="batch")
        with torch.no_grad():
            for start in batches:
                x = normalizer.normalize(images[start:start + batch_size].to(device))
                out = model(x)
                recon_sq += float((out.reconstruction.float() - x).square().double().sum())
                recon_n += x.numel()
                if perturb:
                    for i, q in enumerate(quantizers):
                        if q.codebook_size < 2:
                            continue
                        maps = list(out.indices)
                        first = start * maps[i][0].numel()  # the position of this batch's first index
                        maps[i] = perturb_indices(q.grid, maps[i], perturbation_seed, i, first)
                        rec = model.decode_indices(maps)
                        perturbed_sq[i] += float((rec.float() - x).square().double().sum())
            result = {"num_images": int(len(images)), "recon_mse": recon_sq / recon_n}
            most_used = [int(c.argmax()) for c in counts]
            for i, (name, q) in enumerate(zip(names, quantizers)):
                s = sums[i]
                usage = code_usage(counts[i])
                result[f"{name}/perplexity"] = usage["perplexity"]
                result[f"{name}/used_codes"] = usage["used_codes"]
                result[f"{name}/dead_fraction"] = usage["dead_fraction"]
                result[f"{name}/most_used_code"] = most_used[i]
                result[f"{name}/quantization_mse"] = s["sq"] / (s["n"] * s["dim"])
                result[f"{name}/quantization_error"] = s["norm"] / s["n"]
                result[f"{name}/topographic_error"] = s["te"] / s["n"] if q.codebook_size > 1 else None
                result[f"{name}/codebook_smoothness"] = codebook_smoothness(q.codebook, q.grid) if q.codebook_size > 1 else None
                result[f"{name}/topographic_product"] = topographic_product(q.codebook, q.grid)
                if perturb:
                    result[f"{name}/perturbation_mse_ratio"] = (
                        perturbed_sq[i] / recon_sq if q.codebook_size > 1 and recon_sq > 0 else None)
                if decode and q.codebook_size > 1:
                    dec = decode_codebook(model, i, tuple(images.shape[-2:]), most_used, batch_size=min(batch_size, 64))
                    pixels = _downsample(normalizer.denormalize(dec), smoothness_max_side)
                    result[f"{name}/map_smoothness"] = map_smoothness(pixels, q.grid)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    for q, b in zip(quantizers, before):
        if not torch.equal(q.codebook.detach(), b):  # a contract violation, never expected
            raise RuntimeError("evaluate_codebook changed a codebook; the model must not update in eval mode")
    result = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    return (result, [c.cpu() for c in counts]) if return_counts else result
