"""Conversations as token ids with a loss mask, built by appending turns and never re-encoding.

The model's own chat template renders messages. Re-rendering and re-tokenizing a whole multi-turn
history every turn ("token drift") silently changes what the model generated: a decoded-then-
encoded reply can tokenize differently, so the policy is trained on ids it never sampled. Here the
ids of a history are built once, by appending: the template's text for each new message is found as
the difference between rendering the conversation with and without it (on a fixed skeleton, so the
cost does not grow with the history), and generated ids are appended exactly as sampled.

Every token carries a loss bit: 1 for tokens the agent generated, 0 for everything else (system
prompt, observations, experiences, reflection prompts, the template's glue). `ChatFormat` learns the
template's pieces once per tokenizer and checks that the template is append-only, which this scheme
needs; `Conversation` is one growing history.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leafe.errors import LeafeError

# Content that no template rewrites (no leading/trailing space to trim, no special characters).
_SYSTEM, _USER, _ASSISTANT = "LEAFESYSTEMSLOT", "LEAFEUSERSLOT", "LEAFEASSISTANTSLOT"


class ChatTemplateError(LeafeError, ValueError):
    """The tokenizer has no chat template, or one leafe cannot extend turn by turn."""


def _suffix(base: str, full: str, what: str) -> str:
    if not full.startswith(base):
        raise ChatTemplateError(
            f"the chat template is not append-only: adding {what} changes the text before it, so a "
            f"history cannot be extended turn by turn; use a template that renders earlier turns the same "
            f"way whatever follows them"
        )
    return full[len(base) :]


class ChatFormat:
    """What the chat template puts around each turn, learnt from the template once per tokenizer.

    `date_string`: the date a template that writes one renders (Llama 3.1's "Today Date"; without
    it the template writes the day it runs, so a run resumed tomorrow would render other tokens).
    `stop_ids`: more ids that end a turn, from the model's generation_config.json (Qwen2.5 stops on
    <|endoftext|> as well as <|im_end|>); the template's own end-of-turn and the eos are always in.
    """

    def __init__(self, tokenizer: Any, *, date_string: str | None = None, stop_ids: Sequence[int] = ()):
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "the tokenizer")
            raise ChatTemplateError(
                f"{name} has no chat template; leafe renders turns with the model's own template, so add "
                f"'chat_template' to its tokenizer_config.json (instruct checkpoints ship one)"
            )
        self.tokenizer = tokenizer
        self.date_string = date_string
        # Qwen3's hybrid template: leafe's agent turns are actions, so its thinking mode is off (the
        # generation prompt then carries the empty reasoning block the model is trained to follow).
        self.template_kwargs = {"enable_thinking": False} if "enable_thinking" in tokenizer.chat_template else {}
        self._extra_stop_ids = tuple(int(i) for i in stop_ids)
        self._skeleton = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}]
        self._skeleton_text = self._render(self._skeleton)
        with_prompt = self._render(self._skeleton, add_generation_prompt=True)
        self.generation_prompt_text = _suffix(self._skeleton_text, with_prompt, "the generation prompt")
        self.generation_prompt_ids = self.encode(self.generation_prompt_text)

        self._after_assistant = self._skeleton + [{"role": "assistant", "content": _ASSISTANT}]
        turn = _suffix(self._skeleton_text, self._render(self._after_assistant), "an assistant turn")
        head, sep, closing = turn.partition(_ASSISTANT)
        if not sep or head != self.generation_prompt_text:
            raise ChatTemplateError(
                "the chat template renders an assistant turn with a different header than its generation "
                f"prompt ({head!r} vs {self.generation_prompt_text!r}); generated turns would not match"
            )
        #: Text the template puts after an assistant message's content (e.g. "<|im_end|>\n").
        self.turn_end_text = closing
        #: How the template renders an assistant turn once another message follows it. Most templates
        #: render it as it was generated; Qwen3's drops the (empty) reasoning block of earlier turns.
        #: leafe keeps every turn as generated, so what the model saw is what it is trained on.
        self.history_head = self._history_head(closing)
        self._after_assistant_text = self._skeleton_text + self.history_head + _ASSISTANT + closing
        closing_ids = self.encode(closing)
        special = set(tokenizer.all_special_ids)
        #: The token that ends an assistant turn, when the template ends turns with a special token.
        self.end_of_turn_id: int | None = closing_ids[0] if closing_ids and closing_ids[0] in special else None
        if self.end_of_turn_id is not None:
            eot_text = tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
            self._glue_after_stop = closing[len(eot_text) :] if closing.startswith(eot_text) else closing
        else:
            self._glue_after_stop = closing
        self.stop_token_ids = self._stop_ids()
        self._check_append_only()

    def _history_head(self, closing: str) -> str:
        """The header of an assistant turn followed by another message."""
        probe = self._render(self._after_assistant + [{"role": "user", "content": _USER}])
        turn = _suffix(self._skeleton_text, probe, "an assistant turn before another message")
        head, sep, tail = turn.partition(_ASSISTANT)
        after_user = _suffix(self._skeleton_text, self._render(self._skeleton + [{"role": "user", "content": _USER}]),
                             "a user message")
        if not sep or tail != closing + after_user:
            raise ChatTemplateError(
                "the chat template renders an earlier assistant turn with another ending than the turn it "
                f"generated ({tail!r}); a history cannot be extended turn by turn"
            )
        return head

    # -- rendering -----------------------------------------------------------------------------
    def _render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        try:
            extra = dict(self.template_kwargs)
            if self.date_string is not None:
                extra["date_string"] = self.date_string
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
            )
        except Exception as exc:  # jinja raises arbitrary exceptions for roles a template refuses
            raise ChatTemplateError(f"the chat template failed to render {[m['role'] for m in messages]}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def initial_ids(self, messages: Sequence[dict]) -> list[int]:
        """Ids of the opening messages (system, first user turn), without the generation prompt."""
        return self.encode(self._render(messages))

    def message_text(self, role: str, content: str, after_assistant: bool) -> str:
        """The template's text for one more message appended to a conversation."""
        base, base_text = (  # after an assistant turn: rendered as the template renders earlier turns
            (self._after_assistant, self._after_assistant_text)
            if after_assistant
            else (self._skeleton, self._skeleton_text)
        )
        full = self._render(base + [{"role": role, "content": content}])
        return _suffix(base_text, full, f"a {role} message")

    def _stop_ids(self) -> tuple[int, ...]:
        ids = set(self._extra_stop_ids)
        eos = self.tokenizer.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        if self.end_of_turn_id is not None:
            ids.add(self.end_of_turn_id)
        if not ids:
            raise ChatTemplateError("the tokenizer has no eos token and its template ends turns with no special token")
        return tuple(sorted(ids))

    def _check_append_only(self) -> None:
        """Build a two-turn conversation by appending and compare it with one full render."""
        messages = [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "first observation"},
            {"role": "assistant", "content": "Action: up"},
            {"role": "user", "content": "second observation"},
            {"role": "user", "content": "an experience"},
        ]
        conv = Conversation.start(self, messages[:2])
        reply = self.encode("Action: up")
        if self.end_of_turn_id is not None:
            reply.append(self.end_of_turn_id)
        conv.add_generation(reply, stopped=self.end_of_turn_id is not None)
        conv.add_message("user", "second observation")
        conv.add_message("user", "an experience")
        built = self.tokenizer.decode(conv.ids + self.generation_prompt_ids)
        expected = self.tokenizer.decode(self.encode(self._render(messages, add_generation_prompt=True)))
        # The one difference allowed: the earlier turn keeps the header it was generated under.
        expected = expected.replace(self.history_head + "Action: up", self.generation_prompt_text + "Action: up", 1)
        if built != expected:
            raise ChatTemplateError(
                "the chat template is not append-only: a conversation built turn by turn renders differently "
                f"from the same conversation rendered whole.\nbuilt:    {built!r}\nexpected: {expected!r}"
            )


