"""lorakit's training path and PEFT's give the same loss curve from the same adapter (dropout 0)."""

import torch

from lorakit import LoraConfig, add_adapter, fuse_gated_mlps
from lorakit.train.chunked_loss import causal_lm_loss
from tests.models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_ten_adamw_steps_give_the_same_losses_as_peft():
    # float64, so the comparison is of the maths: in float32 Adam amplifies the last-bit
    # differences of a different summation order (about 1e-3 after 10 steps at this learning rate)
    import peft

    ours = add_adapter(tiny_llama(vocab=256, hidden=64).double(),
                       LoraConfig(r=8, alpha=16, targets=TARGETS, init="random"))
    fuse_gated_mlps(ours)  # lorakit.train's whole path: fused LoRA linears and MLPs, chunked loss
    theirs = peft.get_peft_model(tiny_llama(vocab=256, hidden=64).double(),
                                 peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=TARGETS))
    mine = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(mine[name.removeprefix("base_model.model.")])
                copied += 1
    assert copied == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    runs = []
    for model, loss_of in ((ours, lambda m, ids: causal_lm_loss(m, {"input_ids": ids, "labels": ids})),
                           (theirs, lambda m, ids: m(input_ids=ids, labels=ids).loss)):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 256, (4, 24), generator=generator) for _ in range(2)]
        losses = []
        for step in range(10):
            ids = batches[step % 2]
            loss = loss_of(model, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    ours_losses, peft_losses = runs
    assert ours_losses[-1] < ours_losses[0] - 0.05  # it did learn
    assert max(abs(a - b) for a, b in zip(ours_losses, peft_losses, strict=True)) < 1e-4
