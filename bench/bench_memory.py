"""Peak memory of one update micro-batch (forward + backward) at Qwen2.5-VL-7B's real vocabulary and hidden size.

Usage: ``.venv/bin/python bench/bench_memory.py [--lengths 4096 12288] [--impls before after] [--layers 2]
[--limit-gb 15] [--out r.json]``. Each (length, implementation) case runs in a fresh child process; the child's
``ru_maxrss`` is the case's peak. Prints a Markdown table.

The model: a randomly initialised ``Qwen2_5_VLForConditionalGeneration`` with the 7B's text sizes (vocabulary
152,064 rows, hidden 3584, MLP 18,944, 28 heads / 4 KV heads, untied LM head) but only ``--layers`` decoder
layers, and a one-block vision tower (its cost is not what is measured), bf16 weights (the paper trains in bf16),
gradient checkpointing on (as in the recipe). One episode per micro-batch: two images of 1296 visual tokens each
(a 1008×1008 overview and its crop), text prompt, and two assistant turns that together make ~10 % of the tokens.
The loss is the trainer's ``mgpo_loss`` (PPO clip, k3 KL, entropy bonus) over the loss mask.

- ``before``: the log-prob code of commit 3be7a12: the LM head and the log-softmax over EVERY position, in chunks of
  1024 positions (under autograd every chunk's float32 logits and log-softmax stay alive for the backward).
- ``after``: ``mgpo_core.logprobs.token_logprobs``: head and log-softmax at the loss positions only, in
  checkpointed chunks.

``minimum`` is what any implementation must hold: bf16 weights and their bf16 gradients, the hidden states that
gradient checkpointing keeps (one (L, H) bf16 tensor per layer boundary), and ONE float32 row of V logits per
loss position (the log-softmax the loss needs), plus the process's own baseline (the interpreter, torch and the
model's buffers, measured in the child before the forward). ``--limit-gb`` caps each child's data segment
(``RLIMIT_DATA``) so a case that would exhaust a shared machine fails with an out-of-memory error instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB, HIDDEN, MLP, HEADS, KV_HEADS = 152_064, 3584, 18_944, 28, 4
IMAGE_TOKENS = 1296  # 1008×1008 pixels at 28 px per visual token
PAD, IM_END, VISION_START, VISION_END, IMAGE_PAD = 151_643, 151_645, 151_652, 151_653, 151_655


def _model(layers: int):  # noqa: ANN202
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": MLP,
            "num_hidden_layers": layers,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [0],
        },
        image_token_id=IMAGE_PAD,
        video_token_id=151_656,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )
    cfg.text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy of the weights ever exists
    try:
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _episode(length: int, model, image_tokens: int = IMAGE_TOKENS):  # noqa: ANN001, ANN202
    """One two-turn episode of ``length`` tokens as an ``EpisodeBatch``; responses are ~10 % of it."""
    import torch

    from mgpo_core.logprobs import EpisodeBatch, _rope_owner

    g = torch.Generator().manual_seed(length)
    resp = length // 10
    r1, r2 = resp // 4, resp - resp // 4
    per_side = int(image_tokens**0.5)
    image_tokens = per_side * per_side
    side = per_side * 2  # patches per side (merge 2)
    image = [VISION_START] + [IMAGE_PAD] * image_tokens + [VISION_END]
    text_budget = length - resp - 2 * len(image) - 2
    p1, p2 = text_budget // 3, text_budget - text_budget // 3

    def text(n: int) -> list[int]:
        return torch.randint(0, 150_000, (n,), generator=g).tolist()

    parts = [
        (image + text(p1), 0.0),
        (text(r1 - 1) + [IM_END], 1.0),
        (text(1) + image + text(p2), 0.0),
        (text(r2 - 1) + [IM_END], 1.0),
    ]
    ids = [t for toks, _ in parts for t in toks]
    mask = [m for toks, m in parts for _ in toks]
    ids, mask = ids[:length], mask[:length]
    input_ids = torch.tensor([ids])
    mm = (input_ids == IMAGE_PAD).to(torch.int32)
    grid = torch.tensor([[1, side, side]] * 2)
    patches = int(grid.prod(-1).sum())
    pixels = torch.randn(patches, 3 * 2 * 14 * 14, generator=g).to(torch.bfloat16)
    attn = torch.ones_like(input_ids)
    with torch.no_grad():
        pos, _ = _rope_owner(model).get_rope_index(
            input_ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=attn
        )
    return EpisodeBatch(input_ids, attn, torch.tensor([mask]), mm, pos, pixels, grid)


def old_token_logprobs(model, batch, *, with_entropy: bool = False, chunk_size: int = 1024):  # noqa: ANN001, ANN201
    """The log-prob code before this bench (commit 3be7a12): head + log-softmax over every position."""
    import torch

    from mgpo_core.logprobs import entropy_from_logits, forward_hidden, logprobs_from_logits

    head = model.lm_head
    hidden = forward_hidden(model, batch)
    b, length, _ = hidden.shape
    lps, ents = [], []
    for start in range(0, length - 1, chunk_size):
        stop = min(start + chunk_size + 1, length)
        logits = head(hidden[:, start:stop])
        lps.append(logprobs_from_logits(logits, batch.input_ids[:, start:stop])[:, 1:])
        if with_entropy:
            ents.append(entropy_from_logits(logits)[:, 1:])
    zero = hidden.new_zeros((b, 1), dtype=torch.float32)
    logp = torch.cat([zero, *lps], dim=1) * batch.loss_mask
    ent = torch.cat([zero, *ents], dim=1) * batch.loss_mask if with_entropy else None
    return logp, ent


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset the RSS high-water mark (VmHWM) so the peak is the micro-batch's, not the model build's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mb("VmHWM") <= _status_mb("VmRSS") + 1


def child(length: int, impl: str, layers: int, image_tokens: int = IMAGE_TOKENS) -> dict:
    import torch

    from mgpo_core.algorithms import LossCoefficients, mgpo_loss
    from mgpo_core.logprobs import token_logprobs

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = _model(layers)
    batch = _episode(length, model, image_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    baseline_mb = _status_mb("VmRSS")
    reset = _reset_peak()
    fn = old_token_logprobs if impl == "before" else token_logprobs
    t0 = time.perf_counter()
    logp, ent = fn(model, batch, with_entropy=True)
    with torch.no_grad():
        old = logp.detach()
    loss, _ = mgpo_loss(logp, old, old, torch.tensor([1.0]), batch.loss_mask, ent, LossCoefficients())
    loss.backward()
    seconds = time.perf_counter() - t0
    n_loss = int((batch.loss_mask[:, 1:] > 0).sum())
    grads_ok = all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.language_model.parameters()
    )
    return {
        "length": length,
        "impl": impl,
        "layers": layers,
        "image_tokens": int((batch.input_ids == IMAGE_PAD).sum()),
        "params": n_params,
        "loss_positions": n_loss,
        "peak_rss_mb": _status_mb("VmHWM")
        if reset
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_is_microbatch_only": reset,
        "baseline_mb": baseline_mb,
        "seconds": seconds,
        "grads_finite": bool(grads_ok),
    }


def minimum_mb(r: dict) -> float:
    """Baseline (process + bf16 weights, measured) + bf16 grads + checkpointed hidden states + one fp32 row per
    loss position."""
    grads = r["params"] * 2
    checkpointed_hidden = (r["layers"] + 1) * r["length"] * HIDDEN * 2
    loss_rows = r["loss_positions"] * VOCAB * 4
    return r["baseline_mb"] + (grads + checkpointed_hidden + loss_rows) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 12288])
    ap.add_argument("--impls", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--image-tokens", type=int, default=IMAGE_TOKENS, help="visual tokens per image (2 images)"
    )
    ap.add_argument("--limit-gb", type=float, default=15.0)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--child", nargs=4, metavar=("LENGTH", "IMPL", "LAYERS", "IMAGE_TOKENS"), help=argparse.SUPPRESS
    )
    a = ap.parse_args()
    if a.child:
        length, impl, layers, image_tokens = a.child
        print("RESULT " + json.dumps(child(int(length), impl, int(layers), int(image_tokens))), flush=True)
        return 0
    rows = []
    for length in a.lengths:
        for impl in a.impls:
            limit = int(a.limit_gb * 2**30)

            def cap(limit: int = limit) -> None:
                resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

            p = subprocess.run(
                [sys.executable, __file__, "--child", str(length), impl, str(a.layers), str(a.image_tokens)],
                capture_output=True,
                text=True,
                preexec_fn=cap,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                tail = (p.stderr or p.stdout)[-400:].replace("\n", " ")
                oom = (
                    "out of memory" in tail.lower()
                    or "memoryerror" in tail.lower()
                    or "alloc" in tail.lower()
                )
                rows.append({"length": length, "impl": impl, "failed": "out of memory" if oom else tail})
                print(f"{length} {impl}: FAILED ({rows[-1]['failed']})", flush=True)
                continue
            r = json.loads(line[len("RESULT ") :])
            r["minimum_mb"] = minimum_mb(r)
            rows.append(r)
            print(f"{length} {impl}: peak {r['peak_rss_mb']:.0f} MB in {r['seconds']:.0f} s", flush=True)
    print(
        "\n| tokens | loss positions | implementation | RSS before (MB) | peak RSS (MB) | minimum (MB) | fwd+bwd (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(
                f"| {r['length']} | | {r['impl']} | | failed under the {a.limit_gb:g} GB cap: {r['failed']} | | |"
            )
        else:
            print(
                f"| {r['length']} | {r['loss_positions']} | {r['impl']} | {r['baseline_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['minimum_mb']:.0f} | {r['seconds']:.0f} |"
            )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
