import math

import pytest

from lorakit import LoraConfig


def test_defaults_and_lists_become_tuples():
    config = LoraConfig(targets=["q_proj", "v_proj"], layers=[0, 2])
    assert config.targets == ("q_proj", "v_proj")
    assert config.layers == (0, 2)
    assert config.scale_for("x.q_proj") == 1.0


def test_frozen():
    config = LoraConfig()
    with pytest.raises(AttributeError):
        config.r = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"r": 0}, "r must be an integer >= 1, got 0"),
        ({"r": 2.5}, "r must be an integer"),
        ({"alpha": 0}, "alpha must be a number > 0, got 0"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"bias": "some"}, "bias must be one of none, all, lora_only, got 'some'"),
        ({"init": "xavier"}, "init must be one of kaiming, gaussian, zeros, random, pissa, pissa_niter_N, "
                         "olora (N an integer >= 1, e.g. pissa_niter_4), got 'xavier'"),
        ({"targets": "("}, "targets is not a valid regular expression"),
        ({"targets": []}, "targets must not be an empty list"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be an integer >= 1"),
        ({"layers": [-1]}, "layers must be non-negative block indices"),
    ],
)
def test_invalid_values_are_named(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        LoraConfig(**kwargs)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"targets": 5}, "targets must be a regular expression or a list of module names, got 5"),
        ({"targets": b"q_proj"}, "targets must be a regular expression or a list of module names, "
                                 "got b'q_proj'"),
        ({"targets": {"q_proj": 1}}, "targets must be a regular expression or a list of module names, "
                                     "got {'q_proj': 1}"),
        ({"exclude": 5}, "exclude must be a regular expression or a list of module names, got 5"),
        ({"modules_to_save": 5}, "modules_to_save must be a list of module names, got 5"),
        ({"modules_to_save": [1]}, "modules_to_save must be a list of module names, got (1,)"),
        ({"r": "8"}, "r must be an integer >= 1, got '8'"),
        ({"alpha": None}, "alpha must be a number > 0, got None"),
        ({"dropout": "0.1"}, "dropout must be a number in [0, 1), got '0.1'"),
        ({"dropout": None}, "dropout must be a number in [0, 1), got None"),
        ({"layers": 3.5}, "layers must be a list of non-negative block indices (e.g. [0, 1]), got 3.5"),
        ({"layers": 3}, "layers must be a list of non-negative block indices (e.g. [0, 1]), got 3"),
        ({"layers": "0,1"}, "layers must be a list of non-negative block indices (e.g. [0, 1]), got '0,1'"),
        ({"rank_pattern": 5}, "rank_pattern must be a mapping of module-path regular expression to rank "
                              "(e.g. {'v_proj': 4}), got 5"),
        ({"rank_pattern": [("v_proj", 4)]},
         "rank_pattern must be a mapping of module-path regular expression"),
        ({"alpha_pattern": None}, "alpha_pattern must be a mapping of module-path regular expression to "
                                  "alpha (e.g. {'v_proj': 16}), got None"),
        ({"rank_pattern": {1: 4}}, "rank_pattern keys must be regular expressions (text), got 1"),
        ({"alpha_pattern": {("q",): 4}}, "alpha_pattern keys must be regular expressions (text), got ('q',)"),
        ({"bias": None}, "bias must be one of none, all, lora_only, got None"),
        ({"init": 0}, "init must be one of kaiming, gaussian"),
        ({"use_rslora": "yes"}, "use_rslora must be True or False, got 'yes'"),
        ({"allow_requantize": 1}, "allow_requantize must be True or False, got 1"),
        ({"use_dora": None}, "use_dora must be True or False, got None"),
        ({"share_dropout_mask": "no"}, "share_dropout_mask must be True or False, got 'no'"),
    ],
)
def test_values_of_the_wrong_kind_are_named(kwargs, fragment):
    # From Python these were bare TypeErrors from inside (targets=5: "'int' object is not iterable"),
    # or passed unseen (use_rslora="yes"); they are one line each in the ValueError users catch.
    with pytest.raises(ValueError, match="invalid LoraConfig") as err:
        LoraConfig(**kwargs)
    assert fragment in str(err.value)
    assert len(str(err.value).splitlines()) == 2  # the heading and this one problem


def test_lists_of_any_kind_and_mappings_are_read():
    config = LoraConfig(targets={"q_proj"}, layers=range(2), modules_to_save=("score",),
                        rank_pattern=dict.fromkeys(["v_proj"], 4))
    assert config.targets == ("q_proj",) and config.layers == (0, 1) and config.modules_to_save == ("score",)
    assert config.rank_for("model.v_proj") == 4


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as err:
        LoraConfig(r=0, alpha=-1, dropout=2)
    message = str(err.value)
    assert "r must" in message and "alpha must" in message and "dropout must" in message


def test_patterns_and_rslora_scale():
    config = LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 4},
                        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2}, use_rslora=True)
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 2
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 16
    assert math.isclose(config.scale_for("model.layers.0.self_attn.v_proj"), 16 / 2)
    # a pattern key must match a whole trailing part of the path, as in PEFT
    assert config.rank_for("model.layers.0.self_attn.xv_proj") == 8


def test_one_rule_matches_module_paths():
    from lorakit.core.config import path_matches

    assert path_matches(("lm_head",), "lm_head") and path_matches(("lm_head",), "model.lm_head")
    assert not path_matches(("lm_head",), "xlm_head") and not path_matches(("q_proj",), "q_proj.base")
    assert (path_matches(r".*\.0\.q_proj", "layers.0.q_proj")
            and not path_matches(r"q_proj", "layers.0.q_proj"))
