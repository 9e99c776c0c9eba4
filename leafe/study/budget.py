"""What a study asks of the machine, worked out before anything runs: `leafe run --dry-run`'s resource
table, and `check`, which refuses a config that cannot fit (also at the start of a real run).

Arithmetic from the model's config.json and the stages' settings, no model library (a dry run stays
light). Memory per GPU: weights + KV cache (+ gradients, AdamW, GRPO's reference and activations where
a stage trains); tokens: upper bounds (every turn uses its whole limit); hours: at a stated throughput.
Estimates, not measurements: they catch a 72B on one 80 GB GPU, not a config 5% too tight.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leafe.envs import env_class
from leafe.errors import LeafeError
from leafe.study.config import EMBEDDED, StudyConfig

if TYPE_CHECKING:
    from leafe.study.plan import Study

GB = 1e9  # resources.gpu_memory_gb is read in decimal GB, as GPUs are sold (an "80 GB" GPU has a bit more)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # "auto" is bf16 on GPUs, for vLLM and hf alike
GATED_MLP = ("llama", "mistral", "qwen2", "qwen3")  # gate, up and down projections: three matrices
TURN_LIMITS = ("max_steps", "max_submissions")  # the env parameter that caps an episode's turns
DEFAULT_TURNS = 30  # an env that names no turn limit
PROMPT_TOKENS, OBSERVATION_TOKENS = 1024, 256  # allowances: only a run knows a prompt's and an observation's length
#: 16-bit activations of one transformer layer per token per unit of width, without recomputation
#: (Korthikanti et al. 2022, with fused attention); recomputed, only the layer inputs stay (2 bytes).
ACTIVATION_BYTES, CHECKPOINTED_BYTES = 34, 2
LOGIT_BYTES = 4  # fp32 logits per token per vocabulary entry (the loss reads log-softmax)
TRAIN_BYTES = {"weights": 4, "grads": 4, "adamw": 8, "reference": 4}  # per parameter, fp32, as trained today
ASSUMED_PARAMS = 7e9  # the model size resources.tokens_per_s_per_gpu is stated for


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    vocab: int
    kv_heads: int
    heads: int
    head_dim: int
    max_positions: int | None

    def kv_per_token(self, dtype_bytes: int, tp: int = 1) -> float:
        """KV bytes of one token on one GPU: keys and values of every layer; tensor parallelism splits
        the KV heads (a GPU keeps at least one)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes / min(tp, self.kv_heads)


def read_shape(model_dir: Path) -> ModelShape | None:
    """The shape from `model_dir/config.json`; None when there is none (nothing to plan with)."""
    path = model_dir / "config.json"
    if not path.exists():
        return None
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LeafeError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None

    def need(key: str) -> int:
        if not isinstance(c.get(key), int):
            raise LeafeError(f"{path} has no integer {key!r}: cannot size the model")
        return c[key]

    hidden, layers, heads, inter, vocab = (need(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                            "intermediate_size", "vocab_size"))
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    bias = q + 2 * kv if c.get("attention_bias", c.get("model_type") == "qwen2") else 0  # Qwen2 always has q/k/v biases
    attention = 2 * hidden * q + 2 * hidden * kv + bias
    mlp = (3 if c.get("model_type") in GATED_MLP else 2) * hidden * inter
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    params = embeddings + layers * (attention + mlp + 2 * hidden) + hidden
    return ModelShape(params, layers, hidden, vocab, kv_heads, heads, head_dim, c.get("max_position_embeddings"))


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
class ResourcePlan:
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


