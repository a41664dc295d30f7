"""Configuration sections and the small helpers every module shares.

A ``Section`` is one part of a workflow file (pydantic: unknown keys and bad values are refused,
naming the field). Each stage module declares its own section; the library class of that stage
takes the same fields with the same defaults (``defaults_of``), so a library user and a workflow
user get the same settings from the same names, and the checks live in the section only.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from emscale.errors import ConfigError

S = TypeVar("S", bound="Section")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str] = ""  # the workflow key: errors name ``name.field``

    def __init__(self, **values):
        # built directly (library use): errors as one ConfigError naming the fields; inside a
        # workflow, pydantic validates the section itself and the workflow names the fields
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, prefix=self.name, model=type(self))) from None

    # pydantic calls a custom __init__ for nested sections too unless it is marked as its own
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def of(cls: type[S], where: str, /, **values) -> S:
        """The section from keyword values, its errors as one ``ConfigError`` naming
        ``where.field`` (what the library classes call to check their parameters)."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, prefix=where, model=cls)) from None


def defaults_of(section: type[Section]) -> dict[str, Any]:
    """Each field's default (what a library class's ``__init__`` defaults are made of)."""
    return {name: f.get_default(call_default_factory=True) for name, f in section.model_fields.items()}


def validation_message(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
                       ) -> str:
    """Every error of a pydantic validation in plain words, ``field.path: what is wrong``, joined
    by '; ' (all of them: a file is fixed in one go). ``model`` (what was validated) lets an
    unknown field suggest the known one it is closest to."""
    parts = []
    for err in exc.errors():
        loc, msg = list(err["loc"]), plain_message(err, _fields_at(model, err["loc"][:-1]))
        named = re.match(r"([a-z_][a-z0-9_.]*): ", msg)
        if named:  # a model validator's error names its field first: "k_range: ..."
            loc, msg = loc + named[1].split("."), msg[named.end():]
        parts.append(f"{field_path(prefix, *loc) or '(top level)'}: {msg}")
    return "; ".join(parts)


def field_path(*loc) -> str:
    """``train.widths[1]``: names joined by dots, list positions in brackets."""
    path = ""
    for part in loc:
        if part == "":
            continue
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return path


def did_you_mean(value: Any, known) -> str:
    """`` (did you mean 'x'?)`` when ``value`` is close to one of ``known``, else ''."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel] | None, loc) -> list[str]:
    """The field names of the section at ``loc`` inside ``model`` (none where unknown)."""
    for part in loc:
        if model is None or isinstance(part, int):
            return []
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


_PLAIN = {  # pydantic's error types in plain words ({input}: the value given; ctx's keys)
    "missing": "is required",
    "int_parsing": "must be a whole number, got {input!r}",
    "int_type": "must be a whole number, got {input!r}",
    "int_from_float": "must be a whole number, got {input!r}",
    "float_parsing": "must be a number, got {input!r}",
    "float_type": "must be a number, got {input!r}",
    "bool_parsing": "must be true or false, got {input!r}",
    "bool_type": "must be true or false, got {input!r}",
    "string_type": "must be text, got {input!r}",
    "list_type": "must be a list, got {input!r}",
    "tuple_type": "must be a list, got {input!r}",
    "dict_type": "must be a mapping of fields, got {input!r}",
    "model_type": "must be a mapping of fields, got {input!r}",
    "model_attributes_type": "must be a mapping of fields, got {input!r}",
    "greater_than_equal": "must be at least {ge}, got {input!r}",
    "greater_than": "must be greater than {gt}, got {input!r}",
    "less_than_equal": "must be at most {le}, got {input!r}",
    "less_than": "must be less than {lt}, got {input!r}",
    "too_short": "needs at least {min_length} values, got {input!r}",
    "too_long": "takes at most {max_length} values, got {input!r}",
}


def plain_message(err: dict, known: list[str] = ()) -> str:
    """One pydantic error in plain words."""
    kind, given = err["type"], err.get("input")
    if kind == "extra_forbidden":
        hint = did_you_mean(err["loc"][-1], known)
        if not hint and known:
            hint = f" (the fields here: {', '.join(known)})"
        return f"unknown field{hint}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        return (f"must be one of {', '.join(choices)}, got {given!r}"
                f"{did_you_mean(given, choices)}")
    if kind == "missing" and isinstance(err["loc"][-1], int):
        return "is missing (too few values)"
    if kind in _PLAIN:
        try:
            return _PLAIN[kind].format(input=given, **err.get("ctx", {}))
        except (KeyError, IndexError):
            pass
    return err["msg"].removeprefix("Value error, ")


def load_yaml(path: str | Path, what: str) -> dict:
    """A YAML mapping from ``path`` (``safe_load``: no python tags); errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    except yaml.MarkedYAMLError as exc:  # one line: where, and what the parser found
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(filter(None, [exc.context, exc.problem]))
        if "constructor for the tag" in problem:
            problem += " (plain YAML only: tags that build Python objects are refused)"
        raise ConfigError(f"{path}: {where}not a valid {what}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not a valid {what}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a mapping, got {type(data).__name__}")
    return data


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second (every timestamp emscale writes)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays, tuples, paths and other objects made JSON values
    (what Zarr attributes and provenance hold)."""
    def default(o):
        if hasattr(o, "tolist"):  # numpy arrays and scalars
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))
