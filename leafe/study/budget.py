"""What a study asks of the machine, worked out before anything runs: `leafe run --dry-run`'s resource
table, and `check`, which refuses a config that cannot fit (also at the start of a real run).

Arithmetic from the model's config.json and the stages' settings, no model library (a dry run stays
light). Memory per GPU: weights + KV cache (+ gradients, AdamW, GRPO's reference and activations where
a stage trains); tokens: upper bounds (every turn uses its whole limit); hours: at a stated throughput.
Estimates, not measurements: they catch a 72B on one 80 GB GPU, not a config 5% too tight.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leafe.envs import env_class
from leafe.errors import LeafeError
from leafe.methods.logprob_chunk import CHUNK
from leafe.study.config import EMBEDDED, StudyConfig
from leafe.study.shape import ModelShape, read_shape

if TYPE_CHECKING:
    from leafe.study.stages import StageGraph

GB = 1e9  # resources.gpu_memory_gb is read in decimal GB, as GPUs are sold (an "80 GB" GPU has a bit more)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # "auto" is bf16 on GPUs, for vLLM and hf alike
TURN_LIMITS = ("max_steps", "max_submissions")  # the env parameter that caps an episode's turns
DEFAULT_TURNS = 30  # an env that names no turn limit
PROMPT_TOKENS, OBSERVATION_TOKENS = 1024, 256  # allowances: only a run knows a prompt's and an observation's length
#: 16-bit activations of one transformer layer per token per unit of width, without recomputation
#: (Korthikanti et al. 2022, with fused attention); recomputed, only the layer inputs stay (2 bytes).
ACTIVATION_BYTES, CHECKPOINTED_BYTES = 34, 2
#: The head's output at scored positions only, in the training dtype (2 bytes in bf16), plus one fp32
#: chunk of log-softmax and its gradient (`leafe.methods.token_logprobs`).
HEAD_BYTES, CHUNK_BYTES = 2, 8
TRAIN_BYTES = {"weights": 4, "grads": 4, "adamw": 8}  # per parameter: fp32 master weights, gradients, AdamW
ASSUMED_PARAMS = 7e9  # the model size resources.tokens_per_s_per_gpu is stated for


@dataclass
class StageNeed:
    """One stage's hold on each GPU it uses (bytes), and what it generates."""

    key: str
    gpus: int
    weights: float = 0.0
    kv: float | None = 0.0  # None: vLLM takes what its share leaves, unknown without gpu_memory_gb
    optimizer: float = 0.0  # gradients, AdamW state and GRPO's reference
    reference: bool = False
    activations: float = 0.0
    tokens: int | None = None
    hours: float | None = None
    usable: float = 1.0  # share of a GPU the stage may take (vLLM: gpu_memory_utilization)
    minimum: float = 0.0  # below this a GPU cannot run it
    fix: str = ""
    note: str = ""

    @property
    def total(self) -> float:
        # Sampling and the backward pass come one after the other: their KV and activations never coexist.
        return self.weights + self.optimizer + max(self.kv or 0.0, self.activations)


@dataclass
class ResourceEstimate:
    stages: list[StageNeed]
    assumption: str
    checked: str  # what the GPU check did, or why it did not run
    refusal: str | None = None


def turn_limit(env: str, params: dict[str, Any]) -> int:
    """An episode's most turns: the env parameter that caps them, else the env's default, else DEFAULT_TURNS."""
    signature = inspect.signature(env_class(env).__init__).parameters
    for key in TURN_LIMITS:
        if key in params:
            return int(params[key])
        if key in signature and isinstance(signature[key].default, int):
            return signature[key].default
    return DEFAULT_TURNS


