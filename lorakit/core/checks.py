"""The small rules every check shares: what counts as an integer or a number, and a JSON value's name.

Python counts True and False as integers (bool is a subclass of int), so `isinstance(True, int)`
holds; a setting of `r: true` in YAML or `"max_tokens": true` in JSON is still a mistake. Every
config and request check asks these functions instead of writing the rule again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Checked in this order: bool before int (True is an int), int before float.
_JSON_KINDS: tuple[tuple[type, str], ...] = ((bool, "boolean"), (int, "integer"), (float, "number"),
                                             (str, "string"), (list, "list"), (Mapping, "object"))


def is_int(value: object) -> bool:
    """Whether `value` is an integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value: object) -> bool:
    """Whether `value` is an integer >= 1, not a bool."""
    return is_int(value) and value >= 1  # type: ignore[operator]


def is_non_negative_int(value: object) -> bool:
    """Whether `value` is an integer >= 0, not a bool."""
    return is_int(value) and value >= 0  # type: ignore[operator]


def is_real(value: object) -> bool:
    """Whether `value` is a real number (an int or a float, not a bool); inf and nan count."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite_real(value: object) -> bool:
    """Whether `value` is a finite real number (an int or a float, not a bool, neither inf nor nan)."""
    return is_real(value) and math.isfinite(value)  # type: ignore[arg-type]


def json_type_name(value: object, *, article: bool = False, integer: bool = True) -> str:
    """The name of a decoded JSON value's type, as a person would recognise it in the file or request.

    "null", "boolean", "integer", "number", "string", "list" or "object"; a value JSON cannot hold
    is named by its Python type ("tuple").

    Args:
        value: the value, as json.loads or yaml.safe_load gives it.
        article: "a string", "an object" (null and Python type names take none).
        integer: whether whole numbers are "integer"; False names every number "number", as JSON does.
    """
    if value is None:
        return "null"
    for kind, name in _JSON_KINDS:
        if isinstance(value, kind):
            name = "number" if name == "integer" and not integer else name
            return (("an " if name[0] in "aeiou" else "a ") + name) if article else name
    return type(value).__name__
