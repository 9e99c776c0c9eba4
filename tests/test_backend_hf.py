"""The transformers backend: exact greedy decoding, prefix reuse, seeds, log-probs, n samples."""

import pytest
import torch

from leafe.backends import BackendError, SamplingParams, load_backend
from leafe.backends.hf import HFBackend
from leafe.chat import ChatFormat, Conversation
from leafe.envs import make


def prompts_for(tokenizer, n_tasks=3):
    fmt = ChatFormat(tokenizer)
    env = make("sokoban")
    out = []
    for task in env.make_tasks(n_tasks, 0):
        conv = Conversation.start(fmt, [{"role": "system", "content": "sys"}, {"role": "user", "content": env.reset(task)}])
        out.append(conv.prompt_ids())
    return fmt, out


def greedy(fmt, max_new=16, **kw):
    return SamplingParams(temperature=0, max_new_tokens=max_new, stop_token_ids=fmt.stop_token_ids, **kw)


def test_greedy_matches_transformers_generate(tiny_model_dir, tiny_backend):
    fmt, prompts = prompts_for(tiny_backend.tokenizer)
    out = tiny_backend.generate(prompts, greedy(fmt))
    model = tiny_backend.model
    for prompt, (completion,) in zip(prompts, out):
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
            eos_token_id=list(fmt.stop_token_ids), pad_token_id=tiny_backend.pad_id,
        )[0, len(prompt):].tolist()
        assert completion.token_ids == ref
        assert completion.finish_reason == ("stop" if ref[-1] in fmt.stop_token_ids else "length")


def test_prefix_reuse_changes_cost_not_results(tiny_model_dir):
    cached = HFBackend(str(tiny_model_dir), device="cpu")
    plain = HFBackend(str(tiny_model_dir), device="cpu", prefix_cache_mb=0)
    fmt, prompts = prompts_for(cached.tokenizer)
    first = cached.generate(prompts, greedy(fmt))
    plain.generate(prompts, greedy(fmt))
    # Next turn: each prompt extends the previous prompt + reply (as in an episode).
    follow = [
        p + c[0].token_ids + fmt.encode(fmt._glue_after_stop + fmt.message_text("user", "You moved up.", True))
        + fmt.generation_prompt_ids
        for p, c in zip(prompts, first)
    ]
    before_cached, before_plain = cached.stats.prefill_tokens, plain.stats.prefill_tokens
    a = cached.generate(follow, greedy(fmt))
    b = plain.generate(follow, greedy(fmt))
    assert [x[0].token_ids for x in a] == [x[0].token_ids for x in b]
    new_cached = cached.stats.prefill_tokens - before_cached
    new_plain = plain.stats.prefill_tokens - before_plain
    assert new_plain == sum(len(p) for p in follow)
    assert new_cached < new_plain / 3  # only the new suffix of each prompt ran through the model


def test_identical_prompts_are_prefilled_once(tiny_model_dir):
    backend = HFBackend(str(tiny_model_dir), device="cpu", prefix_cache_mb=0)
    fmt, prompts = prompts_for(backend.tokenizer, 1)
    out = backend.generate([prompts[0]] * 4, SamplingParams(n=2, max_new_tokens=4, stop_token_ids=fmt.stop_token_ids))
    assert len(out) == 4 and all(len(row) == 2 for row in out)
    assert backend.stats.prefill_tokens == len(prompts[0])


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_backend):
    fmt, prompts = prompts_for(tiny_backend.tokenizer)
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7, stop_token_ids=fmt.stop_token_ids)
    a = tiny_backend.generate(prompts, sp)
    b = tiny_backend.generate(prompts, sp)
    c = tiny_backend.generate(prompts, SamplingParams(n=3, max_new_tokens=12, seed=8, stop_token_ids=fmt.stop_token_ids))
    ids = lambda out: [[x.token_ids for x in row] for row in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_logprobs_are_those_of_the_sampled_ids(tiny_backend):
    fmt, prompts = prompts_for(tiny_backend.tokenizer, 1)
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, seed=1, logprobs=True, stop_token_ids=fmt.stop_token_ids)
    (completion,) = tiny_backend.generate(prompts, sp)[0]
    full = torch.tensor([prompts[0] + completion.token_ids])
    with torch.no_grad():
        logits = tiny_backend.model(full).logits[0, len(prompts[0]) - 1 : -1]
    ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
    assert completion.logprobs == pytest.approx(ref.tolist(), abs=1e-4)


