"""Flag help is read from the config fields' docstrings, so each setting is described in one place."""

import argparse
from dataclasses import dataclass, fields

import pytest

from lorakit.cli.common import field_docs, field_help
from lorakit.cli.main import build_parser
from lorakit.cli.train_cmd import DISTRIBUTED_FLAGS, FLAGS
from lorakit.core.config import LoraConfig
from lorakit.train.config import TrainConfig
from lorakit.train.distributed_config import DistributedConfig


def helps(command: str) -> dict[str, str]:
    """Each option of `lorakit COMMAND` with its help text."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {option: action.help or "" for action in sub._actions for option in action.option_strings}


@pytest.mark.parametrize("config", [TrainConfig, DistributedConfig, LoraConfig])
def test_every_config_field_has_a_docstring(config):
    assert set(field_docs(config)) == {f.name for f in fields(config)}
    assert all(doc.strip() for doc in field_docs(config).values())


def test_train_flags_show_their_fields_docstring():
    shown = helps("train")
    flag_of = {field: flag for flag, field, _, _ in FLAGS}
    for flag, field, _, own in FLAGS:
        assert shown[flag].startswith(own or field_help(TrainConfig, field, flag_of)), flag
    for flag, key, _, own in DISTRIBUTED_FLAGS:
        assert shown[flag].startswith(own or field_help(DistributedConfig, key)), flag
    # The words come from the docstring: a field's name in backquotes reads as its flag.
    assert "Continue the run in `output_dir`" in field_docs(TrainConfig)["resume"]
    assert shown["--resume"].startswith("continue the run in --output-dir from its newest checkpoint")
    assert shown["--r"] == "LoRA rank (default: 16)" and shown["--no-progress"] == "hide the progress bar"


def test_other_commands_reuse_the_train_settings_words():
    dtype = field_help(TrainConfig, "dtype")
    for command in ("train", "eval", "generate", "merge", "serve"):
        assert helps(command)["--dtype"] == dtype, command
        assert helps(command)["--device"].startswith(field_help(TrainConfig, "device")), command
    assert helps("eval")["--max-new-tokens"] == field_help(TrainConfig, "max_new_tokens")
    assert helps("estimate")["--targets"] == field_help(TrainConfig, "targets")
    assert helps("estimate")["--r"] == field_help(TrainConfig, "r")


def test_field_help_folds_lines_drops_the_full_stop_and_keeps_acronyms():
    @dataclass
    class Example:
        path: str = "x"
        """Where the files go;
        see `other` and `unknown`."""
        other: int = 1
        """LoRA rank."""
        undocumented: int = 2

    assert field_docs(Example) == {"path": "Where the files go; see `other` and `unknown`.",
                                   "other": "LoRA rank."}
    assert field_help(Example, "path", {"other": "--other"}) == "where the files go; see --other and unknown"
    assert field_help(Example, "other") == "LoRA rank"
