"""Proposition 1 of ED-SAM, tested statistically on the transport transformation."""

import math

import pytest
import torch

from edsam_online.diffusion.transport import transport, w2_squared_to_standard

D = 4 * 64 * 64  # latent dimension per sample (16384 >= 1024)
B = 64


def _source(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 64, 64, generator=g)


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 1.0, 2.0])
def test_transport_moves_each_sample_to_n_alpha_identity(rho):
    z_s = _source()
    z_t, alpha = transport(z_s, rho, "transport", torch.Generator().manual_seed(1))
    assert z_t.shape == z_s.shape and alpha.shape == (B,)
    assert torch.all(alpha.abs() <= rho)
    flat = z_t.flatten(1).double()
    # mean of d iid N(alpha,1) values has std 1/sqrt(d); variance has std sqrt(2/d)
    tol_mean = 5 / math.sqrt(D)
    tol_var = 5 * math.sqrt(2 / D)
    assert torch.all((flat.mean(1) - alpha.double()).abs() < tol_mean)
    assert torch.all((flat.var(1) - 1).abs() < tol_var)
    # squared W2 to N(0, I) agrees with the closed form d * alpha^2
    w2 = w2_squared_to_standard(z_t)
    expected = D * alpha.double() ** 2
    tol_w2 = 5 * 2 * alpha.double().abs() * math.sqrt(D) + 15
    assert torch.all((w2 - expected).abs() < tol_w2)
    # one 1/sqrt(2) share of the source latent is kept (ties the sample to its image)
    corr = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(z_s.flatten(1), flat.float())])
    assert torch.all((corr - 1 / math.sqrt(2)).abs() < 0.05)


def test_alpha_is_uniform_on_minus_rho_rho():
    rho = 0.5
    z_s = torch.randn(20000, 2)
    _, alpha = transport(z_s, rho, "transport", torch.Generator().manual_seed(3))
    assert alpha.min() >= -rho and alpha.max() <= rho
    assert abs(alpha.mean().item()) < 0.01
    assert abs(alpha.var().item() - rho**2 / 3) < 0.005
    # both halves of the interval are used
    assert alpha.min() < -0.95 * rho and alpha.max() > 0.95 * rho


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.5])
def test_random_mode_is_n_rho_identity_independent_of_source(rho):
    z_s = _source() * 3 + 7  # far from N(0, I): output must not depend on it
    z_t, alpha = transport(z_s, rho, "random", torch.Generator().manual_seed(2))
    assert torch.all(alpha == rho)
    flat = z_t.flatten(1).double()
    assert torch.all((flat.mean(1) - rho).abs() < 5 / math.sqrt(D))
    assert torch.all((flat.var(1) - 1).abs() < 5 * math.sqrt(2 / D))
    corr = torch.corrcoef(torch.stack([z_s.flatten(), z_t.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01


def test_identity_mode_keeps_latent():
    z_s = _source()
    z_t, alpha = transport(z_s, 0.5, "identity", torch.Generator().manual_seed(0))
    assert torch.equal(z_t, z_s) and torch.all(alpha == 0)


def test_seeded_generator_reproduces_and_differs_across_seeds():
    z_s = _source()
    a1 = transport(z_s, 0.5, "transport", torch.Generator().manual_seed(5))
    a2 = transport(z_s, 0.5, "transport", torch.Generator().manual_seed(5))
    a3 = transport(z_s, 0.5, "transport", torch.Generator().manual_seed(6))
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])
    assert not torch.equal(a1[1], a3[1])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(rho=0.5, mode="bogus"), "mode"),
        (dict(rho=0.5, alpha=torch.tensor([0.1, 0.9])), "alpha"),
        (dict(rho=0.5, alpha=torch.tensor([0.1])), "alpha"),
        (dict(rho=0.5, alpha=torch.tensor([0.1, float("nan")])), "alpha"),
        (dict(rho=0.5, mode="random", alpha=torch.tensor([0.1, 0.2])), "alpha"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        transport(torch.randn(2, 4), **kwargs)


def test_rejects_unbatched_or_integer_latents():
    with pytest.raises(ValueError, match="z_s"):
        transport(torch.randn(4), 0.5)
    with pytest.raises(ValueError, match="z_s"):
        transport(torch.ones(2, 4, dtype=torch.int64), 0.5)


def test_chosen_alphas_replace_the_uniform_draw_and_keep_proposition_1():
    z_s = _source()
    chosen = torch.linspace(-0.5, 0.5, B)
    z_t, alpha = transport(z_s, 0.5, "transport", torch.Generator().manual_seed(1), alpha=chosen)
    assert torch.equal(alpha, chosen)
    flat = z_t.flatten(1).double()
    assert torch.all((flat.mean(1) - chosen.double()).abs() < 5 / math.sqrt(D))
    assert torch.all((flat.var(1) - 1).abs() < 5 * math.sqrt(2 / D))
    again, _ = transport(z_s, 0.5, "transport", torch.Generator().manual_seed(1), alpha=chosen)
    assert torch.equal(again, z_t)
