"""Issue 17: Gray codes, index assignments, seeded corruptions and the channel experiment on tiny trained runs."""
import itertools
import json
import math

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402

from kohonen_vae import channel  # noqa: E402
from kohonen_vae.channel import (IndexAssignment, binary_assignment, codebook_path, doubling_rate,  # noqa: E402
                                 flip_bits, gray_decode, gray_encode, gray_grid_assignment, path_assignment,
                                 path_length, substitute_neighbor, substitute_random)
from kohonen_vae.geometry import Grid  # noqa: E402


def reflected_gray(bits: int) -> list:
    """The binary-reflected Gray code by its definition: G(b) = 0G(b-1) followed by 1 reverse(G(b-1))."""
    codes = [0]
    for b in range(bits):
        codes = codes + [(1 << b) | c for c in reversed(codes)]
    return codes


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ Gray
def test_gray_code_matches_the_reflected_construction_and_round_trips():
    ref = torch.tensor(reflected_gray(12))
    n = torch.arange(1 << 12)
    assert torch.equal(gray_encode(n), ref)
    assert torch.equal(gray_decode(ref), n)
    # consecutive codes differ in exactly one bit
    diff = gray_encode(n[1:]) ^ gray_encode(n[:-1])
    assert torch.equal(diff & (diff - 1), torch.zeros_like(diff))
    big = torch.randint(0, 1 << 62, (1000,), generator=gen(1))
    assert torch.equal(gray_decode(gray_encode(big)), big)
    # decoding bit by bit: n_i = XOR of the bits of g at and above i
    for g in big[:20].tolist():
        n = 0
        for i in range(63):
            n |= (bin(g >> i).count("1") & 1) << i
        assert int(gray_decode(torch.tensor(g))) == n


