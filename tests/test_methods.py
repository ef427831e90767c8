"""The methods of Eq. 11's second term: their configs, real2x's disjoint stream, sibling-free draws."""

from __future__ import annotations

from operator import attrgetter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from edsam_online.buffer import BufferConfig, ReplayBuffer
from edsam_online.config import load_config
from edsam_online.data import RealDataConfig
from edsam_online.loader import FromEpoch, MixedBatch, MixedLoader, SyntheticSlotNode
from edsam_online.methods import GENERATOR_MODES
from edsam_online.models import ClipModelConfig, create_clip
from edsam_online.runtime import RuntimeConfig, free_port
from edsam_online.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return load_config(compose("config", overrides=list(overrides)))


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(GENERATOR_MODES))
def test_every_method_composes_with_its_generator_mode(name):
    cfg = _compose([f"method={name}"])
    assert cfg.method.name == name
    assert cfg.method.generator_mode in (None, cfg.diffusion.mode)
    if cfg.method.generator_mode:  # the method alone sets it: no method file restates it
        assert "diffusion" not in OmegaConf.load(ROOT / "configs" / "method" / f"{name}.yaml")


def test_a_generator_mode_that_disagrees_with_the_method_stops_at_start():
    with pytest.raises(ValueError, match=r"^diffusion\.mode: method=edsam generates with mode 'transport'"):
        _compose(["diffusion.mode=random"])
    with pytest.raises(ValueError, match=r"^diffusion\.mode: method=random generates with mode 'random', got 'identity'"):
        _compose(["method=random", "diffusion.mode=identity"])


@pytest.fixture(scope="module")
def clip_io():
    _, transform, _, tokenizer = create_clip(ClipModelConfig(name="edsam-tiny"))
    return transform, tokenizer


def test_real2x_draws_no_key_twice_within_a_step(clip_io):
    transform, tokenizer = clip_io
    data = RealDataConfig(length=48, seed=5)  # small: the two streams meet often
    loader = MixedLoader(data, transform, tokenizer, 8, 8, extra="real",
                         runtime=RuntimeConfig(num_workers=1, prefetch=1))
    it = iter(loader)
    for _ in range(12):
        batch = next(it)
        keys = batch.real_keys + batch.extra_keys
        assert len(keys) == len(set(keys)) == 16
        assert batch.extra_genuine.all()  # every extra row counts in the second term
    assert loader.stats()["data/extra_duplicates_skipped"] > 0  # collisions happened and were skipped


def _siblings_buffer(distinct: bool) -> ReplayBuffer:
    buffer = ReplayBuffer(BufferConfig(capacity=64, min_size_to_sample=1, samples_per_insert=0, seed=3,
                                       distinct_sources=distinct), key=attrgetter("source_key"))
    buffer.insert_many([SimpleNamespace(source_key=f"src{i // 4}", m=i % 4) for i in range(32)])  # 8 keys x M=4
    return buffer


class _NoFallback:
    """A fallback that must not be needed."""

    def reset(self, initial_state=None):
        pass

    def state_dict(self):
        return {}

    def __next__(self):
        raise AssertionError("the buffer could not serve a distinct sample")


@pytest.mark.parametrize("distinct", [True, False])
def test_the_sibling_free_draw_takes_one_sample_per_source_key_in_a_slot(distinct):
    buffer = _siblings_buffer(distinct)
    node = SyntheticSlotNode(buffer, _NoFallback(), slot_size=4, wait_s=0.0, distinct_sources=distinct)
    node.reset()
    slots = [[next(node).sample.source_key for _ in range(4)] for _ in range(50)]
    with_siblings = sum(len(set(slot)) < len(slot) for slot in slots)
    if distinct:
        assert with_siblings == 0
        assert buffer.stats()["buffer/excluded_draws"] > 0
    else:
        assert with_siblings > 10  # uniform draws put siblings together often


def test_the_fallback_stream_starts_at_its_own_epoch():
    from edsam_online.data import RealSourceNode

    cfg = RealDataConfig(length=32, seed=1)
    main, other = RealSourceNode(cfg), FromEpoch(RealSourceNode(cfg), 7)
    main.reset()
    other.reset()
    assert [next(main).key for _ in range(32)] != [next(other).key for _ in range(32)]
    assert other.state_dict()["source"]["epoch"] == 7  # it read epoch 7, not epoch 0


def _trainer(tmp_path, name: str, **groups) -> Trainer:
    tree = {"method": {"name": name}, "stream": {"endpoints": [f"tcp://127.0.0.1:{free_port()}"]},
            "trainer": {"batch_size": 4, "steps": 6, "progress": False}, "mix": {"extra_share": 1.0, "extra_wait_s": 0.0},
            "runtime": {"device": "cpu", "num_workers": 1, "prefetch": 1}, "data": {"length": 64},
            "eval": {"domains": ["flat"], "samples_per_class": 2, "linear_probe": False},
            "logging": {"wandb": False, "log_every": 3}, "run_dir": str(tmp_path / name)}
    for group, values in groups.items():
        tree.setdefault(group, {}).update(values)
    return Trainer(load_config(tree))


