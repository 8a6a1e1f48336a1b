"""Model registry on MLflow: register an HF checkpoint as a model version, tag its lineage, champion/challenger.

A checkpoint directory is logged as an MLflow pyfunc model whose artifact IS the Hugging Face directory (MLflow 3
refuses to register a plain artifact directory). Every new version gets the alias ``challenger``; ``champion``
moves only when the version beats the current champion on the configured metric. Registration is idempotent:
registering the same checkpoint (same content digest) again returns the existing version.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
DIGEST_TAG = "mgpo.checkpoint_digest"


class HFCheckpointModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper of an MGPO policy checkpoint: answers multiple-choice questions about images, two turns.

    Input: a DataFrame (or list of dicts) with ``image_path``, ``question``, ``choices`` (list of strings).
    Output: the predicted letters (greedy MGPO two-turn inference with the HF engine).
    """

    def load_context(self, context) -> None:  # noqa: ANN001
        self.model_dir = context.artifacts["hf_checkpoint"]
        self._engine = None

    def _engine_for(self):  # noqa: ANN202
        if self._engine is None:
            from mgpo_core.config import load_config
            from mgpo_core.modeling.loading import load_bundle
            from mgpo_core.rollout.hf import HFRolloutEngine

            own = Path(self.model_dir) / "mgpo_config.yaml"  # the training run's prompts, written at export
            cfg = load_config(own if own.exists() else "tiny-cpu")
            b = load_bundle(self.model_dir)
            self._engine = HFRolloutEngine.for_bundle(b, cfg)
        return self._engine

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from mgpo_core.data.schema import LETTERS, Sample
        from mgpo_core.reward import last_boxed, normalize_choice

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        samples = [
            Sample(id=str(i), image_path=r["image_path"], question=r["question"], choices=tuple(r["choices"]),
                   answer=LETTERS[0])
            for i, r in enumerate(rows)
        ]
        episodes = self._engine_for().generate_episodes(samples, n=1, greedy=True)
        return [normalize_choice(last_boxed(ep.turn2_text) or "") for ep in episodes]


def checkpoint_digest(hf_dir: str | Path) -> str:
    """Content digest of a checkpoint directory (file names + bytes), for idempotent registration."""
    h = hashlib.sha256()
    for f in sorted(Path(hf_dir).rglob("*")):
        if f.is_file():
            h.update(f.relative_to(hf_dir).as_posix().encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    created: bool  # False when an identical checkpoint was already registered


def find_version_by_digest(client: MlflowClient, name: str, digest: str) -> Any | None:
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get(DIGEST_TAG) == digest:
            return v
    return None


def register_checkpoint(
    hf_dir: str | Path,
    *,
    tracking_uri: str,
    model_name: str,
    experiment: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    artifact_location: str | None = None,
) -> RegisteredVersion:
    """Register ``hf_dir`` as a new version of ``model_name`` (or return the version that already holds it)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face checkpoint directory (no config.json)")
    client = MlflowClient(tracking_uri)
    digest = checkpoint_digest(hf_dir)
    existing = find_version_by_digest(client, model_name, digest)
    if existing is not None:
        log.info("checkpoint already registered as %s v%s", model_name, existing.version)
        client.set_registered_model_alias(model_name, CHALLENGER, existing.version)
        return RegisteredVersion(model_name, str(existing.version), existing.run_id, False)

    mlflow.set_tracking_uri(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_location)
    run_tags = {"mgpo.stage": "register", **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{digest[:8]}", tags=run_tags) as run:
        mlflow.set_tags(tags)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=HFCheckpointModel(),
            artifacts={"hf_checkpoint": str(hf_dir)},
            registered_model_name=model_name,
            pip_requirements=["mgpo-pipeline"],
        )
    version = str(info.registered_model_version)
    for k, v in {**tags, DIGEST_TAG: digest}.items():
        client.set_model_version_tag(model_name, version, k, str(v))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return RegisteredVersion(model_name, version, run.info.run_id, True)


def tag_scores(tracking_uri: str, model_name: str, version: str, scores: dict[str, float]) -> None:
    """Attach evaluation scores (``eval/<benchmark>/<metric>``) to a model version as tags."""
    client = MlflowClient(tracking_uri)
    for k, v in scores.items():
        client.set_model_version_tag(model_name, version, k, f"{float(v):.6f}")


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    version: str
    champion_before: str | None
    metric: str
    new_score: float | None
    champion_score: float | None
    reason: str


def promote_if_better(
    tracking_uri: str,
    model_name: str,
    version: str,
    metric: str,
    *,
    min_improvement: float = 0.0,
    baseline_score: float | None = None,
) -> PromotionDecision:
    """Move ``champion`` to ``version`` iff its ``metric`` tag beats the current champion's by more than
    ``min_improvement``. With no champion yet, the bar is ``baseline_score`` (the model training started from)
    when given, else none; a version without the score is never promoted."""
    client = MlflowClient(tracking_uri)
    new = client.get_model_version(model_name, version)
    new_score = _score(new.tags, metric)
    try:
        champ = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        champ = None
    champ_version = str(champ.version) if champ is not None else None
    champ_score = _score(champ.tags, metric) if champ is not None else None
    if new_score is None:
        return PromotionDecision(False, version, champ_version, metric, None, champ_score,
                                 f"version {version} has no '{metric}' score: evaluate it first")
    if champ_version == str(version):
        return PromotionDecision(True, version, champ_version, metric, new_score, champ_score, "already champion")
    if champ is not None and champ_score is not None:
        why_not = _not_comparable(new.tags, champ.tags, metric)
        if why_not:
            return PromotionDecision(False, version, champ_version, metric, new_score, champ_score,
                                     f"not compared with champion v{champ_version}: {why_not}; re-evaluate it "
                                     f"with the same settings (`mgpo eval --model-name {model_name} "
                                     f"--model-version {champ_version} ...`) or move the alias by hand")
    if champ is None and baseline_score is not None:
        if new_score > baseline_score + min_improvement:
            client.set_registered_model_alias(model_name, CHAMPION, version)
            return PromotionDecision(True, version, None, metric, new_score, None,
                                     f"no champion yet; beats the base model: {new_score:.4f} > "
                                     f"{baseline_score:.4f} + {min_improvement}")
        return PromotionDecision(False, version, None, metric, new_score, None,
                                 f"no champion yet, and {new_score:.4f} does not beat the base model "
                                 f"({baseline_score:.4f}) by more than {min_improvement}")
    if champ is None or champ_score is None or new_score > champ_score + min_improvement:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        why = "no champion yet" if champ is None else f"{new_score:.4f} > {champ_score or 0:.4f} + {min_improvement}"
        return PromotionDecision(True, version, champ_version, metric, new_score, champ_score, why)
    return PromotionDecision(False, version, champ_version, metric, new_score, champ_score,
                             f"{new_score:.4f} does not beat champion v{champ_version} ({champ_score:.4f}) "
                             f"by more than {min_improvement}")


def _not_comparable(new: dict[str, str], champ: dict[str, str], metric: str) -> str | None:
    """Why two versions' ``metric`` scores are not like with like (other questions), or None."""
    prefix = metric.rsplit("/", 1)[0]
    for tag, what in ((f"mgpo.question_set:{prefix}", "question set"), (f"mgpo.questions:{prefix}", "number of questions")):
        a, b = new.get(tag), champ.get(tag)
        if a is not None and b is not None and a != b:
            return f"its {metric} was scored on another {what} ({b} vs {a} now)"
    return None


def _score(tags: dict[str, str], metric: str) -> float | None:
    try:
        return float(tags[metric])
    except (KeyError, ValueError):
        return None
