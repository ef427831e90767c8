"""Real-data sources: partitions, exact resume, corrupt data, CSV, make_shards round trip, config errors."""

import io
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torchdata.nodes import Loader

from edsam_online.data import (DataCounters, RealDataConfig, RealRecord, RealSourceNode, decode_record,
                               iter_real_samples, render_sample)

from _scripts import load_script


def _load_make_shards():
    return load_script("scripts/make_shards.py")


make_shards = _load_make_shards()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 flat samples in 4 shards of 10 (PNG), written by the script's own function."""
    out = tmp_path_factory.mktemp("wds")
    paths = make_shards.write_webdataset(out, "flat", 40, 16, seed=0, image_format="png", shard_size=10)
    assert len(paths) == 4
    return out / "flat"


def _keys(node, n=None):
    return [r.key for r in (node if n is None else itertools.islice(node, n))]


def _epoch_keys(cfg, world_size):
    return [_keys(RealSourceNode(cfg, r, world_size)) for r in range(world_size)]


def _assert_partition(per_rank, expected):
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)), "ranks overlap"
    assert set(flat) == set(expected)
    assert all(per_rank), "a rank got nothing"


def test_builtin_partitions_are_disjoint_and_cover_everything():
    cfg = RealDataConfig(length=30, epochs=1, resolution=16)
    _assert_partition(_epoch_keys(cfg, 3), [render_sample(i, "flat", 16, 0).key for i in range(30)])


@pytest.mark.parametrize("world_size", [2, 3, 6])  # 4 shards: split by shard (2), by sample (3, 6)
def test_webdataset_partitions_are_disjoint_and_cover_everything(shards, world_size):
    cfg = RealDataConfig(kind="webdataset", path=str(shards), epochs=1, resolution=16, shuffle_buffer=8)
    _assert_partition(_epoch_keys(cfg, world_size), [f"{i:09d}" for i in range(40)])


def test_epochs_reshuffle_the_same_set_and_epochs_limit_stops():
    cfg = RealDataConfig(length=20, epochs=2, resolution=16)
    keys = _keys(RealSourceNode(cfg, 0, 1))
    assert len(keys) == 40
    assert set(keys[:20]) == set(keys[20:]) and keys[:20] != keys[20:]
    unshuffled = _keys(RealSourceNode(RealDataConfig(length=20, epochs=1, shuffle=False, resolution=16)))
    assert unshuffled == [render_sample(i, "flat", 16, 0).key for i in range(20)]


def _check_resume(make_node, stop_at, more):
    node = make_node()
    _keys(node, stop_at)
    state = node.state_dict()
    expected = _keys(node, more)
    resumed = make_node()
    resumed.reset(state)
    assert _keys(resumed, more) == expected


@pytest.mark.parametrize("stop_at", [0, 7, 10, 23])  # mid-epoch, at the boundary, in epoch 2
def test_builtin_resume_matches_uninterrupted_run(stop_at):
    cfg = RealDataConfig(length=20, resolution=16, seed=5)
    _check_resume(lambda: RealSourceNode(cfg, 1, 2), stop_at, 15)


@pytest.mark.parametrize("world_size,stop_at", [(2, 13), (3, 5), (1, 47)])
def test_webdataset_resume_matches_uninterrupted_run(shards, world_size, stop_at):
    cfg = RealDataConfig(kind="webdataset", path=str(shards / "{00000..00003}.tar"), resolution=16,
                         shuffle_buffer=6)
    _check_resume(lambda: RealSourceNode(cfg, world_size - 1, world_size), stop_at, 25)


def test_resume_through_torchdata_loader_state_dict():
    cfg = RealDataConfig(length=12, resolution=16)
    loader = Loader(RealSourceNode(cfg, 0, 1))
    it = iter(loader)
    _keys(it, 9)
    state = loader.state_dict()
    expected = _keys(it, 10)
    loader2 = Loader(RealSourceNode(cfg, 0, 1))
    loader2.load_state_dict(state)
    assert _keys(iter(loader2), 10) == expected


def test_state_from_another_partition_is_rejected():
    state = RealSourceNode(RealDataConfig(length=10), 0, 2).state_dict()
    with pytest.raises(ValueError, match="initial_state"):
        RealSourceNode(RealDataConfig(length=10), 1, 2).reset(state)


def _jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(render_sample(seed, "flat", 24, 0).image).save(buf, format="JPEG")
    return buf.getvalue()


def test_corrupt_and_incomplete_samples_in_a_shard_are_skipped_and_counted(tmp_path, caplog):
    shard = tmp_path / "bad.tar"
    good = _jpeg(0)
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "a", "jpg": _jpeg(1), "txt": "first"})
        sink.write({"__key__": "broken", "jpg": good[:200] + b"\x00" * 50, "txt": "truncated jpeg"})
        sink.write({"__key__": "nocap", "jpg": _jpeg(2)})
        sink.write({"__key__": "garbage", "webp": b"definitely not an image", "txt": "garbage"})
        sink.write({"__key__": "b", "png": _png(3), "txt": "second", "json": {"class": "star"}})
    counters = DataCounters()
    cfg = RealDataConfig(kind="webdataset", path=str(shard), epochs=1, resolution=16)
    with caplog.at_level(logging.WARNING, logger="edsam_online.data.sources"):
        samples = list(iter_real_samples(cfg, counters=counters))
    assert sorted(s.key for s in samples) == ["a", "b"]
    assert all(s.image.shape == (16, 16, 3) and s.image.dtype == np.uint8 for s in samples)
    assert next(s for s in samples if s.key == "b").meta["class"] == "star"
    stats = counters.snapshot()
    assert stats["data/corrupt_images"] == 2 and stats["data/missing_fields"] == 1
    assert "broken" in caplog.text and "garbage" in caplog.text