class _Estimator:
    def __init__(self, config: StudyConfig, shape: ModelShape | None, gpu_bytes: float | None):
        self.c, self.shape, self.gpu = config, shape, gpu_bytes
        self.gen = config.generation_settings()
        self.training_settings = config.training_settings()
        self.turns = max(turn_limit(config.env, config.env_params), turn_limit(config.env, config.eval_env_params()))
        self.gen_bytes = DTYPE_BYTES.get(self.gen.dtype, 2)

    def hours(self, tokens: int, gpus: int) -> float | None:
        if self.shape is not None:
            return tokens / (self.c.resources.tokens_per_s_per_gpu * ASSUMED_PARAMS / self.shape.params * gpus) / 3600

    def context(self, max_new_tokens: int) -> int:
        return PROMPT_TOKENS + self.turns * (max_new_tokens + OBSERVATION_TOKENS)

    def sampling(self, key: str, tokens: int, batch: int, max_new_tokens: int, batch_knob: str) -> StageNeed:
        """A stage on the configured engine: vLLM over tp x dp GPUs, or hf on one."""
        g, s = self.gen, self.shape
        need = StageNeed(key, g.gpus, tokens=tokens, hours=self.hours(tokens, g.gpus))
        if s is None:
            return need
        if g.backend == "openai":
            need.gpus, need.hours, need.note = 0, None, "served elsewhere (openai backend)"
            return need
        need.weights = s.params * self.gen_bytes / g.tensor_parallel_size
        if g.backend == "hf":
            seq = min(self.context(max_new_tokens), self.model_len())
            need.kv = batch * seq * s.kv_per_token(self.gen_bytes)
            need.minimum = need.total
            need.fix = (f"lower {batch_knob}" if need.weights < (self.gpu or 0) else
                        "use generation.backend: vllm with a larger generation.tensor_parallel_size")
            need.note = f"hf: {batch} episodes of <= {seq} tokens"
            return need
        per_seq = s.kv_per_token(self.gen_bytes, g.tensor_parallel_size) * self.model_len()
        need.usable, need.minimum = g.gpu_memory_utilization, need.weights + per_seq
        if self.gpu is not None:
            need.kv = max(0.0, g.gpu_memory_utilization * self.gpu - need.weights)
            need.note = f"KV holds {int(need.kv // per_seq)} sequences of {self.model_len()} tokens"
        else:
            need.kv, need.note = None, f"KV: the rest of {g.gpu_memory_utilization:.0%} of each GPU"
        too_big = need.weights > g.gpu_memory_utilization * (self.gpu or 0)
        need.fix = ("raise generation.tensor_parallel_size" if too_big else
                    "lower generation.max_model_len or raise generation.tensor_parallel_size")
        return need

    def model_len(self) -> int:
        length = self.gen.max_model_len or (self.shape.max_positions if self.shape else None)
        if length is None:
            raise LeafeError(f"{self.c.model}/config.json has no 'max_position_embeddings'; set generation.max_model_len")
        return length

    def training(self, key: str, reference: bool, batch_tokens: int, checkpointed: bool, lora: bool,
                 scored_share: float, batch_knob: str) -> StageNeed:
        """A training stage as `training:` runs it: fp32 master weights, gradients and AdamW split over
        the processes under fsdp/zero3 (whole on each under ddp); a frozen reference in bf16 (GPUs),
        split the same way; activations of one micro-batch of `batch_tokens`, of which
        `scored_share` reach the output head."""
        t, s = self.training_settings, self.shape
        split = t.processes if t.sharding != "ddp" else 1
        need = StageNeed(key, t.processes, reference=reference)
        if s is None:
            return need
        b = TRAIN_BYTES
        need.weights = s.params * b["weights"] / split
        need.optimizer = 0.0 if lora else s.params * (b["grads"] + b["adamw"]) / split
        if reference and not lora:  # LoRA's reference is the base with its adapters off: no copy
            need.optimizer += s.params * (2 if t.mixed_precision != "no" else 4) / split
        per_layer = CHECKPOINTED_BYTES if checkpointed else ACTIVATION_BYTES
        scored = batch_tokens * scored_share
        need.activations = (batch_tokens * s.layers * s.hidden * per_layer + scored * s.vocab * HEAD_BYTES
                            + min(scored, CHUNK) * s.vocab * CHUNK_BYTES)
        need.minimum = need.total
        layout = f"{t.processes} process(es), {t.sharding}" + (f" (state split {split} ways)" if split > 1 else "")
        need.note = f"{layout}: fp32 weights, grads, AdamW" + (", bf16 reference" if reference else "")
        static = need.weights + need.optimizer
        if self.gpu is not None and static >= self.gpu:
            whole = static * split
            processes = next((n for n in (2, 4, 8, 16, 32, 64, 128, 256) if whole / n < 0.7 * self.gpu), None)
            need.fix = (f"the training state alone is {static / GB:.0f} GB per GPU: set training.sharding: fsdp "
                        f"with training.processes: {processes}" if processes and processes > split else
                        "raise training.processes (sharded) or train LoRA adapters")
        else:
            need.fix = f"lower {batch_knob}" + ("" if checkpointed else f" or turn {batch_knob.rsplit('.', 1)[0]}"
                                                                       f".activation_checkpointing on")
        return need

    def agent_share(self, max_new_tokens: int) -> float:
        """The share of an episode's tokens that are the agent's own (GRPO's and SFT's loss tokens)."""
        return min(1.0, self.turns * max_new_tokens / self.context(max_new_tokens))

    def sft(self, key: str, sft: Any, max_new_tokens: int, knob: str) -> StageNeed:
        rows = min(self.context(max_new_tokens), self.model_len()) if self.shape else 0
        tokens = sft.max_batch_tokens or sft.batch_size * rows
        need = self.training(key, False, tokens, sft.activation_checkpointing, sft.lora,
                             self.agent_share(max_new_tokens), f"{knob}.max_batch_tokens")
        p = self.training_settings.processes
        need.note += (f"; a step: {sft.batch_size} rows x {p} processes x {sft.grad_accum} accumulation = "
                      f"{sft.batch_size * p * sft.grad_accum} rows, learning rate not rescaled")
        return need

    def grpo(self, key: str) -> StageNeed:
        """GRPO's update as `training`; its rollouts from the policy itself (hf: KV cache beside the
        training state) or from a vLLM engine per process, colocated, asleep during the update."""
        g, gen, t = self.c.grpo_settings(), self.gen, self.training_settings
        tokens = g.steps * g.tasks_per_step * g.group_size * self.turns * g.max_new_tokens
        need = self.training(key, g.kl_coef > 0, g.max_batch_tokens, g.activation_checkpointing, g.lora,
                             self.agent_share(g.max_new_tokens), "grpo.max_batch_tokens")
        need.tokens, need.hours = tokens, self.hours(tokens, t.processes)  # each process samples its share
        need.note += f"; a step: {g.tasks_per_step} tasks x {g.group_size} episodes over {t.processes} processes"
        if self.shape is None:
            return need
        if gen.backend == "vllm":
            engine = gen.gpu_memory_utilization * self.gpu if self.gpu is not None else None
            need.kv = engine
            need.note += f"; rollouts: a vLLM engine per process ({gen.gpu_memory_utilization:.0%} of its GPU)"
            static = need.weights + need.optimizer
            if self.gpu is not None and static < self.gpu < static + engine:  # else the training state is the problem
                room = (self.gpu - static) / self.gpu
                need.fix = (f"lower generation.gpu_memory_utilization to at most {max(room, 0.0):.2f}: GRPO's engine "
                            f"shares each GPU with the training state")
        else:
            seq = min(self.context(g.max_new_tokens), self.model_len())
            need.kv = g.tasks_per_step * g.group_size * seq * self.shape.kv_per_token(TRAIN_BYTES["weights"])
            if t.sharding != "ddp":  # a sharded policy cannot sample: each process holds a whole copy to sample from
                copy = 2 if t.mixed_precision != "no" else 4
                need.weights += self.shape.params * copy
                need.note += f"; rollouts: a whole {'bf16' if copy == 2 else 'fp32'} copy per process, synced in memory"
        need.minimum = need.total
        return need

    def stage(self, key: str) -> list[StageNeed]:
        c, turns = self.c, self.turns
        if key.endswith(".eval"):
            e = c.eval_settings()
            return [self.sampling(key, e.tasks * e.samples * turns * e.max_new_tokens, e.max_batch,
                                  e.max_new_tokens, "eval.max_batch")]
        if key == "grpo.train":
            return [self.grpo(key)]
        if key == "leafe.explore":
            x = c.explore_settings()
            reflections = 0 if x.strategy == "independent" else x.budget  # at most one per env step
            tokens = x.tasks * (x.budget * x.max_new_tokens + reflections * x.reflection_tokens)
            return [self.sampling(key, tokens, x.parallel_tasks * x.branch_samples, x.max_new_tokens,
                                  "leafe.explore.parallel_tasks")]
        if key == "leafe.distill":
            return [self.sft(key, c.distill_sft(), c.explore_settings().max_new_tokens, "leafe.sft")]
        if key == "early_experience.train":
            ee = c.early_experience_settings()
            per_state = ee.alternatives * ee.max_new_tokens + (ee.rationale_tokens if ee.variant == "sr" else 0)
            # two rows: the sampling, then the SFT (named after its config section)
            return [self.sampling(key, ee.tasks * turns * per_state, ee.states_per_call * ee.alternatives,
                                  ee.max_new_tokens, "early_experience.settings.states_per_call"),
                    self.sft("early_experience.sft", c.early_experience_sft(), ee.max_new_tokens,
                             "early_experience.sft")]
        if key == "ace.train":
            a = c.ace_settings()
            tokens = a.epochs * a.tasks * (turns * a.max_new_tokens + a.reflection_tokens)
            return [self.sampling(key, tokens, a.tasks_per_round, a.max_new_tokens, "ace.tasks_per_round")]
        return []  # bootstrap: the embedded agent, built on the CPU


