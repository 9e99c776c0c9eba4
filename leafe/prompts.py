"""The words around the agent: ReAct system prompt, turn formatting, reflection, experience; parsers.

Every method (evaluation, LEAFE, GRPO, Early Experience, ACE, the embedded model's pretraining)
uses these same strings, so a policy is always trained and tested on the prompts it will see.
Parsers accept reasonable variants (case, markdown, extra words) because small and large models
both drift from an exact format; what cannot be parsed is reported, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are an agent solving a task in an environment, one action per turn. After each action you "
    "see what happened. Reply with a short thought, then a last line 'Action: <action>'."
)


def first_message(instruction: str, observation: str) -> str:
    """The first user turn: the task instruction q and the observation o_0."""
    return f"{instruction}\n\nStart:\n{observation}"


def observation_message(step: int, action: str, observation: str) -> str:
    """What followed action `step`: the action echoed with its step number, then the observation.

    Numbering each result by the action that caused it lets a reflection name the step to redo by
    pointing at the feedback that shows the damage ("Step 3: left" ... "stuck").
    """
    shown = " ".join(action.split())[:40] or "(no action)"
    return f"Step {step}: {shown}\n{observation}"


_ACTION_LINE = re.compile(r"^\W*action\W*:\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def parse_action(reply: str) -> str:
    """The action in a reply: the text of its last 'Action:' line, else its last non-empty line.

    The env decides whether that text is a valid action, so a reply without the expected format
    becomes an ordinary step whose feedback says the action was invalid.
    """
    matches = _ACTION_LINE.findall(reply)
    if matches:
        return matches[-1].strip(" *`\"'")
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def format_reply(thought: str, action: str) -> str:
    """The reply format the system prompt asks for (used for synthetic and expert turns)."""
    return f"Thought: {thought}\nAction: {action}"


# -- reflection and experience (LEAFE stage 1) ----------------------------------------------------

REFLECTION_PROMPT = (
    "Reflect on this attempt. Find the step where it first went wrong, and say what to do there instead. "
    "Answer in two lines:\nStep: <the number of the step to redo>\nExperience: <what went wrong and what to do instead>"
)


def experience_message(experience: str) -> str:
    """The experience e, placed as a message right after h_tau when a branch is sampled."""
    return f"Experience from an earlier attempt at this step: {experience}"


@dataclass(frozen=True)
class Reflection:
    #: The step to redo; None when the reply says nothing has gone wrong yet ("Step: none").
    step: int | None
    experience: str


_STEP = re.compile(r"\bstep\b\W{0,3}(?:number\W{0,3})?(\d+|none)\b", re.IGNORECASE)
_EXPERIENCE = re.compile(r"\b(?:experience|lesson)\b[\s*_`]*[:\-]\s*(.+)", re.IGNORECASE | re.DOTALL)


def parse_reflection(reply: str) -> Reflection | None:
    """(step, experience) from a reflection reply, or None when either part is missing."""
    step = _STEP.search(reply)
    experience = _EXPERIENCE.search(reply)
    if step is None or experience is None:
        return None
    text = " ".join(experience.group(1).split()).strip(" *`\"'")
    if not re.search(r"[A-Za-z0-9]", text):  # "Experience: ." says nothing to act on
        return None
    value = step.group(1).lower()
    return Reflection(None if value == "none" else int(value), text)


# -- baselines: Early Experience (world model, self-reflection) and ACE (playbook) ---------------

WORLD_MODEL_PROMPT = "Predict what you will observe after that action."


#: How the SR prompt names the expert's action (a scripted model in the tests reads it back).
EXPERT_ACTION_LABEL = "Expert action"


def self_reflection_prompt(expert: str, expert_outcome: str, alternatives: list[tuple[str, str]]) -> str:
    """Early Experience SR (arXiv 2510.08558, its self-reflection prompt template, in our words): the
    expert's action and each alternative with what it led to from this state, and a request for a
    detailed first-person rationale that weighs every alternative against the expert's action and ends
    in it. The state itself is the conversation this prompt follows."""
    blocks = [f"{EXPERT_ACTION_LABEL}: {expert}\nWhat followed:\n{expert_outcome}"]
    blocks += [f"Alternative {j}: {action}\nWhat followed:\n{outcome}"
               for j, (action, outcome) in enumerate(alternatives, 1)]
    return (
        "Each of these actions was tried from the current state:\n\n" + "\n\n".join(blocks) + "\n\n"
        f"'{expert}' is the best action here. Write the reasoning you would think through before choosing it, "
        "as your own inner monologue and without mentioning an expert: what the task needs at this point; "
        "for each alternative, what its outcome shows and why it is less suitable; and why "
        f"'{expert}' is the most suitable. Then end with the line 'Action: {expert}'."
    )


# -- ACE: the playbook's bullets, the reflector's prompt and its parser ---------------------------
# The bullet line is ACE's (ace-agent/ace, playbook_utils.py): `[id] helpful=H harmful=K :: text`.

def bullet_id(number: int) -> str:
    """The id of the playbook's `number`-th bullet ever added (ACE's `slug-00001` form, one slug)."""
    return f"ctx-{number:05d}"


_BULLET_ID = re.compile(r"\bctx-(\d+)\b", re.IGNORECASE)


def bullet_line(identifier: str, helpful: int, harmful: int, text: str, counters: bool = True) -> str:
    """One bullet as the generator and the reflector see it: ace-agent/ace's line with its counters, or
    ace-appworld's `[id] text` (`counters=False`). A multi-line bullet's later lines are indented, so
    every bullet still starts a line with its id."""
    body = "\n  ".join(text.splitlines())
    return f"[{identifier}] helpful={helpful} harmful={harmful} :: {body}" if counters else f"[{identifier}] {body}"


def playbook_system_prompt(lines: list[str], system: str = SYSTEM_PROMPT) -> str:
    """The system prompt with the playbook's bullet lines appended (ACE); unchanged when there are none."""
    if not lines:
        return system
    return system + "\n\nPlaybook (bullets learnt on earlier tasks):\n" + "\n".join(lines)


