"""`_Section`, the base of every config section, plus the field types and the template check they share."""

from __future__ import annotations

import string
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mgpo_core.config.errors import (
    _SECTION_PATHS,
    ConfigError,
    _FieldProblem,
    _problems_from,
    _unknown_field_line,
)

Resample = Literal["nearest", "bilinear", "bicubic", "lanczos"]
PositiveInt = typing.Annotated[int, Field(ge=1)]
UnitFloat = typing.Annotated[float, Field(ge=0.0, lt=1.0)]


class _Section(BaseModel):
    """Shared behaviour: unknown keys refused, assignments validated (and reverted when rejected)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
            return
        prefix = _SECTION_PATHS.get(type(self), "")
        if name not in type(self).model_fields:
            raise ConfigError([_unknown_field_line(type(self), prefix, name, value)])
        old = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            # pydantic keeps the new value when an after-validator rejects it; never leave an invalid config.
            self.__dict__[name] = old
            raise ConfigError(_problems_from(exc, prefix)) from None


def _check_template(text: str, placeholders: frozenset[str]) -> str:
    """Checks a `str.format` template uses exactly `placeholders`; returns it unchanged."""
    allowed = ", ".join("{" + p + "}" for p in sorted(placeholders))
    literal_hint = "write literal braces doubled, e.g. \\boxed{{}}"
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise _FieldProblem(f"malformed braces ({exc})", text, literal_hint) from None
    unknown = sorted(used - placeholders)
    if unknown:
        shown = ", ".join("{" + u + "}" for u in unknown)
        raise _FieldProblem(f"unknown placeholder(s) {shown}", text, f"use only {allowed}; {literal_hint}")
    missing = sorted(placeholders - used)
    if missing:
        shown = ", ".join("{" + m + "}" for m in missing)
        raise _FieldProblem(f"missing placeholder(s) {shown}", text, f"include {allowed} in the template")
    return text
