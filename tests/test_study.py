"""`leafe run`: config checking, the stage plan, a whole study on a tiny Llama, skip and resume rules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import SHARED_DATA, leafe

from leafe.errors import LeafeError
from leafe.study.config import load_config
from leafe.study.study import Study

CONFIGS = sorted((Path(__file__).parent.parent / "leafe" / "configs").glob("*.yaml"))
STAGES = ["base.eval", "grpo.train", "leafe.explore", "leafe.distill", "early_experience.train", "ace.train",
          "grpo.eval", "leafe.eval", "early_experience.eval", "ace.eval"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses_and_prints_its_plan(config, tmp_path, monkeypatch):
    (tmp_path / "model-dir").mkdir()  # a dry run checks that the model exists
    # A dry run also checks that the env's data is there: the ALFWorld config plays the real games.
    if load_config(config).env == "alfworld":
        if not (SHARED_DATA / "alfworld").is_dir():
            pytest.skip(f"ALFWorld's games are not at {SHARED_DATA / 'alfworld'}")
        monkeypatch.setenv("ALFWORLD_DATA", str(SHARED_DATA / "alfworld"))
    run = leafe("run", config, "--dry-run", "--out", tmp_path / "run", "--model", tmp_path / "model-dir")
    assert run.returncode == 0, run.stderr
    for key in STAGES:
        assert key in run.stdout
    # Issue 39: every shipped config runs the baselines as the paper did, from GRPO's checkpoint.
    what = plan_rows(run.stdout)
    assert (what["leafe.explore"], what["ace.train"]) == ("LEAFE explore from grpo", "ACE playbook from grpo")
    assert what["early_experience.train"].endswith(" from grpo")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    study = Study(load_config(config), tmp_path)
    assert [s.key for s in study.stages()][-len(STAGES):] == STAGES


def plan_rows(stdout: str) -> dict[str, str]:
    """The dry run's stage table as {stage key: its 'what' cell}, the cell's wrapped lines joined."""
    rows: dict[str, str] = {}
    key = ""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 5:
            continue
        if cells[0]:  # a row's first line: its number and its key (never wrapped)
            key = cells[1]
        rows[key] = f"{rows.get(key, '')} {cells[2]}".strip()
    return rows


def test_demo_config_is_the_embedded_default():
    config = load_config(Path(__file__).parent.parent / "leafe" / "configs" / "sokoban-demo.yaml")
    assert config.model == "embedded" and set(config.methods) == {"base", "grpo", "leafe", "early_experience", "ace"}
    assert [s.key for s in Study(config, "x").stages()][0] == "bootstrap"
    # Issue 28: enough held-out levels that a 5-point Pass@1 difference can be told from noise, and
    # enough samples for Pass@k at a k where GRPO and LEAFE part (Pass@16).
    assert config.eval_settings().tasks >= 30 and config.eval_settings().samples >= 16


def write_config(path: Path, **overrides) -> Path:
    data = {"name": "t", **overrides}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("overrides, message", [
    ({"grpo": {"stepz": 3}}, "grpo.stepz is not a setting; known:"),
    ({"eval": {"tasks": "many"}}, "eval.tasks: Input should be a valid integer"),
    ({"eval": {"tasks": 0}}, "--tasks must be >= 1"),
    ({"grpo": {"env": "code"}}, "grpo.env cannot be set here"),
    ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
    ({"methods": ["grpo"]}, "methods must include base"),
    ({"methods": ["base", "leafe"], "leafe": {"start": "grpo"}}, "leafe.start is grpo but grpo is not in methods"),
    ({"methods": ["base", "ace"]}, "ace.start is grpo but grpo is not in methods; add grpo to methods or set "
                                   "ace.start: base"),
    ({"methods": ["base", "early_experience", "ace"]}, "early_experience.start and ace.start are grpo but grpo is "
                                                       "not in methods; add grpo to methods or set "
                                                       "early_experience.start: base, ace.start: base"),
    ({"ace": {"start": "sft"}}, "ace.start: Input should be 'grpo' or 'base'"),
    ({"ace": {"max_lesons": 3}}, "ace.max_lesons is not a setting; known:"),
    ({"methods": ["base", "ppo"]}, "methods.1: Input should be"),
    ({"eval": {"env_params": "valid_unseen"}}, "eval.env_params must be a mapping of env parameters"),
])
def test_a_bad_config_is_one_line_naming_the_key(tmp_path, overrides, message):
    path = write_config(tmp_path / "c.yaml", **overrides)
    with pytest.raises(LeafeError) as err:
        load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_eval_env_params_change_what_the_evaluations_play_and_nothing_else(tmp_path):
    path = write_config(tmp_path / "c.yaml", env="alfworld", env_params={"split": "train", "max_steps": 30},
                        eval={"tasks": 4, "task_seed": 0, "env_params": {"split": "valid_unseen"}})
    config = load_config(path)
    assert config.eval_settings().env_params == {"split": "valid_unseen", "max_steps": 30}
    for settings in (config.grpo_settings(), config.explore_settings(), config.early_experience_settings(),
                     config.ace_settings()):
        assert settings.env_params == {"split": "train", "max_steps": 30}
    study = Study(config, tmp_path / "run")
    evals = [s for s in study.stages() if s.key.endswith(".eval")]
    assert evals and all(s.fingerprint["settings"]["eval"]["env_params"]["split"] == "valid_unseen" for s in evals)
    # A dry run checks the evaluations' parameters too, by name (after the data, which must be there).
    if not (SHARED_DATA / "alfworld").is_dir():
        pytest.skip(f"ALFWorld's games are not at {SHARED_DATA / 'alfworld'}")
    bad = write_config(tmp_path / "bad.yaml", env="alfworld", env_params={"data_dir": str(SHARED_DATA / "alfworld")},
                       eval={"env_params": {"splitt": "valid_unseen"}})
    run = leafe("run", bad, "--dry-run", "--out", tmp_path / "r")
    assert run.returncode == 2 and "env 'alfworld' has no parameter 'splitt'" in run.stderr


def test_run_rejects_missing_and_malformed_configs(tmp_path):
    run = leafe("run", tmp_path / "none.yaml")
    assert run.returncode == 2 and "does not exist" in run.stderr
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    run = leafe("run", tmp_path / "bad.yaml")
    assert run.returncode == 2 and "is not valid YAML" in run.stderr
    run = leafe("run", write_config(tmp_path / "c.yaml", model=str(tmp_path / "nowhere")), "--out", tmp_path / "r")
    assert run.returncode == 2 and "nowhere does not exist" in run.stderr


def test_the_baselines_start_from_grpos_checkpoint_unless_told_base(tmp_path):
    # The paper's protocol (issue 39): Early Experience fine-tunes GRPO's checkpoint and ACE plays it,
    # so both read grpo.train's model, run after it and are redone when it changes.
    study = Study(load_config(write_config(tmp_path / "a.yaml")), tmp_path / "run")
    stages = {s.key: s for s in study.stages()}
    order = list(stages)
    grpo = tmp_path / "run" / "grpo" / "train"
    for method, key in (("leafe", "leafe.explore"), ("early_experience", "early_experience.train"),
                        ("ace", "ace.train")):
        assert stages[key].after == ("grpo.train",) and order.index(key) > order.index("grpo.train"), key
        assert stages[key].fingerprint["after"] == {"grpo.train": stages["grpo.train"].digest()}, key
        assert study.start_model(method) == grpo
    assert study.model_of("ace") == grpo  # ACE is evaluated on GRPO's checkpoint with its playbook
    # An empty playbook leaves ACE's evaluation GRPO's: it waits for that one, to copy it.
    assert stages["ace.eval"].after == ("ace.train", "grpo.eval")

    # `start: base` restores the comparison from the base: the same settings, read from the base
    # model, with the start in the fingerprint.
    base = Study(load_config(write_config(tmp_path / "b.yaml", early_experience={"start": "base"},
                                          ace={"start": "base"})), tmp_path / "run")
    from_grpo, stages = stages, {s.key: s for s in base.stages()}
    for method, key in (("early_experience", "early_experience.train"), ("ace", "ace.train")):
        assert stages[key].after == ("bootstrap",) and stages[key].title.endswith(" from base")
        assert from_grpo[key].fingerprint["settings"]["start"] == "grpo"
        assert stages[key].fingerprint == {"settings": {**from_grpo[key].fingerprint["settings"], "start": "base"},
                                           "after": {"bootstrap": stages["bootstrap"].digest()}}
        assert base.start_model(method) == base.base_model()
    assert base.model_of("ace") == base.base_model()
    assert stages["ace.eval"].after == ("ace.train", "base.eval")
    assert stages["leafe.explore"].after == ("grpo.train",)  # each method's start is its own


def tiny_study(tmp_path: Path, model: Path, **overrides) -> Path:
    short = {"max_new_tokens": 8}
    data = {
        "name": "tiny", "model": str(model), "generation": {"device": "cpu"}, "env_params": {"max_steps": 4},
        "train": {"tasks": 4, "task_seed": 40},
        "eval": {"tasks": 2, "task_seed": 900, "samples": 4, **short},
        "grpo": {"steps": 1, "tasks_per_step": 2, "group_size": 2, **short},
        "leafe": {"explore": {"tasks": 2, "budget": 8, **short, "reflection_tokens": 8}, "sft": {"epochs": 1}},
        "early_experience": {"tasks": 2, "settings": short, "sft": {"epochs": 2}},  # 1 world-model epoch + 1 imitation
        "ace": {"tasks": 2, "tasks_per_round": 2, **short, "reflection_tokens": 8},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return write_config(tmp_path / "study.yaml", **data)


def stamps(run: Path) -> dict[str, float]:
    return {key: (run / key.replace(".", "/") / "stage.json").stat().st_mtime_ns for key in STAGES}


def test_a_study_runs_every_stage_then_skips_resumes_and_redoes_what_changed(tiny_model_dir, tmp_path):
    config, run_dir = tiny_study(tmp_path, tiny_model_dir), tmp_path / "run"
    first = leafe("run", config, "--out", run_dir)
    assert first.returncode == 0, first.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["env"] == "sokoban" and results["model"] == str(tiny_model_dir)
    assert (results["tasks"], results["samples"]) == (2, 4)
    assert list(results["methods"]) == ["base", "grpo", "leafe", "early_experience", "ace"]
    for method in results["methods"].values():
        assert list(method["pass_at_k"]) == ["1", "2", "4"] and list(method["ci95"]) == ["1", "2", "4"]
    # Each method's starting model (issue 39): the baselines start from GRPO's checkpoint, as LEAFE does.
    grpo_model = str(run_dir / "grpo" / "train")
    starts = {name: (m.get("start"), m.get("start_model")) for name, m in results["methods"].items()}
    assert starts == {"base": (None, None), "grpo": ("base", str(tiny_model_dir)), "leafe": ("grpo", grpo_model),
                      "early_experience": ("grpo", grpo_model), "ace": ("grpo", grpo_model)}
    assert results["leafe_start"] == "grpo"
    # Each model the study trained has its Pass@k in its model card (leafe.modelcard); GRPO's card holds
    # GRPO's, not those of ACE, which plays GRPO's model; the base model's directory is left alone.
    from huggingface_hub import ModelCard

    trained_dirs = {"grpo": "grpo/train", "early_experience": "early_experience/train"} | (
        {"leafe": "leafe/distill"} if "ran" in results["cost"]["leafe.distill"] else {})
    for name, key in trained_dirs.items():
        card = ModelCard.load(run_dir / key / "README.md")
        assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
            f"pass@{k}": v for k, v in results["methods"][name]["pass_at_k"].items()}
    assert not (tiny_model_dir / "README.md").exists()
    # ... and read it: Early Experience fine-tuned it; ACE played it and was evaluated on it.
    assert json.loads((run_dir / "early_experience" / "train" / "train.json").read_text())["model"] == grpo_model
    for key in ("ace/train", "ace/eval"):
        assert json.loads((run_dir / key / "stage.json").read_text())["model"] == grpo_model
    base = results["methods"]["base"]
    for name, method in results["methods"].items():  # each method against the base, paired on tasks
        assert ("vs_base" in method) == (name != "base")
        for k, vs in method.get("vs_base", {}).items():
            assert vs["diff"] == pytest.approx(method["pass_at_k"][k] - base["pass_at_k"][k])
            assert vs["ci95"][0] <= vs["diff"] <= vs["ci95"][1]
    assert list(results["cost"]) == STAGES
    trained = {"grpo.train", "early_experience.train"} | ({"leafe.distill"} if "ran" in results["cost"]["leafe.distill"]
                                                           else set())  # distillation when stage 1 gave rows
    for key, cost in results["cost"].items():  # a training stage says what it ran on
        assert set(cost) == {"env_steps", "generated_tokens", "wall_s"} | ({"ran"} if key in trained else set())
        if key in trained:
            assert cost["ran"]["sharding"] == "none" and cost["ran"]["processes"] == 1
    assert results["cost"]["base.eval"]["env_steps"] == 2 * 4 * 4  # 2 tasks x 4 samples x 4 steps (never solved)
    assert results["cost"]["grpo.train"]["env_steps"] > 0 and results["cost"]["leafe.explore"]["env_steps"] > 0
    # ACE with an empty playbook is its starting model (GRPO's) with that model's prompt and seeds:
    # its evaluation is GRPO's, copied rather than played again; with lessons it is played.
    if json.loads((run_dir / "ace" / "train" / "playbook.json").read_text())["lessons"]:
        assert results["cost"]["ace.eval"]["env_steps"] == results["cost"]["base.eval"]["env_steps"]
    else:
        assert results["cost"]["ace.eval"]["env_steps"] == 0
        assert (run_dir / "ace" / "eval" / "eval.json").read_bytes() == (run_dir / "grpo" / "eval" / "eval.json").read_bytes()
        assert results["methods"]["ace"]["note"] == "no lesson learnt: the episodes of grpo.eval"
    assert (run_dir / "report.html").stat().st_size > 1000
    assert "Pass@4" in first.stdout  # the final table

    before = stamps(run_dir)
    again = leafe("run", config, "--out", run_dir)
    assert again.returncode == 0, again.stderr
    assert stamps(run_dir) == before  # every stage was done: nothing reran

    # Killed inside the GRPO evaluation: its record says not done, so it (and only it) runs again.
    record_path = run_dir / "grpo" / "eval" / "stage.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "done": False}))
    assert leafe("run", config, "--out", run_dir).returncode == 0
    after = stamps(run_dir)
    assert [k for k in STAGES if after[k] != before[k]] == ["grpo.eval"]

    # A changed GRPO setting makes GRPO and everything downstream of it stale; nothing else.
    changed = tiny_study(tmp_path, tiny_model_dir, grpo={"learning_rate": 3e-5})
    study = Study(load_config(changed), run_dir)
    status = {s.key: study.status(s) for s in study.stages()}
    assert {k for k, v in status.items() if v == "stale"} == {  # the baselines too: they start from GRPO's
        "grpo.train", "leafe.explore", "leafe.distill", "early_experience.train", "ace.train", "grpo.eval",
        "leafe.eval", "early_experience.eval", "ace.eval"}
    assert {k for k, v in status.items() if v == "done"} == set(STAGES) - {k for k, v in status.items() if v == "stale"}
    assert leafe("run", changed, "--out", run_dir).returncode == 0
    redone = stamps(run_dir)
    assert {k for k in STAGES if redone[k] != after[k]} == {k for k, v in status.items() if v == "stale"}
    assert json.loads((run_dir / "grpo" / "train" / "train.json").read_text())["settings"]["learning_rate"] == 3e-5


def test_stages_side_by_side_give_the_results_of_one_at_a_time(tiny_model_dir, tmp_path):
    # parallel_stages runs each stage in a process of its own; what a stage computes must not depend
    # on that (one thread each way, so the kernels sum in the same order: OMP_NUM_THREADS caps what the
    # stages are given), and a stage must start only after the stages it reads from have ended.
    one = tiny_study(tmp_path, tiny_model_dir)
    two = write_config(tmp_path / "side.yaml", **{**yaml.safe_load(one.read_text()), "parallel_stages": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, config in (("one", one), ("two", two)):
        done = subprocess.run([sys.executable, "-m", "leafe", "run", str(config), "--out", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
        assert "stage grpo.train done in" in done.stdout  # not a terminal: a line as each stage ends
    assert {m: r["pass_at_k"] for m, r in runs["two"]["methods"].items()} == \
        {m: r["pass_at_k"] for m, r in runs["one"]["methods"].items()}
    assert {k: c["env_steps"] for k, c in runs["two"]["cost"].items()} == \
        {k: c["env_steps"] for k, c in runs["one"]["cost"].items()}
    records = {key: json.loads((tmp_path / "two" / key.replace(".", "/") / "stage.json").read_text())
               for key in STAGES}
    study = Study(load_config(two), tmp_path / "two")
    for stage in study.stages():
        for before in stage.after:
            assert records[before]["ended"] <= records[stage.key]["started"], (before, stage.key)
    spans = sorted((r["started"], r["ended"]) for r in records.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # some stages did run side by side
    assert "Traceback" not in (tmp_path / "two" / "grpo" / "train" / "stage.log").read_text()

    # A changed setting redoes its stages side by side too; a redone stage's log is its new run's.
    data = yaml.safe_load(two.read_text())
    changed = write_config(tmp_path / "side.yaml", **{**data, "grpo": {**data["grpo"], "learning_rate": 3e-5}})
    again = subprocess.run([sys.executable, "-m", "leafe", "run", str(changed), "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr
    redone = set(re.findall(r"stage (\S+) done in", again.stdout))
    assert redone == {"grpo.train", "leafe.explore", "leafe.distill", "early_experience.train", "ace.train",
                      "grpo.eval", "leafe.eval", "early_experience.eval", "ace.eval"}
    assert json.loads((tmp_path / "two" / "grpo" / "train" / "train.json").read_text())["settings"]["learning_rate"] == 3e-5
    assert (tmp_path / "two" / "grpo" / "train" / "stage.log").exists()


def test_a_stage_failing_side_by_side_is_one_line_naming_it_and_keeps_its_log(tmp_path):
    # A model directory without a model passes the up-front check (it exists) and fails inside the
    # stages, in their own processes: the run ends with the stage's one-line error, not a traceback.
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    config = tiny_study(tmp_path, empty, parallel_stages=2)
    run = leafe("run", config, "--out", tmp_path / "run")
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [f"error: {empty} has no config.json; pass a Hugging Face model "
                                               f"directory (or a .gguf file with --gguf-file)"]
    failed = [key for key in ("base.eval", "grpo.train") if (tmp_path / "run" / key.replace(".", "/") / "stage.log").exists()]
    assert failed and all("Traceback" in (tmp_path / "run" / k.replace(".", "/") / "stage.log").read_text() for k in failed)
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("overrides", [{"generation": {"backend": "vllm"}}, {"training": {"processes": 2}}])
def test_side_by_side_stages_are_refused_where_a_stage_takes_the_whole_machine(tmp_path, overrides):
    with pytest.raises(LeafeError, match="a vllm engine or training.processes > 1 takes the whole machine"):
        load_config(tiny_study(tmp_path, tmp_path, parallel_stages=2, **overrides))
    load_config(tiny_study(tmp_path, tmp_path, **overrides))  # one stage at a time is fine


def test_side_by_side_stages_are_refused_on_a_machine_with_a_gpu(tmp_path, monkeypatch):
    # Each stage process would load its own model copy onto the GPU. No GPU here, so torch is told
    # there is one: the check is about the run's control flow, not about CUDA.
    import torch

    (tmp_path / "two").mkdir()
    side_by_side = Study(load_config(tiny_study(tmp_path / "two", tmp_path, parallel_stages=2)), tmp_path / "run")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(LeafeError, match="this machine has a GPU.*set parallel_stages: 1"):
        side_by_side.run()
    assert not (tmp_path / "run").exists()  # refused before anything ran
