"""Collapse fixes (issue 12 item 1): codebook initialisations, k-means initialisation, dead-code restarts,
on hand-checkable inputs, against an independent Lloyd's algorithm, across two gloo ranks and a resume."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kohonen_vae import EMAQuantizer, GDSOMQuantizer, GradientQuantizer, KohonenQuantizer
from kohonen_vae.quantizers.collapse import initial_codebook, kmeans


# ---------------------------------------------------------------------------------- initialisations
def test_uniform_init_is_vector_quantize_pytorch_uniform_init():
    """kaiming_uniform_ of a (1, K, D) tensor (fan-in K D), which is vector-quantize-pytorch's uniform_init."""
    torch.manual_seed(7)
    ours = initial_codebook("uniform", 512, 64)
    torch.manual_seed(7)
    ref = torch.empty(1, 512, 64)
    torch.nn.init.kaiming_uniform_(ref)
    assert torch.equal(ours, ref[0])
    assert float(ours.abs().max()) <= math.sqrt(6 / (512 * 64)) and float(ours.abs().max()) > 0.9 * math.sqrt(6 / (512 * 64))
    try:
        from vector_quantize_pytorch.vector_quantize_pytorch import uniform_init
    except ImportError:
        return
    torch.manual_seed(7)
    assert torch.equal(ours, uniform_init(1, 512, 64)[0])


def test_normal_init_is_the_papers_and_the_default():
    torch.manual_seed(3)
    vq = KohonenQuantizer(8, 32)
    torch.manual_seed(3)
    assert torch.equal(vq.codebook, torch.randn(32, 8)) and torch.equal(vq.embed_sum, vq.codebook)
    torch.manual_seed(3)
    uni = EMAQuantizer(8, 32, codebook_init="uniform")
    assert float(uni.codebook.abs().max()) <= math.sqrt(6 / 256)
    torch.manual_seed(3)
    assert torch.equal(GradientQuantizer(8, 32, codebook_init="uniform").codebook.detach(), uni.codebook)


# ------------------------------------------------------------------------------------------ k-means
def lloyd_reference(z, means, iters):
    """Lloyd's algorithm in float64 with explicit loops over clusters (independent of the package)."""
    z, means = z.double(), means.double().clone()
    for _ in range(iters):
        assign = torch.cdist(z, means).argmin(1)
        counts = torch.zeros(len(means), dtype=torch.float64)
        for k in range(len(means)):
            members = z[assign == k]
            counts[k] = len(members)
            if len(members):
                means[k] = members.mean(0)
    return means, counts


def test_kmeans_equals_an_independent_lloyd():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 3, generator=gen) * 4
    z = centres[torch.randint(0, 5, (300,), generator=gen)] + torch.randn(300, 3, generator=gen)
    start = z[:6].clone()
    means, counts = kmeans(z, start, 10)
    ref_means, ref_counts = lloyd_reference(z, start, 10)
    assert torch.allclose(means.double(), ref_means, atol=1e-5)
    assert torch.equal(counts.double(), ref_counts) and int(counts.sum()) == 300


@pytest.mark.parametrize("cls", [KohonenQuantizer, EMAQuantizer, GradientQuantizer])
def test_kmeans_init_on_two_obvious_clusters(cls):
    """Four points, two clusters: whatever two points start, Lloyd ends at the cluster means, each with 2."""
    z = torch.tensor([[0.0, 0.0], [0.2, 0.0], [10.0, 0.0], [10.4, 0.0]])
    for seed in range(5):
        torch.manual_seed(seed)
        kwargs = {"grid_shape": (2,)} if cls is not EMAQuantizer else {}
        vq = cls(2, 2, kmeans_init=True, **kwargs).train()
        assert not bool(vq.initted)
        vq(z)
        assert bool(vq.initted)
        codes = sorted(vq.codebook.detach()[:, 0].tolist())
        # k-means: e = (0.1, 10.2), N = (2, 2), m = e N; then the same forward applies one update, whose
        # assignment agrees: EMA-VQ and the gradient codebook stay; KSOM's hard kernel at t = 0 (the two
        # codes are neighbours, weight 1) gives c~ = (4, 4), S~ = (20.6, 20.6) and N = 0.99 * 2 + 0.01 * 4
        if cls is KohonenQuantizer:
            n = 0.99 * 2 + 0.01 * 4
            assert codes == pytest.approx([(0.99 * 0.2 + 0.01 * 20.6) / n, (0.99 * 20.4 + 0.01 * 20.6) / n], abs=1e-5)
            assert vq.cluster_size.tolist() == pytest.approx([n, n], abs=1e-4)
        else:
            assert codes == pytest.approx([0.1, 10.2], abs=1e-5)
        if cls is EMAQuantizer:
            assert vq.cluster_size.tolist() == pytest.approx([2.0, 2.0], abs=1e-4)
        if cls is not GradientQuantizer:
            assert torch.allclose(vq.embed_sum, vq.codebook * vq.cluster_size[:, None], atol=1e-4)


