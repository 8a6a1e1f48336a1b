"""Model registry on MLflow: register an HF checkpoint as a model version, tag its lineage, champion/challenger.

A checkpoint directory is logged as the servable policy model (:mod:`mgpo_core.ops.policy_model`: MLflow "models
from code" with a signature, an input example, the ``mgpo_core`` code and pinned requirements) whose
``hf_checkpoint`` artifact IS the Hugging Face directory, so ``mlflow models serve -m models:/NAME@champion``
answers requests and ``models:/NAME@ALIAS`` can start a training or an evaluation
(:mod:`mgpo_core.modeling.source`). Every new version gets the alias ``challenger``; ``champion`` moves only when
the version beats the current champion on the configured metric. Registration is idempotent: registering the
same checkpoint (same content digest) again returns the existing version.
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

from mgpo_core.ops.eval_log import logged_model_id, version_scores
from mgpo_core.ops.policy_model import MGPOPolicyModel
from mgpo_core.ops.tracking import ensure_experiment, source_tags

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
DIGEST_TAG = "mgpo.checkpoint_digest"


class HFCheckpointModel(MGPOPolicyModel):
    """The class pickled into model versions registered before models from code (``python_model.pkl`` names it
    here or at ``mgpo_core.registry``): they still load (where pickle loading is allowed) and answer like new
    versions, including the rule that an ``image_path`` is read only under the configured image root."""


#: What the model's code needs at inference (the training-only packages, DeepSpeed and vLLM, stay out).
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pydantic",
                        "pyyaml", "numpy", "tqdm", "pyarrow")


def serving_requirements() -> list[str]:
    """Pins of :data:`SERVING_REQUIREMENTS` at the installed versions, local labels (``+cpu``) dropped so that
    any platform's build of the same release satisfies them (the model names no package of this project: its
    code is shipped with it)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in SERVING_REQUIREMENTS:
        try:
            pins.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(dist)
    return pins


def _stage_code(into: Path) -> Path:
    """A copy of the ``mgpo_core`` package to ship with the model: sources and presets, without caches or the
    shipped tiny weights (a registered model carries its own checkpoint)."""
    import shutil

    import mgpo_core

    src = Path(mgpo_core.__file__).parent
    dst = into / "mgpo_core"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "weights"))
    return dst


_PENDING_SCORES = [
    "Scores are attached after registration: the MLflow model version's LoggedModel metrics (each linked to "
    "the benchmark questions it was scored on), and its description, which lists them beside the base model's "
    "and the champion's when the version is considered for promotion.", ""]


def model_card(model_name: str, tags: dict[str, str], digest: str, scores: list[str] | None = None) -> str:
    """A Hugging Face model card (``README.md``) for a registered checkpoint: what it is, what it was made from
    (base model, data, config, code, run, step) and how to serve it. ``scores``: the lines of its Scores section
    (:func:`score_lines`, written after evaluation and promotion); at registration a note that they follow."""
    base = tags.get("mgpo.base_model", "")
    hub_like = base and not base.startswith(("/", ".", "models:/", "tiny-"))
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags: [mgpo, visual-grounding, reinforcement-learning, qwen2.5-vl]"]
    front += [f"base_model: {base}"] if hub_like else []
    rows = [f"| {label} | {tags[key]} |" for key, label in _DESCRIBED if tags.get(key)]
    return "\n".join([
        *front, "---", "", f"# {model_name}: an MGPO policy", "",
        "Qwen2.5-VL post-trained with Multi-turn Grounding-based Policy Optimization (arXiv 2507.05920): in a fixed "
        "two-turn conversation it first gives the box of the region that matters, then answers seeing the overview "
        "and the enlarged crop of the original image. Reward: the final letter is right.", "",
        "## Lineage", "", "| | |", "|---|---|", *rows, f"| Checkpoint digest | {digest} |", "",
        "## Scores", "", *(scores or _PENDING_SCORES),
        "## Use", "",
        "An ordinary Hugging Face directory (`AutoModelForImageTextToText`, vLLM). Served by MLflow: "
        f"`mlflow models serve -m models:/{model_name}@champion --env-manager local`; a request row carries "
        "`image` (the file's bytes, base64), `question` and `choices`, and the answer is the letter.", "",
    ])


def _with_card(hf_dir: Path, card: str, into: Path) -> Path:
    """``hf_dir`` as MLflow should copy it, with ``README.md`` (the card) added: a folder of hard links to its files
    (``into`` is beside ``hf_dir``, on the same file system; MLflow refuses symbolic links), so no checkpoint is
    copied twice and the export itself is not touched (its digest identifies the version)."""
    import os
    import shutil

    view = into / hf_dir.name
    for f in sorted(hf_dir.rglob("*")):
        if f.is_file() and f.relative_to(hf_dir).as_posix() != "README.md":
            dst = view / f.relative_to(hf_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dst)
            except OSError:  # a file system without hard links: copy
                shutil.copy2(f, dst)
    view.mkdir(parents=True, exist_ok=True)
    (view / "README.md").write_text(card)
    return view


