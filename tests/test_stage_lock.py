"""A stage longer than the orphan threshold commits: releasing its lock must not look like an orphan's lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_stage_that_outlives_the_orphan_threshold_commits_and_releases_its_lock(tmp_path):
    # A real Prefect flow (ephemeral API in its own home) with the stage tasks' cache policy; the threshold is
    # lowered to 1 s so a 3 s task outlives it, as a training stage outlives the real 60 s.
    script = textwrap.dedent(f"""
        import os, time
        os.environ.update(PREFECT_HOME={str(tmp_path)!r}, PREFECT_LOCAL_STORAGE_PATH={str(tmp_path / "storage")!r},
                          PREFECT_SERVER_ANALYTICS_ENABLED="false")
        import tasks.locks as L
        L.ORPHAN_AFTER_S = 1.0
        from prefect import flow, task
        from prefect.cache_policies import CachePolicy

        @task(cache_policy=L.serializable(CachePolicy.from_cache_key_fn(lambda c, p: "stage-key")),
              persist_result=True)
        def stage():
            time.sleep(3)
            return 42

        @flow
        def pipeline():
            return stage()

        print("RESULT", pipeline())
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "RESULT 42" in p.stdout, out[-3000:]
    assert "breaking the lock" not in out and "No lock for transaction" not in out, out[-3000:]
    assert not list((tmp_path / "locks").glob("*")), "the lock and its owner record are gone after the commit"
