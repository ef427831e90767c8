"""train_ldm is reproducible: one config (seed, step counts) writes the same folder, bit for bit."""

from pathlib import Path

from safetensors.torch import load_file

from edsam_online.diffusion.train_ldm import TrainLDMConfig, train_ldm


def _train(out: Path, seed: int) -> Path:
    return train_ldm(TrainLDMConfig(out_dir=str(out), num_train=64, vae_steps=2, unet_steps=2, batch_size=8,
                                    unet_batch_size=8, num_threads=1, seed=seed))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_and_steps_write_identical_folders_and_another_seed_does_not(tmp_path):
    a, b, c = _train(tmp_path / "a", 0), _train(tmp_path / "b", 0), _train(tmp_path / "c", 1)
    files_a, files_b = _files(a), _files(b)
    weights = [name for name in files_a if name.endswith(".safetensors")]
    assert {w.split("/")[0] for w in weights} == {"vae", "unet", "text_encoder"}
    assert files_a == files_b  # every file, weights and configs alike
    for w in weights:  # another seed trains other weights in every component
        ta, tc = load_file(a / w), load_file(c / w)
        assert any(not ta[k].equal(tc[k]) for k in ta), w


def test_the_command_line_sets_every_recipe_setting_and_records_its_version(tmp_path, capsys):
    import json

    from edsam_online.diffusion.train_ldm import main, recipe_version

    main(["--out", str(tmp_path / "m"), "--num-train", "32", "--vae-steps", "1", "--unet-steps", "1",
          "--batch-size", "8", "--unet-batch-size", "8", "--num-threads", "1", "--caption-dropout", "0.2",
          "--timestep-spacing", "trailing"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    recorded = json.loads((tmp_path / "m" / "train_ldm_config.json").read_text())
    expected = TrainLDMConfig(out_dir="-", num_train=32, vae_steps=1, unet_steps=1, batch_size=8, unet_batch_size=8,
                              num_threads=1, caption_dropout=0.2, timestep_spacing="trailing")
    assert recorded["caption_dropout"] == 0.2 and recorded["version"] == recipe_version(expected)
    # the spacing travels in the saved scheduler config, which sampling and inversion both read
    from edsam_online.diffusion.pipeline import load_ldm

    ldm = load_ldm(tmp_path / "m")
    ldm.scheduler.set_timesteps(5)
    ldm.inverse_scheduler.set_timesteps(5)
    assert ldm.scheduler.timesteps.tolist() == [999, 799, 599, 399, 199]
    assert ldm.inverse_scheduler.timesteps.tolist() == [199, 399, 599, 799, 999]


def test_an_unknown_timestep_spacing_is_refused_by_name():
    import pytest

    with pytest.raises(ValueError, match="timestep_spacing"):
        TrainLDMConfig(out_dir="-", timestep_spacing="linspace")
