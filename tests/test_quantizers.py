"""Quantisers against an independent dense implementation of the spec's equations, and their contracts."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kohonen_vae import (EMAQuantizer, GDSOMQuantizer, GradientQuantizer, KohonenQuantizer, NonFiniteInputError,
                         apply_pending_updates)
from kohonen_vae.quantizers import perplexity_from_counts


# ----------------------------------------------------------------------------- the dense reference
def dense_neighbourhood(shape, name, t, tau=0.1, sigma=10.0):
    """P_t (K x K) in float64 from divmod coordinates (first axis fastest) and the spec's kernels."""
    k = math.prod(shape)
    coords = []
    for i in range(k):
        c = []
        for s in shape:
            i, r = divmod(i, s)
            c.append(r)
        coords.append(c)
    c = torch.tensor(coords, dtype=torch.float64)
    d = torch.cdist(c, c)
    if name == "none":
        p = torch.zeros_like(d)
    elif name == "hard":
        p = torch.where(d < 1.5, torch.full_like(d, 1 / (1 + tau * t)), torch.zeros_like(d))
    elif name == "exponential":
        p = torch.exp(-d * (1 + tau * t) / sigma)
    elif name == "gaussian":
        p = torch.exp(-d ** 2 / (2 * (sigma / (1 + tau * t)) ** 2))
    p.fill_diagonal_(1.0)
    return p


class DenseReference:
    """The reference implementation's O(N K^2) formulation: one-hot(N x K) @ P, then the EMA equations."""

    def __init__(self, codebook, shape, name, decay=0.99, eps=1e-5, n0=1.0, update_unused=True):
        self.e = codebook.double().clone()
        self.m = self.e.clone()
        self.n = torch.full((len(self.e),), float(n0), dtype=torch.float64)
        self.shape, self.name, self.g, self.eps, self.update_unused = shape, name, decay, eps, update_unused
        self.t = 0

    def step(self, z):
        z = z.double()
        idx = torch.cdist(z, self.e).argmin(1)
        k = len(self.e)
        onehot = F.one_hot(idx, k).double() @ dense_neighbourhood(self.shape, self.name, self.t)  # N x K
        c, s = onehot.sum(0), onehot.t() @ z
        g = self.g
        if self.update_unused:
            n = g * self.n + (1 - g) * c
            total = n.sum()
            self.n = (n + self.eps) / (total + k * self.eps) * total
            self.m = g * self.m + (1 - g) * s
            self.e = self.m / self.n[:, None]
        else:
            hit = c > 0
            self.n = torch.where(hit, g * self.n + (1 - g) * c, self.n)
            self.m = torch.where(hit[:, None], g * self.m + (1 - g) * s, self.m)
            self.e = torch.where(hit[:, None], self.m / self.n.clamp(min=1e-300)[:, None], self.e)
        self.t += 1
        return idx


def batches(n_steps, n=96, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, dim, generator=gen) * 1.5
    for _ in range(n_steps):
        z = centres[torch.randint(0, 6, (n,), generator=gen)] + 0.5 * torch.randn(n, dim, generator=gen)
        yield z


CASES = list(itertools.product(["none", "hard", "exponential", "gaussian"], [(16,), (8, 4)], [0.0, 1.0], [True, False]))


@pytest.mark.parametrize("name, shape, n0, update_unused", CASES)
def test_matches_dense_reference_over_20_steps(name, shape, n0, update_unused):
    torch.manual_seed(0)
    k = math.prod(shape)
    vq = KohonenQuantizer(8, k, grid_shape=shape, neighborhood=name, count_init=n0, update_unused=update_unused)
    ref = DenseReference(vq.codebook, shape, name, n0=n0, update_unused=update_unused)
    vq.train()
    for z in batches(20):
        _, idx, _ = vq(z)
        ref_idx = ref.step(z)
        assert torch.equal(idx, ref_idx)
        scale = ref.e.abs().max()
        assert torch.allclose(vq.codebook.double(), ref.e, rtol=1e-5, atol=1e-5 * float(scale))
        assert torch.allclose(vq.cluster_size.double(), ref.n, rtol=1e-5, atol=1e-7)
    assert int(vq.step) == 20


