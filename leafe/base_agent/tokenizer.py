"""Train a small byte-level BPE tokenizer with a ChatML template (for the embedded model and tests).

Byte-level so any text encodes (a model can always be shown an unexpected reply). Symbols are
pre-split into single tokens so a small model sees a Sokoban grid cell by cell, instead of one opaque
token per row; words merge normally. Two styles:

- `cells` (every agent leafe ships): digits are split too, so "(4,3)" is five tokens.
- `pieces`: a coordinate "(4,3)" (with its leading space) is one piece BPE may merge whole, numbers
  merge, and the chat roles are in the training text, so "<|im_start|>assistant" is two tokens, not
  seven. The board stays cell by cell. A whole Sokoban episode is shorter, but the agent built on
  it played far worse (docs/experiment-log.md, "Fewer tokens and fewer key/value heads"): one token
  per coordinate leaves a small model 100 unrelated symbols where digits gave it ten shared ones.
"""

from __future__ import annotations

from collections.abc import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
STYLES = ("cells", "pieces")

#: `pieces`: a coordinate pair, a word or a number (each with its leading space), one symbol, or
#: whitespace. Every character falls in one class, so nothing is left to ByteLevel's own regex.
_PIECES = r" ?\(\d+,\d+\)| ?[A-Za-z]+| ?\d+|\s+|[^A-Za-z0-9\s]"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, style: str = "cells"):
    """A `PreTrainedTokenizerFast` trained on `texts`, with ChatML special tokens and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {len(byte_alphabet) + len(SPECIAL_TOKENS)} (got {vocab_size})")
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; use one of {', '.join(STYLES)}")
    tok = Tokenizer(models.BPE())
    if style == "cells":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"[^A-Za-z0-9\s]"), behavior="isolated"),
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        # The chat template's role names, as often as the turns that carry them.
        texts = [*texts, *(["system\nuser\nassistant\n"] * 2000)]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1 << 30,
    )