def resources(config: StudyConfig, graph: StageGraph) -> ResourceEstimate:
    """Every stage's GPUs, memory per GPU, tokens and hours, and the refusal when it cannot fit."""
    r = config.resources
    shape = None if config.model == EMBEDDED else read_shape(graph.base_model())
    gpu = r.gpu_memory_gb * GB if r.gpu_memory_gb is not None and r.gpus else None
    estimator = _Estimator(config, shape, gpu)
    stages = [need for stage in graph.stages() for need in estimator.stage(stage.key)]
    assumption = (f"hours at {r.tokens_per_s_per_gpu:g} tokens/s per GPU for a 7B model (resources.tokens_per_s_per_gpu), "
                  f"scaled by 7B / model size, times the GPUs generating; tokens are upper bounds; a training "
                  f"stage's total counts the larger of its sampling KV and its activations (never held together)")
    if shape is None or not r.gpus:
        why = ("set resources.gpus and resources.gpu_memory_gb" if shape else
               "the embedded agent is tiny: memory negligible" if config.model == EMBEDDED else
               f"{graph.base_model()} has no config.json to size the model from")
        return ResourceEstimate(stages, assumption, f"not checked: {why}")
    checked = (f"checked against {r.gpus} GPUs of {r.gpu_memory_gb:g} GB" if gpu else
               f"GPU count checked ({r.gpus}); memory not checked: set resources.gpu_memory_gb")
    return ResourceEstimate(stages, assumption, checked, refusal(estimator, stages))


