"""Registry URIs as model inputs: ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` in ``model.path`` and
``mgpo eval --model`` resolve through a real MLflow store to the registered checkpoint, fetched once, and the
version used is what the lineage records."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from mgpo_core.config import load_config
from mgpo_core.modeling.loading import ModelPathError
from mgpo_core.modeling.source import base_model_lineage, model_dir_for
from mgpo_core.ops.registry import CHAMPION, checkpoint_digest, register_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registered(tiny_dir, tmp_path_factory):
    """A store with two versions of ``m`` (the tiny model and a variant of it), ``champion`` on version 1."""
    import shutil

    root = tmp_path_factory.mktemp("registry-source")
    store = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(store).create_experiment("e", artifact_location=(root / "artifacts").as_uri())
    variant = root / "variant"
    shutil.copytree(tiny_dir, variant)
    (variant / "mgpo_note.txt").write_text("another checkpoint")
    v1 = register_checkpoint(tiny_dir, tracking_uri=store, model_name="m", experiment="e", tags={})
    v2 = register_checkpoint(variant, tracking_uri=store, model_name="m", experiment="e", tags={})
    MlflowClient(store).set_registered_model_alias("m", CHAMPION, v1.version)
    return store, {v1.version: tiny_dir, v2.version: variant}


def _files(d) -> dict[str, bytes]:  # noqa: ANN001
    """A checkpoint's files, without the model card registration adds (README.md)."""
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*"))
            if f.is_file() and f.name != "README.md"}


def _cfg(store: str, path: str, state) -> object:  # noqa: ANN001
    return load_config("tiny-cpu", [f"model.path={path}", f"tracking.mlflow_tracking_uri={store}",
                                    f"state_dir={state}"])


def test_alias_and_version_uris_resolve_to_the_registered_checkpoint(registered, tmp_path):
    store, dirs = registered
    for version, original in dirs.items():
        cfg = _cfg(store, f"models:/m/{version}", tmp_path / "state")
        got = model_dir_for(cfg)
        assert _files(got) == _files(original)
        assert (got / "config.json").is_file() and got.is_relative_to(tmp_path / "state" / "models" / "registry")
    champion = _cfg(store, "models:/m@champion", tmp_path / "state")
    first = model_dir_for(champion)
    assert _files(first) == _files(dirs["1"])
    (first / "fetched-once.txt").write_text("a second resolution must reuse this copy, not download again")
    assert (model_dir_for(champion) / "fetched-once.txt").is_file()
    assert base_model_lineage(champion) == {
        "mgpo.base_model": "models:/m/1",
        "mgpo.base_model_uri": "models:/m@champion",
        "mgpo.base_model_digest": checkpoint_digest(dirs["1"]),
    }
    MlflowClient(store).set_registered_model_alias("m", CHAMPION, "2")  # the alias moves: so does the model
    assert _files(model_dir_for(champion)) == _files(dirs["2"])
    assert base_model_lineage(champion)["mgpo.base_model"] == "models:/m/2"
    MlflowClient(store).set_registered_model_alias("m", CHAMPION, "1")


def test_the_store_the_config_names_is_used_even_when_the_environment_names_another(registered, tmp_path,
                                                                                     monkeypatch):
    """MLflow's own download of a models:/ URI asks the process's default registry; resolution must not."""
    store, dirs = registered
    other = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(other).search_experiments()  # an empty store of its own
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", other)
    got = model_dir_for(_cfg(store, "models:/m/2", tmp_path / "state"))
    assert _files(got) == _files(dirs["2"])


def test_unknown_or_malformed_registry_uris_say_what_to_write(registered, tmp_path):
    store, _ = registered
    for uri, words in (("models:/m@nope", "not found in the tracking store"),
                       ("models:/m/99", "not found in the tracking store"),
                       ("models:/other@champion", "not found in the tracking store"),
                       ("models:/m", "models:/NAME@ALIAS"),
                       ("models:/m/latest", "models:/NAME/VERSION")):
        with pytest.raises(ModelPathError, match=words):
            model_dir_for(_cfg(store, uri, tmp_path / "state"))
    assert base_model_lineage(load_config("tiny-cpu", ["model.tiny_seed=3"])) == {
        "mgpo.base_model": "tiny-random-seed3"}


def test_mgpo_eval_accepts_a_registry_uri_and_records_the_version(registered, tmp_path, capsys):
    from mgpo_cli.main import main

    store, _ = registered
    code = main(["eval", "--model", "models:/m@champion", "--benchmark", "synthetic", "--mode", "mgpo",
                 "--limit", "2", "--engine", "hf", "--out", str(tmp_path / "out"), "--tracking-uri", store,
                 "--no-progress", "--set", f"state_dir={tmp_path / 'state'}", "--set", "evaluation.max_new_tokens=4",
                 "--set", "data.synthetic_eval=3", "--set", "data.synthetic_width=600",
                 "--set", "data.synthetic_height=400"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["mgpo.base_model"] == "models:/m/1"
    tags = MlflowClient(store).get_run(report["mlflow_run_id"]).data.tags
    assert tags["mgpo.eval.model_source"] == "models:/m/1"
    assert tags["mgpo.eval.model_source_uri"] == "models:/m@champion"
    assert main(["eval", "--model", "models:/m@gone", "--benchmark", "synthetic", "--tracking-uri", store,
                 "--no-mlflow", "--set", f"state_dir={tmp_path / 'state'}"]) == 2
    assert "not found in the tracking store" in capsys.readouterr().err


def test_preflight_checks_the_checkpoint_a_registry_uri_names(registered, tmp_path):
    from mgpo_core.ops.preflight import run_preflight

    store, _ = registered
    others = ["attention", "vllm", "devices", "hosts", "benchmarks", "training data", "overlap", "disk", "tracking",
              "memory"]
    (ok,) = run_preflight(_cfg(store, "models:/m@champion", tmp_path / "state"), skip=others)
    assert ok.name == "model" and ok.status == "ok", ok
    (bad,) = run_preflight(_cfg(store, "models:/m@gone", tmp_path / "state"), skip=others)
    assert bad.status == "fail" and "not found in the tracking store" in bad.detail


def test_a_moved_alias_changes_the_training_stage_key(registered, tmp_path):
    """``model.path: models:/m@champion`` is the version the alias names when the stage runs: the train stage's
    cache key holds it, so last night's cached training is not reused for another base model."""
    from types import SimpleNamespace

    from tasks.common import stage_cache_key
    from tasks.stages import train_task

    store, _ = registered
    key = stage_cache_key("train", ("evaluation",))
    ctx = SimpleNamespace(task=SimpleNamespace(fn=train_task.fn))
    params = {"preset": "tiny-cpu", "overrides": ["model.path=models:/m@champion", f"state_dir={tmp_path}",
                                                  f"tracking.mlflow_tracking_uri={store}"],
              "dataset": {"dataset_hash": "d"}, "parent_run_id": None}  # fmt: skip
    client = MlflowClient(store)
    client.set_registered_model_alias("m", CHAMPION, "1")
    on_v1 = key(ctx, dict(params))
    assert key(ctx, dict(params)) == on_v1
    client.set_registered_model_alias("m", CHAMPION, "2")
    try:
        assert key(ctx, dict(params)) != on_v1
    finally:
        client.set_registered_model_alias("m", CHAMPION, "1")