def log_policy_model(
    hf_dir: str | Path, *, registered_model_name: str | None = None, name: str = "model", card: str | None = None
) -> Any:
    """Log ``hf_dir`` into the active run as the servable policy (models from code, signature, input example,
    ``mgpo_core`` as ``code_paths``; ``card`` becomes the registered checkpoint's ``README.md``); returns MLflow's
    ``ModelInfo``.

    MLflow checks the input example by loading the model and answering it once before it returns, so a version
    that cannot answer is seen at registration (a warning from MLflow), not by its first client.
    """
    import tempfile

    from mgpo_core.ops import policy_model

    code_file = Path(policy_model.__file__).with_name("policy_model_code.py")
    hf_dir = Path(hf_dir)
    try:  # beside the checkpoint, for hard links; elsewhere (files copied) when its folder is read-only
        beside_dir = tempfile.TemporaryDirectory(prefix=".mgpo-card-", dir=hf_dir.parent)
    except OSError:
        beside_dir = tempfile.TemporaryDirectory(prefix="mgpo-card-")
    with tempfile.TemporaryDirectory(prefix="mgpo-model-code-") as tmp, beside_dir as beside:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            code_paths=[str(_stage_code(Path(tmp)))],
            artifacts={"hf_checkpoint": str(_with_card(Path(hf_dir), card, Path(beside)) if card else hf_dir)},
            signature=policy_model.SIGNATURE,
            model_config={"image_root": ""},  # set at load (model_config=) or by MGPO_SERVING_IMAGE_ROOT when serving
            input_example=policy_model.input_example(),
            registered_model_name=registered_model_name,
            pip_requirements=serving_requirements(),
        )


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
    exp_id = ensure_experiment(client, experiment, artifact_location)
    run_tags = {"mgpo.stage": "register", **source_tags("mgpo register"),
                **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{digest[:8]}", tags=run_tags) as run:
        mlflow.set_tags(tags)
        info = log_policy_model(hf_dir, registered_model_name=model_name, card=model_card(model_name, tags, digest))
    version = str(info.registered_model_version)
    for k, v in {**tags, DIGEST_TAG: digest}.items():
        client.set_model_version_tag(model_name, version, k, str(v))
    client.update_model_version(model_name, version, description=version_description(tags, digest))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return RegisteredVersion(model_name, version, run.info.run_id, True)


_DESCRIBED = (("mgpo.base_model", "Trained from"), ("mgpo.dataset_hash", "Training data (dataset hash)"),
              ("mgpo.config_hash", "Config hash"), ("mgpo.git_sha", "Code (git commit)"),
              ("mgpo.train_run_id", "Training run"), ("mgpo.checkpoint_step", "Checkpoint of RL step"))


def version_description(tags: dict[str, str], digest: str) -> str:
    """The version's description (the Models page shows it first): what it is and what it was made from."""
    lines = ["MGPO policy (Qwen2.5-VL, two-turn grounding then answer). Serve it with `mlflow models serve -m "
             "models:/NAME@champion`; requests carry `image` (base64), `question` and `choices`.", ""]
    lines += [f"- {label}: {tags[key]}" for key, label in _DESCRIBED if tags.get(key)]
    lines.append(f"- Checkpoint digest: {digest}")
    return "\n".join(lines)


def _describe_scores(client: MlflowClient, name: str, version: str, decision: PromotionDecision,
                     baseline_score: float | None, baseline_scores: dict[str, float] | None = None) -> None:
    """Append the promotion's scores (against the base model or the champion) to the version's description, then
    every benchmark's strict-rule accuracy beside the base model's."""
    try:
        mv = client.get_model_version(name, version)
        head = (mv.description or "").split("\n\nScores", 1)[0]
        lines = [f"Scores ({decision.metric}): this version {decision.new_score:.4f}"]
        if baseline_score is not None:
            lines.append(f"base model {baseline_score:.4f}")
        if decision.champion_score is not None and decision.champion_before != str(version):
            lines.append(f"champion v{decision.champion_before} {decision.champion_score:.4f}")
        text = ", ".join(lines) + f". Promotion: {'promoted' if decision.promoted else 'not promoted'} "
        text += f"({decision.reason})."
        scores = {k: v for k, (v, _) in version_scores(client, mv).items()}
        base = baseline_scores or {}
        for key in sorted(k for k in scores if k.endswith("/overall") and k.count("/") == 2):
            was = f" (base model {base[key]:.4f})" if key in base else ""
            text += f"\n- {key.split('/')[1]}: {scores[key]:.4f}{was}"
        client.update_model_version(name, version, description=f"{head}\n\n{text}")
    except MlflowException as exc:  # a description is never worth a failed promotion
        log.warning("could not update the description of %s v%s: %s", name, version, exc)


def score_lines(scores: dict[str, float], base: dict[str, float] | None, decision: PromotionDecision) -> list[str]:
    """The card's Scores section: per benchmark, the accuracy by the strict answer rule (``eval/<benchmark>/overall``:
    the letter in the last ``\\boxed{}`` of the final turn, the reward's rule) of this version and of the base
    model (same greedy two-turn evaluation), then the promotion decision."""
    base = base or {}
    benches = sorted(k.split("/")[1] for k in scores if k.startswith("eval/") and k.endswith("/overall")
                     and k.count("/") == 2)  # fmt: skip

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    rows = [f"| {b} | {cell(scores.get(f'eval/{b}/overall'))} | {cell(base.get(f'eval/{b}/overall'))} |"
            for b in benches]  # fmt: skip
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    return [
        "Accuracy on each benchmark by the strict answer rule (the letter in the last `\\boxed{}` of the final "
        "turn, the reward's rule), greedy two-turn evaluation; the base model is the model training started from, "
        "scored the same way.", "",
        "| Benchmark | This version | Base model |", "|---|---|---|", *rows, "",
        f"Promotion on `{decision.metric}`: {verdict} ({decision.reason}).", "",
    ]


def publish_scores(tracking_uri: str, model_name: str, version: str, decision: PromotionDecision,
                   base_scores: dict[str, float] | None) -> str | None:
    """Rewrite the version's model card (``README.md`` of its checkpoint, in its LoggedModel's files) with its
    scores next to the base model's and the promotion decision; returns the card, or None when the version has no
    LoggedModel (registered before MLflow 3) or the card could not be written (a warning says why)."""
    import tempfile

    import mlflow.artifacts
    import yaml

    client = MlflowClient(tracking_uri)
    mv = client.get_model_version(model_name, version)
    model_id = logged_model_id(mv)
    if not model_id:
        log.warning("%s v%s has no LoggedModel: its model card keeps no scores", model_name, version)
        return None
    scores = {k: v for k, (v, _) in version_scores(client, mv).items()}
    card = model_card(model_name, dict(mv.tags), mv.tags.get(DIGEST_TAG, ""), score_lines(scores, base_scores, decision))
    try:
        location = client.get_logged_model(model_id).artifact_location
        with tempfile.TemporaryDirectory(prefix="mgpo-card-") as tmp:
            meta = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/MLmodel", dst_path=tmp,
                                                       tracking_uri=tracking_uri)
            rel = yaml.safe_load(Path(meta).read_text())["flavors"]["python_function"]["artifacts"]["hf_checkpoint"]
            (Path(tmp) / "README.md").write_text(card)
            client.log_model_artifact(model_id, str(Path(tmp) / "README.md"), rel["path"])
    except (MlflowException, OSError, KeyError, TypeError) as exc:  # a card is never worth a failed promotion
        log.warning("could not write the model card of %s v%s: %s", model_name, version, exc)
        return None
    return card


