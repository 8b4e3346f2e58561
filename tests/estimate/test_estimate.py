"""The estimator: exact parameter counts from shipped configs, the LoRA paper's figures, the memory maths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, add_adapter, fuse_gated_mlps, trainable_parameters
from lorakit.estimate.footprint import (
    FULL,
    LORA,
    NF4_BITS,
    QLORA,
    ROWS,
    Estimate,
    estimate,
    estimate_for_model,
    format_bytes,
    format_estimate,
    meta_model,
    resolve_model_config,
    shipped_models,
)
from lorakit.fusion.fused_attention import group_attention_inputs
from lorakit.hf.model_config import MODEL_CONFIGS
from lorakit.quant import quantize_model
from tests.models import tiny_llama

# Published parameter counts (tied embeddings counted once).
PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "gpt2": 124_439_808,
    "smollm2-135m": 134_515_008,
}
SUMMARY = re.compile(r"^weights \S+ [kMGT]?B \+ gradients \S+ [kMGT]?B \+ optimizer \S+ [kMGT]?B "
                     r"\+ activations \S+ [kMGT]?B = \S+ [kMGT]?B$")


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["gpt3-175b"])
def test_shipped_config_builds_its_architecture_with_the_published_size(name: str):
    declared = json.loads((MODEL_CONFIGS / f"{name}.json").read_text())
    model = meta_model(resolve_model_config(name))
    assert type(model).__name__ == declared["architectures"][0]
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    if name in PUBLISHED:
        assert count == PUBLISHED[name]
    else:  # GPT-3 175B as the LoRA paper describes it, in OPT's layout (learned positions, tied head)
        config = model.config
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.ffn_dim,
                config.vocab_size, config.max_position_embeddings) == (96, 12288, 96, 49152, 50257, 2048)
        assert count == 174_604_283_904


def test_every_shipped_config_is_tested():
    assert shipped_models() == sorted([*PUBLISHED, "gpt3-175b"])


@pytest.mark.parametrize(("model", "r", "targets", "expected"), [
    ("llama-3.1-8b", 16, ["q_proj", "k_proj", "v_proj", "o_proj"], 13_631_488),  # k, v are 1024 wide (GQA)
    ("gpt3-175b", 8, ["q_proj", "v_proj"], 37_748_736),  # the LoRA paper's r=8 on Wq, Wv
    ("gpt3-175b", 1, "q_proj,v_proj", 4_718_592),  # and r=1
    ("smollm2-135m", 16, "all-linear", 4_884_480),  # what PEFT trains on the default model
    ("gpt2", 8, ["c_attn"], 12 * 8 * (768 + 3 * 768)),  # Conv1D, fused q/k/v
])
def test_trainable_parameters_are_exact(model: str, r: int, targets: str | list[str], expected: int):
    est = estimate(model, r=r, targets=targets)
    assert est.trainable_params == expected
    assert est.all_params == est.base_params + expected


def test_activation_formula_by_hand():
    # SmolLM2: hidden 576, 30 layers, q 9 x 64 = 576 wide, k and v 3 x 64 = 192, MLP 1536, vocab 49152.
    attention = 2 * 576 + 2 * 576 + 2 * 192  # norm in, q/k/v in, q, k, v, o in
    mlp = 2 * 576 + 4 * 1536  # norm in, gate/up in, gate out, silu out, up out, down in
    logits = 4 * 49152  # fp32
    # Full fine-tuning, fp32: the RMSNorms train, so each also keeps its output (two per layer, one final).
    full = 30 * (attention + mlp + 2 * 576) * 4 + 3 * 576 * 4 + logits
    assert estimate("smollm2-135m", dtype="fp32", seq_len=1).memory[FULL].activations == full
    # LoRA r=16 on the 7 linear kinds, fp32: each adapter adds A's output, 16 values.
    lora = 30 * (attention + mlp) * 4 + 30 * 7 * 16 * 4 + 2 * 576 * 4 + logits
    assert estimate("smollm2-135m", dtype="fp32", seq_len=1).memory[LORA].activations == lora
    # bf16 trains under autocast: the fp32 adapters run in bf16 on the layer's own input, so
    # they keep no copy of it, only their A outputs in bf16.
    lora16 = 30 * (attention + mlp + 7 * 16) * 2 + 2 * 576 * 2 + logits
    assert estimate("smollm2-135m", dtype="bf16", seq_len=1).memory[LORA].activations == lora16
    # Gradient checkpointing: each layer's input, plus one layer (and its adapters) recomputed.
    checkpointed = 30 * 576 * 4 + (attention + mlp + 7 * 16) * 4 + 2 * 576 * 4 + logits
    est = estimate("smollm2-135m", dtype="fp32", seq_len=1, gradient_checkpointing=True)
    assert est.memory[LORA].activations == checkpointed


@pytest.fixture(scope="module")
def llama8b() -> dict[str, Estimate]:
    settings = dict(r=16, targets="q_proj,k_proj,v_proj,o_proj", batch_size=4, seq_len=2048)
    return {"bf16": estimate("llama-3.1-8b", **settings),
            "fp32": estimate("llama-3.1-8b", dtype="fp32", **settings)}


def test_conventions_for_weights_gradients_and_optimizer(llama8b):
    base, trainable = 8_030_261_248, 13_631_488
    bf16, fp32 = llama8b["bf16"].memory, llama8b["fp32"].memory
    assert (bf16[FULL].weights, bf16[FULL].gradients, bf16[FULL].optimizer) == (2 * base, 2 * base, 12 * base)
    assert (fp32[FULL].weights, fp32[FULL].gradients, fp32[FULL].optimizer) == (4 * base, 4 * base, 8 * base)
    assert bf16[LORA].weights == 2 * base + 4 * trainable  # adapters train in fp32
    for method in (LORA, QLORA):
        assert (bf16[method].gradients, bf16[method].optimizer) == (4 * trainable, 8 * trainable)


def test_lora_needs_less_than_full_and_qlora_less_than_lora(llama8b):
    for est in llama8b.values():
        assert est.memory[QLORA].total < est.memory[LORA].total < est.memory[FULL].total


def test_qlora_stores_linear_weights_in_about_4_bits(llama8b):
    model = meta_model(resolve_model_config("llama-3.1-8b"))
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and not name.endswith("lm_head"))
    est = llama8b["fp32"]
    nf4 = est.memory[QLORA].weights - (est.base_params - linear) * 4 - est.trainable_params * 4
    assert nf4 == round(linear * NF4_BITS / 8)
    assert 7.5 < linear * 4 / nf4 < 8  # 32 / 4.127 = 7.75: about 1/7.75 of fp32


def test_gradient_checkpointing_lowers_only_activations():
    plain = estimate("llama-3.1-8b", r=8, batch_size=2, seq_len=1024)
    checkpointed = estimate("llama-3.1-8b", r=8, batch_size=2, seq_len=1024, gradient_checkpointing=True)
    for method in (FULL, LORA, QLORA):
        assert checkpointed.memory[method].activations < plain.memory[method].activations / 5
        assert checkpointed.memory[method].weights == plain.memory[method].weights


def test_activations_grow_linearly_with_batch_and_nothing_else_does():
    one, three = (estimate("smollm2-135m", batch_size=b, seq_len=256) for b in (1, 3))
    for method in (FULL, LORA, QLORA):
        assert three.memory[method].activations == 3 * one.memory[method].activations
        for row in ("weights", "gradients", "optimizer"):
            assert getattr(three.memory[method], row) == getattr(one.memory[method], row)


def test_quant_selects_the_summarised_method():
    lora, qlora = estimate("gpt2", r=4), estimate("gpt2", r=4, quant="nf4")
    assert (lora.method, qlora.method) == (LORA, QLORA)
    assert lora.summary() == lora.memory[LORA].summary()
    assert qlora.summary() == qlora.memory[QLORA].summary()
    assert SUMMARY.match(qlora.summary())


def test_format_estimate_prints_counts_and_a_table(llama8b):
    text = format_estimate(llama8b["bf16"])
    assert "trainable params: 13,631,488 || all params: 8,043,892,736 || trainable%: 0.1695" in text
    header = next(line for line in text.splitlines() if line.startswith("memory in GB"))
    assert re.search(r"full fine-tuning\s+LoRA \*\s+QLoRA$", header)
    rows = {line.split()[0]: re.findall(r"\d[\d,]*\.\d\d", line) for line in text.splitlines()
            if line.split()[:1] and line.split()[0] in ROWS}
    assert list(rows) == list(ROWS) and all(len(values) == 3 for values in rows.values())
    assert rows["total"] == ["181.21", "64.67", "54.31"]  # full: 16.06 + 16.06 + 96.36 + 52.72


def test_bad_settings_are_all_listed():
    with pytest.raises(ValueError) as info:
        estimate("gpt2", batch_size=0, dtype="int8", quant="gptq")
    message = str(info.value)
    for part in ("batch_size must be an integer >= 1, got 0",
                 "dtype must be one of bf16, fp16, fp32, got 'int8'",
                 "quant must be one of nf4 or None, got 'gptq'"):
        assert part in message


def test_fsdp_per_device_memory_by_hand(llama8b):
    """Llama-3.1-8B, LoRA r=16 on q,k,v,o, on 8 ranks: 1/8 of everything, the root unit and two
    layers whole."""
    hidden, kv, mlp, vocab, layers = 4096, 1024, 14336, 128_256, 32
    layer_base = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden  # + its two norms
    layer_adapter = 16 * (2 * (hidden + hidden) + 2 * (hidden + kv))
    root = 2 * vocab * hidden + hidden  # embeddings, head, final norm (bf16, nothing trains there)
    assert layers * layer_base + root == 8_030_261_248 and layers * layer_adapter == 13_631_488
    fsdp = estimate("llama-3.1-8b", r=16, targets="q_proj,k_proj,v_proj,o_proj", batch_size=4, seq_len=2048,
                    nproc=8, distributed="fsdp")
    one = llama8b["bf16"].memory[LORA]
    lora = fsdp.memory[LORA]
    assert lora.weights == -(-one.weights // 8) + 2 * root + 2 * (2 * layer_base + 4 * layer_adapter)
    # a layer's whole gradients, reduce-scattered
    assert lora.gradients == one.gradients // 8 + 4 * layer_adapter
    # batch 4 on each rank
    assert lora.optimizer == one.optimizer // 8 and lora.activations == one.activations
    qlora = fsdp.memory[QLORA]
    layer_nf4 = round((layer_base - 2 * hidden) * NF4_BITS / 8) + 2 * 2 * hidden + 4 * layer_adapter
    assert qlora.weights == -(-llama8b["bf16"].memory[QLORA].weights // 8) + 2 * root + 2 * layer_nf4
    full = fsdp.memory[FULL]
    assert full.gradients == -(-2 * 8_030_261_248 // 8) + 2 * root + 2 * layer_base  # the root trains in full
    text = format_estimate(fsdp)
    assert "per device, 8 ranks, FSDP2: 1/N of everything per device" in text
    assert "per device, GB (10^9 bytes)" in text and "docs/distributed.md" in text


def test_ddp_holds_everything_on_every_device_and_buckets_the_gradients(llama8b):
    ddp = estimate("llama-3.1-8b", r=16, targets="q_proj,k_proj,v_proj,o_proj", batch_size=4, seq_len=2048,
                   nproc=4)  # --nproc alone is DDP, as in lorakit train
    assert ddp.distributed == "ddp"
    for method, one in llama8b["bf16"].memory.items():
        per_device = ddp.memory[method]
        assert (per_device.weights, per_device.optimizer, per_device.activations) == (
            one.weights, one.optimizer, one.activations)
        assert per_device.gradients == 2 * one.gradients


def test_more_ranks_need_less_per_device_under_fsdp_only():
    totals = [estimate("smollm2-135m", quant="nf4", nproc=n, distributed="fsdp").memory[QLORA].total
              for n in (2, 4, 8)]
    assert totals[0] > totals[1] > totals[2]
    assert estimate("smollm2-135m", nproc=1).memory == estimate("smollm2-135m").memory


def test_bad_distributed_settings_are_listed():
    with pytest.raises(ValueError) as info:
        estimate("gpt2", nproc=0, distributed="zero")
    assert "nproc must be an integer >= 1, got 0" in str(info.value)
    assert "distributed must be one of ddp, fsdp or None, got 'zero'" in str(info.value)
    with pytest.raises(ValueError, match="distributed 'fsdp' shards over several devices: give nproc >= 2"):
        estimate("gpt2", distributed="fsdp")


def test_unmatched_targets_name_the_models_linear_modules():
    with pytest.raises(ValueError, match="c_attn"):
        estimate("gpt2", targets="q_proj,v_proj")


def test_default_and_shipped_names_resolve_in_any_case():
    default = resolve_model_config("default")
    assert (default.hidden_size, default.num_hidden_layers, default.tie_word_embeddings) == (576, 30, True)
    assert resolve_model_config("Llama-3.1-8B").intermediate_size == 14336
    assert estimate("default").model == "default (smollm2-135m)"


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"unknown model 'llama-9'.*gpt3-175b.*smollm2-135m"):
        resolve_model_config("llama-9")


def test_config_file_and_model_folder_resolve(tmp_path: Path):
    tiny_llama().config.save_pretrained(tmp_path)
    assert resolve_model_config(tmp_path).hidden_size == 32
    assert resolve_model_config(tmp_path / "config.json").num_hidden_layers == 2
    assert estimate(str(tmp_path), r=2, targets=["q_proj"]).trainable_params == 2 * 2 * (32 + 32)


def test_bad_paths_say_what_is_wrong(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="model_type"):
        resolve_model_config(tmp_path)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="cannot read a model config from the GGUF file"):
        resolve_model_config(tmp_path / "broken.gguf")


def test_gguf_config_is_read_from_its_metadata(tiny_gguf_source: Path, cache_dir: Path):
    config = resolve_model_config(tiny_gguf_source)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 32, 2)


def test_estimate_for_model_counts_the_real_parameters():
    model = tiny_llama()
    model.requires_grad_(True)
    params = sum(p.numel() for p in model.parameters())
    est = estimate_for_model(model, batch_size=2, seq_len=16)
    assert est.method == FULL and est.trainable_params == params
    memory = est.memory[FULL]
    assert (memory.gradients, memory.optimizer) == (4 * params, 8 * params)
    assert memory.weights >= 4 * params  # plus the rotary buffer

    add_adapter(model, LoraConfig(r=4, targets="all-linear"))
    est = estimate_for_model(model, batch_size=2, seq_len=16)
    trainable, total = trainable_parameters(model)
    assert ((est.method, est.trainable_params, est.all_params, est.base_params)
            == (LORA, trainable, total, params))
    assert est.memory[LORA].gradients == 4 * trainable
    assert SUMMARY.match(est.summary())
    assert "LoRA 'default' r=4" in format_estimate(est)


def test_estimate_for_model_counts_fp32_adapter_copies_bigger_without_autocast():
    model = tiny_llama(hidden=64).to(torch.bfloat16)
    add_adapter(model, LoraConfig(r=4, targets="all-linear"))  # adapters in fp32 beside the bf16 base
    plain, mixed = (estimate_for_model(model, 2, 16, autocast=a).memory[LORA].activations
                    for a in (False, True))
    # Per token and layer, without autocast the adapters keep fp32 copies of 3 distinct inputs 64
    # wide (q/k/v share one, gate/up share one, o) and one 128 wide (down), and 7 x 4 A outputs
    # at 4 bytes; under autocast no copies, and the A outputs at 2 bytes.
    assert plain - mixed == 2 * 16 * 2 * ((3 * 64 + 128) * 4 + 7 * 4 * (4 - 2))
    assert estimate_for_model(model, 2, 16).memory[LORA].activations == plain  # CPU: no autocast


def test_estimate_for_model_prices_a_4bit_base_by_its_storage():
    plain, quantized = tiny_llama(hidden=64), tiny_llama(hidden=64)
    quantize_model(quantized)
    for model in (plain, quantized):
        add_adapter(model, LoraConfig(r=4, targets="all-linear"))
    lora, qlora = (estimate_for_model(m, batch_size=1, seq_len=8) for m in (plain, quantized))
    assert (lora.method, qlora.method) == (LORA, QLORA)
    assert qlora.all_params == lora.all_params
    assert qlora.memory[QLORA].weights < 0.6 * lora.memory[LORA].weights


def _saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward, the model's own weights excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(kept.values())


@pytest.mark.parametrize("setup", ["full", "lora", "lora+dropout", "lora+dropout+fused mlp",
                                   "lora+dropout+fused mlp+grouped attention"])
def test_activation_estimate_is_close_to_what_autograd_keeps(setup: str):
    model = tiny_llama(vocab=1000, hidden=192, layers=3)
    if setup == "full":
        model.requires_grad_(True)
    else:
        add_adapter(model, LoraConfig(r=8, targets="all-linear", dropout=0.1 if "dropout" in setup else 0.0))
    if "fused" in setup:
        assert fuse_gated_mlps(model) == 3
    if "grouped" in setup:  # as lorakit train runs it: both norm outputs of each layer rebuilt, not kept
        assert group_attention_inputs(model) == 3
    ids = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    est = estimate_for_model(model, batch_size=2, seq_len=128)
    ratio = est.memory[est.method].activations / _saved_activation_bytes(model, ids)
    assert 0.85 < ratio < 1.15


def test_estimate_for_model_needs_a_transformers_config():
    with pytest.raises(ValueError, match="needs a transformers model.*Linear"):
        estimate_for_model(nn.Linear(2, 2), batch_size=1, seq_len=1)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 999, 19.5e6, 538e6, 1.2e9, 63e9, 2.87e12)] == \
        ["0 B", "999 B", "20 MB", "538 MB", "1.2 GB", "63 GB", "2.9 TB"]


def test_estimate_command_gives_memory_per_device(capsys):
    from lorakit.cli.main import main

    assert main(["estimate", "--model", "smollm2-135m", "--quant", "nf4", "--nproc", "2",
                 "--distributed", "fsdp"]) == 0
    assert "per device, 2 ranks, FSDP2" in capsys.readouterr().out
    assert main(["estimate", "--model", "smollm2-135m", "--distributed", "fsdp"]) == 1
    assert capsys.readouterr().err.strip().endswith("distributed 'fsdp' shards over several devices: "
                                                    "give nproc >= 2")
