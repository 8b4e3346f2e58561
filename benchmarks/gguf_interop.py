"""lorakit's GGUF files in llama.cpp itself (through llama-cpp-python), side by side with lorakit.

    .venv/bin/python -m benchmarks.gguf_interop [--positions 300] [--demo-adapter runs/demo/adapter] \
[--json PATH]

1. Adapter effect. An adapter on all 7 linear kinds of the default model (rsLoRA, a rank_pattern
   and an alpha_pattern, so scales are folded into lora_b) is exported with `lorakit export`. On
   an F32 copy of the default GGUF (written by `lorakit merge`'s GGUF writer with no adapter: on
   the 4-bit file llama.cpp quantizes activations to 8 bits, a fixed noise that drowns small
   effects), the change of the next-token logits, (with adapter - without), is compared between
   llama.cpp and lorakit over every position of a text: cosine and size ratio. The same adapter
   exported without the q/k row permutation is the control.
2. Merged model. base + adapter merged into one F32 GGUF, greedy-decoded in llama.cpp, against
   lorakit's greedy decoding of base + adapter.
3. With --demo-adapter (the adapter `make demo` trains): exact match on the demo's 80 held-out
   dates, lorakit vs llama.cpp (the shipped Q4_1 base, and the F32 copy) with the exported adapter.

Needs llama-cpp-python (`make interop` installs it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from benchmarks.common import ROOT

TEXT = (
    "The lighthouse keeper wrote in his log every evening, noting the wind, the colour of the sea and the "
    "ships that passed. "
    "In March the storms came early; a fishing boat lost its mast near the northern rocks and the "
    "crew rowed for six hours before they reached the harbour. The keeper's daughter, who was learning "
    "arithmetic, counted the flashes of the lamp: one every twelve seconds, three hundred an hour, seven "
    "thousand two hundred a day. She asked why ships needed a light when they had maps. Because maps do not "
    "tell you where you are, he said, only where things are. Years later she became an engineer and designed "
    "the automatic lamps that replaced him. The log books are kept in the town museum, where visitors read "
    "about the winter of 1953, when ice closed the bay for forty days and the supply boat could not reach "
    "the island. The family ate dried fish and potatoes, burned old furniture for heat and listened to the "
    "radio for news of the thaw. Python code such as `for i in range(10): print(i * i)` prints squares; "
    "SQL like SELECT name FROM users WHERE age > 30 ORDER BY name; returns rows. Photosynthesis turns carbon "
    "dioxide and water into glucose and oxygen, using the energy of sunlight captured by chlorophyll. "
    "Mountains form when tectonic plates collide, folding rock layers over millions of years."
)

ADAPTER = dict(r=8, alpha=16, targets="all-linear", use_rslora=True, rank_pattern={"o_proj": 4},
               alpha_pattern={"down_proj": 8})
"""The adapter of part 1: all 7 linear kinds; rsLoRA with per-module ranks and alphas (folded scales)."""


def random_adapter(model: Any, seed: int = 0, std: float = 0.02) -> None:
    """Add ADAPTER to `model` with every B random (a fresh adapter changes nothing)."""
    import lorakit

    lorakit.add_adapter(model, lorakit.LoraConfig(**ADAPTER))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def lorakit_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def llama(model_path: Path, lora: Path | None = None, n_ctx: int = 512) -> Any:
    from llama_cpp import Llama

    # One thread: ggml's workers spin at each barrier, which costs far more than it gains on a busy
    # 2-core machine; a 135M model is quick on one.
    return Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                 logits_all=True, n_threads=1, n_threads_batch=1, verbose=False, seed=0)


def llamacpp_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Cosine between two logit changes (all positions and tokens as one vector) and |theirs| / |ours|."""
    a, b = ours.ravel(), theirs.ravel()
    return {"cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "size_ratio": float(np.linalg.norm(b) / np.linalg.norm(a))}


def greedy_lorakit(model: Any, ids: list[int], new: int, eos: int | None) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(new):
            token = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
    return out[len(ids):]


def greedy_llamacpp(llm: Any, ids: list[int], new: int, eos: int | None) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


def f32_base(work: Path) -> Path:
    """An F32 copy of the default GGUF, written by lorakit's merged-GGUF writer with no adapter."""
    from lorakit.gguf.merge_gguf import merge_to_gguf

    return merge_to_gguf("default", None, work / "default-f32.gguf", outtype="f32").path


def adapter_effect(model: Any, tokenizer: Any, adapter: Path, base_f32: Path, work: Path,
                   positions: int = 300) -> dict[str, Any]:
    """Part 1: the logit change of the adapter in llama.cpp vs lorakit (and the unpermuted control)."""
    import lorakit
    from lorakit.gguf import export_adapter as export_module

    ids = tokenizer(TEXT).input_ids[:positions]
    with lorakit.disable_adapters(model):
        before = lorakit_logits(model, ids)
    ours = lorakit_logits(model, ids) - before
    exported = export_module.export_adapter(adapter, work / "adapter.gguf", base="default", outtype="f32")
    with mock.patch.object(export_module, "gguf_rows", lambda pair, rows, base: rows):
        unpermuted = export_module.export_adapter(adapter, work / "unpermuted.gguf", base="default",
                                                  outtype="f32")
    plain = llamacpp_logits(llama(base_f32), ids)
    figures: dict[str, Any] = {"positions": len(ids), "folded": exported.folded, "pairs": exported.pairs}
    for name, path in (("exported", exported.path), ("unpermuted", unpermuted.path)):
        theirs = llamacpp_logits(llama(base_f32, path), ids) - plain
        figures[name] = agreement(ours, theirs)
    figures["base_max_abs_logit_difference"] = float(np.abs(plain - before).max())
    return figures


def merged_generation(model: Any, tokenizer: Any, adapter: Path, work: Path, new: int = 24) -> dict[str, Any]:
    """Part 2: the merged F32 GGUF greedy-decoded in llama.cpp vs lorakit's base + adapter."""
    from lorakit.gguf.merge_gguf import merge_to_gguf

    merged = merge_to_gguf("default", adapter, work / "merged-f32.gguf", outtype="f32").path
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    llm = llama(merged)
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        ours = greedy_lorakit(model, ids, new, tokenizer.eos_token_id)
        theirs = greedy_llamacpp(llm, ids, new, tokenizer.eos_token_id)
        rows.append({"prompt": prompt, "same": ours == theirs, "lorakit": tokenizer.decode(ours),
                     "llama.cpp": tokenizer.decode(theirs)})
    merged_logits = llamacpp_logits(llm, tokenizer(TEXT).input_ids[:300])
    ours_logits = lorakit_logits(model, tokenizer(TEXT).input_ids[:300])
    return {"prompts": rows, "max_abs_logit_difference": float(np.abs(merged_logits - ours_logits).max())}


def demo_exact_match(adapter: Path, base_f32: Path, work: Path) -> dict[str, Any]:
    """Part 3: the demo adapter's exact match on the held-out dates, lorakit vs llama.cpp."""
    import lorakit
    from lorakit.data import eval_pairs, load_records
    from lorakit.gguf.export_adapter import export_adapter
    from lorakit.hf import load_model
    from lorakit.hf.default_model import default_model_path
    from lorakit.train.evaluate import exact_match, exact_match_score

    model, tokenizer = load_model("default")
    lorakit.load_adapter(model, adapter)
    records, _ = load_records(ROOT / "demo" / "data" / "test.jsonl")
    pairs = eval_pairs(records, tokenizer)
    ours = exact_match_score(model, tokenizer, pairs, max_new_tokens=16).score
    exported = export_adapter(adapter, work / "demo.gguf", base="default", outtype="f16").path
    scores = {"lorakit (fp32 base)": ours, "n": len(pairs)}
    for label, base in (("llama.cpp, Q4_1 base", default_model_path()), ("llama.cpp, F32 copy", base_f32)):
        llm = llama(base, exported)
        hits = 0
        for pair in pairs:
            out = greedy_llamacpp(llm, list(pair.prompt_ids), 16, tokenizer.eos_token_id)
            hits += exact_match(tokenizer.decode(out, skip_special_tokens=True), pair.answer)
        scores[label] = hits / len(pairs)
    return scores


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=300, help="tokens of text compared")
    parser.add_argument("--demo-adapter", default=None,
                        help="the demo's trained adapter (make demo: runs/demo)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    import lorakit
    from lorakit.hf import load_model

    started = time.perf_counter()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gguf-interop-") as folder:
        work = Path(folder)
        model, tokenizer = load_model("default")
        random_adapter(model)
        adapter = lorakit.save_adapter(model, work / "adapter")
        base = f32_base(work)
        figures["adapter_effect"] = adapter_effect(model, tokenizer, adapter, base, work, args.positions)
        print("adapter effect:", json.dumps(figures["adapter_effect"]), flush=True)
        figures["merged"] = merged_generation(model, tokenizer, adapter, work)
        print("merged:", json.dumps(figures["merged"]), flush=True)
        if args.demo_adapter:
            figures["demo"] = demo_exact_match(Path(args.demo_adapter), base, work)
            print("demo:", json.dumps(figures["demo"]), flush=True)
    figures["seconds"] = round(time.perf_counter() - started)
    _print(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def _print(figures: dict[str, Any]) -> None:
    effect = figures["adapter_effect"]
    print(f"\nAdapter effect on next-token logits, llama.cpp vs lorakit ({effect['positions']} positions, "
          f"F32 base, {effect['pairs']} pairs, {effect['folded']} scales folded):\n")
    print("| adapter file | cosine | size ratio (llama.cpp / lorakit) |\n|---|---:|---:|")
    for name in ("exported", "unpermuted"):
        label = "lorakit export" if name == "exported" else "control: q/k rows not permuted"
        print(f"| {label} | {effect[name]['cosine']:.4f} | {effect[name]['size_ratio']:.3f} |")
    merged = figures["merged"]
    same = sum(row["same"] for row in merged["prompts"])
    print(f"\nMerged F32 GGUF in llama.cpp: greedy tokens equal lorakit's base + adapter on {same}/"
          f"{len(merged['prompts'])} prompts; max |logit difference| "
          f"{merged['max_abs_logit_difference']:.2e}")
    if "demo" in figures:
        demo = figures["demo"]
        print(f"\nDemo adapter, exact match on {demo['n']} held-out dates:\n\n"
              "| run | exact match |\n|---|---:|")
        for label, score in demo.items():
            if label != "n":
                print(f"| {label} | {score:.1%} |")
    print(f"\n({figures['seconds']} s)")


if __name__ == "__main__":
    main()
