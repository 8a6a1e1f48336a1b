"""What a config becomes: its `config_hash`, YAML (`to_yaml`, `save_config`), flat MLflow params, the field
reference (`describe_config`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from mgpo_core.config.errors import _type_name
from mgpo_core.config.root import MGPOConfig

HASH_EXCLUDED_FIELDS: tuple[str, ...] = ("tracking", "run_name", "state_dir", "preset")
"""Top-level fields left out of `config_hash`: they name or locate a run but never change what it computes."""
HASH_EXCLUDED_SUBFIELDS: dict[str, tuple[str, ...]] = {
    "deepspeed": ("ssh_port", "master_addr", "master_port", "env_forward"),
}
"""Fields of a section left out of `config_hash`: how the ranks reach each other, never what they compute."""


def config_hash(cfg: MGPOConfig) -> str:
    """16 hex chars of sha256 over the canonical JSON (sorted keys, no spaces) of the result-relevant fields.

    Excluded (`HASH_EXCLUDED_FIELDS`): `tracking.*` (where metrics go), `run_name`, `state_dir` (where files go)
    and `preset` (where the values came from); and (`HASH_EXCLUDED_SUBFIELDS`) the launcher's connection settings
    `deepspeed.ssh_port`, `master_addr`, `master_port` and `env_forward`. Everything else, including evaluation
    settings and `model.path` after `${VAR}` expansion, is hashed, so the hash is a sound cache key for every stage.
    """
    exclude: dict[str, Any] = {name: True for name in HASH_EXCLUDED_FIELDS}
    exclude.update({section: set(names) for section, names in HASH_EXCLUDED_SUBFIELDS.items()})
    data = cfg.model_dump(mode="json", exclude=exclude)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the prompt templates) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _represent_str)


def _escape_env(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _escape_env(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_env(v) for v in node]
    return node.replace("${", "$${") if isinstance(node, str) else node


def to_yaml(cfg: MGPOConfig) -> str:
    """The full config as YAML that `load_config(path)` reads back to an equal config."""
    body = yaml.dump(_escape_env(cfg.model_dump(mode="json")), Dumper=_BlockDumper, sort_keys=False,
                     allow_unicode=True, width=100)
    return f"# MGPO config, config_hash {config_hash(cfg)}\n{body}"


def save_config(cfg: MGPOConfig, path: str | Path) -> Path:
    """Writes `to_yaml(cfg)` atomically (temp file + rename) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(to_yaml(cfg), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def flatten_config(cfg: MGPOConfig) -> dict[str, str]:
    """`{"algorithm.kl_coef": "0.01", ...}`: every leaf as a string (JSON for non-strings), for MLflow params."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:  # an empty mapping field (evaluation.data_paths) is itself a leaf
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk(cfg.model_dump(mode="json"), "")
    return flat


def describe_config() -> str:
    """Markdown reference of every field: dotted name, type, default and its docstring."""
    lines = ["# MGPO configuration reference", ""]

    def section(cls: type[BaseModel], prefix: str) -> None:
        nested = []
        for name, field in cls.model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((ann, path))
                continue
            default = field.default_factory() if field.default_factory else field.default
            doc = " ".join((field.description or "").split())
            lines.append(f"- `{path}` ({_type_name(ann)}, default `{default!r}`): {doc}")
        for sub, path in nested:
            lines.extend(["", f"## `{path}`: {' '.join((sub.__doc__ or '').split())}", ""])
            section(sub, path)

    section(MGPOConfig, "")
    return "\n".join(lines) + "\n"
