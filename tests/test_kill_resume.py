"""kill -9 inside a stage, then the same command again: the result of a run never stopped.

Each test runs a stage's command in a process of its own, waits until the stage is inside its work
(a checkpoint, a step, a round or a task is on disk), SIGKILLs the process and every process under
it (a preempted machine loses them all), runs the same command again to its end, and compares with
the same stage run without a stop: bit for bit where the stage is deterministic, and nothing written
twice (no record twice in a JSONL file, no step twice in a log), no partial file taken for a whole one.
Sampling stages repeat to the bit only where their draws do not depend on the run's history:
evaluation and exploration draw with a seed counter that starts again with every run, so their tests
here sample greedily (tests/test_explore.py kills a run at T = 1 and checks that nothing is lost).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import leafe_command
from test_distill import trees_file  # noqa: F401 (a fixture: trees explored by a scripted policy)

from leafe.files import MODEL_STAGING
from leafe.method import Job

SECONDS = 300


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it, as a preempted machine loses them all: the ranks
    torchrun starts need not share the launcher's process group, so killing the group can miss them."""
    import psutil

    try:
        under = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        under = []
    for each in [psutil.Process(process.pid), *under] if process.poll() is None else under:
        try:
            each.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)  # through Popen: psutil would reap it and lose its exit status
    psutil.wait_procs(under, timeout=60)


def killed_then_rerun(command: list[str], inside: Callable[[], bool], log: Path, rerun: list[str] | None = None) -> None:
    """Run `command` until `inside()` holds (the stage is inside its work, as its files show), SIGKILL
    its process tree, then run `rerun` (the same command unless given) to its end. `log` takes the
    killed run's output (shown if it ends before it is killed).

    Each test leaves the stage a second or more of work after its kill point; the killed run runs
    at a lower priority than this watcher, so a busy machine delays the run, not the kill."""
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: os.nice(10))
    try:
        started = time.monotonic()
        while not inside():
            assert process.poll() is None, f"the run ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - started < SECONDS, f"not inside the stage after {SECONDS} s"
            time.sleep(0.02)
    finally:
        kill_tree(process)
    assert process.returncode == -signal.SIGKILL
    done = subprocess.run(rerun or command, capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]


def whole_checkpoint(directory: Path) -> Callable[[], bool]:
    """Inside an SFT: a checkpoint of it is whole on disk (`leafe.methods.sft`)."""
    return lambda: any(directory.glob("checkpoint-*/whole.json"))


def lines(path: Path, at_least: int) -> Callable[[], bool]:
    return lambda: path.exists() and path.read_text().count("\n") >= at_least