def test_kmeans_init_runs_once_and_never_after_a_load():
    z = torch.tensor([[0.0, 0.0], [0.2, 0.0], [10.0, 0.0], [10.4, 0.0]])
    vq = EMAQuantizer(2, 2, kmeans_init=True).train()
    vq(z)
    vq(z + 100.0)  # a k-means now would jump to ~100: the EMA only moves the codes by 1 %
    assert float(vq.codebook[:, 0].max()) < 15
    state = vq.state_dict()
    assert bool(state["initted"])
    fresh = EMAQuantizer(2, 2, kmeans_init=True).train()
    fresh.load_state_dict(state)
    fresh(z + 100.0)
    assert float(fresh.codebook[:, 0].max()) < 15
    # a state saved without k-means holds a trained codebook: loading it marks the init as done
    plain = EMAQuantizer(2, 2)
    plain(z)
    late = EMAQuantizer(2, 2, kmeans_init=True)
    late.load_state_dict(plain.state_dict())
    assert bool(late.initted)


def test_kmeans_with_fewer_vectors_than_codes():
    torch.manual_seed(0)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    vq = EMAQuantizer(2, 8, kmeans_init=True).train()
    vq(z)
    # every code is one of the vectors (up to the Laplace smoothing of the update after the k-means)
    nearest = torch.cdist(vq.codebook, z).min(1)
    assert float(nearest.values.max()) < 1e-3
    assert set(nearest.indices.tolist()) == {0, 1, 2}


def test_kmeans_init_waits_for_a_batch_with_vectors():
    vq = EMAQuantizer(2, 2, kmeans_init=True).train()
    vq(torch.zeros(0, 2))
    assert not bool(vq.initted)
    vq(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
    assert bool(vq.initted)


# -------------------------------------------------------------------------------- dead-code restarts
def test_restart_by_hand():
    """decay 0.5, N0 = 1: after one step the two unused codes have N = 0.5 (Laplace moves it by ~1e-5) < 0.9,
    so they restart as two distinct batch vectors with N = m / e = reset = 0.9; the used codes follow EMA."""
    vq = EMAQuantizer(2, 4, decay=0.5, threshold_ema_dead_code=0.9).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0], [200.0, 200.0]]))
        vq.embed_sum.copy_(vq.codebook)
    z = torch.tensor([[0.0, 1.0], [1.0, 0.0], [10.0, 1.0], [11.0, 0.0], [9.0, 0.0]])
    vq(z)
    n = torch.tensor([0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 3])
    total = n.sum() + 1.0  # the dead codes' 0.5 + 0.5 count in the Laplace normalisation
    n = (n + 1e-5) / (total + 4e-5) * total
    m = torch.tensor([[0.5 * 0 + 0.5 * 1, 0.5 * 0 + 0.5 * 1], [0.5 * 10 + 0.5 * 30, 0.5 * 0 + 0.5 * 1]])
    assert torch.allclose(vq.codebook[:2], m / n[:, None], atol=1e-5)
    assert vq.cluster_size[2:].tolist() == pytest.approx([0.9, 0.9])
    restarted = [tuple(r) for r in vq.codebook[2:].tolist()]
    assert all(r in {tuple(v) for v in z.tolist()} for r in restarted) and restarted[0] != restarted[1]
    assert torch.allclose(vq.embed_sum[2:], vq.codebook[2:] * 0.9)


