"""lorakit.core.checks: the one home of "an integer, not a bool" and its siblings."""

import json
import math
from collections import OrderedDict

import pytest

from lorakit.core.checks import (
    is_finite_real,
    is_int,
    is_non_negative_int,
    is_positive_int,
    is_real,
    json_type_name,
)

NOT_NUMBERS = [True, False, None, "1", b"1", [1], {"a": 1}, 1j]


@pytest.mark.parametrize("value, expected", [
    (0, True), (-3, True), (10**30, True), (1.0, False), (2.5, False), (math.inf, False),
    *[(v, False) for v in NOT_NUMBERS],
])
def test_is_int_refuses_bools_and_floats(value, expected):
    assert is_int(value) is expected


@pytest.mark.parametrize("value, positive, non_negative", [
    (1, True, True), (7, True, True), (0, False, True), (-1, False, False),
    (True, False, False), (False, False, False), (1.0, False, False), ("2", False, False),
    (None, False, False),
])
def test_integer_bounds(value, positive, non_negative):
    assert is_positive_int(value) is positive
    assert is_non_negative_int(value) is non_negative


@pytest.mark.parametrize("value, real, finite", [
    (0, True, True), (-2, True, True), (0.5, True, True), (1e308, True, True),
    (math.inf, True, False), (-math.inf, True, False), (math.nan, True, False),
    *[(v, False, False) for v in NOT_NUMBERS],
])
def test_real_keeps_inf_and_nan_finite_real_refuses_them(value, real, finite):
    assert is_real(value) is real
    assert is_finite_real(value) is finite


@pytest.mark.parametrize("text, name, named_with_article, as_json_number", [
    ("null", "null", "null", "null"),
    ("true", "boolean", "a boolean", "boolean"),
    ("false", "boolean", "a boolean", "boolean"),
    ("3", "integer", "an integer", "number"),
    ("2.5", "number", "a number", "number"),
    ('"x"', "string", "a string", "string"),
    ("[1]", "list", "a list", "list"),
    ('{"a": 1}', "object", "an object", "object"),
])
def test_json_type_name_of_decoded_values(text, name, named_with_article, as_json_number):
    value = json.loads(text)
    assert json_type_name(value) == name
    assert json_type_name(value, article=True) == named_with_article
    assert json_type_name(value, integer=False) == as_json_number


def test_json_type_name_of_other_values():
    assert json_type_name(OrderedDict(a=1), article=True) == "an object"  # any mapping is an object
    # Not a JSON value: its Python type, with no article.
    assert json_type_name((1, 2)) == json_type_name((1, 2), article=True) == "tuple"
    assert json_type_name(None, article=True) == "null"