def test_zero_count_init_kills_unused_codes_without_neighbourhood_but_not_with_it():
    # the robustness finding in miniature: N0 = 0 blows unused codes up to ~e0/eps under EMA-VQ
    norms = {}
    for name in ("none", "hard"):
        torch.manual_seed(0)
        vq = KohonenQuantizer(8, 32, grid_shape=(8, 4), neighborhood=name, count_init=0.0).train()
        for z in batches(3, n=16):
            vq(z)
        norms[name] = vq.codebook.norm(dim=1)
    assert int((norms["none"] > 1e3).sum()) > 10
    assert int((norms["hard"] > 1e3).sum()) < int((norms["none"] > 1e3).sum())


def test_ema_quantizer_is_kohonen_without_neighbourhood():
    torch.manual_seed(3)
    a = KohonenQuantizer(8, 32, neighborhood="none", count_init=0.5)
    torch.manual_seed(3)
    b = EMAQuantizer(8, 32, count_init=0.5)
    for z in batches(10):
        qa, ia, la = a(z)
        qb, ib, lb = b(z)
        assert torch.equal(ia, ib) and torch.equal(qa, qb) and torch.equal(la, lb)
    for name in ("codebook", "cluster_size", "embed_sum", "step"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert type(b).forward is KohonenQuantizer.forward and type(b)._apply_statistics is KohonenQuantizer._apply_statistics


# ------------------------------------------------------------------------------------ the call convention
def test_call_convention_channel_last_and_image_fmap():
    torch.manual_seed(0)
    vq = KohonenQuantizer(16, 64).eval()
    x = torch.randn(2, 5, 3, 16)
    quantized, indices, loss = vq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 5, 3)
    assert torch.equal(quantized, vq.codebook[indices])
    assert loss.shape == () and float(loss) == pytest.approx(0.25 * float(((quantized - x) ** 2).mean()), rel=1e-5)
    fmap = KohonenQuantizer(16, 64, accept_image_fmap=True).eval()
    fmap.load_state_dict(vq.state_dict())
    xf = x.permute(0, 3, 1, 2)
    qf, idf, _ = fmap(xf)
    assert idf.shape == (2, 5, 3) and torch.equal(idf, indices)
    assert torch.equal(qf, quantized.permute(0, 3, 1, 2))
    assert torch.equal(fmap.get_codes_from_indices(idf), qf)
    assert torch.equal(vq.get_codes_from_indices(indices), quantized)


