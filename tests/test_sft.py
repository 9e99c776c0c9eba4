"""The SFT path: batching by length and token budget, and that training fits the labelled tokens."""

from __future__ import annotations

import random

import pytest
import torch

from leafe.methods.sft import Row, make_batches, row_from_mask, train, weighted_nll
from leafe.settings import SFTSettings


def test_batches_cover_every_row_once_within_the_limits():
    rng = random.Random(0)
    lengths = [rng.choice([20, 30, 40, 900, 1500]) for _ in range(500)]
    batches = make_batches(lengths, batch_size=16, max_tokens=2000, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 2000
    # Short rows fill whole batches; long ones come a single row at a time here.
    assert any(len(b) == 16 for b in batches)
    assert all(len(b) == 1 for b in batches if max(lengths[i] for i in b) == 1500)
    assert make_batches(lengths, 16, 2000, seed=3) == batches  # deterministic for a seed
    assert make_batches(lengths, 16, 2000, seed=4) != batches


def test_weighted_nll_is_the_weighted_sum_over_loss_tokens():
    logits = torch.zeros(2, 3, 4)  # uniform: NLL of any token is log 4
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    loss = weighted_nll(logits, labels, torch.tensor([1.0, 0.5]), normalizer=3)
    assert loss.item() == pytest.approx((2 * 1.0 + 1 * 0.5) * torch.log(torch.tensor(4.0)).item() / 3)


def test_token_weights_scale_exactly_their_tokens_nll():
    from leafe.methods.sft import _Collator

    logits = torch.randn(2, 4, 6)
    rows = [Row([1, 2, 3, 4], [-100, 2, 3, 4], weight=0.5, token_weights=[1.0, 1.0, 10.0, 1.0]),
            Row([1, 2, 3], [-100, -100, 3])]
    batch = _Collator(rows, pad_id=0)([{"members": [0, 1]}])
    assert batch["weights"].tolist() == [[0.5, 0.5, 5.0, 0.5], [1.0, 1.0, 1.0, 1.0]]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 6), batch["labels"][:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="none").view(2, 3)
    expected = (0.5 * nll[0, 0] + 5.0 * nll[0, 1] + 0.5 * nll[0, 2] + 1.0 * nll[1, 1]) / 4
    assert weighted_nll(logits, batch["labels"], batch["weights"], 4).item() == pytest.approx(expected.item(), rel=1e-6)


def test_row_from_mask_labels_exactly_the_masked_tokens():
    row = row_from_mask([5, 6, 7, 8], [0, 1, 1, 0])
    assert row.labels == [-100, 6, 7, -100] and row.loss_tokens == 2
    with pytest.raises(ValueError, match="differ in length"):
        row_from_mask([1, 2], [1])


def test_training_fits_the_labelled_tokens_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.encode("Thought: go up.\nAction: up")
    rows = [row_from_mask(ids, [0] * 4 + [1] * (len(ids) - 4)) for _ in range(16)]

    def loss_of(model) -> float:
        batch = torch.tensor([rows[0].input_ids])
        with torch.no_grad():
            logits = model(batch).logits
        return weighted_nll(logits, torch.tensor([rows[0].labels]), torch.ones(1), rows[0].loss_tokens).item()

    before = loss_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    stats = train(str(tiny_model_dir), tokenizer, rows, tmp_path / "out",
                  SFTSettings(learning_rate=3e-3, epochs=8, batch_size=4, max_batch_tokens=256, logging_steps=1))
    assert stats["steps"] == 32 and stats["loss_tokens"] == 16 * (len(ids) - 4)
    after = loss_of(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert after < 0.5 * before
    assert AutoTokenizer.from_pretrained(tmp_path / "out").encode("Action: up") == tokenizer.encode("Action: up")


def test_training_without_rows_is_a_clear_error(tiny_model_dir, tmp_path):
    from leafe.errors import LeafeError

    with pytest.raises(LeafeError, match="no training rows"):
        train(str(tiny_model_dir), None, [], tmp_path, SFTSettings())
    assert Row([1], [-100]).loss_tokens == 0


def test_settings_check_the_training_knobs_sft_and_grpo_share():
    from leafe.errors import LeafeError
    from leafe.settings import GRPOSettings

    for cls in (SFTSettings, GRPOSettings):
        with pytest.raises(LeafeError, match=r"^--learning-rate must be > 0 \(got 0\)$"):
            cls(learning_rate=0).validate()
        cls().validate()
    # GRPO's bases are checked too: sampling's as well as the optimizer's
    with pytest.raises(LeafeError, match="--max-new-tokens must be >= 1"):
        GRPOSettings(max_new_tokens=0).validate()


def test_bf16_checkpoints_keep_tied_tensors_tied():
    from leafe.methods.sft import bf16_state

    embed = torch.randn(4, 3)
    state = bf16_state({"embed": embed, "head": embed, "norm": torch.ones(3), "steps": torch.tensor([3])})
    assert state["embed"].dtype == torch.bfloat16 and state["head"] is state["embed"]  # one tensor, as before
    assert state["steps"].dtype == torch.int64
