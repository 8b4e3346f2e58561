"""`lorakit serve`: one base model, many adapters, an OpenAI-compatible HTTP API.

The pieces, lowest first:

- `schemas`: the request bodies, checked field by field (`ApiError` names the field);
- `sequence`: one request's state while it generates (tokens, text, stop strings, finish);
- `sampling`: the next token of each row (greedy, temperature, top-p, seeded);
- `batch_cache`: the running batch's KV cache (transformers' DynamicCache), rows joining and leaving;
- `scheduler`: the continuous-batching loop, one decode step over every running sequence,
  each row with its own adapter (`lorakit.core.per_row.adapters_per_row`);
- `adapters`: which adapters are served, loading and unloading at run time;
- `metrics`: Prometheus counters and gauges;
- `app`: the FastAPI routes; `server`: uvicorn, the API key, SIGTERM.

docs/serve.md is the tour. Nothing here is imported by `import lorakit`.
"""
