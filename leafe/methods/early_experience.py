"""The Early Experience baseline (arXiv 2510.08558): learn from the outcomes of one's own alternatives
to expert actions, then imitate the expert. docs/usage.md (Early Experience) gives the source of each
choice below and every place leafe departs from the paper.

Expert demonstrations come from the env's expert (`Env.expert_actions`: Sokoban's solver, gold paths
or walkthroughs elsewhere), played through the same Recorder as every other episode, so an expert
turn is 'Thought: ...' + 'Action: ...' in the agent's own chat format. At each expert state s_i there
are K alternatives, each executed from a copy of s_i (snapshot, or verified replay) to observe where
it leads: K distinct admissible actions other than the expert's where the env lists them
(`Env.admissible_actions`, as App. B draws them; ALFWorld K = 8, ScienceWorld K = 3), else K policy
samples with those naming the expert's action or an action already kept at that state dropped.

- IWM (implicit world modelling): rows (h_i, a reply, "predict what you will observe") -> the
  observation the env returned, for the expert's own transition (s_i, a_i, s_{i+1}) and for every
  alternative (App. B has both). `iwm_epochs` of the SFT's epochs train these rows; the rest imitate
  the expert, starting from the IWM model (one world-modelling epoch within the imitation budget).
- SR (self-reflection): the model is shown the outcome of the expert action and of each alternative
  and asked for a detailed rationale weighing each alternative against the expert's action, ending
  with 'Action: <action>'. Rationales whose final action is not the expert's (or that ran out of
  tokens) are dropped; the kept ones become rows h_i -> the rationale's ids as sampled, trained in one
  SFT run mixed with the expert rows.

Both use the SFT path of distillation (`sft.train`). A killed run resumes: the rows it sampled are
kept in OUT (rows.jsonl, collected.json) and trained on again as they are, the world model in OUT/iwm
is kept once trained, and each SFT resumes from its last checkpoint.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from leafe.backends.base import loading_model
from leafe.chat import Conversation
from leafe.envs import EnvMaker, make
from leafe.envs.base import Env, EnvFault, Task, replay
from leafe.episode import Episode
from leafe.errors import LeafeError
from leafe.files import read_json, read_jsonl, write_json, write_jsonl
from leafe.fingerprint import fingerprint_fields, resume_fingerprint
from leafe.method import Job, MethodResult, cost
from leafe.methods.sft import Row, row_from_mask, span_row, train
from leafe.modelcard import write_model_card
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
    expert_reply: list[int]  # the expert's turn at s_i, as played (the expert transition's reply)
    expert_outcome: str  # observation message after the expert action
    actions: list[str]  # the expert actions before s_i (for rollback by replay)
    hashes: list[str]
    snapshot: Any = None
    admissible: list[str] | None = None  # what the env accepted at s_i, where it lists it


@dataclass
class Alternative:
    """A transition from an expert state: the reply that named an action, and what the env showed."""

    state: ExpertState
    token_ids: list[int]
    stopped: bool
    action: str
    outcome: str  # observation message after executing it from s_i


def action_key(action: str) -> str:
    """An action as the envs read it: case and spacing do not make another action."""
    return " ".join(action.lower().split())


def same_action(a: str, b: str) -> bool:
    return action_key(a) == action_key(b)


def expert_transition(state: ExpertState) -> Alternative:
    """The expert's own (s_i, a_i, s_{i+1}), as played in the demonstration."""
    return Alternative(state, state.expert_reply, True, state.expert_action, state.expert_outcome)


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
        admissible = env.admissible_actions()
        before = live.conv.copy()
        reply = recorder.scripted(format_reply(env.expert_thought(action), action))
        recorder.apply(live, reply)
        if live.episode.finish == "fault":
            return None
        step = live.episode.steps[-1]
        states.append(ExpertState(task, i, before, step.action, reply.token_ids,
                                  observation_message(i, step.action, step.observation), live.episode.actions[:i],
                                  live.episode.observation_hashes[: i + 1], snapshot, admissible))
        if live.done:
            break
    return states, recorder.finish(live)


def _put_at(env: Env, state: ExpertState) -> None:
    """`env` put in `state`: its snapshot restored, or the expert's prefix replayed and verified."""
    if state.snapshot is not None:
        env.restore(state.snapshot)
    else:
        replay(env, state.task, state.actions, state.hashes)


