"""Benchmark evaluation: a registry of benchmarks (reader, prompt convention, answer extraction, scoring), a
generic greedy evaluator in MGPO two-turn or direct mode, grounding metrics, a picture, and MLflow logging.

The light parts are importable here; `runner.evaluate` (torch) and `mgpo_core.ops.eval_log.log_eval_results` (MLflow)
are imported from their modules.
"""

from __future__ import annotations

from mgpo_core.evaluation.benchmarks import available_benchmarks, get_benchmark
from mgpo_core.evaluation.extract import EXTRACTION_RULES, Extraction, extract_answer
from mgpo_core.evaluation.scoring import Outcome
from mgpo_core.evaluation.spec import BENCHMARKS, BenchmarkSpec, ReadContext, register_benchmark

__all__ = [
    "BENCHMARKS",
    "EXTRACTION_RULES",
    "BenchmarkSpec",
    "Extraction",
    "Outcome",
    "ReadContext",
    "available_benchmarks",
    "extract_answer",
    "get_benchmark",
    "register_benchmark",
]
