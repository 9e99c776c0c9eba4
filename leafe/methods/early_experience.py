"""The Early Experience baseline (arXiv 2510.08558): learn from the outcomes of one's own alternatives
to expert actions, then imitate the expert.

Expert demonstrations come from the env's expert (`Env.expert_actions`: Sokoban's solver, gold paths
or walkthroughs elsewhere), played through the same Recorder as every other episode, so an expert
turn is 'Thought: ...' + 'Action: ...' in the agent's own chat format. At each expert state s_i the
model samples K alternative replies; each is executed from a copy of s_i (snapshot, or verified
replay) to observe where it leads. Alternatives that name the expert's own action are dropped.

- IWM (implicit world modelling): rows (h_i, the alternative reply exactly as sampled, "predict what
  you will observe") -> the observation the env returned. Trained first; then imitation on the
  expert rows, starting from the IWM model.
- SR (self-reflection): the model is shown the outcome of the expert action and of each alternative
  and asked why the expert's choice is best, ending with 'Action: <action>'. Rationales whose
  final action is not the expert's (or that ran out of tokens) are dropped; the kept ones become rows
  h_i -> the rationale's ids as sampled, trained in one SFT run mixed with the expert rows.

Both use the SFT path of distillation (`sft.train`). A killed run resumes: the rows it sampled are
kept in OUT (rows.jsonl, collected.json) and trained on again as they are, the world model in OUT/iwm
is kept once trained, and each SFT resumes from its last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from leafe.backends.base import loading_model
from leafe.chat import Conversation
from leafe.envs import EnvMaker, make
from leafe.envs.base import Env, EnvFault, StepResult, Task, replay
from leafe.episode import Episode
from leafe.errors import LeafeError
from leafe.files import read_json, read_jsonl, write_json, write_jsonl
from leafe.fingerprint import fingerprint_fields, resume_fingerprint
from leafe.method import Job, MethodResult, cost
from leafe.methods.sft import Row, row_from_mask, span_row, train
from leafe.prompts import WORLD_MODEL_PROMPT, format_reply, observation_message, parse_action, self_reflection_prompt
from leafe.rollout import Recorder, RolloutEngine
from leafe.rundir import check_resume
from leafe.settings import EarlyExperienceSettings, SFTSettings


@dataclass
class ExpertState:
    """Expert state s_i of one demonstration: the history h_i and what the expert did next."""

    task: Task
    index: int
    conv: Conversation  # h_i, ready for the next agent turn
    expert_action: str
    expert_outcome: str  # observation message after the expert action
    actions: list[str]  # the expert actions before s_i (for rollback by replay)
    hashes: list[str]
    snapshot: Any = None


@dataclass
class Alternative:
    state: ExpertState
    token_ids: list[int]
    stopped: bool
    action: str
    outcome: str  # observation message after executing it from s_i


def same_action(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def demonstrations(engine: RolloutEngine, env_name: str, env_params: dict, tasks: list[Task],
                   envs: EnvMaker = make) -> tuple[list[ExpertState], list[Row], int]:
    """Play the expert on every task that has one: its states, one imitation row per demonstration
    (loss on every expert turn), and the number of tasks without an expert path."""
    recorder = engine.recorder
    states, rows, missing = [], [], 0
    for task in tasks:
        env = envs(env_name, **env_params)
        plan = env.expert_actions(task)
        if not plan:
            missing += 1
            continue
        played = None
        while played is None:  # played again when the env faulted (the Recorder stops an env that keeps failing)
            played = _demonstrate(recorder, env, task, plan)
        task_states, episode = played
        if not episode.success:
            raise LeafeError(f"the {env_name} expert did not solve task {task.task_id}; its expert_actions() is wrong")
        states += task_states
        rows.append(row_from_mask(episode.token_ids, episode.loss_mask(), kind="expert"))
    return states, rows, missing


def _demonstrate(recorder: Recorder, env: Env, task: Task, plan: list[str]) -> tuple[list[ExpertState], Episode] | None:
    """The expert's states and episode on `task`; None when the env faulted a step (no outcome to learn from)."""
    live = recorder.start(env, task)
    states = []
    for i, action in enumerate(plan):
        snapshot = env.snapshot() if env.supports_snapshot else None
        before = live.conv.copy()
        recorder.apply(live, recorder.scripted(format_reply(env.expert_thought(action), action)))
        if live.episode.finish == "fault":
            return None
        step = live.episode.steps[-1]
        states.append(ExpertState(task, i, before, step.action, observation_message(i, step.action, step.observation),
                                  live.episode.actions[:i], live.episode.observation_hashes[: i + 1], snapshot))
        if live.done:
            break
    return states, recorder.finish(live)


def _at_state(state: ExpertState, env_name: str, env_params: dict, envs: EnvMaker = make) -> Env:
    env = envs(env_name, **env_params)
    if state.snapshot is not None:
        env.restore(state.snapshot)
    else:
        replay(env, state.task, state.actions, state.hashes)
    return env


