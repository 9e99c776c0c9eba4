"""Every knob of every stage, defined once: its name, type, default and help.

A settings dataclass per method; what every sampling stage shares (env, tasks, sampling) is one base,
`SamplingSettings`. The CLI builds its options from these fields (`leafe.cli.options`), the study
config maps its sections onto them (`leafe.study.config`), and fingerprints read them
(`leafe.fingerprint`), so a default or a help text changes here and nowhere else.

This module imports no torch: `leafe --help` and `leafe run --dry-run` read it without loading a model
library.

Two class-level declarations keep recorded work valid (see `leafe.fingerprint`):
- `speed_only`: fields that change speed or memory, never results;
- `added_later`: knobs newer than recorded runs, with the value those runs used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, field, replace
from typing import Any, ClassVar

from leafe.errors import LeafeError
from leafe.fingerprint import fingerprint_fields

STRATEGIES = ("leafe", "refine", "independent")
REFLECTORS = ("policy", "oracle")
VARIANTS = ("iwm", "sr")
BACKENDS = ("hf", "vllm", "openai")


def knob(default: Any = MISSING, help: str = "", *, factory: Any = None, flags: tuple[str, ...] = (),
         cli: bool = True) -> Any:
    """A settings field with its help text. `flags`: the CLI's option declarations when the field's
    dashed name is not the whole story (an alias kept for older command lines, a --x/--no-y pair);
    `cli=False`: set by the program or the study config, never on the command line."""
    metadata = {"help": help, "flags": flags, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _at_least(settings: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < minimum:
            raise LeafeError(f"--{name.replace('_', '-')} must be >= {minimum} (got {getattr(settings, name)})")


# -- what every sampling stage has ---------------------------------------------------------------

@dataclass
class SamplingSettings:
    """Which tasks of which env, and how replies are sampled: shared by every stage that samples."""

    env: str = knob("sokoban", "Environment: sokoban, code, scienceworld, textworld or alfworld.")
    env_params: dict[str, Any] = knob(factory=dict, help="Env parameter key=value (repeatable), e.g. max_steps=20.",
                                      flags=("--env-param",))
    tasks: int = knob(64, "Number of tasks (consecutive seeds).")
    task_seed: int = knob(5000, "Seed of the first task.")
    temperature: float = knob(1.0, "Sampling temperature (0: greedy).")
    top_p: float = knob(1.0, "Nucleus sampling: sample from the smallest set of tokens with this probability.")
    max_new_tokens: int = knob(64, "Token limit of one agent turn.")
    seed: int = knob(0, "Seed of sampling (and of training, where the stage trains).")
    date_string: str | None = knob(None, "The date a chat template that writes one renders (Llama 3.1), e.g. "
                                   "'26 Jul 2024'; default: the day it runs (`leafe run` pins one per run).")

    added_later: ClassVar[dict[str, Any]] = {"date_string": None}

    def validate(self) -> None:
        _at_least(self, 1, "tasks", "max_new_tokens")
        if self.temperature < 0:
            raise LeafeError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise LeafeError(f"--top-p must be in (0, 1] (got {self.top_p})")


# -- generation and workers: where a stage's model runs and where its envs run ---------------------

@dataclass
class GenerationSettings:
    """Which engine serves the model of a sampling stage, and how: the `generation:` section of a
    study config and the same options on `leafe eval/explore/train`.

    hf runs transformers in this process (one device); vllm runs vLLM's engine here, over
    `tensor_parallel_size` GPUs per replica and `data_parallel_size` replicas (each its own process
    and GPUs); openai sends requests to running servers. Which engine samples does not change which
    tasks run or how they are scored, but each draws its own random numbers: a stage's fingerprint
    records the engine (`leafe.study.plan`), so a run switched to another engine redoes its stages.
    """

    backend: str = knob("hf", "hf (transformers, in process), vllm (vLLM, in process) or openai (servers, "
                              "with --base-url).")
    # -- openai --
    base_urls: list[str] = knob(factory=list, help="openai backend: a server, e.g. http://127.0.0.1:8000/v1 "
                                "(repeatable: requests are spread over them, and a failing one is retried on the others).",
                                flags=("--base-url",))
    api_key_env: str = knob("OPENAI_API_KEY", "openai backend: the environment variable holding the API key (unset: none sent).")
    max_concurrency: int | None = knob(None, "openai backend: requests in flight at once (default: one per episode in flight).")
    request_timeout_s: float = knob(120.0, "openai backend: seconds one try of a request may take, from connecting "
                                    "to the answer's last byte.")
    request_retries: int = knob(4, "openai backend: tries after the first for a request that times out, is cut short, "
                                   "gets a 5xx/408/429 or a malformed answer (exponential backoff; Retry-After honoured).")
    # -- vllm --
    tensor_parallel_size: int = knob(1, "vllm backend: GPUs each replica shards the model over.")
    data_parallel_size: int = knob(1, "vllm backend: replicas of the model, each on its own GPUs (requests are spread over them).")
    gpu_memory_utilization: float = knob(0.9, "vllm backend: share of each GPU's memory vLLM may take (weights + KV cache).")
    max_model_len: int | None = knob(None, "vllm backend: context length to reserve KV cache for (default: the model's).")
    enable_prefix_caching: bool = knob(True, "vllm backend: reuse the KV cache of shared prefixes (the branches of a node share h_tau).",
                                       flags=("--prefix-caching/--no-prefix-caching",))
    enforce_eager: bool = knob(False, "vllm backend: no CUDA graphs (less memory, slower decoding).")
    kv_cache_gb: int = knob(2, "vllm backend on CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE).")
    # -- hf and vllm --
    device: str = knob("auto", "hf backend: auto, cpu, cuda, cuda:N.")
    dtype: str = knob("auto", "auto, float32, bfloat16 (CPU: autocast), float16.")
    trust_remote_code: bool = knob(False, "Allow a checkpoint's own Python code to run.",
                                   flags=("--trust-remote-code/--no-trust-remote-code",))
    gguf_file: str | None = knob(None, "hf backend: GGUF file name inside --model.")

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise LeafeError(f"--backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.backend == "openai" and not self.base_urls:
            raise LeafeError("the openai backend needs the server's address: --base-url http://HOST:PORT/v1")
        if self.base_urls and self.backend != "openai":
            raise LeafeError(f"--base-url is for --backend openai (got --backend {self.backend})")
        if self.gguf_file is not None and self.backend != "hf":
            raise LeafeError(f"--gguf-file is for --backend hf; give --backend {self.backend} a model directory")
        _at_least(self, 1, "tensor_parallel_size", "data_parallel_size", "kv_cache_gb")
        if self.max_concurrency is not None:
            _at_least(self, 1, "max_concurrency")
        if self.request_timeout_s <= 0:
            raise LeafeError(f"--request-timeout-s must be > 0 (got {self.request_timeout_s})")
        _at_least(self, 0, "request_retries")
        if self.max_model_len is not None:
            _at_least(self, 1, "max_model_len")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise LeafeError(f"--gpu-memory-utilization must be in (0, 1] (got {self.gpu_memory_utilization})")
        vllm_only = {"tensor_parallel_size": 1, "data_parallel_size": 1}
        for name, default in vllm_only.items():
            if getattr(self, name) != default and self.backend != "vllm":
                raise LeafeError(f"--{name.replace('_', '-')} is for --backend vllm (got --backend {self.backend})")

    @property
    def gpus(self) -> int:
        """GPUs the vllm backend takes: every replica's tensor-parallel group."""
        return self.tensor_parallel_size * self.data_parallel_size if self.backend == "vllm" else 1


