"""The run format (`leafe.rundir.RUN_FORMAT`): what leafe writes for a later run to resume records the
format it was written in; a study stage of an older format is redone with one line saying so, and a
method's directory of another format is refused in one line naming the fix. No compatibility code
reads an older format."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import yaml
from helpers import eval_args, leafe, one_line_error

from leafe.errors import LeafeError
from leafe.fingerprint import fingerprint_fields, resume_fingerprint
from leafe.rundir import OLD_FORMAT, RUN_FORMAT, check_resume, claim, stage_status
from leafe.settings import (
    ACESettings,
    BootstrapConfig,
    EarlyExperienceSettings,
    EvalSettings,
    ExploreSettings,
    GRPOSettings,
    SFTSettings,
)
from leafe.study.config import load_config
from leafe.study.study import Study


def test_a_method_directory_of_another_format_is_refused_in_one_line_naming_the_fix(tmp_path):
    fingerprint = resume_fingerprint(ExploreSettings(), "m")
    assert fingerprint["format"] == RUN_FORMAT
    header = tmp_path / "settings.json"
    claim(header, fingerprint, "an exploration")  # a fresh directory records this format
    assert json.loads(header.read_text()) == fingerprint
    claim(header, fingerprint, "an exploration")  # and resumes under it
    older = {k: v for k, v in fingerprint.items() if k != "format"}  # before formats were recorded: 0
    for recorded, found, fix in ((older, 0, "use another"), ({**fingerprint, "format": RUN_FORMAT + 1},
                                                              RUN_FORMAT + 1, "upgrade leafe, use another")):
        header.write_text(json.dumps(recorded))
        with pytest.raises(LeafeError) as refused:
            claim(header, fingerprint, "an exploration")
        assert str(refused.value) == (f"{tmp_path} holds an exploration written by leafe run format {found}, and "
                                      f"this leafe writes format {RUN_FORMAT}: {fix} --out directory or delete it "
                                      f"to start over")
        assert json.loads(header.read_text()) == recorded  # nothing rewritten, nothing deleted
    # The format is checked before the settings: an old directory is never "other settings".
    with pytest.raises(LeafeError, match="written by leafe run format 0"):
        check_resume({"tasks": 1}, fingerprint, tmp_path, "an exploration")


def test_leafe_eval_refuses_a_partial_evaluation_of_an_older_format(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    progress = out / "eval_tasks.jsonl"
    old = '{"settings": {"env": "sokoban", "tasks": 3}}\n{"task_id": "sokoban-1000", "n": 4, "c": 0}\n'
    progress.write_text(old)
    one_line_error(leafe(*eval_args(tiny_model_dir, out)), f"{out} holds a partial evaluation written by leafe run "
                   f"format 0, and this leafe writes format {RUN_FORMAT}: use another --out directory or delete it")
    assert progress.read_text() == old and sorted(p.name for p in out.iterdir()) == ["eval_tasks.jsonl"]


def test_every_knob_that_is_not_speed_only_is_in_the_fingerprints():
    for cls in (EvalSettings, ExploreSettings, GRPOSettings, SFTSettings, EarlyExperienceSettings, ACESettings,
                BootstrapConfig):
        settings = cls()
        kept = set(fingerprint_fields(settings))
        assert kept == {f.name for f in fields(settings)} - set(getattr(cls, "speed_only", ())), cls.__name__
    # what a rerun may change and still resume, and nothing else, is out of the resume fingerprint
    assert set(resume_fingerprint(EvalSettings(), "m")) == set(fingerprint_fields(EvalSettings())) - {"ks"} | {
        "model", "format"}


def test_a_studys_stages_record_the_engine_the_processes_and_the_start(tmp_path):
    stages = {s.key: s for s in Study(load_config(_config(tmp_path / "a.yaml")), tmp_path / "run").stages()}
    assert stages["grpo.train"].fingerprint["settings"]["engine"] == {"backend": "hf", "tensor_parallel_size": 1,
                                                                      "max_model_len": None}
    assert stages["grpo.train"].fingerprint["settings"]["training"] == {"processes": 1}
    assert stages["leafe.distill"].fingerprint["settings"]["training"] == {"processes": 1}
    assert "training" not in stages["leafe.explore"].fingerprint["settings"]  # it trains nothing
    assert {stages[k].fingerprint["settings"]["start"] for k in ("leafe.explore", "ace.train")} == {"grpo"}
    assert stages["grpo.train"].fingerprint["settings"]["start"] == "base"


def _config(path, **more):
    path.write_text(yaml.safe_dump({"name": "f", **more}))
    return path


@pytest.mark.parametrize("parallel_stages", [1, 2], ids=["in-process", "side-by-side"])
def test_a_stage_of_an_older_format_is_redone_with_one_line_and_a_newer_ones_refused(tiny_model_dir, tmp_path,
                                                                                     parallel_stages):
    config = _config(tmp_path / "base.yaml", model=str(tiny_model_dir), methods=["base"],
                     parallel_stages=parallel_stages, generation={"device": "cpu"}, env_params={"max_steps": 2},
                     eval={"tasks": 1, "task_seed": 900, "samples": 1, "max_new_tokens": 4})
    run = tmp_path / "run"
    study = Study(load_config(config), run)
    (stage,) = study.stages()
    where = study.stage_dir(stage.key)
    where.mkdir(parents=True)
    # What an older leafe left: a finished stage of this very config (its digest), without `format`,
    # and its method's files, which this leafe would refuse to resume (so they must go).
    old = {"stage": stage.key, "digest": stage.digest(), "fingerprint": stage.fingerprint, "done": True,
           "method": "eval", "cost": {"env_steps": 1, "generated_tokens": 1, "wall_s": 1.0}}
    (where / "stage.json").write_text(json.dumps(old))
    (where / "eval_tasks.jsonl").write_text('{"settings": {"env": "sokoban"}}\n')
    assert study.status(stage) == OLD_FORMAT == stage_status(where, stage.digest())

    done = leafe("run", config, "--out", run)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if "base.eval:" in line]
    assert len(said) == 1 and said[0].endswith(
        f"stage 1/1 base.eval: written by leafe run format 0, this leafe writes {RUN_FORMAT}; redoing it"), said
    record = json.loads((where / "stage.json").read_text())
    assert record["format"] == RUN_FORMAT and record["done"] and study.status(stage) == "done"
    header = json.loads((where / "eval_tasks.jsonl").read_text().splitlines()[0])
    assert header["settings"]["format"] == RUN_FORMAT  # the method's own record, redone in this format

    again = leafe("run", config, "--out", run)  # this format's: done, skipped
    assert again.returncode == 0 and "stage 1/1 base.eval: done earlier, skipped" in again.stdout

    # A stage a later leafe wrote is not this one's to throw away: refused, left as it is.
    newer = {**record, "format": RUN_FORMAT + 1}
    (where / "stage.json").write_text(json.dumps(newer))
    with pytest.raises(LeafeError, match=f"written by leafe run format {RUN_FORMAT + 1}, newer than this leafe's"):
        study.status(stage)
    one_line_error(leafe("run", config, "--out", run), f"{where / 'stage.json'} was written by leafe run format "
                   f"{RUN_FORMAT + 1}, newer than this leafe's {RUN_FORMAT}: upgrade leafe, or use another --out")
    assert json.loads((where / "stage.json").read_text()) == newer