def sample_alternatives(engine: RolloutEngine, states: list[ExpertState], settings: EarlyExperienceSettings,
                        envs: EnvMaker = make) -> tuple[list[Alternative], int]:
    """K replies per state, executed from a copy of the state; those naming the expert action dropped."""
    out, same = [], 0
    for start in range(0, len(states), settings.states_per_call):
        chunk = states[start : start + settings.states_per_call]
        completions = engine.generate([s.conv.prompt_ids() for s in chunk], n=settings.alternatives)
        for state, replies in zip(chunk, completions):
            for c in replies:
                action = parse_action(c.text)
                if same_action(action, state.expert_action):
                    same += 1
                    continue
                result = _outcome(engine, state, action, settings, envs)
                engine.counters.env_steps += 1
                out.append(Alternative(state, c.token_ids, c.finish_reason == "stop", action,
                                       observation_message(state.index, action, result.observation)))
    return out, same


def _outcome(engine: RolloutEngine, state: ExpertState, action: str, settings: EarlyExperienceSettings,
             envs: EnvMaker) -> StepResult:
    """What `action` leads to from `state`; a step the env faulted is tried again from a fresh copy of
    the state, never recorded (the Recorder counts it and stops an env that keeps failing)."""
    while True:
        try:
            return _at_state(state, settings.env, settings.env_params, envs).step(action)
        except EnvFault as fault:
            engine.recorder.count_fault(fault)


def iwm_row(engine: RolloutEngine, alt: Alternative) -> Row:
    """h_i + the alternative reply + the world-model question -> the observed outcome (loss on it only)."""
    conv = alt.state.conv.copy()
    conv.add_generation(alt.token_ids, alt.stopped)
    conv.add_message("user", WORLD_MODEL_PROMPT)
    span = conv.add_generation(engine.recorder.scripted(alt.outcome).token_ids, True)
    return span_row(conv.ids, span, kind="iwm")


def self_reflection_rows(engine: RolloutEngine, alternatives: list[Alternative], settings: EarlyExperienceSettings) -> tuple[list[Row], dict[str, int]]:
    """One rationale per expert state that has alternatives; kept when it concludes with the expert action."""
    by_state: dict[int, list[Alternative]] = {}
    for alt in alternatives:
        by_state.setdefault(id(alt.state), []).append(alt)
    groups = list(by_state.values())
    rows, kept, disagreed, truncated = [], 0, 0, 0
    for start in range(0, len(groups), settings.states_per_call):
        chunk = groups[start : start + settings.states_per_call]
        prompts = []
        for alts in chunk:
            state = alts[0].state
            outcomes = [(state.expert_action, state.expert_outcome)] + [(a.action, a.outcome) for a in alts]
            conv = state.conv.copy()
            conv.add_message("user", self_reflection_prompt(state.expert_action, outcomes))
            prompts.append(conv.prompt_ids())
        completions = engine.generate(prompts, max_new_tokens=settings.rationale_tokens)
        for alts, (c,) in zip(chunk, completions):
            state = alts[0].state
            if c.finish_reason != "stop":
                truncated += 1
                continue
            if not same_action(parse_action(c.text), state.expert_action):
                disagreed += 1
                continue
            conv = state.conv.copy()
            rows.append(span_row(conv.ids, conv.add_generation(c.token_ids, True), kind="sr"))
            kept += 1
    return rows, {"rationales": len(groups), "kept": kept, "dropped_disagree": disagreed, "dropped_truncated": truncated}


#: In OUT: the rows sampling made (ROWS) and what it counted and cost (COLLECTED, written after them), so
#: a rerun trains on the very rows without sampling again (sampling on GPUs does not repeat to the bit).
ROWS, COLLECTED = "rows.jsonl", "collected.json"
#: In OUT/iwm: the world-model training's summary, once its model is there (a rerun goes on to imitation).
TRAINED = "trained.json"


def collect(job: Job, settings: EarlyExperienceSettings,
            phase: Callable[[str], None]) -> tuple[dict[str, list[Row]], dict[str, Any], dict[str, Any]]:
    """Sample with `job.backend` (released once done): the rows by their kind (expert, iwm | sr), the
    data counts, and the cost (env steps, generated tokens, wall time)."""
    backend = job.backend
    if backend is None:
        raise LeafeError("Early Experience samples: give it a backend (Job.backend)")
    started = time.perf_counter()
    generated_before = backend.stats.generated_tokens  # sampled tokens only (expert turns are scripted)
    engine = RolloutEngine(backend, temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                           seed=settings.seed, date_string=settings.date_string)
    tasks = make(settings.env, **settings.env_params).make_tasks(settings.tasks, settings.task_seed)
    phase("expert demonstrations")
    states, expert_rows, missing = demonstrations(engine, settings.env, settings.env_params, tasks, job.envs)
    if not states:
        raise LeafeError(f"env {settings.env!r} gave no expert path for any of the {len(tasks)} tasks; "
                         "Early Experience needs an env with expert_actions()")
    phase("alternatives")
    alternatives, same = sample_alternatives(engine, states, settings, job.envs)
    data: dict[str, Any] = {"tasks": len(tasks), "tasks_without_expert": missing, "expert_states": len(states),
                            "expert_rows": len(expert_rows), "alternatives": len(alternatives),
                            "alternatives_same_as_expert": same}
    rows = {"expert": expert_rows}
    if settings.variant == "iwm":  # nothing more to sample: the engine goes before the model to train loads
        generated = backend.stats.generated_tokens - generated_before
        job.done_sampling()
        rows["iwm"] = [iwm_row(engine, a) for a in alternatives]
        data["iwm_rows"] = len(rows["iwm"])
        if not rows["iwm"]:
            raise LeafeError("no world-model rows: every sampled alternative was the expert's action")
    else:
        phase("self-reflection")
        rows["sr"], data["sr"] = self_reflection_rows(engine, alternatives, settings)
        generated = backend.stats.generated_tokens - generated_before
        job.done_sampling()
    spent = {"env_steps": engine.counters.env_steps, "generated_tokens": generated,
             "collect_wall_s": round(time.perf_counter() - started, 2)}
    return rows, data, spent


