"""Collapse signals a user can alert on: the valid-box ratio or the response lengths falling sharply.

RL runs of grounding policies can collapse: the model stops emitting boxes (valid-box ratio → 0) or its replies
shrink to a few tokens. Each signal is smoothed (exponential moving average) and compared with its best smoothed
value so far; ``collapse/<signal>_drop`` is the relative fall from that peak (0 = at the peak, 1 = gone), and
``collapse/alarm`` is 1 when any drop exceeds the threshold. Logged every step with the other metrics, so an
MLflow alert or a dashboard can watch one number.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

SIGNALS: dict[str, str] = {
    "valid_box_ratio": "rollout/valid_box_ratio",
    "response_len_turn1": "rollout/response_len_turn1",
    "response_len_turn2": "rollout/response_len_turn2",
}


class CollapseMonitor:
    def __init__(self, *, smoothing: float = 0.3, threshold: float = 0.5, min_peak: float = 1e-6) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"CollapseMonitor: smoothing={smoothing} must be in (0, 1]")
        self.smoothing, self.threshold, self.min_peak = smoothing, threshold, min_peak
        self.ema: dict[str, float] = {}
        self.peak: dict[str, float] = {}

    def update(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The collapse metrics for this step's ``metrics`` (signals that are absent are skipped)."""
        out: dict[str, float] = {}
        alarm = 0.0
        for name, key in SIGNALS.items():
            if key not in metrics:
                continue
            x = float(metrics[key])
            prev = self.ema.get(name)
            ema = x if prev is None else self.smoothing * x + (1 - self.smoothing) * prev
            self.ema[name] = ema
            peak = max(self.peak.get(name, ema), ema)
            self.peak[name] = peak
            drop = 0.0 if peak <= self.min_peak else max(0.0, (peak - ema) / peak)
            out[f"collapse/{name}_drop"] = drop
            alarm = max(alarm, float(drop > self.threshold))
        if out:
            out["collapse/alarm"] = alarm
        return out

    @classmethod
    def from_journal(cls, journal: str | Path, upto: int, **kwargs: float) -> CollapseMonitor:
        """A monitor that has seen the journaled steps 1..``upto`` (a resumed run keeps its peaks)."""
        mon = cls(**kwargs)
        path = Path(journal)
        if upto > 0 and path.exists():
            seen: set[int] = set()
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                step = int(rec.get("step", 0))
                if 0 < step <= upto and step not in seen:
                    seen.add(step)
                    mon.update(rec.get("metrics", {}))
        return mon

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"ema": dict(self.ema), "peak": dict(self.peak)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        self.ema, self.peak = dict(state.get("ema", {})), dict(state.get("peak", {}))
