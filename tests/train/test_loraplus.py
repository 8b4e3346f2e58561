"""LoRA+: B learns `loraplus_ratio` times faster than A through optimizer groups, which resume keeps."""

import json

import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.cli.main import main
from lorakit.train import TrainConfig, train
from lorakit.train.optimizer import parameter_groups
from tests.models import tiny_llama, tokens
from tests.train.helpers import tiny_model_and_tokenizer, write_data
from tests.train.test_train_loop import assert_same_adapter, config, final_adapter


def test_groups_follow_peft_a_at_lr_b_and_vectors_at_ratio_times_lr_embeddings_their_own():
    model = add_adapter(tiny_llama(), LoraConfig(r=4, targets=["q_proj", "o_proj", "embed_tokens"],
                                                 use_dora=False))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = {g["name"]: g for g in parameter_groups(model, params, 1e-3, 16.0, 1e-6)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["A"]["lr"] == 1e-3 and groups["B"]["lr"] == 16e-3 and groups["embedding"]["lr"] == 1e-6
    assert all(".lora_A." in names[id(p)] for p in groups["A"]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups["B"]["params"])
    assert all("lora_embedding_" in names[id(p)] for p in groups["embedding"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(params)
    assert parameter_groups(model, params, 1e-3, None, 1e-6) == [{"params": params, "lr": 1e-3}]


def test_dora_magnitudes_train_at_bs_rate():
    model = add_adapter(tiny_llama(), LoraConfig(r=4, targets=["q_proj"], use_dora=True))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = {g["name"]: g for g in parameter_groups(model, params, 1e-3, 4.0, 1e-6)}
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(any(p is q for q in groups["B"]["params"]) for p in magnitudes)


def test_one_adam_step_moves_b_ratio_times_further_than_a():
    # Adam's first step moves every weight by about lr (g / |g|), so the step sizes show the rates.
    model = add_adapter(tiny_llama(), LoraConfig(r=4, targets=["q_proj"], init="random"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, params, 1e-3, 16.0, 1e-6), weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()
             if p.requires_grad}
    for name, step in moved.items():
        expected = 16e-3 if ".lora_B." in name else 1e-3
        assert step == pytest.approx(expected, rel=1e-3), name


def test_checkpoints_and_resume_keep_the_groups(tmp_path, monkeypatch):
    data = write_data(tmp_path)
    settings = dict(save_every=2, loraplus_ratio=8.0, targets="q_proj,v_proj,embed_tokens")
    straight = config(tmp_path, data, output_dir=str(tmp_path / "straight"), **settings)
    train(straight, *tiny_model_and_tokenizer())
    state = json.loads((tmp_path / "straight" / "checkpoint-4" / "state.json").read_text())
    rates = {g["name"]: g["initial_lr"] for g in state["optimizer"]["param_groups"]}
    assert rates == {"A": 5e-3, "embedding": 1e-6, "B": 8 * 5e-3}

    import lorakit.train.loop as loop

    real_save = loop.save_checkpoint

    def crash_after_checkpoint_4(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if path.name == "checkpoint-4":
            raise KeyboardInterrupt
        return path

    interrupted = config(tmp_path, data, output_dir=str(tmp_path / "interrupted"), **settings)
    monkeypatch.setattr(loop, "save_checkpoint", crash_after_checkpoint_4)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, *tiny_model_and_tokenizer())
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    other_ratio = TrainConfig(**{**interrupted.to_dict(), "resume": True, "loraplus_ratio": 4.0})
    with pytest.raises(ValueError, match="loraplus_ratio"):
        train(other_ratio, *tiny_model_and_tokenizer())
    train(TrainConfig(**{**interrupted.to_dict(), "resume": True}), *tiny_model_and_tokenizer())
    assert_same_adapter(final_adapter(tmp_path / "interrupted"), final_adapter(tmp_path / "straight"))


@pytest.mark.parametrize("ratio", [0, -1.5, float("nan"), "16"])
def test_a_ratio_that_is_not_positive_is_a_clear_error(ratio, tmp_path):
    with pytest.raises(ValueError, match=rf"loraplus_ratio must be a number > 0 .* got {ratio!r}"):
        TrainConfig(data="x.jsonl", loraplus_ratio=ratio)


def test_the_cli_flags(tmp_path, capsys):
    data = write_data(tmp_path)
    assert main(["train", "--data", str(data), "--loraplus-ratio", "0",
                 "--output-dir", str(tmp_path / "r")]) != 0
    assert "loraplus_ratio must be a number > 0" in capsys.readouterr().err
    from lorakit.cli.train_cmd import FLAGS

    flags = {flag: field for flag, field, _, _ in FLAGS}
    assert flags["--loraplus-ratio"] == "loraplus_ratio" and flags["--dora"] == "use_dora"
    assert TrainConfig(data="x", use_dora=True).lora_config().use_dora


def test_a_run_with_dora_pissa_and_loraplus_writes_a_plain_adapter_for_the_original_base(tmp_path):
    from lorakit.formats.io import load_adapter
    from tests.models import logits

    data = write_data(tmp_path)
    model, tokenizer = tiny_model_and_tokenizer()
    result = train(config(tmp_path, data, use_dora=True, init="pissa_niter_2", loraplus_ratio=4.0,
                          dropout=0.0), model, tokenizer)
    written = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    # converted: 2r
    assert (written["use_dora"], written["r"], written["init_lora_weights"]) == (True, 8, True)
    fresh, _ = tiny_model_and_tokenizer()
    load_adapter(fresh, result.adapter_dir)
    ids = tokens(vocab=len(tokenizer))
    torch.testing.assert_close(logits(fresh, ids), logits(model.eval(), ids), rtol=0, atol=1e-4)
