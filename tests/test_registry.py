"""Registration of an HF checkpoint in a real MLflow store: lineage tags, idempotence, champion/challenger."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from answering_model import answering_model, check_letters, library_answers, row
from mlflow.tracking import MlflowClient

from mgpo_core.ops.registry import CHALLENGER, CHAMPION, promote_if_better, register_checkpoint, tag_scores

pytestmark = pytest.mark.slow


@pytest.fixture()
def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


def _copy_with_change(src, dst, byte: int):  # noqa: ANN001, ANN202
    shutil.copytree(src, dst)
    (dst / "mgpo_note.txt").write_text(f"variant {byte}")  # a different checkpoint digest
    return dst


def test_register_is_idempotent_and_tags_lineage(tiny_dir, store, tmp_path):
    tags = {"mgpo.git_sha": "abc123", "mgpo.config_hash": "c0ffee", "mgpo.dataset_hash": "d00d",
            "mgpo.train_run_id": "r1"}
    v1 = register_checkpoint(tiny_dir, tracking_uri=store, model_name="m", experiment="e", tags=tags)
    again = register_checkpoint(tiny_dir, tracking_uri=store, model_name="m", experiment="e", tags=tags)
    assert v1.created and not again.created and again.version == v1.version
    client = MlflowClient(store)
    mv = client.get_model_version("m", v1.version)
    for k, v in tags.items():
        assert mv.tags[k] == v
    assert str(client.get_model_version_by_alias("m", CHALLENGER).version) == v1.version
    assert len(client.search_model_versions("name='m'")) == 1
    # The registered checkpoint is the export plus a model card (README.md) naming what it was made from.
    from mgpo_core.modeling.source import resolve_registry_model

    hf = resolve_registry_model(f"models:/m/{v1.version}", tracking_uri=store, cache_root=tmp_path / "cache").hf_dir
    card = (hf / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "| Config hash | c0ffee |" in card and "d00d" in card
    weights = hf / "model.safetensors"
    assert not weights.is_symlink() and weights.read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert not (tiny_dir / "README.md").exists()  # the export itself is left as it was


def test_champion_moves_only_when_the_new_version_wins(tiny_dir, store, tmp_path):
    metric = "eval/synthetic/overall"
    a = register_checkpoint(tiny_dir, tracking_uri=store, model_name="m", experiment="e", tags={})
    d = promote_if_better(store, "m", a.version, metric)
    assert not d.promoted and "evaluate it first" in d.reason
    tag_scores(store, "m", a.version, {metric: 0.40})
    assert promote_if_better(store, "m", a.version, metric).promoted  # no champion yet
    b = register_checkpoint(_copy_with_change(tiny_dir, tmp_path / "b", 1), tracking_uri=store, model_name="m",
                            experiment="e", tags={})
    tag_scores(store, "m", b.version, {metric: 0.35})
    d = promote_if_better(store, "m", b.version, metric)
    client = MlflowClient(store)
    assert not d.promoted and str(client.get_model_version_by_alias("m", CHAMPION).version) == a.version
    assert str(client.get_model_version_by_alias("m", CHALLENGER).version) == b.version
    c = register_checkpoint(_copy_with_change(tiny_dir, tmp_path / "c", 2), tracking_uri=store, model_name="m",
                            experiment="e", tags={})
    tag_scores(store, "m", c.version, {metric: 0.41})
    assert not promote_if_better(store, "m", c.version, metric, min_improvement=0.05).promoted
    assert promote_if_better(store, "m", c.version, metric).promoted
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == c.version
    # Like with like: a version scored on another question set (another limit, other data) is not compared.
    client.set_model_version_tag("m", c.version, "mgpo.question_set:eval/synthetic", "q-four")
    d_ = register_checkpoint(_copy_with_change(tiny_dir, tmp_path / "d", 3), tracking_uri=store, model_name="m",
                             experiment="e", tags={})
    tag_scores(store, "m", d_.version, {metric: 0.90})
    client.set_model_version_tag("m", d_.version, "mgpo.question_set:eval/synthetic", "q-eight")
    d = promote_if_better(store, "m", d_.version, metric)
    assert not d.promoted and "another question set" in d.reason and "mgpo eval" in d.reason
    client.set_model_version_tag("m", c.version, "mgpo.question_set:eval/synthetic", "q-eight")  # re-scored alike
    assert promote_if_better(store, "m", d_.version, metric).promoted


def test_first_champion_must_beat_the_base_model(tiny_dir, store):
    """With no champion, the bar is the base model's score: a run that did not improve on it is not promoted."""
    metric = "eval/synthetic/overall"
    a = register_checkpoint(tiny_dir, tracking_uri=store, model_name="m", experiment="e", tags={})
    tag_scores(store, "m", a.version, {metric: 0.30})
    d = promote_if_better(store, "m", a.version, metric, baseline_score=0.30)
    assert not d.promoted and "does not beat the base model (0.3000)" in d.reason
    client = MlflowClient(store)
    assert CHAMPION not in client.get_registered_model("m").aliases
    d = promote_if_better(store, "m", a.version, metric, baseline_score=0.25, min_improvement=0.01)
    assert d.promoted and "beats the base model" in d.reason
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == a.version


