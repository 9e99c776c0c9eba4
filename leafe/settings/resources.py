"""Where a stage runs and where it reports, apart from what it computes: the engine that serves a
sampling stage's model (`GenerationSettings`), the processes and machines of the training stages
(`TrainingSettings`), the workers the envs run on (`WorkerSettings`) and the experiment trackers
(`TrackingSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from leafe.errors import LeafeError
from leafe.settings.base import _at_least, knob

BACKENDS = ("hf", "vllm", "openai")


@dataclass
class GenerationSettings:
    """Which engine serves the model of a sampling stage, and how: the `generation:` section of a
    study config and the same options on `leafe eval/explore/train`.

    hf runs transformers in this process (one device); vllm runs vLLM's engine here, over
    `tensor_parallel_size` GPUs per replica and `data_parallel_size` replicas (each its own process
    and GPUs); openai sends requests to running servers. Which engine samples does not change which
    tasks run or how they are scored, but each draws its own random numbers: a stage's fingerprint
    records the engine (`leafe.study.stages`), so a run switched to another engine redoes its stages.
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
    #: that does not set it (recomputation costs about a third more compute and keeps a small fraction of
    #: the activations).
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
