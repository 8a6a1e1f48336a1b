"""Stage hooks the tests select with ``MGPO_STAGE_HOOKS=stage_hooks:<name>`` (this folder on PYTHONPATH).

``tasks.hooks.stage_body`` runs them before an executed stage body, so a test can act on any stage of a real
``mgpo run`` without code in the production tasks.
"""

from __future__ import annotations

import os
from typing import Any


def fail_stage(stage: str, params: dict[str, Any]) -> None:
    """``MGPO_FAIL_STAGE=<stage>``: that stage fails with a transient-looking error."""
    if os.environ.get("MGPO_FAIL_STAGE") == stage:
        raise RuntimeError(f"injected failure in stage {stage!r} (MGPO_FAIL_STAGE)")
