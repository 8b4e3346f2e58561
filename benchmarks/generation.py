"""Merging and generation, lorakit and PEFT side by side in one process.

    python -m benchmarks.generation [--runs 3] [--warmup 1] [--merge-runs 3] [--new-tokens 32]

Both libraries get the same adapter (lorakit's kaiming A, and a random B, seeded, so the adapter
really changes the model). Measured, the two libraries taking turns:

- greedy generation, batch 1, a short chat prompt, exactly `new-tokens` new tokens
  (min_new_tokens = max_new_tokens), unmerged and then merged; tokens/s counts new tokens only
  (the prompt's prefill is inside the time);
- merge_and_unload, each run on a fresh deep copy of the adapted model, the order swapped every run;
- the largest logits difference, merged vs unmerged, on a fixed 2 x 64 batch, and lorakit vs PEFT;
- the largest difference between the two libraries' merged weights, and merged generation beside
  the plain base model (a merged model is a plain model: equal speed, up to noise);
- one LoRA layer call at a decode shape (1 x 1 x 576 through a 576 x 576 q_proj), lorakit, PEFT
  and a plain nn.Linear taking turns: the per-layer, per-token overhead of each library.

Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    Setting,
    adapter_tensors,
    add_lorakit,
    add_peft,
    batch_ids,
    build_model,
    copy_adapter,
    default_tokenizer,
    emit,
    median,
    model_shape,
    timed,
)

PROMPT = "Give me three tips for a good night's sleep."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--merge-runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    emit(measure(args.runs, args.warmup, args.merge_runs, args.new_tokens))


def measure(runs: int, warmup: int, merge_runs: int, new_tokens: int) -> dict[str, Any]:
    from lorakit import merge_and_unload
    from lorakit.hf.generate import format_chat

    setting = Setting()
    torch.set_grad_enabled(False)
    probe = batch_ids(0, Setting(batch=2, seq=64), vocab=49152)
    ours = build_model(setting).eval()
    base_logits = ours(input_ids=probe).logits
    ours = add_lorakit(ours, setting)
    theirs = add_peft(build_model(setting), setting)
    tensors = _with_random_b(adapter_tensors(ours))
    copy_adapter(ours, tensors)
    copy_adapter(theirs, tensors)
    models: dict[str, nn.Module] = {"lorakit": ours.eval(), "peft": theirs.eval()}
    assert model_shape(ours)["vocab"] == 49152

    tokenizer = default_tokenizer()
    prompt_ids = tokenizer(format_chat(tokenizer, PROMPT), add_special_tokens=False, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(model: nn.Module) -> torch.Tensor:
        return model.generate(**prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # type: ignore[operator]
                              do_sample=False, pad_token_id=pad)

    result: dict[str, Any] = {"prompt": PROMPT, "prompt_tokens": int(prompt_ids["input_ids"].shape[1]),
                              "new_tokens": new_tokens, "runs": runs, "warmup": warmup}
    unmerged = {name: model(input_ids=probe).logits for name, model in models.items()}
    result["adapter_effect_on_logits"] = (unmerged["lorakit"] - base_logits).abs().max().item()
    result["unmerged_lorakit_vs_peft"] = (unmerged["lorakit"] - unmerged["peft"]).abs().max().item()
    result["generate_unmerged"], tokens_unmerged = _generation(models, generate, runs, warmup, new_tokens)

    result["decode_layer_call_us"] = _decode_layer_call(runs=max(7, runs))
    merge_times: dict[str, list[float]] = {name: [] for name in models}
    merged: dict[str, nn.Module] = {}
    for i in range(merge_runs):  # each run merges a fresh copy, the libraries in turn, the order swapped
        for name, model in (models.items() if i % 2 == 0 else reversed(models.items())):
            fresh = copy.deepcopy(model)
            unload = merge_and_unload if name == "lorakit" else _peft_merge_and_unload
            seconds, merged[name] = timed(lambda fresh=fresh, unload=unload: unload(fresh))
            merge_times[name].append(seconds)
    result["merge_seconds"] = {name: {"median": median(t), "runs": t} for name, t in merge_times.items()}
    del models
    merged_logits = {name: model(input_ids=probe).logits for name, model in merged.items()}
    result["merged_vs_unmerged"] = {name: (merged_logits[name] - unmerged[name]).abs().max().item()
                                    for name in merged}
    result["merged_lorakit_vs_peft"] = (merged_logits["lorakit"] - merged_logits["peft"]).abs().max().item()
    peft_weights = merged["peft"].state_dict()
    result["merged_weights_lorakit_vs_peft"] = max(
        (value - peft_weights[key]).abs().max().item()
        for key, value in merged["lorakit"].state_dict().items())
    merged["base"] = build_model(setting).eval()  # the plain model both merged models should run like
    result["generate_merged"], tokens_merged = _generation(merged, generate, runs, warmup, new_tokens)
    result["same_tokens"] = {
        "unmerged_lorakit_vs_peft": bool(torch.equal(tokens_unmerged["lorakit"], tokens_unmerged["peft"])),
        "merged_lorakit_vs_peft": bool(torch.equal(tokens_merged["lorakit"], tokens_merged["peft"])),
        "lorakit_merged_vs_unmerged": bool(torch.equal(tokens_merged["lorakit"], tokens_unmerged["lorakit"])),
    }
    result["sample"] = tokenizer.decode(tokens_merged["lorakit"][0, prompt_ids["input_ids"].shape[1]:],
                                        skip_special_tokens=True)
    return result


def _decode_layer_call(runs: int, calls: int = 200) -> dict[str, Any]:
    """Microseconds per call of one adapted 576 x 576 linear on a (1, 1, 576) input, per library,
    beside a plain nn.Linear: what each library adds per layer per generated token."""
    import peft

    from lorakit import LoraConfig, add_adapter

    class OneLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(576, 576, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x)

    torch.manual_seed(0)
    ours = add_adapter(OneLinear(), LoraConfig(r=16, alpha=32, dropout=0.05, targets=["q_proj"])).eval()
    theirs = peft.get_peft_model(OneLinear(), peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                              target_modules=["q_proj"])).eval()
    layers: dict[str, nn.Module] = {"lorakit": ours.q_proj, "peft": theirs.base_model.model.q_proj,
                                    "plain": OneLinear().q_proj}
    x = torch.randn(1, 1, 576)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(runs):
        for name, layer in layers.items():
            start = time.perf_counter()
            for _ in range(calls):
                layer(x)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: {"median": median(t), "runs": t} for name, t in times.items()}


def _peft_merge_and_unload(model: nn.Module) -> nn.Module:
    return model.merge_and_unload()  # type: ignore[operator]


def _with_random_b(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B ~ N(0, 0.01^2), seeded by key order, so a fresh adapter is not the identity."""
    generator = torch.Generator().manual_seed(2)
    return {key: (torch.randn(t.shape, generator=generator) * 0.01 if ".lora_B." in key else t)
            for key, t in sorted(tensors.items())}


def _generation(models: dict[str, nn.Module], generate: Any, runs: int, warmup: int,
                new_tokens: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Median tokens/s per library, the libraries taking turns; also the generated ids."""
    times: dict[str, list[float]] = {name: [] for name in models}
    outputs: dict[str, torch.Tensor] = {}
    for i in range(warmup + runs):
        for name, model in models.items():
            seconds, outputs[name] = timed(lambda model=model: generate(model))
            if i >= warmup:
                times[name].append(seconds)
    stats = {name: {"median_seconds": median(t), "tokens_per_s": new_tokens / median(t), "runs": t}
             for name, t in times.items()}
    return stats, outputs


if __name__ == "__main__":
    main()