def same_weights(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    mine, theirs = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "the resumed weights differ"


def read(path: Path):
    return json.loads(path.read_text())


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


#: What a run measures of itself (seconds), never the same twice; every other field must be.
CLOCKS = ("wall_s", "rollout_s", "sync_s", "collect_wall_s", "elapsed_s", "session")


def same_training(resumed: dict, unbroken: dict) -> None:
    """An SFT summary of a resumed run against an unbroken one: the same steps and loss log; the mean
    loss is summed again from the logged means before the checkpoint (`sft._run_loss`): equal up to
    float rounding; `resumed_from_step` says where this run began."""
    assert resumed["resumed_from_step"] > 0 and unbroken["resumed_from_step"] == 0
    assert resumed["train_loss"] == pytest.approx(unbroken["train_loss"], rel=1e-9)
    assert without(resumed, "train_loss", "resumed_from_step", *CLOCKS) == without(
        unbroken, "train_loss", "resumed_from_step", *CLOCKS)


def not_a_finished_model(out: Path) -> None:
    """What a kill leaves in a model directory never loads as a model: config.json comes last."""
    assert not (out / "config.json").exists()


def finished_cleanly(out: Path) -> None:
    assert not (out / "trainer").exists() and not (out / MODEL_STAGING).exists()  # checkpoints go with the run


# -- the stages --------------------------------------------------------------------------------

#: 48 rows, one per step; bootstrap logs every 5 steps, so its checkpoints fall on multiples of 5.
TINY_AGENT = {"fragments": 32, "reflection_fragments": 8, "episodes": 8, "vocab_size": 400, "hidden_size": 32,
              "layers": 1, "heads": 2, "intermediate_size": 64, "batch_size": 1, "save_every": 5}


def test_bootstrap_killed_while_pretraining_resumes_to_the_same_agent(tmp_path):
    from leafe.base_agent.bootstrap import build
    from leafe.settings import BootstrapConfig

    unbroken = tmp_path / "unbroken"
    build(BootstrapConfig(**TINY_AGENT), unbroken)
    out = tmp_path / "agent"
    flags = [x for k, v in TINY_AGENT.items() for x in (f"--{k.replace('_', '-')}", v)]
    building = tmp_path / ".agent.building"

    def inside() -> bool:
        assert not out.exists()  # the agent appears whole or not at all
        return whole_checkpoint(building / "trainer")()

    killed_then_rerun(leafe_command("bootstrap", "--out", out, *flags), inside, tmp_path / "killed.log")
    same_weights(out, unbroken)
    assert (out / "tokenizer.json").read_text() == (unbroken / "tokenizer.json").read_text()
    resumed, first = read(out / "bootstrap.json"), read(unbroken / "bootstrap.json")
    assert resumed["loss_log"] == first["loss_log"] and resumed["data"] == first["data"]
    same_training(resumed["training"]["pretraining"], first["training"]["pretraining"])
    assert not building.exists() and not (out / "trainer").exists()


def test_distill_killed_mid_training_resumes_to_the_same_weights(trees_file, tiny_model_dir, tmp_path):  # noqa: F811
    from leafe.methods.distill import distill
    from leafe.settings import DistillSettings, SFTSettings

    # 36 rows, one per step, a checkpoint every 4
    settings, sft = DistillSettings(reh_fraction=1.0), SFTSettings(learning_rate=1e-3, epochs=1, batch_size=1,
                                                                     logging_steps=1, save_every=4)
    unbroken = tmp_path / "unbroken"
    distill(Job(str(tiny_model_dir), unbroken, inputs=[trees_file]), settings, sft)
    out = tmp_path / "distilled"
    command = leafe_command("distill", "--model", tiny_model_dir, "--trees", trees_file, "--out", out, "--reh-fraction", 1,
                    "--lr", "1e-3", "--epochs", 1, "--batch-size", 1, "--logging-steps", 1, "--save-every", 4)

    def inside() -> bool:
        not_a_finished_model(out)  # a run cut short leaves no model to load by mistake
        return whole_checkpoint(out / "trainer")()

    killed_then_rerun(command, inside, tmp_path / "killed.log")
    same_weights(out, unbroken)
    resumed, first = read(out / "distill.json"), read(unbroken / "distill.json")
    assert resumed["loss_log"] == first["loss_log"] and resumed["sets"] == first["sets"]
    same_training(resumed["training"], first["training"])
    finished_cleanly(out)


def test_early_experience_killed_in_imitation_keeps_its_rows_and_world_model(tiny_model_dir, tmp_path):
    from leafe.backends import backend_for
    from leafe.methods.early_experience import train_early_experience
    from leafe.settings import EarlyExperienceSettings, GenerationSettings, SFTSettings

    settings = EarlyExperienceSettings(tasks=3, task_seed=40, alternatives=1, max_new_tokens=8)
    sft = SFTSettings(learning_rate=1e-3, max_steps=24, batch_size=1, logging_steps=1, save_every=4)
    unbroken = tmp_path / "unbroken"
    train_early_experience(Job(str(tiny_model_dir), unbroken, backend=backend_for(str(tiny_model_dir),
                                                                                  GenerationSettings())), settings, sft)
    out = tmp_path / "ee"
    command = leafe_command("train", "early-experience", "--model", tiny_model_dir, "--out", out, "--tasks", 3,
                    "--task-seed", 40, "--alternatives", 1, "--max-new-tokens", 8, "--lr", "1e-3", "--max-steps", 24,
                    "--batch-size", 1, "--logging-steps", 1, "--save-every", 4)
    kept = (out / "collected.json", out / "iwm" / "model.safetensors")  # the rows sampled, the world model
    stamps = {}

    def inside() -> bool:  # an imitation checkpoint: the world model was trained before
        not_a_finished_model(out)
        if not whole_checkpoint(out / "trainer")():
            return False
        stamps.update({path: path.stat().st_mtime_ns for path in kept})
        return True

    killed_then_rerun(command, inside, tmp_path / "killed.log")
    assert {path: path.stat().st_mtime_ns for path in kept} == stamps  # neither sampled nor trained again
    same_weights(out, unbroken)
    same_weights(out / "iwm", unbroken / "iwm")
    assert (out / "rows.jsonl").read_text() == (unbroken / "rows.jsonl").read_text()
    resumed, first = read(out / "train.json"), read(unbroken / "train.json")
    assert resumed["data"] == first["data"] and resumed["loss_log"] == first["loss_log"]
    assert without(resumed["cost"], *CLOCKS) == without(first["cost"], *CLOCKS)
    assert without(resumed["training"]["iwm"], *CLOCKS) == without(first["training"]["iwm"], *CLOCKS)
    same_training(resumed["training"]["imitation"], first["training"]["imitation"])
    finished_cleanly(out)


GRPO = {"tasks": 4, "task_seed": 3, "tasks_per_step": 2, "group_size": 4, "learning_rate": 1e-2,
        "max_new_tokens": 8, "invalid_penalty": 0.1, "save_every": 1}


def grpo_flags(steps: int) -> list:
    return [x for k, v in {**GRPO, "steps": steps}.items() for x in (f"--{k.replace('_', '-')}", v)] + [
        "--env-param", "max_steps=4", "--device", "cpu"]


def same_grpo_run(out: Path, unbroken: Path, steps: int) -> None:
    """The log of every step once and as the unbroken run logged it, the same model and train.json."""
    log, first = records(out / "log.jsonl"), records(unbroken / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert [without(r, *CLOCKS) for r in log] == [without(r, *CLOCKS) for r in first]
    assert any("grad_norm" in r for r in log[1:])  # the steps after the kill point did update
    same_weights(out, unbroken)
    resumed, reference = read(out / "train.json"), read(unbroken / "train.json")
    assert resumed["data"] == reference["data"] and resumed["final"] == reference["final"]
    assert not (out / MODEL_STAGING).exists()


def test_grpo_killed_mid_run_resumes_from_its_checkpoint_to_the_same_steps(tiny_model_dir, tmp_path):
    from leafe.methods.grpo import train_grpo
    from leafe.settings import GRPOSettings

    unbroken = tmp_path / "unbroken"
    train_grpo(Job(str(tiny_model_dir), unbroken, device="cpu"),
               GRPOSettings(**GRPO, steps=3, env_params={"max_steps": 4}))
    out = tmp_path / "grpo"

    def inside() -> bool:  # step 2 is logged: its checkpoint is being written, or step 3 runs
        not_a_finished_model(out)
        return lines(out / "log.jsonl", 2)()

    killed_then_rerun(leafe_command("train", "grpo", "--model", tiny_model_dir, "--out", out, *grpo_flags(3)), inside,
                      tmp_path / "killed.log")
    same_grpo_run(out, unbroken, 3)


def test_grpo_on_two_processes_killed_with_its_ranks_resumes_to_the_same_steps(tiny_model_dir, tmp_path):
    from helpers import two_rank_config

    def command(out: Path) -> list[str]:
        return leafe_command("launch", two_rank_config(tmp_path / f"{out.name}.yaml"), "--", "train", "grpo", "--model",
                     tiny_model_dir, "--out", out, *grpo_flags(2))

    unbroken = tmp_path / "unbroken"
    done = subprocess.run(command(unbroken), capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "grpo"
    # Killed, with both ranks, once step 1's checkpoint is whole: inside step 2. The rerun meets on a
    # port of its own (the killed ranks' may not be free yet).
    killed_then_rerun(command(out), lambda: (out / "checkpoints" / "step-1" / "state").is_dir(),
                      tmp_path / "killed.log", rerun=command(out))
    same_grpo_run(out, unbroken, 2)


def test_ace_killed_after_a_round_resumes_to_the_same_playbook(tiny_model_dir, tmp_path):
    from leafe.backends import backend_for
    from leafe.methods.ace import train_ace
    from leafe.settings import ACESettings, GenerationSettings

    settings = ACESettings(tasks=3, task_seed=60, tasks_per_round=1, max_new_tokens=8, reflection_tokens=16,
                           env_params={"max_steps": 3})
    unbroken = tmp_path / "unbroken"
    train_ace(Job(str(tiny_model_dir), unbroken, backend=backend_for(str(tiny_model_dir), GenerationSettings())),
              settings)
    out = tmp_path / "ace"
    playbook = out / "playbook.json"
    killed_then_rerun(leafe_command("train", "ace", "--model", tiny_model_dir, "--out", out, "--tasks", 3, "--task-seed", 60,
                            "--tasks-per-round", 1, "--max-new-tokens", 8, "--reflection-tokens", 16,
                            "--env-param", "max_steps=3"),
                      lambda: playbook.exists() and read(playbook)["round"] >= 1, tmp_path / "killed.log")
    resumed, first = read(playbook), read(unbroken / "playbook.json")
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    # Each round samples with its own seed (ACE's engine is made per round), so the rounds after the
    # kill draw what the unbroken run drew.
    assert [without(r, *CLOCKS) for r in resumed["rounds"]] == [without(r, *CLOCKS) for r in first["rounds"]]
    assert without(resumed, "rounds") == without(first, "rounds")
    assert read(out / "train.json")["data"] == read(unbroken / "train.json")["data"]


def test_eval_killed_between_tasks_keeps_what_it_scored_and_scores_the_rest_once(tiny_model_dir, tmp_path):
    # Greedy: the draws repeat whatever the seeds, so the tasks scored after the kill score as the
    # unbroken run scored them (at T > 0 the engine's seed counter starts again with the run).
    args = ["--model", tiny_model_dir, "--tasks", 6, "--samples", 2, "--max-batch", 2, "--temperature", 0,
            "--max-new-tokens", 8, "--task-seed", 1000, "--env-param", "max_steps=3"]
    unbroken = tmp_path / "unbroken"
    done = subprocess.run(leafe_command("eval", "--out", unbroken, *args), capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "eval"
    progress = out / "eval_tasks.jsonl"
    killed_then_rerun(leafe_command("eval", "--out", out, *args), lines(progress, 2), tmp_path / "killed.log")
    scored = records(progress)[1:]
    assert sorted(r["task_id"] for r in scored) == [f"sokoban-{i}" for i in range(1000, 1006)]  # each once
    assert len({r["session"] for r in scored}) == 2  # the killed run's records were kept, not redone
    resumed, first = read(out / "eval.json"), read(unbroken / "eval.json")
    assert [without(t, *CLOCKS) for t in resumed["tasks"]] == [without(t, *CLOCKS) for t in first["tasks"]]
    assert resumed["pass_at_k"] == first["pass_at_k"] and resumed["ci95"] == first["ci95"]


def test_explore_killed_between_trees_ends_with_the_trees_of_an_unbroken_run(tiny_model_dir, tmp_path):
    # Greedy, one task at a time: the trees grown after the kill are the unbroken run's (at T > 0 the
    # engine's seed counter starts again with the run: tests/test_explore.py checks nothing is lost there).
    args = ["--model", tiny_model_dir, "--tasks", 5, "--task-seed", 70, "--budget", 8, "--max-new-tokens", 6,
            "--reflection-tokens", 8, "--parallel-tasks", 1, "--temperature", 0]
    unbroken = tmp_path / "unbroken"
    done = subprocess.run(leafe_command("explore", "--out", unbroken, *args), capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "explore"
    killed_then_rerun(leafe_command("explore", "--out", out, *args), lines(out / "trees.jsonl", 1), tmp_path / "killed.log")
    trees, first = records(out / "trees.jsonl"), records(unbroken / "trees.jsonl")
    assert len({t["session"]["id"] for t in trees}) == 2  # the killed run's trees were kept, not grown again
    assert [clockless(t) for t in trees] == [clockless(t) for t in first]
    resumed, reference = read(out / "summary.json"), read(unbroken / "summary.json")
    assert without(resumed, "wall_s", "prompt_tokens", "prefill_tokens") == without(
        reference, "wall_s", "prompt_tokens", "prefill_tokens")  # per session: the rerun prefills its own prompts


def clockless(value):
    """`value` without what a run measures of itself, at any depth."""
    if isinstance(value, dict):
        return {k: clockless(v) for k, v in value.items() if k not in CLOCKS}
    if isinstance(value, list):
        return [clockless(v) for v in value]
    return value


#: `leafe report` that stops for good in the middle of writing report.html (in the fsync between
#: writing the page's temporary file and renaming it), so that the kill lands while the page is being
#: written: the report takes a second, too short to hit otherwise. The rerun is the plain command.
HELD_WHILE_WRITING = """
import os, sys, time
fsync = os.fsync
def held(fd):
    if ".report.html." in os.readlink(f"/proc/self/fd/{fd}"):
        time.sleep(600)
    fsync(fd)
os.fsync = held
sys.argv[0] = "leafe"
from leafe.cli import main
main()
"""


def test_report_killed_while_writing_leaves_no_page_and_is_written_whole_again(tiny_tokenizer, tmp_path):
    from test_report import make_run

    from leafe.study.report import write_report

    unbroken, run = tmp_path / "unbroken", tmp_path / "run"
    unbroken.mkdir()
    make_run(unbroken, tiny_tokenizer)
    shutil.copytree(unbroken, run)
    write_report(unbroken)
    page = run / "report.html"

    def inside() -> bool:
        writing = any(run.glob(".report.html.*.tmp"))
        assert not page.exists()  # readers see no page until the whole one is there
        return writing

    killed_then_rerun([sys.executable, "-c", HELD_WHILE_WRITING, "report", str(run)], inside,
                      tmp_path / "killed.log", rerun=leafe_command("report", run))
    assert page.read_text() == (unbroken / "report.html").read_text()


# -- what a rerun relies on --------------------------------------------------------------------

def test_only_whole_checkpoints_of_the_same_training_are_resumed(tmp_path):
    from leafe.errors import LeafeError
    from leafe.methods.sft import WHOLE, resume_point
    from leafe.rundir import RUN_FORMAT

    key = {"model": "m", "rows": "3, sha256 ab", "format": RUN_FORMAT}
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / WHOLE).write_text("{}")  # checkpoint-4: killed while it was written
    assert resume_point(tmp_path, key) == tmp_path / "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()  # cleared, never read as a checkpoint
    with pytest.raises(LeafeError, match=r"holds the checkpoints of another training with different settings \(rows\)"):
        resume_point(tmp_path, {**key, "rows": "4, sha256 cd"})
    assert resume_point(tmp_path, key) == tmp_path / "checkpoint-2"


def test_a_published_model_replaces_the_old_one_and_leaves_the_records_beside_it(tmp_path):
    from leafe.files import publish_model_dir

    out = tmp_path / "model"
    (out / MODEL_STAGING).mkdir(parents=True)
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "distill.json", "stage.json"):
        (out / name).write_text("old")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / MODEL_STAGING / name).write_text("new")
    publish_model_dir(out)
    # no shard of the old model is left for a loader to find; a method's records stay
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "config.json": "new", "model.safetensors": "new", "tokenizer.json": "new", "distill.json": "old",
        "stage.json": "old"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stages_side_by_side_end_with_the_study_that_started_them(tiny_model_dir, tmp_path, sig):
    """`kill` (or a scheduler's SIGTERM, or a SIGKILL) to `leafe run` alone, not to its process tree,
    ends the stage processes it runs side by side: left running, they would write the run directory
    beside the rerun, which takes the dead study's lock over as stale (`leafe.lock.die_with_parent`)."""
    import psutil
    from test_study import tiny_study

    config = tiny_study(tmp_path, tiny_model_dir, parallel_stages=2)
    with open(tmp_path / "run.log", "wb") as output:
        study = subprocess.Popen(leafe_command("run", config, "--out", tmp_path / "run"), stdout=output,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        while len(stages := psutil.Process(study.pid).children()) < 2:  # two stages side by side
            assert study.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() - started < SECONDS
            time.sleep(0.05)
        study.send_signal(sig)
        study.wait(timeout=60)
        gone, alive = psutil.wait_procs(stages, timeout=5)  # a stage alone lives longer: it is still starting
        assert not alive, f"stage processes outlived the study: {[p.pid for p in alive]}"
    finally:
        kill_tree(study)