def _png(i, size=24):
    buf = io.BytesIO()
    Image.fromarray(render_sample(i, "flat", size, 0).image).save(buf, format="PNG")
    return buf.getvalue()


def test_csv_reader_resolves_relative_paths_and_skips_bad_rows(tmp_path):
    (tmp_path / "img").mkdir()
    lines = ["path,caption"]
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))
        lines.append(f"img/{i}.png,caption {i}")
    lines += ["img/missing.png,gone", "img/0.png,", "img/bad.png,corrupt"]
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    cfg = RealDataConfig(kind="csv", path=str(tmp_path / "data.csv"), epochs=1, resolution=24)
    counters = DataCounters()
    per_rank = [[s.caption for s in iter_real_samples(cfg, r, 2, counters)] for r in range(2)]
    _assert_partition(per_rank, [f"caption {i}" for i in range(6)])
    s = next(iter_real_samples(RealDataConfig(kind="csv", path=str(tmp_path / "data.csv"), shuffle=False,
                                             resolution=24)))
    assert np.array_equal(s.image, render_sample(0, "flat", 24, 0).image)  # PNG is lossless
    assert counters["data/unreadable_files"] == 1
    assert counters["data/missing_fields"] == 1
    assert counters["data/corrupt_images"] == 1


def test_make_shards_output_reads_back(tmp_path, capsys):
    rc = make_shards.main(["--webdataset", str(tmp_path / "wds"), "--imagefolder", str(tmp_path / "if"),
                           "--domains", "flat", "dark", "--per-domain", "12", "--resolution", "16",
                           "--shard-size", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "dark" in out and "3 shard(s)" in out
    cfg = RealDataConfig(kind="webdataset", path=str(tmp_path / "wds" / "dark"), epochs=1, shuffle=False,
                         resolution=16)
    samples = list(iter_real_samples(cfg))
    assert len(samples) == 12
    for s in samples:
        ref = render_sample(s.meta["index"], "dark", 16, 0)
        assert s.caption == ref.caption and s.meta["class"] == ref.meta["class"] and s.meta["domain"] == "dark"
        assert np.abs(s.image.astype(int) - ref.image.astype(int)).mean() < 6  # JPEG round trip
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(str(tmp_path / "if" / "flat"))
    assert len(folder) == 12
    for path, label in folder.samples:
        index = int(Path(path).stem.rsplit("-", 1)[1])
        assert folder.classes[label] == render_sample(index, "flat", 16, 0).meta["class"]


def test_decode_record_center_crops_to_resolution():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # white centre square
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    s = decode_record(RealRecord("k", buf.getvalue(), "c"), resolution=10)
    assert s.image.shape == (10, 10, 3) and s.image.min() > 200
    assert decode_record(RealRecord("k", np.zeros((4, 4), np.uint8), "c")) is None


@pytest.mark.parametrize("kwargs,field", [
    (dict(kind="parquet"), "kind"),
    (dict(domain="watercolor"), "domain"),
    (dict(resolution=4), "resolution"),
    (dict(kind="webdataset"), "path"),
    (dict(kind="csv", path=""), "path"),
    (dict(length=0), "length"),
    (dict(epochs=0), "epochs"),
    (dict(seed=-1), "seed"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RealDataConfig(**kwargs)


def test_missing_sources_and_bad_ranks_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="path"):
        RealSourceNode(RealDataConfig(kind="webdataset", path=str(tmp_path / "x-{0..3}.tar")))
    with pytest.raises(ValueError, match="path"):
        RealSourceNode(RealDataConfig(kind="csv", path=str(tmp_path / "nope.csv")))
    (tmp_path / "one.csv").write_text("path,caption\na.png,a\n")
    with pytest.raises(ValueError, match="rank 1"):
        RealSourceNode(RealDataConfig(kind="csv", path=str(tmp_path / "one.csv")), 1, 2)
    with pytest.raises(ValueError, match="rank"):
        RealSourceNode(RealDataConfig(), 2, 2)
    (tmp_path / "nocol.csv").write_text("file,text\na.png,a\n")
    with pytest.raises(ValueError, match="caption"):
        RealSourceNode(RealDataConfig(kind="csv", path=str(tmp_path / "nocol.csv")))


def test_truncated_shard_is_counted_and_the_other_shards_are_read(shards, tmp_path):
    data = (shards / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    paths = [str(shards / "00000.tar"), str(tmp_path / "00001.tar"), str(shards / "00002.tar")]
    counters = DataCounters()
    cfg = RealDataConfig(kind="webdataset", path=paths, epochs=1, shuffle=False, resolution=16)
    keys = [s.key for s in iter_real_samples(cfg, counters=counters)]
    assert set(keys) >= {f"{i:09d}" for i in [*range(10), *range(20, 30)]}
    assert 20 <= len(keys) < 30
    assert counters["data/corrupt_shards"] >= 1


def test_a_source_with_no_decodable_image_raises_instead_of_spinning(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "jpg": b"not a jpeg", "txt": "caption"})
    cfg = RealDataConfig(kind="webdataset", path=str(tmp_path / "bad.tar"), resolution=16)
    counters = DataCounters()
    with pytest.raises(ValueError, match="decoded"):
        next(iter_real_samples(cfg, counters=counters))
    assert counters["data/corrupt_images"] == 4  # the epoch's 3, and the next epoch's first shows the epoch ended