def ace_reflector_prompt(success: bool, reward: float, in_play: list[str], max_bullets: int) -> str:
    """What the reflector is asked after an attempt, which it reads above: the outcome, the bullets that
    were in play (their text is in the system prompt), a request to tag them and to write new bullets."""
    outcome = f"This attempt {'succeeded' if success else 'failed'} (reward {reward:g})."
    if in_play:
        used = (f"The playbook bullets in play were {', '.join(in_play)}. For those that mattered, say which "
                "helped and which misled, on two lines (leave a bullet out when it made no difference):\n"
                "Helpful: <bullet ids>\nHarmful: <bullet ids>\n")
    else:
        used = "The playbook was empty.\n"
    return (f"{outcome} Reflect on it and on the environment's feedback: what worked, what went wrong and why, "
            f"and what to do instead.\n{used}Then write up to {max_bullets} new bullets for the playbook: general, "
            "concrete lessons for other tasks of this kind, each starting on its own line (a bullet may take "
            "several lines):\nBullet: <lesson>")


@dataclass(frozen=True)
class BulletReflection:
    #: bullet id -> "helpful" | "harmful" | "neutral" (a later line about the same id wins, as in ACE).
    tags: dict[str, str]
    #: New bullets, in the order written.
    bullets: list[str]


_TAGS = "helpful|harmful|neutral"
_TAG_LIST = re.compile(rf"^[\W_]*({_TAGS})\b[^:\n]{{0,20}}:(.*)$", re.IGNORECASE)  # "Helpful: ctx-00001, ctx-00003"
_TAG_ONE = re.compile(rf"^[\W_]*\[?\s*(ctx-\d+)\s*\]?[\W_]*({_TAGS})\b(?!\s*=)", re.IGNORECASE)  # "[ctx-00002] harmful"
#: Where a bullet starts. 'Lesson:' and 'Experience:' too: small models answer in the words their
#: reflections were trained on (the embedded agent writes 'Experience:').
_BULLET_START = re.compile(r"^[\W_]*(?:new\s+)?(?:bullet|lesson|experience)\s*\d*[\s*_`]*:\s?(.*)$", re.IGNORECASE)
#: Lines that end a bullet: another bullet, a tag line, or the 'Step:' line of a LEAFE-style reflection.
_BULLET_END = re.compile(rf"^[\W_]*(?:{_TAGS}|step)\b[^:\n]{{0,20}}:", re.IGNORECASE)
#: A reflector that has nothing to teach says so; such a line is not a bullet ("none" was curated
#: into a playbook as one: BENCHMARKS.md, "Methods and baselines").
_NO_LESSON = re.compile(r"\W*(?:none|n/?a|null|nothing|no lesson|no lessons|no bullet|no bullets)\W*", re.IGNORECASE)


def parse_bullet_reflection(reply: str, max_chars: int) -> BulletReflection:
    """The bullet tags and the new bullets of a reflector reply. A bullet runs from its 'Bullet:' line
    to the next bullet, tag line or blank line; its lines keep their breaks (runs of spaces are closed
    up) and it is cut at `max_chars`. Empty and "none" bullets are dropped."""
    tags: dict[str, str] = {}
    bullets: list[list[str]] = []
    current: list[str] | None = None
    for line in reply.splitlines():
        if (one := _TAG_ONE.match(line)) is not None:
            tags[_normal_id(one.group(1))] = one.group(2).lower()
            current = None
        elif (many := _TAG_LIST.match(line)) is not None:
            for number in _BULLET_ID.findall(many.group(2)):
                tags[bullet_id(int(number))] = many.group(1).lower()
            current = None
        elif (start := _BULLET_START.match(line)) is not None:
            current = [start.group(1)]
            bullets.append(current)
        elif current is not None and line.strip() and not _BULLET_END.match(line):
            current.append(line)
        else:
            current = None
    texts = []
    for lines in bullets:
        text = "\n".join(" ".join(line.split()) for line in lines).strip().strip(" *`\"'").strip()
        if re.search(r"[A-Za-z]{2}", text) and not _NO_LESSON.fullmatch(text):
            texts.append(text[:max_chars].rstrip())
    return BulletReflection(tags, texts)


def _normal_id(text: str) -> str:
    return bullet_id(int(text.split("-")[1]))
