"""Finding and reading an adapter folder without a model: its place, its config JSON, its header.

load_adapter (io.py) and describe_adapter (inspect_adapter.py) both read a folder through these
functions, so a folder is found, parsed and refused in the same way, with the same messages.
A training run's folder (`<run>/adapter/` beside checkpoints and metrics) stands for its adapter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lorakit.formats.peft_format import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE

RUN_ADAPTER = "adapter"
"""Where `lorakit train` writes a run's final adapter, inside its output folder."""

FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
"""safetensors dtype codes of the floating-point dtypes an adapter tensor may have."""

DTYPE_NAMES = {**FLOAT_DTYPES, "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "BOOL": "bool"}


@dataclass(frozen=True)
class Header:
    """What a safetensors file says about itself, read without loading any tensor."""

    shapes: dict[str, tuple[int, ...]]
    """Tensor key -> shape."""
    dtypes: dict[str, str]
    """Tensor key -> safetensors dtype code ("F32", "BF16", "I64", ...)."""
    metadata: dict[str, str]
    """The file's string metadata ({"format": "pt", ...})."""


def find_adapter_folder(path: str | os.PathLike[str]) -> Path:
    """The adapter folder `path` names: `path` itself, or `path/adapter` for a training run's folder.

    A folder holding none of the adapter files but an `adapter/` subfolder with a config is a
    training run's output folder, which holds exactly one adapter: that one is meant.

    Raises:
        FileNotFoundError: nothing at `path`, or a file where a folder is needed.
    """
    folder = Path(path)
    if not folder.is_dir():
        if folder.is_file():
            raise FileNotFoundError(f"no adapter folder at {folder}: it is a file "
                                    "(give the adapter's folder, not a file in it)")
        raise FileNotFoundError(f"no adapter folder at {folder}: nothing is there, "
                                f"so {CONFIG_FILE} is missing")
    own = any((folder / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE))
    if not own and (folder / RUN_ADAPTER / CONFIG_FILE).is_file():
        return folder / RUN_ADAPTER
    return folder


def check_adapter_files(folder: Path) -> None:
    """Refuse a folder that lacks a file, or holds only the pickled weights (never loaded).

    Raises:
        FileNotFoundError: adapter_config.json or adapter_model.safetensors is missing.
        ValueError: only adapter_model.bin is there; the message shows how to convert it once.
    """
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file() and (folder / PICKLE_FILE).is_file():
        raise ValueError(
            f"{folder} holds only {PICKLE_FILE}, a pickle, which lorakit never loads (unpickling can run "
            f"code). Convert it once, in that folder:\n  python -c \"import torch; from safetensors.torch "
            f"import save_file; save_file(torch.load('{PICKLE_FILE}', weights_only=True), '{WEIGHTS_FILE}', "
            "metadata={'format': 'pt'})\""
        )
    for needed in (config_path, weights_path):
        if not needed.is_file():
            run = folder / RUN_ADAPTER
            saved = _checkpoint_adapters(folder)
            hint = (f"; {folder} looks like a training run's folder, whose adapter is {run}"
                    if run.is_dir() else
                    f"; {folder} holds a training run's checkpoints but no final adapter "
                    "(the run did not finish): "
                    f"give a checkpoint's, such as {saved[-1]}" if saved else "")
            raise FileNotFoundError(f"{folder} is not an adapter folder: {needed.name} is missing "
                                    f"(an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}){hint}")


def _checkpoint_adapters(folder: Path) -> list[Path]:
    """The adapters in a run folder's checkpoint-<step>/ folders (train/checkpoint.py), oldest first."""
    found = [(int(p.parent.name.split("-", 1)[1]), p) for p in folder.glob(f"checkpoint-*/{RUN_ADAPTER}")
             if p.parent.name.split("-", 1)[1].isdigit() and (p / CONFIG_FILE).is_file()]
    return [p for _, p in sorted(found)]


def read_config_json(folder: Path) -> object:
    """The parsed content of `folder`'s adapter_config.json (any JSON value; config_from_json checks it).

    Raises:
        ValueError: the file is not valid JSON text.
    """
    config_path = folder / CONFIG_FILE
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None


def read_header(file: Path) -> Header:
    """Keys, shapes, dtypes and metadata of a safetensors file, without reading its tensors.

    Raises:
        ValueError: the file is not a readable safetensors file.
    """
    try:
        with safe_open(str(file), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return Header(shapes={key: tuple(s.get_shape()) for key, s in slices.items()},
                          dtypes={key: s.get_dtype() for key, s in slices.items()},
                          metadata=dict(handle.metadata() or {}))
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None


def dtype_problems(dtypes: dict[str, str], file: Path) -> list[str]:
    """One message per tensor whose dtype is not floating point (adapter tensors must be)."""
    return [f"tensor {key!r} in {file} has dtype {DTYPE_NAMES.get(code, code)}; adapter tensors must be "
            f"floating point ({', '.join(FLOAT_DTYPES.values())})"
            for key, code in dtypes.items() if code not in FLOAT_DTYPES]
