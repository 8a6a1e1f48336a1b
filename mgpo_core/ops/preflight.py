"""Preflight: check in seconds, before any stage starts, what a multi-hour run would otherwise find out late.

``run_preflight(cfg, inputs)`` returns one :class:`Check` per concern, each ``ok``, ``warn`` or ``fail`` with
what was found, where, and the fix. ``mgpo run`` stops before the first stage when any check fails;
``mgpo preflight`` prints the table alone. The checks:

- ``model``: the model directory: config, every shard its index names, tokenizer, processor (an image
  processor class transformers does not know is named with its fix);
- ``attention``: the configured attention kernel can be used (flash-attn importable and a GPU present; else
  the fallback to SDPA is announced, see ``modeling.loading.resolve_attn_implementation``);
- ``vllm``: the installed vLLM is the version the engine is written for;
- ``devices``: visible GPUs >= ``deepspeed.num_gpus`` (CPU ranks under ``DS_ACCELERATOR=cpu``);
- ``hosts``: every hostfile host answers over SSH (batch mode, 10 s);
- ``benchmarks``: every configured benchmark's data is there and its first rows parse;
- ``training data``: a real model is given training data (or synthetic data is explicitly allowed);
- ``overlap``: training rows that are also evaluation questions (they will be dropped as ``eval_overlap``);
- ``disk``: free space for the checkpoints the run keeps;
- ``tracking``: the MLflow store answers and takes a write;
- ``memory``: vLLM's share of each GPU holds the weights with room for its KV cache, and the rest holds the
  trainer's ZeRO shard.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mgpo_core.rollout.vllm_version import SUPPORTED_VLLM

Status = Literal["ok", "warn", "fail"]



@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[self.status]
        return f"  {mark} {self.name:<14} {self.detail}" + (f"\n       fix: {self.fix}" if self.fix else "")


class PreflightFailed(RuntimeError):
    """At least one preflight check failed; ``checks`` holds them all."""

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = list(checks)
        failed = [c for c in checks if c.status == "fail"]
        super().__init__(
            f"preflight: {len(failed)} check(s) failed, nothing was started:\n"
            + "\n".join(c.line() for c in failed)
        )


# ---------------------------------------------------------------------------------------------- model files
def check_model_dir(path: str | Path | None) -> Check:
    """Config, weights (every shard the index names), tokenizer and processor of a local HF directory."""
    if path is None:
        return Check("model", "ok", "the offline tiny model (built or shipped locally)")
    d = Path(path)
    if not d.is_dir():
        return Check("model", "fail", f"model.path {str(d)!r} is not a directory",
                     "download the checkpoint to a local folder and set model.path (or MGPO_MODEL_DIR) to it")  # fmt: skip
    problems = []
    if not (d / "config.json").is_file():
        problems.append("no config.json")
    indexes = list(d.glob("*.safetensors.index.json")) + list(d.glob("*.bin.index.json"))
    shards: set[str] = set()
    for index in indexes:
        try:
            shards |= set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{index.name} is unreadable ({e})")
    missing = sorted(s for s in shards if not (d / s).is_file())
    if missing:
        problems.append(f"the index names {len(missing)} missing shard(s), e.g. {missing[0]}")
    if not shards and not list(d.glob("*.safetensors")) and not list(d.glob("*.bin")):
        problems.append("no weights (*.safetensors)")
    if not ((d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()):
        problems.append("no tokenizer (tokenizer.json)")
    pre = d / "preprocessor_config.json"
    if not pre.is_file():
        problems.append("no preprocessor_config.json")
    else:
        kind = json.loads(pre.read_text()).get("image_processor_type")
        if kind == "Qwen2_5_VLImageProcessor":
            problems.append("preprocessor_config.json names Qwen2_5_VLImageProcessor, a class transformers 5 "
                            "no longer has (set image_processor_type to Qwen2VLImageProcessor)")  # fmt: skip
    if problems:
        return Check("model", "fail", f"{d}: " + "; ".join(problems),
                     "re-download the missing files (every file of the model repository) into model.path")  # fmt: skip
    size = sum((d / s).stat().st_size for s in shards) if shards else sum(f.stat().st_size for f in d.glob("*.safetensors"))
    n = len(shards) or len(list(d.glob("*.safetensors")))
    return Check("model", "ok", f"{d}: {n} weight file(s), {size / 2**30:.2f} GiB, tokenizer and processor present")


def check_attention(cfg: Any, *, cuda: bool | None = None) -> Check:
    from mgpo_core.modeling.loading import flash_attn_available

    want = cfg.model.attn_implementation
    if want != "flash_attention_2":
        return Check("attention", "ok", f"{want}")
    cuda = _cuda_available() if cuda is None else cuda
    if flash_attn_available() and cuda:
        return Check("attention", "ok", "flash_attention_2 (flash-attn importable, CUDA present)")
    why = "flash-attn is not installed" if not flash_attn_available() else "no CUDA device"
    return Check("attention", "warn", f"flash_attention_2 asked for but {why}: the model loads with SDPA instead "
                 "(PyTorch's SDPA runs a FlashAttention kernel itself on recent GPUs)",
                 "pip install flash-attn (built for this torch) to use it, or set model.attn_implementation=sdpa")  # fmt: skip


def check_vllm(cfg: Any, *, version: str | None = None) -> Check:
    if cfg.rollout.engine == "hf":
        return Check("vllm", "ok", "not used (rollout.engine=hf)")
    if version is None:
        try:
            import vllm

            version = str(vllm.__version__)
        except ImportError:
            if cfg.rollout.engine == "vllm":
                return Check("vllm", "fail", "rollout.engine=vllm but vLLM is not importable",
                             "install the project's GPU extra (pip install -e .[gpu]) or set rollout.engine=hf")  # fmt: skip
            return Check("vllm", "warn", "vLLM is not importable: rollouts use HF generate (slow)")
    if not (version == SUPPORTED_VLLM or version.startswith(SUPPORTED_VLLM + ".")):
        return Check("vllm", "fail", f"vLLM {version} is installed; the engine is written for {SUPPORTED_VLLM}.x "
                     "(logprobs_mode, reload_weights, sleep/wake return values)",
                     f"pip install 'vllm=={SUPPORTED_VLLM}.*' (the [gpu] extra pins it)")  # fmt: skip
    return Check("vllm", "ok", f"vLLM {version}")


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def check_devices(cfg: Any, *, gpu_count: Callable[[], int] | None = None) -> Check:
    want = cfg.deepspeed.num_gpus if cfg.deepspeed.launcher != "python" else 1
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return Check("devices", "ok", f"{want} CPU rank(s) (DS_ACCELERATOR=cpu)")
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count
    have = gpu_count()
    if have == 0:
        if cfg.deepspeed.bf16:  # a GPU recipe (bf16, flash attention) on a machine without one
            return Check("devices", "fail", f"no GPU is visible; the config is a GPU recipe (deepspeed.bf16) "
                         f"starting {want} rank(s) per node",
                         "run on a GPU node, or set DS_ACCELERATOR=cpu to run it on CPU ranks on purpose "
                         "(the rehearsal-7b preset is the recipe at CPU scale)")  # fmt: skip
        return Check("devices", "ok", f"no GPU visible: {want} CPU rank(s)")
    if have < want:
        return Check("devices", "fail", f"{have} GPU(s) visible, deepspeed.num_gpus={want}",
                     f"set deepspeed.num_gpus={have} or CUDA_VISIBLE_DEVICES to show {want}")  # fmt: skip
    return Check("devices", "ok", f"{have} GPU(s) visible, {want} rank(s) per node")


def hostfile_hosts(path: str | Path) -> list[str]:
    hosts = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    return hosts


def check_hosts(cfg: Any, *, runner: Callable[[list[str]], int] | None = None) -> Check:
    hf = cfg.deepspeed.hostfile
    if not hf:
        return Check("hosts", "ok", "single node (no hostfile)")
    if not Path(hf).is_file():
        return Check("hosts", "fail", f"deepspeed.hostfile {hf!r} does not exist", "write the hostfile or fix the path")
    hosts = hostfile_hosts(hf)

    def ssh(host: str) -> int:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        if cfg.deepspeed.ssh_port:
            cmd += ["-p", str(cfg.deepspeed.ssh_port)]
        cmd += ["--", host, "true"]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=20).returncode
        except (OSError, subprocess.TimeoutExpired):
            return 255

    run = runner or (lambda argv: ssh(argv[0]))
    down = [h for h in hosts if run([h]) != 0]
    if down:
        return Check("hosts", "fail", f"{len(down)} of {len(hosts)} hostfile host(s) do not answer over SSH: {down}",
                     "check the host names, keys (ssh-copy-id) and deepspeed.ssh_port; `ssh -o BatchMode=yes HOST "
                     "true` must succeed from this node")  # fmt: skip
    return Check("hosts", "ok", f"{len(hosts)} host(s) answer over SSH")


# -------------------------------------------------------------------------------------------------- data
def benchmark_data_path(cfg: Any, name: str, eval_path: str | None = None) -> str | None:
    return cfg.evaluation.data_paths.get(name) or (eval_path if name == "synthetic" else None)


def check_benchmarks(cfg: Any, *, eval_path: str | None = None, rows: int = 3) -> Check:
    from mgpo_core.data.readers import read_rows
    from mgpo_core.evaluation.benchmarks import get_benchmark, rows_context

    bad, good = [], []
    for name in cfg.evaluation.benchmarks:
        try:
            spec = get_benchmark(name)
        except (KeyError, ValueError) as e:
            bad.append(f"{name}: {e}")
            continue
        path = benchmark_data_path(cfg, name, eval_path)
        if path is None:
            if spec.needs_data:
                bad.append(f"{name}: no data path ({spec.data_hint}); set evaluation.data_paths.{name}")
            else:
                good.append(f"{name} (generated)")
            continue
        if not Path(path).exists():
            bad.append(f"{name}: {path} does not exist")
            continue
        got, reasons = 0, []
        try:
            ctx = rows_context(cfg, Path(path), cfg.evaluation.image_roots.get(name))  # paths contained as in eval
            for row in read_rows(path, "auto", ctx=ctx):
                if row.sample is not None:
                    got += 1
                else:
                    reasons.append(f"{row.location}: {row.reason}")
                if got >= rows or len(reasons) >= rows:
                    break
        except (ValueError, OSError) as e:
            bad.append(f"{name}: {path} cannot be read ({e})")
            continue
        if got == 0:
            bad.append(f"{name}: the first rows of {path} do not parse ({'; '.join(reasons) or 'no rows'})")
        else:
            good.append(name)
    if bad:
        return Check("benchmarks", "fail", "; ".join(bad),
                     "give each benchmark's published file or folder in evaluation.data_paths (docs/USER_GUIDE.md, "
                     "'Benchmarks'), or drop it from evaluation.benchmarks")  # fmt: skip
    return Check("benchmarks", "ok", f"data present and parsing: {', '.join(good)}")


def check_training_data(cfg: Any, inputs: Sequence[str]) -> Check:
    if inputs:
        missing = [p for p in inputs if not Path(p).exists()]
        if missing:
            return Check("training data", "fail", f"--input {missing[0]} does not exist", "fix the path")
        return Check("training data", "ok", f"{len(inputs)} input(s): {', '.join(str(p) for p in inputs)}")
    if cfg.data.train_path:
        return Check("training data", "ok", f"data.train_path {cfg.data.train_path}")
    if cfg.model.path and not getattr(cfg.data, "allow_synthetic", False):
        return Check("training data", "fail", "a real model (model.path) with no training data: the run would "
                     "train on the small synthetic set",
                     "pass --input <MME-RealWorld JSON> (or data.train_path=...), or set data.allow_synthetic=true "
                     "if the synthetic set is what you mean")  # fmt: skip
    return Check("training data", "ok", "the synthetic set (generated)")


def check_overlap(cfg: Any, inputs: Sequence[str]) -> Check:
    try:
        from mgpo_core.data.decontaminate import overlap_report  # issue 25's decontamination
    except ImportError:
        return Check("overlap", "warn", "decontamination is not available in this version")
    if not inputs:
        return Check("overlap", "ok", "no training inputs to compare")
    try:
        counts = overlap_report(cfg, inputs)
    except (ValueError, OSError) as e:
        return Check("overlap", "warn", f"could not compare training and evaluation data ({e})")
    total = sum(counts.values())
    if total:
        per = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
        return Check("overlap", "warn", f"{total} training row(s) are evaluation questions ({per}): the filter "
                     "stage drops them as eval_overlap")  # fmt: skip
    return Check("overlap", "ok", "no training row is an evaluation question")


# ------------------------------------------------------------------------------------------- resources
def model_parameters(path: str | Path | None) -> int | None:
    """Parameter count from the weight index's total size and the config's dtype (None when unknown)."""
    if path is None:
        return None
    d = Path(path)
    index = next(iter(d.glob("*.safetensors.index.json")), None)
    if index is not None:
        total = int(json.loads(index.read_text()).get("metadata", {}).get("total_size", 0))
    else:
        total = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    if not total:
        return None
    try:
        conf = json.loads((d / "config.json").read_text())
        dtype = conf.get("dtype") or conf.get("torch_dtype") or "bfloat16"
    except (OSError, ValueError):
        dtype = "bfloat16"
    return total // (4 if dtype == "float32" else 2)


def checkpoints_kept(cfg: Any) -> int:
    c = cfg.checkpoint
    kept = c.keep_last
    if c.select_every:
        kept += cfg.algorithm.total_steps // c.select_every
    return kept


def check_disk(cfg: Any, *, free_bytes: int | None = None) -> Check:
    params = model_parameters(cfg.model.path)
    if params is None:
        return Check("disk", "ok", "tiny model: checkpoints take megabytes")
    # A DeepSpeed checkpoint: the weights (2 B bf16 / 4 B fp32), an fp32 master copy under bf16 (4 B), AdamW's
    # two fp32 moments (8 B); checkpoint selection also exports each kept one as an HF directory (the weights).
    weight_b = 2 if cfg.deepspeed.bf16 else 4
    per_ckpt = params * (weight_b + (4 if cfg.deepspeed.bf16 else 0) + 8 + weight_b)
    need = per_ckpt * checkpoints_kept(cfg)
    state = Path(cfg.state_dir)
    probe = state if state.exists() else next((p for p in state.resolve().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free if free_bytes is None else free_bytes
    gib = 2**30
    if free < need:
        return Check("disk", "fail", f"{free / gib:.1f} GiB free under {probe}; the run keeps "
                     f"{checkpoints_kept(cfg)} checkpoint(s) of ~{per_ckpt / gib:.1f} GiB ({need / gib:.1f} GiB)",
                     "free space, point state_dir at a larger disk, or lower checkpoint.keep_last / raise "
                     "checkpoint.select_every")  # fmt: skip
    return Check("disk", "ok", f"{free / gib:.1f} GiB free, the checkpoints need ~{need / gib:.1f} GiB")


def check_tracking(cfg: Any) -> Check:
    from mgpo_core.config.secrets import redact
    from mgpo_core.ops.tracking import tracking_uri_for

    uri = tracking_uri_for(cfg)
    shown = redact(uri)
    # Seconds, not MLflow's minutes of retries with back-off: an unreachable store is the finding.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    import logging

    import mlflow  # noqa: F401 - configures its loggers on import: quiet them after that

    quiet = logging.getLogger("mlflow")  # "Creating initial MLflow database tables" is no news on the console
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
        if exp is None:
            from mgpo_core.ops.tracking import artifact_root

            exp_id = client.create_experiment(cfg.tracking.experiment_name,
                                              artifact_location=artifact_root(cfg.state_dir, uri))  # fmt: skip
        else:
            exp_id = exp.experiment_id
        client.set_experiment_tag(exp_id, "mgpo.preflight", "ok")
    except Exception as e:  # noqa: BLE001 - any failure to reach or write the store is the finding
        return Check("tracking", "fail", f"the MLflow store {shown} cannot be reached or written: "
                     f"{type(e).__name__}: {redact(str(e))[:300]}",
                     "start it (mgpo servers up), fix tracking.mlflow_tracking_uri, or check its credentials")  # fmt: skip
    finally:
        quiet.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Check("tracking", "ok", f"MLflow store {shown} answers and takes writes")


def check_memory(cfg: Any, *, gpu_bytes: int | None = None) -> Check:
    """vLLM's share holds the bf16 weights plus a KV cache; the rest holds the ZeRO shard of the trainer."""
    if cfg.rollout.engine == "hf" or os.environ.get("DS_ACCELERATOR") == "cpu" or (
        gpu_bytes is None and not _cuda_available()
    ):
        return Check("memory", "ok", "CPU run: vLLM's KV cache is sized explicitly")
    params = model_parameters(cfg.model.path)
    if params is None:
        return Check("memory", "ok", "tiny model")
    if gpu_bytes is None:
        import torch

        gpu_bytes = int(torch.cuda.get_device_properties(0).total_memory)
    util = cfg.rollout.gpu_memory_utilization
    tp = cfg.rollout.tensor_parallel_size
    weights = 2 * params / tp
    vllm_share = util * gpu_bytes
    world = cfg.deepspeed.num_gpus
    # ZeRO-3: bf16 weights + grads + fp32 master + AdamW moments (16 B/param) sharded over the ranks; the
    # reference model's bf16 weights sharded too; plus activations (not estimated).
    stage = cfg.deepspeed.zero_stage
    per_param = {3: 16 / world, 2: 4 + 12 / world, 1: 4 + 12 / world, 0: 16}[stage]
    ref = (2 / world if stage == 3 else 2) * params if cfg.algorithm.kl_coef > 0 else 0
    trainer = params * per_param + ref
    rest = (1 - util) * gpu_bytes
    gib = 2**30
    detail = (f"vLLM {util:.0%} = {vllm_share / gib:.1f} GiB for {weights / gib:.1f} GiB of weights; trainer "
              f"{rest / gib:.1f} GiB for ~{trainer / gib:.1f} GiB of ZeRO-{stage} states")  # fmt: skip
    if vllm_share < 1.2 * weights:
        return Check("memory", "fail", detail + ": no room for vLLM's KV cache",
                     "raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size")
    if rest < trainer:
        return Check("memory", "fail", detail + ": the trainer's states do not fit beside vLLM",
                     "lower rollout.gpu_memory_utilization, use ZeRO-3 / offload, or more GPUs")
    return Check("memory", "ok", detail)


