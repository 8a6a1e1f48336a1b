"""The production back ends of infra/scale-out/ on a real PostgreSQL: the database set-up script, MLflow's model
registry (directly and behind ``mlflow-server.sh`` with proxied artifact storage), and ``prefect-server.sh`` with the
three work-pool templates, a deployment on the process pool executed by a worker.

The cluster is throwaway: a temp folder on a free loopback port, started with ``initdb`` + ``pg_ctl`` (as the
``postgres`` user when the tests run as root: PostgreSQL refuses to run as root), trust authentication. Skips with a
reason when the PostgreSQL binaries or psycopg2 are missing (``bash infra/system_deps.sh`` installs the former,
``pip install -e '.[dev]'`` the latter).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

psycopg2 = pytest.importorskip(
    "psycopg2", reason="psycopg2 missing: pip install -e '.[dev]' (psycopg2-binary)"
)

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
VENV_BIN = Path(sys.executable).parent
SCALE_OUT = Path(__file__).resolve().parents[1] / "infra" / "scale-out"
METRIC = "eval/synthetic/overall"
MODEL = "mgpo-policy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A running throwaway PostgreSQL cluster (trust authentication on 127.0.0.1)."""

    root: Path
    port: int

    def url(self, db: str, user: str = "postgres", driver: str = "postgresql") -> str:
        return f"{driver}://{user}@127.0.0.1:{self.port}/{db}"

    def query(self, db: str, sql: str) -> list[tuple]:
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    def server_env(self, tmp: Path, **extra: str) -> dict[str, str]:
        """What infra/scale-out/servers/*.sh read (as from their .env), pointed at this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MGPO_"))}
        env.update(
            PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            HOME=str(tmp),
            POSTGRES_HOST="127.0.0.1",
            POSTGRES_PORT=str(self.port),
            MLFLOW_DB_PASSWORD="unused-with-trust-auth",
            PREFECT_DB_PASSWORD="unused-with-trust-auth",
            # The scripts authenticate by default; that is tested in test_security_servers.py.
            MLFLOW_AUTH="off",
            PREFECT_AUTH="off",
            **extra,
        )
        return env


def _as_cluster_user(run_as: str | None, *args: str) -> subprocess.CompletedProcess:
    # subprocess's user=/group= drop root privileges for exactly this child (PostgreSQL refuses root).
    ids = {"user": run_as, "group": pwd.getpwnam(run_as).pw_gid} if run_as else {}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False, **ids)


@pytest.fixture(scope="module")
def pg() -> Iterator[Cluster]:
    if not PG_BIN or not shutil.which("psql"):
        pytest.skip("PostgreSQL binaries missing (initdb, pg_ctl, psql): run bash infra/system_deps.sh")
    bindir = PG_BIN[-1]
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the cluster as")
        run_as = "postgres"
    # Not pytest's tmp_path: that folder is private to root, and the server runs as 'postgres'.
    root = Path(tempfile.mkdtemp(prefix="mgpo-pg-"))
    if run_as:
        shutil.chown(root, run_as, run_as)
    port = free_port()
    init = _as_cluster_user(
        run_as, f"{bindir}/initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
        "--no-sync",
    )  # fmt: skip
    assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
    ctl = [f"{bindir}/pg_ctl", "-D", str(root / "data")]
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
    start = _as_cluster_user(
        run_as, *ctl, "-w", "-t", "60", "-l", str(root / "server.log"), "-o", opts, "start"
    )
    assert start.returncode == 0, f"pg_ctl start failed:\n{start.stderr}\n{(root / 'server.log').read_text()}"
    try:
        yield Cluster(root, port)
    finally:
        if _as_cluster_user(run_as, *ctl, "-m", "fast", "-w", "-t", "30", "stop").returncode != 0:
            _as_cluster_user(run_as, *ctl, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_with_services(pg, tmp_path_factory) -> Cluster:
    """The cluster after infra/scale-out/servers/init-db.sh (databases and roles mlflow, prefect)."""
    env = pg.server_env(tmp_path_factory.mktemp("initdb"), PGHOST="127.0.0.1", PGPORT=str(pg.port))
    p = subprocess.run(["bash", str(SCALE_OUT / "servers" / "init-db.sh")], env=env, capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 0, f"init-db.sh failed:\n{p.stdout}\n{p.stderr}"
    return pg


def start_server(
    cmd: list[str], env: dict[str, str], health: str, log: Path, timeout: float = 180
) -> subprocess.Popen:
    """Start a server in its own process group and wait until ``health`` answers 200 (or fail with its log)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{cmd} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    stop_group(proc)
    raise AssertionError(f"{cmd} not healthy at {health} after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, SIGKILL it when it is still there after ``timeout`` s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def variant(tiny_dir: Path, dst: Path, note: str) -> Path:
    shutil.copytree(tiny_dir, dst)
    (dst / "mgpo_note.txt").write_text(note)  # a different content digest = a different checkpoint
    return dst


def registry_round_trip(uri: str, tiny_dir: Path, tmp: Path, artifact_location: str | None) -> dict[str, str]:
    """Register two checkpoints, score them, promote; returns their versions after checking the decisions."""
    from mgpo_core.ops.registry import promote_if_better, register_checkpoint, tag_scores

    tags = {"mgpo.git_sha": "abc123", "mgpo.config_hash": "c0ffee", "mgpo.dataset_hash": "d00d"}
    kw = {"tracking_uri": uri, "model_name": MODEL, "experiment": "mgpo", "tags": tags,
          "artifact_location": artifact_location}  # fmt: skip
    a = register_checkpoint(tiny_dir, **kw)
    tag_scores(uri, MODEL, a.version, {METRIC: 0.50})
    first = promote_if_better(uri, MODEL, a.version, METRIC)
    b = register_checkpoint(variant(tiny_dir, tmp / "b", "b"), **kw)
    tag_scores(uri, MODEL, b.version, {METRIC: 0.25})
    second = promote_if_better(uri, MODEL, b.version, METRIC)
    again = register_checkpoint(tiny_dir, **kw)
    assert a.created and b.created and not again.created and again.version == a.version
    assert first.promoted and not second.promoted, (first.reason, second.reason)
    return {"a": a.version, "b": b.version}


def test_init_db_script_creates_one_database_and_role_per_service(pg_with_services):
    rows = pg_with_services.query(
        "postgres",
        "SELECT d.datname, r.rolname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
        "WHERE d.datname IN ('mlflow', 'prefect') ORDER BY 1",
    )
    assert rows == [("mlflow", "mlflow"), ("prefect", "prefect")]


def test_mlflow_registry_on_postgresql_promotes_the_better_version(pg, tiny_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE mlflow_direct")
    conn.close()
    uri = pg.url("mlflow_direct")
    versions = registry_round_trip(uri, tiny_dir, tmp_path, (tmp_path / "artifacts").as_uri())
    client = MlflowClient(uri)  # a fresh client reads back what the registration path wrote
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == versions["a"]
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == versions["a"]
    # The score is a metric of the version's LoggedModel (MLflow 3), stored in PostgreSQL like the rest.
    from mgpo_core.ops.eval_log import logged_model_id, version_scores

    mv_b = client.get_model_version(MODEL, versions["b"])
    assert logged_model_id(mv_b) and version_scores(client, mv_b)[METRIC][0] == 0.25
    # The registry really lives in PostgreSQL, not in a SQLite file beside it.
    rows = pg.query("mlflow_direct", "SELECT alias, version FROM registered_model_aliases ORDER BY alias")
    assert rows == [("challenger", int(versions["a"])), ("champion", int(versions["a"]))]
    assert not list(tmp_path.rglob("*.db"))
    assert list((tmp_path / "artifacts").rglob("config.json")), "the HF checkpoint is stored as an artifact"


def test_mlflow_server_script_on_postgresql_proxies_artifacts_to_its_store(
    pg_with_services, tiny_dir, tmp_path
):
    from mlflow.tracking import MlflowClient

    pg = pg_with_services
    store = tmp_path / "object-store"  # stands in for s3://bucket/prefix: the server alone writes there
    port = free_port()
    env = pg.server_env(tmp_path, MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
                        MLFLOW_ARTIFACTS_DESTINATION=store.as_uri())  # fmt: skip
    script = ["bash", str(SCALE_OUT / "servers" / "mlflow-server.sh")]
    proc = start_server(script, env, f"http://127.0.0.1:{port}/health", tmp_path / "mlflow.log")
    try:
        uri = f"http://127.0.0.1:{port}"
        versions = registry_round_trip(uri, tiny_dir, tmp_path, None)
        client = MlflowClient(uri)
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == versions["a"]
        assert client.get_experiment_by_name("mgpo").artifact_location.startswith("mlflow-artifacts:")
    finally:
        stop_group(proc)
    weights = list(store.rglob("*.safetensors"))
    assert len(weights) >= 2, f"expected both checkpoints' weights under {store}, found {weights}"
    assert pg.query("mlflow", "SELECT count(*) FROM model_versions") == [(2,)]
    # The server connected as the role init-db.sh made, which therefore owns the tables it created.
    assert pg.query("mlflow", "SELECT tableowner FROM pg_tables WHERE tablename = 'model_versions'") == [
        ("mlflow",)
    ]


SMOKE_FLOW = """
import json, os
from pathlib import Path
from prefect import flow, task

KEYS = ["MGPO_STATE_DIR", "HF_HUB_OFFLINE", "PREFECT_RESULTS_PERSIST_BY_DEFAULT", "TOKENIZERS_PARALLELISM"]

@task
def double(x: int) -> int:
    return 2 * x

@flow(name="pg-smoke")
def smoke(marker: str, x: int = 21) -> int:
    y = double(x)
    Path(marker).write_text(json.dumps({"result": y, "env": {k: os.environ.get(k) for k in KEYS}}))
    return y
"""

DEPLOY = """
import sys
from prefect import flow
from prefect.deployments import run_deployment

src, marker, state = sys.argv[1:4]
dep = flow.from_source(source=src, entrypoint="smoke.py:smoke").deploy(
    name="pg-process", work_pool_name="mgpo-process", build=False, push=False, print_next_steps=False,
    parameters={"marker": marker},
    job_variables={"env": {"MGPO_STATE_DIR": state, "PREFECT_LOCAL_STORAGE_PATH": state + "/prefect/storage"},
                   "working_dir": src},
)
print(run_deployment(dep, timeout=0).id)
"""


def api(url: str, body: dict | None = None) -> dict | list:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


POOLS = (("process", "mgpo-process"), ("docker", "mgpo-docker"), ("kubernetes", "mgpo-k8s"))


@dataclass
class PrefectPG:
    """``prefect-server.sh`` running on the cluster, with the three work pools made from the templates."""

    api: str
    client_env: dict[str, str]
    tmp: Path


@pytest.fixture(scope="module")
def prefect_pg(pg_with_services, tmp_path_factory) -> Iterator[PrefectPG]:
    tmp = tmp_path_factory.mktemp("prefect-pg")
    port = free_port()
    env = pg_with_services.server_env(tmp, PREFECT_HOST="127.0.0.1", PREFECT_PORT=str(port),
                                      PREFECT_HOME=str(tmp / "server-home"), PREFECT_UI_ENABLED="false")  # fmt: skip
    script = ["bash", str(SCALE_OUT / "servers" / "prefect-server.sh")]
    server = start_server(script, env, f"http://127.0.0.1:{port}/api/health", tmp / "prefect.log")
    base = f"http://127.0.0.1:{port}/api"
    try:
        for kind, pool in POOLS:
            template = json.loads((SCALE_OUT / "prefect" / f"{kind}-pool.json").read_text())
            api(f"{base}/work_pools/", {"name": pool, "type": kind, "base_job_template": template})
        client_env = {**pg_with_services.server_env(tmp), "PREFECT_API_URL": base,
                      "PREFECT_HOME": str(tmp / "client")}  # fmt: skip
        yield PrefectPG(base, client_env, tmp)
    finally:
        stop_group(server)


def test_work_pool_templates_are_stored_as_written(prefect_pg):
    # The server refuses a template whose {{ placeholders }} are not all declared variables.
    for kind, pool in POOLS:
        stored = api(f"{prefect_pg.api}/work_pools/{pool}")
        assert stored["type"] == kind
        assert stored["base_job_template"] == json.loads(
            (SCALE_OUT / "prefect" / f"{kind}-pool.json").read_text()
        )


def test_process_pool_template_runs_a_deployment_through_a_worker_on_postgresql(prefect_pg, pg_with_services):
    tmp, env = prefect_pg.tmp, prefect_pg.client_env
    src, state, marker = tmp / "flow-src", tmp / "state", tmp / "marker.json"
    src.mkdir()
    (src / "smoke.py").write_text(SMOKE_FLOW)
    p = subprocess.run([sys.executable, "-c", DEPLOY, str(src), str(marker), str(state)], env=env,
                       capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run_id = p.stdout.strip().splitlines()[-1]

    log = tmp / "worker.log"
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "mgpo-process", "--run-once"]
    with log.open("w") as out:
        worker = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while worker.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert worker.poll() is not None, f"the --run-once worker did not finish:\n{log.read_text()[-3000:]}"
    finally:
        stop_group(worker)
    run = api(f"{prefect_pg.api}/flow_runs/{run_id}")
    assert run["state_type"] == "COMPLETED", (run["state_type"], log.read_text()[-3000:])

    seen = json.loads(marker.read_text())
    assert seen["result"] == 42
    # The deployment's env (MGPO_STATE_DIR) merges over the template's defaults, which reach the flow run.
    assert seen["env"] == {
        "MGPO_STATE_DIR": str(state),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert list((state / "prefect" / "storage").iterdir()), "results persisted where the job variables say"
    rows = pg_with_services.query(
        "prefect",
        "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id WHERE f.name = 'pg-smoke'",
    )
    assert rows == [("pg-smoke", "COMPLETED")], "the flow run is recorded in PostgreSQL"


def test_scale_out_deployments_file_deploys_onto_the_three_pools(prefect_pg):
    from prefect.utilities.templating import apply_values

    # From the repository root, as documented: the entrypoint flows/nightly.py resolves there.
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
           str(SCALE_OUT / "prefect" / "deployments.yaml"), "--all"]  # fmt: skip
    p = subprocess.run(cmd, env=prefect_pg.client_env, cwd=SCALE_OUT.parents[1], capture_output=True, text=True,
                       timeout=300, check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    deployments = api(f"{prefect_pg.api}/deployments/filter", {})
    by_name = {d["name"]: d for d in deployments if d["name"].startswith("mgpo-nightly")}
    assert {n: by_name[n]["work_pool_name"] for n in by_name} == {
        "mgpo-nightly-multinode": "mgpo-process",
        "mgpo-nightly-docker": "mgpo-docker",
        "mgpo-nightly-k8s": "mgpo-k8s",
    }
    for d in by_name.values():
        assert [s["schedule"]["cron"] for s in d["schedules"]] == ["0 2 * * *"]
        assert (d["global_concurrency_limit"] or {}).get("limit", d["concurrency_limit"]) == 1, d
        assert (d["concurrency_options"] or {}).get("collision_strategy") == "ENQUEUE", d
    # What a Kubernetes worker would submit for the k8s deployment: the pool's defaults + its job variables.
    template = json.loads((SCALE_OUT / "prefect" / "kubernetes-pool.json").read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(by_name["mgpo-nightly-k8s"]["job_variables"])
    pod = apply_values(template["job_configuration"], values)["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["image"] == "registry.example.com/mgpo:2026.11"
    assert {v["name"] for v in pod["volumes"]} == {"state", "models", "dshm"}
