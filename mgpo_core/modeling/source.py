"""The local checkpoint directory a config's ``model`` section names, building the offline tiny models on first use
and fetching registered model versions (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) from MLflow.

Above both builders (``tiny``, ``base``) and the loader, so that loading never reaches up into the base model's
pre-training code. A registry URI is resolved through the config's tracking store to one version, whose model is
downloaded once into ``<state_dir>/models/registry/`` (keyed by name, version and checkpoint digest, so a store
that reuses a version number never serves stale weights); the Hugging Face directory inside it is the answer.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgpo_core.modeling.loading import ModelPathError, resolve_model_path

REGISTRY_PREFIX = "models:/"
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_DIGEST_TAG = "mgpo.checkpoint_digest"  # set on every version by mgpo_core.ops.registry


def is_registry_uri(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(REGISTRY_PREFIX)


@dataclass(frozen=True)
class RegistryModel:
    """A registered model version resolved to its local Hugging Face directory."""

    uri: str  # as given (an alias moves; the version below is what was used)
    name: str
    version: str
    hf_dir: Path
    digest: str | None

    @property
    def version_uri(self) -> str:
        return f"{REGISTRY_PREFIX}{self.name}/{self.version}"

    def lineage_tags(self, prefix: str = "mgpo.base_model") -> dict[str, str]:
        """What a run or version built on this model records: the exact version, the URI as given, the digest."""
        tags = {prefix: self.version_uri, f"{prefix}_uri": self.uri}
        if self.digest:
            tags[f"{prefix}_digest"] = self.digest
        return tags


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; anything else is refused."""
    m = _ALIAS.match(uri) or _VERSION.match(uri)
    if m is None:
        raise ModelPathError(
            f"model {uri!r} is not a registry URI this project reads: use models:/NAME@ALIAS (e.g. "
            "models:/mgpo-policy@champion) or models:/NAME/VERSION (e.g. models:/mgpo-policy/3)"
        )
    d = m.groupdict()
    return d["name"], d.get("alias"), d.get("version")


def resolve_registry_model(uri: str, *, tracking_uri: str, cache_root: str | Path) -> RegistryModel:
    """Resolve ``uri`` in the store at ``tracking_uri`` and return its checkpoint, downloaded under ``cache_root``.

    Raises:
        ModelPathError: a malformed URI, an unknown model/alias/version, or a version that holds no checkpoint.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = parse_registry_uri(uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelPathError(
            f"model {uri!r}: not found in the tracking store {tracking_uri} ({exc.message}); check the name and the "
            "alias or version on the MLflow UI's Models page, or set tracking.mlflow_tracking_uri to the store "
            "that holds it"
        ) from None
    digest = mv.tags.get(_DIGEST_TAG)
    key = re.sub(r"[^A-Za-z0-9._-]", "_", f"{name}-v{mv.version}-{(digest or mv.run_id or 'x')[:16]}")
    dest = Path(cache_root) / "registry" / key
    if not (dest / ".complete").is_file():
        # The version's own artifact location, resolved here: MLflow's download of a models:/ URI asks the
        # process's default registry (MLFLOW_TRACKING_URI), whatever registry it is handed.
        location = client.get_model_version_download_uri(name, mv.version)
        _download(location, dest, tracking_uri, label=f"{REGISTRY_PREFIX}{name}/{mv.version}")
    return RegistryModel(uri, name, str(mv.version), _hf_dir_in(dest, uri), digest)


def _download(uri: str, dest: Path, tracking_uri: str, *, label: str | None = None) -> None:
    """Download the model to ``dest`` atomically (a crash leaves no half folder that looks complete)."""
    import mlflow.artifacts

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        # a folder's URI lands in a subfolder of tmp named after it: the returned path is the model's root
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                       tracking_uri=tracking_uri, registry_uri=tracking_uri))
        (got / ".complete").write_text((label or uri) + "\n")
        if dest.exists():  # an incomplete earlier attempt
            shutil.rmtree(dest)
        try:
            os.replace(got, dest)
        except OSError:  # another process finished first: its copy is as good
            if not (dest / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hf_dir_in(model_dir: Path, uri: str) -> Path:
    """The checkpoint inside a downloaded pyfunc model: its ``hf_checkpoint`` artifact (MLmodel names the path)."""
    import yaml

    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text())
        rel = meta["flavors"]["python_function"]["artifacts"]["hf_checkpoint"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        rel = None
    hf = model_dir / rel if rel else None
    if hf is None or not (hf / "config.json").is_file():
        raise ModelPathError(
            f"model {uri!r} holds no Hugging Face checkpoint (no 'hf_checkpoint' artifact with a config.json in "
            f"{model_dir}); name a version registered by this pipeline (mgpo run / the register stage)"
        )
    return hf


def registry_model_for(cfg: Any) -> RegistryModel | None:
    """The registered version ``model.path`` names (resolved and fetched), or None for a directory / tiny model."""
    if not is_registry_uri(cfg.model.path):
        return None
    from mgpo_core.ops.tracking import tracking_uri_for

    return resolve_registry_model(cfg.model.path, tracking_uri=tracking_uri_for(cfg),
                                  cache_root=Path(cfg.state_dir) / "models")


def base_model_lineage(cfg: Any) -> dict[str, str]:
    """Lineage tags naming the model a config starts from: a registered version as ``models:/NAME/VERSION`` (plus
    the URI as given and the checkpoint digest), else the directory or the offline tiny model."""
    registered = registry_model_for(cfg)
    if registered is not None:
        return registered.lineage_tags()
    m = cfg.model
    return {"mgpo.base_model": str(m.path) if m.path else f"tiny-{m.tiny}-seed{m.tiny_seed}"}


def model_dir_for(cfg: Any) -> Path:
    """The local checkpoint directory a config's ``model`` section names (building or fetching one if needed).

    ``model.path`` a directory -> that directory; ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> that
    registered version's checkpoint, fetched from the config's MLflow store; unset -> the offline tiny model
    ``model.tiny`` (``random`` or the pre-trained ``base``) for ``model.tiny_seed``, cached under
    ``<state_dir>/models``.
    """
    m = cfg.model
    cache = Path(cfg.state_dir) / "models"
    registered = registry_model_for(cfg)
    if registered is not None:
        return registered.hf_dir
    if m.path is None and m.tiny == "base":
        from mgpo_core.modeling.base import base_model_for  # pre-training imports stay lazy

        return base_model_for(cache, seed=m.tiny_seed)
    return resolve_model_path(m.path, cache_root=cache, tiny_seed=m.tiny_seed)
