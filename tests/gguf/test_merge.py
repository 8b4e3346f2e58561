"""lorakit merge --output merged.gguf: a GGUF base with the adapter folded in, read back with gguf's
reader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

import lorakit
from lorakit.cli.main import main
from lorakit.gguf.merge_gguf import merge_to_gguf
from tests.gguf.helpers import (
    adapted_llama,
    expected_updates,
    gguf_name,
    gguf_order,
    heads_for,
    read_tensors,
    save,
)
from tests.hf.conftest import CHAT_TEMPLATE

CONFIG = lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", use_rslora=True, rank_pattern={"k_proj": 2},
                            alpha_pattern={"down_proj": 3})


def metadata(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}


def test_merged_file_equals_lorakits_merged_weights(tmp_path: Path, llama_gguf: Path) -> None:
    """On an F32 source (the tiny Llama's exact weights), merged.gguf holds merge_and_unload's weights."""
    model = adapted_llama(CONFIG)
    adapter = save(model, tmp_path / "ad")
    out = tmp_path / "merged.gguf"
    report = merge_to_gguf(llama_gguf, adapter, out, outtype="f32")
    assert report.merged == 14 and report.types == {"F32": len(read_tensors(llama_gguf))}
    merged = lorakit.merge_and_unload(model)
    tensors = read_tensors(out)
    for path, module in merged.named_modules():
        if isinstance(module, torch.nn.Linear) and path.startswith("model.layers."):
            want = module.weight.detach().double().numpy()
            heads = heads_for(gguf_name(path), merged)
            want = gguf_order(want, heads) if heads else want
            np.testing.assert_allclose(tensors[gguf_name(path)], want, rtol=0, atol=2e-7, err_msg=path)
    source = read_tensors(llama_gguf)
    for name in ("token_embd.weight", "output_norm.weight", "blk.1.attn_norm.weight"):
        np.testing.assert_array_equal(tensors[name], source[name])


def test_quantized_source_gets_the_float64_update(tmp_path: Path, llama_gguf_q8: Path) -> None:
    """A Q8_0 source: dequantized + scale * B A (q/k rows permuted), then re-encoded as asked."""
    model = adapted_llama(CONFIG)
    adapter = save(model, tmp_path / "ad")
    source = read_tensors(llama_gguf_q8)
    out = tmp_path / "merged.gguf"
    merge_to_gguf(llama_gguf_q8, adapter, out, outtype="f32")
    tensors = read_tensors(out)
    updates = expected_updates(model)
    for name, values in source.items():
        update = updates.get(name, 0.0)
        heads = heads_for(name, model)
        if heads and name in updates:
            update = gguf_order(updates[name], heads)
        np.testing.assert_allclose(tensors[name], values + update, rtol=1e-6, atol=1e-6, err_msg=name)


def test_metadata_tokenizer_and_template_are_kept(tmp_path: Path, llama_gguf_q8: Path) -> None:
    adapter = save(adapted_llama(CONFIG), tmp_path / "ad")
    out = tmp_path / "merged.gguf"
    merge_to_gguf(llama_gguf_q8, adapter, out, outtype="q8_0")
    before, after = metadata(llama_gguf_q8), metadata(out)
    assert after.pop("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    before.pop("general.file_type")
    assert after == before
    assert after["tokenizer.chat_template"] == CHAT_TEMPLATE
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    # Untouched Q8_0 matrices are copied byte for byte.
    source = {t.name: t.data for t in gguf.GGUFReader(llama_gguf_q8).tensors}
    written = {t.name: t.data for t in gguf.GGUFReader(out).tensors}
    for name in ("token_embd.weight", "blk.0.attn_norm.weight"):
        np.testing.assert_array_equal(written[name], source[name])


def test_f16_and_no_adapter(tmp_path: Path, llama_gguf: Path) -> None:
    out = tmp_path / "copy.gguf"
    report = merge_to_gguf(llama_gguf, None, out, outtype="f16")
    assert report.merged == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_up.weight"] == "F16" and types["output_norm.weight"] == "F32"
    source, copy = read_tensors(llama_gguf), read_tensors(out)
    for name, values in source.items():
        np.testing.assert_allclose(copy[name], values, rtol=1e-3, atol=1e-4, err_msg=name)


def test_cli_merges_to_gguf(tmp_path: Path, llama_gguf: Path, capsys) -> None:
    adapter = save(adapted_llama(CONFIG), tmp_path / "ad")
    out = tmp_path / "m.gguf"
    assert main(["merge", "--model", str(llama_gguf), "--adapter", str(adapter), "--output", str(out),
                 "--outtype", "f32"]) == 0
    assert "14 weights updated" in capsys.readouterr().out
    assert out.is_file()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, llama_gguf: Path, llama_folder: Path,
                                                  capsys) -> None:
    adapter = str(save(adapted_llama(CONFIG), tmp_path / "ad"))
    (tmp_path / "dir.gguf").mkdir()
    cases = {
        "folder base": (["--model", str(llama_folder)], "lorakit merges from a GGUF base only"),
        "outtype": (["--model", str(llama_gguf), "--outtype", "bf16"],
                    "unknown --outtype 'bf16'; accepted: f32, f16, q8_0"),
        "quantize": (["--model", str(llama_gguf), "--quantize", "nf4"], "--quantize does not apply"),
        "output folder": (["--model", str(llama_gguf), "--output", str(tmp_path / "dir.gguf")],
                          "is a folder"),
        "output is source": (["--model", str(llama_gguf), "--output", str(llama_gguf)],
                             "is the file being read"),
        "outtype for a folder": (["--model", str(llama_gguf), "--output", str(tmp_path / "merged"),
                                  "--outtype", "f16"], "--outtype applies to a .gguf --output only"),
    }
    size = llama_gguf.stat().st_size
    for case, (args, words) in cases.items():
        out = tmp_path / "m.gguf"
        argv = ["merge", "--adapter", adapter, *args] + ([] if "--output" in args else ["--output", str(out)])
        assert main(argv) == 1, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lorakit merge: error: "), (case, err)
        assert words in err, (case, err)
        assert not out.exists(), case
    assert llama_gguf.stat().st_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "dir.gguf"]
    assert not any((tmp_path / "dir.gguf").iterdir())


def test_lorakit_loads_the_merged_file_as_base_plus_adapter(tmp_path: Path, llama_gguf: Path,
                                                            monkeypatch) -> None:
    """An independent reader: lorakit's load_model (transformers' GGUF loader, which undoes the q/k
    permutation itself) sees the merged file as the base with the adapter active, tokenizer and chat
    template included."""
    from lorakit.hf import load_model
    from tests.models import logits

    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "cache"))
    model = adapted_llama(CONFIG)
    out = tmp_path / "merged.gguf"
    merge_to_gguf(llama_gguf, save(model, tmp_path / "ad"), out, outtype="f32")
    loaded, tokenizer = load_model(str(out))
    ids = tokenizer("what is the capital of france?", return_tensors="pt").input_ids
    with lorakit.disable_adapters(model):
        base = logits(model, ids)
    want = logits(model, ids)
    assert (want - base).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(logits(loaded, ids), want, rtol=1e-5, atol=1e-5)
    assert tokenizer.chat_template == CHAT_TEMPLATE
