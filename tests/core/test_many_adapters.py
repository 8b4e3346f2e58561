"""Many adapters on one base: load 50, switch without copying, delete them and get the memory back."""

import ctypes
import gc

import psutil
import torch

import lorakit
from lorakit import LoraConfig, add_adapter, delete_adapter, set_adapter
from lorakit.formats.io import load_adapter, save_adapter
from tests.models import logits, randomize_adapters, tiny_llama, tokens


def storage_bytes(model):
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def settled_rss():
    """RSS after handing freed heap pages back to the OS (glibc keeps small freed blocks otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the check below stays loose enough
    return psutil.Process().memory_info().rss


def base_model():
    return tiny_llama(hidden=256, layers=2)


def test_fifty_adapters_switch_without_copies_and_free_their_memory(tmp_path):
    # Three distinct adapters of 2 MB each, loaded 50 times under different names.
    references = []
    for seed in range(3):
        model = base_model()
        add_adapter(model, LoraConfig(r=64, alpha=64))
        randomize_adapters(model, seed)
        save_adapter(model, tmp_path / str(seed))
        references.append(logits(model, tokens()))
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)

    model = base_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    start_bytes, start_rss = storage_bytes(model), settled_rss()

    names = [load_adapter(model, tmp_path / str(i % 3), name=f"a{i}") for i in range(50)]
    assert storage_bytes(model) - start_bytes == 50 * adapter_bytes
    peak_rss = psutil.Process().memory_info().rss

    # Switching is a change of names: outputs follow, base tensors are the same objects, untouched.
    ids = tokens()
    for i in (17, 4, 42, 0):
        set_adapter(model, f"a{i}")
        assert torch.equal(logits(model, ids), references[i % 3])
    for name, param in model.named_parameters():
        if name.replace(".base.", ".") in base_params and ".base." in name:
            original, pointer = base_params[name.replace(".base.", ".")]
            assert param is original and param.data_ptr() == pointer

    for name in names:
        delete_adapter(model, name)
    end_rss = settled_rss()
    assert lorakit.list_adapters(model) == []
    assert storage_bytes(model) == start_bytes
    state = model.state_dict()
    assert list(state) == list(base_state) and all(torch.equal(state[k], v) for k, v in base_state.items())
    # RSS only loosely: 50 adapters took about 100 MB, at most a quarter of it may stay with the allocator.
    assert peak_rss - start_rss > 0.5 * 50 * adapter_bytes
    assert end_rss - start_rss < 0.25 * (peak_rss - start_rss)