def sample_alternatives(engine: RolloutEngine, states: list[ExpertState], settings: EarlyExperienceSettings,
                        envs: EnvMaker = make) -> tuple[list[Alternative], dict[str, int]]:
    """K alternatives per state, each executed from a copy of the state, and what was counted: drawn
    from the admissible actions where the state lists them, else sampled from the policy (one call per
    `states_per_call` states); never the expert's action, never one action twice at a state."""
    counts = {"alternatives_admissible": 0, "alternatives_sampled": 0, "alternatives_same_as_expert": 0,
              "alternatives_duplicate": 0}
    chosen: dict[int, list[tuple[str, list[int] | None, bool]]] = {}  # per state: (action, reply ids, stopped)
    for state in states:
        if state.admissible is not None:
            chosen[id(state)] = [(a, None, True) for a in draw_admissible(state, settings.alternatives, settings.seed)]
    sampled = [s for s in states if s.admissible is None]
    for start in range(0, len(sampled), settings.states_per_call):
        chunk = sampled[start : start + settings.states_per_call]
        completions = engine.generate([s.conv.prompt_ids() for s in chunk], n=settings.alternatives)
        for state, replies in zip(chunk, completions):
            seen, kept = {action_key(state.expert_action)}, []
            for c in replies:
                action = parse_action(c.text)
                if action_key(action) in seen:
                    counts["alternatives_same_as_expert" if same_action(action, state.expert_action)
                           else "alternatives_duplicate"] += 1
                    continue
                seen.add(action_key(action))
                kept.append((action, c.token_ids, c.finish_reason == "stop"))
            chosen[id(state)] = kept
    out, copies = [], _StateCopies(lambda: envs(settings.env, **settings.env_params))
    for state in states:
        for action, reply, stopped in chosen[id(state)]:
            out.append(_execute(engine, state, action, reply, stopped, copies))
            counts["alternatives_admissible" if reply is None else "alternatives_sampled"] += 1
    return out, counts


def draw_admissible(state: ExpertState, k: int, seed: int) -> list[str]:
    """K distinct admissible actions other than the expert's, drawn uniformly without replacement
    (all of them when there are fewer); the draw is seeded by the run's seed and the state alone, so
    it repeats whatever else the run sampled."""
    pool: dict[str, str] = {}
    for action in state.admissible or []:
        pool.setdefault(action_key(action), action)
    pool.pop(action_key(state.expert_action), None)
    rng = random.Random(f"{seed}:{state.task.task_id}:{state.index}")
    return rng.sample(list(pool.values()), min(k, len(pool)))


class _StateCopies:
    """One env that executes every alternative, put back in each one's state first. A new env per
    alternative loaded the game again each time, which costs ALFWorld more than resetting a loaded one
    (BENCHMARKS.md, "ALFWorld on its real games"), or started another simulator (ScienceWorld)."""

    def __init__(self, new_env: Callable[[], Env]):
        self.new_env, self.env = new_env, None

    def at(self, state: ExpertState) -> Env:
        if self.env is None:
            self.env = self.new_env()
        _put_at(self.env, state)
        return self.env

    def discard(self) -> None:
        """After a fault: the next copy comes from a new env."""
        self.env = None


def _execute(engine: RolloutEngine, state: ExpertState, action: str, reply: list[int] | None, stopped: bool,
             copies: _StateCopies) -> Alternative:
    """`action` taken from a copy of `state`. A drawn action gets a reply in the demonstrations' voice
    (`Env.expert_thought` at s_i), so its IWM row reads like the expert's. A step the env faulted is
    tried again from a fresh copy of the state, never recorded (the Recorder counts it and stops an env
    that keeps failing)."""
    while True:
        try:
            env = copies.at(state)
            if reply is None:
                reply = engine.recorder.scripted(format_reply(env.expert_thought(action), action)).token_ids
            result = env.step(action)
            break
        except EnvFault as fault:
            copies.discard()
            engine.recorder.count_fault(fault)
    engine.counters.env_steps += 1
    return Alternative(state, reply, stopped, action, observation_message(state.index, action, result.observation))


