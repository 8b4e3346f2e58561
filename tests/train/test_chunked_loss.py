"""The chunked head + cross-entropy equals the model's own loss and gradients, without full logits."""

import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.train import chunked_loss
from lorakit.train.chunked_loss import causal_lm_loss, chunked_causal_lm_loss, supports_chunked_loss
from tests.models import randomize_adapters, tiny_gpt2, tiny_llama, tokens


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_same_loss_and_gradients_as_the_model(builder):
    model = builder()
    add_adapter(model, LoraConfig(r=4))
    randomize_adapters(model)
    ids = tokens(batch=3, length=20)
    labels = ids.clone()
    labels[:, :7] = -100  # a masked prompt
    labels[2, 12:] = -100
    assert supports_chunked_loss(model)

    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    ours = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
    ours.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6)


def test_chunking_does_not_change_the_result():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    labels = torch.randint(0, 50, (2, 9))
    whole = chunked_causal_lm_loss(hidden, head, labels, chunk_rows=1000)
    (grad_whole,) = torch.autograd.grad(whole, hidden)
    small = chunked_causal_lm_loss(hidden, head, labels, chunk_rows=4)
    (grad_small,) = torch.autograd.grad(small, hidden)
    torch.testing.assert_close(whole, small)
    torch.testing.assert_close(grad_whole, grad_small)
    plain = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(whole, plain)


def test_num_items_divides_the_sum():
    hidden = torch.randn(1, 5, 8)
    head = torch.nn.Linear(8, 11).requires_grad_(False)
    labels = torch.randint(0, 11, (1, 5))
    mean = chunked_causal_lm_loss(hidden, head, labels)
    assert torch.allclose(chunked_causal_lm_loss(hidden, head, labels, num_items=8), mean * 4 / 8)


def test_trainable_head_falls_back_to_the_model():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]))
    assert not supports_chunked_loss(model)
    ids = tokens()
    assert torch.allclose(causal_lm_loss(model, {"input_ids": ids, "labels": ids}),
                          model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_softmax_in_its_own_buffer_is_the_out_of_place_one_bit_for_bit(dtype):
    # the chunked head writes the log-softmax over the logits; the kernel reads each row before writing it
    logits = torch.randn(37, 4099, dtype=dtype) * 20
    expected = torch.log_softmax(logits, dim=-1)
    assert torch.equal(torch.log_softmax(logits, dim=-1, out=logits), expected)


@pytest.mark.parametrize("vocab_block", [2048, 7])  # one product per chunk; 8 blocks, the last one short
def test_values_and_gradient_equal_the_plain_float64_formula(vocab_block, monkeypatch):
    monkeypatch.setattr(chunked_loss, "VOCAB_BLOCK", vocab_block)
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50).double().requires_grad_(False)
    labels = torch.randint(0, 50, (3, 7))
    labels[1, 2:5] = -100
    ours = chunked_causal_lm_loss(hidden, head, labels, chunk_rows=5)
    logits = hidden[:, :-1] @ head.weight.T + head.bias
    targets = labels[:, 1:]
    keep = targets != -100
    plain = -(logits - logits.logsumexp(-1, keepdim=True))[keep].gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    grad = torch.autograd.grad(ours, hidden)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(plain, hidden)[0], rtol=1e-12, atol=1e-12)


def test_cpu_logits_in_vocabulary_blocks_equal_one_product(monkeypatch):
    # the blocked product into the reused buffer gives each chunk's logits as F.linear does
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50).requires_grad_(False)
    labels = torch.randint(0, 50, (2, 9))
    results = []
    for block in (50, 7):
        monkeypatch.setattr(chunked_loss, "VOCAB_BLOCK", block)
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk_rows=4)
        results.append((loss, *torch.autograd.grad(loss, hidden)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: one F.linear per chunk, as before
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk_rows=4)
    for ours, theirs in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.float(), results[0][0].detach(), rtol=2e-2, atol=2e-2)
