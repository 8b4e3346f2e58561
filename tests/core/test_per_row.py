"""Per-row adapters: one batch, each row with its own adapter, equal to running each row alone."""

import contextlib

import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter, disable_adapters, set_adapter
from lorakit.core.per_row import adapters_per_row
from lorakit.core.rows import RowAdapters
from lorakit.kernels import row_stacks as rows_module
from tests.models import logits, randomize_adapters, tiny_bert, tiny_llama, tokens


def llama_with_adapters():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj", "v_proj", "embed_tokens"]), name="a")
    add_adapter(model, LoraConfig(r=4, alpha=8), name="b")
    add_adapter(model, LoraConfig(r=2, targets=["down_proj"]), name="c")
    randomize_adapters(model)
    set_adapter(model, "b")
    return model


def alone(model, rows, run):
    """run(row_batch) for each row by itself, with that row's adapter set the ordinary way."""
    previous = lorakit.active_adapters(model)
    outputs = []
    for i, name in enumerate(rows):
        if name is None:
            with disable_adapters(model):
                outputs.append(run(i))
        else:
            set_adapter(model, name)
            outputs.append(run(i))
    set_adapter(model, previous)
    return torch.cat(outputs)


def test_forward_matches_each_row_alone():
    model = llama_with_adapters()
    rows = ["a", "b", None, "a", "c"]
    ids = tokens(batch=5, length=7)
    expected = alone(model, rows, lambda i: logits(model, ids[i:i + 1]))
    with adapters_per_row(model, rows):
        batched = logits(model, ids)
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-5)


def test_one_adapter_for_every_row_equals_set_adapter():
    model = llama_with_adapters()
    ids = tokens(batch=3)
    set_adapter(model, "a")
    expected = logits(model, ids)
    set_adapter(model, "b")
    with adapters_per_row(model, ["a", "a", "a"]):
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-6)


def test_generate_matches_each_row_alone():
    model = llama_with_adapters()
    rows = ["a", "b", None, "c"]
    ids = tokens(batch=4, length=5, seed=3)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = alone(model, rows, lambda i: model.generate(ids[i:i + 1], **settings))
    with adapters_per_row(model, rows):
        generated = model.generate(ids, **settings)
    assert torch.equal(generated, expected)


def test_training_through_per_row_reaches_only_the_rows_adapters():
    model = llama_with_adapters()
    set_adapter(model, "a")  # per-row picks what runs; set_adapter still picks what trains
    ids = tokens(batch=2)
    with adapters_per_row(model, ["a", None]):
        model(input_ids=ids).logits.sum().backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_B["a"].weight.grad is not None and q.lora_B["a"].weight.grad.abs().sum() > 0


def test_modules_to_save_copies_per_row():
    model = tiny_bert()
    for name, seed in (("x", 1), ("y", 2)):
        add_adapter(model, LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]), name=name)
        with torch.no_grad():
            model.classifier.modules_to_save[name].weight.normal_(generator=torch.Generator().manual_seed(seed))
    randomize_adapters(model)
    rows = ["y", None, "x"]
    ids = tokens(batch=3)
    expected = alone(model, rows, lambda i: logits(model, ids[i:i + 1]))
    with adapters_per_row(model, rows):
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    assert model.classifier.active_adapters == ["y"]


def test_state_is_restored_on_exit_and_on_error():
    model = llama_with_adapters()
    ids = tokens(batch=2)
    before = logits(model, ids)
    with adapters_per_row(model, ["a", None]):
        pass
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(RuntimeError, match="boom"), adapters_per_row(model, ["a", None]):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), before)
    assert lorakit.active_adapters(model) == ["b"]
    assert all(layer.row_adapters is None for layer in lorakit.core.walk.lora_layers(model))


def test_clear_errors():
    model = llama_with_adapters()
    with pytest.raises(ValueError, match="given 2 rows, but .* saw a batch of 3.*num_beams"), \
            adapters_per_row(model, ["a", "b"]):
        model(input_ids=tokens(batch=3))
    with pytest.raises(ValueError, match="unknown: 'zz'; adapters on this model: a, b, c"):
        with adapters_per_row(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="empty list"), adapters_per_row(model, []):
        pass
    with pytest.raises(ValueError, match="cannot be nested"), adapters_per_row(model, ["a"]):
        with adapters_per_row(model, ["b"]):
            pass
    lorakit.merge(model)
    with pytest.raises(ValueError, match="merged.*unmerge"), adapters_per_row(model, ["a"]):
        pass


def stacked_layer():
    """A float64 linear holding three adapters of different ranks and scales, all trainable."""
    from lorakit import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(8, 6).double(), r=2, alpha=3.0, name="a")
    layer.add("b", r=4, scale=0.5, init="random")
    layer.add("c", r=3, scale=2.0, init="random")
    torch.nn.init.normal_(layer.b("a").weight)
    for param in layer.parameters():
        param.requires_grad_(True)
    return layer


