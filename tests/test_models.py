"""The paper's VQ-VAE / VQ-VAE-2 (spec section 5): shapes, parameter count, index round trips, the
straight-through gradient path and config validation."""
import pytest
import torch
import torch.nn.functional as F

from kohonen_vae.models import (VQVAE, VQVAE2, ConfigError, build_model, check_image_size, resolve_model_config)


def small_q(qtype="ksom", **kw):
    return {"type": qtype, "codebook_size": 32, **kw}


def test_vqvae_shapes_at_32():
    torch.manual_seed(0)
    model = build_model({"arch": "vqvae", "quantizer": {"type": "ksom"}})
    assert isinstance(model, VQVAE)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.reconstruction.shape == (2, 3, 32, 32)
    assert [tuple(i.shape) for i in out.indices] == [(2, 8, 8)]
    assert out.indices[0].dtype == torch.long
    assert out.counts[0].shape == (512,) and float(out.counts[0].sum()) == 2 * 8 * 8
    assert 1.0 <= float(out.perplexity[0]) <= 512 and 1 <= int(out.used_codes[0]) <= 128
    assert model.latent_shapes(32) == [(8, 8)]
    assert model.quantizers[0].grid.shape == (32, 16)


@pytest.mark.parametrize("size,shapes", [(64, [(8, 8), (16, 16)]), (256, [(32, 32), (64, 64)])])
def test_vqvae2_latent_shapes(size, shapes):
    torch.manual_seed(0)
    model = build_model({"arch": "vqvae2", "quantizer": small_q()})
    assert isinstance(model, VQVAE2) and len(model.quantizers) == 2
    assert model.quantizers[0] is not model.quantizers[1]
    assert model.latent_shapes(size) == shapes
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.reconstruction.shape == (1, 3, size, size)
    assert [tuple(i.shape[1:]) for i in out.indices] == shapes  # order [top, bottom]
    assert len(out.perplexity) == len(out.used_codes) == len(out.counts) == 2


def test_vqvae_parameter_count_matches_spec_by_hand():
    conv = lambda cin, cout, k, bias=True: cin * cout * k * k + (cout if bias else 0)  # noqa: E731
    res_block = conv(128, 32, 3, bias=False) + conv(32, 128, 1, bias=False)  # 36864 + 4096 = 40960
    encoder = conv(3, 64, 4) + conv(64, 128, 4) + conv(128, 128, 3) + 2 * res_block  # 3136+131200+147584+81920
    pre_quantizer = conv(128, 64, 1)  # 8256
    decoder = conv(64, 128, 3) + 2 * res_block + conv(128, 64, 4) + conv(64, 3, 4)  # 73856+81920+131136+3075
    assert encoder == 363840 and pre_quantizer == 8256 and decoder == 289987
    expected = encoder + pre_quantizer + decoder  # 662083
    ema = build_model({"arch": "vqvae", "quantizer": {"type": "ema"}})
    assert sum(p.numel() for p in ema.parameters()) == expected == 662083  # codebook is a buffer
    grad = build_model({"arch": "vqvae", "quantizer": {"type": "gradient"}})
    assert sum(p.numel() for p in grad.parameters()) == expected + 512 * 64  # codebook is a parameter


def test_vqvae2_parameter_count_matches_spec_by_hand():
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731  (VQ-VAE-2 convs have biases)
    res = 2 * (conv(128, 32, 3) + conv(32, 128, 1))
    enc_b = conv(3, 64, 4) + conv(64, 128, 4) + conv(128, 128, 3) + res
    enc_t = conv(128, 64, 4) + conv(64, 128, 3) + res
    quant_t = conv(128, 64, 1)
    dec_t = conv(64, 128, 3) + res + conv(128, 64, 4)
    quant_b = conv(192, 64, 1)
    upsample = conv(64, 64, 4)
    dec = conv(128, 128, 3) + res + conv(128, 64, 4) + conv(64, 3, 4)
    model = build_model({"arch": "vqvae2", "quantizer": {"type": "ema"}})
    assert sum(p.numel() for p in model.parameters()) == enc_b + enc_t + quant_t + dec_t + quant_b + upsample + dec


@pytest.mark.parametrize("arch,size", [("vqvae", 16), ("vqvae2", 64)])
def test_encode_indices_never_updates_codebooks(arch, size):
    torch.manual_seed(0)
    model = build_model({"arch": arch, "quantizer": small_q(neighborhood="hard")})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = model.encode_indices(torch.randn(2, 3, size, size))
    assert model.training and all(q.training for q in model.quantizers)  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a training forward does update (so the check above can fail)
    model(torch.randn(2, 3, size, size))
    assert not torch.equal(model.quantizers[0].codebook, before["quantizers.0.codebook"])
    assert all(int(q.step) == 1 for q in model.quantizers)
    assert [tuple(i.shape[1:]) for i in idx] == model.latent_shapes(size)


