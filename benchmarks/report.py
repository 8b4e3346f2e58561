"""docs/benchmarks.md from the figures of one run (benchmarks/results.json holds the same figures)."""

from __future__ import annotations

from typing import Any

from benchmarks.roofline import __doc__ as FLOP_DOC
from benchmarks.sections import render_sections

LABELS = {
    "lorakit_gc0": "lorakit",
    "peft_gc0": "PEFT",
    "lorakit_gc1": "lorakit + gradient checkpointing",
    "peft_gc1": "PEFT + gradient checkpointing",
    "qlora_gc0": "lorakit QLoRA (NF4 base)",
    "base_gc0": "frozen base, forward + backward, no adapter",
    "forward": "frozen base, forward only (no_grad)",
}


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline comparisons with their targets; a figure that is missing gives no row."""
    train = results.get("training", {})
    rows: list[dict[str, Any]] = []

    def both(key: str, field: str) -> tuple[Any, Any]:
        return train.get(f"lorakit_{key}", {}).get(field), train.get(f"peft_{key}", {}).get(field)

    for gc, label in (("gc0", ""), ("gc1", ", gradient checkpointing")):
        ours, theirs = both(gc, "tokens_per_s")
        if ours and theirs:
            rows.append(_row(f"training throughput{label} (tokens/s)", f"{ours:,.1f}", f"{theirs:,.1f}",
                             ours / theirs, ">= 1.5x", ours / theirs >= 1.5))
    for gc, label in (("gc0", ""), ("gc1", ", gradient checkpointing (FLOPs include the recompute)")):
        ours, theirs = both(gc, "roofline_multiple")
        if ours and theirs:
            rows.append(_row(f"step time / roofline time{label}", f"{ours:.2f}x", f"{theirs:.2f}x", None,
                             "lorakit <= 1.15x", ours <= 1.15))
    ours, theirs = both("gc0", "peak_rss")
    if ours and theirs:
        rows.append(_row("peak RSS", _gib(ours), _gib(theirs), ours / theirs, "<= 0.5x",
                         ours / theirs <= 0.5))
    ours, theirs = both("gc1", "peak_rss")
    if ours and theirs:
        rows.append(_row("peak RSS, both with gradient checkpointing", _gib(ours), _gib(theirs),
                         ours / theirs, "<= 0.25x", ours / theirs <= 0.25))
    plain = train.get("peft_gc0", {}).get("peak_rss")
    if ours and plain:
        rows.append(_row("peak RSS, lorakit with checkpointing vs PEFT without", _gib(ours), _gib(plain),
                         ours / plain, "<= 0.25x", ours / plain <= 0.25))
    live = results.get("live_peak", {}).get("peak_rss", {})
    for ours_key, theirs_key, label, target in (
            ("lorakit_gc0", "peft_gc0", "live peak (RSS with freed memory returned)", 0.5),
            ("lorakit_gc1", "peft_gc1", "live peak, both with gradient checkpointing", 0.25),
            ("lorakit_gc1", "peft_gc0", "live peak, lorakit with checkpointing vs PEFT without", 0.25)):
        if live.get(ours_key) and live.get(theirs_key):
            ratio = live[ours_key] / live[theirs_key]
            rows.append(_row(label, _gib(live[ours_key]), _gib(live[theirs_key]), ratio, f"<= {target}x",
                             ratio <= target))
    qlora = train.get("qlora_gc0", {}).get("runs", [])
    if qlora:
        ratio = qlora[0]["quantized_linear_bytes_fp"] / qlora[0]["quantized_linear_bytes_nf4"]
        rows.append(_row("QLoRA: quantized linear weights, fp32 bytes / NF4 bytes", f"{ratio:.2f}x", "-",
                         None, "about 7.5x (>= 7.5x)", ratio >= 7.5))
    return rows + _cuda_rows(results.get("cuda", {}))


def _cuda_rows(cuda: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPU targets (the CUDA section, when a GPU ran it): >= 2x PEFT's tokens/s, <= 0.5x its memory."""
    configs = cuda.get("configs", {})
    ours, theirs = configs.get("lorakit_gc0", {}), configs.get("peft_gc0", {})
    device, rows = cuda.get("device_name", "GPU"), []
    if ours.get("tokens_per_s") and theirs.get("tokens_per_s"):
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        rows.append(_row(f"CUDA training throughput, {device} (tokens/s)", f"{ours['tokens_per_s']:,.0f}",
                         f"{theirs['tokens_per_s']:,.0f}", ratio, ">= 2x", ratio >= 2))
    if ours.get("cuda_peak_allocated") and theirs.get("cuda_peak_allocated"):
        ratio = ours["cuda_peak_allocated"] / theirs["cuda_peak_allocated"]
        rows.append(_row(f"CUDA peak memory, {device} (max_memory_allocated)",
                         _gib(ours["cuda_peak_allocated"]), _gib(theirs["cuda_peak_allocated"]), ratio,
                         "<= 0.5x", ratio <= 0.5))
    return rows