def test_at_most_as_many_restarts_as_vectors_least_used_first():
    vq = EMAQuantizer(2, 4, decay=0.5, threshold_ema_dead_code=0.9).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0], [200.0, 200.0]]))
        vq.cluster_size.copy_(torch.tensor([5.0, 1.0, 0.5, 1.5]))
        vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
    vq(torch.tensor([[0.0, 0.5]]))  # one vector: N becomes [3, 0.5, 0.25, 0.75] (Laplace ~1e-5)
    # three codes are dead but only one vector: the least used (code 2) restarts, the rest wait
    assert vq.codebook[2].tolist() == [0.0, 0.5]
    assert vq.codebook[3].tolist() == pytest.approx([200.0, 200.0], rel=1e-4) and vq.cluster_size[3] < 0.9
    assert vq.codebook[1].tolist() == pytest.approx([10.0, 0.0], rel=1e-4)


def test_restart_candidates_are_uniform_over_accumulated_micro_batches():
    """update_in_forward=False: micro-batches of 1 and 3 vectors, one dead code: it restarts as the first
    micro-batch's vector with probability 1/4."""
    hits = 0
    trials = 400
    for seed in range(trials):
        torch.manual_seed(seed)
        vq = EMAQuantizer(1, 2, decay=0.5, threshold_ema_dead_code=0.9, update_in_forward=False).train()
        with torch.no_grad():
            vq.codebook.copy_(torch.tensor([[0.0], [1000.0]]))
            vq.embed_sum.copy_(vq.codebook)
        vq(torch.tensor([[1.0]]))
        vq(torch.tensor([[2.0], [3.0], [4.0]]))
        vq.apply_update()
        assert float(vq.codebook[1]) in (1.0, 2.0, 3.0, 4.0)
        hits += float(vq.codebook[1]) == 1.0
    assert abs(hits / trials - 0.25) < 5 * math.sqrt(0.25 * 0.75 / trials)