def test_gray_code_rejects_negative_and_float_input():
    with pytest.raises(ValueError, match="non-negative"):
        gray_encode(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        gray_decode(torch.tensor([1.0]))


# ------------------------------------------------------------------------------------------ assignments
def grids():
    return [Grid((8, 4)), Grid((5, 3)), Grid((7,)), Grid((3, 4, 5)), Grid((6, 5), topology="hexagonal"),
            Grid((8, 8), topology="hexagonal"), Grid((8, 8), periodic=True), Grid((5, 6), periodic=True),
            Grid((6, 4), periodic=True, topology="hexagonal")]


def all_assignments():
    torch.manual_seed(0)
    out = [binary_assignment(512), binary_assignment(37), binary_assignment(1)]
    out += [gray_grid_assignment(g) for g in grids()]
    out += [path_assignment(torch.randn(37, 5)), path_assignment(torch.randn(64, 3))]
    return out


@pytest.mark.parametrize("a", all_assignments(), ids=repr)
def test_every_assignment_is_a_bijection_and_every_pattern_decodes_into_range(a):
    k = torch.arange(a.size)
    patterns = a.encode(k)
    assert torch.unique(patterns).numel() == a.size  # injective
    assert int(patterns.min()) >= 0 and int(patterns.max()) < 1 << a.bits
    assert torch.equal(a.decode(patterns), k)
    everything = a.decode(torch.arange(1 << a.bits))  # also the out-of-range patterns (mirrored)
    assert int(everything.min()) >= 0 and int(everything.max()) < a.size


def test_binary_is_the_plain_index_and_out_of_range_values_are_mirrored():
    a = binary_assignment(5)  # 3 bits; patterns 5, 6, 7 are out of range
    assert a.bits == 3 and torch.equal(a.encode(torch.arange(5)), torch.arange(5))
    assert a.decode(torch.arange(8)).tolist() == [0, 1, 2, 3, 4, 3, 2, 1]  # v -> 2 (5 - 1) - v
    assert binary_assignment(512).bits == 9 and binary_assignment(1).bits == 0


def test_gray_grid_fields_are_the_gray_coded_coordinates():
    grid = Grid((5, 3))  # fields of 3 and 2 bits, field 0 (first axis) in the low bits
    a = gray_grid_assignment(grid)
    gray3, gray2 = reflected_gray(3), reflected_gray(2)
    for k in range(grid.size):
        c0, c1 = grid.index_to_coords(k).tolist()
        assert int(a.encode(torch.tensor(k))) == gray3[c0] | (gray2[c1] << 3)


@pytest.mark.parametrize("grid", grids() + [None], ids=lambda g: repr(g) if g else "FSQ lattice")
def test_a_low_bit_flip_of_a_gray_grid_assignment_moves_to_a_grid_neighbour(grid):
    if grid is None:  # FSQ's grid is its level lattice
        pytest.importorskip("vector_quantize_pytorch")
        from kohonen_vae.quantizers.vqp import VQPQuantizer

        grid = VQPQuantizer(8, None, cls="FSQ", options={"levels": [8, 5, 4]}).grid
        assert grid == Grid((8, 5, 4))
    a = gray_grid_assignment(grid)
    k = torch.arange(grid.size)
    patterns = a.encode(k)
    for field, (off, size) in enumerate(zip(a.offsets, a.radices)):
        if size == 1:
            continue
        moved = a.decode(patterns ^ (1 << off))
        d = grid.distance(k, moved)
        assert torch.allclose(d, torch.ones_like(d)), (grid, field)  # a distance-1 neighbour, always a new code
        delta = grid.index_to_coords(moved) - grid.index_to_coords(k)
        others = [i for i in range(grid.ndim) if i != field]
        assert (delta[:, field].abs() == 1).all() and (delta[:, others] == 0).all()
        for j in range(grid.size):  # and it is one of the neighbours the grid itself lists
            assert int(moved[j]) in grid.neighbours(j).tolist()


def test_a_low_bit_flip_of_the_path_assignment_moves_one_step_along_the_path():
    torch.manual_seed(3)
    codes = torch.randn(50, 4)
    a = path_assignment(codes)
    pos = a.rank
    moved = a.decode(a.encode(torch.arange(50)) ^ 1)
    assert ((pos[moved] - pos).abs() == 1).all()


# ------------------------------------------------------------------------------------------------- path
def test_path_recovers_the_order_of_points_on_a_line():
    t = torch.rand(40, generator=gen(2)).sort().values
    direction = torch.randn(6, generator=gen(3))
    perm = torch.randperm(40, generator=gen(4))
    codes = (t[:, None] * direction[None])[perm]  # shuffled points on a line
    order = codebook_path(codes)
    assert sorted(order.tolist()) == list(range(40))
    along = t[perm][order]
    assert (along.diff() > 0).all() or (along.diff() < 0).all()


def test_path_is_a_local_optimum_of_2_opt_and_shorter_than_index_order():
    codes = torch.randn(30, 3, generator=gen(5)).double()
    order = codebook_path(codes)
    length = path_length(codes, order)
    assert length < path_length(codes, torch.arange(30))
    # brute force: no reversal of a stretch order[i..j] (including prefixes and suffixes) shortens the path
    o = order.tolist()
    for i, j in itertools.combinations(range(31), 2):
        candidate = o[:i] + o[i:j][::-1] + o[j:]
        assert path_length(codes, torch.tensor(candidate)) >= length - 1e-9


def test_assignment_rejects_a_non_permutation_and_out_of_range_indices():
    with pytest.raises(ValueError, match="permutation"):
        IndexAssignment("x", (4,), gray=True, order=[0, 1, 1, 3])
    with pytest.raises(ValueError, match="out of range"):
        binary_assignment(8).encode(torch.tensor([8]))
    with pytest.raises(ValueError, match="probability"):
        flip_bits(torch.tensor([1]), binary_assignment(8), 1.5)


# ------------------------------------------------------------------------------------------- corruption
CORRUPTIONS = {
    "flip_bits": lambda idx, g: flip_bits(idx, binary_assignment(32), 0.1, g),
    "flip_bits gray-grid": lambda idx, g: flip_bits(idx, gray_grid_assignment(Grid((8, 4))), 0.1, g),
    "substitute_random": lambda idx, g: substitute_random(idx, 32, 0.3, g),
    "substitute_neighbor": lambda idx, g: substitute_neighbor(idx, Grid((8, 4)), 0.3, g),
    "substitute_neighbor path": lambda idx, g: substitute_neighbor(idx, Grid((32,)), 0.3, g,
                                                                  order=torch.randperm(32, generator=gen(9))),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_deterministic_under_a_seed_and_leaves_the_input_unchanged(name):
    fn = CORRUPTIONS[name]
    idx = torch.randint(0, 32, (4, 8, 8), generator=gen(0)).to(torch.int32)
    before = idx.clone()
    a, b, c = fn(idx, gen(1)), fn(idx, gen(1)), fn(idx, gen(2))
    assert torch.equal(idx, before)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, idx)
    assert a.shape == idx.shape and a.dtype == idx.dtype and a.data_ptr() != idx.data_ptr()
    assert int(a.min()) >= 0 and int(a.max()) < 32


@pytest.mark.parametrize("name", ["flip", "random", "neighbor"])
def test_zero_rate_returns_the_indices_exactly(name):
    idx = torch.randint(0, 32, (3, 8, 8), generator=gen(0))
    out = {"flip": lambda: flip_bits(idx, gray_grid_assignment(Grid((8, 4))), 0.0, gen()),
           "random": lambda: substitute_random(idx, 32, 0.0, gen()),
           "neighbor": lambda: substitute_neighbor(idx, Grid((8, 4)), 0.0, gen())}[name]()
    assert torch.equal(out, idx)


def test_bit_flip_rate_and_positions_are_statistically_right():
    n, p = 40000, 0.01
    a = binary_assignment(512)  # all 512 patterns valid: the received pattern is the sent one XOR the mask
    idx = torch.randint(0, 512, (n,), generator=gen(0))
    flipped = a.encode(flip_bits(idx, a, p, gen(1))) ^ a.encode(idx)
    per_bit = torch.stack([(flipped >> j) & 1 for j in range(9)]).sum(1).double()
    total, expected = float(per_bit.sum()), n * 9 * p
    assert abs(total - expected) < 4 * math.sqrt(n * 9 * p * (1 - p))
    assert (per_bit - n * p).abs().max() < 5 * math.sqrt(n * p * (1 - p))  # every bit position flips at rate p
    # the same uniforms, read independently: bit j of token t flips iff u[t, j] < p
    u = torch.rand((n, 9), generator=gen(1), dtype=torch.float64)
    mask = sum(((u[:, j] < p).long() << j) for j in range(9))
    assert torch.equal(flipped, mask)


def test_substitution_rates_and_targets_are_right():
    n, q = 40000, 0.2
    idx = torch.randint(0, 32, (n,), generator=gen(0))
    out = substitute_random(idx, 32, q, gen(1))
    changed = out != idx
    assert abs(float(changed.double().mean()) - q) < 4 * math.sqrt(q * (1 - q) / n)
    # replacements are uniform over the other 31 codes: chi-square over codes for tokens of code 0
    zero = (idx == 0) & changed
    counts = torch.bincount(out[zero], minlength=32).double()
    assert counts[0] == 0
    e = counts[1:].sum() / 31
    chi2 = float(((counts[1:] - e) ** 2 / e).sum())
    assert chi2 < 70  # 30 degrees of freedom: P(chi2 > 70) < 1e-4
    grid = Grid((8, 4))
    out = substitute_neighbor(idx, grid, q, gen(2))
    changed = out != idx
    assert abs(float(changed.double().mean()) - q) < 4 * math.sqrt(q * (1 - q) / n)
    d = grid.distance(idx[changed], out[changed])
    assert (d > 0).all() and (d < 1.5).all()
    order = torch.randperm(32, generator=gen(3))
    out = substitute_neighbor(idx, Grid((32,)), q, gen(4), order=order)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(32)
    changed = out != idx
    assert ((rank[out[changed]] - rank[idx[changed]]).abs() == 1).all()


# ------------------------------------------------------------------------------------------ doubling
def test_doubling_rate_is_exact_for_a_power_law_and_reports_bounds():
    clean = 0.1
    rates = [1e-4, 1e-3, 1e-2, 1e-1]
    mse = [clean * 1.1, clean * 1.5, clean * 1.5 * 10 ** 0.5, clean * 20]  # 1.5 -> 4.74 clean: r^0.5 in between
    out = doubling_rate(rates, mse, clean)
    # log MSE linear in log r between 1e-3 and 1e-2: 2 = 1.5 (r / 1e-3)^0.5  ->  r = 1e-3 (4/3)^2
    assert out["bound"] == "interpolated" and out["rate"] == pytest.approx(1e-3 * (4 / 3) ** 2, rel=1e-12)
    assert doubling_rate(rates, [clean * 1.2] * 4, clean) == {"rate": None, "bound": "above", "text": "> 0.1"}
    assert doubling_rate(rates, [clean * 3] * 4, clean)["text"] == "< 1.0e-4"
    # the first crossing counts, even if a later point dips below again; the points need not come sorted
    out = doubling_rate(rates[::-1], [clean * 1.9, clean * 2.5, clean * 1.0, clean * 1.0][::-1], clean)
    t = math.log(2 / 1.9) / math.log(2.5 / 1.9)  # between 1e-4 (1.9 clean) and 1e-3 (2.5 clean)
    assert out["rate"] == pytest.approx(10 ** (-4 + t), rel=1e-12)
    with pytest.raises(ValueError, match="positive"):
        doubling_rate([0.0, 0.1], [1.0, 2.0], 0.5)


# ------------------------------------------------------------------------------------- tiny trained runs
@pytest.fixture(scope="module")
def tiny_field(tmp_path_factory):
    pytest.importorskip("vector_quantize_pytorch", reason="the field runs need pip install 'kohonen-vae[field]'")
    from kohonen_vae.reproduce import run_experiment

    root = tmp_path_factory.mktemp("channel")
    run_experiment("field", root, "tiny", 1, only=["EMA-VQ", "KSOM hard", "FSQ 8x8x8", "SimVQ"], log=lambda *a: None)
    return root


def test_zero_rate_decodes_to_the_clean_reconstruction_bit_for_bit(tiny_field):
    from kohonen_vae.data import load_splits
    from kohonen_vae.report import load_run

    run = load_run(tiny_field / "field-tiny" / "fsq-8x8x8" / "seed0", device="cpu")
    x = run.normalizer.normalize(load_splits("sample").test.images[:40])
    idx = run.model.encode(x, batch_size=16)
    with torch.no_grad():
        clean = run.model.decode_indices(idx, batch_size=16)
        q = run.model.quantizers[0]
        for a in channel.assignments_for(q).values():
            assert torch.equal(run.model.decode_indices([flip_bits(idx[0], a, 0.0, gen())], batch_size=16), clean)
        for corrupted in (substitute_random(idx[0], q.codebook_size, 0.0, gen()),
                          substitute_neighbor(idx[0], q.grid, 0.0, gen())):
            assert torch.equal(run.model.decode_indices([corrupted], batch_size=16), clean)


def test_channel_experiment_end_to_end_on_tiny_field_runs(tiny_field):
    from kohonen_vae.data import evaluation_subset, load_splits
    from kohonen_vae.report import load_run

    runs = channel.field_run_dirs(tiny_field, "tiny")
    assert list(runs) == ["EMA-VQ", "KSOM hard", "FSQ 8x8x8", "SimVQ"]
    bit_rates, sub_rates = (0.01, 0.1, 0.4), (0.1, 0.5, 1.0)
    out = channel.channel_from_field(tiny_field, "tiny", images=48, bit_rates=bit_rates, sub_rates=sub_rates,
                                     show_images=3, batch_size=16, progress=False, log=lambda *a: None)
    root = tiny_field / "channel-tiny"
    for name in ("channel.json", "results.md", "channel_bits.png", "channel_substitution.png", "channel_images.png"):
        assert (root / name).stat().st_size > 0
    data = json.loads((root / "channel.json").read_text())
    assert data == json.loads(json.dumps(out["data"])) and data["images"] == 48
    m = data["methods"]
    assert [g["kind"] for g in (m[k]["grid"][0] for k in runs)] == ["index order", "trained", "lattice", "index order"]
    assert m["FSQ 8x8x8"]["bits"]["gray-grid"]["bits_per_token"] == [9] and m["SimVQ"]["bits"]["path"]["bits_per_token"] == [5]

    # one point recomputed independently: same images, same seeded corruption, MSE and PSNR by hand
    images = evaluation_subset(load_splits("sample").test.images, 48, 0)
    run = load_run(runs["KSOM hard"], device="cpu")
    x = run.normalizer.normalize(images)
    idx = run.model.encode(x, batch_size=16)[0]
    q = run.model.quantizers[0]
    with torch.no_grad():
        clean = run.model.decode_indices([idx], batch_size=16)
        assert m["KSOM hard"]["clean"]["mse"] == pytest.approx(float(((clean - x) ** 2).mean()), rel=1e-6)
        corrupted = flip_bits(idx, gray_grid_assignment(q.grid), 0.1, channel._generator(0, "bits", 1))
        dec = run.model.decode_indices([corrupted], batch_size=16)
    point = m["KSOM hard"]["bits"]["gray-grid"]["points"][1]
    assert point["rate"] == 0.1
    assert point["mse"] == pytest.approx(float(((dec - x) ** 2).mean()), rel=1e-6)
    pix = ((run.normalizer.denormalize(dec) * 255 - images.float()) ** 2).mean()
    assert point["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / float(pix)), rel=1e-5)
    assert point["token_error_rate"] == pytest.approx(float((corrupted != idx).double().mean()))
    # q = 1: every token is wrong; bits at p = 0.4 on 5 bits: 1 - 0.6^5 of the tokens change
    for label in runs:
        assert m[label]["substitution"]["random"]["points"][-1]["token_error_rate"] == 1.0
        te = m[label]["bits"]["binary"]["points"][-1]["token_error_rate"]
        bits = m[label]["bits"]["binary"]["bits_per_token"][0]
        assert abs(te - (1 - 0.6 ** bits)) < 0.05
    # the table shows what doubling_rate says of the stored points
    table = (root / "results.md").read_text()
    for label, mm in m.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        for col, a in zip(cells[5:8], channel.ASSIGNMENTS):
            pts = mm["bits"][a]["points"]
            expected = doubling_rate([pt["rate"] for pt in pts], [pt["mse"] for pt in pts], mm["clean"]["mse"])
            assert col.rstrip("*") == expected["text"] == mm["bits"][a]["doubling"]["text"]
    assert "kohonen-vae reproduce channel --scale tiny" in table
    assert "| SimVQ | 8x4 index order | 5 |" in table and "*" in table
