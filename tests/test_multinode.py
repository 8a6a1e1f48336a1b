"""DeepSpeed's multi-node launcher on one machine: a hostfile naming two hosts that are both this machine over the
loopback, each reached through SSH, one rank each, trains the tiny model end to end through ``launch_training``.

The SSH server is throwaway, like the PostgreSQL cluster of ``test_postgres.py``: ``sshd`` on 127.0.0.1 on a free
port, with a host key, a client key and an ``authorized_keys`` generated into a temp folder, its own config file
(public keys only, no PAM), in the foreground. The client side never touches ``~/.ssh``: the test puts a folder
first on ``PATH`` whose ``ssh`` runs the real one with ``-F <our ssh config>`` (DeepSpeed's SSH check and pdsh
both run ``ssh`` from ``PATH``); that config maps the host aliases ``node0`` and ``node1`` to 127.0.0.1 and pins
the generated host key. The port goes through the product's ``deepspeed.ssh_port``. The one change to the machine
it cannot avoid: as root, Debian's ``sshd`` refuses to start without its privilege-separation folder
``/run/sshd`` (an init system creates it); the fixture creates that empty folder when it is missing.

Skips with a reason when ``sshd`` or ``pdsh`` is missing (``bash infra/system_deps.sh`` installs both; the test
command runs it, so in CI these tests run).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mgpo_core.config import load_config
from mgpo_core.training.launch import free_port, launch_command, launch_training, write_deepspeed_env

pytestmark = pytest.mark.timeout(900)

HOSTS = ("node0", "node1")


def _find(name: str, *fallbacks: str) -> str | None:
    return shutil.which(name) or next((p for p in fallbacks if os.access(p, os.X_OK)), None)


@dataclass
class LoopbackSSH:
    """A running sshd on 127.0.0.1 and a client set-up that reaches it as ``node0`` / ``node1``."""

    port: int
    root: Path
    bin_dir: Path
    """Holds the ``ssh`` wrapper; put it first on ``PATH``."""

    def path_env(self) -> str:
        return f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / "ssh"), "-p", str(self.port), host, command],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

    def log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")


def _wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def loopback_ssh(tmp_path_factory) -> Iterator[LoopbackSSH]:
    sshd = _find("sshd", "/usr/sbin/sshd", "/usr/local/sbin/sshd")
    if sshd is None:
        pytest.skip("sshd missing (Debian: openssh-server): run bash infra/system_deps.sh")
    ssh, keygen = _find("ssh", "/usr/bin/ssh"), _find("ssh-keygen", "/usr/bin/ssh-keygen")
    if ssh is None or keygen is None:
        pytest.skip("ssh or ssh-keygen missing (Debian: openssh-client): run bash infra/system_deps.sh")
    if _find("pdsh", "/usr/bin/pdsh") is None:
        pytest.skip("pdsh missing (DeepSpeed's multi-node runner): run bash infra/system_deps.sh")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "mgpo-test", "-f", str(root / key)],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    proc = port = None
    for _ in range(3):  # a free port can be taken between the probe and sshd's bind: try another
        port = free_port()
        (root / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {root / 'host_key'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nX11Forwarding no\nPrintMotd no\n"
            "MaxStartups 64\nMaxSessions 64\nLogLevel INFO\n"
        )
        check = subprocess.run([sshd, "-t", "-f", str(root / "sshd_config")], capture_output=True, text=True,
                               timeout=30, check=False)  # fmt: skip
        assert check.returncode == 0, f"sshd rejects the test config: {check.stderr}"
        log = (root / "sshd.log").open("a")
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        log.close()
        if _wait_listening(port, proc):
            break
        proc.kill()
        proc.wait(timeout=10)
        proc = None
    assert proc is not None, f"sshd did not start:\n{(root / 'sshd.log').read_text()}"
    host_pub = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (root / "ssh_config").write_text(
        f"Host {' '.join(HOSTS)}\n  HostName 127.0.0.1\n  User {getpass.getuser()}\n"
        f"  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {root / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n"
    )
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec "{ssh}" -F "{root / "ssh_config"}" "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    try:
        yield LoopbackSSH(port, root, bin_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


MULTI = ["deepspeed.launcher=deepspeed", "deepspeed.hostfile=/etc/mgpo/hostfile"]


def test_launch_command_hands_the_multinode_settings_to_deepspeeds_runner(tmp_path):
    from deepspeed.launcher.runner import parse_args

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the cluster\nnode-0 slots=8\n\nnode-1 slots=8\n")
    multi = ["deepspeed.launcher=deepspeed", f"deepspeed.hostfile={hostfile}"]
    cfg = load_config("tiny-cpu", [*multi, "deepspeed.ssh_port=2222", "deepspeed.master_addr=10.0.0.1",
                                   "deepspeed.master_port=29600"])  # fmt: skip
    cmd = launch_command(cfg, tmp_path / "c.yaml", tmp_path, None)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    a = parse_args(cmd[3:])  # DeepSpeed's own parser reads what we pass
    assert (a.hostfile, a.ssh_port, a.master_addr, a.master_port, a.num_gpus) == (
        str(hostfile), 2222, "10.0.0.1", 29600, 1,
    )  # fmt: skip
    assert a.module and a.user_script == "mgpo_core.training.entry"
    assert a.user_args[:2] == ["--config", str(tmp_path / "c.yaml")]
    plain = launch_command(load_config("tiny-cpu", multi), tmp_path / "c.yaml", tmp_path, None)
    assert not {"--ssh_port", "--master_addr", "--master_port"} & set(plain), "unset: DeepSpeed's defaults"


def test_the_ranks_environment_file_forwards_what_a_login_shell_lacks_and_keeps_the_users_own(
    tmp_path, monkeypatch
):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=ib0\n\nOMP_NUM_THREADS=8\n")
    (cwd / ".deepspeed_env").write_text("EXTRA=1\n")
    cfg = load_config("tiny-cpu", [*MULTI, "deepspeed.env_forward=[MY_VAR]"])
    env = {
        "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MGPO_STATE_DIR": "/shared/s",
        "MY_VAR": "a b", "NOT_MINE": "x", "TORCH_EXTENSIONS_DIR": 'has "quotes"', "PATH": "/opt/venv/bin:/usr/bin",
    }  # fmt: skip
    path = write_deepspeed_env(cfg, tmp_path, env)
    lines = path.read_text().splitlines()
    # PATH exactly as here: the ranks must find the same ninja as a local launch (another one rebuilds the JIT op).
    assert lines[:6] == ["DS_ACCELERATOR=cpu", "HF_HUB_OFFLINE=1", "MGPO_STATE_DIR=/shared/s", "MY_VAR=a b",
                         "OMP_NUM_THREADS=1", "PATH=/opt/venv/bin:/usr/bin"]  # fmt: skip
    # The user's own files come last (DeepSpeed applies lines in order: theirs win); blank lines are dropped.
    assert lines[6:] == ["NCCL_SOCKET_IFNAME=ib0", "OMP_NUM_THREADS=8", "EXTRA=1"]
    assert "NOT_MINE" not in path.read_text() and "TORCH_EXTENSIONS_DIR" not in path.read_text()
    assert "not forwarded to the other hosts" in (tmp_path / "train.log").read_text()
    # DeepSpeed's runner reads it like its own ~/.deepspeed_env and exports every line to every host.
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import parse_args

    runner = PDSHRunner(parse_args(["--hostfile", "/etc/mgpo/hostfile", "x.py"]), "e30=")
    for line in path.read_text().splitlines():
        runner.add_export(*line.split("=", 1))
    cmd, _, _ = runner.get_cmd({}, {"node0": [0], "node1": [0]})
    assert 'export MY_VAR="a b";' in " ".join(cmd) and "export DS_ACCELERATOR=cpu;" in " ".join(cmd)


@pytest.mark.slow
def test_loopback_ssh_reaches_both_hosts_through_pdsh(loopback_ssh):
    """The set-up itself: both aliases answer over SSH, and pdsh (as DeepSpeed's runner calls it) reaches both,
    numbering them in hostfile order (``%n`` becomes DeepSpeed's node rank)."""
    for host in HOSTS:
        p = loopback_ssh.ssh(host, "echo ok")
        assert (p.returncode, p.stdout.strip()) == (0, "ok"), p.stderr
    env = dict(os.environ, PATH=loopback_ssh.path_env(), PDSH_RCMD_TYPE="ssh",
               PDSH_SSH_ARGS_APPEND=f"-p {loopback_ssh.port}")  # fmt: skip
    p = subprocess.run(["pdsh", "-S", "-w", ",".join(HOSTS), "echo rank=%n"], env=env, capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == ["node0: rank=0", "node1: rank=1"]


@pytest.mark.slow
def test_two_hosts_of_a_hostfile_train_one_rank_each_through_deepspeeds_multinode_launcher(
    loopback_ssh, tiny_dir, tmp_path, monkeypatch
):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    cfg = load_config(
        "tiny-cpu",
        [
            f"model.path={tiny_dir}",
            f"state_dir={tmp_path}",
            f"tracking.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "deepspeed.launcher=deepspeed",
            "deepspeed.num_gpus=1",
            f"deepspeed.hostfile={hostfile}",
            f"deepspeed.ssh_port={loopback_ssh.port}",
            "deepspeed.master_addr=127.0.0.1",
            f"deepspeed.master_port={free_port()}",
            "deepspeed.env_forward=[TEST_FORWARDED_TO_RANKS]",
            "rollout.engine=hf",
            "rollout.min_pixels=3136",
            "rollout.max_pixels=12544",
            "rollout.n=2",
            "rollout.max_new_tokens_turn1=4",
            "rollout.max_new_tokens_turn2=2",
            "data.synthetic_width=448",
            "data.synthetic_height=336",
            "data.synthetic_train=4",
            "algorithm.total_steps=2",
            "algorithm.prompts_per_step=2",
            "algorithm.mini_batch_prompts=2",
            "algorithm.micro_batch_size=2",
            "checkpoint.every_steps=2",
            "checkpoint.export_hf=false",
        ],
    )
    # The ranks start in SSH login shells: only what launch_training forwards reaches them.
    monkeypatch.setenv("PATH", loopback_ssh.path_env())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TEST_FORWARDED_TO_RANKS", "yes")  # by deepspeed.env_forward only
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)  # (DeepSpeed forwards MLFLOW* itself)
    before = loopback_ssh.log().count("Accepted publickey")
    lines: list[str] = []
    run_dir = tmp_path / "run"
    manifest = launch_training(cfg, run_dir, on_line=lines.append, timeout_s=600)

    assert manifest["status"] == "completed" and manifest["steps_done"] == 2
    assert manifest["world_size"] == 2
    ck = Path(manifest["checkpoint"])
    assert (ck / "rng_rank000.pt").exists() and (ck / "rng_rank001.pt").exists(), sorted(os.listdir(ck))
    # Both ranks ran on their host of the hostfile: pdsh prefixes each host's output with its name, and each
    # host's DeepSpeed launcher reports its node rank; every process came in through our sshd.
    for rank, host in enumerate(HOSTS):
        mine = [x for x in lines if x.startswith(f"{host}: ")]
        assert any(f"nnodes=2, num_local_procs=1, node_rank={rank}" in x for x in mine), "\n".join(lines)[-3000:]
        assert any("exits successfully" in x for x in mine), "\n".join(mine)[-3000:]
    assert sum('"status": "completed"' in x for x in lines if x.startswith(f"{HOSTS[0]}: ")) == 1  # rank 0 only
    assert loopback_ssh.log().count("Accepted publickey") - before >= len(HOSTS) + 1  # + DeepSpeed's SSH check
    # Each node's local rank 0 sampled its node into the one training run, under its own node id (each rank lives
    # less than MLflow's 10 s sampling interval here: what it logs is its closing sample).
    from mlflow.tracking import MlflowClient

    keys = set(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(manifest["mlflow_run_id"]).data.metrics)
    host = socket.gethostname()
    for node in (0, 1):
        assert f"system/node{node}-{host}/cpu_utilization_percentage" in keys, (sorted(keys), [x for x in lines if "metrics" in x][-20:])
    forwarded = (run_dir / "deepspeed_env").read_text().splitlines()
    assert {"DS_ACCELERATOR=cpu", "TEST_FORWARDED_TO_RANKS=yes", f"PATH={os.environ['PATH']}"} <= set(forwarded)
