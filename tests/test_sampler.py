"""EDSAMSampler: batched ED-SAM generation on the tiny random LDM."""

import numpy as np
import pytest
import torch

from edsam_online.diffusion import EDSAMSampler, SamplerConfig, build_sampler, build_tiny_ldm, load_ldm, transport
from edsam_online.diffusion.registry import ensure_retrained, retrained_model_dir, retrained_model_id

CAPS = ["a small red star on a light background", "a big green heart on a plain background",
        "a medium blue ring on a white background"]
KEYS = ["k0", "k1", "k2"]


@pytest.fixture(scope="module")
def ldm():
    return build_tiny_ldm()


def _imgs(n=3, res=32):
    return np.random.RandomState(1).randint(0, 256, (n, res, res, 3), dtype=np.uint8)


def _cfg(**kw):
    base = dict(model="tiny-random", steps=3, inversion_steps=2, m=4, rho=0.5, guidance=2.0, batch_size=64)
    base.update(kw)
    return SamplerConfig(**base)


def test_generate_shapes_provenance_and_cost(ldm):
    s = EDSAMSampler(ldm, _cfg())
    out = s.generate(_imgs(), CAPS, KEYS, seed=10)
    assert out.images.shape == (12, 32, 32, 3) and out.images.dtype == np.uint8 and len(out) == 12
    # each source once; row n comes from source n // M
    assert out.source_keys == KEYS and out.captions == CAPS
    rows = np.arange(12)
    assert out.source.tolist() == (rows // 4).tolist() and out.sample_index.tolist() == (rows % 4).tolist()
    assert out.seed.tolist() == (10 + rows // 4).tolist()
    assert out.alpha.dtype == np.float64 and (np.abs(out.alpha) <= 0.5).all()
    assert (out.rho, out.mode, out.steps, out.inversion_steps, out.guidance) == (0.5, "transport", 3, 2, 2.0)
    assert out.model_id == ldm.model_id
    # M samples of one image differ (different alpha and noise)
    assert len(set(out.alpha.tolist())) == 12
    assert not np.array_equal(out.images[0], out.images[1])
    # one inversion per real image (B * S_inv) + guided sampling (2 rows per latent per step)
    assert out.unet_calls == 3 * 2 + 12 * 3 * 2


def test_each_image_is_inverted_once(ldm, monkeypatch):
    seen = []
    orig = ldm.invert
    monkeypatch.setattr(ldm, "invert", lambda z, c, steps: seen.append(z.shape[0]) or orig(z, c, steps))
    EDSAMSampler(ldm, _cfg(m=5)).generate(_imgs(), CAPS, KEYS)
    assert seen == [3]


def test_batch_size_chunks_without_changing_cost_or_alpha(ldm):
    a = EDSAMSampler(ldm, _cfg()).generate(_imgs(), CAPS, KEYS, seed=2)
    b = EDSAMSampler(ldm, _cfg(batch_size=5)).generate(_imgs(), CAPS, KEYS, seed=2)
    assert a.unet_calls == b.unet_calls
    assert a.alpha.tolist() == b.alpha.tolist()
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 2


def test_image_seed_regenerates_its_samples_alone(ldm):
    s = EDSAMSampler(ldm, _cfg())
    out = s.generate(_imgs(), CAPS, KEYS, seed=7)
    alone = s.generate(_imgs()[1:2], CAPS[1:2], KEYS[1:2], seed=int(out.seed[4]))
    assert alone.alpha.tolist() == out.alpha[4:8].tolist()
    assert np.abs(alone.images.astype(int) - out.images[4:8].astype(int)).max() <= 2


def _generate_embedding_every_chunk(sampler, images, captions, m, seed):
    """Reference: ``generate`` as it was before each caption was embedded once per call. The text
    encoder ran for every inversion chunk and again for every sampling chunk of repeated captions,
    and ``mode="random"`` encoded the images it then ignored. Returns (images, alpha)."""
    cfg, ldm = sampler.cfg, sampler.ldm
    images = sampler._resize(images)
    bs = cfg.batch_size
    z_s = []
    for i in range(0, len(images), bs):
        z0 = ldm.encode(images[i:i + bs])
        cond = ldm.embed(captions[i:i + bs])
        z_s.append(ldm.invert(z0, cond, cfg.inversion_steps) if cfg.mode != "random" else z0)
    z_s = torch.cat(z_s)
    z_t, alphas = [], []
    for i in range(len(images)):
        gen = torch.Generator(device=ldm.device).manual_seed(seed + i)
        zt, a = transport(z_s[i:i + 1].expand(m, *z_s.shape[1:]), cfg.rho, cfg.mode, gen)
        z_t.append(zt)
        alphas.append(a)
    z_t, alphas = torch.cat(z_t), torch.cat(alphas)
    rep_captions = [c for c in captions for _ in range(m)]
    out = [ldm.decode(ldm.sample(z_t[i:i + bs], ldm.embed(rep_captions[i:i + bs]), cfg.steps, cfg.guidance))
           for i in range(0, len(z_t), bs)]
    return np.concatenate(out), alphas.double().numpy()


@pytest.fixture(scope="module")
def models(ldm):
    return {"tiny-sd": ldm, "tiny-compvis": build_tiny_ldm(layout="compvis"), "retrained": load_ldm(ensure_retrained(None, 32))}


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-compvis", "retrained"])
@pytest.mark.parametrize("settings", [
    dict(batch_size=64),
    dict(batch_size=5),  # sampling chunks that cut across sources
    dict(batch_size=3, mode="random", rho=0.3),
    dict(batch_size=4, mode="identity", guidance=1.0),
])
def test_generation_is_bit_identical_to_embedding_every_chunk(models, name, settings):
    ldm = models[name]
    captions = [CAPS[0], CAPS[1], CAPS[0], CAPS[2]]  # a caption twice: embedded once
    images, keys = _imgs(4), ["a", "b", "c", "d"]
    sampler = EDSAMSampler(ldm, _cfg(m=3, steps=2, inversion_steps=2, **settings))
    want_images, want_alpha = _generate_embedding_every_chunk(sampler, images, captions, 3, seed=11)
    out = sampler.generate(images, captions, keys, seed=11)
    assert np.array_equal(out.images, want_images)
    assert np.array_equal(out.alpha, want_alpha)


def test_each_distinct_caption_goes_through_the_text_encoder_once(ldm, monkeypatch):
    ldm.uncond_embedding(1)  # the empty caption is embedded once per model
    embedded = []
    orig = ldm.embed
    monkeypatch.setattr(ldm, "embed", lambda captions: embedded.extend(captions) or orig(captions))
    captions = [CAPS[0], CAPS[1], CAPS[0]]
    EDSAMSampler(ldm, _cfg(m=4, batch_size=2)).generate(_imgs(), captions, KEYS)
    assert sorted(embedded) == sorted(set(captions))


def test_deepcache_runs_the_deep_blocks_on_every_interval_th_sampling_step_only():
    cached = build_tiny_ldm(SamplerConfig(deepcache_interval=2))
    plain = build_tiny_ldm()
    computed = []
    cached.unet.mid_block.resnets[0].register_forward_hook(lambda *a: computed.append(1))
    cfg = _cfg(m=2, steps=4, inversion_steps=3)
    out = EDSAMSampler(cached, cfg).generate(_imgs(), CAPS, KEYS, seed=1)
    # inversion: the whole UNet at each of its 3 steps; sampling: whole on steps 0 and 2 of 4
    assert len(computed) == 3 + 2
    assert out.unet_calls == EDSAMSampler(plain, cfg).generate(_imgs(), CAPS, KEYS, seed=1).unet_calls
    z, cond = torch.randn(2, 4, 16, 16), cached.embed(CAPS[:2])
    first = cached.sample(z, cond, 4, 3.0)
    assert torch.equal(cached.sample(z, cond, 4, 3.0), first)  # each call starts a fresh cache
    assert not torch.equal(plain.sample(z, cond, 4, 3.0), first)
    inverted = cached.invert(z, cond, 3)
    assert torch.equal(inverted, plain.invert(z, cond, 3))  # DeepCache's wrappers are gone after sampling


def test_deepcache_does_not_combine_with_compile():
    with pytest.raises(ValueError, match="deepcache_interval"):
        SamplerConfig(deepcache_interval=2, compile=True)


def test_rows_slice_the_samples_with_only_the_sources_they_use(ldm):
    out = EDSAMSampler(ldm, _cfg(m=2)).generate(_imgs(), CAPS, KEYS, seed=5)  # sources 0 0 1 1 2 2
    part = out.rows(1, 4)
    assert part.source_keys == KEYS[:2] and part.captions == CAPS[:2] and part.source.tolist() == [0, 1, 1]
    assert np.array_equal(part.images, out.images[1:4]) and np.shares_memory(part.images, out.images)
    for name in ("alpha", "seed", "sample_index"):
        assert getattr(part, name).tolist() == getattr(out, name)[1:4].tolist()
    assert (part.model_id, part.rho, part.steps, part.unet_calls) == (out.model_id, out.rho, out.steps, 0)
    assert out.rows(2, 4).source_keys == [KEYS[1]]
    for first, last in ((2, 2), (0, 7), (-1, 3)):
        with pytest.raises(IndexError):
            out.rows(first, last)


def test_random_mode_skips_inversion_and_identity_has_zero_alpha(ldm):
    r = EDSAMSampler(ldm, _cfg(mode="random", rho=0.3)).generate(_imgs(), CAPS, KEYS)
    assert r.alpha.tolist() == pytest.approx([0.3] * 12)
    assert r.unet_calls == 12 * 3 * 2
    i = EDSAMSampler(ldm, _cfg(mode="identity", guidance=1.0, m=2)).generate(_imgs(), CAPS, KEYS)
    assert (i.alpha == 0).all()
    assert i.unet_calls == 3 * 2 + 6 * 3  # no guidance: one row per latent per step
    assert np.array_equal(i.images[0], i.images[1])  # no transport: the M samples coincide


def test_m_override_and_resize_to_configured_resolution(ldm):
    for res in (64, 30):  # any input size is resized to cfg.resolution
        out = EDSAMSampler(ldm, _cfg(resolution=32)).generate(_imgs(res=res), CAPS, KEYS, m=1)
        assert out.images.shape == (3, 32, 32, 3)


@pytest.mark.parametrize(
    "images, captions, keys, m, match",
    [
        (_imgs().astype(np.float32), CAPS, KEYS, None, "images"),
        (_imgs()[..., :1], CAPS, KEYS, None, "images"),
        (_imgs()[0], CAPS, KEYS, None, "images"),
        (_imgs(0), [], [], None, "images"),
        (_imgs(), CAPS[:2], KEYS, None, "captions"),
        (_imgs(), ["a star", "", "a ring"], KEYS, None, "captions"),
        (_imgs(), CAPS, KEYS[:1], None, "keys"),
        (_imgs(), CAPS, KEYS, 0, "m"),
        (_imgs(), CAPS, KEYS, 2.5, "m"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(ldm, images, captions, keys, m, match):
    with pytest.raises(ValueError, match=match):
        EDSAMSampler(ldm, _cfg()).generate(images, captions, keys, m=m)


@pytest.mark.parametrize(
    "field, value",
    [("rho", -0.1), ("m", 0), ("steps", 0), ("inversion_steps", 0), ("batch_size", 0), ("mode", "warp"),
     ("guidance", 0.5), ("dtype", "fp8"), ("device", "tpu"), ("resolution", 30), ("model", ""),
     ("model", "random:nobody/no-such-model"), ("deepcache_interval", 0), ("deepcache_branch", -1),
     ("timestep_spacing", "sideways")],
)
def test_sampler_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value})


def test_timestep_spacing_overrides_the_models_own_for_inversion_and_sampling_alike():
    own = build_sampler(SamplerConfig(model="tiny-random", steps=5)).ldm
    trailing = build_sampler(SamplerConfig(model="tiny-random", steps=5, timestep_spacing="trailing")).ldm
    for ldm in (own, trailing):
        ldm.scheduler.set_timesteps(5)
        ldm.inverse_scheduler.set_timesteps(5)
    assert own.scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]  # the tiny model's leading spacing
    assert trailing.scheduler.timesteps.tolist() == [999, 799, 599, 399, 199]
    assert trailing.inverse_scheduler.timesteps.tolist() == [199, 399, 599, 799, 999]  # the same levels, walked up


def test_build_sampler_tiny_random():
    cfg = SamplerConfig(model="tiny-random", steps=2, inversion_steps=2, m=1)
    out = build_sampler(cfg).generate(_imgs(1), CAPS[:1], KEYS[:1])
    assert out.images.shape == (1, 32, 32, 3)


def test_retrained_cache_is_edsam_cache_unless_cache_dir_is_set(monkeypatch, tmp_path):
    monkeypatch.setenv("EDSAM_CACHE", str(tmp_path / "env"))
    assert SamplerConfig().cache_dir is None
    assert retrained_model_dir(None, 32) == tmp_path / "env" / retrained_model_id(32)
    assert retrained_model_dir(str(tmp_path / "own"), 64) == tmp_path / "own" / retrained_model_id(64)
    assert retrained_model_id(32).startswith("retrained-ldm-32px-") and retrained_model_id(64) != retrained_model_id(32)


def test_a_changed_recipe_gets_a_new_cache_folder(monkeypatch):
    from edsam_online.diffusion import train_ldm

    version = train_ldm.recipe_version
    default = train_ldm.TrainLDMConfig(out_dir="a")
    assert version(default) == version(train_ldm.TrainLDMConfig(out_dir="b"))  # where it goes is not the recipe
    assert version(default) != version(train_ldm.TrainLDMConfig(out_dir="a", unet_steps=3200))
    before = retrained_model_id(32)
    monkeypatch.setattr(train_ldm, "RECIPE_REVISION", train_ldm.RECIPE_REVISION + 1)  # new training code
    assert retrained_model_id(32) != before
    from edsam_online.data import shapes

    changed = retrained_model_id(32)
    monkeypatch.setattr(shapes, "RENDER_REVISION", shapes.RENDER_REVISION + 1)  # the world renders otherwise
    assert retrained_model_id(32) != changed


def test_chosen_alphas_set_each_samples_shift_and_none_draws_as_eq_9(ldm):
    sampler = EDSAMSampler(ldm, _cfg(m=2))
    chosen = np.array([-0.5, -0.25, 0.0, 0.1, 0.3, 0.5])
    steered = sampler.generate(_imgs(), CAPS, KEYS, seed=4, alpha=chosen)
    np.testing.assert_allclose(steered.alpha, chosen, atol=1e-7)
    blind, again = (sampler.generate(_imgs(), CAPS, KEYS, seed=4, alpha=a) for a in (None, None))
    assert np.array_equal(blind.images, again.images) and not np.array_equal(blind.alpha, chosen)
    assert not np.array_equal(steered.images, blind.images)
    with pytest.raises(ValueError, match="alpha"):
        sampler.generate(_imgs(), CAPS, KEYS, alpha=chosen[:5])
    with pytest.raises(ValueError, match="alpha"):
        sampler.generate(_imgs(), CAPS, KEYS, alpha=chosen * 2)  # beyond rho