def run_preflight(
    cfg: Any, inputs: Sequence[str] = (), *, eval_path: str | None = None, skip: Sequence[str] = ()
) -> list[Check]:
    """All checks, in the order above; ``skip`` names checks not to run (e.g. ``hosts`` in a test)."""
    from mgpo_core.modeling.source import is_registry_uri, model_dir_for

    if is_registry_uri(cfg.model.path):  # a registered version (models:/...): check the checkpoint it resolves to
        try:
            local = str(model_dir_for(cfg))
        except ValueError as exc:
            return [Check("model", "fail", str(exc), "name an existing registered version, or a local directory")]
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": local})})
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("model", lambda: check_model_dir(cfg.model.path)),
        ("attention", lambda: check_attention(cfg)),
        ("vllm", lambda: check_vllm(cfg)),
        ("devices", lambda: check_devices(cfg)),
        ("hosts", lambda: check_hosts(cfg)),
        ("benchmarks", lambda: check_benchmarks(cfg, eval_path=eval_path)),
        ("training data", lambda: check_training_data(cfg, inputs)),
        ("overlap", lambda: check_overlap(cfg, inputs)),
        ("disk", lambda: check_disk(cfg)),
        ("tracking", lambda: check_tracking(cfg)),
        ("memory", lambda: check_memory(cfg)),
    ]
    return [fn() for name, fn in checks if name not in skip]


def require_preflight(cfg: Any, inputs: Sequence[str] = (), **kw: Any) -> list[Check]:
    """``run_preflight``, raising :class:`PreflightFailed` when a check failed."""
    checks = run_preflight(cfg, inputs, **kw)
    if any(c.status == "fail" for c in checks):
        raise PreflightFailed(checks)
    return checks
