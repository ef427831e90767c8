"""Every config in configs/ composes and builds; bad values stop at start naming the key."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from edsam_online.buffer import ReplayBuffer
from edsam_online.config import Config, load_config
from edsam_online.diffusion import build_sampler
from edsam_online.loader import MixConfig, MixedLoader
from edsam_online.losses import EDSAMLoss
from edsam_online.models import create_clip
from edsam_online.optim import build_optimizer, build_scheduler
from edsam_online.runtime import RuntimeConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = ("data", "diffusion", "model", "runtime", "method", "experiment")
# options whose mandatory value (???) is the user's to give
NEEDS = {("data", "webdataset"): ["data.path='/x/{0..1}.tar'"], ("data", "csv"): ["data.path=/x/d.csv"],
         ("data", "imagefolder"): ["data.path=/x/pairs"], ("diffusion", "local"): ["diffusion.model=/x/sd"],
         ("experiment", "sd_1gpu"): ["data.path='/x/{0..1}.tar'", "diffusion.model=/x/sd"],
         ("experiment", "sd_2gpu"): ["data.path='/x/{0..1}.tar'", "diffusion.model=/x/sd"]}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("config", overrides=list(overrides))


def _options():
    for group in GROUPS:
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            yield group, path.stem


def test_every_group_has_options_and_is_in_the_tree():
    assert {g for g, _ in _options()} == set(GROUPS)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    else:
        yield ".".join(path), node


def _at(cfg, key: str):
    for name in key.split("."):
        cfg = cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)
    return list(cfg) if isinstance(cfg, tuple) else cfg


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_config_composes_validates_and_sets_what_its_file_says(group, option):
    needs = NEEDS.get((group, option), [])
    cfg = load_config(_compose([f"{group}={option}", *needs]))
    assert isinstance(cfg, Config)
    path = CONFIGS / group / f"{option}.yaml"
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    node.pop("defaults", None)
    prefix = "" if path.read_text().startswith("# @package _global_") else f"{group}."
    given = {prefix + key: value for key, value in _leaves(node)
             if value != "???" and not any(n.startswith(f"{prefix + key}=") for n in needs)}
    assert {key: _at(cfg, key) for key in given} == given  # every value it sets reaches the built config
    if not given:  # an empty option (runtime=cpu) is its dataclass's defaults
        assert _at(cfg, group) == type(_at(cfg, group))()


def test_root_config_is_typed():
    cfg = _compose()
    with pytest.raises(Exception, match="trainer.batch_size"):
        OmegaConf.update(cfg, "trainer.batch_size", "many")


@pytest.mark.parametrize(
    "override,message",
    [
        ("diffusion.rho=-0.5", r"^diffusion\.rho: must be >= 0, got -0\.5$"),
        ("diffusion.model=random:CompVis/ldm-text2im-large-512",
         r"^diffusion\.model: no stored architecture for 'random:CompVis/ldm-text2im-large-512'; "
         r"random-weight models: random:CompVis/ldm-text2im-large-256, random:runwayml/stable-diffusion-v1-5 "),
        ("diffusion.deepcache_interval=0", r"^diffusion\.deepcache_interval: must be >= 1 \(1 = off\), got 0$"),
        ("mix.extra_share=1.5", r"^mix\.extra_share: must be in \[0, 1\], got 1\.5$"),
        ("model.name=ViT-Huge-999", r"^model\.name: unknown open_clip model 'ViT-Huge-999'"),
        ("trainer.batch_size=0", r"^trainer\.batch_size: must be >= 1, got 0$"),
        ("buffer.capacity=0", r"^buffer\.capacity: must be >= 1, got 0$"),
        ("stream.limits.max_side=0", r"^stream\.limits\.max_side: must be a positive int, got 0$"),
        ("mix.mix_mode=swap", r"^mix\.mix_mode: must be one of"),
        ("loss.kind=siglip", r"^loss\.kind: siglip needs .*model\.init_logit_bias"),
        ("producer.policy=bandit", r"^producer\.policy: must be one of \('uniform', 'adversarial'\)"),

        ("producer.adversarial.explore=0", r"^producer\.adversarial\.explore: must be in \(0, 1\], got 0"),
        ("feedback.every_steps=0", r"^feedback\.every_steps: must be >= 1, got 0$"),
    ],
)
def test_bad_values_name_the_full_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(_compose([override]))


@pytest.mark.parametrize("overrides, message", [
    (["producer.scorer=none", "data=webdataset", "data.path=/x/a.tar"],
     r"^producer\.policy: adversarial needs a fidelity scorer"),
    (["method=random"], r"^producer\.policy: adversarial steers the transport of a streaming method"),
    (["method=edsam", "method.offline_shards=/tmp/x"], r"^producer\.policy: adversarial steers the transport"),
    (["loss.kind=siglip", "model.init_logit_bias=-10"], r"^producer\.policy: adversarial needs loss\.kind=clip"),
])
def test_the_adversarial_policy_is_refused_where_no_feedback_could_steer_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(_compose(["producer.policy=adversarial", *overrides]))
    steered = load_config(_compose(["producer.policy=adversarial"]))  # built-in data: the attributes measurer
    assert (steered.producer.policy, steered.producer.scorer) == ("adversarial", "attributes")


def test_a_bad_value_stops_the_trainer_at_start_with_the_key():
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "consumers.train", "diffusion.rho=-1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: diffusion.rho: must be >= 0, got -1" in proc.stderr


def test_overrides_recompute_derived_defaults():
    cfg = load_config(_compose(["producer.rank=3", "producer.num_producers=4", "buffer.error_buffer=null",
                                "buffer.samples_per_insert=6"]))
    assert cfg.producer.name == "producer-3"
    assert cfg.buffer.error_buffer == 6.0


def test_cpu_demo_is_the_small_cpu_job():
    cfg = load_config(_compose(["experiment=cpu_demo"]))
    assert cfg.data.kind == "builtin" and cfg.data.domain == "flat" and cfg.data.resolution == 32
    assert cfg.diffusion.model == "retrained" and cfg.diffusion.resolution == 32
    assert cfg.model.name == "edsam-tiny-rn" and cfg.runtime.device == "cpu" and cfg.runtime.precision == "fp32"


def test_paper_config_composes_and_builds_on_cpu_with_tiny_stand_ins(tmp_path):
    paper = load_config(_compose(["experiment=paper_cc3m"]))
    assert paper.model.name == "ViT-B-16"
    assert paper.diffusion.model == "CompVis/ldm-text2im-large-256"
    assert (paper.diffusion.m, paper.diffusion.rho, paper.diffusion.steps) == (10, 0.5, 10)
    # the paper's sampler, not the CPU preset of the shipped model
    assert (paper.diffusion.guidance, paper.diffusion.timestep_spacing) == (3.0, None)
    assert paper.producer.num_producers == 8
    assert paper.data.kind == "webdataset" and "cc3m" in str(paper.data.path)
    assert (paper.runtime.device, paper.runtime.precision) == ("cuda", "bf16")

    # stand-ins: a one-shard "CC3M" written here, the random tiny LDM, CPU devices
    import webdataset as wds

    shard = tmp_path / "cc3m-0000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(8):
            image = Image.new("RGB", (300, 260), (30 * i, 100, 200))
            sink.write({"__key__": f"{i:05d}", "jpg": image, "txt": f"a photo number {i}"})
    cfg = load_config(_compose([
        "experiment=paper_cc3m", f"data.path={shard}", "diffusion.model=tiny-random", "diffusion.device=cpu",
        "diffusion.dtype=fp32", "diffusion.resolution=32", "runtime.device=cpu", "trainer.batch_size=2",
        "runtime.num_workers=1",
    ]))
    model, transform, _, tokenizer = create_clip(cfg.model)  # the real ViT-B-16 architecture
    batch_size = cfg.trainer.batch_size
    loader = MixedLoader(cfg.data, transform, tokenizer, cfg.mix.real_batch_size(batch_size),
                         cfg.mix.extra_batch_size(batch_size), ReplayBuffer(cfg.buffer), mix=MixConfig(extra_wait_s=0.0),
                         runtime=RuntimeConfig(num_workers=1, prefetch=1))
    batch = next(iter(loader))
    assert batch.real_images.shape == (2, 3, 224, 224) and batch.extra_images.shape == (2, 3, 224, 224)
    opt = build_optimizer(model, cfg.optim)
    build_scheduler(opt, cfg.optim, cfg.trainer.steps)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, scale = model(batch.real_images, batch.real_texts)[:3]
    assert torch.isfinite(EDSAMLoss(cfg.loss)(img.float(), txt.float(), scale.float())["loss"])
    out = build_sampler(cfg.diffusion).generate(np.zeros((1, 32, 32, 3), np.uint8), ["a photo"], ["k0"], m=2)
    assert out.images.shape == (2, 32, 32, 3)
