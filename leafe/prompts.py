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


def self_reflection_prompt(expert: str, outcomes: list[tuple[str, str]]) -> str:
    """Early Experience SR: the observed outcome of the expert action and of each alternative, and a
    request for a rationale that ends in the expert's action (the paper's prompt, in our words)."""
    lines = [f"- {action}: {' '.join(observation.split())}" for action, observation in outcomes]
    return (
        "Here is what each candidate action leads to from this state:\n" + "\n".join(lines) + "\n"
        f"An expert chose '{expert}'. Explain briefly, from these outcomes, why it is the best choice, "
        "then end with the line 'Action: <action>'."
    )


ACE_REFLECTOR_PROMPT = (
    "Reflect on this attempt and its feedback. Write one general lesson that would help on other tasks "
    "of this kind, in one line:\nLesson: <the lesson>"
)


def playbook_system_prompt(lessons: list[str], system: str = SYSTEM_PROMPT) -> str:
    """The system prompt with a playbook of lessons appended (ACE); unchanged when there are none."""
    if not lessons:
        return system
    return system + "\n\nPlaybook (lessons from earlier tasks):\n" + "\n".join(f"- {x}" for x in lessons)


#: A reflector that has nothing to teach says so; such a line is not a lesson ("none" was curated
#: into a playbook as one: BENCHMARKS.md, the baselines).
_NO_LESSON = re.compile(r"\W*(?:none|n/?a|null|nothing|no lesson|no lessons)\W*", re.IGNORECASE)


def parse_lesson(reply: str, max_chars: int = 200) -> str | None:
    """The lesson in a reflector reply ('Lesson:' or 'Experience:' line), or None when there is none."""
    found = _EXPERIENCE.search(reply)
    if found is None:
        return None
    first_line = next((line for line in found.group(1).splitlines() if line.strip()), "")
    text = " ".join(first_line.split()).strip(" *`\"'")
    if not re.search(r"[A-Za-z]{2}", text) or _NO_LESSON.fullmatch(text):
        return None
    return text[:max_chars]
