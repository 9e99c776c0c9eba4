"""LEAFE stage 2: rows cut from exploration trees, the loss L = L_cf + beta * L_reh, training outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ScriptedBackend, solver_reply

from leafe.errors import LeafeError
from leafe.method import Job
from leafe.methods.distill import build_rows, clean_episode, distill
from leafe.methods.explore import explore
from leafe.methods.sft import weighted_nll
from leafe.prompts import REFLECTION_PROMPT
from leafe.settings import DistillSettings, ExploreSettings, SFTSettings
from leafe.trees import read_trees

MARK = "Experience from an earlier attempt"


def two_level_policy(text: str, i: int) -> str:
    """Dances until two experiences are in context, then solves; reflects 'Step: 2', then 'Step: 4'
    (so the depth-2 branch inherits its parent's experience inside h_tau)."""
    seen = text.count(MARK)
    if REFLECTION_PROMPT in text.rsplit("<|im_start|>user", 1)[1]:
        return "Step: none\nExperience: fine." if seen >= 2 else f"Step: {2 if seen == 0 else 4}\nExperience: e{seen}."
    return solver_reply(text) if seen >= 2 else "Thought: dance.\nAction: dance"


@pytest.fixture(scope="module")
def trees_file(tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("explored")
    settings = ExploreSettings(tasks=3, task_seed=40, budget=60, branch_samples=1, max_depth=3, stop_on_success=True)
    summary = explore(Job("scripted", out, backend=ScriptedBackend(tiny_tokenizer, two_level_policy)), settings).data
    assert summary["success_rate"] == 1.0
    return out / "trees.jsonl"


def test_rows_hold_no_experience_or_reflection_and_label_exactly_the_action(trees_file, tiny_tokenizer):
    trees = read_trees(trees_file)
    rows, counts = build_rows(trees, DistillSettings(reh_fraction=1.0))
    assert counts["branches"] == 6 and counts["cf_branches_used"] == 6  # both levels led to the success
    assert {r.kind for r in rows} == {"cf", "reh"}
    for row in rows:
        text = tiny_tokenizer.decode(row.input_ids)
        assert MARK not in text and REFLECTION_PROMPT not in text and "Step: " not in text
        labelled = [t for t in row.labels if t != -100]
        assert row.input_ids[-len(labelled):] == labelled  # the target ends the row
        reply = tiny_tokenizer.decode(labelled, skip_special_tokens=True)
        assert reply.startswith("Thought:") and "Action:" in reply
    for tree in trees:
        root, first, second = tree["nodes"]
        # Depth 1: h_2 of the root, then the generation prompt, then a'_2 as sampled.
        (cf1,) = [r for r in rows if r.kind == "cf" and r.input_ids[: first.prefix_len] == root.episode.token_ids[: first.prefix_len]
                  and len(r.input_ids) < first.prefix_len + 60]
        step = first.episode.steps[2]
        gen_prompt = first.episode.token_ids[step.context_len : step.action_start]
        assert cf1.input_ids == root.episode.token_ids[: first.prefix_len] + gen_prompt + first.episode.token_ids[
            step.action_start : step.action_end]
        # Depth 2: the cleaned branch is the root's h_2 followed by the first branch's own turns.
        ids, actions = clean_episode(second, tree["nodes"])
        assert ids[: first.prefix_len] == root.episode.token_ids[: first.prefix_len]
        assert MARK not in tiny_tokenizer.decode(ids)
        for s, (a, b) in zip(second.episode.steps, actions):
            assert ids[a:b] == second.episode.token_ids[s.action_start : s.action_end]
    reh = [r for r in rows if r.kind == "reh"]
    assert len(reh) == sum(len(t["nodes"][2].episode.steps) for t in trees)  # one row per turn


def test_cf_from_successful_skips_branches_that_led_nowhere(trees_file):
    trees = read_trees(trees_file)
    for tree in trees:  # pretend the last branch failed: then no branch went on to succeed
        tree["nodes"][2].outcome = "failed"
    rows, counts = build_rows(trees, DistillSettings())
    assert counts["cf_branches_used"] == 0 and not rows
    rows, counts = build_rows(trees, DistillSettings(cf_from="all"))
    assert counts["cf_branches_used"] == 6


def test_beta_weights_the_rehearsal_loss_exactly(trees_file, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    trees = read_trees(trees_file)
    losses = {}
    for beta in (0.0, 0.5, 2.0):
        rows, _ = build_rows(trees, DistillSettings(beta=beta, reh_fraction=1.0))
        cf = next(r for r in rows if r.kind == "cf")
        reh = next(r for r in rows if r.kind == "reh")
        assert (cf.weight, reh.weight) == (1.0, beta)
        pair = [cf, reh]
        width = max(len(r.input_ids) for r in pair)
        ids = torch.tensor([r.input_ids + [0] * (width - len(r.input_ids)) for r in pair])
        labels = torch.tensor([r.labels + [-100] * (width - len(r.labels)) for r in pair])
        mask = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in pair])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        n = cf.loss_tokens + reh.loss_tokens
        losses[beta] = weighted_nll(logits, labels, torch.tensor([cf.weight, reh.weight]), n).item()
        nll_reh = weighted_nll(logits[1:], labels[1:], torch.ones(1), 1).item()
    # L = L_cf + beta * L_reh: linear in beta with slope L_reh (per loss token of the batch).
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * nll_reh / n, rel=1e-4)
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * nll_reh / n, rel=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_full_and_lora_runs_write_loadable_model_directories(trees_file, tiny_model_dir, tmp_path, lora):
    from leafe.backends.hf import HFBackend

    out = tmp_path / "distilled"
    summary = distill(Job(str(tiny_model_dir), out, inputs=[trees_file]), DistillSettings(reh_fraction=0.5), SFTSettings(learning_rate=1e-3, epochs=1, batch_size=4, lora=lora, logging_steps=1)).data
    assert summary["sets"]["cf"]["rows"] == 6 and summary["training"]["steps"] >= 2
    written = json.loads((out / "distill.json").read_text())
    assert written["settings"]["beta"] == 1.0 and written["training"]["lora"] is lora and written["loss_log"]
    assert not (out / "adapter_config.json").exists()  # LoRA is merged: a plain directory
    backend = HFBackend(str(out), device="cpu")
    assert sum(p.numel() for p in backend.model.parameters()) == sum(
        p.numel() for p in HFBackend(str(tiny_model_dir), device="cpu").model.parameters())
    changed = any(not torch.equal(a, b) for a, b in zip(
        backend.model.state_dict().values(), HFBackend(str(tiny_model_dir), device="cpu").model.state_dict().values()))
    assert changed


