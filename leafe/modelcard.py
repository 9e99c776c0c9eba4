"""Model directories that describe themselves: what leafe writes beside the weights of every model.

A model directory leafe writes (distillation, GRPO and its checkpoints, Early Experience, the
embedded agent, an imported GGUF) is taken unchanged by `AutoModelForCausalLM.from_pretrained`,
`vllm serve` and `leafe eval`, because it holds, besides config and weights:
- the tokenizer with its chat template (tokenizer_config.json / chat_template.jinja): every leafe
  backend renders turns with it, and a server needs it for chat requests;
- generation_config.json whose eos_token_id lists every id that ends a turn (the template's end of
  turn and the tokenizer's eos) and whose pad_token_id is the tokenizer's, so `generate` and a server
  stop where leafe's own backends stop (`save_model`);
- README.md, a Hugging Face model card (`write_model_card`): YAML front matter (base_model,
  library_name, tags, pipeline_tag, model-index once evaluated) and a body giving the base model,
  the method, its settings and the training data counts. A study adds the Pass@k of its evaluation
  when it has one (`add_results`).

It is not where training or evaluation happens; each method calls it with what it knows. No network:
huggingface_hub renders and parses the card locally.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leafe.files import write_text

#: What each method did to its base model, in a sentence (the card's opening).
METHODS = {
    "distill": "LEAFE stage 2: supervised fine-tuning on the corrections its exploration found (D_cf: the "
               "history before a rollback point -> the corrected action, without the experience that led to "
               "it) and on rehearsed successful steps (D_reh), loss L_cf + beta * L_reh.",
    "grpo": "multi-turn GRPO: G episodes per task, group-normalised outcome rewards, a clipped policy "
            "gradient on the agent's own tokens and a KL penalty to the starting model.",
    "early-experience-iwm": "Early Experience, implicit world modelling: predicting the environment's next "
                            "observation for expert and alternative actions, then imitating the expert.",
    "early-experience-sr": "Early Experience, self-reflection: rationales contrasting the expert's action "
                           "with sampled alternatives, trained with imitation of the expert.",
    "bootstrap": "the embedded base agent (`leafe bootstrap`): a small Llama with its own tokenizer, "
                 "pretrained from scratch on synthetic Sokoban play, reflections and experience-following.",
    "gguf-import": "a GGUF checkpoint dequantized to an ordinary float32 Hugging Face directory.",
}

CARD = "README.md"
#: The body's section `add_results` rewrites (from this heading to the next).
RESULTS_HEADING = "## Evaluation"


@dataclass
class PassAtK:
    """An evaluation's Pass@k, with what it was measured on (results.json's fields)."""

    env: str
    tasks: int
    samples: int
    values: dict[str, float]  # k -> Pass@k
    ci95: dict[str, list[float]] | None = None  # k -> [low, high]

    def __post_init__(self) -> None:  # k as results.json writes it (a JSON key), whatever was given
        self.values = {str(k): v for k, v in self.values.items()}
        self.ci95 = {str(k): v for k, v in self.ci95.items()} if self.ci95 else None


# -- what a model directory holds besides the card -------------------------------------------------

def generation_config(model: Any, tokenizer: Any) -> Any:
    """A copy of `model`'s GenerationConfig that stops on every id leafe's backends stop on (the
    template's end of turn, the tokenizer's eos, any eos it had) and pads with the tokenizer's pad.
    `generate` and `vllm serve` read only this file: a base model's config often names only the
    tokenizer's eos, which a chat template need not end its turns with."""
    from leafe.chat import ChatFormat

    config = copy.deepcopy(model.generation_config)
    had = config.eos_token_id
    had = [had] if isinstance(had, int) else list(had or [])
    if getattr(tokenizer, "chat_template", None):
        stops = list(ChatFormat(tokenizer, stop_ids=had).stop_token_ids)
    else:  # leafe itself refuses such a tokenizer; the file still names the eos
        stops = sorted(set(had) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    config.eos_token_id = stops
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config._from_model_config = False  # this file, not the model's config.json, is what generation reads
    return config


def save_model(directory: str | Path, model: Any, tokenizer: Any, state_dict: dict | None = None) -> None:
    """Write `model` (its `state_dict` when given: gathered or cast weights), its tokenizer with the
    chat template, and `generation_config` into `directory`: the one way leafe saves a model. The
    caller makes the write atomic (a staging directory: `leafe.files.publish_model_dir`)."""
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    generation_config(model, tokenizer).save_pretrained(directory)  # replaces the one save_pretrained wrote


# -- the card --------------------------------------------------------------------------------------

def write_model_card(directory: str | Path, base_model: str | None, method: str, settings: dict[str, Any],
                     data: dict[str, Any], passk: PassAtK | None = None) -> Path:
    """Write README.md into the model `directory` (atomically): base model (None: trained from
    scratch), method, its settings, the training data counts (`data`, nested dicts allowed) and,
    when known, the Pass@k. Returns the card's path."""
    from huggingface_hub import ModelCard

    name = _model_name(base_model, method)
    data_meta = _metadata(base_model, method, name, passk)
    body = _body(name, base_model, method, settings, data, passk)
    path = Path(directory) / CARD
    write_text(path, str(ModelCard(f"---\n{data_meta.to_yaml()}\n---\n{body}")))
    return path


def add_results(directory: str | Path, passk: PassAtK) -> bool:
    """Put `passk` into the card of the model `directory`: its model-index and its Evaluation section
    (replacing an earlier evaluation's). False, and nothing written, when the directory has no card
    (a model written before leafe wrote cards)."""
    from huggingface_hub import ModelCard

    path = Path(directory) / CARD
    if not path.is_file():
        return False
    card = ModelCard.load(path)
    card.data.model_name = card.data.model_name or Path(directory).name
    card.data.eval_results = _eval_results(passk)
    head, found, rest = card.text.partition(RESULTS_HEADING)
    tail = rest[rest.find("\n## "):] if found and "\n## " in rest else "\n"
    if not found:  # a card without the section (edited by hand): the results go at its end
        head = head.rstrip() + "\n\n"
    card.text = f"{head}{_results_section(passk)}\n{tail}"
    write_text(path, str(card))
    return True


def _model_name(base_model: str | None, method: str) -> str:
    """The model-index name: the base's directory name (or repo name) and the method."""
    return f"{Path(base_model).name if base_model else 'scratch'}-{method}"


def _metadata(base_model: str | None, method: str, name: str, passk: PassAtK | None):
    from huggingface_hub import ModelCardData

    return ModelCardData(base_model=base_model or None, library_name="transformers", tags=["leafe", method],
                         pipeline_tag="text-generation", model_name=name,
                         eval_results=_eval_results(passk) if passk else None)


def _eval_results(passk: PassAtK) -> list:
    """model-index entries: one metric per k, on the env's held-out tasks."""
    from huggingface_hub import EvalResult

    dataset = f"{passk.env} ({passk.tasks} held-out tasks, {passk.samples} samples each)"
    return [EvalResult(task_type="text-generation", task_name="multi-turn agent", dataset_type=passk.env,
                       dataset_name=dataset, metric_type=f"pass@{k}", metric_name=f"Pass@{k}",
                       metric_value=float(v)) for k, v in sorted(passk.values.items(), key=lambda kv: int(kv[0]))]


def _body(name: str, base_model: str | None, method: str, settings: dict[str, Any], data: dict[str, Any],
          passk: PassAtK | None) -> str:
    import yaml

    what = METHODS.get(method, method)
    start = f"`{base_model}`" if base_model else "nothing (randomly initialised weights)"
    plain = json.loads(json.dumps(settings, default=str))  # tuples, paths: as YAML reads them back
    rows = "\n".join(f"| {key} | {value} |" for key, value in _flatten(data))
    return "\n".join([
        f"# {name}",
        "",
        f"Trained with leafe: {what}",
        "",
        f"- **Base model:** {start}",
        f"- **Method:** {method}",
        "",
        "## Training data",
        "",
        "| count | value |\n|---|---|\n" + rows if rows else "(no counts recorded)",
        "",
        "## Settings",
        "",
        "```yaml",
        yaml.safe_dump(plain, sort_keys=False).rstrip(),
        "```",
        "",
        _results_section(passk),
        "",
        "## Use",
        "",
        "The directory holds the tokenizer with its chat template and a generation_config.json that stops "
        "at the end of a turn, so each of these takes it unchanged:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR)",
        "tokenizer = AutoTokenizer.from_pretrained(DIR)",
        "```",
        "",
        "`vllm serve DIR` and `leafe eval --model DIR`.",
        "",
    ])


def _results_section(passk: PassAtK | None) -> str:
    if passk is None:
        return f"{RESULTS_HEADING}\n\nNot evaluated yet (`leafe run` adds the Pass@k of its evaluation here)."
    header = f"On {passk.env}: {passk.tasks} held-out tasks, {passk.samples} independent samples each."
    ks = sorted(passk.values, key=int)
    lines = ["| k | Pass@k | 95% CI |", "|---|---|---|"]
    for k in ks:
        ci = (passk.ci95 or {}).get(k)
        lines.append(f"| {k} | {passk.values[k]:.4f} | {f'{ci[0]:.4f} to {ci[1]:.4f}' if ci else ''} |")
    return f"{RESULTS_HEADING}\n\n{header}\n\n" + "\n".join(lines)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every leaf of nested dicts, in order."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out
