"""Writing a filtered dataset: ``<out_root>/<hash>/`` with ``samples.jsonl`` (the kept rows), ``dropped.jsonl``
(every dropped row with its reason), ``manifest.json`` (config, counts, inputs, code version) and the report
(``report.json`` + a readable ``report.md``). The directory is built under a temporary name and renamed into
place, so a reader never sees half a dataset; ``<hash>`` is the first 16 hex digits of the sha256 of the rows
with each image named by its content digest or its place inside the state folder (``dataset_content_hash``), so
the same rows always land in the same directory, wherever the state folder lies.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgpo_core.data.schema import DataRow

if TYPE_CHECKING:
    from mgpo_core.config import MGPOConfig

EXAMPLES_PER_REASON = 3
MANIFEST_SCHEMA = "mgpo-dataset/1"


@dataclass(frozen=True)
class FilterResult:
    """Where the dataset went and what happened: ``manifest`` and ``report`` as written to disk."""

    dataset_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any]

    @property
    def samples_path(self) -> Path:
        return self.dataset_dir / "samples.jsonl"


def code_version() -> dict[str, Any]:
    """The package version and, when the code sits in a git checkout, its commit and whether it is modified."""
    from importlib import metadata

    try:
        version = metadata.version("mgpo-pipeline")
    except metadata.PackageNotFoundError:
        version = None
    here = Path(__file__).resolve().parent
    out: dict[str, Any] = {"package": version, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        out.update(git_commit=commit, git_dirty=bool(status.strip()))
    except (OSError, subprocess.SubprocessError):
        pass  # not a checkout (installed wheel) or no git: the package version has to do
    return out


def _sample_line(row: DataRow, sha256: str | None) -> str:
    assert row.sample is not None
    d = row.sample.to_dict()
    if sha256 is not None:
        d["image_sha256"] = sha256
    return json.dumps(d, ensure_ascii=False) + "\n"


def build_report(
    dataset_hash: str,
    kept: int,
    drops: list[DataRow],
    inputs: list[dict[str, Any]],
    notes: dict[str, int],
    pass_rate: dict[str, Any] | None,
    timing: dict[str, float],
    eval_overlap: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Counts per reason, a few example rows per reason, and the check that every input row is accounted for.

    Raises:
        RuntimeError: the rows read differ from kept + dropped (a bug in the stage, never bad input).
    """
    n_in = sum(i["rows"] for i in inputs)
    if n_in != kept + len(drops):
        raise RuntimeError(f"filter stage lost rows: {n_in} read != {kept} kept + {len(drops)} dropped")
    by_reason = Counter(d.reason for d in drops)
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in drops:
        if len(examples[d.reason]) < EXAMPLES_PER_REASON:
            examples[d.reason].append(d.to_dict())
    return {
        "dataset_hash": dataset_hash,
        "counts": {"in": n_in, "kept": kept, "dropped": len(drops)},
        "dropped_by_reason": dict(by_reason.most_common()),
        "examples": {r: examples[r] for r, _ in by_reason.most_common()},
        "inputs": inputs,
        "notes": notes,
        "pass_rate": pass_rate,
        "eval_overlap": eval_overlap,
        "timing": timing,
    }


def render_report(report: dict[str, Any]) -> str:
    """The report as Markdown: totals, one line per drop reason with an example, notes, pass-rate histogram."""
    c = report["counts"]
    lines = [
        f"# Filter report: dataset {report['dataset_hash']}",
        "",
        f"**{c['in']}** rows in = **{c['kept']}** kept + **{c['dropped']}** dropped",
        "",
        "## Inputs",
        "",
    ]
    lines += [f"- `{i['path']}` ({i['format']}): {i['rows']} rows" for i in report["inputs"]]
    if report["dropped_by_reason"]:
        lines += ["", "## Dropped, by reason", "", "| reason | rows | example |", "|---|---:|---|"]
        for reason, n in report["dropped_by_reason"].items():
            ex = report["examples"][reason][0]
            text = f"`{ex['location']}`: {ex['detail']}".replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {reason} | {n} | {text[:300]} |")
    if report["notes"]:
        lines += ["", "## Kept with a note", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(report["notes"].items())]
    ov = report.get("eval_overlap")
    if ov:
        lines += ["", "## Evaluation overlap (rows dropped as eval_overlap, per benchmark)", ""]
        lines += [f"- {name}: {n}" for name, n in ov["per_benchmark"].items()]
        lines += [f"- {name}: not checked ({why})" for name, why in ov["not_checked"].items()]
    pr = report["pass_rate"]
    if pr:
        lines += [
            "",
            f"## Pass rate ({pr['n']} rollouts per prompt, kept range {pr['range']})",
            "",
            "| right | prompts |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v} |" for k, v in pr["histogram"].items()]
        lines.append(f"\n{pr['kept']} of {pr['prompts']} prompts kept in {pr['seconds']} s.")
    return "\n".join(lines) + "\n"


