"""Model directories leafe writes describe themselves and load unchanged: a Hugging Face model card
(README.md) naming the base model, the method, its settings and the data counts; the tokenizer with
its chat template; a generation_config.json that stops at the end of a turn. transformers and
`leafe eval` load them here; `vllm serve` serves the same distilled model in test_backend_openai.py
(one server start for both), and the Pass@k a study adds after its evaluation is checked on the
study run of test_study.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from huggingface_hub import ModelCard

from leafe.files import MODEL_STAGING, publish_model_dir
from leafe.method import Job
from leafe.methods.grpo import train_grpo
from leafe.modelcard import PassAtK, add_results, write_model_card
from leafe.settings import GRPOSettings


def card_settings(card: ModelCard) -> dict:
    """The settings block of a card's body, as YAML reads it."""
    import yaml

    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", card.text, re.S).group(1))


def card_counts(card: ModelCard) -> dict[str, str]:
    """The Training data table of a card's body: dotted key -> value as written."""
    section = card.text.split("## Training data", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| (\S+) \| (.+?) \|$", section, re.M)[1:])  # [1:]: the header row


def stops_at_end_of_turn(directory: Path) -> None:
    """generation_config.json stops on the template's end of turn and pads with the tokenizer's pad."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = GenerationConfig.from_pretrained(directory)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in config.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id


def test_a_distilled_model_card_names_its_base_method_settings_and_data(distilled_model_dir, hd64_model_dir):
    card = ModelCard.load(distilled_model_dir / "README.md")
    assert card.data.base_model == str(hd64_model_dir)
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert card.data.tags == ["leafe", "distill"]
    assert card.data.eval_results is None and "Not evaluated yet" in card.text  # no Pass@k before an evaluation
    record = json.loads((distilled_model_dir / "distill.json").read_text())
    settings = card_settings(card)
    assert settings["distill"] == record["settings"] and settings["sft"].items() <= record["training"].items()
    counts = card_counts(card)
    assert counts["tasks"] == "2" and counts["steps"] == str(record["training"]["steps"])
    for kind in ("cf", "reh"):
        assert counts[f"sets.{kind}.rows"] == str(record["sets"][kind]["rows"])
        assert counts[f"sets.{kind}.tokens"] == str(record["sets"][kind]["tokens"])


def test_a_distilled_model_loads_in_transformers_with_its_chat_template(distilled_model_dir, hd64_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(distilled_model_dir)
    base = AutoTokenizer.from_pretrained(hd64_model_dir)
    messages = [{"role": "system", "content": "You push boxes."}, {"role": "user", "content": "Push the box."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == base.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    stops_at_end_of_turn(distilled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(distilled_model_dir)
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_grpo_cards_its_checkpoints_and_final_model_and_leafe_eval_takes_it(tiny_model_dir, tmp_path):
    settings = GRPOSettings(tasks=2, task_seed=3, steps=2, tasks_per_step=1, group_size=2, max_new_tokens=4,
                            env_params={"max_steps": 2}, save_every=1)
    out = tmp_path / "grpo"
    result = train_grpo(Job(str(tiny_model_dir), out, device="cpu"), settings)
    for directory, steps in ((out / "checkpoints" / "step-1", 1), (out, 2)):
        card = ModelCard.load(directory / "README.md")
        assert card.data.base_model == str(tiny_model_dir) and card.data.tags == ["leafe", "grpo"]
        assert card_settings(card) == json.loads(json.dumps(asdict(settings)))
        assert card_counts(card)["steps"] == str(steps)
        stops_at_end_of_turn(directory)
    counts = card_counts(ModelCard.load(out / "README.md"))
    assert counts["episodes"] == str(result.data["episodes"]) and counts["groups"] == str(result.data["groups"])
    run = subprocess.run([sys.executable, "-m", "leafe", "eval", "--model", str(out), "--tasks", "1", "--samples",
                          "2", "--max-new-tokens", "4", "--env-param", "max_steps=2", "--out", str(tmp_path / "ev")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [t["n"] for t in json.loads((tmp_path / "ev" / "eval.json").read_text())["tasks"]] == [2]


def test_add_results_puts_the_latest_pass_at_k_in_the_model_index_and_body(tmp_path):
    write_model_card(tmp_path, "org/base", "grpo", {"learning_rate": 1e-6}, {"steps": 3})
    for values in ({"1": 0.25, "2": 0.5}, {1: 0.5, 2: 0.75}):  # a study evaluated again: the latest counts
        assert add_results(tmp_path, PassAtK("sokoban", 2, 4, values, {"1": [0.0, 1.0], "2": [0.25, 1.0]}))
    card = ModelCard.load(tmp_path / "README.md")
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"pass@1": 0.5, "pass@2": 0.75}
    assert {r.dataset_type for r in card.data.eval_results} == {"sokoban"}
    assert card.text.count("## Evaluation") == 1 and "Not evaluated yet" not in card.text
    assert "| 2 | 0.7500 | 0.2500 to 1.0000 |" in card.text
    assert card.text.index("## Evaluation") < card.text.index("## Use")  # the sections around it stay
    assert card_counts(card) == {"steps": "3"} and card_settings(card) == {"learning_rate": 1e-6}
    # A directory without a card (a model from before leafe wrote them) is left as it is.
    assert not add_results(tmp_path / "older", PassAtK("sokoban", 2, 4, {"1": 0.5}))
    assert not (tmp_path / "older").exists()


def test_publishing_a_model_drops_the_card_of_the_model_it_replaces(tmp_path):
    (tmp_path / MODEL_STAGING).mkdir()
    (tmp_path / MODEL_STAGING / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("the old model's card")
    (tmp_path / "distill.json").write_text("{}")
    publish_model_dir(tmp_path)
    assert not (tmp_path / "README.md").exists() and (tmp_path / "distill.json").exists()