def test_generation_stops_at_stop_tokens_and_length(tiny_backend):
    fmt, prompts = prompts_for(tiny_backend.tokenizer, 2)
    out = tiny_backend.generate(prompts, SamplingParams(n=4, max_new_tokens=5, seed=0, stop_token_ids=fmt.stop_token_ids))
    for row in out:
        for c in row:
            assert len(c.token_ids) <= 5
            stopped = c.token_ids[-1] in fmt.stop_token_ids
            assert c.finish_reason == ("stop" if stopped else "length")
            assert not any(t in fmt.stop_token_ids for t in c.token_ids[:-1])


def test_too_long_and_empty_prompts_are_refused_as_backend_errors(tiny_backend):
    with pytest.raises(BackendError, match="exceeds the model's context") as raised:
        tiny_backend.generate([[5] * tiny_backend.max_context], SamplingParams(max_new_tokens=1))
    assert isinstance(raised.value, ValueError)  # a bad argument, for callers that catch those
    with pytest.raises(BackendError, match="empty prompt"):
        tiny_backend.generate([[]], SamplingParams(max_new_tokens=1))


def test_missing_model_paths_are_a_clear_error(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        load_backend("hf", str(tmp_path / "nope"))
    with pytest.raises(BackendError, match="no config.json"):
        load_backend("hf", str(tmp_path))
    with pytest.raises(BackendError, match="unknown backend"):
        load_backend("tpu", str(tmp_path))


def test_remote_code_is_refused_unless_allowed(tiny_model_dir, tmp_path):
    import json
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil-llama"
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    with pytest.raises(BackendError, match="--trust-remote-code"):
        HFBackend(str(model), device="cpu")
    assert not marker.exists()


def test_generation_raises_no_warning_from_our_calls(tiny_backend):
    """transformers warns at every call that passes its KV cache under the old name; the backend uses
    whichever name the installed transformers takes, so an evaluation prints nothing."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_backend.generate([[5, 6, 7], [8, 9]], SamplingParams(n=2, max_new_tokens=6, seed=1))


def test_rows_are_grouped_by_length_so_short_rows_do_not_read_long_ones():
    from leafe.backends.hf.decoding import length_groups

    assert length_groups([300] * 6) == [list(range(6))]
    mixed = [2000, 100, 2010, 120, 90, 1990] * 20  # episodes at their first and at a late turn
    groups = length_groups(mixed)
    assert sorted(r for g in groups for r in g) == list(range(len(mixed)))
    assert len(groups) == 2 and {mixed[g[0]] < 500 for g in groups} == {True, False}
    assert all({mixed[r] < 500 for r in g} == {mixed[g[0]] < 500} for g in groups)
    # A call that reads a large model's weights costs more than these rows' padding: one group.
    assert length_groups(mixed, group_cost=250_000) == [list(range(len(mixed)))]


def test_grouped_decoding_gives_what_one_padded_batch_gives(tiny_model_dir, monkeypatch):
    """Short and long prompts together: sampled ids and log-probs as if all rows shared one cache."""
    import leafe.backends.hf.backend as hf  # where generate looks the grouping up

    fmt, prompts = prompts_for(HFBackend(str(tiny_model_dir), device="cpu").tokenizer, n_tasks=4)
    # Two prompts at a late turn: the first turn's prompt plus ~25 turns of filler.
    filler = fmt.encode(" ".join(["Step 3: up, the box did not move."] * 25))
    mixed = [prompts[0], prompts[1] + filler, prompts[2], prompts[3] + filler]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, n=3, seed=7, logprobs=True,
                              stop_token_ids=fmt.stop_token_ids)

    def run(groups_of):
        monkeypatch.setattr(hf, "length_groups", groups_of)
        backend = HFBackend(str(tiny_model_dir), device="cpu", prefix_cache_mb=0)
        return [[(c.token_ids, c.logprobs) for c in row] for row in backend.generate(mixed, sampling)]

    original, seen = hf.length_groups, []

    def recorded(lengths, group_cost):
        seen.append(original(lengths, group_cost))
        return seen[-1]

    grouped = run(recorded)
    assert len(seen[0]) == 2  # the short and the long rows decoded apart
    one = run(lambda lengths, group_cost: [list(range(len(lengths)))])
    for row_a, row_b in zip(grouped, one):
        for (ids_a, lp_a), (ids_b, lp_b) in zip(row_a, row_b):
            assert ids_a == ids_b
            assert lp_a == pytest.approx(lp_b, abs=1e-5)
