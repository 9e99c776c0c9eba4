"""The resource planner of `leafe run --dry-run`: model sizes from config.json, memory and tokens per
stage, and the one-line refusal of a config that cannot fit, before any stage runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SHARED_DATA
from typer.testing import CliRunner

import leafe.cli.run  # noqa: F401  (registers `leafe run` on the app)
from leafe.cli import app
from leafe.errors import LeafeError
from leafe.study import budget
from leafe.study.config import load_config
from leafe.study.study import Study

ROOT = Path(__file__).resolve().parent.parent
QWEN7B_CONFIG = ROOT / "leafe" / "configs" / "sokoban-qwen2.5-7b.yaml"
ALFWORLD_CONFIG = ROOT / "leafe" / "configs" / "alfworld-qwen2.5-7b.yaml"
#: name -> (hidden, layers, heads, kv heads, intermediate, vocab, max positions, model_type), tied: no.
SHAPES = {
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, 32768, "qwen2"),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256, 131072, "llama"),
    "qwen2.5-72b": (8192, 80, 64, 8, 29568, 152064, 32768, "qwen2"),
}


def model_dir(tmp_path: Path, name: str) -> Path:
    """A model directory with only the config.json of `name` (the planner reads nothing else)."""
    hidden, layers, heads, kv_heads, inter, vocab, positions, model_type = SHAPES[name]
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": inter, "vocab_size": vocab,
        "tie_word_embeddings": False, "max_position_embeddings": positions, "torch_dtype": "bfloat16"}))
    return path


def run(*args) -> object:
    return CliRunner().invoke(app, ["run", *map(str, args)])


def plan_of(tmp_path: Path, name: str, *overrides: str) -> budget.ResourceEstimate:
    config = load_config(QWEN7B_CONFIG, list(overrides)).model_copy(update={"model": str(model_dir(tmp_path, name))})
    return budget.resources(config, Study(config, tmp_path / "run"))


@pytest.mark.parametrize("name, params", [("qwen2.5-7b", 7.62e9), ("llama-3.1-8b", 8.03e9), ("qwen2.5-72b", 72.7e9)])
def test_parameter_counts_from_config_json_match_the_published_sizes(tmp_path, name, params):
    shape = budget.read_shape(model_dir(tmp_path, name))
    assert abs(shape.params - params) / params < 0.02, shape.params


def test_kv_cache_per_token_is_keys_and_values_of_every_layer(tmp_path):
    shape = budget.read_shape(model_dir(tmp_path, "qwen2.5-7b"))
    assert shape.kv_per_token(2) == 2 * 28 * 4 * 128 * 2
    assert shape.kv_per_token(2, tp=4) == shape.kv_per_token(2) / 4  # tensor parallelism splits the KV heads


def test_a_missing_key_names_the_file_and_the_key(tmp_path):
    path = model_dir(tmp_path, "qwen2.5-7b")
    data = json.loads((path / "config.json").read_text())
    del data["intermediate_size"]
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(LeafeError, match=r"config\.json has no integer 'intermediate_size'"):
        budget.read_shape(path)


def test_the_7b_config_generates_on_all_8_gpus_and_states_memory_per_stage(tmp_path):
    plan = plan_of(tmp_path, "qwen2.5-7b")
    sampling = [s for s in plan.stages if s.key.endswith(".eval") or s.key in ("leafe.explore", "ace.train")]
    assert sampling and all(s.gpus == 8 for s in sampling)  # tp 1 x dp 8
    eval_ = next(s for s in plan.stages if s.key == "base.eval")
    assert eval_.weights == pytest.approx(7.62e9 * 2, rel=0.02)  # bf16 weights on every replica
    assert eval_.total == pytest.approx(0.7 * 80e9)  # vLLM takes its share: the rest is KV cache
    assert eval_.tokens == 100 * 128 * 15 * 512 and eval_.hours > 0  # tasks x samples x turns x tokens, at most
    grpo = next(s for s in plan.stages if s.key == "grpo.train")
    # FSDP over the 8 training processes: fp32 weights, gradients and AdamW split 8 ways, bf16 reference too
    assert grpo.gpus == 8 and grpo.weights == pytest.approx(7.62e9 * 4 / 8, rel=0.02)
    assert grpo.optimizer == pytest.approx(7.62e9 * (4 + 8 + 2) / 8, rel=0.02)
    assert grpo.kv == pytest.approx(0.7 * 80e9)  # its colocated vLLM engine's share, beside the training state
    assert all(s.total > 0 for s in plan.stages)
    assert all(s.total <= 80e9 for s in plan.stages)
    assert "2500 tokens/s per GPU" in plan.assumption
    assert plan.refusal is None


def test_the_7b_dry_run_plans_every_stage_within_80gb_and_prints_the_figures(tmp_path):
    result = run(QWEN7B_CONFIG, "--model", model_dir(tmp_path, "qwen2.5-7b"), "--dry-run", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "stage plan of" in result.stdout and "resources, GB per GPU (checked against 8 GPUs of 80 GB)" in result.stdout
    table = result.stdout.split("resources, GB per GPU")[1]
    assert "ace.eval" in table  # every stage planned
    grpo = next(line.split() for line in table.splitlines() if line.strip().startswith("grpo.train"))
    assert grpo[1:8] == ["8", "3.8", "56.0", "13.3", "30.3", "73.1", "1.5e8"]  # the figures, one column each
    assert max(len(line) for line in table.splitlines()) <= 80  # the figures keep their columns in 80 columns
    assert not (tmp_path / "run").exists()


def test_the_alfworld_7b_config_trains_on_train_evaluates_on_valid_unseen_and_plans_within_80gb(tmp_path, monkeypatch):
    # The dry run checks that the games are there: the real ones, beside the checkout.
    if not (SHARED_DATA / "alfworld").is_dir():
        pytest.skip(f"ALFWorld's games are not at {SHARED_DATA / 'alfworld'}")
    monkeypatch.setenv("ALFWORLD_DATA", str(SHARED_DATA / "alfworld"))
    result = run(ALFWORLD_CONFIG, "--model", model_dir(tmp_path, "qwen2.5-7b"), "--dry-run", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "resources, GB per GPU (checked against 8 GPUs of 80 GB)" in result.stdout and "ace.eval" in result.stdout
    assert not (tmp_path / "run").exists()
    config = load_config(ALFWORLD_CONFIG).model_copy(update={"model": str(model_dir(tmp_path, "qwen2.5-7b"))})
    evaluation = config.eval_settings()
    assert evaluation.env_params["split"] == "valid_unseen" and (evaluation.tasks, evaluation.samples) == (134, 128)
    for settings in (config.grpo_settings(), config.explore_settings(), config.early_experience_settings(),
                     config.ace_settings()):
        assert settings.env_params["split"] == "train" and settings.tasks == 2000
    plan = budget.resources(config, Study(config, tmp_path / "run"))
    assert plan.refusal is None and all(0 < s.total <= 80e9 for s in plan.stages)
    eval_ = next(s for s in plan.stages if s.key == "base.eval")
    assert eval_.tokens == 134 * 128 * 50 * 512  # tasks x samples x turns (max_steps) x tokens, at most


def test_the_7b_on_one_80gb_gpu_names_the_sharding_knob(tmp_path):
    plan = plan_of(tmp_path, "qwen2.5-7b", "resources.gpus=1", "generation.data_parallel_size=1",
                   "training.processes=1")
    # fp32 weights + gradients + AdamW (16 bytes a parameter) + bf16 reference: 137 GB on one GPU
    assert plan.refusal.startswith("grpo.train needs"), plan.refusal
    assert "set training.sharding: fsdp with training.processes: 4" in plan.refusal


def test_colocated_grpo_leaves_room_for_the_training_state(tmp_path):
    plan = plan_of(tmp_path, "qwen2.5-7b", "generation.gpu_memory_utilization=0.9")
    assert plan.refusal.startswith("grpo.train needs"), plan.refusal
    assert "lower generation.gpu_memory_utilization to at most 0.7" in plan.refusal


def test_more_training_processes_than_gpus_is_refused(tmp_path):
    plan = plan_of(tmp_path, "qwen2.5-7b", "training.processes=16")
    assert plan.refusal == "training.processes (16) is more than resources.gpus (8): one process per GPU"


def test_a_72b_on_one_80gb_gpu_is_refused_in_one_line_naming_the_knob(tmp_path):
    args = [QWEN7B_CONFIG, "--model", model_dir(tmp_path, "qwen2.5-72b"), "--out", tmp_path / "run",
            "--set", "generation.data_parallel_size=1", "--set", "resources.gpus=1", "--set", "training.processes=1"]
    for dry in (["--dry-run"], []):  # a real run refuses too, before any stage starts
        result = run(*args, *dry)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: base.eval needs"), result.stderr
        assert "56.0 GB" in lines[0] and "raise generation.tensor_parallel_size" in lines[0]
        assert not (tmp_path / "run").exists()


def test_more_generation_gpus_than_the_machine_has_is_refused(tmp_path):
    plan = plan_of(tmp_path, "qwen2.5-7b", "resources.gpus=4")
    assert "= 8 GPUs but resources.gpus is 4: lower generation.data_parallel_size" in plan.refusal


def test_a_too_long_context_names_max_model_len(tmp_path):
    plan = plan_of(tmp_path, "qwen2.5-72b", "generation.tensor_parallel_size=2", "generation.data_parallel_size=1",
                   "generation.max_model_len=32768", "generation.gpu_memory_utilization=0.95")
    assert plan.refusal.startswith("base.eval needs") and "lower generation.max_model_len" in plan.refusal


def test_without_resources_nothing_is_checked(tmp_path):
    plan = plan_of(tmp_path, "qwen2.5-72b", "resources.gpus=null", "resources.gpu_memory_gb=null")
    assert plan.checked == "not checked: set resources.gpus and resources.gpu_memory_gb" and plan.refusal is None
    config = load_config(QWEN7B_CONFIG, ["resources.gpus=null", "generation.data_parallel_size=1"])
    config = config.model_copy(update={"model": str(tmp_path / "qwen2.5-72b")})
    budget.check(config, Study(config, tmp_path))  # a 72B at tp 1: unchecked, so not refused


def test_the_embedded_agent_is_not_checked_but_its_tokens_are_planned(tmp_path):
    config = load_config(ROOT / "leafe/configs/sokoban-demo.yaml", ["resources.gpus=1", "resources.gpu_memory_gb=1"])
    plan = budget.resources(config, Study(config, tmp_path))
    assert plan.checked.startswith("not checked: the embedded agent") and plan.refusal is None
    assert next(s for s in plan.stages if s.key == "base.eval").tokens > 0


def test_dry_run_imports_no_torch(tmp_path):
    code = ("import sys; sys.argv = ['leafe', *sys.argv[1:]]\nfrom leafe.cli import main\ntry:\n    main()\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    argv = ["run", QWEN7B_CONFIG, "--model", model_dir(tmp_path, "qwen2.5-7b"), "--dry-run", "--out", tmp_path / "r"]
    done = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip().endswith("exit 0\nno torch"), done.stdout[-300:] + done.stderr