def _limits(results: dict[str, Any]) -> str:
    """For the targets not met: the figures of this run that bound what any adapter library can reach."""
    train = results.get("training", {})
    ours, theirs, base = (train.get(k, {}) for k in ("lorakit_gc0", "peft_gc0", "base_gc0"))
    if not all("median_seconds" in c for c in (ours, theirs, base)):
        return ""
    lines = ["## What limits the targets not met", ""]
    target_seconds = theirs["median_seconds"] / 1.5
    room = target_seconds - base["median_seconds"]
    lines.append(
        f"- **Speed.** The frozen transformers model alone, forward + backward with no adapter, takes "
        f"{base['median_seconds']:.2f} s/step; PEFT takes {theirs['median_seconds']:.2f}. 1.5x PEFT is "
        f"{target_seconds:.2f} s/step, which leaves "
        + (f"{room:.2f} s" if room > 0 else "less than nothing")
        + f" over the base for the adapters' matmuls, the dropout masks and AdamW; lorakit's take "
        f"{ours['median_seconds'] - base['median_seconds']:.2f} s "
        f"(PEFT's {theirs['median_seconds'] - base['median_seconds']:.2f} s). "
        "The base itself is transformers' code, which lorakit runs as is: its matmuls "
        f"({base['flops']['total'] / 1e9:,.0f} GFLOP, {base['roofline_seconds']:.2f} s "
        "at this machine's measured rate) "
        "and its attention, norms, rotary and activations. The section 'Where a training step's time goes' "
        "below splits one step of each, op by op (torch.profiler).")
    budget = 1.15 * ours["roofline_seconds"] - base["median_seconds"]
    slow_rate = (" (below 1x: the matmul rate was measured at a slower moment of a shared machine than "
                 "the base ran in, so this run's roofline multiples are optimistic)"
                 if base["roofline_multiple"] < 1 else "")
    lines.append(
        f"- **Roofline.** The frozen base is at {base['roofline_multiple']:.2f}x the roofline by itself"
        f"{slow_rate}. The 1.15x "
        "target leaves the adapters, the dropout and AdamW "
        + (f"{budget:.2f} s" if budget > 0 else "less than nothing")
        + f" (1.15 x lorakit's roofline time minus the base's time); they take "
        f"{ours['median_seconds'] - base['median_seconds']:.2f} s. The FLOP count leaves out "
        "the base's elementwise and attention work, which is most of its own gap.")
    live = results.get("live_peak", {})
    load = ours.get("rss_after_load")
    peft_live = live.get("peak_rss", {}).get("peft_gc0")
    if load and peft_live:
        base_live = base["peak_rss"] - base["rss_after_load"]
        lines.append(
            f"- **Memory.** {_gib(load)} is there before the first step (Python, torch, transformers and "
            f"the fp32 weights), {load / peft_live:.2f}x of PEFT's live peak ({_gib(peft_live)}) already; "
            f"a quarter of that peak, {_gib(peft_live / 4)}, leaves {_gib(max(peft_live / 4 - load, 0))} "
            "for everything a checkpointed step holds (each layer's input, one layer's activations, the "
            "head's chunk, the adapters' gradients and AdamW's moments)"
            f"""{', so no library meets that target with fp32 weights'
                 if peft_live / 4 - load < 0.1 * 2**30 else ''}. """
            "Without checkpointing, the frozen base alone adds "
            f"{_gib(base_live)} of peak RSS over the load (its saved activations: norms' inputs, q/k/v, "
            "attention output, gate and up); half of PEFT's live peak would leave "
            f"{_gib(peft_live / 2 - load)} for all of it and the adapters.")
    return "\n".join(lines) + "\n"


