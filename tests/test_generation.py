"""The `generation:` settings: one engine for every sampling stage of a study, checked before
anything runs; how vLLM replicas split the GPUs; what of the engine a stage's fingerprint records."""

from __future__ import annotations

import pytest

from leafe.backends.base import BackendError
from leafe.backends.replicas import replica_devices
from leafe.errors import LeafeError
from leafe.settings import GenerationSettings
from leafe.study.config import StudyConfig
from leafe.study.study import Study


def test_replicas_take_consecutive_gpu_groups_and_refuse_too_few():
    gpus = [str(i) for i in range(8)]
    assert replica_devices(4, 2, gpus) == ["0,1", "2,3", "4,5", "6,7"]
    assert replica_devices(2, 1, ["3", "5"]) == ["3", "5"]  # as CUDA_VISIBLE_DEVICES names them
    assert replica_devices(2, 1, []) == [None, None]  # no GPU: CPU engines
    with pytest.raises(BackendError, match="needs 8 GPUs, 4 are visible; lower generation.data_parallel_size"):
        replica_devices(4, 2, gpus[:4])


@pytest.mark.parametrize("settings, message", [
    (dict(backend="hf", tensor_parallel_size=2), "--tensor-parallel-size is for --backend vllm"),
    (dict(backend="openai"), "needs the server's address"),
    (dict(backend="vllm", base_urls=["http://x/v1"]), "--base-url is for --backend openai"),
    (dict(backend="vllm", gpu_memory_utilization=1.5), "--gpu-memory-utilization must be in"),
    (dict(backend="vllm", data_parallel_size=0), "--data-parallel-size must be >= 1"),
])
def test_bad_engine_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(LeafeError, match=message):
        GenerationSettings(**settings).validate()


def test_the_generation_section_is_every_sampling_stages_engine_and_its_fingerprint():
    assert StudyConfig(name="s", generation={"dtype": "float32"}).generation_settings().dtype == "float32"
    with pytest.raises(ValueError, match="dtype"):  # the engine's keys live in generation: only
        StudyConfig.model_validate({"name": "s", "dtype": "float32"})
    with pytest.raises(LeafeError, match="generation.tensor_size is not a setting"):
        StudyConfig(name="s", generation={"tensor_size": 2}).check()

    hf = {s.key: s for s in Study(StudyConfig(name="s"), "/nonexistent").stages()}
    vllm = {s.key: s for s in Study(StudyConfig(name="s", generation={"backend": "vllm", "tensor_parallel_size": 2}),
                                    "/nonexistent").stages()}
    assert hf["base.eval"].fingerprint["settings"]["engine"]["backend"] == "hf"
    assert vllm["base.eval"].fingerprint["settings"]["engine"]["tensor_parallel_size"] == 2
    # Sampling stages record the engine, GRPO too (its rollouts come from it since issue 26);
    # distillation trains on what exploration sampled, so it changes through its inputs.
    for key in ("leafe.explore", "ace.train", "early_experience.train", "grpo.eval", "grpo.train"):
        assert vllm[key].digest() != hf[key].digest(), key
    assert "engine" not in vllm["leafe.distill"].fingerprint["settings"]
