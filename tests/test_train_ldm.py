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
    # when the sampler names none
    from edsam_online.diffusion.config import SamplerConfig
    from edsam_online.diffusion.pipeline import load_ldm

    ldm = load_ldm(tmp_path / "m", cfg=SamplerConfig(timestep_spacing=None))
    ldm.scheduler.set_timesteps(5)
    ldm.inverse_scheduler.set_timesteps(5)
    assert ldm.scheduler.timesteps.tolist() == [999, 799, 599, 399, 199]
    assert ldm.inverse_scheduler.timesteps.tolist() == [199, 399, 599, 799, 999]


def test_an_unknown_timestep_spacing_is_refused_by_name():
    import pytest

    with pytest.raises(ValueError, match="timestep_spacing"):
        TrainLDMConfig(out_dir="-", timestep_spacing="linspace")
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainLDMConfig(out_dir="-", checkpoint_every=-1)


def test_an_interrupted_training_resumes_to_the_same_files(tmp_path, monkeypatch):
    """A checkpoint every 2 steps; a training stopped in its UNet stage and run again ends
    with the files of a training that was never stopped, and leaves no checkpoint behind."""
    import pytest

    from edsam_online.diffusion import train_ldm as module

    kw = dict(num_train=32, vae_steps=3, unet_steps=5, batch_size=8, unet_batch_size=4, num_threads=1,
              checkpoint_every=2)
    whole = module.train_ldm(TrainLDMConfig(out_dir=str(tmp_path / "whole"), **kw))
    lr = module._lr

    def stop_at_unet_step_3(step, total, base, warmup=20):
        if total == kw["unet_steps"] and step == 3:
            raise KeyboardInterrupt
        return lr(step, total, base, warmup)

    monkeypatch.setattr(module, "_lr", stop_at_unet_step_3)
    with pytest.raises(KeyboardInterrupt):
        module.train_ldm(TrainLDMConfig(out_dir=str(tmp_path / "resumed"), **kw))
    assert (tmp_path / "resumed.partial" / "state.pt").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(module, "_lr", lr)
    resumed = module.train_ldm(TrainLDMConfig(out_dir=str(tmp_path / "resumed"), **kw))
    assert _files(resumed) == _files(whole)
    assert not (tmp_path / "resumed.partial").exists()


def test_the_version_hashes_the_data_so_changed_data_trains_anew(tmp_path):
    """Any source the project reads trains the generator; the recipe version changes with the
    data's content (an ImageFolder whose captions changed), not only with the settings."""
    import numpy as np
    from PIL import Image

    from edsam_online.data.shapes import render_sample
    from edsam_online.diffusion.train_ldm import load_corpus, recipe_version

    folder = tmp_path / "pairs"
    for i in range(6):
        s = render_sample(i, "photo", 32, seed=3)
        (folder / s.meta["class"]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(folder / s.meta["class"] / f"{i}.png")
        (folder / s.meta["class"] / f"{i}.txt").write_text(s.caption)
    cfg = TrainLDMConfig(out_dir="-", data_kind="imagefolder", data_path=str(folder), num_train=6)
    x, captions = load_corpus(cfg)
    assert x.shape == (6, 3, 32, 32) and float(x.min()) >= -1 and all(captions)
    before = recipe_version(cfg)
    caption_file = next(folder.rglob("*.txt"))
    caption_file.write_text("a large red circle")
    from edsam_online.diffusion import train_ldm as module

    module._fingerprint_of.cache_clear()
    assert recipe_version(cfg) != before
    with np.testing.assert_raises_regex(ValueError, "num_train"):
        load_corpus(TrainLDMConfig(out_dir="-", data_kind="imagefolder", data_path=str(folder), num_train=7))


def test_a_bad_data_setting_is_refused_by_name(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="data_kind"):
        TrainLDMConfig(out_dir="-", data_kind="parquet")
    with pytest.raises(ValueError, match="data_domain"):
        TrainLDMConfig(out_dir="-", data_domain="mars")
    with pytest.raises(ValueError, match="data_path"):
        TrainLDMConfig(out_dir="-", data_kind="csv")
