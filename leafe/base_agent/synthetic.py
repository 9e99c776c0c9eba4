"""Synthetic Sokoban play: the pretraining data of the embedded base agent.

LEAFE assumes a pretrained LLM that acts imperfectly, can reflect on a failure, and can use an
experience put in its context. No hub model is reachable here, so `leafe bootstrap` teaches a small
model exactly those three skills from generated play, through the same Recorder (prompts, chat
template, token ids) that real rollouts use:

1. demonstrations: an optimal expert that makes random mistakes (some irreversible), and plays on;
2. reflections: a failed (or unfinished) history + the reflection prompt -> "Step: k / Experience:
   ..." where k is the first irreversible mistake, found exactly with the distance table, and the
   experience says what went wrong and what to do instead ("Step: none" when nothing is lost yet);
3. experience-following: the history up to that step + the experience message -> the corrected
   action, then play continues.

The mistakes, reflections and experiences are the oracle's (`leafe.envs.sokoban.oracle`), which also
grades the model's own reflections and answers `--reflector oracle`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from leafe.envs.base import Task
from leafe.envs.sokoban import (
    ACTIONS,
    SokobanEnv,
    State,
    move,
)
from leafe.envs.sokoban.oracle import (
    NO_MISTAKE,
    Expert,
    describe_mistake,
    first_mistake,
    oracle_experience,
    reflection_reply,
    thought,
)
from leafe.prompts import REFLECTION_PROMPT, experience_message, format_reply, observation_message

KINDS = ("demo", "reflect", "experience")


@dataclass
class Script:
    """One synthetic example, as replies to play; materialized into token ids by `materialize`."""

    task: Task
    kind: str
    replies: list[str]
    reflect_after: int | None = None  # reflect once this many steps are played (None: no reflection)
    reflection: str = ""
    tau: int | None = None  # experience: branch at this step with `experience`
    experience: str = ""
    continuation: list[str] = field(default_factory=list)


class NoisyExpert:
    """The expert's move with probability 1 - mistake_rate, otherwise a random other direction."""

    def __init__(self, expert: Expert, rng: random.Random, mistake_rate: float):
        self.expert, self.rng, self.mistake_rate = expert, rng, mistake_rate

    def play(self, state: State, steps_left: int) -> list[str]:
        """Replies from `state` until solved or out of moves."""
        replies = []
        room = self.expert.room
        for _ in range(steps_left):
            if state.boxes <= room.goals:
                break
            best = self.expert.optimal(state)
            if best and self.rng.random() >= self.mistake_rate:
                action = self.rng.choice(best)
            else:
                action = self.rng.choice([a for a in ACTIONS if a not in best] or list(ACTIONS))
            replies.append(format_reply(thought(self.expert, state, action), action))
            state = move(room, state, action)[0]
        return replies


def make_script(task: Task, max_steps: int, rng: random.Random, mistake_rate: float, reflect_every: int,
                plans: bool = False, kind: str | None = None) -> Script:
    """One example of `kind`, or of a kind drawn by `rng` (demo 40%, reflect 30%, experience 30%).

    Reflection and experience examples need failures, which a noisy expert rarely produces on easy
    levels, so for those kinds the level is replayed (up to 30 times) until an attempt fails.
    """
    expert = Expert.of(task, max_steps, plans)
    kind = kind or rng.choices(KINDS, weights=(0.4, 0.3, 0.3))[0]
    play = NoisyExpert(expert, rng, mistake_rate)
    replies = play.play(expert.start, max_steps)
    if kind == "reflect" and rng.random() < 0.3:
        return _reflect_midway(task, expert, replies, rng, reflect_every) or Script(task, "demo", replies)
    if kind != "demo":
        for _ in range(30):
            actions = _actions(replies)
            mistake = first_mistake(expert, actions)
            if mistake is not None:
                break
            replies = play.play(expert.start, max_steps)
        else:
            return Script(task, "demo", replies)
        experience = oracle_experience(expert, actions, mistake)
        if kind == "reflect":
            return Script(task, kind, replies, reflect_after=len(replies), reflection=reflection_reply(mistake, experience))
        state = expert.states(actions)[mistake]
        fixes = expert.optimal(state)
        if fixes:
            correct = fixes[0]  # the move the experience names
            corrected = format_reply(thought(expert, state, correct), correct)
            rest = play.play(move(expert.room, state, correct)[0], max_steps - mistake - 1)
            return Script(task, kind, replies, tau=mistake, experience=experience, continuation=[corrected] + rest)
    return Script(task, "demo", replies)


