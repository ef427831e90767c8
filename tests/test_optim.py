"""AdamW kernels (``optim.implementation``): one update whichever kernel runs it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edsam_online.config import load_config
from edsam_online.optim import OptimConfig, build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 8), nn.LayerNorm(8), nn.Linear(8, 4))


def _train(implementation: str, steps: int, state: dict | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = build_optimizer(model, OptimConfig(lr=1e-2, implementation=implementation))
    if state is not None:
        opt.load_state_dict(state)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 50, (16,), generator=gen)
        loss = model(tokens).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("implementation", ["foreach", "for-loop"])
def test_every_kernel_applies_the_fused_kernels_update(implementation):
    fused, opt = _train("fused", 5)
    other, _ = _train(implementation, 5)
    assert opt.defaults["fused"] is True
    for a, b in zip(fused.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the update did something: the decayed weights moved away from their initial values
    assert not torch.equal(fused[2].weight, _model()[2].weight)


def test_a_state_saved_by_one_kernel_resumes_in_another():
    _, opt = _train("for-loop", 3)
    model, resumed = _train("fused", 2, state=opt.state_dict())
    assert resumed.state[next(iter(model.parameters()))]["step"].item() == 5


def test_an_unknown_kernel_is_refused_at_start_naming_the_key():
    with pytest.raises(ValueError, match="implementation"):
        load_config({"optim": {"implementation": "apex"}})
