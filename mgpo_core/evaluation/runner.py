"""The generic benchmark evaluator: `evaluate(cfg, benchmark, engine, out_dir)` rolls a registered benchmark
out greedily in MGPO two-turn or direct single-turn mode and writes per-sample JSONL, a summary JSON and a
picture; it returns an `EvalResult` whose metrics the caller logs (see `mgpo_core.ops.eval_log`).

Scores use ONE answer rule, the training reward's (METHOD.md §1.7): a question is right iff the last complete
``\\boxed{}`` of the FINAL assistant turn names its letter (`extract.strict_answer`). ``overall`` and every
per-label score of the benchmark's own aggregation come from that; ``lenient_overall`` (the same aggregation
over the lenient extraction, `extract.extract_answer`) and the per-record ``lenient_*`` fields are diagnostics.

Files in ``out_dir``: ``samples.jsonl`` (one record per question, written batch by batch), ``summary.json``
(metrics, counts, timings, settings) and ``picture.png`` (the first questions with predicted crop and ground
truth drawn). ``limit`` keeps a deterministic subsample: questions are ordered by sha256(seed:id) and the
first ``limit`` kept (then restored to file order), so a run is repeatable, a smaller limit is a subset of a
larger one, and the choice does not depend on file order. It is not stratified: on HR-Bench a subsample can
split a question's option cycles (see `scoring.hrbench_scores`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from mgpo_core.data.schema import Sample
from mgpo_core.evaluation.benchmarks import get_benchmark
from mgpo_core.evaluation.direct import DirectPrompt, generate_direct
from mgpo_core.evaluation.extract import strict_answer
from mgpo_core.evaluation.grounding_metrics import GroundingOutcome, aggregate_grounding, grounding_outcome
from mgpo_core.evaluation.scoring import Outcome, group_counts
from mgpo_core.evaluation.spec import BenchmarkSpec, ReadContext
from mgpo_core.evaluation.visualize import PictureItem, draw_eval_grid
from mgpo_core.reward import answer_reward
from mgpo_core.rollout.base import RolloutEngine, RolloutSettings

if TYPE_CHECKING:
    from mgpo_core.config import MGPOConfig

__all__ = ["EvalMode", "EvalResult", "evaluate", "metric_prefix", "subsample"]

log = logging.getLogger(__name__)

EvalMode = Literal["mgpo", "direct"]
_PIXELS_PER_TOKEN = 28 * 28
_TURN2_TEXT_MARGIN = 64  # tokens of slack for the inserted turn-2 header around its image and text


def metric_prefix(benchmark: str, mode: str) -> str:
    """``eval/<benchmark>`` for MGPO mode; ``eval/<benchmark>/direct`` so both modes can share one run."""
    return f"eval/{benchmark}" if mode == "mgpo" else f"eval/{benchmark}/{mode}"


@dataclass
class EvalResult:
    """What one evaluation produced. ``metrics`` keys are relative (``overall``, ``grounding/...``); see
    :meth:`prefixed` for the MLflow names."""

    benchmark: str
    mode: str
    engine: str
    n: int
    metrics: dict[str, float]
    out_dir: Path
    records_path: Path
    summary_path: Path
    picture_path: Path | None
    seconds: float
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return metric_prefix(self.benchmark, self.mode)

    def prefixed(self) -> dict[str, float]:
        """``{"eval/<benchmark>[/direct]/<metric>": value}``."""
        return {f"{self.prefix}/{k}": v for k, v in self.metrics.items()}


def subsample(samples: Sequence[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """At most ``limit`` samples, chosen by sha256(f"{seed}:{id}") order and returned in their input order."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: give a positive number of questions, or None for all")
    if limit is None or limit >= len(samples):
        return list(samples)
    rank = sorted(
        range(len(samples)), key=lambda i: hashlib.sha256(f"{seed}:{samples[i].id}".encode()).digest()
    )
    keep = set(rank[:limit])
    return [s for i, s in enumerate(samples) if i in keep]


