"""The settings of each method's stages: evaluation, LEAFE's exploration and distillation, SFT,
GRPO, Early Experience and ACE, each a dataclass over the shared bases of `leafe.settings.base`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from leafe.errors import LeafeError
from leafe.settings.base import LoRASettings, OptimizerSettings, SamplingSettings, _at_least, knob

STRATEGIES = ("leafe", "refine", "independent")
REFLECTORS = ("policy", "oracle")
VARIANTS = ("iwm", "sr")


@dataclass
class EvalSettings(SamplingSettings):
    """Evaluation: n independent episodes per task -> Pass@k."""

    tasks: int = knob(50, "Number of held-out tasks (consecutive seeds).")
    task_seed: int = knob(1000, "Seed of the first held-out task.")
    samples: int = knob(16, "Independent episodes per task (n).")
    ks: list[int] | None = knob(None, "k values, e.g. 1,4,16 (default 1,2,4..n).", flags=("--k",))
    #: ACE lessons put in the system prompt (empty: the plain system prompt); `leafe eval --playbook`.
    playbook: list[str] = knob(factory=list, help="ACE lessons for the system prompt.", cli=False)
    #: Another value draws other random numbers (not another distribution), so a run resumes under any value.
    max_batch: int = knob(64, "Episodes advanced together per generate call (speed and memory only).",
                          flags=("--max-batch", "--batch-size"))

    speed_only: ClassVar[tuple[str, ...]] = ("max_batch",)
    #: A partial evaluation resumes whatever k is asked.
    resume_free: ClassVar[tuple[str, ...]] = ("ks",)

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "samples", "max_batch")
        for k in self.ks or []:
            if k < 1:
                raise LeafeError(f"every k must be >= 1 (got {k})")
            if k > self.samples:
                raise LeafeError(f"--samples must be >= max k (got {self.samples} < {k})")



@dataclass
class ExploreSettings(SamplingSettings):
    """LEAFE stage 1: exploration at a fixed env-step budget per task."""

    tasks: int = knob(20, "Number of tasks (consecutive seeds).")
    strategy: str = knob("leafe", "leafe (tree), refine (linear retries) or independent.")
    budget: int = knob(60, "Env steps the agent may take per task.")
    reflect_every: int = knob(5, "leafe: reflect every K steps an episode takes (a branch counts from its "
                                 "branch point), and on failure.")
    max_depth: int = knob(3, "leafe: deepest branch level.")
    max_branches: int = knob(8, "leafe: branches per task.")
    branch_samples: int = knob(2, "leafe: branches sampled per branching event, in one call.")
    reflection_tokens: int = knob(96, "Token limit of one reflection.")
    reflector: str = knob("policy", "policy (the method: the model reflects) or oracle (a diagnostic: the env's "
                                    "solver does; Sokoban).")
    snapshots: bool = knob(True, "Roll back by env snapshot (--no-snapshots: replay the action prefix).")
    #: Off is the paper's stage 1: a task's tree keeps growing after a success, so D_cf gets the
    #: branching events of the whole budget, not only those on the first winning path. On suits a
    #: comparison of strategies by success within the budget (docs/usage.md, `leafe explore`).
    stop_on_success: bool = knob(False, "End a task's search at its first success (off, the paper's: it "
                                        "explores until its budget is spent).")
    parallel_tasks: int = knob(16, "Tasks explored at once, batched together (speed only).")

    speed_only: ClassVar[tuple[str, ...]] = ("parallel_tasks",)

    def validate(self) -> None:
        from leafe.envs import env_class

        super().validate()
        if self.strategy not in STRATEGIES:
            raise LeafeError(f"unknown --strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.reflector not in REFLECTORS:
            raise LeafeError(f"unknown --reflector {self.reflector!r}; choose one of {', '.join(REFLECTORS)}")
        if self.reflector == "oracle" and not env_class(self.env).has_oracle_reflection:
            raise LeafeError(f"env {self.env!r} has no oracle to reflect with; use --reflector policy")
        _at_least(self, 1, "budget", "reflect_every", "max_branches", "branch_samples", "parallel_tasks",
                  "reflection_tokens")
        _at_least(self, 0, "max_depth")



@dataclass
class DistillSettings:
    """LEAFE stage 2: which rows are cut from the trees, and how the two losses mix."""

    beta: float = knob(1.0, "Weight of the rehearsal loss: L = L_cf + beta * L_reh.")
    reh_fraction: float = knob(0.2, "Share of successful episodes rehearsed.")
    cf_from: str = knob("successful", "Branches for D_cf: successful (went on to succeed) or all.")
    use_cf: bool = knob(True, "--no-cf leaves D_cf out (the L_reh-only ablation).", flags=("--cf/--no-cf",))
    seed: int = knob(0, "Seed of the rehearsal sample (and of training).")

    def validate(self) -> None:
        if self.beta < 0:
            raise LeafeError(f"--beta must be >= 0 (got {self.beta})")
        if not 0 <= self.reh_fraction <= 1:
            raise LeafeError(f"--reh-fraction must be in [0, 1] (got {self.reh_fraction})")
        if self.cf_from not in ("successful", "all"):
            raise LeafeError(f"--cf-from must be 'successful' or 'all' (got {self.cf_from!r})")


@dataclass
class SFTSettings(LoRASettings, OptimizerSettings):
    """The supervised fine-tuning every SFT stage shares (distillation, Early Experience, bootstrap)."""

    epochs: float = knob(2.0, "Passes over the rows.")
    max_steps: int = knob(-1, "Optimiser steps; > 0 overrides --epochs.")
    batch_size: int = knob(8, "Most rows in one batch.")
    #: Padding is what makes mixed lengths slow: SDPA on CPU builds a dense (B, H, L, L) mask.
    max_batch_tokens: int | None = knob(None, "Most padded tokens (rows x longest row) in one batch.")
    grad_accum: int = knob(1, "Batches per optimiser step.")
    warmup_ratio: float = knob(0.03, "Share of steps that warm the learning rate up.")
    scheduler: str = knob("cosine", "Learning-rate schedule (transformers' names).")
    seed: int = knob(0, "Seed of batching and initialisation.")
    lora_dropout: float = knob(0.0, "LoRA dropout.")
    logging_steps: int = knob(10, "Log every N optimiser steps.")
    save_every: int = knob(100, "Save a checkpoint a killed run resumes from every N optimiser steps (0: none, a "
                                "killed run starts over).")
    extra: dict[str, Any] = knob(factory=dict, help="More TRL SFTConfig arguments.", cli=False)

    #: A resumed run ends with the weights and loss log of one never stopped (`leafe.methods.sft`).
    speed_only: ClassVar[tuple[str, ...]] = ("save_every",)

    def validate(self) -> None:
        super().validate()
        _at_least(self, 0, "save_every")
        _at_least(self, 1, "logging_steps")


@dataclass
class GRPOSettings(LoRASettings, OptimizerSettings, SamplingSettings):
    """Multi-turn GRPO: G episodes per task, group-normalised advantages, clipped loss, k3 KL."""

    steps: int = knob(50, "Optimiser steps.")
    tasks_per_step: int = knob(8, "Tasks per step.")
    group_size: int = knob(8, "Episodes per task (G).")
    kl_coef: float = knob(0.01, "Weight of the k3 KL to the starting model.")
    clip_eps: float = knob(0.2, "Ratio clip.")
    adv_eps: float = knob(1e-6, "Added to the group's std when normalising advantages.")
    invalid_penalty: float = knob(0.0, "Reward penalty per invalid action (0: off).")
    updates_per_batch: int = knob(1, "Optimiser steps per batch of episodes (1: on-policy).")
    max_batch_tokens: int = knob(16384, "Padded tokens per forward pass (micro-batch).")
    save_every: int = knob(10, "Checkpoint every N steps (0: only the final model).")
    keep_checkpoints: int = knob(2, "Checkpoint models kept on disk (the training state: the newest only).")
    is_cap: float = knob(2.0, "Rollouts from another engine (vLLM): each agent token's policy-gradient term is "
                              "weighted by min(p_trainer / p_sampler, cap), truncated importance sampling (0: off).")

    #: A rerun may train longer, checkpoint differently or batch differently and still resume.
    resume_free: ClassVar[tuple[str, ...]] = ("steps", "save_every", "keep_checkpoints", "max_batch_tokens")
    speed_only: ClassVar[tuple[str, ...]] = ("activation_checkpointing",)  # recomputes the same activations

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "steps", "tasks_per_step", "updates_per_batch", "max_batch_tokens")
        if self.group_size < 2:
            raise LeafeError(f"--group-size must be >= 2: advantages compare episodes of one task (got {self.group_size})")
        # the trainer's log-probs are softmax(logits / temperature), the distribution the sampler drew from
        if self.temperature <= 0:
            raise LeafeError(f"--temperature must be > 0 for GRPO: its log-probs are of logits / temperature, and "
                             f"greedy groups have no variance to learn from (got {self.temperature})")
        if self.top_p != 1:
            raise LeafeError(f"--top-p must be 1 for GRPO: the trainer's log-probs are a full softmax, which nucleus "
                             f"sampling's truncated distribution is not (got {self.top_p})")
        if self.tasks_per_step > self.tasks:
            raise LeafeError(f"--tasks-per-step ({self.tasks_per_step}) cannot exceed --tasks ({self.tasks})")
        if self.kl_coef < 0 or self.clip_eps <= 0 or self.invalid_penalty < 0:
            raise LeafeError("--kl-coef and --invalid-penalty must be >= 0 and --clip-eps > 0")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise LeafeError("--save-every must be >= 0 and --keep-checkpoints >= 1")
        if self.is_cap != 0 and self.is_cap < 1:
            raise LeafeError(f"--is-cap must be >= 1 (a cap below 1 shrinks every token's weight) or 0 for off "
                             f"(got {self.is_cap})")



#: K, the alternatives at each expert state, where Early Experience's App. B gives one; they are drawn
#: from the env's admissible actions there. Other envs default to `EE_DEFAULT_ALTERNATIVES` policy samples.
EE_ALTERNATIVES = {"alfworld": 8, "scienceworld": 3}
EE_DEFAULT_ALTERNATIVES = 3


@dataclass
class EarlyExperienceSettings(SamplingSettings):
    """Early Experience: the expert's states, K alternative actions at each, and what they led to."""

    variant: str = knob("iwm", "iwm (implicit world model) or sr (self-reflection).")
    alternatives: int | None = knob(None, "Alternative actions at each expert state (K): distinct admissible actions "
                                          "where the env lists them, else distinct policy samples. Default: EE's App. B "
                                          "for the env (alfworld 8, scienceworld 3), else 3.")
    iwm_epochs: float = knob(1.0, "iwm: epochs over the world-model rows, taken out of the SFT's --epochs (the rest "
                                  "imitate the expert), as EE runs one world-modelling epoch within the imitation budget.")
    rationale_tokens: int = knob(64, "sr: token limit of one rationale (at most --max-new-tokens).")
    states_per_call: int = knob(64, "Expert states whose alternatives are sampled in one generate call.")

    def __post_init__(self) -> None:
        # K resolved here, once, so every reader (the sampler, the planner's budget, fingerprints) sees the number.
        if self.alternatives is None:
            self.alternatives = EE_ALTERNATIVES.get(self.env, EE_DEFAULT_ALTERNATIVES)

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise LeafeError(f"--variant must be one of {', '.join(VARIANTS)} (got {self.variant!r})")
        _at_least(self, 1, "alternatives", "states_per_call", "rationale_tokens")
        if not self.iwm_epochs > 0:
            raise LeafeError(f"--iwm-epochs must be > 0 (got {self.iwm_epochs})")
        # A rationale is the reply the trained agent learns to write: one longer than an agent turn is cut
        # when the agent is evaluated, so its action line is never reached.
        if self.variant == "sr" and self.rationale_tokens > self.max_new_tokens:
            raise LeafeError(f"--rationale-tokens ({self.rationale_tokens}) must be <= --max-new-tokens "
                             f"({self.max_new_tokens}): the agent is evaluated with replies cut at --max-new-tokens; "
                             f"lower --rationale-tokens or raise --max-new-tokens")

    def sft_stages(self, sft: SFTSettings) -> tuple[SFTSettings | None, SFTSettings]:
        """The SFT of the world model (None for sr) and of what follows it. EE runs one world-modelling
        epoch within the imitation budget (App. B): `iwm_epochs` of `sft.epochs` train the IWM rows and
        the rest imitate the expert (the default 2 = 1 + 1). A step count set by hand (`sft.max_steps`
        > 0, for short runs) is each training's own, as it is for any SFT."""
        if self.variant != "iwm":
            return None, sft
        if sft.max_steps > 0:
            return sft, sft
        if sft.epochs <= self.iwm_epochs:
            raise LeafeError(f"Early Experience: iwm_epochs ({self.iwm_epochs:g}) must be < the SFT's epochs ({sft.epochs:g}), "
                             "the budget it is taken from (the rest imitates the expert); raise epochs or lower iwm_epochs")
        return replace(sft, epochs=self.iwm_epochs), replace(sft, epochs=sft.epochs - self.iwm_epochs)