def test_method_none_trains_the_real_term_alone_and_real2x_trains_both(tmp_path):
    from edsam_online.metrics import read_jsonl

    none = _trainer(tmp_path, "none")
    assert none.extra_batch == 0 and none.buffer is None and none.receiver is None
    none.train()
    real2x = _trainer(tmp_path, "real2x")
    assert real2x.extra_batch == 4 and real2x.buffer is None and real2x.receiver is None
    real2x.train()
    logs = {m: [r for r in read_jsonl(tmp_path / m / "metrics" / "trainer0.jsonl") if "train/loss" in r]
            for m in ("none", "real2x")}
    assert logs["none"][-1]["train/extra_samples"] == 0 and logs["none"][-1]["train/steps_without_extra"] == 6
    assert logs["real2x"][-1]["train/extra_samples"] == 24 and logs["real2x"][-1]["train/steps_without_extra"] == 0
    assert all(r["train/loss_extra"] > 0 for r in logs["real2x"])
    assert logs["real2x"][-1]["train/extra_sibling_pairs"] == 0  # disjoint keys


def test_a_step_counts_the_sibling_pairs_of_its_extra_batch(tmp_path):
    with _trainer(tmp_path, "edsam") as trainer:
        texts = trainer.tokenizer(["a shape"] * 8)
        batch = MixedBatch(torch.rand(4, 3, 32, 32), texts[:4], list("abcd"), torch.rand(4, 3, 32, 32), texts[4:],
                           ["s1", "s1", "s1", "s2"], torch.tensor([True, True, True, True]), torch.zeros(4))
        assert trainer.train_step(batch).sibling_pairs == 3  # s1 three times: 3 pairs