@pytest.mark.parametrize("arch,size", [("vqvae", 16), ("vqvae2", 64)])
def test_decode_of_encode_equals_forward_in_eval(arch, size):
    torch.manual_seed(0)
    model = build_model({"arch": arch, "quantizer": small_q()})
    x = torch.randn(3, 3, size, size)
    model(x)  # one training update so the codebook is not the init
    model.eval()
    with torch.no_grad():
        out = model(x)
        idx = model.encode_indices(x)
        recon = model.decode_indices(idx)
    for a, b in zip(idx, out.indices):
        assert torch.equal(a, b)
    # forward decodes z + (q - z) (straight-through), decode_indices decodes q: equal up to rounding
    torch.testing.assert_close(recon, out.reconstruction, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="index maps"):
        model.decode_indices(idx[:1] if arch == "vqvae2" else idx * 2)


@pytest.mark.parametrize("qtype", ["ksom", "ema", "gradient", "gdsom"])
def test_straight_through_gradient_reaches_encoder(qtype):
    """d loss / d z (pre-quantiser output) must equal d loss / d q of the decoder evaluated at the codes."""
    torch.manual_seed(0)
    model = build_model({"arch": "vqvae", "quantizer": small_q(qtype)})
    model.eval()  # keep the codebook fixed so both passes see the same codes
    x = torch.randn(2, 3, 16, 16)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["z"] = output

    model.pre_quantizer.register_forward_hook(keep)
    out = model(x)
    F.mse_loss(out.reconstruction, x).backward()
    assert model.encoder[0].weight.grad is not None and model.encoder[0].weight.grad.abs().sum() > 0
    q = model.quantizers[0].get_codes_from_indices(out.indices[0]).detach().requires_grad_(True)
    F.mse_loss(model.decoder(q), x).backward()
    torch.testing.assert_close(captured["z"].grad, q.grad, atol=1e-6, rtol=1e-4)


def test_commitment_loss_is_sum_of_levels():
    torch.manual_seed(0)
    model = build_model({"arch": "vqvae2", "quantizer": small_q("ema")})
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    captured = []
    for q in model.quantizers:
        q.register_forward_hook(lambda m, i, o: captured.append((i[0], o)))
    out = model(x)
    manual = sum(0.25 * F.mse_loss(z, o.quantized.detach()) for z, o in captured)
    torch.testing.assert_close(out.commitment_loss, manual)


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="Valid quantizer keys:.*decay"):
        build_model({"quantizer": {"type": "ema", "neighborhood": "hard"}})
    with pytest.raises(ConfigError, match="Valid model keys:.*embed_dim"):
        build_model({"arch": "vqvae", "hidden": 3})
    with pytest.raises(ConfigError, match="vqvae2"):
        build_model({"arch": "vqvae3"})
    with pytest.raises(ConfigError, match="unknown quantizer.type"):
        build_model({"quantizer": {"type": "kmeans"}})
    with pytest.raises(ConfigError, match="neighbo"):
        build_model({"quantizer": {"type": "ksom", "neighborhood": "triangle"}})
    with pytest.raises(ConfigError, match="at least 64"):
        check_image_size({"arch": "vqvae2"}, 32)
    with pytest.raises(ConfigError, match="in_channels"):
        check_image_size({"arch": "vqvae"}, 32, in_channels=1)
    check_image_size({"arch": "vqvae"}, 28)
    cfg = resolve_model_config({"quantizer": {"type": "ksom", "neighborhood": "exponential", "grid_shape": (8, 4),
                                              "codebook_size": 32}})
    assert cfg["quantizer"]["grid_shape"] == [8, 4] and cfg["quantizer"]["sigma"] == 10.0
    model = build_model(cfg)
    assert model.config == cfg and resolve_model_config(cfg) == cfg  # idempotent
    assert model.quantizers[0].grid.shape == (8, 4)


def test_neighbourhood_options_reach_the_kernel_through_one_table():
    """Issue 16 item 4: a kernel parameter (the hard kernel's radius, a schedule's floor) is set from a config
    by one table that every neighbourhood quantiser passes to make_neighborhood; nothing else names it."""
    from kohonen_vae.training import apply_overrides, load_config_file, resolve_config

    base = load_config_file("tiny")
    cfg = resolve_config(apply_overrides(base, ['quantizer.neighborhood={"kind": "hard", "radius": 2.5}']))
    q = build_model(cfg["model"]).quantizers[0]
    assert q.neighborhood.name == "hard" and q.neighborhood.support == 2.5
    cfg = resolve_config(apply_overrides(base, [
        'quantizer.type=gdsom', 'quantizer.neighborhood={"kind": "gaussian", "sigma": 3.0, "schedule": "exponential", '
        '"time_constant": 50, "floor": 0.2}']))
    nb = build_model(cfg["model"]).quantizers[0].neighborhood
    assert nb.name == "gaussian" and nb.sigma == 3.0 and nb.schedule(1e9) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="'radius' is not an option of the 'exponential' neighborhood"):
        resolve_config(apply_overrides(base, ['quantizer.neighborhood={"kind": "exponential", "radius": 2}']))
