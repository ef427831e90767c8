"""One validation pass before any work: every role's config, its keys, values and paths, one
line naming the full key, exit 2, nothing created; fast, described ``--help``; brace patterns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _user_data import tiny_sd_folder, write_imagefolder, write_shards
from test_trainer_dist import _env

from edsam_online import preflight
from edsam_online.cli import help_text, quote_brace_patterns

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override,message", [
    ("trainer.batchsize=3", "trainer.batchsize: unknown key (did you mean trainer.batch_size?)"),
    ("+trainer.batchsize=3", "trainer.batchsize: unknown key (did you mean trainer.batch_size?)"),
    ("stream.limits.max_sid=3", "stream.limits.max_sid: unknown key (did you mean stream.limits.max_side?)"),
    ("trainer.steps=abc", "trainer.steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.batch_size=-1", "trainer.batch_size: must be >= 1, got -1"),
    ("model=vit_b17", "model: no option 'vit_b17' (did you mean model=vit_b16?"),
    ("data.path=a{b", "data.path: cannot parse 'data.path=a{b'"),
    ("data=webdataset", "data.path: is required for kind='webdataset'"),
    ("experiment=sd_1gpu", "data.path: is required"),
])
def test_a_mistake_is_one_line_naming_the_full_key(override, message, capsys):
    with pytest.raises(SystemExit) as stop:
        preflight.main([override])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"config error: {message}"), err
    assert len(err.splitlines()) == 1


def test_paths_that_do_not_exist_are_named_before_any_work(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", n=4, shards=2)
    base = ["data=webdataset", f"data.path={shards}"]
    cases = {
        "data.path: no shard matches": ["data=webdataset", f"data.path={tmp_path}/nope/*.tar"],
        "data.path: 2 of 2 shard(s) not found": ["data=webdataset", f"data.path={tmp_path}/x/{{0..1}}.tar"],
        "data.path: no CSV file at": ["data=csv", f"data.path={tmp_path}/pairs.csv"],
        "eval.imagefolders.pacs: ": [*base, f"+eval.imagefolders.pacs={tmp_path}/pacs"],
        "diffusion.model: no diffusers folder (model_index.json) at": [*base, f"diffusion.model={tmp_path}/sd"],
        "model.pretrained: no file at": [*base, f"model.pretrained={tmp_path}/clip.pt"],
        "model.name: no open_clip folder (open_clip_config.json) at": [*base, f"model.name=local-dir:{tmp_path}"],
        "checkpoint.resume: no file at": [*base, f"checkpoint.resume={tmp_path}/step_00000010.pt"],
        "method.offline_shards: ": [*base, f"method.offline_shards={tmp_path}/syn/{{0..3}}.tar"],
    }
    for message, overrides in cases.items():
        with pytest.raises(SystemExit):
            preflight.main(overrides)
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"config error: {message}") and len(err.splitlines()) == 1, (overrides, err)
    preflight.main(["--plan", *base])  # the shards exist: it passes, and says producers are needed
    assert capsys.readouterr().out.split()[-1] == "yes"


def test_demo_settings_on_real_data_warn_naming_the_key_to_set(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", n=4, shards=1)
    preflight.main(["data=webdataset", f"data.path={shards}"])
    err = capsys.readouterr().err
    assert "config warning: diffusion.model=retrained was trained on the built-in shapes" in err
    assert "config warning: model.name=edsam-tiny is a tiny CPU CLIP" in err
    assert "config warning: eval: only the built-in shape domains" in err
    sd = tiny_sd_folder(tmp_path / "sd")
    val = write_imagefolder(tmp_path / "val", per_class=1)
    preflight.main(["experiment=sd_1gpu", f"data.path={shards}", f"diffusion.model={sd}",
                    f"+eval.imagefolders.val={val}", "eval.domains=[]"])
    assert "config warning" not in capsys.readouterr().err


@pytest.mark.parametrize("overrides,answer", [(["method=real2x"], "no"), (["method=none"], "no"),
                                              (["method=identity"], "yes"), ([], "yes")])
def test_the_plan_says_whether_the_method_needs_producers(overrides, answer, capsys):
    preflight.main(["--plan", *overrides])
    assert capsys.readouterr().out.split()[-1] == answer


def test_the_plan_prepares_only_a_generator_or_scorer_that_needs_it(tmp_path, capsys):
    """producers.prepare runs once before the producers where loading may train (retrained) or
    download (a hub id), or a fidelity scorer is fitted; a tiny or random-weight generator and
    a local folder each producer reads itself, and a method without producers prepares nothing."""
    sd = tiny_sd_folder(tmp_path / "sd")
    cases = {"yes": [[], ["diffusion.model=CompVis/ldm-text2im-large-256"],
                     ["diffusion=tiny_random", "producer.scorer=attributes"]],
             "no": [["diffusion=tiny_random"], ["diffusion.model=random:runwayml/stable-diffusion-v1-5"],
                    [f"diffusion.model={sd}"], ["method=real2x"]]}
    for answer, runs in cases.items():
        for overrides in runs:
            preflight.main(["--plan", *overrides])
            assert f"prepare {answer}" in capsys.readouterr().out.splitlines(), overrides


def test_offline_shards_need_no_producers(tmp_path, capsys):
    shards = write_shards(tmp_path / "syn", n=4, shards=1)
    preflight.main(["--plan", f"method.offline_shards={shards}"])
    assert capsys.readouterr().out.split()[-1] == "no"


def _dry_run(tmp_path, *args):
    return subprocess.run(["bash", "scripts/launch.sh", "--dry-run", "--run-dir", str(tmp_path / "run"), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)


def test_launch_stops_on_a_mistake_before_making_the_run_folder(tmp_path):
    for args in (["trainer.batchsize=3"], ["data=webdataset", f"data.path={tmp_path}/*.tar"]):
        out = _dry_run(tmp_path, *args)
        assert out.returncode == 2 and out.stdout == "", out.stdout
        assert out.stderr.strip().splitlines()[-1].startswith("config error: "), out.stderr
        assert not (tmp_path / "run").exists()


def test_the_readme_brace_pattern_runs_as_written_through_launch(tmp_path):
    shards = write_shards(tmp_path / "cc3m", n=4, shards=2)
    out = _dry_run(tmp_path, "data=webdataset", f"data.path={shards}")  # one layer of quotes, as the shell leaves it
    assert out.returncode == 0, out.stderr
    assert "00000..00001" in out.stdout
    assert quote_brace_patterns([f"data.path={shards}"]) == [f"data.path='{shards}'"]
    assert quote_brace_patterns(["data.path='/a/{0..1}.tar'", "run_dir=${now:%H}", "x={a: 1}"]) == \
        ["data.path='/a/{0..1}.tar'", "run_dir=${now:%H}", "x={a: 1}"]


def test_cfg_job_passes_through_launch(tmp_path):
    out = subprocess.run(["bash", "scripts/launch.sh", "--cfg", "job", "trainer.steps=7"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "steps: 7" in out.stdout and "batch_size:" in out.stdout


def test_an_entry_point_checks_before_it_loads_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "producers", "trainer.batchsize=3"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "config error: trainer.batchsize: unknown key (did you mean trainer.batch_size?)"


def _help(module: str) -> str:
    """``--help`` of an entry point, asserting that answering it imported no torch."""
    code = (f"import sys\nsys.argv = ['x', '--help']\nimport {module} as entry\n"
            "try:\n    entry.main()\nexcept SystemExit as stop:\n    assert stop.code == 0\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("no torch"), module
    return out.stdout


def test_every_entry_point_answers_help_without_importing_torch():
    for module in ("producers.__main__", "producers.prepare", "consumers.evaluate"):
        assert "Keys (KEY=VALUE" in _help(module)
    assert "  eval.retrieval_max_images: int = " in _help("consumers.evaluate")


def test_help_describes_every_group_from_the_dataclasses():
    text = _help("consumers.train")
    for section in ("data  (RealDataConfig)", "trainer  (TrainerConfig)", "buffer  (BufferConfig)",
                    "eval  (EvalConfig)"):
        assert section in text
    assert "  trainer.batch_size: int = " in text and "  stream.limits.max_side: int = " in text
    assert "Replay buffer settings" in text  # BufferConfig's docstring
    assert "model       " in help_text("x", "y") and "vit_b32" in help_text("x", "y")