def tag_scores(tracking_uri: str, model_name: str, version: str, scores: dict[str, float]) -> None:
    """Attach evaluation scores (``eval/<benchmark>/<metric>``) to a model version: as metrics of its LoggedModel
    (logged through its registration run), or as tags on a version that has none (registered before MLflow 3)."""
    import time

    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    mv = client.get_model_version(model_name, version)
    model_id = logged_model_id(mv)
    if model_id and mv.run_id:
        now = int(time.time() * 1000)
        client.log_batch(mv.run_id, metrics=[Metric(k, float(v), now, 0, model_id=model_id) for k, v in scores.items()])
        return
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
    baseline_scores: dict[str, float] | None = None,
) -> PromotionDecision:
    """Move ``champion`` to ``version`` iff its ``metric`` score (its LoggedModel's metric, or a tag on versions
    older than that) beats the current champion's by more than ``min_improvement``. With no champion yet, the bar is ``baseline_score`` (the model training started from)
    when given, else none; a version without the score is never promoted. The scores compared are appended to
    the version's description, and to its model card with every benchmark's score beside ``baseline_scores``
    (the base model's ``eval/...`` metrics)."""
    client = MlflowClient(tracking_uri)
    decision = _decide(client, model_name, version, metric, min_improvement, baseline_score)
    if decision.new_score is not None:
        _describe_scores(client, model_name, version, decision, baseline_score, baseline_scores)
        publish_scores(tracking_uri, model_name, version, decision, baseline_scores)
    return decision


def _decide(client: MlflowClient, model_name: str, version: str, metric: str, min_improvement: float,
            baseline_score: float | None) -> PromotionDecision:
    new = client.get_model_version(model_name, version)
    new_score, new_set = version_scores(client, new).get(metric, (None, None))
    try:
        champ = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        champ = None
    champ_version = str(champ.version) if champ is not None else None
    champ_score, champ_set = version_scores(client, champ).get(metric, (None, None)) if champ else (None, None)
    if new_score is None:
        return PromotionDecision(False, version, champ_version, metric, None, champ_score,
                                 f"version {version} has no '{metric}' score: evaluate it first")
    if champ_version == str(version):
        return PromotionDecision(True, version, champ_version, metric, new_score, champ_score, "already champion")
    if champ is not None and champ_score is not None:
        why_not = _not_comparable(new_set, champ_set, metric)
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


def _not_comparable(new_set: str | None, champ_set: str | None, metric: str) -> str | None:
    """Why two versions' ``metric`` scores are not like with like (scored on other questions), or None."""
    if new_set is not None and champ_set is not None and new_set != champ_set:
        return f"its {metric} was scored on another question set ({champ_set} vs {new_set} now)"
    return None