def iwm_row(engine: RolloutEngine, alt: Alternative) -> Row:
    """h_i + the reply (an alternative's, or the expert's) + the world-model question -> the observed
    outcome (loss on it only)."""
    conv = alt.state.conv.copy()
    conv.add_generation(alt.token_ids, alt.stopped)
    conv.add_message("user", WORLD_MODEL_PROMPT)
    span = conv.add_generation(engine.recorder.scripted(alt.outcome).token_ids, True)
    return span_row(conv.ids, span, kind="iwm")


def self_reflection_rows(engine: RolloutEngine, alternatives: list[Alternative], settings: EarlyExperienceSettings) -> tuple[list[Row], dict[str, int]]:
    """One rationale per expert state that has alternatives, weighing all of them (as EE's SR template
    lists them all in one prompt); kept when it concludes with the expert action."""
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
            conv = state.conv.copy()
            conv.add_message("user", self_reflection_prompt(state.expert_action, state.expert_outcome,
                                                            [(a.action, a.outcome) for a in alts]))
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
    alternatives, counts = sample_alternatives(engine, states, settings, job.envs)
    data: dict[str, Any] = {"tasks": len(tasks), "tasks_without_expert": missing, "expert_states": len(states),
                            "expert_rows": len(expert_rows), "alternatives": len(alternatives), **counts}
    rows = {"expert": expert_rows}
    if settings.variant == "iwm":  # nothing more to sample: the engine goes before the model to train loads
        generated = backend.stats.generated_tokens - generated_before
        job.done_sampling()
        rows["iwm"] = [iwm_row(engine, t) for t in [expert_transition(s) for s in states] + alternatives]
        data["iwm_rows"], data["iwm_expert_rows"] = len(rows["iwm"]), len(states)
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


def _counts(rows: list[Row]) -> dict[str, int]:
    """A model card's counts of the rows one training saw."""
    return {"rows": len(rows), "tokens": sum(len(r.input_ids) for r in rows),
            "loss_tokens": sum(r.loss_tokens for r in rows)}


def train_early_experience(job: Job, settings: EarlyExperienceSettings, sft: SFTSettings) -> MethodResult:
    """Collect the rows with `job.backend` (the starting model's), train `job.model` into `job.out`;
    the result's data counts the expert states, alternatives and rows.

    A rerun resumes: rows collected before are trained on as they are (without sampling), a world
    model trained before is kept, and the training under way goes on from its checkpoint (`sft.train`)."""
    from transformers import AutoTokenizer

    settings.validate()
    world_sft, imitation_sft = settings.sft_stages(sft)  # refused here when the budget leaves no imitation
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
        # the world model's steps count from 1 as the imitation's do: its figures go under a name of their own
        tracker = job.tracker if where == out else job.tracker.for_stage(f"{job.tracker.stage}_{where.name}")
        stats = train(start, tokenizer, rows, where, sft, on_log=on_log, precision=job.precision, tracker=tracker)
        stats.pop("model")
        return stats

    if settings.variant == "iwm":
        # The world model goes through OUT/iwm on disk, so a rerun killed in imitation keeps it.
        phase("training: world model")
        key = {"early_experience": fingerprint, "sft": fingerprint_fields(world_sft)}
        record = out / "iwm" / TRAINED
        if record.exists() and read_json(record).get("settings") == key:
            first = read_json(record)["summary"]
        else:
            first = fit(model, rows["iwm"], out / "iwm", world_sft)
            write_model_card(out / "iwm", str(model), "early-experience-iwm",
                             {"early_experience": asdict(settings), "sft": asdict(world_sft)},
                             {"stage": "world model (the imitation starts from it)", "rows": _counts(rows["iwm"])})
            write_json(record, {"settings": key, "summary": first})
        phase("training: imitation")
        trainings = {"iwm": first, "imitation": fit(str(out / "iwm"), rows["expert"], out, imitation_sft)}
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
    used = {"world model": rows["iwm"], "imitation": rows["expert"]} if settings.variant == "iwm" else {
        "rationales + imitation": rows["sr"] + rows["expert"]}
    write_model_card(out, str(model), summary["method"], {"early_experience": summary["settings"], "sft": summary["sft"]},
                     {**data, "rows": {name: _counts(r) for name, r in used.items()}})
    write_json(out / "train.json", summary)
    return MethodResult("early_experience", str(out), {"early_experience": summary["settings"], "sft": summary["sft"]},
                        data, {**cost(spent["env_steps"], spent["generated_tokens"], summary["cost"]["wall_s"]),
                               "ran": summary["cost"]["ran"]})
