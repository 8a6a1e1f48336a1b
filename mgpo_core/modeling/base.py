"""Build the tiny *base* Qwen2.5-VL: the random tiny architecture, pre-trained offline on synthetic tasks so it
has the latent skills MGPO starts from (it can box a described object and read a close-up), deterministically
from a seed, on a CPU.

The recipes are staged because a randomly initialised VLM mixed straight into long prompts learns formats but
not vision (docs/REPRODUCTION.md): the shipped grounding build first learns where things are (squares, then the
tag on small pictures, then full scenes); the default base, a child of it, then learns colours and reading from
close-ups while the vision side's output on whole scenes is held in place (``Stage.keep_vision``), then the
formats MGPO's turns meet. Progress is watched through held-out accuracies and the gap between the loss with
real and with zeroed pixels.

A recipe may extend another (``BaseRecipe.parent``): its build starts from the parent's model for the same
seed (the shipped copy, or built first into the same cache), rounded to bfloat16 exactly as a shipped copy is,
and runs only its own stages, so a recipe that adds a skill on top of the shipped grounding model costs minutes,
not the parent's half hour, and stays deterministic (the parent's recipe is part of its digest).

The result is an ordinary Hugging Face directory (loads through the stock ``Auto*`` classes and vLLM like the
random tiny model) with ``mgpo_base.json``: builder version, seed, recipe, per-stage probe metrics, build time.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mgpo_core.modeling import tiny
from mgpo_core.modeling.base_recipes import _SCENE_TASKS, DEFAULT_RECIPE, BaseRecipe, Stage
from mgpo_core.modeling.base_skills import skill_report
from mgpo_core.modeling.base_tasks import TASKS, ItemEncoder, PretrainItem, SceneSpec, make_item, make_scene

BASE_BUILDER_VERSION = "2"
"""Bumped whenever the built weights would change for the same recipe and seed (cache key, manifest)."""

MANIFEST = "mgpo_base.json"


def base_model_config(tokenizer: Any, recipe: BaseRecipe) -> Any:
    """The base model's ``Qwen2_5_VLConfig``: the tiny architecture, wider and deeper (~4 M parameters).

    Head dim 64 (vLLM's CPU attention needs one of its supported sizes); ``rope_theta`` 10 so neighbouring
    image rows and columns rotate measurably apart in M-RoPE (with Qwen's 1e6, columns differ by ~1e-4 rad).
    """
    heads = recipe.text_hidden // 64
    text = {
        "hidden_size": recipe.text_hidden,
        "intermediate_size": 2 * recipe.text_hidden,
        "num_hidden_layers": recipe.text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 64,
        # M-RoPE gives t the highest frequencies, then h, then w the lowest: a low theta and wide h/w sections
        # keep neighbouring image rows and columns apart by a measurable angle (~0.1-0.3 rad per step)
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": recipe.rope_theta,
            "mrope_section": list(recipe.mrope_section),
        },
    }
    vision = {
        "hidden_size": recipe.vision_hidden,
        "intermediate_size": 2 * recipe.vision_hidden,
        "depth": recipe.vision_depth,
        "num_heads": recipe.vision_hidden // 64,
        "out_hidden_size": recipe.text_hidden,
        "fullatt_block_indexes": list(range(1, recipe.vision_depth, 2)),
    }
    return tiny.model_config(tokenizer, text=text, vision=vision)


def collate(encoded: Sequence[dict[str, Any]], model: Any, pad_id: int, image_pad: int) -> dict[str, Any]:
    import torch

    from mgpo_core.logprobs import _rope_owner

    width = max(e["ids"].numel() for e in encoded)
    b = len(encoded)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = e["ids"].numel()
        ids[i, :n], attn[i, :n] = e["ids"], 1
        labels[i, e["prompt_len"] : n] = e["ids"][e["prompt_len"] :]
    mm = (ids == image_pad).to(torch.int32)
    grid = torch.cat([e["grid"] for e in encoded])
    with torch.no_grad():
        pos, _ = _rope_owner(model).get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=attn)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": pos,
        "mm_token_type_ids": mm,
        "pixel_values": torch.cat([e["pixels"] for e in encoded]),
        "image_grid_thw": grid,
        "labels": labels,
    }


def reply_loss(
    model: Any, batch: dict[str, Any], *, zero_pixels: bool = False, per_item: bool = False
) -> tuple[Any, Any]:
    """Mean next-token loss over reply tokens (``per_item``: each item's mean, then their mean) and per-item
    exact-match of the argmax (teacher-forced) replies."""
    import torch

    pv = batch["pixel_values"]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        pixel_values=torch.zeros_like(pv) if zero_pixels else pv,
        image_grid_thw=batch["image_grid_thw"],
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    mask = target != -100
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    if per_item:
        loss = ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        loss = (loss * mask).sum() / mask.sum()
    exact = ((logits.argmax(-1) == target) | ~mask).all(dim=1)
    return loss, exact


@dataclass
class _Pool:
    """Scenes drawn once and reused across steps (each use is a fresh item: other prompt, crop and options)."""

    spec: SceneSpec
    seed: int
    size: int
    scenes: list[Any] = field(default_factory=list)

    def fill(self, marks: Sequence[float]) -> None:
        self.scenes = [
            make_scene(f"mgpo-base:{self.seed}:{i}", self.spec, marks[i % len(marks)]) for i in range(self.size)
        ]


def _items(rng: random.Random, pool: _Pool, stage: Stage, n: int) -> list[PretrainItem]:
    tasks = list(stage.mix)
    weights = [stage.mix[t] for t in tasks]
    scenes = [s for s in pool.scenes if any(abs(s.mark_fraction - m) < 1e-9 for m in stage.marks)]
    if not scenes:
        raise ValueError(f"stage {stage.name!r} asks for marks {stage.marks}; the pool has none of them")
    real = [s for s in pool.scenes if abs(s.mark_fraction - pool.spec.mark_fraction) < 1e-9] or scenes
    items = []
    for _ in range(n):
        task = rng.choices(tasks, weights)[0]
        c0, r0, c1, r1 = stage.grids
        grid = (rng.randint(c0, c1), rng.randint(r0, r1)) if task in ("square", "spot") else (3, 3)
        if task == "square":
            scene = None
        elif task == "spot":
            plain = rng.random() < stage.plain
            scene = make_scene(rng, pool.spec, rng.choice(stage.marks), grid=grid, plain=plain, aligned=stage.aligned)
        elif task == "locate":  # always the real tag (a big mark makes it a coloured blob, not a white tag)
            scene = rng.choice(real)
        else:
            scene = rng.choice(scenes)
        items.append(
            make_item(task, scene, rng, pool.spec, long_system=stage.long_system, box_cells=stage.box_cells, grid=grid)
        )
    return items


def _probe(model: Any, encoder: ItemEncoder, probe_sets: dict[str, list[dict[str, Any]]], special: Any) -> dict[str, float]:
    """Held-out teacher-forced exact match per task and the real-vs-zeroed-pixel loss gap."""
    import torch

    model.eval()
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for task, enc in probe_sets.items():
            batch = collate(enc, model, special.pad, special.image_pad)
            loss, exact = reply_loss(model, batch)
            zloss, _ = reply_loss(model, batch, zero_pixels=True)
            metrics[f"{task}/exact"] = float(exact.float().mean())
            metrics[f"{task}/loss"] = loss.item()
            metrics[f"{task}/pixel_gap"] = float(zloss - loss)
    model.train()
    return metrics


def pretrain_base(
    out_dir: str | Path,
    *,
    seed: int = 0,
    recipe: BaseRecipe | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    snapshots: str | Path | None = None,
    start_stage: int = 0,
    parent_root: str | Path | None = None,
) -> Path:
    """Build and pre-train the base model into ``out_dir`` (must be empty or absent); returns the directory.

    ``snapshots``: a folder that receives the weights after every stage (``stage-<i>.pt``); with
    ``start_stage`` > 0 the build loads ``stage-<start_stage - 1>.pt`` from it and skips the earlier stages
    (for working on a recipe: a shipped build always runs every stage in one go). ``parent_root``: the cache
    folder for the parent recipe's model when it is not shipped (default: ``out_dir``'s parent).
    """
    import torch
    from tqdm import tqdm
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mgpo_core.modeling.loading import load_image_processor, special_tokens_from

    recipe = recipe or DEFAULT_RECIPE
    if recipe.parent is not None and recipe.parent.architecture() != recipe.architecture():
        raise ValueError(
            f"base recipe {recipe.name!r} has architecture {recipe.architecture()} but its parent "
            f"{recipe.parent.name!r} has {recipe.parent.architecture()}; a child recipe keeps its parent's sizes"
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"pretrain_base: {out} is not empty; choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    tokenizer = tiny.build_tokenizer()
    config = base_model_config(tokenizer, recipe)
    tokenizer.save_pretrained(out)
    for name, content in tiny.processor_files().items():
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(config.to_json_string())  # lets the processor loader see a checkpoint
    image_processor = load_image_processor(out)
    special = special_tokens_from(tokenizer, config.text_config.vocab_size)
    encoder = ItemEncoder(tokenizer, image_processor, special)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
        parent_dir = None
        if recipe.parent is not None:
            parent_dir = _load_parent(model, recipe, seed, Path(parent_root) if parent_root else out.parent,
                                      progress=progress, log=log)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        log(f"build-base: {n_params / 1e6:.2f} M parameters, {recipe.total_steps()} steps, recipe {recipe.digest()}"
            + (f", on top of {parent_dir}" if parent_dir else ""))

        pool = _Pool(recipe.scene, seed, recipe.scenes)
        t0 = time.monotonic()
        pool.fill(recipe.mark_levels)
        log(f"build-base: drew {len(pool.scenes)} scenes in {time.monotonic() - t0:.0f} s")
        held_out = _Pool(recipe.scene, seed + 10_000, 32)
        held_out.fill([recipe.scene.mark_fraction])
        prng = random.Random(f"mgpo-base-probe:{seed}")
        probe_sets = {
            task: [encoder.encode(make_item(task, sc, prng, recipe.scene, long_system=True)) for sc in held_out.scenes]
            for task in ("name", "read", "square", "locate", "ask", "read2")
        }
        # the tag alone on flat 5x5-token pictures: whether the square's position circuit carried over to the
        # tag (docs/REPRODUCTION.md: after colours-first its gap stayed at 0.000)
        probe_sets["spot5x5"] = [
            encoder.encode(
                make_item("spot", make_scene(prng, recipe.scene, grid=(5, 5), plain=True), prng, recipe.scene,
                          long_system=False)
            )
            for _ in range(32)
        ]
        # colour naming on the pool's biggest marks: where a colour's onset shows first (docs/REPRODUCTION.md)
        big = _Pool(recipe.scene, seed + 20_000, 32)
        big.fill([max(recipe.mark_levels)])
        probe_sets["name-big"] = [
            encoder.encode(make_item("name", sc, prng, recipe.scene, long_system=False)) for sc in big.scenes
        ]

        groups: dict[tuple[bool, bool], list[Any]] = {}
        for n, p in model.named_parameters():  # (vision side?, weight-decayed?)
            groups.setdefault(("visual" in n, p.ndim >= 2 and "embed" not in n), []).append(p)

        def make_optimizer() -> Any:
            return torch.optim.AdamW(
                [
                    {"params": ps, "weight_decay": recipe.weight_decay if wd else 0.0, "vision": vis}
                    for (vis, wd), ps in sorted(groups.items())
                ],
                lr=recipe.stages[0].lr,
                betas=(0.9, 0.98),
            )

        opt = make_optimizer()
        rng = random.Random(recipe.items_seed(seed))
        history: list[dict[str, Any]] = []
        bar = tqdm(total=recipe.total_steps(), desc="build-base", disable=not progress, dynamic_ncols=True)
        step = 0
        snap = Path(snapshots) if snapshots is not None else None
        if start_stage:
            if snap is None:
                raise ValueError("pretrain_base: start_stage needs the snapshots folder of an earlier build")
            model.load_state_dict(torch.load(snap / f"stage-{start_stage - 1}.pt", weights_only=True))
            step = sum(s.steps for s in recipe.stages[:start_stage])
            bar.update(step)
        for si, stage in enumerate(recipe.stages):
            if si < start_stage:
                continue
            if stage.restart:
                opt = make_optimizer()
                rng = random.Random(recipe.items_seed(seed, si))
            elif si == start_stage and si > 0:
                raise ValueError(f"pretrain_base: stage {si} ({stage.name!r}) has no restart point; resume at one")
            anchor = _frozen_copy(model.model.visual) if stage.keep_vision else None
            for k in range(stage.steps):
                # per-stage warmup, then constant (or cosine to 10 % of the stage's lr)
                frac = k / max(1, stage.steps)
                scale = min(1.0, (k + 1) / recipe.warmup_steps)
                if stage.decay:
                    scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
                vision_lr = stage.lr if stage.vision_lr is None else stage.vision_lr
                for g in opt.param_groups:
                    g["lr"] = (vision_lr if g["vision"] else stage.lr) * scale
                items = _items(rng, pool, stage, recipe.batch_size)
                encoded = [encoder.encode(it) for it in items]
                batch = collate(encoded, model, special.pad, special.image_pad)
                loss, _ = reply_loss(model, batch, per_item=stage.item_mean)
                if anchor is not None:
                    scenes = [e for it, e in zip(items, encoded, strict=True) if it.task in _SCENE_TASKS]
                    if scenes:
                        loss = loss + stage.keep_vision * _feature_drift(model.model.visual, anchor, scenes)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(stage=stage.name, loss=f"{loss.item():.3f}")
                if step % 50 == 0 or k == stage.steps - 1:
                    m = _probe(model, encoder, probe_sets, special)
                    history.append({"step": step, "stage": stage.name, "train_loss": loss.item(), **m})
                    log(
                        f"build-base: step {step} [{stage.name}] loss {loss.item():.3f} | "
                        + " ".join(f"{t} {m[f'{t}/exact']:.2f} (gap {m[f'{t}/pixel_gap']:.2f})" for t in probe_sets)
                    )
            if snap is not None:
                snap.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), snap / f"stage-{si}.pt")
        bar.close()

    model.eval()
    model.generation_config = tiny.greedy_generation_config(config)
    model.save_pretrained(out, safe_serialization=True)
    manifest = {
        "builder": "mgpo_core.modeling.base",
        "builder_version": BASE_BUILDER_VERSION,
        "seed": seed,
        "recipe": asdict(recipe),
        "recipe_digest": recipe.digest(),
        "parameters": n_params,
        "build_seconds": round(time.monotonic() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "history": history,
        "resumed_at_stage": start_stage,
        "tasks": list(TASKS),
    }
    if recipe.parent is not None:
        manifest["parent"] = {"name": recipe.parent.name, "recipe_digest": recipe.parent.digest(),
                              "path": parent_dir.name}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    log(f"build-base: done in {manifest['build_seconds']:.0f} s -> {out}")
    return out


def _frozen_copy(module: Any) -> Any:
    import copy

    twin = copy.deepcopy(module).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _feature_drift(visual: Any, anchor: Any, encoded: Sequence[dict[str, Any]]) -> Any:
    """Squared distance of ``visual``'s merged output from ``anchor``'s on these items' pictures, relative to
    the anchor features' mean square (scale-free: 0 when unchanged, 1 when as far as the features are big)."""
    import torch

    pixels = torch.cat([e["pixels"] for e in encoded])
    grid = torch.cat([e["grid"] for e in encoded])
    with torch.no_grad():
        ref = anchor(pixels, grid_thw=grid).pooler_output
    now = visual(pixels, grid_thw=grid).pooler_output
    return (now - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-12)


def _load_parent(model: Any, recipe: BaseRecipe, seed: int, root: Path, *, progress: bool, log: Callable) -> Path:
    """Load the parent recipe's model for ``seed`` into ``model``, rounded to bfloat16 (as shipped)."""
    import torch

    from mgpo_core.modeling.loading import load_model

    assert recipe.parent is not None
    path = base_model_for(root, seed, recipe=recipe.parent, progress=progress, log=log)
    weights = load_model(path, dtype="float32").state_dict()  # the stock loader maps the checkpoint's names
    model.load_state_dict({k: v.to(torch.bfloat16).to(torch.float32) for k, v in weights.items()}, strict=True)
    return path


def _complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def base_model_dir(cache_root: str | Path, seed: int = 0, recipe: BaseRecipe | None = None, **kw: Any) -> Path:
    """``<cache_root>/<recipe name>-qwen2.5-vl-<version>-<recipe digest>-seed<seed>``, pre-trained once if absent
    (a parent recipe's model first, into the same ``cache_root``, unless it is shipped).

    Built through :func:`~mgpo_core.modeling.tiny.build_atomically` (temporary sibling renamed into place under a
    lock: concurrent callers wait, then reuse it).
    """
    recipe = recipe or DEFAULT_RECIPE
    root = Path(cache_root).expanduser()
    final = root / f"{recipe.name}-qwen2.5-vl-{BASE_BUILDER_VERSION}-{recipe.digest()}-seed{seed}"

    def build(tmp: Path) -> None:
        shutil.rmtree(tmp)  # pretrain_base wants a fresh directory
        pretrain_base(tmp, seed=seed, recipe=recipe, parent_root=root, **kw)

    return tiny.build_atomically(final, build, is_complete=_complete)


SHIPPED_DIR = Path(__file__).with_name("weights")
"""Base models built once with the default recipe and committed with the project (see docs/REPRODUCTION.md)."""


def shipped_path(seed: int = 0, recipe: BaseRecipe | None = None) -> Path:
    """Where the shipped copy of ``recipe``'s model for ``seed`` lives (whether or not it exists)."""
    return SHIPPED_DIR / f"tiny-{(recipe or DEFAULT_RECIPE).name}-seed{seed}"


def shipped_base_dir(seed: int = 0, recipe: BaseRecipe | None = None) -> Path | None:
    """The committed base model for ``seed`` if it was built by this builder version and this recipe."""
    recipe = recipe or DEFAULT_RECIPE
    path = shipped_path(seed, recipe)
    try:
        note = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if note.get("builder_version") != BASE_BUILDER_VERSION or note.get("recipe_digest") != recipe.digest():
        return None
    return path if _complete(path) else None


def base_model_for(cache_root: str | Path, seed: int = 0, recipe: BaseRecipe | None = None, **kw: Any) -> Path:
    """The base model for ``seed``: the shipped one when it matches the recipe, else built and cached."""
    return shipped_base_dir(seed, recipe) or base_model_dir(cache_root, seed, recipe, **kw)


def export_shipped(src: str | Path, dst: str | Path) -> Path:
    """Copy a built base model to ``dst`` with bfloat16 weights (half the bytes in git) and record its skills.

    The skills in the copy's manifest are measured on the copy itself (the weights users load), so the skill
    floor test and the docs describe exactly what ships.
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    weights = tmp / "model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    note = json.loads((tmp / MANIFEST).read_text())
    note["shipped_dtype"] = "bfloat16"
    note["skills"] = skill_report(tmp)
    (tmp / MANIFEST).write_text(json.dumps(note, indent=2, sort_keys=True, default=str) + "\n")
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst
