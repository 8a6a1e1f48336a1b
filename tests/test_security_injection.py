"""No shell from config (issue 26, item 3): injection strings in every config value that reaches a command line
or a path join are refused at config time, naming the field and the fix, through ``load_config``, ``mgpo run
--set`` and the nightly flow's ``overrides`` parameter; nothing runs and nothing is written outside the state
folder. And the multi-node launch arguments survive a real shell intact (the pdsh runner's remote command)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mgpo_core.config import ConfigError, load_config
from mgpo_core.training.launch import UnsafeLaunch, check_hostfile, remote_arguments

REPO = Path(__file__).resolve().parents[1]


def payloads(marker: Path) -> list[str]:
    """Each would create ``marker`` (or leave the intended folder) if any shell or path join interpreted it."""
    return [f";touch {marker}", f"$(touch {marker})", f"`touch {marker}`", f"x && touch {marker}", "../escaped"]


FIELDS = {
    # field -> overrides that make it reach the launcher / a path join
    "run_name": [],
    "state_dir": [],
    "deepspeed.master_addr": ["deepspeed.launcher=deepspeed"],
    "deepspeed.hostfile": ["deepspeed.launcher=deepspeed"],
    "tracking.run_id": [],
    "evaluation.benchmarks": [],
    "evaluation.data_paths.synthetic": [],
    "evaluation.image_roots.synthetic": [],
    "data.root": [],
    "data.image_cache_dir": [],
    "model.path": [],
}
PATHS = {"state_dir", "deepspeed.hostfile", "evaluation.data_paths.synthetic", "evaluation.image_roots.synthetic",
         "data.root", "data.image_cache_dir", "model.path"}  # fmt: skip


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_injection_strings_are_refused_at_config_time_naming_the_field(field, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    for payload in payloads(marker):
        if field in PATHS and payload == "../escaped":
            continue  # a path by design: any folder the operator names, '..' included (docs/SECURITY.md)
        if field == "evaluation.benchmarks":
            override = f"{field}=[synthetic, {json.dumps(payload)}]"
        elif field.startswith(("evaluation.data_paths", "evaluation.image_roots")):  # a mapping: set as a whole
            override = f"{field.rsplit('.', 1)[0]}={{synthetic: {json.dumps(payload)}}}"
        else:
            override = f"{field}={json.dumps(payload)}"
        with pytest.raises(ConfigError) as err:
            load_config("tiny-cpu", [*FIELDS[field], override])
        line = err.value.problems[0]
        assert line.startswith(field), line
        assert "use " in line or "give " in line, f"the error names the fix: {line}"
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_mgpo_run_refuses_injected_values_before_anything_starts(tmp_path):
    marker, state = tmp_path / "pwned", tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    for field, payload in [("run_name", p) for p in payloads(marker)] + [("state_dir", f"{state};touch {marker}")]:
        sets = ["--set", f"state_dir={state}"] if field != "state_dir" else []
        p = subprocess.run([sys.executable, "-m", "mgpo_cli", "run", "--preset", "tiny-cpu", *sets,
                            "--set", f"{field}={payload}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert p.returncode != 0, p.stdout
        assert f"{field}: holds characters" in p.stderr + p.stdout, p.stderr[-2000:]
    assert not marker.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == [], "nothing was written, not even the state folder"


_FLOW = """
import json, sys
from flows.nightly import nightly
out = []
for value in json.loads(sys.argv[1]):
    try:
        nightly(preset="tiny-cpu", overrides=[sys.argv[2], "run_name=" + value])
        out.append("ran")
    except Exception as e:
        out.append(str(e))
print("RESULT " + json.dumps(out))
"""


def test_flow_parameters_with_injected_values_fail_without_running_anything(tmp_path):
    """The nightly flow as a deployment runs it: the same ``overrides`` a Prefect caller could send."""
    marker, state = tmp_path / "pwned", tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MGPO_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO), MGPO_TASK_RETRIES="0")
    p = subprocess.run([sys.executable, "-c", _FLOW, json.dumps(payloads(marker)), f"state_dir={state}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, p.stderr[-3000:]
    results = json.loads(line.removeprefix("RESULT "))
    assert len(results) == len(payloads(marker)) and all("run_name: holds characters" in r for r in results), results
    assert not marker.exists()
    assert not (tmp_path / "escaped").exists() and not (state / "escaped").exists()
    leftovers = {x.name for x in tmp_path.iterdir()} - {"prefect-home", "state"}
    assert leftovers == set(), leftovers


def test_launch_arguments_reach_a_real_shell_intact(tmp_path):
    """Defence in depth behind the config checks: what DeepSpeed's pdsh runner hands each host's login shell
    (our arguments joined by spaces) is read back by ``sh`` exactly, and whitespace is refused."""
    marker = tmp_path / "pwned"
    t = f"touch${{IFS}}{marker}"  # no space: the runner's own quoting would otherwise wrap it in double quotes
    hostile = [f"/x/$({t})", f"/x/`{t}`", f"/x;{t}", f"/x|{t}", "/x/'q'\"dq\"", "/plain/x.yaml"]
    remote = " ".join(remote_arguments(hostile))
    p = subprocess.run(["sh", "-c", f"printf '%s\\n' {remote}"], capture_output=True, text=True, timeout=30)
    assert p.stdout.splitlines() == hostile and not marker.exists()
    assert remote_arguments(["/plain/x.yaml"]) == ["/plain/x.yaml"], "plain arguments go as they are"
    with pytest.raises(UnsafeLaunch, match="whitespace"):
        remote_arguments(["/has space/x"])
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=8\n-oProxyCommand=touch slots=8\n")
    with pytest.raises(UnsafeLaunch, match="hostfile"):
        check_hostfile(hostfile)
    assert shlex.split(remote) == hostile