def far_data(steps, n=256, dim=8, seed=0):
    """Clusters far from an N(0, I) codebook: a plain EMA-VQ catches them with a handful of codes."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, dim, generator=gen) * 3 + 20
    return [centres[torch.randint(0, 40, (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen)
            for _ in range(steps)]


@pytest.mark.parametrize("make, restarts_help", [
    (lambda **kw: EMAQuantizer(8, 64, **kw), True),
    (lambda **kw: KohonenQuantizer(8, 64, grid_shape=(8, 8), neighborhood="hard", **kw), True),
    # the wide exponential kernel of the first steps gives every code a large smoothed count: none is
    # dead by the threshold yet, so restarts cannot act; k-means still does
    (lambda **kw: KohonenQuantizer(8, 64, grid_shape=(8, 8), neighborhood="exponential", update_unused=False,
                                   **kw), False),
], ids=["ema", "ksom-hard", "ksom-exponential-no-update"])
def test_restarts_and_kmeans_revive_a_collapsed_codebook(make, restarts_help):
    data = far_data(30)
    used = {}
    for name, kw in {"plain": {}, "restarts": {"threshold_ema_dead_code": 1.0},
                     "kmeans": {"kmeans_init": True}}.items():
        torch.manual_seed(0)
        vq = make(**kw).train()
        for z in data:
            vq(z)
        used[name] = int(vq.eval()(torch.cat(data[-3:])).used_codes)
    if restarts_help:
        assert used["restarts"] >= 30 and used["restarts"] > 2 * used["plain"], used
    assert used["kmeans"] >= 30 and used["kmeans"] > used["plain"], used


def test_gradient_quantizer_restarts_use_a_synced_usage_ema():
    torch.manual_seed(0)
    vq = GradientQuantizer(8, 32, threshold_ema_dead_code=0.95, decay=0.9).train()
    z = far_data(1, n=64)[0]
    out = vq(z)
    expected = 0.9 * torch.ones(32) + 0.1 * out.counts  # N = decay N + (1 - decay) c from N = 1
    dead = expected < 0.95
    assert torch.allclose(vq.cluster_size[~dead], expected[~dead])
    assert vq.cluster_size[dead].tolist() == pytest.approx([0.95] * int(dead.sum()))
    rows = {tuple(r) for r in z.tolist()}
    assert int(dead.sum()) > 0 and all(tuple(r) in rows for r in vq.codebook.detach()[dead].tolist())
    assert int(vq.step) == 1
    g = GDSOMQuantizer(8, 32, grid_shape=(8, 4), threshold_ema_dead_code=0.5, kmeans_init=True).train()
    out = g(z)
    out.loss.backward()
    assert bool(g.initted) and g.codebook.grad is not None


# ----------------------------------------------------------------------- determinism and resume
def _run(vq, data):
    for z in data:
        vq(z)
    return vq


@pytest.mark.parametrize("in_forward", [True, False])
def test_resume_continues_identically(in_forward):
    """state_dict + the global RNG state (what the trainer checkpoints) reproduce the continuation bit for bit."""
    data = far_data(10, n=64)

    def make():
        return KohonenQuantizer(8, 64, grid_shape=(8, 8), threshold_ema_dead_code=1.0, kmeans_init=True,
                                codebook_init="uniform", update_in_forward=in_forward).train()

    def step(vq, z):
        vq(z[:40])
        vq(z[40:])
        if not in_forward:
            vq.apply_update()

    torch.manual_seed(0)
    a = make()
    for z in data[:5]:
        step(a, z)
    state, rng = {k: v.clone() for k, v in a.state_dict().items()}, torch.get_rng_state()
    for z in data[5:]:
        step(a, z)
    torch.manual_seed(99)
    b = make()
    b.load_state_dict(state)
    torch.set_rng_state(rng)
    before = b.codebook.clone()
    for z in data[5:]:
        step(b, z)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(before, b.codebook)
    # the run seed decides the restarts: another seed, other restarts
    torch.manual_seed(1)
    c = make()
    for z in data:
        step(c, z)
    assert not torch.equal(c.codebook, a.codebook)


# -------------------------------------------------------------------------------- data parallelism
def _rank_data(rank, steps=6):
    gen = torch.Generator().manual_seed(100 + rank)
    n = 40 if rank == 0 else 24  # uneven batches
    out = [torch.randn(n, 4, generator=gen) * 2 + 10 * rank for _ in range(steps)]
    if rank == 1:
        out[3] = torch.zeros(0, 4)  # one step where this rank has no vectors at all
    return out


def _worker(rank, world, init_file, out_dir, kind):
    torch.manual_seed(1000 + rank)  # deliberately different global RNGs: agreement must not rely on them
    if kind == "ksom":
        vq = KohonenQuantizer(4, 32, grid_shape=(8, 4), kmeans_init=True, kmeans_iters=3,
                              threshold_ema_dead_code=1.5)
    else:
        vq = GradientQuantizer(4, 32, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.5)
    torch.manual_seed(0)
    with torch.no_grad():  # identical starting codebooks (what a seeded trainer builds)
        vq.codebook.copy_(torch.randn(32, 4))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = {"n": 0}
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        vq.train()
        codebooks, restarted = [], 0
        for z in _rank_data(rank):
            vq(z)
            codebooks.append(vq.codebook.detach().clone())
            restarted += int((vq.usage == vq.reset_cluster_size).sum()) if vq.restarts else 0
        torch.save({"codebooks": codebooks, "usage": vq.usage.clone(), "calls": calls["n"], "restarted": restarted},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["ksom", "gradient"])
def test_two_gloo_ranks_restart_and_initialise_identically(tmp_path, kind):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kind), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(r0["codebooks"], r1["codebooks"]):
        assert torch.equal(a, b)  # bit for bit, after every step
    assert torch.equal(r0["usage"], r1["usage"])
    assert r0["restarted"] > 0  # restarts did happen
    # one collective per step (statistics and candidates packed), plus k-means: 1 start + 3 iterations
    assert r0["calls"] == r1["calls"] == 6 + 1 + 3
