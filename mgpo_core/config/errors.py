"""`ConfigError` and the translation of pydantic errors into `<path>: <what> (got <value>); <fix>` lines."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """An unusable config. `problems` holds one `<dotted.path>: <what> (got <value>); <fix>` line per problem."""

    def __init__(self, problems: Sequence[str], context: str = "") -> None:
        self.problems = list(problems)
        where = f" ({context})" if context else ""
        head = f"invalid MGPO config{where}: {len(self.problems)} problem(s)"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


class _FieldProblem(ValueError):
    """Raised by our validators so the error wrapper can print path, value and fix instead of pydantic's prose."""

    def __init__(self, what: str, got: Any, fix: str, field: str | None = None) -> None:
        super().__init__(what)
        self.what, self.got, self.fix, self.field = what, got, fix, field


def _short(value: Any, limit: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line(path: str, what: str, got: Any, fix: str) -> str:
    return f"{path or '<config>'}: {what} (got {_short(got)}); {fix}"


_SECTION_PATHS: dict[type[BaseModel], str] = {}
"""Dotted path of each section class inside the root config (`data.filters` for `DataFilterConfig`); `root.py`
fills it through `_register_tree` once every section class exists."""
_ROOT: list[type[BaseModel]] = []
"""The root config class (`MGPOConfig`) the walks below start from; `root.py` sets it (`_register_tree`)."""


def _register_tree(root: type[BaseModel], paths: Mapping[type[BaseModel], str]) -> None:
    """Records the root class and each section's dotted path, so error lines can name any section's fields."""
    _ROOT[:] = [root]
    _SECTION_PATHS.clear()
    _SECTION_PATHS.update(paths)


def _root() -> type[BaseModel]:
    """The registered root config class (`MGPOConfig`)."""
    return _ROOT[0]


def _section_class(parts: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class reached by walking `parts` from the root, or None if they leave the section tree."""
    cls: type[BaseModel] = _root()
    for part in parts:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def _leaf_field(parts: Sequence[str | int]) -> Any:
    """The FieldInfo of the deepest named field on `parts` (list/tuple indices stop the walk)."""
    cls: type[BaseModel] | None = _root()
    found = None
    for part in parts:
        if cls is None or str(part) not in cls.model_fields:
            break
        found = cls.model_fields[str(part)]
        ann = found.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return found


def _unknown_field_line(cls: type[BaseModel], prefix: str, name: str, value: Any) -> str:
    names = list(cls.model_fields)
    path = f"{prefix}.{name}" if prefix else name
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""
    where = f"'{prefix}'" if prefix else "the top level"
    return _line(path, f"unknown field in {where}", value, f"{hint}valid fields: {', '.join(names)}")


def _fix_hint(field: Any) -> str:
    if field is None:
        return "see describe_config() for the valid fields"
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"give a mapping of {', '.join(ann.model_fields)}"
    if typing.get_origin(ann) is Literal:
        return f"use one of {', '.join(repr(a) for a in typing.get_args(ann))}"
    default = field.default_factory() if field.default_factory else field.default
    return f"expected {_type_name(ann)}, e.g. the default {default!r}"


def _problems_from(exc: ValidationError, prefix: str = "") -> list[str]:
    """One `path: what (got value); fix` line per pydantic error; `prefix` is the section path of `exc`."""
    lines = []
    for err in exc.errors():
        parts: list[str | int] = [*(prefix.split(".") if prefix else []), *err["loc"]]
        path = ".".join(str(p) for p in parts)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldProblem):
            full = path if cause.field is None else ".".join(filter(None, [path, cause.field]))
            lines.append(_line(full, cause.what, cause.got, cause.fix))
        elif err["type"] == "extra_forbidden":
            parent = _section_class(parts[:-1]) or _root()
            owner = ".".join(str(p) for p in parts[:-1])
            lines.append(_unknown_field_line(parent, owner, str(parts[-1]), err["input"]))
        else:
            what = err["msg"].removeprefix("Value error, ")
            lines.append(_line(path, what[:1].lower() + what[1:], err["input"], _fix_hint(_leaf_field(parts))))
    return lines


def _type_name(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))
