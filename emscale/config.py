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
            raise ConfigError(validation_message(exc, prefix=self.name)) from None

    # pydantic calls a custom __init__ for nested sections too unless it is marked as its own
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def of(cls: type[S], where: str, /, **values) -> S:
        """The section from keyword values, its errors as one ``ConfigError`` naming
        ``where.field`` (what the library classes call to check their parameters)."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, prefix=where)) from None


def defaults_of(section: type[Section]) -> dict[str, Any]:
    """Each field's default (what a library class's ``__init__`` defaults are made of)."""
    return {name: f.get_default(call_default_factory=True) for name, f in section.model_fields.items()}


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """Every error of a pydantic validation as ``field.path: message``, joined by '; '."""
    parts = []
    for err in exc.errors():
        loc, msg = list(err["loc"]), err["msg"].removeprefix("Value error, ")
        named = re.match(r"([a-z_][a-z0-9_.]*): ", msg)
        if named:  # a model validator's error names its field first: "k_range: ..."
            loc, msg = loc + named[1].split("."), msg[named.end():]
        where = ".".join(str(p) for p in (prefix, *loc) if p != "") or "(top level)"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


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
