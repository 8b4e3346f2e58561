"""The layer contract: standalone layers, a bare nn.Linear as the model, a new kind in one class,
every fast path against the plain formula, and no state shared between threads."""

import threading

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, add_adapter, delete_adapter, merge, merge_and_unload, unmerge
from lorakit.core.contract import LoraLayer
from lorakit.core.layers import LoraEmbedding, LoraLinear
from lorakit.kernels import lora_function, paths
from lorakit.kernels.paths import AUTOGRAD, FUSED, UPDATE
from tests.models import logits, randomize_adapters, tiny_llama, tokens


def test_a_lora_linear_built_by_hand_is_active_and_trains():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 32), r=8, alpha=16)
    assert layer.active_adapters == ["default"] and layer.scaling == {"default": 2.0}
    assert not layer.base.weight.requires_grad
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)  # B = 0: nothing changes yet
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert len(trainable) == 2
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (layer(x) - 1).pow(2).mean().backward()
        optimizer.step()
    assert not torch.equal(layer(x), layer.base(x))


def test_a_lora_embedding_built_by_hand_is_active_and_trains():
    layer = LoraEmbedding(nn.Embedding(20, 6), r=2)
    ids = torch.tensor([[1, 2, 3]])
    assert layer.active_adapters == ["default"]
    layer(ids).pow(2).sum().backward()
    assert layer.lora_embedding_A["default"].grad is not None and layer.base.weight.grad is None


def test_the_layer_classes_are_exported():
    assert lorakit.LoraLinear is LoraLinear and lorakit.LoraEmbedding is LoraEmbedding
    assert lorakit.LoraLayer is LoraLayer


def test_add_adapter_on_a_bare_linear():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    expected = linear(x)
    model = add_adapter(linear, LoraConfig(r=2), name="a")
    assert isinstance(model, LoraLinear) and model.base is linear
    assert lorakit.list_adapters(model) == ["a"] and lorakit.active_adapters(model) == ["a"]
    randomize_adapters(model)
    adapted = model(x)
    assert not torch.allclose(adapted, expected)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)
    unmerge(model)
    assert add_adapter(model, LoraConfig(r=1), name="b") is model
    delete_adapter(model, "b")
    plain = merge_and_unload(model, ["a"])
    assert plain is linear
    torch.testing.assert_close(plain(x), adapted, rtol=1e-5, atol=1e-6)


def reference(layer, x):
    """The plain formula for a LoraLinear without dropout: x W^T + b + sum s * (x A^T) B^T."""
    out = x @ layer.base.weight.T + layer.base.bias
    for name in layer.live_adapters():
        a, b = layer.factors(name)
        out = out + layer.scaling[name] * (x @ a.T) @ b.T
    return out


@pytest.mark.parametrize(("path", "adapters"),
                         [(FUSED, 1), (UPDATE, 1), (AUTOGRAD, 1), (UPDATE, 2), (AUTOGRAD, 2)])
def test_every_path_gives_the_plain_formulas_values_and_gradients(path, adapters, monkeypatch):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 7).double(), r=3, alpha=6)
    if adapters == 2:
        layer.add("second", 2, 0.75, init="random")
        layer.set_active(["default", "second"])
    with torch.no_grad():
        layer.b("default").weight.normal_()
    assert paths.path_for(layer, torch.float64, False) == (FUSED if adapters == 1 else UPDATE)
    monkeypatch.setattr(paths, "path_for", lambda layer, dtype, autocast: path)  # force the path under test
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    ours, theirs = layer(x), reference(layer, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    leaves = (x, *[f for n in layer.live_adapters() for f in layer.factors(n)])
    grad = torch.randn_like(ours)
    for g, w in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(theirs, leaves, grad),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_path_follows_dtypes_and_autocast():
    layer = LoraLinear(nn.Linear(8, 4), r=2)
    assert paths.path_for(layer, torch.float32, autocast=False) == FUSED
    # the function casts to autocast's dtype
    assert paths.path_for(layer, torch.float32, autocast=True) == FUSED
    # fp32 adapters beside a bf16 input
    assert paths.path_for(layer, torch.bfloat16, autocast=False) == AUTOGRAD
    layer.base.bias.requires_grad_(True)
    assert paths.path_for(layer, torch.float32, autocast=False) == UPDATE


def masks_drawn(monkeypatch, model):
    drawn = []
    original = lora_function.draw_keep_mask
    monkeypatch.setattr(lora_function, "draw_keep_mask",
                        lambda x, p: drawn.append(original(x, p)) or drawn[-1])
    model.train()
    model(input_ids=tokens())
    return drawn


def test_modules_reading_one_input_draw_their_own_masks_when_asked(monkeypatch):
    shared = add_adapter(tiny_llama(), LoraConfig(r=4, dropout=0.3))
    own = add_adapter(tiny_llama(), LoraConfig(r=4, dropout=0.3, share_dropout_mask=False))
    per_layer_shared, per_layer_own = len(masks_drawn(monkeypatch, shared)), masks_drawn(monkeypatch, own)
    assert (per_layer_shared, len(per_layer_own)) == (2 * 4, 2 * 7)  # q/k/v, o, gate/up, down vs all 7
    q, k, v = per_layer_own[:3]
    assert not torch.equal(q, k) and not torch.equal(k, v)


@pytest.mark.parametrize("path", [FUSED, UPDATE, AUTOGRAD])
def test_the_same_input_tensor_fed_again_gets_a_new_mask(path, monkeypatch):
    # A loop that feeds one batch tensor again (or a model whose first module is a LoRA layer)
    # must not meet its first forward's dropout mask again.
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 32), r=8, alpha=16, dropout=0.5)
    with torch.no_grad():
        layer.b("default").weight.normal_()
    monkeypatch.setattr(paths, "path_for", lambda layer, dtype, autocast: path)
    x = torch.randn(4, 64)
    assert not torch.equal(layer(x), layer(x))


def test_modules_sharing_a_mask_still_share_it_when_the_input_is_fed_again(monkeypatch):
    model = add_adapter(tiny_llama(), LoraConfig(r=4, dropout=0.3))
    ids = tokens()
    drawn = []
    original = lora_function.draw_keep_mask
    monkeypatch.setattr(lora_function, "draw_keep_mask",
                        lambda x, p: drawn.append(original(x, p)) or drawn[-1])
    model.train()
    model(input_ids=ids)
    model(input_ids=ids)
    assert len(drawn) == 2 * 2 * 4  # two forwards, two blocks, one mask per input (q/k/v, o, gate/up, down)


def test_the_setting_is_validated():
    with pytest.raises(ValueError, match="share_dropout_mask must be True or False, got 1"):
        LoraConfig(share_dropout_mask=1)


def test_nothing_is_left_behind_in_the_process():
    assert not [name for name, value in vars(lora_function).items()
                if isinstance(value, dict) and name.isupper()]


def test_two_threads_give_the_sequential_results():
    # A bf16 base with fp32 adapters: q, k and v (gate and up) share one cast copy of their input.
    model = tiny_llama().to(torch.bfloat16)
    add_adapter(model, LoraConfig(r=4))
    randomize_adapters(model)
    inputs = [tokens(seed=seed) for seed in range(6)]
    expected = [logits(model, ids) for ids in inputs]
    results: list[tuple[int, torch.Tensor]] = []

    def run(worker: int) -> None:
        for _ in range(5):
            for i in range(worker, len(inputs), 2):
                results.append((i, logits(model, inputs[i])))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 5 * len(inputs)
    for i, got in results:
        assert torch.equal(got, expected[i])