class _Planner:
    def __init__(self, config: StudyConfig, shape: ModelShape | None, gpu_bytes: float | None):
        self.c, self.shape, self.gpu = config, shape, gpu_bytes
        self.gen = config.generation_settings()
        self.turns = turn_limit(config.env, config.env_params)
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
                 batch_knob: str) -> StageNeed:
        """A training stage as the code runs it today: the whole fp32 model and AdamW on one device."""
        need = StageNeed(key, 1, reference=reference)
        s = self.shape
        if s is None:
            return need
        need.note = "1 GPU, unsharded: fp32 weights, grads, AdamW" + (", reference" if reference else "")
        b = TRAIN_BYTES
        need.weights = s.params * b["weights"]
        need.optimizer = s.params * ((0 if lora else b["grads"] + b["adamw"]) + (b["reference"] if reference else 0))
        per_layer = CHECKPOINTED_BYTES if checkpointed else ACTIVATION_BYTES
        need.activations = batch_tokens * (s.layers * s.hidden * per_layer + s.vocab * LOGIT_BYTES)
        need.minimum = need.total
        static = need.weights + need.optimizer
        need.fix = (f"lower {batch_knob}" if self.gpu is not None and static < self.gpu else
                    f"training is not sharded yet: the fp32 model, its gradients and AdamW state"
                    f"{' and the reference' if reference else ''} sit on one GPU ({static / s.params:.0f} bytes a "
                    f"parameter); use a smaller model until sharded training lands")
        return need

    def sft(self, key: str, sft: Any, max_new_tokens: int, knob: str) -> StageNeed:
        rows = min(self.context(max_new_tokens), self.model_len()) if self.shape else 0
        tokens = sft.max_batch_tokens or sft.batch_size * rows
        knob = f"{knob}.max_batch_tokens" + ("" if sft.activation_checkpointing else
                                             f" or set {knob}.activation_checkpointing: true")
        return self.training(key, False, tokens, sft.activation_checkpointing, sft.lora, knob)

    def grpo(self, key: str) -> StageNeed:
        g = self.c.grpo_settings()
        tokens = g.steps * g.tasks_per_step * g.group_size * self.turns * g.max_new_tokens
        need = self.training(key, g.kl_coef > 0, g.max_batch_tokens, False, False, "grpo.max_batch_tokens")
        need.tokens, need.hours = tokens, self.hours(tokens, 1)  # it samples with the policy it trains, on its GPU
        if self.shape is not None:
            seq = min(self.context(g.max_new_tokens), self.model_len())
            need.kv = g.tasks_per_step * g.group_size * seq * self.shape.kv_per_token(TRAIN_BYTES["weights"])
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
            return [self.sampling(f"{key} (sampling)", ee.tasks * turns * per_state, ee.states_per_call * ee.alternatives,
                                  ee.max_new_tokens, "early_experience.settings.states_per_call"),
                    self.sft(f"{key} (SFT)", c.early_experience_sft(), ee.max_new_tokens, "early_experience.sft")]
        if key == "ace.train":
            a = c.ace_settings()
            tokens = a.epochs * a.tasks * (turns * a.max_new_tokens + a.reflection_tokens)
            return [self.sampling(key, tokens, a.tasks_per_round, a.max_new_tokens, "ace.tasks_per_round")]
        return []  # bootstrap: the embedded agent, built on the CPU


def plan(config: StudyConfig, study: Study) -> ResourcePlan:
    """Every stage's GPUs, memory per GPU, tokens and hours, and the refusal when it cannot fit."""
    r = config.resources
    shape = None if config.model == EMBEDDED else read_shape(study.base_model())
    gpu = r.gpu_memory_gb * GB if r.gpu_memory_gb is not None and r.gpus else None
    planner = _Planner(config, shape, gpu)
    stages = [need for stage in study.plan() for need in planner.stage(stage.key)]
    assumption = (f"hours at {r.tokens_per_s_per_gpu:g} tokens/s per GPU for a 7B model (resources.tokens_per_s_per_gpu), "
                  f"scaled by 7B / model size, times the GPUs generating; tokens are upper bounds; a training "
                  f"stage's total counts the larger of its sampling KV and its activations (never held together)")
    if shape is None or not r.gpus:
        why = ("set resources.gpus and resources.gpu_memory_gb" if shape else
               "the embedded agent is tiny: memory negligible" if config.model == EMBEDDED else
               f"{study.base_model()} has no config.json to size the model from")
        return ResourcePlan(stages, assumption, f"not checked: {why}")
    checked = (f"checked against {r.gpus} GPUs of {r.gpu_memory_gb:g} GB" if gpu else
               f"GPU count checked ({r.gpus}); memory not checked: set resources.gpu_memory_gb")
    return ResourcePlan(stages, assumption, checked, refusal(planner, stages))


def refusal(planner: _Planner, stages: list[StageNeed]) -> str | None:
    """One line: the first stage that cannot fit, what it needs, what a GPU has, the knob to change."""
    g, gpus, gpu = planner.gen, planner.c.resources.gpus, planner.gpu
    if g.backend == "vllm" and g.gpus > gpus:
        return (f"generation needs tensor_parallel_size x data_parallel_size = {g.gpus} GPUs but resources.gpus is "
                f"{gpus}: lower generation.data_parallel_size")
    if g.backend == "vllm" and planner.shape.heads % g.tensor_parallel_size:
        return (f"generation.tensor_parallel_size ({g.tensor_parallel_size}) must divide the model's "
                f"{planner.shape.heads} attention heads")
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


def check(config: StudyConfig, study: Study) -> None:
    """Refuse, in one LeafeError line, a config whose stages cannot fit `resources:` (unset: no check).
    Both `leafe run` and `leafe run --dry-run` call it before any stage starts."""
    if config.resources.gpus is None or config.model == EMBEDDED:
        return
    if found := plan(config, study).refusal:
        raise LeafeError(found)