def refusal(estimator: _Estimator, stages: list[StageNeed]) -> str | None:
    """One line: the first stage that cannot fit, what it needs, what a GPU has, the knob to change."""
    g, gpus, gpu = estimator.gen, estimator.c.resources.gpus, estimator.gpu
    if g.backend == "vllm" and g.gpus > gpus:
        return (f"generation needs tensor_parallel_size x data_parallel_size = {g.gpus} GPUs but resources.gpus is "
                f"{gpus}: lower generation.data_parallel_size")
    if g.backend == "vllm" and estimator.shape.heads % g.tensor_parallel_size:
        return (f"generation.tensor_parallel_size ({g.tensor_parallel_size}) must divide the model's "
                f"{estimator.shape.heads} attention heads")
    if estimator.training_settings.processes > gpus:
        return (f"training.processes ({estimator.training_settings.processes}) is more than resources.gpus ({gpus}): "
                f"one process per GPU")
    short = [s for s in stages if gpu is not None and s.minimum > s.usable * gpu]
    if not short:
        return None
    s = short[0]
    has = f"{s.usable:.0%} of {gpu / GB:g} GB = {s.usable * gpu / GB:.1f} GB" if s.usable < 1 else f"{gpu / GB:g} GB"
    others = [x.key for x in short[1:4]] + ([f"{len(short) - 4} more"] if len(short) > 4 else [])
    also = f" (also short: {', '.join(others)})" if others else ""
    return f"{s.key} needs {s.minimum / GB:.1f} GB per GPU ({breakdown(s)}) but a GPU has {has}: {s.fix}{also}"


def breakdown(s: StageNeed) -> str:
    """The parts of `s.minimum`, in GB: a training stage counts the larger of its sampling KV and its
    activations, vLLM one whole sequence of KV cache."""
    kv = s.minimum - s.weights if s.usable < 1 else s.kv or 0.0
    peak = ("KV", kv) if kv >= s.activations else ("activations", s.activations)
    parts = [("weights", s.weights), ("grads+AdamW" + ("+reference" if s.reference else ""), s.optimizer), peak]
    return ", ".join(f"{name} {value / GB:.1f}" for name, value in parts if value)


def check(config: StudyConfig, graph: StageGraph) -> None:
    """Refuse, in one LeafeError line, a config whose stages cannot fit `resources:` (unset: no check).
    Both `leafe run` and `leafe run --dry-run` call it before any stage starts."""
    if config.resources.gpus is None or config.model == EMBEDDED:
        return
    if found := resources(config, graph).refusal:
        raise LeafeError(found)
