"""Hugging Face ``generate`` rollout engine: the reference and fallback implementation of ``RolloutEngine``.

Batched, left-padded generation with both images' pixel values; M-RoPE positions come from the model's own rope
index (``mm_token_type_ids`` is passed — without it ``generate`` silently falls back to 1-D positions, a
train/rollout mismatch). Ids outside the text vocabulary (``<|image_pad|>`` & co.) are suppressed. The reported
log-probs are those of the distribution sampled from (temperature, suppression and top-p applied). Sampling uses
a forked RNG so rollouts never disturb the trainer's random state (exact resume depends on it).

No sampling default comes from the checkpoint. ``generate`` fills every setting the caller leaves unset from the
model's ``generation_config.json`` — and Qwen2.5-VL Instruct ships repetition_penalty 1.05, temperature 0.1,
top_p 0.001, top_k 1, which would make the sampled tokens come from another distribution than softmax(logits/T)
(the trainer's log-probs) and penalise "greedy" evaluation. So each call gets a complete `GenerationConfig` built
from our settings only (:func:`generation_config_for`), and the model's own config is swapped for that same
object for the duration of the call, so the merge inside ``generate`` has nothing of the checkpoint's to add.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from mgpo_core.episodes import PromptTemplates
from mgpo_core.modeling.loading import SpecialTokens
from mgpo_core.rollout.base import (
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    RolloutSettings,
    SamplingSpec,
)

#: Neutral values of every logits processor ``generate`` could otherwise take from a checkpoint's
#: ``generation_config.json`` (a None there means "unset", which ``generate`` fills from the model).
NEUTRAL_GENERATION = dict(
    num_beams=1,
    num_return_sequences=1,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    length_penalty=1.0,
    min_length=0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    renormalize_logits=False,
    remove_invalid_values=False,
)


def generation_config_for(
    spec: SamplingSpec, *, max_new_tokens: int, eos_id: int, pad_id: int, suppress: Sequence[int]
) -> GenerationConfig:
    """The whole generation config of one call, from our settings only (never the checkpoint's).

    Greedy: ``do_sample=False`` (argmax of the processed logits: only ``suppress`` applies). Sampling:
    temperature and top-p from ``spec``, top-k off (0), nothing else; the reported log-probs are then
    log softmax(logits / T) over the ids that can be sampled, what the trainer recomputes.
    """
    sampling = (
        dict(do_sample=False)
        if spec.greedy
        else dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0)
    )
    return GenerationConfig(
        **NEUTRAL_GENERATION,
        **sampling,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        suppress_tokens=list(suppress),
        return_dict_in_generate=True,
        output_scores=True,
        use_cache=True,
    )


@contextmanager
def _generation_config_swapped(model: torch.nn.Module, config: GenerationConfig) -> Iterator[None]:
    """``model.generation_config`` is ``config`` inside the block, the model's own again after it."""
    saved = getattr(model, "generation_config", None)
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


class HFRolloutEngine(RolloutEngine):
    """Rollouts with ``model.generate``; ``model`` may be the trainer's own module (then sync is a no-op)."""

    name = "hf"

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        special: SpecialTokens,
        templates: PromptTemplates,
        settings: RolloutSettings,
        *,
        batch_size: int = 16,
    ) -> None:
        super().__init__(tokenizer, image_processor, special, templates, settings)
        self.model = model
        self.batch_size = batch_size
        self._suppress = special.non_text_ids()

    @classmethod
    def for_bundle(cls, bundle, cfg, **kw) -> HFRolloutEngine:  # noqa: ANN001, ANN003 - ModelBundle, MGPOConfig
        """The engine on a loaded checkpoint with the config's prompt templates and rollout settings."""
        return cls(
            bundle.model,
            bundle.tokenizer,
            bundle.image_processor,
            bundle.special,
            PromptTemplates.from_config(cfg.rollout),
            RolloutSettings.from_config(cfg),
            **kw,
        )

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        missing = []
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = params.get(name)
                if target is None:
                    missing.append(name)
                    continue
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor.to(target.dtype))
        if missing:
            raise KeyError(
                f"sync_weights: {len(missing)} names unknown to the rollout model, e.g. {missing[:3]}"
            )

    @torch.no_grad()
    def _generate(
        self, requests: Sequence[GenerationRequest], spec: SamplingSpec, n: int
    ) -> list[list[GenerationResult]]:
        rows = [(i, r) for i, r in enumerate(requests) for _ in range(n)]
        flat: list[GenerationResult] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                if spec.seed is not None:
                    torch.manual_seed(spec.seed)
                for start in range(0, len(rows), self.batch_size):
                    flat.extend(
                        self._generate_rows([r for _, r in rows[start : start + self.batch_size]], spec)
                    )
        finally:
            self.model.train(was_training)
        out: list[list[GenerationResult]] = [[] for _ in requests]
        for (i, _), res in zip(rows, flat, strict=True):
            out[i].append(res)
        return out

    def _generate_rows(self, reqs: Sequence[GenerationRequest], spec: SamplingSpec) -> list[GenerationResult]:
        sp = self.special
        device = next(self.model.parameters()).device
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), sp.pad, dtype=torch.long)
        attn = torch.zeros((len(reqs), width), dtype=torch.long)
        for k, r in enumerate(reqs):  # left padding: generated tokens line up at the right edge
            ids[k, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attn[k, width - len(r.prompt_ids) :] = 1
        images = [im for r in reqs for im in r.images]
        max_new = max(r.max_new_tokens for r in reqs)
        kwargs = dict(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            mm_token_type_ids=(ids == sp.image_pad).to(torch.int32).to(device),
        )
        if images:
            dtype = next(self.model.parameters()).dtype
            kwargs["pixel_values"] = torch.cat([im.pixel_values for im in images]).to(device, dtype)
            kwargs["image_grid_thw"] = torch.stack([im.grid_thw for im in images]).to(device)
        config = generation_config_for(
            spec, max_new_tokens=max_new, eos_id=sp.im_end, pad_id=sp.pad, suppress=self._suppress
        )
        with _generation_config_swapped(self.model, config):
            out = self.model.generate(**kwargs, generation_config=config)
        new = out.sequences[:, width:].cpu()
        # Log-probs of the distribution each token was drawn from: the processed scores (suppressed ids at -inf,
        # divided by the temperature, top-p applied), normalised. With top_p = 1 this is exactly what the trainer
        # recomputes (softmax(logits / T) over the ids that can be sampled).
        scores = torch.stack(out.scores, dim=1).float().cpu() if out.scores else torch.empty(len(reqs), 0, 1)
        logp = torch.log_softmax(scores, dim=-1)
        results = []
        for k, r in enumerate(reqs):
            toks = new[k].tolist()
            stop = toks.index(sp.im_end) + 1 if sp.im_end in toks else len(toks)
            stop = min(stop, r.max_new_tokens)
            toks = toks[:stop]
            finish = "stop" if toks and toks[-1] == sp.im_end else "length"
            lps = (
                logp[k, torch.arange(len(toks)), torch.tensor(toks, dtype=torch.long)].tolist()
                if toks
                else []
            )
            results.append(GenerationResult(toks, lps, finish))
        return results
