"""Checkpoints: atomic writes, resume=latest, and a full round trip of the training state."""

import pytest
import torch

from edsam_online import checkpoint as ckpt
from edsam_online.optim import OptimConfig, build_optimizer, build_scheduler


def _state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = OptimConfig(warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, sched, scaler


def _train_a_step(model, opt, sched):
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()


def test_round_trip_restores_model_optimizer_scheduler_scaler_and_loader_states(tmp_path):
    model, opt, sched, scaler = _state()
    for _ in range(3):
        _train_a_step(model, opt, sched)
    loader_states = [{"rank": 0, "pos": 7}, {"rank": 1, "pos": 9}]
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, scaler, loader_states, extra={"totals": {"a": 1}})
    assert path.name == "step_00000003.pt"

    model2, opt2, sched2, scaler2 = _state(seed=1)
    out = ckpt.load_checkpoint(ckpt.resolve_resume("latest", tmp_path), model2, opt2, sched2, scaler2)
    assert out == {"step": 3, "loader_states": loader_states, "extra": {"totals": {"a": 1}}}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    assert scaler2.get_scale() == 1024.0
    # the restored optimizer continues exactly like the original
    torch.manual_seed(5)
    _train_a_step(model, opt, sched)
    torch.manual_seed(5)
    _train_a_step(model2, opt2, sched2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_crash_mid_write_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    model, opt, sched, scaler = _state()
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, None, None)

    def crash(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, None, None)
    assert ckpt.resolve_resume("latest", tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_latest_picks_the_highest_step_and_old_ones_are_pruned(tmp_path):
    model, opt, sched, _ = _state()
    for step in (5, 10, 100):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, None, None, keep_last=2)
    (tmp_path / "checkpoints" / ".step_00000200.pt.tmp123").write_bytes(b"torn")  # a crashed writer's leftover
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000010.pt", "step_00000100.pt"]
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000100.pt"


def test_resume_values():
    assert ckpt.resolve_resume("", "/nonexistent") is None
    assert ckpt.resolve_resume("latest", "/nonexistent") is None  # a fresh run starts from scratch
    with pytest.raises(ValueError, match="checkpoint.resume: no checkpoint file"):
        ckpt.resolve_resume("/nonexistent/step_1.pt", "/tmp")


class _Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_a_checkpoint_that_smuggles_in_an_object_is_refused_not_run(tmp_path, capsys):
    model, opt, sched, scaler = _state()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, scaler, [{"epoch": 0}])
    state = torch.load(path, weights_only=True)
    state["extra"]["payload"] = _Payload()
    torch.save(state, path)
    with pytest.raises(ValueError, match="not a plain checkpoint"):
        ckpt.load_checkpoint(path, model)
    assert "this ran" not in capsys.readouterr().out