def _row(measure: str, ours: str, theirs: str, ratio: float | None, target: str, met: bool) -> dict[str, Any]:
    return {"measure": measure, "lorakit": ours, "peft": theirs, "ratio": ratio, "target": target,
            "met": "yes" if met else "no"}


def render(results: dict[str, Any]) -> str:
    parts = [_header(results), _summary(results), _limits(results), _training(results), _roofline(results),
             _generation(results), render_sections(results.get("sections", {})), _qlora(results),
             _cuda(results), _notes(results)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _header(results: dict[str, Any]) -> str:
    plan, setting, m, v = results["plan"], results["setting"], results["machine"], results["versions"]
    model = results.get("model", {})
    lines = ["# Benchmarks: lorakit vs PEFT, side by side in one run", ""]
    if plan["quick"]:
        lines += [f"> **Quick mode** (`--quick`): batch {setting['batch']} x {setting['seq']} tokens, "
                  f"{plan['warmup']} warm-up + {plan['steps']} timed steps per configuration, "
                  f"{plan['rounds']} round; "
                  "a check that the harness works, not a measurement: the targets are meant for the full run "
                  "(`make bench`, batch 4 x 256) on a quiet machine.", ""]
    # Only the load before the run tells of other work: the one at the end counts the benchmark's
    # own children.
    busy = m["load_average_start"]
    if busy > 0.5 * m["logical_cpus"]:
        lines += [f"> **The machine was busy** (load average {busy:.1f} on {m['logical_cpus']} CPUs "
                  "when the run started): the timings below are less reliable; memory figures are not "
                  "affected.", ""]
    lines += [
        f"Generated by `{results['command']}` on {results['date']}, "
        f"in {results.get('total_seconds', 0) / 60:.1f} min.",
        "",
        f"- Machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), "
        f"{m['logical_cpus']} logical CPUs / "
        f"{m['physical_cores']} physical cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, torch uses "
        f"{m['torch_threads']} threads; load average {m['load_average_start']:.1f} at the start, "
        f"{m.get('load_average_end', float('nan')):.1f} at the end"
        f"{'; GPU: ' + m['gpu'] if 'gpu' in m else ''}.",
        f"- Versions: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"lorakit {v['lorakit']}, "
        f"Python {m['python']}.",
        f"- Setting: SmolLM2-135M-Instruct ({model.get('base_parameters', 0) / 1e6:.1f}M parameters), "
        f"{setting['dtype']} on {setting['device']}, batch {setting['batch']} x {setting['seq']} tokens "
        f"(random token ids, labels = inputs, the same batches for both), LoRA r={setting['r']}, "
        f"alpha={setting['alpha']}, dropout {setting['dropout']} on q, k, v, o, gate, up, down "
        f"({model.get('trainable', 0):,} trainable), AdamW lr {setting['lr']}. Both libraries start from "
        "the same adapter: lorakit's kaiming-uniform A and zero B, copied into PEFT's lora_A / lora_B.",
        f"- Method: every configuration in its own process; {plan['warmup']} warm-up + {plan['steps']} timed "
        f"steps per process; the lorakit/PEFT pairs in {plan['rounds']} round(s) of alternating order "
        "(ABBA); figures are medians over all timed steps.",
        "",
    ]
    return "\n".join(lines)


def _summary(results: dict[str, Any]) -> str:
    rows = results.get("summary", [])
    if not rows:
        return ""
    lines = ["## Summary", "", "| measure | lorakit | PEFT | lorakit / PEFT | target | met? |",
             "|---|---:|---:|---:|---|---|"]
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        lines.append(f"| {row['measure']} | {row['lorakit']} | {row['peft']} | {ratio} | {row['target']} | "
                     f"{row['met']} |")
    loss = results.get("loss_check", {})
    if "max_loss_diff" in loss:
        lines += ["", f"Loss check (dropout 0, both in one process, {loss['steps']} steps on the same "
                  f"batches): max |loss difference| = {loss['max_loss_diff']:.2e}, max |A or B difference| "
                  f"after training = {loss['max_adapter_weight_diff_after']:.2e}; losses lorakit "
                  f"{_floats(loss['losses']['lorakit'])}, PEFT {_floats(loss['losses']['peft'])}."]
    elif "error" in loss:
        lines += ["", f"Loss check failed: `{loss['error'][-300:]}`"]
    return "\n".join(lines) + "\n"


def _training(results: dict[str, Any]) -> str:
    train = results.get("training", {})
    lines = ["## Training step", "",
             "| configuration | s/step | tokens/s | s/step per round | forward / backward / optimizer s | "
             "peak RSS | RSS after load | peak - load | step GFLOP | roofline s | x roofline | GFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in LABELS.items():
        config = train.get(key)
        if not config:
            continue
        if "median_seconds" not in config:
            lines.append(f"| {label} | failed: {config['errors'][-1][-200:]!r} |" + " |" * 10)
            continue
        parts = " / ".join(f"{config['parts'][p]:.2f}" for p in ("forward", "backward", "optimizer")
                           if p in config["parts"])
        lines.append(
            f"| {label} | {config['median_seconds']:.2f} | {config['tokens_per_s']:,.1f} | "
            f"{', '.join(f'{s:.2f}' for s in config['per_round_seconds'])} | {parts} | "
            f"{_gib(config['peak_rss'])} | "
            f"{_gib(config['rss_after_load'])} | {_gib(config['peak_rss'] - config['rss_after_load'])} | "
            f"{config['flops']['total'] / 1e9:,.0f} | {config['roofline_seconds']:.2f} | "
            f"{config['roofline_multiple']:.2f}x | {config['achieved_gflops']:.1f} |")
    errors = [f"- {LABELS[k]}: {len(c['errors'])} failed run(s): `{c['errors'][-1][-300:]}`"
              for k, c in train.items() if c.get("errors")]
    base = train.get("base_gc0", {}).get("median_seconds")
    over = [f"{LABELS[k]} {train[k]['median_seconds'] / base:.2f}x" for k in ("lorakit_gc0", "peft_gc0")
            if base and "median_seconds" in train.get(k, {})]
    if over:
        lines += ["", "Step time over the frozen base's forward + backward (what the adapters and the "
                  "optimizer add): "
                  + ", ".join(over) + "."]
    lines += ["", "Peak RSS is `ru_maxrss` of the child process (it includes Python, torch and the model); "
              "'RSS after load' is psutil's RSS right after the model is loaded, and 'peak - load' what "
              "training added.",
              *_live_note(results),
              *([""] + errors if errors else [])]
    return "\n".join(lines) + "\n"


def _live_note(results: dict[str, Any]) -> list[str]:
    live = results.get("live_peak", {})
    if not live.get("peak_rss"):
        return []
    env = " ".join(f"{k}={v}" for k, v in live["env"].items())
    figures = ", ".join(f"{LABELS[k]} {_gib(v)}" for k, v in live["peak_rss"].items())
    return ["", "Peak RSS depends on glibc's allocator as much as on the tensors: freed blocks stay in the "
            "process and fragment, so the same step's peak moves from run to run. The 'live peak' "
            f"rows come from one more child per configuration run with `{env}`, which makes glibc hand every "
            "freed block above 64 KiB back at once, so RSS follows the tensors alive: what training needs. "
            "(Those steps are slower, from the page faults; their times are not used.) "
            f"Live peaks: {figures}."]


def _roofline(results: dict[str, Any]) -> str:
    roof = results.get("roofline")
    if not roof:
        return ""
    lines = ["## The machine's limit (roofline)", "",
             f"torch.matmul, fp32, {roof['measurements'][0]['tokens']} tokens x in @ in x out, median of "
             f"{roof['measurements'][0]['repeats']} after a warm-up, measured at the start of each round; "
             f"weighted by the FLOPs one forward + backward spends on each shape, the machine gives "
             f"**{roof['gflops']:.1f} GFLOP/s** (per round: "
             f"{_floats([m['gflops'] for m in roof['measurements']], 1)}).", "",
             "| shape (tokens x in @ in x out) | uses per forward + backward | median ms | GFLOP/s |",
             "|---|---:|---:|---:|"]
    for row in roof["shapes"]:
        lines.append(f"| {row['m']} x {row['k']} @ {row['k']} x {row['n']} | {row['count']} | "
                     f"{row['seconds'] * 1e3:.1f} | {row['gflops']:.1f} |")
    below = [LABELS[k] for k, c in results.get("training", {}).items()
             if c.get("roofline_multiple", 1.0) < 1.0]
    if below:
        lines += ["", f"Faster than the roofline: {', '.join(below)}. A step cannot beat the matmul rate on "
                  "its own shapes, so most likely the rate was measured in a busier moment than that step "
                  "(see the load note above)."]
    doc = FLOP_DOC.split("\n\n", 1)[1].strip()
    lines += ["", "How a step's FLOPs are counted (from `benchmarks/roofline.py`):", "", "```", doc, "```",
              "",
              "| configuration | forward linears | forward attention | backward (input grads) | LoRA | "
              "recompute | total GFLOP |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in LABELS.items():
        config = results.get("training", {}).get(key)
        if config and "flops" in config:
            f = config["flops"]
            cells = [f"{f.get(p, 0) / 1e9:,.1f}" for p in ("forward_linear", "forward_attention",
                                                          "backward_input_grad", "lora", "recompute",
                                                          "total")]
            lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _generation(results: dict[str, Any]) -> str:
    gen = results.get("generation")
    if not gen:
        return ""
    if "error" in gen:
        return f"## Merge and generation\n\nFailed: `{gen['error'][-500:]}`\n"
    merge = gen["merge_seconds"]
    un, mg = gen["generate_unmerged"], gen["generate_merged"]
    lines = ["## Merge and generation", "",
             f"Same adapter in both (lorakit's A, a random B ~ N(0, 0.01^2), which moves the logits by up to "
             f"{gen['adapter_effect_on_logits']:.2f}); unmerged logits lorakit vs PEFT differ by at most "
             f"{gen['unmerged_lorakit_vs_peft']:.1e}. Greedy generation, batch 1, a "
             f"{gen['prompt_tokens']}-token chat prompt, exactly {gen['new_tokens']} new tokens (tokens/s "
             f"counts new tokens; the prefill is inside the time), median of {gen['runs']} after "
             f"{gen['warmup']} warm-up, the libraries taking turns.", "",
             "| measure | lorakit | PEFT | lorakit / PEFT |", "|---|---:|---:|---:|",
             _pair("merge_and_unload, s (a fresh copy per run)", merge["lorakit"]["median"],
                   merge["peft"]["median"], "{:.2f}"),
             _pair("max abs logits difference, merged vs unmerged", gen["merged_vs_unmerged"]["lorakit"],
                   gen["merged_vs_unmerged"]["peft"], "{:.1e}"),
             _pair("generation, unmerged, tokens/s", un["lorakit"]["tokens_per_s"],
                   un["peft"]["tokens_per_s"], "{:.1f}"),
             _pair("generation, merged, tokens/s", mg["lorakit"]["tokens_per_s"],
                   mg["peft"]["tokens_per_s"], "{:.1f}"),
             "", "Same greedy tokens: lorakit vs PEFT unmerged "
             f"{_yes(gen['same_tokens']['unmerged_lorakit_vs_peft'])}, "
             f"merged {_yes(gen['same_tokens']['merged_lorakit_vs_peft'])}; lorakit merged vs unmerged "
             f"{_yes(gen['same_tokens']['lorakit_merged_vs_unmerged'])}. Merge runs (s): lorakit "
             f"{_floats(merge['lorakit']['runs'])}, PEFT {_floats(merge['peft']['runs'])}."]
    return "\n".join(lines) + "\n"


def _qlora(results: dict[str, Any]) -> str:
    train = results.get("training", {})
    qlora, plain = train.get("qlora_gc0", {}), train.get("lorakit_gc0", {})
    if not qlora.get("runs") or not plain.get("runs"):
        return ""
    run = qlora["runs"][0]
    lines = ["## QLoRA: lorakit on an NF4 base vs the fp32 base", "",
             "Same batches, same adapter; `quantize_model(model, \"nf4\")` (every linear but the tied "
             "lm_head) before `add_adapter`. Weight bytes are parameters + buffers of the base model, a tied "
             "tensor counted once.", "",
             "| measure | fp32 base | NF4 base | fp32 / NF4 |", "|---|---:|---:|---:|",
             _pair("base model weights", run["base_bytes"], run["base_bytes_quantized"], "gib"),
             _pair("the quantized linears' weights", run["quantized_linear_bytes_fp"],
                   run["quantized_linear_bytes_nf4"], "gib"),
             _pair("peak RSS of a training step", plain["peak_rss"], qlora["peak_rss"], "gib"),
             _pair("peak RSS - RSS after load", plain["peak_rss"] - plain["rss_after_load"],
                   qlora["peak_rss"] - qlora["rss_after_load"], "gib"),
             _pair("s/step", plain["median_seconds"], qlora["median_seconds"], "{:.2f}"),
             "", "Both processes load the fp32 model first (transformers maps the safetensors file, so the "
             "weights count in RSS once read) and the QLoRA one then quantizes it: its peak RSS also covers "
             f"that load (peak {_gib(qlora['peak_rss_after_load'])} right after loading; RSS "
             f"{_gib(run['rss_after_quantize'])} after quantizing, of which "
             f"{_gib(run.get('mapped_weights_rss_after_quantize', float('nan')))} are pages of the mapped "
             f"fp32 weights file; {_gib(run.get('mapped_weights_rss_end', float('nan')))} at the end of "
             "training). Those are clean file pages the kernel may drop, but RSS counts them."]
    return "\n".join(lines) + "\n"


def _cuda(results: dict[str, Any]) -> str:
    cuda = results.get("cuda")
    if not cuda:
        return ""
    if "skipped" in cuda:
        return f"## CUDA\n\nSkipped: {cuda['skipped']}.\n"
    if "error" in cuda:
        return f"## CUDA\n\nFailed: `{cuda['error'][-500:]}`\n"
    s, model = cuda["setting"], cuda["model"]
    peak = cuda["bf16_peak_flops"]
    measured = f" (measured {cuda['date']})" if "date" in cuda else ""
    lines = ["## CUDA", "",
             f"{cuda['device_name']}{measured}: a random-weight Llama-shaped model "
             f"({model['base_parameters'] / 1e9:.2f}B parameters: {_shape(model['shape'])}), "
             f"{_precision(s['dtype'])}, batch {s['batch']} x {s['seq']}, LoRA r={s['r']} on the seven "
             f"linear kinds ({model['trainable']:,} trainable), AdamW; {cuda['warmup']} warm-up + "
             f"{cuda['steps']} timed steps per process. MFU = model FLOPs (formula above, recompute not "
             "counted) / step time / "
             + (f"{peak / 1e12:.0f} TFLOP/s (dense bf16 peak)." if peak
                else "the GPU's peak (unknown for this GPU: no MFU)."),
             "", "| configuration | s/step | tokens/s | peak max_memory_allocated | MFU |",
             "|---|---:|---:|---:|---:|"]
    for key in ("lorakit_gc0", "peft_gc0", "lorakit_gc1", "peft_gc1"):
        config = cuda["configs"].get(key)
        if not config or "median_seconds" not in config:
            lines.append(f"| {LABELS[key]} | failed | | | |")
            continue
        mfu = f"{config['mfu'] * 100:.1f}%" if "mfu" in config else "-"
        memory = _gib(config["cuda_peak_allocated"]) if "cuda_peak_allocated" in config else "-"
        lines.append(f"| {LABELS[key]} | {config['median_seconds']:.3f} | {config['tokens_per_s']:,.0f} | "
                     f"{memory} | {mfu} |")
    return "\n".join(lines) + "\n"


def _precision(dtype: str) -> str:
    """How a configuration of the CUDA section trains (benchmarks.training.bf16_autocast)."""
    if dtype == "bfloat16":
        return "bf16 weights under bf16 autocast (the adapters fp32, as both trainers keep them)"
    return dtype


def _notes(results: dict[str, Any]) -> str:
    return "\n".join([
        "## Notes", "",
        "- Timings on a shared machine vary from run to run; the per-round column and the load averages show "
        "how much. Compare lorakit and PEFT within one run only.",
        "- `benchmarks/results.json` holds every figure of this run, including every step's time and loss.",
        "- The roofline counts matmul FLOPs only and uses the matmul rate measured on the model's shapes, so "
        "elementwise work (norms, softmax, the loss, AdamW) and the NF4 dequantization are part of the gap "
        "to it.",
    ]) + "\n"


def _pair(label: str, ours: float, theirs: float, fmt: str) -> str:
    show = _gib if fmt == "gib" else fmt.format
    ratio = f"{ours / theirs:.2f}x" if theirs else "-"
    return f"| {label} | {show(ours)} | {show(theirs)} | {ratio} |"


def _shape(shape: dict[str, int]) -> str:
    return (f"hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['layers']} layers, "
            f"{shape['heads']} heads / "
            f"{shape['kv_heads']} KV heads, vocab {shape['vocab']:,}")


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _floats(values: list[float], digits: int = 4) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