@pytest.mark.parametrize("k,chunk", [(300, None), (512, None), (2500, None), (512, 1000)])
def test_blocked_argmin_picks_the_first_nearest_code(k, chunk):
    """The CPU's blocked argmin (K >= 4 x ARGMIN_BLOCK, K not a multiple of it for 300 and 2500) gives the
    index of one addmm + argmin over the whole matrix, the float64 argmin, and the first code on ties."""
    from kohonen_vae.quantizers.base import ARGMIN_BLOCK, nearest_codes
    assert k >= 4 * ARGMIN_BLOCK
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(700, 5, generator=g), torch.randn(k, 5, generator=g)
    w[k // 2] = w[3]  # a duplicated code: the first index wins, as in argmin
    x[0] = w[3]
    found = nearest_codes(x, w, chunk_elements=chunk)
    assert torch.equal(found, torch.addmm(w.square().sum(1), x, w.t(), alpha=-2.0).argmin(1))
    assert torch.equal(found, torch.cdist(x.double(), w.double()).argmin(1))
    assert int(found[0]) == 3 and not bool((found == k // 2).any())


@pytest.mark.parametrize("n,k,chunk", [(3000, 512, None), (3000, 512, 1), (257, 4096, None), (70, 3, 50),
                                         (1, 7, None)])
def test_nearest_codes_matches_float64_cdist(n, k, chunk):
    """Blocked/chunked assignment (reused CPU block, any chunk size) = argmin of exact float64 distances."""
    from kohonen_vae.quantizers import nearest_codes
    gen = torch.Generator().manual_seed(n + k)
    z, e = torch.randn(n, 16, generator=gen), torch.randn(k, 16, generator=gen)
    got = nearest_codes(z, e, chunk_elements=chunk)
    exact = torch.cdist(z.double(), e.double())
    assert got.shape == (n,) and got.dtype == torch.long
    # equal up to float32 near-ties: the chosen code's exact distance is the minimum within 1e-4
    chosen = exact.gather(1, got[:, None]).squeeze(1)
    assert torch.all(chosen - exact.min(1).values <= 1e-4)
    assert (got == exact.argmin(1)).float().mean() > 0.999


def test_distance_block_rows_bounds():
    from kohonen_vae.quantizers.base import (CPU_BLOCK_ELEMENTS, CPU_BLOCK_MIN_ROWS, DISTANCE_CHUNK_ELEMENTS,
                                             distance_block_rows)
    assert distance_block_rows(16384, 512) == CPU_BLOCK_ELEMENTS // 512  # 4 MiB blocks on a CPU
    assert distance_block_rows(16384, 512, cpu_blocks=False) == DISTANCE_CHUNK_ELEMENTS // 512
    assert distance_block_rows(16384, 65536) == CPU_BLOCK_MIN_ROWS  # GEMM-efficient floor at large K ...
    assert distance_block_rows(10, 65536) >= 10  # all 10 rows in one block (16 rows = 4 MiB)
    assert distance_block_rows(63, 1 << 22) * (1 << 22) <= DISTANCE_CHUNK_ELEMENTS  # ... never above 64 MiB
    assert distance_block_rows(16384, 1 << 26) == 1
    for chunk in (1, 100, 1000):  # an explicit bound is a hard bound
        assert distance_block_rows(3000, 512, chunk) * 512 <= max(chunk, 512)


def test_straight_through_output_is_the_pre_update_code_and_not_an_alias():
    vq = KohonenQuantizer(4, 16, neighborhood="hard").train()
    before = vq.codebook.clone()
    x = torch.randn(10, 4, requires_grad=True)
    out = vq(x)
    assert torch.equal(out.quantized, before[out.indices])  # looked up before this step's update
    assert not torch.equal(vq.codebook, before)  # ... which did happen
    vq(torch.randn(10, 4))
    assert torch.equal(out.quantized, before[out.indices])  # later updates do not write into old outputs


def test_straight_through_output_can_be_modified_in_place():
    """Decoders with ReLU(inplace=True) or ``x += pos_emb`` on the quantised output: the commitment loss
    still differentiates against the unmodified codes."""
    vq = KohonenQuantizer(4, 16, commitment_weight=0.5).train()
    x = torch.randn(10, 4, requires_grad=True)
    out = vq(x)
    q_before = out.quantized.detach().clone()
    y = out.quantized
    y.add_(1.0)
    torch.relu_(y)
    (y.sum() + out.loss).backward()
    expected = (q_before + 1 > 0).float() + 0.5 * 2 * (x.detach() - q_before) / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-7)


def test_straight_through_with_forward_mode_ad_and_torch_func():
    import torch.autograd.forward_ad as fwAD
    vq = KohonenQuantizer(4, 16).eval()  # eval: no codebook update inside the transforms
    x, tangent = torch.randn(10, 4), torch.randn(10, 4)
    with fwAD.dual_level():
        out = vq(fwAD.make_dual(x, tangent))
        assert torch.equal(fwAD.unpack_dual(out.quantized).tangent, tangent)  # identity Jacobian
    grad = torch.func.grad(lambda v: (vq(v).quantized * torch.arange(4.0)).sum())(x)
    assert torch.equal(grad, torch.arange(4.0).expand(10, 4))


def test_straight_through_gradient_and_commitment_gradient():
    vq = KohonenQuantizer(4, 16, commitment_weight=0.5).train()
    x = torch.randn(10, 4, requires_grad=True)
    out = vq(x)
    (out.quantized * torch.arange(4.0)).sum().backward(retain_graph=True)
    assert torch.allclose(x.grad, torch.arange(4.0).expand(10, 4))  # identity through the quantiser
    x.grad = None
    out.loss.backward()
    expected = 0.5 * 2 * (x.detach() - out.quantized.detach()) / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-7)


def test_telemetry_in_the_output():
    vq = KohonenQuantizer(2, 4, grid_shape=(4,)).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    x = torch.tensor([[0.1, 0], [0, 0.2], [9.9, 0], [10, 0.1]])
    out = vq(x)
    assert out.counts.tolist() == [2, 2, 0, 0]
    assert int(out.used_codes) == 2
    assert float(out.perplexity) == pytest.approx(2.0, rel=1e-6)
    assert float(perplexity_from_counts(torch.tensor([5.0, 0, 0, 0]))) == pytest.approx(1.0, rel=1e-6)
    assert float(perplexity_from_counts(torch.ones(8))) == pytest.approx(8.0, rel=1e-6)


def test_eval_mode_does_not_update():
    vq = KohonenQuantizer(8, 32).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(50, 8))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    a = KohonenQuantizer(8, 32, neighborhood="exponential")
    data = list(batches(10))
    for z in data[:5]:
        a(z)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert set(state) == {"step", "codebook", "embed_sum", "cluster_size", "geometry"}
    torch.manual_seed(123)  # a different init that the state must overwrite
    b = KohonenQuantizer(8, 32, neighborhood="exponential")
    b.load_state_dict(state)
    assert int(b.step) == 5
    for z in data[5:]:
        qa, ia, _ = a(z)
        qb, ib, _ = b(z)
        assert torch.equal(ia, ib) and torch.equal(qa, qb)
    assert torch.equal(a.codebook, b.codebook)


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    whole = KohonenQuantizer(8, 32, neighborhood="hard")
    torch.manual_seed(0)
    accum = KohonenQuantizer(8, 32, neighborhood="hard", update_in_forward=False)
    model = torch.nn.Sequential(accum)
    for z in batches(5, n=64):
        whole(z)
        accum(z[:40])
        accum(z[40:])
        assert int(accum.step) == int(whole.step) - 1  # nothing applied until the optimiser step
        assert apply_pending_updates(model) == 1
        assert torch.allclose(accum.codebook, whole.codebook, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="update_in_forward=False"):
        whole.apply_update()


