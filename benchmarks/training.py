"""One training configuration in its own process, so its peak memory is its own.

    python -m benchmarks.training --lib lorakit|peft|base|forward [--gc 0|1] [--quant none|nf4]
                                  [--warmup 1] [--steps 3] [--init FILE] [setting flags]

Prints one `RESULT {json}` line: seconds of every step (forward, backward, optimizer), the losses,
peak RSS (ru_maxrss) and RSS after loading, base weight bytes, and on CUDA max_memory_allocated.

- lorakit / peft: LoRA on the seven linear kinds, AdamW over the adapter, one step =
  forward (loss) + backward + optimizer step + zero_grad. `--init` copies A and B from a file
  written by `--mode prepare`, so both libraries start from the very same adapter.
- base: the frozen model without adapters, forward + backward (the embeddings' output requires
  grad, so backward runs through every layer, as LoRA's does); no optimizer.
- forward: the frozen model's forward alone, without autograd (torch.no_grad), loss included.

Other modes: `--mode prepare --init FILE` writes lorakit's fresh adapter (kaiming A, zero B) to
FILE; `--mode loss-check` trains both libraries in one process with dropout 0 on the same batches
and reports both loss curves.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    Setting,
    adapter_tensors,
    add_lorakit,
    add_peft,
    add_setting_args,
    batch_ids,
    build_model,
    copy_adapter,
    emit,
    hf_model,
    mapped_weights_rss,
    model_shape,
    peak_rss_bytes,
    rss_bytes,
    setting_from_args,
    synchronize,
    tensor_bytes,
    touch,
)
from lorakit import fuse_for_training
from lorakit.train.chunked_loss import causal_lm_loss

LIBS = ("lorakit", "peft", "base", "forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("train", "prepare", "loss-check"), default="train")
    parser.add_argument("--lib", choices=LIBS, default="lorakit")
    parser.add_argument("--gc", type=int, choices=(0, 1), default=0, help="gradient checkpointing")
    parser.add_argument("--quant", choices=("none", "nf4"), default="none")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--init", default=None, help="adapter file from --mode prepare")
    add_setting_args(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    setting = setting_from_args(args)
    if args.mode == "prepare":
        emit(prepare(setting, args.init))
    elif args.mode == "loss-check":
        emit(loss_check(setting, args.steps))
    else:
        emit(train(setting, args.lib, bool(args.gc), args.quant, args.warmup, args.steps, args.init))


def prepare(setting: Setting, path: str) -> dict[str, Any]:
    """Write lorakit's fresh adapter for this setting to `path` (safetensors), to start both
    libraries from."""
    from safetensors.torch import save_file

    model = build_model(setting)
    torch.manual_seed(1)
    add_lorakit(model, setting)
    tensors = adapter_tensors(model)
    save_file(tensors, path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"shape": model_shape(model), "trainable": trainable, "adapter_tensors": len(tensors),
            "base_parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)}


def train(setting: Setting, lib: str, checkpointing: bool, quant: str, warmup: int, steps: int,
          init: str | None) -> dict[str, Any]:
    cuda = setting.device.startswith("cuda")
    model = build_model(setting)
    shape = model_shape(model)
    result: dict[str, Any] = {"lib": lib, "gc": checkpointing, "quant": quant, "setting": setting.to_dict(),
                              "threads": torch.get_num_threads(), "rss_after_load_untouched": rss_bytes()}
    touch(model)  # the weights are a memory map of the file: make them resident, so "after load" means it
    result.update(rss_after_load=rss_bytes(), peak_rss_after_load=peak_rss_bytes(),
                  base_bytes=tensor_bytes(model))
    if quant == "nf4":
        result.update(_quantize(model))
    model = attach(model, setting, lib)
    if init and lib in ("lorakit", "peft"):
        from safetensors.torch import load_file

        result["copied_tensors"] = copy_adapter(model, load_file(init))
    if checkpointing:
        hf_model(model).activation_checkpointing_enable()  # type: ignore[operator]
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=setting.lr) if params else None
    model.train(lib != "forward")
    result["rss_before_steps"] = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        result["cuda_allocated_before_steps"] = torch.cuda.memory_allocated()

    records = []
    for step in range(warmup + steps):
        ids = batch_ids(step, setting, shape["vocab"])
        with bf16_autocast(setting):
            record = timed_step(model, ids, optimizer, lib, setting.device, check_grads=step == 0)
        record["warmup"] = step < warmup
        records.append(record)
    result.update(steps=records, peak_rss=peak_rss_bytes(), rss_end=rss_bytes(), shape=shape,
                  mapped_weights_rss_end=mapped_weights_rss())
    if cuda:
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
        result["device_name"] = torch.cuda.get_device_name()
    return result


def bf16_autocast(setting: Setting) -> Any:
    """A bf16 model trains under bf16 autocast, as lorakit train does on a GPU and transformers' Trainer
    does with bf16=True: the fp32 adapters' matmuls run in bf16 too. Other dtypes run as they are."""
    if setting.dtype != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(setting.device).type, dtype=torch.bfloat16)