def test_rows_over_the_context_are_dropped_and_counted(trees_file, tiny_model_dir, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 700
    (short / "config.json").write_text(json.dumps(config))
    summary = distill(Job(str(short), tmp_path / "out", inputs=[trees_file]), DistillSettings(reh_fraction=1.0), SFTSettings(epochs=1, batch_size=8)).data
    dropped = summary["sets"]["cf"]["dropped_over_context"] + summary["sets"]["reh"]["dropped_over_context"]
    assert dropped > 0
    rows, _ = build_rows(read_trees(trees_file), DistillSettings(reh_fraction=1.0))
    assert summary["sets"]["cf"]["rows"] + summary["sets"]["reh"]["rows"] + dropped == len(rows)


def test_bad_settings_and_inputs_get_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(LeafeError, match="--beta must be >= 0"):
        DistillSettings(beta=-1).validate()
    with pytest.raises(LeafeError, match="--cf-from must be"):
        DistillSettings(cf_from="some").validate()
    with pytest.raises(LeafeError, match="does not exist"):
        distill(Job(str(tiny_model_dir), tmp_path / "o", inputs=[tmp_path / "nope.jsonl"]), DistillSettings(), SFTSettings())


def test_distill_cli_end_to_end_then_eval_the_result(trees_file, tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    run = subprocess.run([sys.executable, "-m", "leafe", "distill", "--model", str(tiny_model_dir), "--trees",
                          str(trees_file), "--out", str(out), "--epochs", "1", "--lr", "1e-4", "--reh-fraction", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "D_cf 6 rows" in run.stdout
    ev = subprocess.run([sys.executable, "-m", "leafe", "eval", "--model", str(out), "--tasks", "1", "--samples", "2",
                         "--max-new-tokens", "8", "--env-param", "max_steps=2", "--out", str(tmp_path / "ev")],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "leafe", "distill", "--model", str(tmp_path / "none"), "--trees",
                          str(trees_file), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a model directory" in bad.stderr


def test_rehearsal_takes_exactly_its_share_of_successful_episodes(trees_file, tiny_tokenizer):
    trees = read_trees(trees_file)  # 3 successful episodes (one per task)
    for fraction, wanted in [(0.0, 0), (0.2, 1), (0.5, 2), (1.0, 3)]:
        rows, counts = build_rows(trees, DistillSettings(reh_fraction=fraction, use_cf=False))
        assert counts["successful_episodes"] == 3 and counts["reh_episodes"] == wanted
        # One first-turn row (no step feedback in its context yet) per rehearsed episode.
        first_turns = [r for r in rows if "Step 0:" not in tiny_tokenizer.decode(r.input_ids)]
        assert len(first_turns) == wanted and all(r.kind == "reh" for r in rows)


def test_trees_with_nothing_to_distil_raise_a_typed_error(tiny_tokenizer, tiny_model_dir, tmp_path):
    from helpers import dancing_explorer

    from leafe.methods.distill import NoDistillationRows

    never = ScriptedBackend(tiny_tokenizer, dancing_explorer(solve_with_experience=False))
    explore(Job("scripted", tmp_path / "x", backend=never), ExploreSettings(tasks=1, task_seed=40, budget=10))
    with pytest.raises(NoDistillationRows, match=r"no distillation rows in 1 trees \(\d+ branches, 0 successful") as e:
        distill(Job(str(tiny_model_dir), tmp_path / "out", inputs=[tmp_path / "x" / "trees.jsonl"]), DistillSettings(), SFTSettings())
    assert e.value.counts["successful_episodes"] == 0 and not (tmp_path / "out").exists()