SHARDINGS = ("ddp", "fsdp", "zero3")
PRECISIONS = ("auto", "bf16", "no")


@dataclass
class TrainingSettings:
    """How the training stages (GRPO, distillation, Early Experience's SFT) use the machine: the
    `training:` section of a study config.

    With more than one process, `leafe run` starts the stage under `accelerate launch` (one process
    per GPU; gloo on a CPU-only machine), after the sampling engine is shut down. The effective batch
    is the per-process batch x processes x accumulation; the learning rate is not rescaled.
    """

    processes: int = knob(1, "Training processes on this machine (one per GPU); > 1: under accelerate launch.")
    sharding: str = knob("ddp", "ddp (a full copy per process), fsdp (FSDP2: weights, gradients and AdamW "
                                "split over the processes) or zero3 (DeepSpeed ZeRO-3, the same split).")
    mixed_precision: str = knob("auto", "auto (bf16 on GPUs that support it, else fp32), bf16 or no; the "
                                        "master weights and AdamW state stay fp32.")
    #: Above this many parameters a study turns activation checkpointing on in every training stage
    #: that does not set it (recomputation costs about a third more compute, activations ~17x less).
    checkpointing_above: float = knob(1e9, "Parameters above which activation checkpointing is on by default.")
    machines: int = knob(1, "Machines the training stages span (each runs `processes` of them; docs/scaling.md).")
    machine_rank: int = knob(0, "This machine's rank: 0 runs the study, the others join its training stages.")
    main_address: str | None = knob(None, "Machine 0's address the ranks meet at (machines > 1).")
    main_port: int = knob(29500, "The port they meet at on machine 0 (machines > 1).")

    @property
    def world(self) -> int:
        """Training processes on all machines together."""
        return self.processes * self.machines

    def validate(self) -> None:
        _at_least(self, 1, "processes")
        _at_least(self, 1, "machines")
        if not 0 <= self.machine_rank < self.machines:
            raise LeafeError(f"training.machine_rank must be in [0, {self.machines - 1}] (got {self.machine_rank})")
        if self.machines > 1 and not self.main_address:
            raise LeafeError("training.machines > 1 needs training.main_address: machine 0's address, where the "
                             "ranks meet")
        if self.sharding not in SHARDINGS:
            raise LeafeError(f"training.sharding must be one of {', '.join(SHARDINGS)} (got {self.sharding!r})")
        if self.mixed_precision not in PRECISIONS:
            raise LeafeError(f"training.mixed_precision must be one of {', '.join(PRECISIONS)} "
                             f"(got {self.mixed_precision!r})")


