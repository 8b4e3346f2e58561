"""lorakit-adapted models keep working with the tools people bring: generate, checkpointing,
transformers' Trainer and torch.compile."""

import torch

import lorakit
from lorakit import LoraConfig, add_adapter, fuse_gated_mlps
from lorakit.hf.checkpointing import enable_checkpointing
from tests.models import loss_and_grads, randomize_adapters, tiny_gpt2, tiny_llama, tokens


def test_generate_runs_and_follows_the_adapter():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4))
    randomize_adapters(model)
    ids = tokens(batch=1, length=5)
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 11)
    with lorakit.disable_adapters(model):
        base_generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == base_generated.shape


def test_gradient_checkpointing_trains_adapters():
    for reentrant in (None, True):
        model = tiny_llama()
        add_adapter(model, LoraConfig(r=4))
        enable_checkpointing(model, use_reentrant=reentrant)
        model.train()
        ids = tokens()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # raises "does not require grad" if the checkpointed blocks lose the graph
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A gets 0 while B = 0
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_checkpointing_recomputes_the_same_dropout_masks():
    # the fused path draws its masks in forward; the recompute must draw the same ones
    results = []
    for checkpointing in (False, True):
        model = tiny_llama()
        add_adapter(model, LoraConfig(r=4, dropout=0.3))
        randomize_adapters(model)
        fuse_gated_mlps(model)
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        torch.manual_seed(5)
        results.append(loss_and_grads(model, tokens()))
    (plain_loss, plain), (gc_loss, gc) = results
    torch.testing.assert_close(plain_loss, gc_loss, rtol=0, atol=0)
    for name in plain:
        torch.testing.assert_close(plain[name], gc[name], rtol=1e-5, atol=1e-7)


def test_transformers_trainer_lowers_loss_and_touches_only_adapters(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Repeat(Dataset):
        def __init__(self) -> None:
            self.ids = tokens(batch=8, length=16, seed=3)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=8, alpha=16))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = Repeat()
    batch = data.ids
    with torch.no_grad():
        before = model(input_ids=batch, labels=batch).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=15,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=batch, labels=batch).loss.item()
    assert after < before - 0.05
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)


def test_torch_compile_of_adapted_model_matches_eager():
    model = tiny_gpt2()
    add_adapter(model, LoraConfig(r=4, targets=["c_attn", "c_fc"]))
    randomize_adapters(model)
    ids = tokens()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model)
        out = compiled(input_ids=ids).logits
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    # training through the compiled module reaches the adapters
    model.train()
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert model.transformer.h[0].attn.c_attn.lora_A["default"].weight.grad is not None
