"""Single-turn episodes: the GRPO baseline of the paper (one turn answering from the overview alone).

The paper's GRPO baseline was also asked for coordinates, in the same turn as the answer; nothing is cropped, so
the box (when there is one) only shows whether the model grounds. An episode is ``system + user(overview,
question, choices, instruction) + assistant(reply)``: the same :class:`~mgpo_core.episodes.Episode` structure
as MGPO's, with an empty turn 2, so the trainer, the loss mask and the metrics need no special case.
"""

from __future__ import annotations

from collections.abc import Sequence

from mgpo_core.data.schema import Sample
from mgpo_core.episodes import Episode, assemble_episode, encode_image
from mgpo_core.grounding import parse_grounding_box
from mgpo_core.imaging import open_image, resize_for_model
from mgpo_core.reward import answer_reward
from mgpo_core.rollout.base import GenerationRequest, RolloutEngine, SamplingSpec


def single_turn_prompt(engine: RolloutEngine, system_prompt: str, user_text: str, image_tokens: int) -> list[int]:
    """``<|im_start|>system…<|im_end|>\\n<|im_start|>user\\n<image>text<|im_end|>\\n<|im_start|>assistant\\n``."""
    b, s = engine.prompts, engine.special
    nl = b.text_ids("\n")
    system = [s.im_start, *b.text_ids("system\n"), *b.text_ids(system_prompt), s.im_end, *nl]
    body = b.image_ids(image_tokens) + b.text_ids(user_text)
    return system + [s.im_start, *b.text_ids("user\n"), *body, s.im_end, *nl] + b.assistant_header()


def generate_single_turn_episodes(
    engine: RolloutEngine,
    samples: Sequence[Sample],
    n: int,
    *,
    system_prompt: str,
    template: str,
    greedy: bool = False,
    seed: int | None = None,
) -> list[Episode]:
    """``n`` single-turn episodes per sample (``template`` is `str.format`-ed with {question} and {choices}).

    The reply's box is parsed with the rollout's grounding options (for the valid-box ratio); the reward is the
    answer reward of the reply.
    """
    from mgpo_core.data.schema import format_choices

    st = engine.settings
    requests, meta = [], []
    for s in samples:
        original = open_image(s.image_path, max_image_pixels=st.max_image_pixels)
        try:
            overview = resize_for_model(
                original, min_pixels=st.min_pixels, max_pixels=st.max_pixels, resample=st.overview_resample
            )
            orig_size = original.size
        finally:
            original.close()
        img = encode_image(engine.image_processor, overview)
        choices = f"{engine.prompts.templates.choices_header}\n{format_choices(s.choices)}"
        ids = single_turn_prompt(engine, system_prompt, template.format(question=s.question, choices=choices), img.n_tokens)
        requests.append(GenerationRequest(ids, [img], [overview], st.max_new_tokens_turn1))
        meta.append((ids, img, overview, orig_size))
    out = engine._generate(requests, SamplingSpec(st.max_new_tokens_turn1, st.temperature, st.top_p, greedy, seed), n)
    episodes = []
    for gi, (sample, (ids, img, overview, orig_size)) in enumerate(zip(samples, meta, strict=True)):
        for res in out[gi]:
            gen = list(res.token_ids)
            ended = bool(gen) and gen[-1] == engine.special.im_end
            text = engine.tokenizer.decode(gen[:-1] if ended else gen, skip_special_tokens=True)
            ep = assemble_episode(
                sample=sample,
                group=gi,
                special=engine.special,
                prompt1=ids,
                gen1=gen,
                gen1_logprobs=list(res.logprobs) if res.logprobs is not None else None,
                forced_end1=not ended,
                prompt2=[],
                gen2=[],
                gen2_logprobs=None,
                images=[img],
                max_total_len=len(ids) + st.max_response_tokens,
                turn1_text=text,
                turn2_text="",
                grounding=parse_grounding_box(text, overview.width, overview.height, st.grounding),
                crop_box=None,
                overview_size=overview.size,
                original_size=orig_size,
                crop_size=None,
                finish_reasons=(res.finish_reason, "none"),
                turns=1,
            )
            ep.reward = answer_reward([text], sample.answer)
            episodes.append(ep)
    return episodes