@dataclass
class Conversation:
    """A growing history: token ids, their loss bits, and the message boundaries.

    `ids` holds whole messages; the generation prompt is added only when a reply is appended, so any
    message boundary is a valid rollback point (`prefix`) and an experience message can be added
    right after it.
    """

    fmt: ChatFormat
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    #: Template text owed before the next message: what follows the last generated token.
    pending: str = ""
    #: Lengths of `ids` at which a non-assistant message ends (valid rollback points).
    boundaries: list[int] = field(default_factory=list)
    last_role: str = ""

    @classmethod
    def start(cls, fmt: ChatFormat, messages: Sequence[dict]) -> Conversation:
        ids = fmt.initial_ids(messages)
        return cls(fmt, ids, [0] * len(ids), "", [len(ids)], messages[-1]["role"])

    def add_message(self, role: str, content: str) -> None:
        """Append a non-agent message (observation, experience, reflection prompt); no loss."""
        text = self.pending + self.fmt.message_text(role, content, after_assistant=self.last_role == "assistant")
        new = self.fmt.encode(text)
        self.ids.extend(new)
        self.mask.extend([0] * len(new))
        self.pending, self.last_role = "", role
        self.boundaries.append(len(self.ids))

    def prompt_ids(self) -> list[int]:
        """The ids to generate the next agent turn from: the history plus the generation prompt."""
        if self.last_role == "assistant":
            raise ValueError("the last turn is the agent's; add an observation before generating again")
        return self.ids + self.fmt.generation_prompt_ids

    def add_generation(self, generated: Sequence[int], stopped: bool) -> tuple[int, int]:
        """Append the generation prompt (no loss) and the sampled ids exactly as sampled (loss).

        `stopped` says the reply ended with a stop token; otherwise (cut at max tokens) the
        template's whole turn ending is owed before the next message. Returns the reply's span.
        """
        prompt = self.fmt.generation_prompt_ids
        self.ids.extend(prompt)
        self.mask.extend([0] * len(prompt))
        start = len(self.ids)
        self.ids.extend(generated)
        self.mask.extend([1] * len(generated))
        ended_on_turn_end = stopped and generated and generated[-1] == self.fmt.end_of_turn_id
        self.pending = self.fmt._glue_after_stop if ended_on_turn_end else self.fmt.turn_end_text
        self.last_role = "assistant"
        return start, len(self.ids)

    def prefix(self, length: int) -> Conversation:
        """A copy cut back to a message boundary (the history h_tau for a rollback)."""
        if length not in self.boundaries:
            raise ValueError(f"{length} is not a message boundary of this conversation (boundaries: {self.boundaries})")
        return Conversation(
            self.fmt,
            self.ids[:length],
            self.mask[:length],
            "",
            [b for b in self.boundaries if b <= length],
            "user",
        )

    def copy(self) -> Conversation:
        return Conversation(self.fmt, list(self.ids), list(self.mask), self.pending, list(self.boundaries), self.last_role)


def template_reads_date(model: str | Path) -> bool:
    """Whether the chat template in the model directory writes a date (Llama 3.1's does, through
    `date_string` or `strftime_now`): such a run must pin one. Reads the files only (no tokenizer)."""
    model = Path(model)
    texts = []
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (model / name).is_file():
            texts.append((model / name).read_text(errors="replace"))
    return any("date_string" in t or "strftime_now" in t for t in texts)


def generation_stop_ids(model: str | Path) -> tuple[int, ...]:
    """The ids generation stops on, as the model's generation_config.json lists them (eos_token_id:
    one id or several); () when it has none. Every backend stops on these, not only on the
    tokenizer's eos."""
    path = Path(model) / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ChatTemplateError(f"{path} is not a JSON object; fix or delete it") from None
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list) and all(isinstance(i, int) for i in eos):
        return tuple(eos)
    return ()


def today_string() -> str:
    """Today in the form Llama 3.1's template writes it ("26 Jul 2024")."""
    import datetime

    return datetime.date.today().strftime("%d %b %Y")