def _save_collected(out: Path, fingerprint: dict[str, Any], rows: dict[str, list[Row]], data: dict[str, Any],
                    spent: dict[str, Any]) -> None:
    write_jsonl(out / ROWS, [asdict(r) for kind in rows.values() for r in kind])
    write_json(out / COLLECTED, {"settings": fingerprint, "data": data, "cost": spent})


def _collected(out: Path, fingerprint: dict[str, Any]) -> tuple[dict[str, list[Row]], dict[str, Any], dict[str, Any]] | None:
    """What an earlier run with these settings collected (None: nothing yet); other settings' refused."""
    if not (out / COLLECTED).exists():
        return None
    record = read_json(out / COLLECTED)
    check_resume(record.get("settings"), fingerprint, out, "Early Experience rows")
    rows: dict[str, list[Row]] = {}
    for r in read_jsonl(out / ROWS):
        rows.setdefault(r["kind"], []).append(Row(**r))
    return rows, record["data"], record["cost"]


def train_early_experience(job: Job, settings: EarlyExperienceSettings, sft: SFTSettings) -> MethodResult:
    """Collect the rows with `job.backend` (the starting model's), train `job.model` into `job.out`;
    the result's data counts the expert states, alternatives and rows.

    A rerun resumes: rows collected before are trained on as they are (without sampling), a world
    model trained before is kept, and the training under way goes on from its checkpoint (`sft.train`)."""
    from transformers import AutoTokenizer

    settings.validate()
    model, out = job.model, job.out
    started = time.perf_counter()
    job.progress.start(None)

    def phase(name: str) -> None:
        job.progress.advance(0, status=name)

    def on_log(entry: dict) -> None:
        job.progress.advance(0, status=f"step {entry['step']}/{entry['max_steps']} loss {entry['loss']:.3f}")

    fingerprint = resume_fingerprint(settings, str(model))
    collected = _collected(out, fingerprint)
    if collected is None:
        rows, data, spent = collect(job, settings, phase)
        _save_collected(out, fingerprint, rows, data, spent)
    else:
        job.done_sampling()  # sampled by an earlier run
        rows, data, spent = collected
    with loading_model(model):
        tokenizer = AutoTokenizer.from_pretrained(model)

    def fit(start: str, rows: list[Row], where: Path, sft: SFTSettings) -> dict[str, Any]:
        if job.train_sft is not None:  # over processes (`leafe.scale.stage.sft_launcher`)
            return job.train_sft(start, rows, where, sft)
        stats = train(start, tokenizer, rows, where, sft, on_log=on_log, precision=job.precision)
        stats.pop("model")
        return stats

    if settings.variant == "iwm":
        # The world model goes through OUT/iwm on disk, so a rerun killed in imitation keeps it.
        phase("training: world model")
        key = {"early_experience": fingerprint, "sft": fingerprint_fields(sft)}
        record = out / "iwm" / TRAINED
        if record.exists() and read_json(record).get("settings") == key:
            first = read_json(record)["summary"]
        else:
            first = fit(model, rows["iwm"], out / "iwm", sft)
            write_json(record, {"settings": key, "summary": first})
        phase("training: imitation")
        trainings = {"iwm": first, "imitation": fit(str(out / "iwm"), rows["expert"], out, sft)}
    else:
        phase("training: rationales + imitation")
        trainings = {"sr+imitation": fit(model, rows["sr"] + rows["expert"], out, sft)}
    summary = {
        "method": f"early-experience-{settings.variant}",
        "model": str(model),
        "settings": asdict(settings),
        "sft": asdict(sft),
        "data": data,
        "training": {name: {k: v for k, v in t.items() if k != "log"} for name, t in trainings.items()},
        "loss_log": {name: t["log"] for name, t in trainings.items()},
        "cost": {**spent, "wall_s": round(time.perf_counter() - started, 2),
                 "ran": list(trainings.values())[-1].get("ran")},
    }
    write_json(out / "train.json", summary)
    return MethodResult("early_experience", str(out), {"early_experience": summary["settings"], "sft": summary["sft"]},
                        data, {**cost(spent["env_steps"], spent["generated_tokens"], summary["cost"]["wall_s"]),
                               "ran": summary["cost"]["ran"]})
