"""A load run against `lorakit serve`: many clients, many adapters, every answer checked.

    .venv/bin/python -m benchmarks.serve_load [--requests 200] [--clients 32] [--adapters 8]
                                              [--max-tokens 24] [--max-batch 32] [--json PATH]

The default model carries `adapters` adapters (r=16, alpha=32, all seven linear kinds, random
weights saved and loaded from their folders). The server runs in this process (uvicorn on
127.0.0.1, a free port); `clients` threads with the official openai client send `requests`
greedy completions between them, request i asking adapter i mod `adapters` to continue prompt
i mod 4. Measured side by side:

- lorakit serve: wall time from the first request to the last answer; tokens/s over all
  completion tokens; per-request latency p50/p95 (queueing included);
- one at a time: `set_adapter` + `generate` per request, for each distinct (adapter, prompt)
  pair once: tokens/s and per-request latency (no queue); these answers are the expected ones;
- PEFT request by request: `set_adapter` + `generate` on a PeftModel holding the same adapters,
  over the same pairs (PEFT's answers are compared too, but its float sums may differ).

Every server answer must be error-free and equal the one-at-a-time answer for its pair. Memory:
the process's peak RSS is sampled during the load run; the KV cache is bounded by --max-batch rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from benchmarks.common import cpu_model, parse_with_threads
from benchmarks.per_row import write_random_adapters

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "SELECT name FROM"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["default", "random"], default="default",
                        help="random: a 2-layer Llama of the default model's widths, to try the script "
                             "quickly")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parse_with_threads(parser)
    warnings.filterwarnings("ignore")

    from benchmarks.per_row import _base_model
    from lorakit.hf.loading import load_model

    base = _base_model(args.model, layers=2)
    tokenizer = load_model("default", dtype="float32", device="cpu")[1]
    names = [f"a{i}" for i in range(args.adapters)]
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    pairs = sorted(set(jobs))
    with tempfile.TemporaryDirectory() as tmp:
        write_random_adapters(base, names, tmp)
        expected, alone = one_at_a_time(base, tokenizer, names, tmp, pairs, args.max_tokens)
        peft_answers, peft = peft_by_request(base, tokenizer, names, tmp, pairs, args.max_tokens)
        served, answers = load_run(base, tokenizer, names, tmp, jobs, args)

    wrong = [(job, answer) for job, answer in zip(jobs, answers, strict=True) if answer != expected[job]]
    peft_same = sum(peft_answers[p] == expected[p] for p in pairs)
    rows = {"lorakit serve (continuous batching, per-row adapters)": served,
            "one at a time (set_adapter + generate)": alone, "PEFT request by request": peft}
    print(f"Load run: {args.requests} requests from {args.clients} concurrent clients over {args.adapters} "
          f"adapters (r=16, all 7 linear kinds), greedy, {args.max_tokens} new tokens at most, "
          f"--max-batch {args.max_batch}; "
          f"{'the default model (SmolLM2-135M)' if args.model == 'default' else 'a 2-layer random Llama'}, "
          "fp32.\n")
    print("| way | requests | tokens/s | p50 latency s | p95 latency s | vs one at a time |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['requests']} | {row['tokens_per_s']:.1f} | {row['p50_s']:.2f} | "
              f"{row['p95_s']:.2f} | {row['tokens_per_s'] / alone['tokens_per_s']:.2f}x |")
    speedup = served["tokens_per_s"] / alone["tokens_per_s"]
    print(f"\nTarget >= 4x the tokens/s of one at a time: {speedup:.2f}x "
          f"({'met' if speedup >= 4 else 'NOT met'}).")
    print(f"Answers: {args.requests - len(wrong) - served['errors']} of {args.requests} equal the "
          f"one-at-a-time answer, {served['errors']} errors; PEFT gives the same answer for {peft_same} of "
          f"{len(pairs)} pairs.")
    print(f"Memory: peak RSS {served['rss_before_mb']:.0f} MB before the load run, "
          f"{served['rss_peak_mb']:.0f} MB at most during it (KV cache bounded by --max-batch "
          f"{args.max_batch} rows).")
    print(f"Machine: {cpu_model()}, torch {torch.__version__} ({torch.get_num_threads()} threads).")
    if args.json:
        args.json.write_text(json.dumps(dict(setting={k: str(v) for k, v in vars(args).items()}, ways=rows,
                                             speedup_vs_one_at_a_time=speedup, wrong_answers=len(wrong),
                                             peft_same_answers=peft_same, pairs=len(pairs)), indent=2) + "\n")
    if wrong or served["errors"]:
        for job, answer in wrong[:3]:
            print(f"wrong answer for {job}: {answer!r}, expected {expected[job]!r}")
        raise SystemExit(1)


def one_at_a_time(base: Any, tokenizer: Any, names: list[str], folder: str, pairs: list[tuple[str, str]],
                  max_tokens: int) -> tuple[dict[tuple[str, str], str], dict[str, Any]]:
    from lorakit import load_adapter, set_adapter
    from lorakit.hf import generate_text

    model = copy.deepcopy(base)
    for name in names:
        load_adapter(model, f"{folder}/{name}", name=name)

    def run(pair: tuple[str, str]) -> str:
        set_adapter(model, pair[0])
        return generate_text(model, tokenizer, [pair[1]], max_tokens, chat=False)[0]

    return _sequential(run, tokenizer, pairs)


def peft_by_request(base: Any, tokenizer: Any, names: list[str], folder: str, pairs: list[tuple[str, str]],
                    max_tokens: int) -> tuple[dict[tuple[str, str], str], dict[str, Any]]:
    import peft

    from lorakit.hf import generate_text

    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{folder}/{names[0]}", adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(f"{folder}/{name}", adapter_name=name)
    model.eval()

    def run(pair: tuple[str, str]) -> str:
        model.set_adapter(pair[0])
        return generate_text(model, tokenizer, [pair[1]], max_tokens, chat=False)[0]  # type: ignore[arg-type]

    return _sequential(run, tokenizer, pairs)


def _sequential(run: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> tuple[dict[tuple[str, str], str],
                                                                                 dict[str, Any]]:
    answers, latencies, tokens = {}, [], 0
    start = time.perf_counter()
    for pair in pairs:
        began = time.perf_counter()
        answers[pair] = run(pair)
        latencies.append(time.perf_counter() - began)
        tokens += _completion_tokens(tokenizer, answers[pair])
    wall = time.perf_counter() - start
    return answers, _figures(len(pairs), tokens, wall, latencies)


def _completion_tokens(tokenizer: Any, text: str) -> int:
    # generate_text returns text; the server reports its token count. Re-encoding counts the same
    # tokens for these answers except where an end-of-sequence token ended them early (+1 at most).
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_run(base: Any, tokenizer: Any, names: list[str], folder: str, jobs: list[tuple[str, str]],
             args: argparse.Namespace) -> tuple[dict[str, Any], list[str | None]]:
    import openai

    from lorakit.serve.engine import Engine
    from lorakit.serve.server import BackgroundServer

    engine = Engine(copy.deepcopy(base), tokenizer, "base", {n: f"{folder}/{n}" for n in names},
                    max_batch=args.max_batch, max_queue=args.requests)
    running = BackgroundServer(engine)
    rss_before, peak = _rss_mb(), [_rss_mb()]
    sampling = threading.Event()

    def sample_rss() -> None:
        while not sampling.wait(0.2):
            peak.append(_rss_mb())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    answers: list[str | None] = [None] * len(jobs)
    latencies: list[float] = []
    tokens, errors = [0], [0]
    lock = threading.Lock()
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0, timeout=600)

    def ask(i: int) -> None:
        adapter, prompt = jobs[i]
        began = time.perf_counter()
        try:
            reply = client.completions.create(model=adapter, prompt=prompt, max_tokens=args.max_tokens,
                                              temperature=0)
        except Exception:  # counted: every answer must come back
            with lock:
                errors[0] += 1
            return
        with lock:
            latencies.append(time.perf_counter() - began)
            answers[i] = reply.choices[0].text
            tokens[0] += reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(ask, range(len(jobs))))
    wall = time.perf_counter() - start
    sampling.set()
    sampler.join()
    running.stop()
    figures = _figures(len(jobs), tokens[0], wall, latencies) | dict(
        errors=errors[0], rss_before_mb=rss_before, rss_peak_mb=max(peak))
    return figures, answers


def _figures(requests: int, tokens: int, wall: float, latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies) or [float("nan")]
    return dict(requests=requests, tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
                p50_s=statistics.median(ordered),
                p95_s=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))])


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