def _actions(replies: list[str]) -> list[str]:
    return [r.rsplit("Action: ", 1)[1] for r in replies]


def _reflect_midway(task: Task, expert: Expert, replies: list[str], rng: random.Random, every: int) -> Script | None:
    """A reflection after `every`, 2*`every`... steps of an unfinished episode."""
    checkpoints = list(range(every, len(replies), every))
    if not checkpoints:
        return None
    cut = rng.choice(checkpoints)
    actions = _actions(replies)
    # Once lost, a level stays lost (a move lowers the distance by at most one), so a mistake
    # among the first `cut` actions means the state at `cut` is lost.
    early = first_mistake(expert, actions[:cut])
    if early is None:
        text = reflection_reply(None, NO_MISTAKE)
    else:
        text = reflection_reply(early, oracle_experience(expert, actions, early))
    return Script(task, "reflect", replies[:cut], reflect_after=cut, reflection=text)


def materialize(script: Script, recorder, max_steps: int) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a script, built by the same Recorder that real rollouts use."""
    env = SokobanEnv(max_steps=max_steps)
    live = recorder.start(env, script.task)
    for reply in script.replies:
        recorder.apply(live, recorder.scripted(reply))
    if script.kind == "reflect":
        conv = recorder.reflection_prompt(live)
        completion = recorder.scripted(script.reflection)
        start, _ = conv.add_generation(completion.token_ids, stopped=True)
        # Only the reflection carries loss: demonstrations teach the play, and the few reflection
        # tokens would otherwise be a small share of a long row's loss.
        return conv.ids, [0] * start + conv.mask[start:]
    if script.kind == "experience":
        # Roll back to h_tau, add the experience, and play the corrected action and what follows.
        branch = recorder.branch(live, script.tau, script.experience, SokobanEnv(max_steps=max_steps))
        for reply in script.continuation:
            recorder.apply(branch, recorder.scripted(reply))
            if branch.done:
                break
        return branch.conv.ids, branch.conv.mask
    return live.conv.ids, live.conv.mask


@dataclass
class Fragment:
    """A short example: a few turns (starting mid-episode, as the env shows it) -> a target reply.

    Cheap to train on, so the base agent learns to read a board, to follow an experience and to
    point a reflection at the step that lost the level from many of them, not only from the few
    whole episodes the build can afford.
    """

    messages: list[tuple[str, str]]  # (role, text), starting with a user message
    reply: str
    kind: str = "fragment"


def make_fragment(task: Task, max_steps: int, rng: random.Random, mistake_rate: float,
                  experience_rate: float = 0.3, plans: bool = False) -> Fragment | None:
    """A state reached by noisy play, shown as the env shows it; the target is an expert move.

    The cut falls inside the noisy episode, on a state that is not yet solved; None when that state
    is already lost (the expert has no move to teach there).
    """
    expert = Expert.of(task, max_steps, plans)
    replies = NoisyExpert(expert, rng, mistake_rate).play(expert.start, max_steps)
    cut = rng.randrange(len(replies)) if replies else 0
    shown = _shown_observations(task, replies[:cut], max_steps)
    state = expert.states(_actions(replies[:cut]))[-1]
    fixes = expert.optimal(state)
    if not fixes:
        return None
    messages = [("user", shown[-1])]
    correct = rng.choice(fixes)
    if rng.random() < experience_rate:
        wrong = rng.choice([a for a in ACTIONS if a not in fixes] or list(ACTIONS))
        messages.append(("user", experience_message(describe_mistake(expert, state, cut, wrong))))
        correct = fixes[0]  # the move the experience names
    return Fragment(messages, format_reply(thought(expert, state, correct), correct))


#: Share of reflection fragments on an attempt that has not lost the level yet.
ON_TRACK_REFLECTIONS = 0.1


def make_reflection_fragment(task: Task, max_steps: int, rng: random.Random, mistake_rate: float,
                             plans: bool = False) -> Fragment | None:
    """The last few turns of a noisy attempt, the reflection prompt -> the oracle's reflection.

    A share `ON_TRACK_REFLECTIONS` of them show an attempt still on track ("Step: none"); the rest
    are windows around a failed attempt's first irreversible mistake (the feedback there says the
    level is lost). None when the level gives no attempt of the kind drawn.
    """
    expert = Expert.of(task, max_steps, plans)
    play = NoisyExpert(expert, rng, mistake_rate)
    # The kind is drawn first: a noisy attempt loses the level only a few times in a hundred, so
    # drawing attempts until one fails or a coin says stop made two thirds of these "Step: none",
    # and agents built on that mix answered "none" to every reflection.
    on_track = rng.random() < ON_TRACK_REFLECTIONS
    for _ in range(100):
        replies = play.play(expert.start, max_steps)
        mistake = first_mistake(expert, _actions(replies))
        if (mistake is None) == on_track:
            break
    else:
        return None
    if mistake is None:
        if len(replies) < 2:
            return None
        end = rng.randrange(1, len(replies))  # unfinished and on track
        text = reflection_reply(None, NO_MISTAKE)
    else:
        end = min(len(replies), mistake + 1 + rng.randint(0, 3))
        text = reflection_reply(mistake, oracle_experience(expert, _actions(replies), mistake))
    start = max(0, (mistake if mistake is not None else end - 1) - rng.randint(0, 3))
    shown = _shown_observations(task, replies[:end], max_steps)
    messages = [("user", shown[start])]
    for t in range(start, end):
        messages += [("assistant", replies[t]), ("user", shown[t + 1])]
    messages.append(("user", REFLECTION_PROMPT))
    return Fragment(messages, text, kind="reflect-fragment")


def _shown_observations(task: Task, replies: list[str], max_steps: int) -> list[str]:
    """The user message before each turn: "Start: ..." then "Step t: action" + observation."""
    env = SokobanEnv(max_steps=max_steps)
    shown = [f"Start:\n{env.reset(task)}"]
    for t, action in enumerate(_actions(replies)):
        shown.append(observation_message(t, action, env.step(action).observation))
    return shown


def fragment_ids(fragment: Fragment, fmt) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a fragment, through the same chat path as episodes; only the
    target reply carries loss."""
    from leafe.chat import Conversation

    role, first = fragment.messages[0]
    conv = Conversation.start(fmt, [{"role": role, "content": first}])
    for role, text in fragment.messages[1:]:
        if role == "assistant":
            ids = fmt.encode(text) + ([fmt.end_of_turn_id] if fmt.end_of_turn_id is not None else [])
            conv.add_generation(ids, stopped=True)
        else:
            conv.add_message(role, text)
    ids = fmt.encode(fragment.reply)
    if fmt.end_of_turn_id is not None:
        ids.append(fmt.end_of_turn_id)
    start, _ = conv.add_generation(ids, stopped=True)
    return conv.ids, [0] * start + conv.mask[start:]