def _image_identity(path: str, sha256: str | None, state: Path) -> str:
    """What names an image in the dataset hash: its content digest when known, else its path relative to the
    state folder when it lies inside (generated data moves with the folder), else its absolute path."""
    if sha256 is not None:
        return f"sha256:{sha256}"
    p = Path(path).resolve()
    return f"state:{p.relative_to(state).as_posix()}" if p.is_relative_to(state) else f"path:{p}"


def dataset_content_hash(kept: list[tuple[DataRow, str | None]], state_dir: Path) -> str:
    """16 hex digits naming a dataset by its rows, independent of where the state folder lies: the same rows of
    the same images give the same hash after the folder is moved (``samples.jsonl`` itself keeps real paths)."""
    state = state_dir.resolve()
    h = hashlib.sha256()
    for row, sha in kept:
        assert row.sample is not None
        d = row.sample.to_dict()
        d["image_path"] = _image_identity(d["image_path"], sha, state)
        h.update((json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    return h.hexdigest()[:16]


def write_dataset(
    cfg: MGPOConfig,
    out_root: Path,
    *,
    kept: list[tuple[DataRow, str | None]],
    drops: list[DataRow],
    inputs: list[dict[str, Any]],
    notes: dict[str, int],
    pass_rate: dict[str, Any] | None,
    timing: dict[str, float],
    eval_overlap: dict[str, Any] | None = None,
    validation: list[tuple[DataRow, str | None]] | None = None,
) -> FilterResult:
    """Write the dataset directory atomically (an existing one with the same hash is replaced whole)."""
    from mgpo_core.config import config_hash

    data = "".join(_sample_line(row, sha) for row, sha in kept).encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()  # of the file as written (validation checks it)
    name = dataset_content_hash(kept, Path(cfg.state_dir))
    report = build_report(name, len(kept) + len(validation or []), drops, inputs, notes, pass_rate, timing,
                          eval_overlap)  # fmt: skip
    if validation:  # kept rows = training rows + the held-out validation rows; every input row accounted for
        report["counts"].update(train=len(kept), validation=len(validation))
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "dataset_hash": name,
        "samples_sha256": digest,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": {
            "samples": "samples.jsonl",
            "dropped": "dropped.jsonl",
            "report": "report.json",
            "report_markdown": "report.md",
            **({"validation": "validation.jsonl"} if validation else {}),
        },
        "validation_rows": len(validation or []),
        "counts": report["counts"],
        "inputs": inputs,
        "config_hash": config_hash(cfg),
        "config": {
            "data": cfg.data.model_dump(mode="json"),
            **(
                {"model": cfg.model.model_dump(mode="json"), "rollout": cfg.rollout.model_dump(mode="json")}
                if cfg.data.filters.pass_rate
                else {}
            ),
        },
        "code_version": code_version(),
    }
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "samples.jsonl").write_bytes(data)
        if validation:  # held out of training (data.validation_rows): what checkpoint selection scores
            (tmp / "validation.jsonl").write_text("".join(_sample_line(r, sha) for r, sha in validation),
                                                  encoding="utf-8")  # fmt: skip
        (tmp / "dropped.jsonl").write_text(
            "".join(json.dumps(d.to_dict(), ensure_ascii=False) + "\n" for d in drops), encoding="utf-8"
        )
        (tmp / "report.json").write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "report.md").write_text(render_report(report), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        final = out_root / name
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FilterResult(final, manifest, report)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (same content hash) is moved aside first, then deleted."""
    for _ in range(3):  # a concurrent writer of the same hash can re-create dst between our two renames
        old = None
        if dst.exists():
            old = dst.with_name(f".old-{dst.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                dst.rename(old)
            except FileNotFoundError:
                old = None
        try:
            src.rename(dst)
        except OSError:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            continue
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(f"could not move the new dataset into {dst} (another writer keeps replacing it)")