def _batches(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _eval_settings(engine: RolloutEngine, samples: Sequence[Sample], max_new: int) -> RolloutSettings:
    """The engine's settings with the evaluation cap per turn and a response cap that never cuts turn 2.

    The response cap counts the inserted turn-2 prompt; its largest possible size is the longest turn-2 text
    of the batch plus a second image of at most ``max_pixels``.
    """
    st = engine.settings
    image_tokens = st.max_pixels // _PIXELS_PER_TOKEN
    turn2 = max(
        len(engine.prompts.turn2_prompt(s, image_tokens, valid_box=v)) for s in samples for v in (True, False)
    )
    cap = max(st.max_response_tokens, 2 * max_new + 1 + turn2 + _TURN2_TEXT_MARGIN)
    return replace(st, max_new_tokens_turn1=max_new, max_new_tokens_turn2=max_new, max_response_tokens=cap)


def _base_record(
    spec: BenchmarkSpec, sample: Sample, mode: str, turns: list[str], final_turn: str
) -> dict[str, Any]:
    """The record fields every mode shares. ``correct`` / ``prediction`` / ``reward`` follow the one answer
    rule (the reward's: last ``\\boxed{}`` of ``final_turn``); the ``lenient_*`` fields are the diagnostic
    extraction over all of ``turns`` (``spec.extract``), never the score."""
    strict = strict_answer(final_turn, sample.choices)
    reward = answer_reward(final_turn, sample.answer)
    if (reward == 1.0) != (strict.letter == sample.answer):  # one rule, two readings: they must agree
        raise RuntimeError(f"{sample.id}: strict answer {strict} disagrees with the reward {reward} (a bug)")
    lenient = spec.extract(turns, sample.choices)

    def text(letter: str | None) -> str | None:
        return None if letter is None else sample.choices[ord(letter) - ord("A")]

    return {
        "id": sample.id,
        "benchmark": spec.name,
        "mode": mode,
        "question": sample.question,
        "choices": list(sample.choices),
        "answer": sample.answer,
        "labels": dict(spec.labels(sample)),
        "image_path": sample.image_path,
        "output": turns,
        "prediction": strict.letter,
        "prediction_text": text(strict.letter),
        "answer_rule": strict.rule,
        "answer_span": strict.span,
        "correct": strict.letter == sample.answer,
        "reward": reward,
        "lenient_prediction": lenient.letter,
        "lenient_rule": lenient.rule,
        "lenient_span": lenient.span,
        "lenient_correct": lenient.letter == sample.answer,
        "gt_boxes": [list(b) for b in sample.gt_boxes],
    }


def _mgpo_records(
    spec: BenchmarkSpec, engine: RolloutEngine, batch: Sequence[Sample], max_new: int
) -> list[tuple[dict[str, Any], GroundingOutcome]]:
    saved = engine.settings
    engine.settings = _eval_settings(engine, batch, max_new)
    try:
        episodes = engine.generate_episodes(batch, n=1, greedy=True, seed=0)
    finally:
        engine.settings = saved
    merge2 = int(getattr(engine.image_processor, "merge_size", 2)) ** 2
    out = []
    for ep in sorted(episodes, key=lambda e: e.group):
        g = ep.grounding
        go = grounding_outcome(g, ep.crop_box, ep.sample.gt_boxes, ep.overview_size, ep.original_size)
        # The final turn is turn 2; a turn 2 that never ran (budget spent) answered nothing, as in training.
        final = ep.turn2_text if ep.turn2_answered else ""
        rec = _base_record(spec, ep.sample, "mgpo", [ep.turn1_text, ep.turn2_text], final)
        rec.update(
            original_size=list(ep.original_size),
            overview_size=list(ep.overview_size),
            parsed_box=None if g.box is None else [round(v, 2) for v in g.box],
            box_valid=go.valid,
            box_reason=g.reason,
            box_rule=g.rule,
            crop_box=None if ep.crop_box is None else list(ep.crop_box),
            crop_size=None if ep.crop_size is None else list(ep.crop_size),
            iou=go.iou,
            crop_contains_gt=go.contains_gt,
            gt_coverage=go.gt_coverage,
            visual_tokens=int((ep.image_grid_thw.prod(dim=-1) // merge2).sum().item()),
            generated_tokens=ep.turn_length(1) + ep.turn_length(2),
            finish_reasons=list(ep.finish_reasons),
            truncated=ep.truncated,
        )
        out.append((rec, go))
    return out


def _direct_records(
    spec: BenchmarkSpec, engine: RolloutEngine, batch: Sequence[Sample], cfg: MGPOConfig
) -> list[tuple[dict[str, Any], None]]:
    ev = cfg.evaluation
    prompt = DirectPrompt(ev.direct_system_prompt, ev.direct_template, cfg.rollout.choices_header)
    outputs = generate_direct(
        engine,
        batch,
        prompt,
        max_new_tokens=ev.max_new_tokens,
        min_pixels=cfg.rollout.min_pixels,
        max_pixels=ev.direct_max_pixels,
        resample=cfg.rollout.overview_resample,
        max_image_pixels=cfg.data.max_image_pixels,
    )
    out = []
    for o in outputs:
        rec = _base_record(spec, o.sample, "direct", [o.text], o.text)
        rec.update(
            original_size=list(o.original_size),
            image_size=list(o.image_size),
            parsed_box=None,
            crop_box=None,
            visual_tokens=o.visual_tokens,
            prompt_tokens=o.prompt_tokens,
            generated_tokens=o.generated_tokens,
            finish_reasons=[o.finish_reason],
        )
        out.append((rec, None))
    return out


def _load_samples(
    spec: BenchmarkSpec, cfg: MGPOConfig, data_path: str | Path | None, out_dir: Path
) -> list[Sample]:
    path = data_path
    if path is None:
        path = cfg.evaluation.data_paths.get(spec.name, cfg.data.eval_path)
    samples = spec.read(ReadContext(None if path is None else Path(path), out_dir / "data", cfg))
    samples = [spec.prompt(s) for s in samples]
    if not samples:
        raise ValueError(
            f"benchmark {spec.name!r}: the reader returned no questions from {path}; {spec.data_hint}"
        )
    dupes = [k for k, v in Counter(s.id for s in samples).items() if v > 1]
    if dupes:
        raise ValueError(
            f"benchmark {spec.name!r}: {len(dupes)} duplicate question ids (e.g. {dupes[:3]}); ids must be "
            "unique for records and the --limit subsample to be well defined: fix the reader or the data file"
        )
    return samples


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def evaluate(
    cfg: MGPOConfig,
    benchmark: str | BenchmarkSpec,
    engine: RolloutEngine,
    out_dir: str | Path,
    limit: int | None = None,
    mode: EvalMode = "mgpo",
    *,
    data_path: str | Path | None = None,
    samples: Sequence[Sample] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``engine``'s model on a benchmark, greedily, and write the outputs into ``out_dir``.

    ``mode="mgpo"``: the two-turn episode (ground → crop the original → answer) with at most
    ``evaluation.max_new_tokens`` tokens per turn; ``mode="direct"``: one turn at
    ``evaluation.direct_max_pixels``. Questions come from ``samples`` when given, else from the benchmark's
    reader on ``data_path`` (default ``evaluation.data_paths[<benchmark>]``, then ``data.eval_path``).
    ``limit`` keeps a deterministic subsample (module docstring).

    Raises:
        KeyError: unknown benchmark name. ValueError: bad mode/limit, no questions, duplicate ids.
    """
    if mode not in ("mgpo", "direct"):
        raise ValueError(f"mode={mode!r}; use 'mgpo' (two-turn grounding) or 'direct' (single turn)")
    spec = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = list(samples) if samples is not None else _load_samples(spec, cfg, data_path, out)
    if not pool:
        raise ValueError(f"benchmark {spec.name!r}: no questions to evaluate; pass samples or a data path")
    chosen = subsample(pool, limit, cfg.evaluation.subsample_seed)
    # Fail before any generation when a reader left out a label the scoring groups by.
    spec.aggregate([Outcome(False, spec.labels(s), s.id) for s in chosen])
    ev = cfg.evaluation
    records_path = out / "samples.jsonl"
    tmp = records_path.with_name(f".{records_path.name}.tmp{os.getpid()}")
    outcomes: list[Outcome] = []
    lenient: list[Outcome] = []
    grounding: list[GroundingOutcome] = []
    pictures: list[PictureItem] = []
    rules: Counter[str] = Counter()
    lenient_rules: Counter[str] = Counter()
    visual, generated = [], []
    t_gen = 0.0
    n_batches = (len(chosen) + ev.batch_size - 1) // ev.batch_size
    bar = tqdm(total=n_batches, desc=f"eval {spec.name} ({mode})", unit="batch", disable=not progress)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for batch in _batches(chosen, ev.batch_size):
                tb = time.perf_counter()
                if mode == "mgpo":
                    rows: list[tuple[dict[str, Any], GroundingOutcome | None]] = list(
                        _mgpo_records(spec, engine, batch, ev.max_new_tokens)
                    )
                else:
                    rows = list(_direct_records(spec, engine, batch, cfg))
                t_gen += time.perf_counter() - tb
                for rec, go in rows:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    outcomes.append(Outcome(rec["correct"], rec["labels"], rec["id"]))
                    lenient.append(Outcome(rec["lenient_correct"], rec["labels"], rec["id"]))
                    rules[rec["answer_rule"]] += 1
                    lenient_rules[rec["lenient_rule"]] += 1
                    visual.append(rec["visual_tokens"])
                    generated.append(rec["generated_tokens"])
                    if go is not None:
                        grounding.append(go)
                    if len(pictures) < ev.picture_samples:
                        pictures.append(PictureItem.from_record(rec))
                fh.flush()
                bar.update(1)
        tmp.replace(records_path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)

    n = len(outcomes)
    metrics = dict(spec.aggregate(outcomes))
    metrics.update(aggregate_grounding(grounding))
    metrics["answered_ratio"] = rules["boxed"] / n
    metrics.update({f"answer/{r}": c / n for r, c in sorted(rules.items())})
    # Diagnostic only: what a looser reader would credit (never a score, never the promotion metric).
    metrics["lenient_overall"] = spec.aggregate(lenient)["overall"]
    metrics.update({f"lenient/extraction/{r}": c / n for r, c in sorted(lenient_rules.items())})
    metrics["cost/visual_tokens_mean"] = sum(visual) / n
    metrics["cost/generated_tokens_mean"] = sum(generated) / n
    metrics["timing/generate_s"] = t_gen
    metrics["timing/samples_per_s"] = n / t_gen if t_gen > 0 else 0.0

    picture = None
    if pictures:
        legend = f"{spec.name} ({mode}): green = ground truth, red = predicted crop (original pixels)"
        picture = draw_eval_grid(
            pictures, out / "picture.png", title=legend, max_image_pixels=cfg.data.max_image_pixels
        )
    seconds = time.perf_counter() - t0
    counts = {"questions": n, "available": len(pool), "labels": group_counts(outcomes)}
    result = EvalResult(
        spec.name,
        mode,
        getattr(engine, "name", type(engine).__name__),
        n,
        metrics,
        out,
        records_path,
        out / "summary.json",
        picture,
        seconds,
        counts,
    )
    _write_json(result.summary_path, _summary(result, cfg, limit))
    log.info("eval %s (%s): %s", spec.name, mode, {k: round(v, 4) for k, v in result.prefixed().items()})
    return result


def _summary(result: EvalResult, cfg: MGPOConfig, limit: int | None) -> dict[str, Any]:
    from mgpo_core.config import config_hash

    return {
        "benchmark": result.benchmark,
        "mode": result.mode,
        "engine": result.engine,
        "questions": result.n,
        "limit": limit,
        "subsample_seed": cfg.evaluation.subsample_seed,
        "max_new_tokens": cfg.evaluation.max_new_tokens,
        "direct_max_pixels": cfg.evaluation.direct_max_pixels if result.mode == "direct" else None,
        "config_hash": config_hash(cfg),
        "model_path": cfg.model.path,
        "metrics": result.metrics,
        "mlflow_metrics": result.prefixed(),
        "counts": result.counts,
        "seconds": round(result.seconds, 3),
        "files": {
            "samples": result.records_path.name,
            "picture": None if result.picture_path is None else result.picture_path.name,
        },
    }