@dataclass
class WorkerSettings:
    """Where the envs run: in this process, or on Ray actors."""

    workers: int = knob(0, "Run the envs on N Ray workers (0: in this process).")
    ray_address: str | None = knob(None, "Join this Ray cluster (e.g. ray://HEAD:10001 or auto); default: a local Ray.")

    def validate(self) -> None:
        _at_least(self, 0, "workers")


@dataclass
class TrackingSettings:
    """Which experiment trackers a run reports to (`leafe.tracking`): a study config's top-level
    `report_to`, and `--report-to` on the training commands. Never part of a fingerprint: where the
    figures are shown changes no result."""

    report_to: list[str] = knob(factory=list, help="Report to an experiment tracker: tensorboard, trackio, wandb "
                                "or mlflow (repeatable, or comma-separated); its files go in OUT/tracking.")

    def validate(self) -> None:
        from leafe.tracking import check_report_to

        self.report_to = check_report_to(self.report_to)


# -- the methods ---------------------------------------------------------------------------------

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
    #: A partial evaluation resumes whatever k is asked; one from before playbooks existed resumes too.
    resume_free: ClassVar[tuple[str, ...]] = ("ks",)
    resume_added_later: ClassVar[dict[str, Any]] = {"playbook": []}

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
    #: Runs recorded before `stop_on_success` existed stopped at the first success.
    added_later: ClassVar[dict[str, Any]] = {**SamplingSettings.added_later, "reflector": "policy",
                                             "stop_on_success": True}

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
class SFTSettings:
    """The supervised fine-tuning every SFT stage shares (distillation, Early Experience, bootstrap)."""

    learning_rate: float = knob(1e-5, "Learning rate.", flags=("--learning-rate", "--lr"))
    epochs: float = knob(2.0, "Passes over the rows.")
    max_steps: int = knob(-1, "Optimiser steps; > 0 overrides --epochs.")
    batch_size: int = knob(8, "Most rows in one batch.")
    #: Padding is what makes mixed lengths slow: SDPA on CPU builds a dense (B, H, L, L) mask.
    max_batch_tokens: int | None = knob(None, "Most padded tokens (rows x longest row) in one batch.")
    grad_accum: int = knob(1, "Batches per optimiser step.")
    warmup_ratio: float = knob(0.03, "Share of steps that warm the learning rate up.")
    scheduler: str = knob("cosine", "Learning-rate schedule (transformers' names).")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    max_grad_norm: float = knob(1.0, "Gradient clipping norm.")
    seed: int = knob(0, "Seed of batching and initialisation.")
    lora: bool = knob(False, "Train LoRA adapters (merged into the saved weights).")
    lora_r: int = knob(16, "LoRA rank.")
    lora_alpha: int = knob(32, "LoRA alpha.")
    lora_dropout: float = knob(0.0, "LoRA dropout.")
    logging_steps: int = knob(10, "Log every N optimiser steps.")
    # TRL turns activation checkpointing on by default; it saves memory on large models at ~30% more
    # compute, which small models on CPU do not need.
    activation_checkpointing: bool = knob(False, "Recompute activations in the backward pass (saves memory).")
    save_every: int = knob(100, "Save a checkpoint a killed run resumes from every N optimiser steps (0: none, a "
                                "killed run starts over).")
    extra: dict[str, Any] = knob(factory=dict, help="More TRL SFTConfig arguments.", cli=False)

    #: A resumed run ends with the weights and loss log of one never stopped (`leafe.methods.sft`).
    speed_only: ClassVar[tuple[str, ...]] = ("save_every",)

    def validate(self) -> None:
        _at_least(self, 0, "save_every")
        _at_least(self, 1, "logging_steps")


