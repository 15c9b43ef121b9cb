"""vector-quantize-pytorch's quantisers behind our interface (issue 12 item 2)."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kohonen_vae.quantizers import QuantizerOutput, VQPQuantizer

CASES = {
    "VectorQuantize": dict(codebook_size=32, options={"decay": 0.9}),
    "VectorQuantize-straight-through": dict(codebook_size=32, options={"rotation_trick": False}),
    "VectorQuantize-kmeans-restarts": dict(codebook_size=32, options={"kmeans_init": True,
                                                                     "threshold_ema_dead_code": 2}),
    "FSQ": dict(codebook_size=None, options={"levels": [4, 3, 5]}),
    "FSQ-projected": dict(codebook_size=60, options={"levels": [4, 3, 5]}),
    "SimVQ": dict(codebook_size=32, options={}),
}


def make(case, dim=8, **kw):
    pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed (the field extra)")
    spec = CASES[case]
    cls = case.split("-")[0]
    d = 3 if case == "FSQ" else dim  # plain FSQ: the latent is the lattice itself (no projections)
    return VQPQuantizer(d, spec["codebook_size"], cls=cls, options=spec["options"], **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_telemetry_and_codes_agree_with_the_wrapped_module(case):
    torch.manual_seed(0)
    vq = make(case).train()
    d, k = vq.dim, vq.codebook_size
    for _ in range(3):
        out = vq(torch.randn(4, 10, d) * 2)
    assert isinstance(out, QuantizerOutput) and out.quantized.shape == (4, 10, d) and out.indices.shape == (4, 10)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert torch.equal(out.counts, torch.bincount(out.indices.flatten(), minlength=k).float())
    assert 1 <= float(out.perplexity) <= k and int(out.used_codes) == int((out.counts > 0).sum())
    assert int(vq.step) == 3
    vq.eval()
    x = torch.randn(4, 10, d) * 2
    out = vq(x)
    assert vq.codebook.shape == (k, d)
    # the codebook in the output space: the output of an index is its code (the rotation trick: up to rounding)
    assert torch.allclose(vq.get_output_from_indices(out.indices), out.quantized, atol=1e-5)
    assert torch.allclose(vq.get_codes_from_indices(out.indices), out.quantized, atol=1e-5)
    # assignment space: the index is the nearest code there (what the metrics rely on)
    vectors, codes = vq.assignment_space(x.reshape(-1, d))
    dist_ = torch.cdist(vectors.double(), codes.double())
    chosen = dist_.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen - dist_.min(1).values < 1e-5)


@pytest.mark.parametrize("case", ["VectorQuantize", "FSQ-projected", "SimVQ"])
def test_image_feature_maps_and_gradients(case):
    torch.manual_seed(0)
    vq = make(case, accept_image_fmap=True).train()
    x = torch.randn(2, 8, 4, 5, requires_grad=True)
    out = vq(x)
    assert out.quantized.shape == (2, 8, 4, 5) and out.indices.shape == (2, 4, 5)
    (out.quantized.square().sum() + out.loss).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    vq.eval()
    out = vq(x.detach())
    assert torch.allclose(vq.get_codes_from_indices(out.indices), out.quantized, atol=1e-5)
    flat = make(case).eval()
    flat.load_state_dict(vq.state_dict())
    assert torch.equal(flat(x.detach().permute(0, 2, 3, 1)).indices, out.indices)


def test_fsq_grid_is_its_level_lattice():
    vq = make("FSQ")
    fsq = vq.inner
    assert vq.grid.shape == (4, 3, 5) and vq.codebook_size == 60
    k = torch.arange(60)
    assert torch.equal(vq.grid.index_to_coords(k), fsq.indices_to_level_indices(k).long())
    for a in range(60):  # every grid-axis neighbour differs by exactly one level in exactly one dimension
        for axis in range(3):
            for step in (-1, 1):
                coords = vq.grid.index_to_coords(torch.tensor(a)).clone()
                coords[axis] += step
                if not 0 <= int(coords[axis]) < vq.grid.shape[axis]:
                    continue
                b = vq.grid.coords_to_index(coords)
                diff = fsq.indices_to_level_indices(b).long() - fsq.indices_to_level_indices(torch.tensor(a)).long()
                assert diff.abs().sum() == 1 and int(diff[axis]) == step
    # so the codes of grid neighbours are one quantisation step apart in one coordinate
    codes = vq.codebook
    d = (codes[vq.grid.shift(k, (1, 0, 0))] - codes).abs()
    moved = vq.grid.index_to_coords(k)[:, 0] < 3
    assert torch.all(d[moved, 1:] == 0) and torch.all(d[moved, 0] > 0)
    with pytest.raises(ValueError, match="imply 60 codes"):
        VQPQuantizer(3, 64, cls="FSQ", options={"levels": [4, 3, 5]})
    with pytest.raises(ValueError, match="level lattice"):
        VQPQuantizer(3, cls="FSQ", options={"levels": [4, 3, 5]}, grid_shape=(60,))


def test_state_dict_resume_continues_identically():
    torch.manual_seed(0)
    a = make("VectorQuantize-kmeans-restarts").train()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(3, 16, 8, generator=gen) + 4 for _ in range(6)]
    for x in data[:3]:
        a(x)
    state, rng = {k: v.clone() for k, v in a.state_dict().items()}, torch.get_rng_state()
    assert {"step", "geometry", "inner._codebook.embed", "inner._codebook.cluster_size",
            "inner._codebook.initted"} <= set(state)
    outs_a = [a(x) for x in data[3:]]
    torch.manual_seed(5)
    b = make("VectorQuantize-kmeans-restarts").train()
    b.load_state_dict(state)
    torch.set_rng_state(rng)
    outs_b = [b(x) for x in data[3:]]
    for oa, ob in zip(outs_a, outs_b):
        assert torch.equal(oa.indices, ob.indices) and torch.equal(oa.quantized, ob.quantized)
    assert torch.equal(a.codebook, b.codebook)


def test_bad_options_are_one_line_errors():
    pytest.importorskip("vector_quantize_pytorch")
    with pytest.raises(ValueError, match="choose one of"):
        VQPQuantizer(8, 32, cls="ResidualVQ")
    with pytest.raises(ValueError, match="set by the wrapper"):
        VQPQuantizer(8, 32, options={"accept_image_fmap": True})
    with pytest.raises(ValueError, match="needs options"):
        VQPQuantizer(8, cls="FSQ")
    with pytest.raises(ValueError, match="needs a codebook_size"):
        VQPQuantizer(8)
    with pytest.raises(ValueError, match="heads"):
        VQPQuantizer(8, 32, options={"heads": 2})
    with pytest.raises(TypeError):
        VQPQuantizer(8, 32, options={"no_such_option": 1})


def test_empty_batch():
    vq = make("VectorQuantize").train()
    out = vq(torch.zeros(0, 8))
    assert out.quantized.shape == (0, 8) and out.loss.item() == 0.0 and int(vq.step) == 0


def test_missing_dependency_is_a_one_line_error_with_exit_code_2(monkeypatch):
    from kohonen_vae.errors import MissingDependencyError, run_command
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # `import` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'kohonen-vae\[field\]'") as info:
        VQPQuantizer(8, 32)
    assert isinstance(info.value, ImportError) and "\n" not in str(info.value)
    assert run_command("train", VQPQuantizer, 8, 32) == 2


def test_the_config_system_builds_and_trains_each_class():
    pytest.importorskip("vector_quantize_pytorch")
    import torch.nn.functional as F
    from kohonen_vae.models import build_model
    tiny = {"arch": "vqvae", "channels": 8, "res_channels": 4, "num_res_blocks": 1, "embed_dim": 4}
    for q in ({"type": "vqp", "cls": "VectorQuantize", "codebook_size": 16, "options": {"rotation_trick": True}},
              {"type": "vqp", "cls": "FSQ", "codebook_size": 27, "options": {"levels": [3, 3, 3]}},
              {"type": "vqp", "cls": "SimVQ", "codebook_size": 16}):
        torch.manual_seed(0)
        model = build_model({**tiny, "quantizer": q}).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(2, 3, 16, 16)
        for _ in range(2):
            out = model(x)
            loss = F.mse_loss(out.reconstruction, x) + out.commitment_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.isfinite(loss) and out.indices[0].shape == (2, 4, 4)
        with torch.no_grad():
            assert model.decode_indices(model.encode_indices(x)).shape == x.shape


# --------------------------------------------------------------------------- data parallelism
def _worker(rank, world, init_file, out_dir):
    torch.manual_seed(0)
    # built before the process group exists, as a trainer may do: the wrapper still syncs the EMA
    vq = VQPQuantizer(4, 16, options={"decay": 0.8, "kmeans_init": True, "threshold_ema_dead_code": 1})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(10 + rank)
        vq.train()
        for _ in range(4):
            vq(torch.randn(1, 24, 4, generator=gen) * (1 + 3 * rank))  # different data on every rank
        torch.save({"codebook": vq.codebook.detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vector_quantize_built_before_the_process_group_stays_identical_on_two_ranks(tmp_path):
    pytest.importorskip("vector_quantize_pytorch")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["codebook"], r1["codebook"])


def test_evaluate_codebook_measures_fsq_in_its_own_assignment_space():
    """FSQ's second-nearest lattice code is always one level away in one dimension: with the metrics taken
    in its assignment space the topographic error is exactly 0, and every metric is there."""
    pytest.importorskip("vector_quantize_pytorch")
    from kohonen_vae.data import Normalizer
    from kohonen_vae.metrics import evaluate_codebook
    from kohonen_vae.models import build_model
    torch.manual_seed(0)
    model = build_model({"arch": "vqvae", "channels": 8, "res_channels": 4, "num_res_blocks": 1, "embed_dim": 3,
                         "quantizer": {"type": "vqp", "cls": "FSQ", "codebook_size": 60,
                                       "options": {"levels": [4, 3, 5]}}})
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    r = evaluate_codebook(model, images, Normalizer([0.5] * 3, [0.25] * 3), decode=False)
    assert r["bottom/topographic_error"] == 0.0
    assert r["bottom/used_codes"] >= 1 and r["bottom/perturbation_mse_ratio"] > 0
    assert r["bottom/codebook_smoothness"] < 1  # a lattice: neighbours are close by construction
