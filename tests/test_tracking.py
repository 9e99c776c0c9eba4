"""Experiment trackers (`report_to`): a study's figures reach TensorBoard and Trackio equal to its own
files, with nothing sent off the machine; wandb runs offline without a key; MLflow keeps one run in a
file store under the run directory; a bad tracker name or a missing package is one line."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leafe.errors import LeafeError
from leafe.tracking import Tracking, check_report_to

#: Runs `leafe run ...` with an audit hook that writes every network connection attempted (any socket
#: but a Unix one) to NETWORK_LOG: the study must make none, trackers included.
GUARDED = """
import os, runpy, socket, sys
log = os.environ["NETWORK_LOG"]
def hook(event, args):
    if event == "socket.connect" and args[0].family != socket.AF_UNIX:
        with open(log, "a") as f:
            f.write(repr(args[1]) + "\\n")
sys.addaudithook(hook)
sys.argv = ["leafe", *sys.argv[1:]]
runpy.run_module("leafe", run_name="__main__")
"""


def tiny_study(tmp_path: Path, model: Path) -> Path:
    """The cheapest study with every kind of figure: GRPO's steps, exploration's counters, Early
    Experience's two SFTs (its losses logged every step) and the Pass@k table."""
    short = {"max_new_tokens": 8}
    data = {
        "name": "tracked", "model": str(model), "generation": {"device": "cpu"}, "env_params": {"max_steps": 4},
        "methods": ["base", "grpo", "leafe", "early_experience"], "report_to": ["tensorboard", "trackio"],
        "train": {"tasks": 4, "task_seed": 40},
        "eval": {"tasks": 2, "task_seed": 900, "samples": 2, **short},
        # a penalty per invalid action: the random agent's episodes differ in reward, so GRPO updates
        "grpo": {"steps": 2, "tasks_per_step": 2, "group_size": 3, "invalid_penalty": 0.1, **short},
        "leafe": {"explore": {"tasks": 2, "budget": 8, **short, "reflection_tokens": 8},
                  "sft": {"epochs": 1, "logging_steps": 1}},
        "early_experience": {"tasks": 2, "settings": short, "sft": {"epochs": 2, "logging_steps": 1}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tracked")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKIO_", "WANDB_", "MLFLOW_"))}
    env |= {"NETWORK_LOG": str(tmp / "network.log"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", GUARDED, "run", str(tiny_study(tmp, tiny_model_dir)),
                           "--out", str(tmp / "run")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert not (tmp / "network.log").exists(), (tmp / "network.log").read_text()
    assert "Trackio" not in done.stdout  # trackio's banners stay out of the study's display
    return tmp / "run"


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, from every event file in `directory`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def trackio_scalars(store: Path, run: str) -> dict[str, dict[int, float]]:
    """name -> {step: value} of one run in trackio's local store (its SQLite file: a row per log call)."""
    out: dict[str, dict[int, float]] = {}
    with sqlite3.connect(store / "leafe.db") as db:
        for step, metrics in db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (run,)):
            for name, value in json.loads(metrics).items():
                out.setdefault(name, {})[step] = value
    return out


def expected_figures(run: Path) -> dict[str, dict[int, float]]:
    """What each stage's own files say, under the trackers' names: name -> {step: value}."""
    want: dict[str, dict[int, float]] = {}
    for record in map(json.loads, (run / "grpo" / "train" / "log.jsonl").read_text().splitlines()):
        for key in ("reward", "success", "kl", "clip_frac", "loss", "entropy", "grad_norm", "skip_rate", "env_steps"):
            if key in record:
                want.setdefault(f"grpo/{key}", {})[record["step"]] = record[key]
    summary = json.loads((run / "leafe" / "explore" / "summary.json").read_text())
    for key in ("branches", "replayed_steps", "env_steps", "reflections", "success_rate"):
        want[f"leafe_explore/{key}"] = {summary["tasks"]: summary[key]}
    logs = json.loads((run / "early_experience" / "train" / "train.json").read_text())["loss_log"]
    for training, name in (("imitation", "early_experience"), ("iwm", "early_experience_iwm")):
        assert logs[training], training
        want[f"{name}/loss"] = {entry["step"]: entry["loss"] for entry in logs[training]}
    for method, entry in json.loads((run / "results.json").read_text())["methods"].items():
        want[f"results/{method}/pass_at_k"] = {int(k): v for k, v in entry["pass_at_k"].items()}
    return want


def test_a_study_reports_the_figures_of_its_files_to_tensorboard_and_trackio(tracked_run):
    want = expected_figures(tracked_run)
    assert set(want["grpo/reward"]) == {1, 2}
    for key in ("kl", "loss", "clip_frac", "entropy", "grad_norm"):  # GRPO updated (a group's rewards differed)
        assert want.get(f"grpo/{key}"), key
    identity = json.loads((tracked_run / "tracking" / "run.json").read_text())
    assert identity["name"] == "tracked" and set(identity["stores"]) == {"tensorboard", "trackio"}

    board = tensorboard_scalars(tracked_run / "tracking" / "tensorboard")
    stored = trackio_scalars(tracked_run / "tracking" / "trackio", f"tracked-{identity['id']}")
    for got, name in ((board, "tensorboard"), (stored, "trackio")):
        for key, by_step in want.items():
            assert key in got and set(by_step) <= set(got[key]), (name, key, sorted(got))
            # TensorBoard keeps float32, trackio the JSON number itself
            assert {s: got[key][s] for s in by_step} == pytest.approx(by_step, rel=1e-6), (name, key)
        assert set(got["grpo/reward"]) == {1, 2} and set(got["results/base/pass_at_k"]) == {1, 2}
        # exploration's counters after each task: the last are summary.json's
        assert set(got["leafe_explore/branches"]) == {1, 2}


def test_a_rerun_with_nothing_to_do_reports_nothing_again(tracked_run):
    def reported() -> tuple[list[str], int]:
        with sqlite3.connect(tracked_run / "tracking" / "trackio" / "leafe.db") as db:
            (rows,) = db.execute("SELECT COUNT(*) FROM metrics").fetchone()
        return sorted(p.name for p in (tracked_run / "tracking" / "tensorboard").iterdir()), rows

    before = reported()
    done = subprocess.run([sys.executable, "-m", "leafe", "run", str(tracked_run.parent / "study.yaml"), "--out",
                           str(tracked_run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert reported() == before


def test_a_launched_grpo_reports_from_rank_0_only(tiny_model_dir, tmp_path):
    from leafe.method import Job
    from leafe.scale.stage import launch
    from leafe.settings import GRPOSettings, TrainingSettings

    out = tmp_path / "grpo"
    settings = GRPOSettings(tasks=4, task_seed=3, steps=2, tasks_per_step=2, group_size=3, max_new_tokens=8,
                            env_params={"max_steps": 4}, invalid_penalty=0.1, save_every=0)
    with Tracking.of(["tensorboard"], tmp_path / "tracking", "t").open("grpo") as tracker:
        launch("grpo", Job(str(tiny_model_dir), out, device="cpu", tracker=tracker), TrainingSettings(processes=2),
               settings=settings)
    (written,) = (tmp_path / "tracking" / "tensorboard").iterdir()  # one writer: rank 0 (this process: none)
    board = tensorboard_scalars(written.parent)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for key in ("reward", "success", "env_steps", "skip_rate"):  # the step's figures over both ranks
        assert board[f"grpo/{key}"] == pytest.approx({r["step"]: r[key] for r in log}, rel=1e-6), key


def wandb_history(run_dir: Path) -> tuple[dict, list[dict]]:
    """(the run record, the history rows) of an offline wandb run: its .wandb file is a LevelDB-style
    log (32 KiB blocks, records of crc32c, length, type) of wandb's protobuf records after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if (room := 32768 - pos % 32768) < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last piece
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return {"id": run.run_id, "project": run.project, "name": run.display_name}, rows


def test_wandb_runs_offline_without_a_key_and_each_stage_keeps_its_own_step_axis(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no login anywhere
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    tracking = Tracking.of(["wandb"], tmp_path / "tracking", "study")
    with tracking.open("grpo") as tracker:
        tracker.log({"step": 1, "reward": 0.25, "note": "text is for the files"}, step=1)
        tracker.log({"step": 2, "reward": 0.5}, step=2)
    with tracking.open("leafe_distill") as tracker:  # a later stage, in another wandb session of the run
        tracker.log({"loss": 3.5}, step=1)
    identity = json.loads((tmp_path / "tracking" / "run.json").read_text())
    # offline: both sessions of the one run wait for `wandb sync`, each in a directory of its own
    # (they started within a second: wandb's own name for both would be the same)
    (grpo,) = (tmp_path / "tracking" / "wandb").glob(f"grpo-*/wandb/offline-run-*-{identity['id']}")
    (distill,) = (tmp_path / "tracking" / "wandb").glob(f"leafe_distill-*/wandb/offline-run-*-{identity['id']}")
    run, rows = wandb_history(grpo)
    assert run == {"id": identity["id"], "project": "leafe", "name": "study"}
    assert [(r["grpo/step"], r["grpo/reward"]) for r in rows] == [(1, 0.25), (2, 0.5)]
    assert all("grpo/note" not in r for r in rows)
    run, rows = wandb_history(distill)
    assert run["id"] == identity["id"]
    assert [(r["leafe_distill/step"], r["leafe_distill/loss"]) for r in rows] == [(1, 3.5)]


def test_mlflow_keeps_one_run_per_study_in_a_file_store_under_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what leafe sets when it picks the file store
    tracking = Tracking.of(["mlflow"], tmp_path / "tracking", "study")
    with tracking.open("grpo") as tracker:
        tracker.log({"reward": 0.25}, step=1)
        tracker.log({"reward": 0.5}, step=2)
    with tracking.open("leafe_explore") as tracker:  # another stage (process) resumes the same run
        tracker.log({"branches": 3}, step=2)
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "tracking" / "mlflow").resolve().as_uri()
    (run_id,) = json.loads((tmp_path / "tracking" / "run.json").read_text())["mlflow"].values()
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "leafe"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "grpo/reward")] == [(1, 0.25), (2, 0.5)]
    assert client.get_run(run_id).data.metrics["leafe_explore/branches"] == 3


def test_an_unknown_or_missing_tracker_is_one_line_naming_the_install(monkeypatch, tmp_path):
    assert check_report_to(["tensorboard,trackio", "tensorboard", "none"]) == ["tensorboard", "trackio"]
    with pytest.raises(LeafeError, match=r"^report_to: unknown tracker 'tensorbored'; choose from tensorboard, "):
        check_report_to(["tensorbored"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(LeafeError, match=r"^report_to: wandb is not installed: pip install wandb"):
        check_report_to(["wandb"])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "report_to": "tensorboard,comet"}))
    done = subprocess.run([sys.executable, "-m", "leafe", "run", str(config), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().endswith("report_to: unknown tracker 'comet'; choose from "
                                                                 "tensorboard, trackio, wandb, mlflow")
    assert len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run([sys.executable, "-m", "leafe", "train", "grpo", "--model", str(tmp_path), "--out",
                           str(tmp_path / "o"), "--report-to", "neptune"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "report_to: unknown tracker 'neptune'" in done.stderr


def test_without_report_to_a_tracker_reports_nothing(tmp_path):
    tracker = Tracking.of([], tmp_path / "tracking", "study").open("grpo")
    tracker.log({"reward": 1.0}, step=1)
    tracker.close()
    assert not tracker.active and tracker.spec() is None and not (tmp_path / "tracking").exists()
