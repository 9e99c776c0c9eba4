"""Log-probs at chosen positions only: the output head sees the scored positions, the fp32 softmax
goes by chunks, and both give what the whole batch's logits give, values and gradients."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from leafe.methods.sft import target_nll, weighted_nll
from leafe.methods.token_logprobs import logits_only_at, scored_positions, token_logprobs


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (3, 17), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 4:9] = ids[0, 4:9]
    labels[1, 10:] = ids[1, 10:]
    labels[2, 2:3] = ids[2, 2:3]
    return ids, labels


def test_the_head_sees_only_the_scored_positions_and_gives_their_logits(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids, labels = _batch()
    full = model(input_ids=ids).logits
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    at = scored_positions(labels != -100)
    with logits_only_at(model, at):
        selected = model(input_ids=ids).logits
    hook.remove()
    n = int((labels[:, 1:] != -100).sum())
    assert seen == [(n, model.config.hidden_size)] and n == 5 + 7 + 1
    assert torch.allclose(selected, full[:, :-1][labels[:, 1:] != -100], atol=1e-5)
    model(input_ids=ids)  # the hook is gone after the block
    assert model(input_ids=ids).logits.shape == full.shape


def test_chunked_log_softmax_gives_the_same_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(11, 50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=g)
    grads = []
    for chunk in (3, 4096):
        logp, entropy = token_logprobs(logits, targets, with_entropy=True, chunk=chunk)
        (logp * torch.arange(11.0)).sum().backward()
        grads.append(logits.grad.clone())
        logits.grad = None
        expected = torch.log_softmax(logits.detach(), -1).gather(-1, targets[:, None]).squeeze(-1)
        assert torch.allclose(logp.detach(), expected, atol=1e-6)
        p = torch.softmax(logits.detach(), -1)
        assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_sft_loss_from_scored_positions_equals_the_whole_batch_definition(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids, labels = _batch()
    for weights in (torch.tensor([1.0, 0.5, 2.0]), torch.rand(3, 17, generator=torch.Generator().manual_seed(2))):
        reference = weighted_nll(model(input_ids=ids).logits, labels, weights, 13)
        with logits_only_at(model, scored_positions(labels != -100)):
            selected = model(input_ids=ids).logits
        assert torch.allclose(target_nll(selected, labels, weights, 13), reference, atol=1e-6)

