"""A new layer kind is one class: registered, it goes through add_adapter, save_adapter, load_adapter
and every model-level function like lorakit's own kinds, with nothing else changed."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import (
    LoraConfig,
    add_adapter,
    delete_adapter,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
    unmerge,
)
from lorakit.core.bases import init_factors
from lorakit.core.contract import KINDS, LoraLayer, register_kind


class Mix(nn.Module):
    """A module no lorakit kind knows (not an nn.Linear): y = x W^T, W stored (out x in)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class LoraMix(LoraLayer):
    """h = M x + s B A x around a Mix: the whole of a new kind."""

    kind_name = "mix"

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        return isinstance(module, Mix)

    @classmethod
    def sizes(cls, module: nn.Module) -> tuple[int, int]:
        outputs, inputs = module.weight.shape
        return int(inputs), int(outputs)

    def __init__(self, base: nn.Module, path: str = "") -> None:
        super().__init__(base, path)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()

    def add(self, name, r, scale, dropout=0.0, init="kaiming", share_dropout_mask=True, use_dora=False):
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float64))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, dtype=torch.float64))
        init_factors(self.lora_A[name], self.lora_B[name], init)
        self.scaling[name] = scale

    def factors(self, name):
        return self.lora_A[name], self.lora_B[name]

    def _drop(self, name):
        del self.lora_A[name], self.lora_B[name]

    def update(self, name, x):
        a, b = self.factors(name)
        return x @ a.T @ b.T, self.scaling[name]

    def forward(self, x):
        h = self.base(x)
        if self.disabled:
            return h
        if self.row_adapters is not None:
            return self.forward_rows(x, h)
        for name in self.live_adapters():
            update, scale = self.update(name, x)
            h = h + scale * update
        return h


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Mix(6, 5)
        self.out = nn.Linear(5, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(x))


@pytest.fixture
def mix_kind():
    register_kind(LoraMix)
    yield LoraMix
    KINDS.remove(LoraMix)


def test_a_registered_kind_goes_through_add_save_and_load(mix_kind, tmp_path):
    torch.manual_seed(0)
    model = Model()
    fresh = Model()
    fresh.load_state_dict(model.state_dict())
    add_adapter(model, LoraConfig(r=2, alpha=4, targets=["proj", "out"]))
    assert isinstance(model.proj, LoraMix) and model.proj.rank("default") == 2
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), fresh(x))  # B = 0: a fresh adapter changes nothing
    with torch.no_grad():
        model.proj.lora_B["default"].normal_()
    a, b = model.proj.factors("default")
    expected = fresh.out(fresh.proj(x) + 2.0 * (x @ a.T @ b.T))
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)

    save_adapter(model, tmp_path / "mix")
    tensors = load_file(tmp_path / "mix" / "adapter_model.safetensors")
    assert tensors["base_model.model.proj.lora_A.weight"].shape == (2, 6)  # PEFT's layout
    assert tensors["base_model.model.proj.lora_B.weight"].shape == (5, 2)
    assert (set(json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["target_modules"])
            >= {"proj"})

    load_adapter(fresh, tmp_path / "mix")
    assert isinstance(fresh.proj, LoraMix)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_model_level_functions_need_no_change_for_a_registered_kind(mix_kind):
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(4, 6, dtype=torch.float64)
    base = model(x)
    for name in ("a", "b"):
        add_adapter(model, LoraConfig(r=2, alpha=1, targets=["proj"], init="random"), name=name)
    set_adapter(model, "a")
    only_a = model(x)
    assert not torch.allclose(only_a, base)
    assert model.proj.lora_A["a"].requires_grad and not model.proj.lora_A["b"].requires_grad
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    merge(model)
    assert model.proj.merged_adapters == ["a"]
    # the contract builds deltas in fp32
    torch.testing.assert_close(model(x), only_a, rtol=1e-6, atol=1e-6)
    unmerge(model)
    with lorakit.adapters_per_row(model, ["b", "a", None, "a"]):
        rows = model(x)
    torch.testing.assert_close(rows[1], only_a[1], rtol=1e-6, atol=1e-6)  # W after an fp32 merge round trip
    torch.testing.assert_close(rows[2], base[2], rtol=1e-6, atol=1e-6)
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    assert type(model.proj) is Mix


def test_without_the_kind_the_module_is_refused(tmp_path):
    with pytest.raises(TypeError, match="target .proj. is a Mix, which lorakit cannot adapt"):
        add_adapter(Model(), LoraConfig(r=2, targets=["proj"]))
