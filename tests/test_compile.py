"""torch.compile and bf16 autocast with a KSOM quantiser.

* A VQ-VAE compiled with ``torch.compile`` trains exactly like the eager one: same init, same batches,
  a few AdamW steps; losses, parameters and the codebook statistics agree.
* Under bf16 autocast the quantiser returns bf16 outputs, keeps its statistics and codebook in float32,
  and -- for inputs that bf16 represents exactly -- assigns and updates exactly like a float32 run.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from kohonen_vae import KohonenQuantizer
from kohonen_vae.models import build_model

#: a VQ-VAE small enough to compile quickly: 16x16 images -> 4x4 latents of 8 channels, 32 codes on 8x4
SMALL_MODEL = {"arch": "vqvae", "channels": 16, "res_channels": 8, "num_res_blocks": 1, "embed_dim": 8,
               "quantizer": {"type": "ksom", "neighborhood": "hard", "codebook_size": 32,
                             "grid_shape": [8, 4]}}


def _batches(steps=4, batch=4, size=16):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, size, size, generator=gen) for _ in range(steps)]


def _train(model, step_fn, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for x in batches:
        opt.zero_grad(set_to_none=True)
        out = step_fn(x)
        loss = F.mse_loss(out.reconstruction, x) + out.commitment_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_compiled_vqvae_trains_like_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(SMALL_MODEL).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, dynamic=False)
    batches = _batches()

    eager_losses = _train(eager, eager, batches)
    compiled_losses = _train(compiled_model, compiled, batches)

    q_e, q_c = eager.quantizers[0], compiled_model.quantizers[0]
    assert int(q_c.step) == int(q_e.step) == len(batches)  # one KSOM step per compiled training forward
    assert torch.allclose(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5), (compiled_losses, eager_losses)
    for name in ("codebook", "embed_sum", "cluster_size"):
        a, b = getattr(q_c, name), getattr(q_e, name)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (name, (a - b).abs().max())
    for (name, pa), pb in zip(compiled_model.named_parameters(), eager.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-3, atol=1e-5), (name, (pa - pb).abs().max())
    # the codebook really moved (so agreeing is not trivial): it is no longer the N(0, I) init
    assert not torch.allclose(q_c.codebook, build_model(SMALL_MODEL).quantizers[0].codebook)

    # eval mode, compiled: the codebook is frozen and the step does not advance
    compiled_model.eval()
    before = q_c.codebook.clone()
    with torch.no_grad():
        out = compiled(batches[0])
    assert torch.equal(q_c.codebook, before) and int(q_c.step) == len(batches)
    assert out.reconstruction.shape == batches[0].shape


def _bf16_representable(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("neighborhood", ["none", "hard", "exponential"])
def test_bf16_autocast_matches_float32(neighborhood):
    torch.manual_seed(0)
    q32 = KohonenQuantizer(16, 64, grid_shape=(8, 8), neighborhood=neighborhood).train()
    q16 = copy.deepcopy(q32)
    for step in range(3):
        x16 = _bf16_representable((2, 40, 16), seed=step).requires_grad_(True)
        x32 = x16.detach().float().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = q16(x16)
        out32 = q32(x32)
        assert out16.quantized.dtype == torch.bfloat16 and out32.quantized.dtype == torch.float32
        assert out16.loss.dtype == torch.float32
        assert torch.equal(out16.indices, out32.indices)
        # the forward value is the code vector, rounded to the input dtype
        assert torch.equal(out16.quantized, out32.quantized.to(torch.bfloat16))
        assert torch.allclose(out16.loss, out32.loss, rtol=1e-6)
        (out16.quantized.float().square().sum() + out16.loss).backward()
        (out32.quantized.square().sum() + out32.loss).backward()
        assert x16.grad.dtype == torch.bfloat16
        assert torch.allclose(x16.grad.float(), x32.grad, rtol=1e-2, atol=1e-2)
    for name in ("codebook", "embed_sum", "cluster_size"):
        a, b = getattr(q16, name), getattr(q32, name)
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (name, (a - b).abs().max())


def test_bf16_autocast_vqvae_step_keeps_float32_codebook():
    torch.manual_seed(0)
    model = build_model(SMALL_MODEL).train()
    x = _batches(steps=1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.mse_loss(out.reconstruction.float(), x) + out.commitment_loss
    loss.backward()
    q = model.quantizers[0]
    assert out.reconstruction.dtype == torch.bfloat16
    assert all(getattr(q, n).dtype == torch.float32 for n in ("codebook", "embed_sum", "cluster_size"))
    assert torch.isfinite(q.codebook).all() and int(q.step) == 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_only_the_update_breaks_the_graph():
    # bincount (data-dependent shape) and host-side checks would each add a graph break; the one break
    # left is the deliberate torch.compiler.disable around the statistics update (a host-synchronising
    # finiteness check, the data-parallel all-reduce and in-place buffer writes)
    torch._dynamo.reset()
    vq = KohonenQuantizer(8, 32, grid_shape=(8, 4), neighborhood="hard").train()
    explained = torch._dynamo.explain(vq)(torch.randn(4, 5, 8))
    reasons = [r.reason for r in explained.break_reasons]
    assert reasons and all("_update" in r and "disable" in r for r in reasons), reasons
    vq.eval()
    torch._dynamo.reset()
    assert torch._dynamo.explain(vq)(torch.randn(4, 5, 8)).graph_break_count == 0


# ------------------------------------------------------ issue 11 item 19: fullgraph=True, eval and training
# backend="eager": fullgraph is a property of dynamo's capture; the inductor run is covered above

def _quantizers():
    from kohonen_vae import EMAQuantizer, GDSOMQuantizer, GradientQuantizer
    return {
        "ksom": KohonenQuantizer(8, 32, grid_shape=(8, 4), neighborhood="exponential"),
        "ema-kmeans-restarts": EMAQuantizer(8, 32, kmeans_init=True, threshold_ema_dead_code=1.0),
        "gradient": GradientQuantizer(8, 32),
        "gdsom": GDSOMQuantizer(8, 32, grid_shape=(8, 4)),
    }


@pytest.mark.parametrize("name", list(_quantizers()))
def test_eval_forward_compiles_with_fullgraph(name):
    torch._dynamo.reset()
    vq = _quantizers()[name].eval()
    x = torch.randn(4, 5, 8)
    compiled = torch.compile(vq, fullgraph=True, backend="eager")
    with torch.no_grad():
        got, ref = compiled(x), vq(x)
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.quantized, ref.quantized)
    assert torch.equal(got.counts, ref.counts)


def test_eval_model_compiles_with_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(SMALL_MODEL).eval()
    x = _batches(steps=1)[0]
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend="eager")(x)
        ref = model(x)
    assert torch.allclose(out.reconstruction, ref.reconstruction, atol=1e-6)


@pytest.mark.parametrize("name", ["ksom", "ema-kmeans-restarts", "gdsom"])
def test_training_forward_with_fullgraph_raises_the_documented_reason(name):
    """The update reads values on the host and may all-reduce: dynamo's error carries our reason."""
    from kohonen_vae.quantizers import COMPILE_TRAINING_REASON
    torch._dynamo.reset()
    vq = _quantizers()[name].train()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    with pytest.raises(torch._dynamo.exc.Unsupported) as info:
        torch.compile(vq, fullgraph=True, backend="eager")(torch.randn(4, 5, 8))
    assert COMPILE_TRAINING_REASON in str(info.value)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing ran


def test_gradient_quantizer_training_forward_compiles_with_fullgraph():
    from kohonen_vae import GradientQuantizer
    torch._dynamo.reset()
    torch.manual_seed(0)
    vq = GradientQuantizer(8, 32).train()
    ref = copy.deepcopy(vq)
    x = torch.randn(4, 5, 8, requires_grad=True)
    out = torch.compile(vq, fullgraph=True, backend="eager")(x)
    expected = ref(x)
    assert torch.equal(out.indices, expected.indices) and torch.allclose(out.loss, expected.loss)
    out.loss.backward()
    assert vq.codebook.grad is not None and int(vq.step) == 1
