"""The method contract: every method (evaluate, explore, distill, grpo, early experience, ace,
bootstrap) is one function

    method(job: Job, settings, ...) -> MethodResult

`Job` says what it starts from and where it writes (its own directory, where a rerun resumes); the
settings dataclass (`leafe.settings`) says how. Progress goes to `job.progress` (a total, then
advances), and the result is one shape: the method, the model it produced or evaluated, its
settings, its data (Pass@k, tree counts, rows, a playbook) and its cost. The CLI and the study call
every method this way, so a backend, a launcher or a progress display is added once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from leafe.envs import EnvMaker, make
from leafe.tracking import Tracker

if TYPE_CHECKING:
    from leafe.backends.base import Backend


class Progress(Protocol):
    """Where a method reports how far it is: `start` once the total is known (and how much a resumed
    run had done), `advance` as items finish, with a short status."""

    def start(self, total: int | None, done: int = 0) -> None: ...

    def advance(self, n: int = 1, status: str = "") -> None: ...


class NoProgress:
    def start(self, total: int | None, done: int = 0) -> None:
        pass

    def advance(self, n: int = 1, status: str = "") -> None:
        pass


@dataclass
class Job:
    """What a method starts from and where it writes."""

    model: str  # the starting model (a directory; the embedded agent's bootstrap starts from none)
    out: Path  # the method's directory: its outputs, and what a rerun resumes from
    backend: Backend | None = None  # the sampling stages' engine; training methods load their own model
    envs: EnvMaker = make  # `make` in process, or a worker pool's (`leafe.scale.workers`)
    inputs: list[Path] = field(default_factory=list)  # files it reads (distillation: trees.jsonl)
    progress: Progress = field(default_factory=NoProgress)
    device: str = "auto"  # where a training method puts its model
    #: A training method's mixed precision (auto, bf16, no: a study's `training.mixed_precision`);
    #: None: what `accelerate launch` passed (ACCELERATE_MIXED_PRECISION), else auto.
    precision: str | None = None
    #: Shuts `backend` down (its engine, its GPU memory). A method that samples and then trains
    #: (Early Experience) calls `done_sampling()` between the two, so one model is resident at a time.
    release: Callable[[], None] | None = None
    #: Runs an SFT of rows on several processes: `train_sft(model_dir, rows, out, sft) -> summary` (a
    #: study's `training.processes > 1`, `leafe.scale.stage.sft_launcher`); None trains in this process.
    train_sft: Callable[..., dict[str, Any]] | None = None
    #: Where the method's figures go besides its files (`leafe.tracking`: the experiment trackers of
    #: `report_to`, under the stage's name); the default reports nothing.
    tracker: Tracker = field(default_factory=Tracker)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def done_sampling(self) -> None:
        """The method has sampled all it will: the engine can go before a model is loaded to train."""
        if self.release is not None:
            self.release()
        self.backend = None


@dataclass
class MethodResult:
    method: str  # eval, explore, distill, grpo, early_experience, ace, bootstrap
    model: str  # the model produced (training) or used (eval, explore; ACE: its starting model with a playbook)
    settings: dict[str, Any]
    data: dict[str, Any]  # what the method measured or made; each method documents its keys
    cost: dict[str, Any]  # env_steps, generated_tokens, wall_s (this run's share when it resumed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cost(env_steps: int = 0, generated_tokens: int = 0, wall_s: float = 0.0) -> dict[str, Any]:
    return {"env_steps": int(env_steps), "generated_tokens": int(generated_tokens), "wall_s": round(float(wall_s), 2)}


class Tally:
    """`solved a/b` as items finish: the status every sampling method reports."""

    def __init__(self, progress: Progress):
        self.progress, self.solved, self.seen = progress, 0, 0

    def __call__(self, success: bool) -> None:
        self.solved += bool(success)
        self.seen += 1
        self.progress.advance(status=f"solved {self.solved}/{self.seen}")
