"""The registered policy as its users meet it: ``mlflow models serve`` of ``models:/NAME@champion`` on loopback
answering a question sent with its image, both JSON request shapes, image paths only under a configured root,
and a version registered the old (pickled) way still loading and answering. (Loading a registered version with
pickle disallowed, and its answers, are in tests/test_registry.py.)

The model is ``answering_model``'s: a tiny base model that answers the default preset's labelled questions well
above chance. Stores and artifacts live under the test's folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from answering_model import answering_model, check_letters, library_answers, row

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def answering(tmp_path_factory):
    return answering_model(tmp_path_factory.mktemp("serving"))


def test_image_paths_are_read_only_under_the_configured_root(answering, tmp_path, monkeypatch):
    import mlflow.pyfunc

    from mgpo_core.ops.policy_model import IMAGE_ROOT_ENV, RequestError
    from mgpo_core.ops.registry import log_policy_model

    model_dir, samples = answering
    monkeypatch.delenv(IMAGE_ROOT_ENV, raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        uri = log_policy_model(model_dir).model_uri
    s = samples[0]
    by_path = {"image_path": s.image_path, "question": s.question, "choices": list(s.choices)}
    with pytest.raises(RequestError, match="no image root is configured"):
        mlflow.pyfunc.load_model(uri).predict([by_path])
    secret = tmp_path / "secret.txt"
    secret.write_text("not for clients")
    root = Path(s.image_path).parent
    allowed = mlflow.pyfunc.load_model(uri, model_config={"image_root": str(root)})
    with pytest.raises(RequestError, match="not a file inside the configured image root"):
        allowed.predict([{**by_path, "image_path": os.path.relpath(secret, root)}])  # ../../... out of the root
    with pytest.raises(RequestError, match="not a file inside the configured image root"):
        allowed.predict([{**by_path, "image_path": str(secret)}])
    (root / "link.jpg").symlink_to(secret)  # a link inside the root to a file outside it
    with pytest.raises(RequestError, match="not a file inside the configured image root"):
        allowed.predict([{**by_path, "image_path": "link.jpg"}])
    assert allowed.predict([{**by_path, "image_path": Path(s.image_path).name}]) == allowed.predict([row(s, encode=True)])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:  # noqa: S310 - loopback
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url} answered {exc.code}: {exc.read().decode()[-2000:]}") from None


def test_mlflow_models_serve_answers_champion_with_the_image_in_the_request(answering, tmp_path):
    from mlflow.tracking import MlflowClient

    from mgpo_core.ops.registry import CHAMPION, register_checkpoint

    model_dir, samples = answering
    store = f"sqlite:///{tmp_path}/mlflow.db"
    v = register_checkpoint(model_dir, tracking_uri=store, model_name="mgpo-policy", experiment="e", tags={},
                            artifact_location=(tmp_path / "artifacts").as_uri())
    MlflowClient(store).set_registered_model_alias("mgpo-policy", CHAMPION, v.version)
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # as with the environment activated: MLflow execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env.pop("MGPO_SERVING_IMAGE_ROOT", None)
    cmd = [str(Path(bin_dir, "mlflow")), "models", "serve", "-m", "models:/mgpo-policy@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1", "-t", "900"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:  # ready when /ping answers; a server that exits fails the test with its log
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()}")
            try:
                with urllib.request.urlopen(base + "/ping", timeout=5) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        s = samples[0]  # one question with its image, in each documented request shape
        records = _post(base + "/invocations", {"dataframe_records": [row(s, encode=True)]})["predictions"]
        instances = _post(base + "/invocations", {"instances": [row(s, encode=True)]})["predictions"]
        assert records == instances == library_answers(model_dir, [s])
        assert records[0] in "ABCDEFGH"[: len(s.choices)]
        s = samples[0]
        with pytest.raises(AssertionError, match="no image root is configured"):  # no root: paths are not read
            _post(base + "/invocations", {"dataframe_records": [
                {"image_path": s.image_path, "question": s.question, "choices": list(s.choices)}]})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_a_version_pickled_before_models_from_code_still_loads_and_answers(answering, tmp_path, monkeypatch):
    """Versions registered before this change hold ``python_model.pkl`` naming ``mgpo_core.registry.
    HFCheckpointModel`` (the path before ``ops/`` existed): rebuilt here byte for byte that way, it loads and
    answers (with pickle loading allowed, as MLflow requires for such models), under the new path rule."""
    import pickle

    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from mgpo_core.ops.registry import HFCheckpointModel

    model_dir, samples = answering
    old = tmp_path / "old-model"
    mlflow.pyfunc.save_model(str(old), python_model=HFCheckpointModel(), artifacts={"hf_checkpoint": str(model_dir)},
                             pip_requirements=["mgpo-pipeline"])
    legacy = pickle.dumps(HFCheckpointModel(), protocol=0).replace(b"mgpo_core.ops.registry", b"mgpo_core.registry")
    assert b"cmgpo_core.registry\nHFCheckpointModel" in legacy
    (old / "python_model.pkl").write_bytes(legacy)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    model = mlflow.pyfunc.load_model(str(old))
    assert type(model.unwrap_python_model()) is HFCheckpointModel
    answers = model.predict([row(s, encode=True) for s in samples])
    check_letters(answers, samples)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(MlflowException, match="pickle"):
        mlflow.pyfunc.load_model(str(old))