def test_registered_model_loads_and_answers(store, tmp_path, monkeypatch):
    """A registered version is code, not a pickle (it loads where pickle loading is disallowed), ships the project's
    code, a signature, an input example and real requirements, and answers: letters, right well above chance, and
    the same letters as the library's own greedy two-turn inference on the same questions."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model

    from mgpo_core.ops.registry import register_checkpoint

    model_dir, samples = answering_model(tmp_path / "answering")
    v = register_checkpoint(model_dir, tracking_uri=store, model_name="m", experiment="e", tags={})
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(store)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/m/{v.version}", dst_path=str(tmp_path / "dl")))
    meta = Model.load(local)
    assert not list(local.rglob("*.pkl"))
    assert meta.flavors["python_function"]["model_code_path"].endswith("policy_model_code.py")
    assert (local / "code" / "mgpo_core" / "ops" / "policy_model.py").is_file()
    assert not (local / "code" / "mgpo_core" / "modeling" / "weights").exists()
    assert meta.signature is not None and "image" in meta.signature.inputs.input_names()
    assert (local / "serving_input_example.json").is_file()
    requirements = (local / "requirements.txt").read_text()
    assert "mgpo-pipeline" not in requirements and "torch==" in requirements
    model = mlflow.pyfunc.load_model(f"models:/m/{v.version}")
    answers = list(model.predict(pd.DataFrame([row(s, encode=False) for s in samples])))
    check_letters(answers, samples)
    assert answers == library_answers(model_dir, samples)


def test_versions_registered_before_the_ops_package_still_unpickle() -> None:
    """Their pyfunc pickle names ``mgpo_core.registry.HFCheckpointModel``: that path must still resolve."""
    import pickle

    from mgpo_core.ops.registry import HFCheckpointModel

    old = pickle.dumps(HFCheckpointModel(), protocol=0).replace(b"mgpo_core.ops.registry", b"mgpo_core.registry")
    assert b"cmgpo_core.registry\nHFCheckpointModel" in old
    assert type(pickle.loads(old)) is HFCheckpointModel


def _result(tmp_path, benchmark: str, answers: list[tuple[str, str]], overall: float):  # noqa: ANN001, ANN202
    """An evaluation result as the runner writes it: hand-labelled records (id, prediction, truth) and metrics."""
    import json

    from mgpo_core.evaluation.runner import EvalResult

    out = tmp_path / benchmark
    out.mkdir(parents=True, exist_ok=True)
    records = out / "samples.jsonl"
    records.write_text("".join(json.dumps({"id": f"q{i}", "question": "colour?", "choices": ["red", "blue"],
                                           "answer": truth, "prediction": pred}) + "\n"
                               for i, (pred, truth) in enumerate(answers)))
    summary = out / "summary.json"
    summary.write_text(json.dumps({"overall": overall}))
    return EvalResult(benchmark, "mgpo", "hf", len(answers), {"overall": overall, "grounding/valid_box_ratio": 0.5},
                      out, records, summary, None, 1.0)


def test_scores_are_logged_model_metrics_linked_to_their_questions(tiny_dir, store, tmp_path):
    """MLflow 3 throughout: the experiment opens as model training, runs carry the source tags and the questions
    as a dataset input, scores land on the version's LoggedModel linked to that dataset, the version's tags stay
    few, promotion reads the LoggedModel and writes the comparison into the description."""
    from mgpo_core.ops.eval_log import log_eval_results, model_version_eval_tags
    from mgpo_core.ops.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    a = register_checkpoint(tiny_dir, tracking_uri=store, model_name="m", experiment="e",
                            tags={"mgpo.base_model": "tiny-base-seed0", "mgpo.dataset_hash": "d00d"})
    client = MlflowClient(store)
    assert client.get_experiment_by_name("e").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    mv = client.get_model_version("m", a.version)
    assert "Trained from: tiny-base-seed0" in mv.description and "d00d" in mv.description
    reg_run = client.get_run(a.run_id).data.tags
    assert reg_run["mlflow.source.type"] == "JOB" and reg_run["mlflow.source.name"] == "mgpo register"
    res = _result(tmp_path, "synthetic", [("A", "A"), ("B", "A"), ("B", "B"), ("A", "A")], 0.75)
    run_id = log_eval_results([res], tracking_uri=store, experiment_name="e", model_name="m", model_version=a.version)
    from mgpo_core.ops.eval_log import logged_model_id

    lm = client.get_logged_model(logged_model_id(mv))
    scored = {m.key: m for m in lm.metrics}
    assert scored["eval/synthetic/overall"].value == 0.75
    assert scored["eval/synthetic/overall"].dataset_name == "synthetic"
    digest = scored["eval/synthetic/overall"].dataset_digest
    assert digest and scored["eval/synthetic/grounding/valid_box_ratio"].dataset_digest == digest
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("synthetic", digest)]
    tags = client.get_model_version("m", a.version).tags
    assert "eval/synthetic/grounding/valid_box_ratio" not in tags and tags["eval/synthetic/overall"] == "0.75"
    assert model_version_eval_tags("m", a.version, tracking_uri=store)["eval/synthetic/grounding/valid_box_ratio"] == 0.5
    d = promote_if_better(store, "m", a.version, "eval/synthetic/overall", baseline_score=0.5)
    assert d.promoted and d.new_score == 0.75
    assert "this version 0.7500, base model 0.5000" in client.get_model_version("m", a.version).description
    # Scored on other questions (another set of records): not compared with the champion.
    b = register_checkpoint(_copy_with_change(tiny_dir, tmp_path / "b", 1), tracking_uri=store, model_name="m",
                            experiment="e", tags={})
    other = _result(tmp_path / "other", "synthetic", [("A", "A"), ("B", "B")], 1.0)
    log_eval_results([other], tracking_uri=store, experiment_name="e", model_name="m", model_version=b.version)
    d = promote_if_better(store, "m", b.version, "eval/synthetic/overall")
    assert not d.promoted and "another question set" in d.reason
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == a.version


def test_the_model_card_carries_the_scores_vs_the_base_model_after_promotion(tiny_dir, store, tmp_path):
    """Registration writes the card before any score exists; promotion rewrites it in the version's files with
    every benchmark's strict-rule accuracy beside the base model's and the decision, and the description too."""
    from mgpo_core.modeling.source import resolve_registry_model
    from mgpo_core.ops.eval_log import log_eval_results

    a = register_checkpoint(tiny_dir, tracking_uri=store, model_name="m", experiment="e",
                            tags={"mgpo.base_model": "tiny-base-seed0"})
    before = resolve_registry_model(f"models:/m/{a.version}", tracking_uri=store, cache_root=tmp_path / "c0").hf_dir
    assert "Scores are attached after registration" in (before / "README.md").read_text()
    res = [_result(tmp_path / "s", "synthetic", [("A", "A"), ("B", "A"), ("B", "B"), ("A", "A")], 0.75),
           _result(tmp_path / "v", "vstar", [("A", "A"), ("B", "A")], 0.5)]
    log_eval_results(res, tracking_uri=store, experiment_name="e", model_name="m", model_version=a.version)
    base = {"eval/synthetic/overall": 0.25, "eval/vstar/overall": 0.5, "eval/synthetic/grounding/valid_box_ratio": 0.0}
    d = promote_if_better(store, "m", a.version, "eval/synthetic/overall", baseline_score=0.25, baseline_scores=base)
    assert d.promoted
    hf = resolve_registry_model(f"models:/m/{a.version}", tracking_uri=store, cache_root=tmp_path / "c1").hf_dir
    card = (hf / "README.md").read_text()
    assert "| Benchmark | This version | Base model |" in card, card
    assert "| synthetic | 0.7500 | 0.2500 |" in card and "| vstar | 0.5000 | 0.5000 |" in card, card
    assert "Promotion on `eval/synthetic/overall`: promoted to champion (no champion yet; beats the base model" in card
    assert "Scores are attached after registration" not in card and "| Trained from | tiny-base-seed0 |" in card
    assert (hf / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    desc = MlflowClient(store).get_model_version("m", a.version).description
    assert "- synthetic: 0.7500 (base model 0.2500)" in desc and "- vstar: 0.5000 (base model 0.5000)" in desc, desc
    # A later promotion (here: a rerun) rewrites the section rather than appending another.
    promote_if_better(store, "m", a.version, "eval/synthetic/overall", baseline_score=0.25, baseline_scores=base)
    desc = MlflowClient(store).get_model_version("m", a.version).description
    assert desc.count("- synthetic: 0.7500") == 1 and desc.count("Scores (") == 1, desc