def decision_tokens(fmt, plans: bool) -> dict:
    """What `decision_weights` marks as a decision for this tokenizer: the direction after "Thought:
    go" (plain thoughts), or every direction and digit token (plan thoughts)."""
    if not plans:
        return {"after": fmt.encode("Thought: go")}
    words = [f" {a}" for a in ACTIONS] + list("0123456789")
    return {"heavy": {ids[0] for ids in map(fmt.encode, words) if len(ids) == 1}}


def decision_weights(ids: list[int], mask: list[int], weight: float, *, after: list[int] | None = None,
                     heavy: set[int] | None = None) -> list[float] | None:
    """`weight` on the decision tokens of the trained replies, 1 elsewhere; None when `weight` is 1.

    Plain thoughts decide in one token, the direction right after `after` (the ids of "Thought: go").
    Plan thoughts decide in several (the push, the cell, the player's cell, the move), so there every
    trained token in `heavy` (the four directions and the ten digits) is a decision, which also covers
    a reflection's step and the move its experience names.

    The hypothesis this tests: the format tokens around a decision are learnt in a few dozen updates,
    but their early gradients fill Adam's second moment, so the board-reading a decision needs starts
    late. Measured in docs/experiment-log.md, "A loss weight on the decision token".
    """
    if weight == 1.0:
        return None
    if after is not None:
        k = len(after)
        return [weight if i >= k and mask[i] and ids[i - k:i] == after else 1.0 for i in range(len(ids))]
    return [weight if trained and token in (heavy or ()) else 1.0 for token, trained in zip(ids, mask)]


def texts_of(script: Script, max_steps: int) -> list[str]:
    """Strings an agent sees or writes in this script, for training the tokenizer."""
    env = SokobanEnv(max_steps=max_steps)
    out = [env.reset(script.task), env.instruction]
    for reply in script.replies:
        result = env.step(reply.rsplit("Action: ", 1)[1])
        out.extend([reply, result.observation])
        if result.done:
            break
    out.extend(script.continuation)
    out.extend([script.reflection, script.experience])
    return [t for t in out if t]