@dataclass
class GRPOSettings(SamplingSettings):
    """Multi-turn GRPO: G episodes per task, group-normalised advantages, clipped loss, k3 KL."""

    steps: int = knob(50, "Optimiser steps.")
    tasks_per_step: int = knob(8, "Tasks per step.")
    group_size: int = knob(8, "Episodes per task (G).")
    learning_rate: float = knob(1e-5, "Learning rate.", flags=("--learning-rate", "--lr"))
    kl_coef: float = knob(0.01, "Weight of the k3 KL to the starting model.")
    clip_eps: float = knob(0.2, "Ratio clip.")
    adv_eps: float = knob(1e-6, "Added to the group's std when normalising advantages.")
    invalid_penalty: float = knob(0.0, "Reward penalty per invalid action (0: off).")
    updates_per_batch: int = knob(1, "Optimiser steps per batch of episodes (1: on-policy).")
    max_batch_tokens: int = knob(16384, "Padded tokens per forward pass (micro-batch).")
    max_grad_norm: float = knob(1.0, "Gradient clipping norm.")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    save_every: int = knob(10, "Checkpoint every N steps (0: only the final model).")
    keep_checkpoints: int = knob(2, "Checkpoint models kept on disk (the training state: the newest only).")
    is_cap: float = knob(2.0, "Rollouts from another engine (vLLM): each agent token's policy-gradient term is "
                              "weighted by min(p_trainer / p_sampler, cap), truncated importance sampling (0: off).")
    activation_checkpointing: bool = knob(False, "Recompute activations in the backward pass (less memory, about "
                                                 "a third more compute).")
    lora: bool = knob(False, "Train LoRA adapters on every linear layer; the reference is the model with them "
                             "off (no copy). Saved merged, and the adapters in OUT/adapter.")
    lora_r: int = knob(16, "LoRA rank.")
    lora_alpha: int = knob(32, "LoRA alpha.")

    #: A rerun may train longer, checkpoint differently or batch differently and still resume.
    resume_free: ClassVar[tuple[str, ...]] = ("steps", "save_every", "keep_checkpoints", "max_batch_tokens")
    speed_only: ClassVar[tuple[str, ...]] = ("activation_checkpointing",)  # recomputes the same activations
    #: is_cap changes nothing when the trainer samples itself (p_sampler is p_trainer).
    added_later: ClassVar[dict[str, Any]] = {**SamplingSettings.added_later, "is_cap": 2.0, "lora": False,
                                             "lora_r": 16, "lora_alpha": 32}

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
        if self.learning_rate <= 0:
            raise LeafeError(f"--learning-rate must be > 0 (got {self.learning_rate})")
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

    added_later: ClassVar[dict[str, Any]] = {**SamplingSettings.added_later, "top_p": 1.0}

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

    added_later: ClassVar[dict[str, Any]] = {**SamplingSettings.added_later, "top_p": 1.0}
    resume_free: ClassVar[tuple[str, ...]] = ("epochs",)  # more passes continue the playbook

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "epochs", "tasks_per_round", "max_lessons", "reflection_tokens",
                  "bullets_per_reflection", "bullet_chars")
        if not 0 < self.similarity <= 1:
            raise LeafeError(f"--similarity must be in (0, 1] (got {self.similarity})")
        if self.reflect_temperature < 0:
            raise LeafeError(f"--reflect-temperature must be >= 0 (got {self.reflect_temperature})")


# -- the embedded base agent ---------------------------------------------------------------------

#: Knobs added after agents were built and cached, with the value that reproduces the older builds:
#: at that value a knob stays out of the digest (and out of a study's bootstrap stage), so an
#: existing cache directory keeps its name and an existing run directory stays done.
BOOTSTRAP_ADDED_LATER = {"decision_weight": 1.0, "plans": False, "experience_episodes": 0, "tokenizer": "cells",
                         "kv_heads": 0}

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
    #: is most of a decoding step. 1 decoded 1.8x faster and lost 12.5 points of Pass@1 (docs/experiment-log.md,
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

    added_later: ClassVar[dict[str, Any]] = BOOTSTRAP_ADDED_LATER
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
        fields = fingerprint_fields(self)
        fields["generator"] = GENERATOR
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