@dataclass
class ACESettings(SamplingSettings):
    """ACE: a playbook of bullets curated from the policy's own play, put in its system prompt
    (`leafe.methods.ace`; docs/usage.md says which source each default follows)."""

    epochs: int = knob(1, "Passes over the training tasks.")
    tasks_per_round: int = knob(16, "Tasks played between curations.")
    #: 100: the LEAFE paper's account of ACE's official implementation.
    max_lessons: int = knob(100, "Playbook cap in bullets: over it, those with the lowest helpful - harmful go "
                                 "(ties: the fewer proposals, then the older).")
    #: 1: ACE's embedding dedup is off by default (ace-agent/ace, use_bulletpoint_analyzer); only a
    #: bullet with the very words of one in the playbook merges into it.
    similarity: float = knob(1.0, "Word overlap (Jaccard) at which a new bullet is a duplicate of one in the "
                                  "playbook (1: the same words only).")
    reflection_tokens: int = knob(512, "Token limit of one reflection (its tags and new bullets).")
    reflect_temperature: float = knob(0.0, "Sampling temperature of the reflector (ACE's: 0, greedy).")
    bullets_per_reflection: int = knob(3, "New bullets one reflection may add (the rest are dropped, counted).")
    bullet_chars: int = knob(1000, "Characters kept of one bullet.")
    #: On: ace-agent/ace's line `[id] helpful=h harmful=x :: text`; off: ace-appworld's `[id] text`.
    bullet_counters: bool = knob(True, "Show the generator each bullet's helpful/harmful counters (off: its id "
                                       "and text only, fewer prompt tokens a bullet).")

    resume_free: ClassVar[tuple[str, ...]] = ("epochs",)  # more passes continue the playbook

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "epochs", "tasks_per_round", "max_lessons", "reflection_tokens",
                  "bullets_per_reflection", "bullet_chars")
        if not 0 < self.similarity <= 1:
            raise LeafeError(f"--similarity must be in (0, 1] (got {self.similarity})")
        if self.reflect_temperature < 0:
            raise LeafeError(f"--reflect-temperature must be >= 0 (got {self.reflect_temperature})")
