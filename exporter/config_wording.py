"""How config problems are worded: our own, and pydantic's translated into ours.

Every problem is one line, "key.path: what was expected, got what was there", with the
YAML hints users rely on (yes/no read as booleans, quoted numbers) and a "did you mean" for
unknown keys and choices. Values are cut short, and never shown for keys marked `SECRET` or
below one (a whole section, such as api.auth, may be marked): a token pasted into the wrong
key must not reach a terminal or a CI log. An unknown key's name is shown only when it looks
like one of ours (lower-case words joined by "_"); any other name may be a pasted secret.
`problem` and `refuse` raise our own problems from validators; `problem_line` words any
pydantic error detail, reading the expected type and range from the model's own fields, so
no bound is written twice.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "SECRET",
    "TOP_LEVEL",
    "Wording",
    "describe",
    "did_you_mean",
    "fmt",
    "key_name",
    "problem",
    "problem_line",
    "refusal",
]

TOP_LEVEL = "(top level)"  # the key path of the document itself
_YAML_BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off")
_MAX_ECHO = 60  # longer values are cut in messages
#: Shorter values at secret keys are not searched for in our own messages (a value like "e"
#: would garble them): those messages never quote the value anyway.
_MIN_MASKED = 8
#: An unknown key's name is echoed only in the shape of the config's own keys. A random
#: token of 20 characters has this shape once in about 30 million (no digits, no capitals).
_KEY_LIKE = re.compile(r"[a-z][a-z_]{0,31}")
_KINDS: dict[type, str] = {
    str: "a string",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "a mapping",
}


@dataclass(frozen=True, slots=True)
class Wording:
    """Field metadata for messages: what a value must be, and whether it may be echoed."""

    expected: str = ""
    secret: bool = False  # the value (or any below it) may be a token pasted into the wrong key


SECRET = Wording(secret=True)


def problem(message: str) -> PydanticCustomError:
    """One of our own problems; `{here}` in it is replaced by the key path of its section."""
    return PydanticCustomError("config", "{message}", {"message": message})


def refusal(
    title: str, value: object, problems: Sequence[tuple[tuple[str, ...], str]]
) -> ValidationError:
    """Several problems to raise at once, each at a key below the validator's own."""
    return ValidationError.from_exception_data(
        title,
        [InitErrorDetails(type=problem(text), loc=loc, input=value) for loc, text in problems],
    )


def did_you_mean(word: str, known: Iterable[str]) -> str:
    lowered = {candidate.lower(): candidate for candidate in known}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1)
    return f"; did you mean {lowered[matches[0]]!r}?" if matches else ""


def key_name(key: object) -> str:
    """An unknown key as a message shows it: its name when it is shaped like the config's own
    keys, else only its length or kind (it may be a secret pasted where a key goes)."""
    if isinstance(key, str) and _KEY_LIKE.fullmatch(key):
        return key
    if isinstance(key, str):
        return f"<a key of {len(key)} characters, not shown>"
    return f"<a key that is {describe(key, secret=True)}, not shown>"


