"""The hf tests' tiny models: the estimator reads a GGUF's config too."""

from tests.hf.conftest import cache_dir, tiny, tiny_gguf_source  # noqa: F401
