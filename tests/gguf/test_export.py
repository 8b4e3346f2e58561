"""lorakit export --format gguf: llama.cpp's LoRA adapter format, read back with gguf's own reader.

The effective update llama.cpp computes from the file, (alpha / rank) * lora_b @ lora_a with
rank = lora_b's ne[0], must equal the adapter's scale * B @ A (float64), rows in GGUF's order.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import lorakit
from lorakit.cli.main import main
from lorakit.gguf.export_adapter import export_adapter
from tests.gguf.helpers import adapted_llama, expected_updates, gguf_order, heads_for, read_tensors, save

CONFIGS = {
    "plain": lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"),
    "rslora": lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", use_rslora=True),
    "patterns": lorakit.LoraConfig(r=4, alpha=8, targets="all-linear",
                                   rank_pattern={"k_proj": 2, "down_proj": 6},
                                   alpha_pattern={"v_proj": 3, r"layers\.1\.mlp\.up_proj": 20}),
    "rslora+patterns": lorakit.LoraConfig(r=8, alpha=4, targets="all-linear", use_rslora=True,
                                          rank_pattern={"q_proj": 2}, alpha_pattern={"o_proj": 1.5}),
}


def field(reader: gguf.GGUFReader, key: str) -> object:
    found = reader.get_field(key)
    assert found is not None, key
    return found.contents()


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_effective_update_equals_the_adapters(config: str, tmp_path: Path, llama_folder: Path) -> None:
    model = adapted_llama(CONFIGS[config])
    out = tmp_path / "a.gguf"
    report = export_adapter(save(model, tmp_path / "ad"), out, base=str(llama_folder), outtype="f32")
    reader = gguf.GGUFReader(out)
    alpha = float(field(reader, "adapter.lora.alpha"))  # type: ignore[arg-type]
    tensors = read_tensors(out)
    expected = expected_updates(model)
    assert report.pairs == len(expected) == 14
    assert set(tensors) == {f"{name}.lora_{ab}" for name in expected for ab in "ab"}
    for name, update in expected.items():
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        rank = b.shape[1]  # llama.cpp: b->ne[0]
        heads = heads_for(name, model)
        want = gguf_order(update, heads) if heads else update
        np.testing.assert_allclose(alpha / rank * (b @ a), want, rtol=1e-5, atol=1e-7, err_msg=name)
    folded = {"plain": 0, "rslora": 0}.get(config)
    if folded is not None:
        assert report.folded == folded  # one alpha expresses these: nothing folded


def test_metadata_names_and_orientation(tmp_path: Path, llama_folder: Path) -> None:
    model = adapted_llama(lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    out = tmp_path / "a.gguf"
    export_adapter(save(model, tmp_path / "ad"), out, base=str(llama_folder), outtype="f32")
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert reader.get_field("adapter.lora.alpha").types[0] == gguf.GGUFValueType.FLOAT32
    assert field(reader, "adapter.lora.alpha") == 8.0
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # GGUF order: ne[0] first
    # llama.cpp's loader: a.ne[0] == weight.ne[0] (in), b.ne[1] == weight.ne[1] (out), a.ne[1] == b.ne[0] (r)
    assert shapes["blk.0.attn_q.weight.lora_a"] == [32, 4] and shapes["blk.0.attn_q.weight.lora_b"] == [4, 32]
    assert (shapes["blk.1.ffn_down.weight.lora_a"] == [64, 4]
            and shapes["blk.1.ffn_down.weight.lora_b"] == [4, 32])
    assert sorted(shapes) == sorted(f"blk.{i}.{k}.weight.lora_{ab}" for i in (0, 1)
                                    for k in ("attn_q", "ffn_down") for ab in "ab")


def test_permutation_is_needed(tmp_path: Path, llama_folder: Path) -> None:
    """The q/k row permutation is not a no-op here: unpermuted B would give another update."""
    model = adapted_llama(lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj"]))
    out = tmp_path / "a.gguf"
    export_adapter(save(model, tmp_path / "ad"), out, base=str(llama_folder), outtype="f32")
    tensors = read_tensors(out)
    for name, update in expected_updates(model).items():
        got = 2.0 * tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]
        assert not np.allclose(got, update, atol=1e-4)
        np.testing.assert_allclose(got, gguf_order(update, heads_for(name, model)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("outtype", "a_type", "b_type", "tolerance"), [
    ("f16", "F16", "F16", 2e-3), ("bf16", "BF16", "BF16", 2e-2), ("q8_0", "Q8_0", "F16", 2e-2)])
def test_outtypes(outtype: str, a_type: str, b_type: str, tolerance: float, tmp_path: Path,
                  llama_folder: Path) -> None:
    model = adapted_llama(lorakit.LoraConfig(r=4, alpha=8, targets=["v_proj"]))
    out = tmp_path / "a.gguf"
    report = export_adapter(save(model, tmp_path / "ad"), out, base=str(llama_folder), outtype=outtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_v.weight.lora_a"] == a_type
    assert types["blk.0.attn_v.weight.lora_b"] == b_type  # Q8_0 needs rows of 32; rank 4 falls back to F16
    assert sum(report.types.values()) == 4
    tensors = read_tensors(out)
    for name, update in expected_updates(model).items():
        got = 2.0 * tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]
        assert np.abs(got - update).max() <= tolerance * np.abs(update).max()


@pytest.mark.slow
def test_default_model_base_is_read_from_its_gguf(tmp_path: Path) -> None:
    """--base default: the architecture, heads and shapes come from the shipped GGUF's header."""
    from lorakit.gguf.base_model import describe_base

    info = describe_base("default")
    assert info.arch.gguf_name == "llama"
    assert info.heads == {"head_count": 9, "head_count_kv": 3}
    assert info.shapes["blk.0.attn_k.weight"] == (192, 576)
    assert info.shapes["blk.29.ffn_down.weight"] == (576, 1536)


