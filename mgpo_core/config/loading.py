"""`load_config`: a packaged preset or a YAML file, its `base:` chain, `--set` overrides and `${VAR}`
expansion, validated into an `MGPOConfig`."""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mgpo_core.config.errors import (
    ConfigError,
    _leaf_field,
    _line,
    _problems_from,
    _section_class,
    _unknown_field_line,
)
from mgpo_core.config.root import MGPOConfig
from mgpo_core.config.secrets import looks_secret, remember_secret

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "tiny-base-cpu"


def available_presets() -> list[str]:
    """Names of the packaged presets (YAML files in `mgpo_core/config/presets/`), sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_from_dict(data: Mapping[str, Any], context: str = "") -> MGPOConfig:
    """Validates a plain nested mapping (e.g. a parsed YAML) into an `MGPOConfig`, raising `ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError([_line("", "a config must be a mapping of sections", data, "see describe_config()")],
                          context)
    try:
        return MGPOConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc), context) from None


def load_config(preset_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> MGPOConfig:
    """Loads a packaged preset by name (None = DEFAULT_PRESET, "tiny-base-cpu") or a YAML file by path, then applies overrides.

    A YAML may start from another with `base: <preset name or path relative to it>`; mappings merge key by key,
    lists and scalars replace. Overrides are `dotted.key=value` with the value parsed as YAML
    (`algorithm.kl_coef=0.02`, `evaluation.benchmarks=[vstar,synthetic]`, `model.path=null`). After merging,
    string values expand `${VAR}` from the environment (`${VAR:-default}` gives a fallback, `$${` a literal
    `${`); an unset variable without fallback is an error naming the field.
    """
    if isinstance(overrides, str):
        raise ConfigError([_line("overrides", "must be a list of key=value strings", overrides,
                                 f"pass [{overrides!r}]")])
    ref = DEFAULT_PRESET if preset_or_path is None else preset_or_path
    file, label = _resolve_source(ref, None)
    context = f"from {label}" + (f" with overrides {list(overrides)}" if overrides else "")
    tree = _load_tree(file, frozenset())
    problems: list[str] = []
    for text in overrides:
        problems.extend(_apply_override(tree, text))
    if problems:
        raise ConfigError(problems, context)
    tree = _expand_env(tree, "", problems)
    if problems:
        raise ConfigError(problems, context)
    tree.setdefault("preset", label)
    return config_from_dict(tree, context)


def _resolve_source(ref: str | Path, relative_to: Path | None, field: str = "preset") -> tuple[Path, str]:
    """(file, label) for a packaged preset name or a YAML path (relative paths first against `relative_to`)."""
    names = available_presets()
    if isinstance(ref, str) and ref in names:
        return PRESETS_DIR / f"{ref}.yaml", ref
    path = Path(ref).expanduser()
    if relative_to is not None and not path.is_absolute() and (relative_to / path).is_file():
        path = relative_to / path
    if path.is_file():
        return path, str(ref)
    close = difflib.get_close_matches(str(ref), names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError([_line(field, "no packaged preset or YAML file by that name", str(ref),
                             f"{hint}use one of {names} or the path of a .yaml file")])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([_line(str(path), "cannot read the file", exc.strerror, "check the path")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([_line(str(path), f"is not valid YAML: {exc}".replace("\n", " "), path.name,
                                 "fix the YAML syntax at the position shown")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([_line(str(path), "top level must be a mapping of sections", data,
                                 "write `section:` keys such as `algorithm:` at the top level")])
    return data


def _load_tree(file: Path, seen: frozenset[Path]) -> dict[str, Any]:
    key = file.resolve()
    if key in seen:
        raise ConfigError([_line("base", "inheritance cycle", str(file), "remove one of the `base:` links")])
    data = _read_yaml(file)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError([_line(f"{file}: base", "must be a preset name or a YAML path", base,
                                 f"use one of {available_presets()} or a path")])
    parent_file, _ = _resolve_source(base, file.parent, field=f"base (in {file})")
    return _merge(_load_tree(parent_file, seen | {key}), data)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(tree: dict[str, Any], text: str) -> list[str]:
    """Applies one `dotted.key=value` override to `tree` in place; returns the problems instead of raising."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        return [_line(key or "<override>", "override has no 'dotted.key=' part", text,
                      "write it as dotted.key=value, e.g. algorithm.kl_coef=0.02")]
    parts = key.split(".")
    for depth in range(len(parts)):
        cls = _section_class(parts[:depth])
        if cls is None:
            return [_line(".".join(parts[:depth]), "is a value, not a section", text,
                          f"override '{'.'.join(parts[:depth])}=...' itself")]
        if parts[depth] not in cls.model_fields:
            return [_unknown_field_line(cls, ".".join(parts[:depth]), parts[depth], raw)
                    + f" (in override {text!r})"]
    text_only = _text_only(_leaf_field(parts).annotation)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if not text_only:
            first = str(exc).splitlines()[0]
            return [_line(key, f"override value is not valid YAML ({first})", raw, f"quote it: {key}='...'")]
        value = raw.strip()
    # YAML reads `run_name=123` as an int and `turn1_template={question}` as a mapping; a text field means text.
    if text_only and value is not None and not isinstance(value, str):
        value = raw.strip()
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]] = _merge(node[parts[-1]], value)
    else:
        node[parts[-1]] = value
    return []


def _text_only(ann: Any) -> bool:
    args = typing.get_args(ann) if typing.get_origin(ann) in (types.UnionType, typing.Union) else (ann,)
    return str in args and not {bool, int, float} & set(args)


_ENV_PATTERN = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, path: str, problems: list[str]) -> Any:
    """Returns `node` with `${VAR}` expanded in every string; unset variables are appended to `problems`."""
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}.{i}", problems) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        escaped, name, default = match.groups()
        if escaped:
            return match.group(0)[1:]
        value = os.environ.get(name)
        if value:  # empty counts as unset, as with the shell's ${VAR:-default}
            if looks_secret(name):  # masked wherever the config is recorded (config/secrets.py)
                remember_secret(value)
            return value
        if default is not None:
            return default
        problems.append(_line(path, f"environment variable {name} is not set", node,
                              f"export {name}=<value> or pass the override {path}=<value>"))
        return match.group(0)

    return _ENV_PATTERN.sub(substitute, node)
