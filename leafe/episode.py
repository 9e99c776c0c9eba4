"""The record of an episode: exact token ids, where each agent turn sits in them, and env feedback.

An `Episode` is what every later stage consumes: distillation cuts (h_t, a_t) rows out of
`token_ids` using the step spans, GRPO recomputes log-probs on exactly those ids, rollback replays
`actions` and checks `observation_hashes`. Text fields are for people and reports; training never
re-encodes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Step:
    """One agent turn t: the reply a_t to history h_t, and what the env answered."""

    index: int
    #: len(token_ids) of h_t: the history before the generation prompt of this turn.
    context_len: int
    #: [start, end) of the generated ids of a_t in the episode's token_ids.
    action_start: int
    action_end: int
    reply: str
    action: str
    finish_reason: str
    observation: str
    observation_hash: str
    reward: float
    done: bool
    success: bool
    info: dict[str, Any] = field(default_factory=dict)
    #: The sampling engine's log-prob of each id of a_t, when asked (`Completion.logprobs`); None
    #: (JSON null) for an id the engine reported none for.
    logprobs: list[float | None] | None = None


@dataclass
class Episode:
    task_id: str
    env: str
    token_ids: list[int]
    first_observation: str
    first_observation_hash: str
    steps: list[Step] = field(default_factory=list)
    success: bool = False
    #: Why it ended: "success", "done" (the env ended it), "context" (no room for another turn),
    #: "fault" (the env's machinery failed a step: no outcome, never scored; `leafe.rollout`).
    finish: str = ""
    wall_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def actions(self) -> list[str]:
        return [s.action for s in self.steps]

    @property
    def observation_hashes(self) -> list[str]:
        return [self.first_observation_hash] + [s.observation_hash for s in self.steps]

    @property
    def generated_tokens(self) -> int:
        return sum(s.action_end - s.action_start for s in self.steps)

    @property
    def reward(self) -> float:
        return sum(s.reward for s in self.steps)

    def loss_mask(self) -> list[int]:
        """1 on the ids the agent generated, 0 everywhere else."""
        mask = [0] * len(self.token_ids)
        for s in self.steps:
            mask[s.action_start : s.action_end] = [1] * (s.action_end - s.action_start)
        return mask

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Episode:
        data = dict(data)
        data["steps"] = [Step(**s) for s in data.get("steps", [])]
        return cls(**data)