def test_cli_writes_and_replaces_atomically(tmp_path: Path, llama_folder: Path, capsys) -> None:
    adapter = save(adapted_llama(CONFIGS["patterns"]), tmp_path / "ad")
    out = tmp_path / "a.gguf"
    out.write_text("old")
    assert main(["export", str(adapter), "--format", "gguf", "-o", str(out),
                 "--base", str(llama_folder)]) == 0
    printed = capsys.readouterr().out
    assert "14 LoRA pairs for a llama base" in printed and "folded into lora_b" in printed
    assert gguf.GGUFReader(out).get_field("adapter.type") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "ad"]  # no temporary file left


def test_interrupted_write_keeps_the_old_file(tmp_path: Path, llama_folder: Path, monkeypatch) -> None:
    adapter = save(adapted_llama(CONFIGS["plain"]), tmp_path / "ad")
    out = tmp_path / "a.gguf"
    out.write_text("old")

    def crash(self: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_adapter(adapter, out, base=str(llama_folder))
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "ad"]


def test_export_never_writes_over_its_base_gguf(tmp_path: Path, llama_gguf: Path) -> None:
    base = tmp_path / "base.gguf"
    base.write_bytes(llama_gguf.read_bytes())
    adapter = save(adapted_llama(CONFIGS["plain"]), tmp_path / "ad")
    with pytest.raises(ValueError, match="is the file being read"):  # it replaced the base model
        export_adapter(adapter, base, base=str(base))
    assert base.read_bytes() == llama_gguf.read_bytes()


def _edit_config(folder: Path, **changes: object) -> Path:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def _bad_inputs(tmp: Path, base: Path) -> dict[str, tuple[list[str], str]]:
    """Case -> (export arguments after the adapter, words the error must contain)."""
    plain = save(adapted_llama(CONFIGS["plain"]), tmp / "plain")
    embedding = save(adapted_llama(lorakit.LoraConfig(r=2, targets=["embed_tokens", "q_proj"])), tmp / "emb")
    head = save(adapted_llama(lorakit.LoraConfig(r=2, targets=["lm_head", "q_proj"])), tmp / "head")
    saved = save(adapted_llama(lorakit.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"])),
                 tmp / "mts")
    biased = save(adapted_llama(lorakit.LoraConfig(r=2, targets=["q_proj"], bias="all")), tmp / "bias")
    dora = _edit_config(save(adapted_llama(CONFIGS["plain"]), tmp / "dora"), use_dora=True)
    from tests.models import tiny_bert, tiny_llama

    tiny_bert().save_pretrained(tmp / "bert")
    tiny_llama(hidden=48).save_pretrained(tmp / "wide")
    (tmp / "folder.gguf").mkdir()
    return {
        "outtype": ([str(plain), "--outtype", "q4_k", "--base", str(base)],
                    "unknown --outtype 'q4_k'; accepted:"),
        "format": ([str(plain), "--format", "onnx", "--base", str(base)], "unknown --format 'onnx'"),
        "folder": ([str(plain), "--base", str(base), "-o", str(tmp / "folder.gguf")], "is a folder"),
        "architecture": ([str(plain), "--base", str(tmp / "bert")], "'bert' model; lorakit writes GGUF for"),
        "shapes": ([str(plain), "--base", str(tmp / "wide")], "does not fit base model"),
        "embedding": ([str(embedding), "--base", str(base)], "embedding adapters"),
        "lm_head": ([str(head), "--base", str(base)], "no LoRA slot for 1 of its modules (lm_head)"),
        "modules_to_save": ([str(saved), "--base", str(base)], "modules_to_save"),
        "bias": ([str(biased), "--base", str(base)], "trains biases"),
        "dora": ([str(dora), "--base", str(base)], "DoRA"),
    }


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, llama_folder: Path, capsys) -> None:
    cases = _bad_inputs(tmp_path, llama_folder)
    capsys.readouterr()
    for case, (args, words) in cases.items():
        out = tmp_path / f"{case}.gguf"
        argv = ["export", *args] + ([] if "-o" in args else ["-o", str(out)])
        assert main(argv) == 1, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lorakit export: error: "), (case, err)
        assert words in err, (case, err)
        assert not out.exists() or out.is_dir() and not any(out.iterdir()), case  # the folder case: untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files either
