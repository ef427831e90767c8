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


def test_latest_falls_back_past_a_truncated_and_a_garbage_checkpoint_naming_each(tmp_path):
    model, opt, sched, scaler = _state()
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, scaler, [{"epoch": 0}], keep_last=0)
    folder = tmp_path / "checkpoints"
    truncated, garbage = folder / "step_00000030.pt", folder / "step_00000020.pt"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # a copy cut short
    garbage.write_bytes(b"\x00garbage" * 100)
    with pytest.warns(UserWarning) as caught:
        chosen = ckpt.resolve_resume("latest", tmp_path)
    assert chosen == folder / "step_00000010.pt"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and str(truncated) in messages[0] and str(garbage) in messages[1]
    assert ckpt.load_checkpoint(chosen, model, opt, sched, scaler)["step"] == 10
    # set aside: a later save and its pruning to the newest `keep` never count them
    assert sorted(p.name for p in folder.iterdir()) == [
        "step_00000010.pt", "step_00000020.pt.unreadable", "step_00000030.pt.unreadable"]
    ckpt.save_checkpoint(tmp_path, 11, model, opt, sched, scaler, None, keep_last=1)
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000011.pt"


def test_a_named_unreadable_checkpoint_or_a_run_with_none_that_loads_is_an_error(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step_00000005.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="step_00000005.pt' does not load"):
        ckpt.resolve_resume(str(folder / "step_00000005.pt"), tmp_path)
    with pytest.warns(UserWarning, match="step_00000005.pt"), \
            pytest.raises(ValueError, match="none of the 1 checkpoints"):
        ckpt.resolve_resume("latest", tmp_path)
    assert (folder / "step_00000005.pt").exists()  # nothing set aside without one to fall back to


def test_buffer_snapshots_are_written_atomically_and_pruned_with_their_checkpoints(tmp_path, monkeypatch):
    from edsam_online.buffer import BufferConfig, ReplayBuffer

    model, opt, sched, _ = _state()
    buf = ReplayBuffer(BufferConfig(capacity=4, min_size_to_sample=1))
    for step in (5, 10, 100):
        for rank in range(2):  # every rank writes its own before rank 0 writes the checkpoint
            ckpt.save_buffer_snapshot(tmp_path, step, rank, buf)
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, None, None, keep_last=2)
    folder = tmp_path / "checkpoints"
    kept = ["step_00000010.buffer0.npz", "step_00000010.buffer1.npz", "step_00000010.pt",
            "step_00000100.buffer0.npz", "step_00000100.buffer1.npz", "step_00000100.pt"]
    assert sorted(p.name for p in folder.iterdir()) == kept
    assert ckpt.buffer_snapshots(folder / "step_00000100.pt") == {r: folder / f"step_00000100.buffer{r}.npz"
                                                                  for r in range(2)}

    def crash(f, snap):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_snapshot", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_buffer_snapshot(tmp_path, 200, 0, buf)
    assert sorted(p.name for p in folder.iterdir()) == kept  # no partial snapshot, no temporary file
