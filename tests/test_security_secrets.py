"""Secrets stay secret (issue 26, item 5): values expanded from secret-looking variables and URI user-info are
masked in what a run records (MLflow parameters, config.yaml, the training log); the launch config that keeps
them is 0600."""

from __future__ import annotations

from mgpo_core.config import flatten_config, load_config, to_yaml
from mgpo_core.config.secrets import MASK, looks_secret, redact, redacted_params


def test_uri_user_info_is_masked_and_the_rest_kept():
    assert redact("postgresql://mlflow:s3cr3t@db:5432/mlflow") == f"postgresql://{MASK}@db:5432/mlflow"
    assert (
        redact("see http://u:tok@host:5000/x and https://plain/y")
        == f"see http://{MASK}@host:5000/x and https://plain/y"
    )
    assert redact("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"


def test_values_from_secret_named_variables_are_masked_in_params_and_config_yaml(monkeypatch, tmp_path):
    assert looks_secret("MLFLOW_DB_PASSWORD") and looks_secret("hf_token") and not looks_secret("HOME")
    monkeypatch.setenv("MGPO_TEST_DB_PASSWORD", "pw-7f3a9c")
    monkeypatch.setenv("MGPO_TEST_PLAIN", "visible-value")
    cfg = load_config("tiny-cpu", [
        "tracking.mlflow_tracking_uri=postgresql://mlflow:${MGPO_TEST_DB_PASSWORD}@db/mlflow",
        "rollout.choices_header=${MGPO_TEST_PLAIN}",
    ])  # fmt: skip
    assert "pw-7f3a9c" in cfg.tracking.mlflow_tracking_uri, (
        "the config itself keeps the value to connect with"
    )
    params = redacted_params(flatten_config(cfg))
    text = redact(to_yaml(cfg))
    for recorded in (" ".join(params.values()), text):
        assert "pw-7f3a9c" not in recorded and "mlflow:pw" not in recorded
        assert "visible-value" in recorded, "only secrets are masked"
    assert params["tracking.mlflow_tracking_uri"] == f"postgresql://{MASK}@db/mlflow"
    assert redact("rank 0: connecting with pw-7f3a9c") == f"rank 0: connecting with {MASK}"


def test_http_credentials_leave_the_uri_for_mlflows_variables(monkeypatch):
    from mgpo_core.config.secrets import credentials_to_env
    from mgpo_core.ops.tracking import resolve_tracking_uri

    env: dict[str, str] = {}
    clean = credentials_to_env("https://trainer:p%40ss-9d1e@mlflow.internal:5000/base?x=1", env)
    assert clean == "https://mlflow.internal:5000/base?x=1"
    assert env == {"MLFLOW_TRACKING_USERNAME": "trainer", "MLFLOW_TRACKING_PASSWORD": "p@ss-9d1e"}
    assert redact("printed p@ss-9d1e and p%40ss-9d1e") == f"printed {MASK} and {MASK}"
    # Database URIs cannot take credentials from the environment: kept for connecting, masked when written.
    assert (
        credentials_to_env("postgresql://mlflow:pw-1@db/mlflow", env) == "postgresql://mlflow:pw-1@db/mlflow"
    )
    # Every caller resolves the config's URI through here (MLflow clients, manifests, links, cache keys).
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert resolve_tracking_uri("http://u:tok-83be@127.0.0.1:5000", "/unused") == "http://127.0.0.1:5000"
    import os

    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "tok-83be"


def test_every_log_record_is_masked_once_a_secret_is_known(caplog):
    import logging

    from mgpo_core.config.secrets import remember_secret

    remember_secret("hunter2-51fa")
    with caplog.at_level(logging.INFO):
        logging.getLogger("some.library").info(
            "connecting to %s with %s", "http://a:b@host/x", "hunter2-51fa"
        )
        logging.getLogger("mgpo").warning("plain %d", 3)
    assert caplog.messages == [f"connecting to http://{MASK}@host/x with {MASK}", "plain 3"]