@contextlib.contextmanager
def plan(layer, rows):
    """A standalone layer holds no model registry: give it the per-row plan adapters_per_row would."""
    layer.row_adapters = RowAdapters(rows, torch.device("cpu"))
    try:
        yield
    finally:
        layer.row_adapters = None


def test_gathered_rows_equal_the_float64_formula_with_gradients():
    layer = stacked_layer()
    rows = ["b", "a", None, "c", "b"]
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    with plan(layer, rows):
        y = layer(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}, x.grad.clone()
    layer.zero_grad()
    x.grad = None
    # The reference: each row's formula written out, W0 x + s B A x.
    reference = []
    for i, name in enumerate(rows):
        h = layer.base(x[i])
        if name is not None:
            a, b = layer.factors(name)
            h = h + layer.scaling[name] * (x[i] @ a.T) @ b.T
        reference.append(h)
    expected = torch.stack(reference)
    (expected * weights).sum().backward()
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], x.grad, rtol=0, atol=1e-12)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(got[0][name], param.grad, rtol=0, atol=1e-12, msg=name)
    assert got[0]["lora_A.c.weight"].abs().sum() > 0


def test_gathered_rows_in_place_without_autograd_and_dropout_falls_back():
    layer = stacked_layer()
    x = torch.randn(4, 8, dtype=torch.float64)
    rows = ["a", "c", "b", "a"]
    with torch.no_grad():
        expected = torch.cat([layer.base(x[i:i + 1]) + layer.scaling[n] * (x[i:i + 1] @ layer.factors(n)[0].T)
                              @ layer.factors(n)[1].T for i, n in enumerate(rows)])
        with plan(layer, rows):
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    assert layer.batches_rows(["a", "b", "c"])
    layer.lora_dropout["c"] = torch.nn.Dropout(0.5).train()  # a live mask is drawn per adapter: the loop runs
    assert not layer.batches_rows(["a", "b", "c"]) and layer.batches_rows(["a", "b"])


def expected_rows(layer, x, rows):
    """Each row's W0 x + s B A x written out (None: the base alone)."""
    out = []
    for i, name in enumerate(rows):
        h = layer.base(x[i:i + 1])
        if name is not None:
            a, b = layer.factors(name)
            h = h + layer.scaling[name] * (x[i:i + 1] @ a.T) @ b.T
        out.append(h)
    return torch.cat(out)


@pytest.mark.parametrize("by_slot", [True, False], ids=["by slot", "by row"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_kept_stacks_follow_every_change_of_the_adapters(tokens, by_slot, monkeypatch):
    """Without autograd the stacks are kept from forward to forward (row_stacks.StackedFactors); any change
    of a factor, a scale, the adapters held or the dtype makes the next forward restack. Both routes
    (the rows grouped by slot, or each row's factors picked) give the formula."""
    monkeypatch.setattr(rows_module, "_by_slot_pays", lambda *_: by_slot)
    layer = stacked_layer()
    x = torch.randn(5, tokens, 8, dtype=torch.float64)
    rows = ["b", "a", None, "c", "a"]

    def check(rows=rows):
        with torch.no_grad(), plan(layer, rows):
            got = layer(x)
        torch.testing.assert_close(got, expected_rows(layer, x, rows).to(got.dtype), rtol=0, atol=1e-12)

    with torch.no_grad():
        check()
        kept = layer._row_stacks
        check(["a", "c", "c", None, "b"])  # another plan reuses the same stacks
        assert layer._row_stacks is kept
        layer.set_factors("a", torch.randn(2, 8), torch.randn(6, 2))  # what load_adapter does
        check()
        assert layer._row_stacks is not kept
        layer.b("c").weight.mul_(3.0)  # an optimizer step writes in place too
        check()
        layer.scaling["b"] = 1.5
        check()
        layer.add("d", r=2, scale=1.0, init="random")
        check(["d", "a", "d", None, "b"])
        layer.delete("a")
        assert layer._row_stacks is None
        check([None, "b", "d", "c", "c"])
    layer.float()
    x = x.float()
    with torch.no_grad(), plan(layer, ["d", "b", None, "c", "d"]):
        got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected_rows(layer, x, ["d", "b", None, "c", "d"]), rtol=1e-5, atol=1e-5)


def test_the_route_follows_the_cost_of_work_and_copies():
    pays = rows_module._by_slot_pays  # (slots, rows in the fullest slot, rows, tokens per row)
    assert pays(16, 1, 16, 1)  # decode, one row per adapter: every factor read once, nothing copied
    assert pays(8, 4, 32, 1)  # 32 rows over 8 adapters, evenly
    assert not pays(100, 1, 16, 1)  # 100 adapters held, 16 in use: reading the idle ones costs more
    assert pays(16, 12, 16, 1)  # uneven decode: the padding (one token per place) costs less than copies
    assert not pays(16, 12, 16, 8)  # uneven with 8 tokens per row: the padding costs more
    assert not pays(4, 2, 5, 200)  # prefill, uneven: padding multiplies 200 tokens per place