def describe(value: object, *, secret: bool = False) -> str:
    """Show a value in a message: YAML spellings, cut short, or only its kind when `secret`
    (and a string's length: enough to tell an empty or truncated value from a pasted token)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if secret and isinstance(value, str):
        return f"a string of {len(value)} characters (not shown)"
    if secret or not isinstance(value, str | int | float):
        return _KINDS.get(type(value), f"a value of type {type(value).__name__}")
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large integer"
    if isinstance(value, str) and len(value) > _MAX_ECHO:
        return f"{value[:_MAX_ECHO]!r}... ({len(value)} characters)"
    return repr(value)


def _number_hint(value: object) -> str:
    """Explain the two YAML readings that most often turn a number into something else."""
    if isinstance(value, bool):
        return " (YAML reads unquoted yes/no/on/off/true/false as booleans)"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string to YAML: drop any quotes, and write exponents like 1.0e+3)"
    return ""


def fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def _bounds(field: FieldInfo) -> tuple[float | None, float | None, float | None]:
    """The (gt, ge, le) constraints a field declares."""
    found: dict[str, float | None] = {"gt": None, "ge": None, "le": None}
    for item in field.metadata:
        for name in found:
            if getattr(item, name, None) is not None:
                found[name] = getattr(item, name)
    return found["gt"], found["ge"], found["le"]


def _range_text(gt: float | None, ge: float | None, le: float | None) -> str:
    if ge is not None and le is not None:
        return f" from {fmt(ge)} to {fmt(le)}"
    parts = [
        f"{op} {fmt(bound)}"
        for op, bound in ((">", gt), (">=", ge), ("<=", le))
        if bound is not None
    ]
    return " " + " and ".join(parts) if parts else ""


def _wording(field: FieldInfo) -> Wording:
    return next((m for m in field.metadata if isinstance(m, Wording)), Wording())


def _plain_type(annotation: object) -> object:
    """The annotation without `| None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        others = [arg for arg in get_args(annotation) if arg is not type(None)]
        return others[0] if len(others) == 1 else annotation
    return annotation


def _expected(field: FieldInfo, value: object, *, secret: bool) -> str:
    """What a key holding `value` should have held, from its declared type and constraints."""
    shown = describe(value, secret=secret)
    kind = _plain_type(field.annotation)
    if _wording(field).expected:
        return f"expected {_wording(field).expected}, got {shown}"
    if kind is float:
        return f"expected a number{_range_text(*_bounds(field))}, got {shown}{_number_hint(value)}"
    if kind is int:
        gt, ge, le = _bounds(field)
        text = _range_text(gt, ge, le)
        return f"expected an integer{text}, got {shown}{_number_hint(value)}"
    if kind is bool:
        quoted = isinstance(value, str) and value.lower() in _YAML_BOOLEAN_WORDS
        hint = " (a string to YAML: drop the quotes)" if quoted else ""
        return f"expected true or false, got {shown}{hint}"
    if get_origin(kind) is Literal:
        choices = [str(choice) for choice in get_args(kind)]
        guess = did_you_mean(value, choices) if isinstance(value, str) else ""
        return f"expected one of {', '.join(choices)}, got {shown}{guess}"
    return f"expected a string, got {shown}"


def _model_at(
    root: type[BaseModel], loc: Sequence[str | int]
) -> tuple[type[BaseModel] | None, FieldInfo | None, bool]:
    """The model a key path leads into (None past a leaf), the field it names last, and
    whether that key or one above it is marked secret."""
    model: type[BaseModel] | None = root
    field: FieldInfo | None = None
    secret = False
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: still the same field
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None, None, secret
        secret = secret or _wording(field).secret
        kind = _plain_type(field.annotation)
        model = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return model, field, secret


def _key_path(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def problem_line(root: type[BaseModel], detail: Mapping[str, Any]) -> str:
    """One pydantic error detail as "key.path: what was expected", in this module's words."""
    loc, kind, value = tuple(detail["loc"]), detail["type"], detail["input"]
    if kind == "extra_forbidden":
        parent, _, _ = _model_at(root, loc[:-1])
        key = loc[-1]
        name = key_name(key)
        known = parent.model_fields if parent is not None else ()
        guess = did_you_mean(key, known) if isinstance(key, str) else ""
        where = f"{_key_path(loc[:-1])}.{name}" if loc[:-1] else name
        return f"{where}: unknown key{guess}"
    where = _key_path(loc) or TOP_LEVEL
    _, field, secret = _model_at(root, loc)
    if kind == "config":
        message = str(detail["ctx"]["message"]).replace("{here}", _key_path(loc[:-1]))
        if secret and isinstance(value, str) and len(value) >= _MIN_MASKED and value in message:
            # Our own messages at secret keys never quote the value; this keeps it so.
            message = message.replace(value, describe(value, secret=True))
        return f"{where}: {message}"
    if kind == "missing":
        return f"{where}: required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: expected a mapping, got {describe(value, secret=secret)}"
    if field is None:  # not expected: every other error is about a declared key
        return f"{where}: {detail['msg']}"
    return f"{where}: {_expected(field, value, secret=secret)}"
