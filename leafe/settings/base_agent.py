"""The embedded base agent's build (`leafe bootstrap`): its synthetic corpus, size and training, and
the digest that names its cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

from leafe.errors import LeafeError
from leafe.fingerprint import fingerprint_fields
from leafe.rundir import RUN_FORMAT
from leafe.settings.base import _at_least, knob

#: Version of the example generator (`base_agent.synthetic`), part of every digest: a change to how
#: examples are drawn renames every cache, so no agent built from older data is reused under a new name.
#: 2: reflection fragments name a step 90% of the time (they said "none" two times in three).
GENERATOR = 2


@dataclass(frozen=True)
class BootstrapConfig:
    """The embedded base agent: its synthetic corpus, its size and its training."""

    seed: int = knob(0, "Seed of the data, tokenizer and weights.")
    # 16k moves and 1k reflections (was 10k / 3k): the compute the reflections took without teaching
    # their step moved to the moves (docs/experiment-log.md, "A loss weight on the decision token").
    fragments: int = knob(16000, "Short examples (a few moves each).")
    reflection_fragments: int = knob(1000, "Short reflection examples.")
    episodes: int = knob(500, "Whole-episode examples.")
    #: An experience after a whole attempt, as a rollout's branch shows it (docs/experiment-log.md, "the oracle reflector").
    experience_episodes: int = knob(0, "Whole-episode experience examples on top of --episodes.")
    max_steps: int = knob(15, "Step limit of the generated levels.")
    mistake_rate: float = knob(0.25, "Share of the expert's moves that are mistakes.")
    reflect_every: int = knob(5, "Reflection interval of the generated episodes.")
    vocab_size: int = knob(1024, "Tokenizer vocabulary.")
    #: pieces: a coordinate, a number and a chat role are one token each, every turn a fifth shorter; the
    #: agent built so played far worse (docs/experiment-log.md, "Fewer tokens and fewer key/value heads"), so cells stays.
    tokenizer: str = knob("cells", "Tokenizer style: cells (every digit and symbol its own token) or pieces "
                                   "(coordinates, numbers and chat roles merge).")
    hidden_size: int = knob(192, "Model width.")
    layers: int = knob(4, "Transformer layers.")
    heads: int = knob(3, "Attention heads.")
    #: Fewer than --heads: grouped-query attention, as Qwen and Llama use; on a CPU, reading the KV cache
    #: is most of a decoding step. 1 decoded faster but the agent played far worse (docs/experiment-log.md,
    #: "Fewer tokens and fewer key/value heads"), so 0 stays.
    kv_heads: int = knob(0, "Key/value heads (grouped-query attention); 0: as many as --heads.")
    intermediate_size: int = knob(512, "MLP width.")
    context: int = knob(3072, "Context length.")
    # 3e-3 kept this model on the uniform-policy plateau for hundreds of updates; 1e-3 leaves it at once.
    learning_rate: float = knob(1e-3, "Learning rate.", flags=("--learning-rate", "--lr"))
    #: 10 with plans: the first recipe whose agent reads the board (1.0: the agents built before it).
    decision_weight: float = knob(10.0, "Loss weight of each decision token (a move's direction; with --plans also "
                                        "the plan's digits) relative to the other reply tokens.")
    #: "push right from (2,1); at (3,1), go up." (see `oracle.thought`); False: the plain "go up.".
    plans: bool = knob(True, "Optimal moves say the plan they serve before the move.")
    batch_size: int = knob(32, "Most rows per batch.")
    max_batch_tokens: int = knob(4096, "Most padded tokens per batch.")
    save_every: int = knob(100, "Save a checkpoint a killed build resumes from every N optimiser steps (0: none).")

    #: A resumed build is the build never stopped, so the digest (the cache's name) leaves it out.
    speed_only: ClassVar[tuple[str, ...]] = ("save_every",)

    def validate(self) -> None:
        _at_least(self, 0, "save_every")
        if self.decision_weight <= 0:
            raise LeafeError(f"--decision-weight must be > 0 (got {self.decision_weight})")
        if self.tokenizer not in ("cells", "pieces"):
            raise LeafeError(f"--tokenizer must be pieces or cells (got {self.tokenizer!r})")
        if self.kv_heads < 0 or (self.kv_heads and self.heads % self.kv_heads):
            raise LeafeError(f"--kv-heads must divide --heads {self.heads} (got {self.kv_heads}); 0 means as many as --heads")

    def digest(self) -> str:
        """The name of the agent's cache: its fingerprint, the example generator and the run format
        (an agent cached by another format is built again, under another name)."""
        fields = fingerprint_fields(self)
        fields["generator"] = GENERATOR
        fields["format"] = RUN_FORMAT
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
