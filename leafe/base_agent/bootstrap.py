"""`leafe bootstrap`: build the embedded base agent offline, a real small Hugging Face model.

Generated Sokoban play (see `synthetic.py`) -> a byte-level BPE tokenizer trained on that text, with
a ChatML template -> a randomly initialised `LlamaForCausalLM` of a few million parameters ->
supervised pretraining through the same SFT path as distillation. The output directory is an
ordinary model directory: every backend and trainer loads it as it loads Qwen.

Levels come from seeds >= 10,000,000, disjoint from every range leafe evaluates or trains on
(configs and tests use seeds below 1,000,000). The build is deterministic for a config, and
`ensure_base_agent` caches it under the hash of its config, so `make demo` builds it once.

A killed build resumes: it builds in a hidden sibling (.NAME.building), where the pretraining's
checkpoints stay (`leafe.methods.sft`), and a rerun of the same config makes the same data and
tokenizer again (deterministic, seconds) and goes on from the newest checkpoint, to the bits of a
build never stopped. The output directory appears, renamed whole, only when the build is done.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from leafe.errors import LeafeError
from leafe.files import cache_dir, read_json, write_json
from leafe.method import Job, MethodResult, cost
from leafe.rundir import RUN_FORMAT
from leafe.settings import BootstrapConfig

#: Bootstrap levels start here; every other seed range in leafe stays below it.
BOOTSTRAP_SEED_BASE = 10_000_000



Report = Callable[[str, int, int], None]  # (phase, done, total)


def build(config: BootstrapConfig, out_dir: str | Path, report: Report | None = None) -> dict:
    """Build the base agent into `out_dir` (in a sibling directory, renamed when whole); a build of
    the same config killed before resumes from its last checkpoint."""
    from leafe.lock import run_lock

    out, digest = Path(out_dir), config.digest()
    tmp = out.with_name(f".{out.name}.building")
    out.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(out, "leafe bootstrap"):  # one build in the building directory at a time
        for stale in out.parent.glob(f".{out.name}.building-*"):  # killed builds of older leafe (one per process)
            shutil.rmtree(stale, ignore_errors=True)
        mark = tmp / "config_hash"
        if _built(tmp) != digest:  # else killed between finishing and the rename: only that is left
            if tmp.exists() and not (mark.exists() and mark.read_text() == digest):
                shutil.rmtree(tmp)  # another config's build: nothing in it is this one's
            tmp.mkdir(exist_ok=True)
            mark.write_text(digest)
            _build(config, tmp, report or (lambda phase, done, total: None))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)  # the checkpoints: the model is there
        mark.unlink(missing_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return read_json(out / "bootstrap.json")


def _built(directory: Path) -> str | None:
    """The config digest of the finished build in `directory` (None: none is there)."""
    record = directory / "bootstrap.json"
    return read_json(record).get("config_hash") if record.exists() else None


def _build(config: BootstrapConfig, tmp: Path, report: Report) -> dict:
    """The build itself, into `tmp`: bootstrap.json is written last, when the model is there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from leafe.base_agent.synthetic import (
        decision_tokens,
        decision_weights,
        fragment_ids,
        make_fragment,
        make_reflection_fragment,
        make_script,
        materialize,
        texts_of,
    )
    from leafe.base_agent.tokenizer import train_tokenizer
    from leafe.chat import ChatFormat
    from leafe.envs.sokoban import SokobanEnv
    from leafe.methods.sft import row_from_mask, train
    from leafe.modelcard import save_model, write_model_card
    from leafe.prompts import REFLECTION_PROMPT, SYSTEM_PROMPT, experience_message
    from leafe.rollout import Recorder
    from leafe.settings import SFTSettings

    started = time.perf_counter()

    rng = random.Random(f"leafe-bootstrap:{config.seed}")
    env = SokobanEnv(max_steps=config.max_steps)
    counts = (config.fragments, config.reflection_fragments, config.episodes)
    first = BOOTSTRAP_SEED_BASE + config.seed * sum(counts)
    levels = env.make_tasks(sum(counts), first)
    fragments, scripts = [], []
    for i, task in enumerate(levels):
        if i < counts[0]:
            made = make_fragment(task, config.max_steps, rng, config.mistake_rate, plans=config.plans)
        elif i < counts[0] + counts[1]:
            made = make_reflection_fragment(task, config.max_steps, rng, config.mistake_rate, plans=config.plans)
        else:
            scripts.append(make_script(task, config.max_steps, rng, config.mistake_rate, config.reflect_every,
                                       plans=config.plans))
            made = None
        if made is not None:
            fragments.append(made)
        if i % 500 == 0 or i == len(levels) - 1:
            report("generating play", i + 1, len(levels))
    for task in env.make_tasks(config.experience_episodes, first + sum(counts)):
        scripts.append(make_script(task, config.max_steps, rng, config.mistake_rate, config.reflect_every,
                                   plans=config.plans, kind="experience"))

    corpus = [SYSTEM_PROMPT, REFLECTION_PROMPT, experience_message("")]
    for script in scripts:
        corpus.extend(texts_of(script, config.max_steps))
    for fragment in fragments[::5]:
        corpus.extend([text for _, text in fragment.messages] + [fragment.reply])
    report("training tokenizer", 0, 1)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size, style=config.tokenizer)
    tokenizer.model_max_length = config.context
    report("training tokenizer", 1, 1)

    fmt = ChatFormat(tokenizer)
    recorder = Recorder(fmt)
    decisions = decision_tokens(fmt, config.plans)

    def row(ids: list[int], mask: list[int], kind: str):
        out = row_from_mask(ids, mask, kind=kind)
        out.token_weights = decision_weights(ids, mask, config.decision_weight, **decisions)
        return out

    fragment_rows = [row(*fragment_ids(f, fmt), kind=f.kind) for f in fragments]
    episode_rows, dropped = [], 0
    for script in scripts:
        ids, mask = materialize(script, recorder, config.max_steps)
        if len(ids) > config.context:
            dropped += 1
            continue
        episode_rows.append(row(ids, mask, kind=script.kind))

    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.kv_heads or config.heads,
            max_position_embeddings=config.context,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    # One run over fragments and episodes together: trained one after the other, the episodes
    # erased what the fragments taught (docs/experiment-log.md, builds 5-10). Batches hold rows of similar
    # length under a token budget: 32 fragments, or a few episodes.
    phase = "pretraining"
    settings = SFTSettings(learning_rate=config.learning_rate, epochs=1.0, batch_size=config.batch_size,
                           max_batch_tokens=config.max_batch_tokens, warmup_ratio=0.05, seed=config.seed,
                           logging_steps=5, save_every=config.save_every)
    stats = {phase: train(model, tokenizer, fragment_rows + episode_rows, tmp, settings, save=False,
                          on_log=lambda entry: report(phase, entry["step"], entry["max_steps"]))}
    trained = stats[phase].pop("model")
    save_model(tmp, trained, tokenizer)  # with a generation_config.json that stops at the end of a turn
    kinds: dict[str, dict[str, int]] = {}
    for row in fragment_rows + episode_rows:
        k = kinds.setdefault(row.kind, {"rows": 0, "tokens": 0, "loss_tokens": 0})
        k["rows"] += 1
        k["tokens"] += len(row.input_ids)
        k["loss_tokens"] += row.loss_tokens
    summary = {
        "format": RUN_FORMAT,  # also in config_hash: an agent of another run format is built again
        "config": asdict(config),
        "config_hash": config.digest(),
        "parameters": sum(p.numel() for p in trained.parameters()),
        "data": {"fragments": len(fragment_rows), "episodes": len(episode_rows), "dropped_over_context": dropped,
                 "by_kind": kinds, "level_seeds": [first, first + sum(counts) - 1]},
        "training": {phase: {k: v for k, v in st.items() if k != "log"} for phase, st in stats.items()},
        "loss_log": {phase: st["log"] for phase, st in stats.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_model_card(tmp, None, "bootstrap", asdict(config), summary["data"])
    write_json(tmp / "bootstrap.json", summary)
    return summary


def bootstrap(job: Job, config: BootstrapConfig) -> MethodResult:
    """The method contract's bootstrap: the base agent of `config` in `job.out`, built unless a
    build of the same config is there already (its cost is then nothing)."""
    started = time.perf_counter()
    record = job.out / "bootstrap.json"
    if not record.exists() or read_json(record).get("config_hash") != config.digest():
        phases: set[str] = set()
        last = [0]  # what the current phase had done at its previous report

        def report(phase: str, done: int, total: int) -> None:
            if phase not in phases:  # each phase is a bar of its own (and an ETA of its own)
                phases.add(phase)
                job.progress.start(total, done)
                last[0] = done
            job.progress.advance(done - last[0], status=phase)
            last[0] = done

        job.out.parent.mkdir(parents=True, exist_ok=True)
        build(config, job.out, report)
    summary = read_json(record)
    return MethodResult("bootstrap", str(job.out), asdict(config), summary,
                        cost(wall_s=time.perf_counter() - started))


def default_cache_dir() -> Path:
    return cache_dir("models")


def ensure_base_agent(config: BootstrapConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """The cached base agent for `config`, built on first use (`bootstrap` at its cache path)."""
    config = config or BootstrapConfig()
    path = Path(cache_dir or default_cache_dir()) / f"base-agent-{config.digest()}"
    return Path(bootstrap(Job(model="", out=path), config).model)


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "bootstrap.json").exists() and not force:
        raise LeafeError(f"{out} exists and is not a leafe model directory; choose another --out or pass --force")
