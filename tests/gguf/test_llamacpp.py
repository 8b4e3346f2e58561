"""The proof in llama.cpp itself (llama-cpp-python), not in our reader. Run by `make interop`.

Skipped when llama_cpp is not importable, and left out of a plain `pytest` run unless `-m llamacpp`
selects it (see conftest.py): building llama.cpp takes minutes, and each test loads the 540 MB F32
copy of the default model. The figures are printed (`pytest -s`) and come from
benchmarks/gguf_interop.py, which prints the same table for docs/gguf.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.llamacpp
pytest.importorskip("llama_cpp")

from benchmarks import gguf_interop  # noqa: E402  (needs llama_cpp)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import lorakit
    from lorakit.hf import load_model

    work = tmp_path_factory.mktemp("interop")
    model, tokenizer = load_model("default")
    gguf_interop.random_adapter(model)
    adapter = lorakit.save_adapter(model, work / "adapter")
    return {"model": model, "tokenizer": tokenizer, "adapter": adapter, "base": gguf_interop.f32_base(work),
            "work": work}


def test_adapter_changes_llamacpp_logits_as_lorakits(setup: dict[str, Any]) -> None:
    figures = gguf_interop.adapter_effect(setup["model"], setup["tokenizer"], setup["adapter"], setup["base"],
                                          setup["work"], positions=300)
    print("\nadapter effect:", json.dumps(figures))
    assert figures["positions"] >= 250 and figures["folded"] > 0
    assert figures["exported"]["cosine"] >= 0.99
    assert 0.97 <= figures["exported"]["size_ratio"] <= 1.03
    # The control: the comparison does see a wrong file (measured 0.86-0.89 with q/k 2 of the 7 kinds).
    assert figures["unpermuted"]["cosine"] < 0.95


def test_merged_gguf_generates_what_base_plus_adapter_generates(setup: dict[str, Any]) -> None:
    figures = gguf_interop.merged_generation(setup["model"], setup["tokenizer"], setup["adapter"],
                                             setup["work"])
    print("\nmerged:", json.dumps(figures))
    for row in figures["prompts"]:
        assert row["same"], row
    # llama.cpp sums float32 in another order: its F32 base alone differs from lorakit's by ~0.03.
    assert figures["max_abs_logit_difference"] < 0.1


DEMO_ADAPTER = os.environ.get("LORAKIT_DEMO_ADAPTER", "runs/demo/adapter")


@pytest.mark.skipif(not Path(DEMO_ADAPTER, "adapter_config.json").is_file(),
                    reason=f"no demo adapter at {DEMO_ADAPTER} (make demo trains it; "
                           "or set LORAKIT_DEMO_ADAPTER)")
def test_demo_adapter_keeps_its_skill_in_llamacpp(setup: dict[str, Any]) -> None:
    scores = gguf_interop.demo_exact_match(Path(DEMO_ADAPTER), setup["base"], setup["work"])
    print("\ndemo:", json.dumps(scores))
    ours = scores["lorakit (fp32 base)"]
    assert abs(scores["llama.cpp, F32 copy"] - ours) <= 0.05
    assert abs(scores["llama.cpp, Q4_1 base"] - ours) <= 0.05