def attach(model: nn.Module, setting: Setting, lib: str) -> nn.Module:
    """The model as configuration `lib` trains it: with lorakit's or PEFT's adapter, or frozen."""
    if lib in ("lorakit", "peft"):
        model = add_lorakit(model, setting) if lib == "lorakit" else add_peft(model, setting)
        if lib == "lorakit":
            fuse_for_training(model)  # lorakit.train does this too
        return model
    model.requires_grad_(False)
    if lib == "base":
        hf_model(model).enable_input_require_grads()  # type: ignore[operator]
    return model


def timed_step(model: nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer | None, lib: str,
          device: str, check_grads: bool) -> dict[str, Any]:
    """One timed step; the parts are timed separately (with a device sync between them on CUDA)."""
    import time

    synchronize(device)
    start = time.perf_counter()
    if lib == "forward":
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        synchronize(device)
        forward = time.perf_counter()
        return {"seconds": forward - start, "forward": forward - start, "loss": loss.item()}
    if lib == "lorakit":
        # lorakit's training step: the output head and cross-entropy in chunks (lorakit.train does this)
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    else:
        loss = model(input_ids=ids, labels=ids).loss
    synchronize(device)
    forward = time.perf_counter()
    loss.backward()
    synchronize(device)
    backward = time.perf_counter()
    if check_grads and optimizer is not None:
        _check_grads(model)
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    end = time.perf_counter()
    return {"seconds": end - start, "forward": forward - start, "backward": backward - forward,
            "optimizer": end - backward, "loss": loss.item()}


def _check_grads(model: nn.Module) -> None:
    """Every trainable tensor got a gradient, and B's are not all zero (the adapter is really trained)."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"{len(missing)} trainable tensors got no gradient, e.g. {missing[:3]}")
    b_norm = sum(float(p.grad.norm()) for n, p in model.named_parameters()
                 if ".lora_B." in n and p.grad is not None)
    if not b_norm > 0:
        raise RuntimeError("all lora_B gradients are zero after the first backward")


def _quantize(model: nn.Module) -> dict[str, Any]:
    """NF4 every linear but the head (lorakit's quantize_model); bytes before and after."""
    from lorakit.quant import NF4Linear, quantize_model

    head = model.get_output_embeddings()  # type: ignore[operator]
    linear_fp = sum(tensor_bytes(m) for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    quantize_model(model, "nf4")
    linear_q = sum(tensor_bytes(m) for m in model.modules() if isinstance(m, NF4Linear))
    return {"quantized_linear_bytes_fp": linear_fp, "quantized_linear_bytes_nf4": linear_q,
            "base_bytes_quantized": tensor_bytes(model), "rss_after_quantize": rss_bytes(),
            "mapped_weights_rss_after_quantize": mapped_weights_rss()}


def loss_check(setting: Setting, steps: int) -> dict[str, Any]:
    """Both libraries in one process, dropout 0, same adapter and batches, steps taken in turn."""
    ours = add_lorakit(build_model(setting), setting, dropout=0.0)
    fuse_for_training(ours)
    theirs = add_peft(build_model(setting), setting, dropout=0.0)
    torch.manual_seed(1)
    copy_adapter(theirs, adapter_tensors(ours))
    shape = model_shape(ours)
    pairs = []
    for model in (ours, theirs):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        pairs.append((model, torch.optim.AdamW(params, lr=setting.lr)))
    losses: dict[str, list[float]] = {"lorakit": [], "peft": []}
    for step in range(steps):
        ids = batch_ids(step, setting, shape["vocab"])
        for name, (model, optimizer) in zip(losses, pairs, strict=True):
            # each library's own training loss: lorakit's chunked head, PEFT's model loss
            loss = (causal_lm_loss(model, {"input_ids": ids, "labels": ids}) if name == "lorakit"
                    else model(input_ids=ids, labels=ids).loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    after = {name: adapter_tensors(model) for name, (model, _) in zip(losses, pairs, strict=True)}
    weight_diff = max((after["lorakit"][k] - after["peft"][k]).abs().max().item() for k in after["lorakit"])
    loss_diff = max(abs(a - b) for a, b in zip(losses["lorakit"], losses["peft"], strict=True))
    return {"setting": setting.to_dict(), "steps": steps, "losses": losses, "max_loss_diff": loss_diff,
            "max_adapter_weight_diff_after": weight_diff}


if __name__ == "__main__":
    main()