# ------------------------------------------------------------------------------------------- bad input
def test_wrong_shapes_name_the_expected_shape():
    vq = KohonenQuantizer(64, 512)
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        vq(torch.randn(4, 32))
    with pytest.raises(ValueError, match="accept_image_fmap=True"):
        vq(torch.randn(2, 64, 8, 8))
    fmap = KohonenQuantizer(64, 512, accept_image_fmap=True)
    with pytest.raises(ValueError, match=r"\(batch, 64, height, width\)"):
        fmap(torch.randn(2, 8, 8, 64))
    with pytest.raises(ValueError, match="floating-point"):
        vq(torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        vq.get_codes_from_indices(torch.tensor([512]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="holds 64 codes but codebook_size is 512"):
        KohonenQuantizer(8, 512, grid_shape=(8, 8))
    with pytest.raises(ValueError, match="unknown neighborhood"):
        KohonenQuantizer(8, 16, neighborhood="bubble")
    with pytest.raises(ValueError, match="decay"):
        KohonenQuantizer(8, 16, decay=1.0)
    with pytest.raises(ValueError, match="count_init"):
        KohonenQuantizer(8, 16, count_init=-1)
    with pytest.raises(ValueError, match="no neighbourhood"):
        EMAQuantizer(8, 16, neighborhood="hard")
    with pytest.raises(ValueError, match="target"):
        GDSOMQuantizer(8, 16, target="centroid")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("in_forward", [True, False])
def test_non_finite_training_input_raises_before_touching_buffers(bad, in_forward):
    vq = KohonenQuantizer(8, 32, update_in_forward=in_forward).train()
    for z in batches(2):
        vq(z)
    before = {k: v.clone() for k, v in vq.named_buffers()}
    z = torch.randn(20, 8)
    z[3, 2] = bad
    with pytest.raises(NonFiniteInputError, match="left unchanged"):
        vq(z)
    for k, v in vq.named_buffers():
        assert torch.equal(v, before[k]), k


def test_bf16_input_gives_bf16_output_and_float32_statistics():
    torch.manual_seed(0)
    a = KohonenQuantizer(8, 32)
    b = KohonenQuantizer(8, 32)
    b.load_state_dict(a.state_dict())
    for z in batches(5):
        zb = z.bfloat16()
        qa, _, la = a(zb)
        qb, _, _ = b(zb.float())
        assert qa.dtype == torch.bfloat16 and la.dtype == torch.float32
    assert a.codebook.dtype == torch.float32 and a.embed_sum.dtype == torch.float32
    assert torch.allclose(a.codebook, b.codebook, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, _, _ = a(torch.randn(4, 8))
    assert torch.isfinite(q.float()).all()


# ------------------------------------------------------------------------------ gradient quantisers
def test_gradient_quantizer_loss_formula():
    torch.manual_seed(0)
    vq = GradientQuantizer(4, 8, commitment_weight=0.25).train()
    x = torch.randn(12, 4, requires_grad=True)
    q, idx, loss = vq(x)
    e = vq.codebook[idx]
    expected = ((e - x.detach()) ** 2).mean() + 0.25 * ((e.detach() - x) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert vq.codebook.grad is not None and float(vq.codebook.grad.abs().sum()) > 0


@pytest.mark.parametrize("target", ["winner", "input"])
@pytest.mark.parametrize("name", ["hard", "exponential"])
def test_gdsom_loss_equals_dense_formula(target, name):
    torch.manual_seed(0)
    shape = (4, 3)
    vq = GDSOMQuantizer(4, 12, grid_shape=shape, neighborhood=name, target=target, som_weight=0.7).train()
    with torch.no_grad():
        vq.step.fill_(3)
    x = torch.randn(20, 4)
    out = vq(x)
    w = vq.codebook
    idx = out.indices
    tgt = (w[idx] if target == "winner" else x).detach()
    h = dense_neighbourhood(shape, name, 3).float()[idx]  # N x K rows h(k*(n), k)
    som = (h * ((w[None, :, :] - tgt[:, None, :]) ** 2).sum(-1)).sum(1).mean()
    base = ((w[idx] - x) ** 2).mean() + 0.25 * ((w[idx].detach() - x) ** 2).mean()
    expected = base + 0.7 * som
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    g_impl = torch.autograd.grad(out.loss, w)[0]
    g_ref = torch.autograd.grad(expected, w)[0]
    assert torch.allclose(g_impl, g_ref, rtol=1e-4, atol=1e-6)
    assert int(vq.step) == 4


# ------------------------------------------------------------------ issue 11 item 14: the quantiser API
def _all_types(**kw):
    return {
        "ksom": KohonenQuantizer(8, 32, grid_shape=(8, 4), **kw),
        "ksom-accumulating": KohonenQuantizer(8, 32, grid_shape=(8, 4), update_in_forward=False, **kw),
        "ema": EMAQuantizer(8, 32, **kw),
        "gradient": GradientQuantizer(8, 32, **kw),
        "gdsom": GDSOMQuantizer(8, 32, grid_shape=(8, 4), **kw),
        "ksom-restarts": KohonenQuantizer(8, 32, grid_shape=(8, 4), threshold_ema_dead_code=0.5, **kw),
    }


@pytest.mark.parametrize("name", list(_all_types()))
def test_empty_batch_is_a_no_op_with_zero_loss(name):
    vq = _all_types()[name].train()
    accumulating = not getattr(vq, "update_in_forward", True)
    for z in batches(2, n=16):
        vq(z)
        if accumulating:
            vq.apply_update()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x = torch.zeros(0, 8, requires_grad=True)
    out = vq(x)
    assert out.quantized.shape == (0, 8) and out.indices.shape == (0,)
    assert out.loss.item() == 0.0 and int(out.used_codes) == 0
    out.loss.backward()  # still differentiable
    if accumulating:
        vq.apply_update()
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k  # no decay, no step


@pytest.mark.parametrize("value", [1e30, 1e20, -3e19])
@pytest.mark.parametrize("in_forward", [True, False])
def test_overflowing_inputs_raise_before_touching_buffers(value, in_forward):
    vq = KohonenQuantizer(8, 32, update_in_forward=in_forward, threshold_ema_dead_code=0.1).train()
    for z in batches(2):
        vq(z)
    if not in_forward:
        vq.apply_update()
    before = {k: v.clone() for k, v in vq.named_buffers()}
    z = torch.randn(20, 8)
    z[3] = value  # finite, but its squared distances do not fit in float32
    with pytest.raises(NonFiniteInputError, match="too large"):
        vq(z)
        vq.apply_update() if not in_forward else None
    for k, v in vq.named_buffers():
        if k != "pending":  # the accumulating quantiser drops a poisoned accumulation, never applies it
            assert torch.equal(v, before[k]), k
    vq(torch.randn(20, 8) * 1e3)  # large but representable: fine


def test_overflow_in_kmeans_init_and_gradient_restarts_raise_cleanly():
    z = torch.randn(40, 8)
    z[0] = 1e30
    km = KohonenQuantizer(8, 16, kmeans_init=True).train()
    before = {k: v.clone() for k, v in km.named_buffers()}
    with pytest.raises(NonFiniteInputError):
        km(z)
    assert not bool(km.initted) and all(torch.equal(v, before[k]) for k, v in km.named_buffers())
    gq = GradientQuantizer(8, 16, threshold_ema_dead_code=1.0).train()
    usage = gq.cluster_size.clone()
    with pytest.raises(NonFiniteInputError):
        gq(z)
    assert torch.equal(gq.cluster_size, usage) and int(gq.step) == 0


@pytest.mark.parametrize("kind", ["grid", "periodic", "topology", "neighbourhood", "sigma", "gdsom"])
def test_state_of_another_geometry_is_refused(kind):
    from kohonen_vae.quantizers import GeometryMismatchError
    make = {
        "grid": lambda s: KohonenQuantizer(8, 32, grid_shape=s),
        "periodic": lambda s: KohonenQuantizer(8, 32, grid_shape=(8, 4), periodic=s == (4, 8)),
        "topology": lambda s: KohonenQuantizer(8, 32, grid_shape=(8, 4),
                                               topology="hexagonal" if s == (4, 8) else "rectangular"),
        "neighbourhood": lambda s: KohonenQuantizer(8, 32, neighborhood="hard" if s == (8, 4) else "exponential"),
        "sigma": lambda s: KohonenQuantizer(8, 32, neighborhood="exponential", sigma=10.0 if s == (8, 4) else 5.0),
        "gdsom": lambda s: GDSOMQuantizer(8, 32, grid_shape=s),
    }[kind]
    saved = make((8, 4)).state_dict()
    with pytest.raises(GeometryMismatchError, match="another geometry"):
        make((4, 8)).load_state_dict(saved)
    make((8, 4)).load_state_dict(saved)  # the same geometry loads
    # in a model the message names the quantiser's place
    from kohonen_vae.models import build_model
    cfg = {"arch": "vqvae", "channels": 8, "res_channels": 4, "num_res_blocks": 1, "embed_dim": 4,
           "quantizer": {"type": "ksom", "codebook_size": 8, "grid_shape": [4, 2]}}
    state = build_model(cfg).state_dict()
    with pytest.raises(GeometryMismatchError, match=r"quantizers\.0.*\[4, 2\].*\[2, 4\]"):
        build_model({**cfg, "quantizer": {**cfg["quantizer"], "grid_shape": [2, 4]}}).load_state_dict(state)


def test_state_without_geometry_from_before_still_loads():
    a = KohonenQuantizer(8, 32, neighborhood="exponential")
    for z in batches(3):
        a(z)
    old = {k: v for k, v in a.state_dict().items() if k != "geometry"}
    b = KohonenQuantizer(8, 32, neighborhood="exponential")
    b.load_state_dict(old)
    assert torch.equal(b.codebook, a.codebook) and int(b.step) == 3
    g = GradientQuantizer(8, 32)
    g.load_state_dict({k: v for k, v in GradientQuantizer(8, 32).state_dict().items() if k != "geometry"})


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": float("nan")}, "eps"), ({"count_init": float("nan")}, "count_init"),
    ({"commitment_weight": float("nan")}, "commitment_weight"), ({"shrink": float("nan")}, "shrink"),
    ({"sigma": float("nan")}, "sigma"), ({"decay": float("nan")}, "decay"), ({"eps": float("inf")}, "eps"),
    ({"grid_shape": (8.5, 4)}, "grid shape"), ({"grid_shape": "abc"}, "grid shape"), ({"dim": 8.5}, "dim"),
    ({"codebook_size": 32.5}, "codebook_size"), ({"grid_dims": 1.5}, "grid_dims"),
    ({"kmeans_iters": 0}, "kmeans_iters"), ({"threshold_ema_dead_code": -1}, "threshold_ema_dead_code"),
    ({"threshold_ema_dead_code": float("nan")}, "threshold_ema_dead_code"),
    ({"codebook_init": "xavier"}, "codebook_init"),
])
def test_constructor_numbers_are_validated(kwargs, match):
    args = {"dim": 8, "codebook_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        KohonenQuantizer(**args)
    if not {"shrink", "sigma", "eps", "count_init", "grid_shape"} & set(kwargs):
        with pytest.raises(ValueError, match=match):
            GradientQuantizer(**args)


def test_meta_device_builds_and_infers_shapes_but_does_not_train():
    with torch.device("meta"):
        vq = KohonenQuantizer(8, 32, accept_image_fmap=True)
    assert vq.codebook.device.type == "meta"
    out = vq.eval()(torch.randn(2, 8, 4, 4, device="meta"))
    assert out.quantized.shape == (2, 8, 4, 4) and out.indices.shape == (2, 4, 4) and out.counts.shape == (32,)
    for q in (vq, GradientQuantizer(8, 32, accept_image_fmap=True).to("meta")):
        with pytest.raises(ValueError, match="meta"):
            q.train()(torch.randn(2, 8, 4, 4, device="meta"))


@pytest.mark.parametrize("fmap", [False, True])
def test_get_output_from_indices_is_the_forward_output(fmap):
    for vq in (KohonenQuantizer(8, 32, accept_image_fmap=fmap), GradientQuantizer(8, 32, accept_image_fmap=fmap)):
        x = torch.randn(2, 8, 3, 5) if fmap else torch.randn(2, 3, 5, 8)
        out = vq.eval()(x)
        assert torch.equal(vq.get_output_from_indices(out.indices), out.quantized)


# ------------------------------------------------ issue 11 item 16: the authors' no-update semantics
def test_no_update_variant_freezes_exactly_the_codes_no_float32_weight_reaches():
    """32x16 map, exponential kernel, clusters drifting across the data space for 300 steps: a code's
    statistics change iff the authors' float32 one_hot @ P_t > 0 (n_writes > 0), and those that do change
    follow the spec's equations."""
    grid_shape = (32, 16)
    torch.manual_seed(0)
    # sigma0 = 2: the float32 support (103.97 sigma0 / (1 + tau t)) falls below the map's diameter at t ~ 50
    vq = KohonenQuantizer(8, 512, grid_shape=grid_shape, neighborhood="exponential", sigma=2.0,
                          update_unused=False).train()
    c = vq.grid.coords().float()
    dist32 = (c.unsqueeze(0) - c.unsqueeze(1)).norm(dim=-1)
    gen = torch.Generator().manual_seed(1)
    start, end = torch.randn(3, 8, generator=gen) * 2, torch.randn(3, 8, generator=gen) * 2
    partial_steps = 0
    for t in range(300):
        centres = start + (end - start) * t / 300  # drifting clusters
        z = centres[torch.randint(0, 3, (48,), generator=gen)] + 0.3 * torch.randn(48, 8, generator=gen)
        before = {k: getattr(vq, k).clone() for k in ("cluster_size", "embed_sum", "codebook")}
        _, idx, _ = vq(z)
        p = (dist32 * ((1 + torch.tensor(float(t)) * 0.1) / (-2.0))).exp()  # the authors' float32 P_t
        p.fill_diagonal_(1.0)
        n_writes = (F.one_hot(idx, 512).float() @ p).sum(0)
        hit = n_writes > 0
        changed = (vq.cluster_size != before["cluster_size"]) | (vq.embed_sum != before["embed_sum"]).any(1)
        assert torch.equal(changed, hit), (t, (changed != hit).nonzero().flatten()[:10])
        assert torch.equal(vq.codebook[~hit], before["codebook"][~hit])
        partial_steps += bool(hit.any()) and not bool(hit.all())
    assert partial_steps > 100  # the kernel's support shrank below the grid within the run


# --------------------------------------------------------- issue 11 item 17: GDSOM without a kernel
@pytest.mark.parametrize("target", ["winner", "input"])
def test_gdsom_without_neighbourhood_adds_exactly_nothing_beyond_the_winner(target):
    torch.manual_seed(0)
    vq = GDSOMQuantizer(16, 64, neighborhood="none", target=target).train()
    with torch.no_grad():
        vq.codebook.mul_(300.0).add_(1000.0)  # large codes: the old statistics form cancelled to ~1e-5
    x = torch.randn(200, 16) * 300 + 1000
    out = vq(x)
    som = vq.som_loss(x, vq.codebook[out.indices].detach(), out.indices, out.counts)
    if target == "winner":
        assert float(som) == 0.0
        grad = torch.autograd.grad(som, vq.codebook, allow_unused=True)[0]
        assert grad is None or int(torch.count_nonzero(grad)) == 0
        expected = GradientQuantizer._loss(vq, x, vq.codebook[out.indices], out.indices, out.counts)
        assert float(out.loss) == float(expected)  # the total loss is the plain VQ-VAE loss, bit for bit
    else:  # the input target keeps the winner's own term, which is mean_n ||w_k* - z_n||^2 exactly
        w = vq.codebook[out.indices]
        assert float(som) == pytest.approx(float((w - x).square().sum() / 200), rel=1e-6)
