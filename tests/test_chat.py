"""Token invariants: histories grow by appending, sampled ids are kept verbatim, masks are exact."""

import copy

import pytest

from leafe.backends.base import SamplingParams
from leafe.chat import ChatFormat, ChatTemplateError, Conversation
from leafe.envs import make
from leafe.rollout import RolloutEngine

LLAMA3_STYLE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '<|pad|>\n\n' + m['content'] | trim + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|pad|>\n\n' }}{% endif %}"
)


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def messages_of(conversation_turns):
    return [{"role": r, "content": c} for r, c in conversation_turns]


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE], ids=["chatml", "llama3-style"])
def test_incremental_ids_render_exactly_like_the_whole_conversation(tiny_tokenizer, template):
    tok = with_template(tiny_tokenizer, template) if template else tiny_tokenizer
    fmt = ChatFormat(tok)
    turns = [("system", "rules"), ("user", "obs 0")]
    conv = Conversation.start(fmt, messages_of(turns))
    for t, reply in enumerate(["Action: up", "Thought: hm\nAction: left"]):
        ids = fmt.encode(reply) + [fmt.end_of_turn_id]
        conv.add_generation(ids, stopped=True)
        turns.append(("assistant", reply))
        conv.add_message("user", f"obs {t + 1}")
        turns.append(("user", f"obs {t + 1}"))
    whole = tok.apply_chat_template(messages_of(turns), tokenize=False, add_generation_prompt=True)
    assert tok.decode(conv.prompt_ids()) == whole


def test_history_is_a_prefix_of_the_next_and_generated_ids_survive(tiny_backend):
    """With a real (random) model, whose replies can be any ids, the record keeps them verbatim."""
    engine = RolloutEngine(tiny_backend, max_new_tokens=12, temperature=1.0, seed=3)
    sampled = []
    original = tiny_backend.generate

    def recording(prompts, sampling):
        out = original(prompts, sampling)
        sampled.extend(c.token_ids for row in out for c in row)
        return out

    tiny_backend.generate = recording
    try:
        env = make("sokoban", max_steps=4)
        live = engine.start(env, env.make_tasks(1, 0)[0])
        histories = []
        while not live.done:
            histories.append(list(live.conv.ids))
            engine.step([live])
        episode = engine.finish(live)
    finally:
        tiny_backend.generate = original
    ids = episode.token_ids
    for before, after in zip(histories, histories[1:]):
        assert after[: len(before)] == before
    assert [ids[s.action_start : s.action_end] for s in episode.steps] == sampled
    mask = episode.loss_mask()
    assert sum(mask) == sum(len(x) for x in sampled)
    assert all(mask[i] for s in episode.steps for i in range(s.action_start, s.action_end))
    assert live.conv.mask == mask  # the conversation's own bits agree with the step spans
    for s in episode.steps:
        assert ids[s.context_len : s.action_start] == engine.fmt.generation_prompt_ids
        assert s.context_len in live.conv.boundaries


def test_a_reply_cut_at_max_tokens_gets_the_full_turn_ending(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer)
    conv = Conversation.start(fmt, messages_of([("system", "s"), ("user", "u")]))
    cut = fmt.encode("Thought: I will go")
    start, end = conv.add_generation(cut, stopped=False)
    conv.add_message("user", "next")
    assert conv.ids[start:end] == cut
    tail = tiny_tokenizer.decode(conv.ids[end:])
    assert tail.startswith("<|im_end|>\n<|im_start|>user\n")
    assert conv.mask[end:] == [0] * (len(conv.ids) - end)


def test_prefix_cuts_back_to_a_message_boundary(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer)
    conv = Conversation.start(fmt, messages_of([("system", "s"), ("user", "u")]))
    h0 = len(conv.ids)
    conv.add_generation(fmt.encode("Action: up") + [fmt.end_of_turn_id], stopped=True)
    conv.add_message("user", "o1")
    branch = conv.prefix(h0)
    branch.add_message("user", "an experience")
    assert branch.ids[:h0] == conv.ids[:h0]
    with pytest.raises(ValueError, match="not a message boundary"):
        conv.prefix(h0 + 1)
    with pytest.raises(ValueError, match="the last turn is the agent's"):
        c2 = Conversation.start(fmt, messages_of([("system", "s"), ("user", "u")]))
        c2.add_generation([1], stopped=False)
        c2.prompt_ids()


def test_a_tokenizer_without_a_template_is_refused(tiny_tokenizer):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatFormat(with_template(tiny_tokenizer, None))


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer):
    counting = "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ChatTemplateError, match="not append-only"):
        ChatFormat(with_template(tiny_tokenizer, counting))


def test_stop_tokens_include_the_end_of_turn(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer)
    assert fmt.end_of_turn_id == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fmt.end_of_turn_id in fmt.stop_token_ids
    assert SamplingParams(stop_token_ids=fmt.stop_token_ids).stop_token_ids == fmt.stop_token_ids