@pytest.mark.parametrize("ratio,block", [(0.5, 4), (0.75, 8), (0.25, 3)])
def test_masking_masks_the_configured_fraction_of_every_image(ratio, block):
    from edsam_online.methods import BlockMasking

    mask = BlockMasking(ratio, block, seed=0).mask(16, 32, 32)
    rows = -(-32 // block)
    expected_blocks = round(ratio * rows * rows)
    for m in mask[:, 0]:
        grid = m[::block, ::block]  # one pixel per block: blocks are all or nothing
        assert int(grid.sum()) == expected_blocks
        assert torch.equal(m, grid.repeat_interleave(block, 0).repeat_interleave(block, 1)[:32, :32])
    assert not torch.equal(mask[0], mask[1])  # each image its own blocks


def test_a_masking_trainer_trains_on_masked_copies_of_its_real_images(tmp_path):
    with _trainer(tmp_path, "masking", model={"name": "edsam-tiny"}, method={"mask_block": 2}) as trainer:
        assert trainer.buffer is None and trainer.extra_batch == 4
        assert trainer.augmentation.block == 4  # the tiny ViT's patch size, not mask_block
        texts = trainer.tokenizer(["a shape"] * 4)
        real = torch.rand(4, 3, 32, 32) + 0.5  # no pixel is 0 before masking
        empty = torch.empty(0, 3, 32, 32)
        batch = MixedBatch(real.clone(), texts, list("abcd"), empty, texts[:0], [], torch.zeros(0, dtype=torch.bool),
                           torch.zeros(0))
        out = trainer.train_step(batch)
        assert out.used_extra and out.num_genuine == 4 and out.loss_extra > 0
        assert batch.extra_keys == list("abcd") and torch.equal(batch.real_images, real)  # the real term is untouched
        masked = (batch.extra_images == 0).all(dim=1).float().mean().item()
        assert masked == pytest.approx(0.5)
        kept = batch.extra_images != 0
        assert torch.equal(batch.extra_images[kept], real[kept])


def _real_batch(trainer: Trainer, n: int = 4) -> MixedBatch:
    torch.manual_seed(1)
    texts = trainer.tokenizer([f"a {size} shape number {i}" for i, size in enumerate(["small", "large"] * (n // 2))])
    empty = torch.empty(0, 3, 32, 32)
    return MixedBatch(torch.randn(n, 3, 32, 32), texts, [f"k{i}" for i in range(n)], empty, texts[:0], [],
                      torch.zeros(0, dtype=torch.bool), torch.zeros(0))


def _clip_loss(trainer: Trainer, images: torch.Tensor, texts: torch.Tensor) -> float:
    from open_clip.loss import ClipLoss

    model = trainer.model.eval()
    with torch.no_grad():
        loss = ClipLoss()(model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True),
                          model.logit_scale.exp())
    model.train()
    return float(loss)


def test_ada_perturbs_the_real_images_so_that_the_clip_loss_rises(tmp_path):
    with _trainer(tmp_path, "ada", method={"adv_steps": 3, "adv_lr": 0.05, "ada_gamma": 0.1}) as trainer:
        batch = _real_batch(trainer)
        real = batch.real_images.clone()
        trainer.augmentation(batch, trainer)
        assert batch.extra_images.shape == real.shape and batch.extra_keys == batch.real_keys
        assert (batch.extra_images - real).abs().max() <= 3 * 0.05 + 1e-6  # 3 signed steps of 0.05
        assert _clip_loss(trainer, batch.extra_images, batch.extra_texts) > _clip_loss(trainer, real, batch.real_texts)
        assert all(p.grad is None for p in trainer.model.parameters())  # the ascent leaves no gradient behind
        assert trainer.model.training
        out = trainer.train_step(_real_batch(trainer))
        assert out.used_extra and out.num_genuine == 4


def test_advstyle_moves_the_channel_statistics_and_keeps_the_content(tmp_path):
    with _trainer(tmp_path, "advstyle", method={"adv_steps": 2, "adv_lr": 0.1}) as trainer:
        batch = _real_batch(trainer)
        real = batch.real_images.clone()
        trainer.augmentation(batch, trainer)
        styled = batch.extra_images

        def stats(x):
            return x.mean(dim=(2, 3)), x.std(dim=(2, 3))

        (m0, s0), (m1, s1) = stats(real), stats(styled)
        assert (m1 - m0).abs().mean() > 0.1 and (s1 - s0).abs().mean() > 0.1  # 2 steps of 0.1: channels restyled
        assert torch.allclose((styled - m1[..., None, None]) / s1[..., None, None],
                              (real - m0[..., None, None]) / s0[..., None, None], atol=1e-3)
        assert _clip_loss(trainer, styled, batch.extra_texts) > _clip_loss(trainer, real, batch.real_texts)


def test_offline_shards_round_trip_from_a_producer_into_the_trainer(tmp_path, clip_io):
    """The paper's pipeline: a producer writes its samples to shards, a trainer reads them
    as its synthetic source with the same loss."""
    import json
    import tarfile

    from _streaming_helpers import tiny_configs
    from edsam_online.diffusion import build_sampler
    from edsam_online.producer import Producer, ProducerConfig
    from edsam_online.streaming import StreamConfig

    data, sampler_cfg = tiny_configs()
    shards = tmp_path / "shards"
    pcfg = ProducerConfig(num_samples=10, batch_size=2, m=2, seed=4, sink="shards", shard_dir=str(shards),
                          shard_samples=4, scorer="attributes")

    def scorer(images, captions):  # stands in for the attribute scorer: every sample scores 0.75
        return np.full(len(images), 0.75, np.float32)

    result = Producer(StreamConfig(), pcfg, data, build_sampler(sampler_cfg), install_signal_handlers=False,
                      scorer=scorer).run()
    assert result["producer/sent"] == 10
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) == 3  # 4 + 4 + 2 samples
    members = [m.name for t in tars for m in tarfile.open(t).getmembers()]
    assert sorted({m.rsplit(".", 1)[1] for m in members}) == ["json", "png", "txt"] and len(members) == 30
    provenance = [json.loads(tarfile.open(t).extractfile(m).read()) for t in tars
                  for m in tarfile.open(t).getmembers() if m.name.endswith(".json")]
    assert sorted(p["seq"] for p in provenance) == list(range(10))
    assert {p["mode"] for p in provenance} == {"transport"} and all("alpha" in p for p in provenance)
    assert {p["score"] for p in provenance} == {0.75}

    transform, tokenizer = clip_io
    loader = MixedLoader(RealDataConfig(length=64), transform, tokenizer, 4, 4, extra="shards", shards=str(shards),
                         runtime=RuntimeConfig(num_workers=1, prefetch=1))
    batch = next(iter(loader))
    assert batch.extra_genuine.all() and batch.extra_images.shape == (4, 3, 32, 32)
    sources = {p["source_key"] for p in provenance}
    assert set(batch.extra_keys) <= sources  # keyed by their source image, as online samples are
    assert torch.isfinite(batch.extra_alpha).all()  # alpha and score read from the provenance
    assert batch.extra_score.tolist() == [0.75] * 4

    with _trainer(tmp_path, "edsam", method={"offline_shards": str(shards)}) as trainer:
        assert trainer.buffer is None and trainer.receiver is None and trainer.extra_batch == 4
        out = trainer.train_step(next(iter(trainer.loader)))
        assert out.used_extra and out.num_genuine == 4 and out.loss_extra > 0


def test_offline_shards_need_a_generating_method():
    with pytest.raises(ValueError, match=r"^method\.offline_shards: method real2x generates nothing"):
        _compose(["method=real2x", "method.offline_shards=/tmp/x"])
