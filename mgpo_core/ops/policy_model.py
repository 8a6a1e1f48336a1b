"""The registered policy as an MLflow pyfunc: one multiple-choice question about one image in, one letter out.

Logged as "models from code" (``policy_model_code.py`` is the model's code file; this module and the rest of
``mgpo_core`` travel with the model as ``code_paths``), so loading it unpickles nothing and works where a site
sets ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

A request row carries the image itself, ``image`` (bytes; base64 in JSON, as MLflow's scoring server expects for
a ``binary`` column), plus ``question`` and ``choices``. A path on the serving machine (``image_path``) is read
only when a root is configured (model config ``image_root`` or ``MGPO_SERVING_IMAGE_ROOT``) and the path
resolves inside it: otherwise a client could make the server read any file it can, and paths mean nothing
across machines anyway. Inference is MGPO's greedy two-turn inference with the HF engine.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

IMAGE_ROOT_ENV = "MGPO_SERVING_IMAGE_ROOT"
"""Folder under which request rows may name images by ``image_path`` (unset: paths are refused)."""

SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec(DataType.binary, "image", required=False),
        ColSpec(DataType.string, "image_path", required=False),
        ColSpec(DataType.string, "question"),
        # Any, not Array(string): MLflow turns an ``instances`` request's equal-length lists into a 2-D array that
        # its own Array check rejects; predict checks the list itself.
        ColSpec(AnyType(), "choices"),
    ]),
    outputs=Schema([ColSpec(DataType.string)]),
)


class RequestError(ValueError):
    """A request row the model cannot answer; the message names the row and the fix."""


def example_image_bytes() -> bytes:
    """A small PNG (a red square on grey) for the registered input example: built here, so no file is needed."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), (128, 128, 128))
    ImageDraw.Draw(img).rectangle((60, 20, 80, 40), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def input_example() -> Any:
    """The input example stored with the model (one row; MLflow writes it as a ``dataframe_split`` request)."""
    return pd.DataFrame([{
        "image": example_image_bytes(),
        "question": "What colour is the square?",
        "choices": ["red", "green", "blue", "yellow"],
    }])


def _rows(model_input: Any) -> list[dict[str, Any]]:
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict("records")
    if isinstance(model_input, dict):
        return [model_input]
    return list(model_input)


def _present(value: Any) -> bool:
    """False for a missing cell (None, NaN from a DataFrame whose other rows have the column)."""
    return value is not None and not (isinstance(value, float) and value != value)


def _looks_like_image(data: bytes) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def _image_bytes(value: Any, row: int) -> bytes:
    """The image file's bytes from what MLflow hands over: decoded bytes (``dataframe_*`` requests, Python
    callers), or still base64 (``instances`` requests, whose binary columns MLflow leaves encoded; text)."""
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if not isinstance(value, bytes | bytearray):
        raise RequestError(f"row {row}: 'image' is a {type(value).__name__}; send the image file's bytes "
                           "(base64-encoded in JSON)")
    data = bytes(value)
    if _looks_like_image(data):
        return data
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if decoded and _looks_like_image(decoded):
        return decoded
    raise RequestError(f"row {row}: 'image' is neither an image file nor base64 of one; send the file's bytes "
                       "(PNG, JPEG, ...) base64-encoded")


def _allowed_path(value: str, root: str | None, row: int) -> str:
    if not root:
        raise RequestError(
            f"row {row}: 'image_path' is refused: no image root is configured on this server; send the image "
            f"itself in 'image' (base64 bytes), or start the server with {IMAGE_ROOT_ENV}=<folder> to allow "
            "paths under that folder")
    base = Path(root).resolve()
    target = Path(base, value).resolve()  # symlinks and '..' followed first: the real place is what counts
    if not target.is_relative_to(base):  # checked before existence: nothing is said about files outside
        raise RequestError(f"row {row}: image_path {value!r} is not a file inside the configured image root "
                           f"({IMAGE_ROOT_ENV}); name a file under it, or send the image bytes in 'image'")
    if not target.is_file():
        raise RequestError(f"row {row}: image_path {value!r} is not a file inside the configured image root; "
                           "name an existing image file under it")
    return str(target)


class MGPOPolicyModel(mlflow.pyfunc.PythonModel):
    """An MGPO policy checkpoint answering multiple-choice questions about images (greedy, two turns).

    Input rows: ``image`` (bytes) or ``image_path`` (under the configured root), ``question``, ``choices``
    (list of strings). Output: one letter per row (``None`` when the reply holds no readable letter).
    """

    def load_context(self, context) -> None:  # noqa: ANN001
        self.model_dir = context.artifacts["hf_checkpoint"]
        config = getattr(context, "model_config", None) or {}
        self.image_root = config.get("image_root") or os.environ.get(IMAGE_ROOT_ENV)
        self._engine = None

    def _engine_for(self):  # noqa: ANN202
        if self._engine is None:
            from mgpo_core.config import load_config
            from mgpo_core.modeling.loading import load_bundle
            from mgpo_core.rollout.hf import HFRolloutEngine

            own = Path(self.model_dir) / "mgpo_config.yaml"  # the training run's prompts, written at export
            cfg = load_config(own if own.exists() else "tiny-cpu")
            self._engine = HFRolloutEngine.for_bundle(load_bundle(self.model_dir), cfg)
        return self._engine

    # ``pd.DataFrame``: what MLflow hands over under the declared column signature. A hint MLflow cannot infer a
    # signature from keeps request parsing on that signature (both JSON shapes) and stops its "add type hints" note.
    def predict(self, context, model_input: pd.DataFrame, params=None):  # noqa: ANN001, ANN201
        from mgpo_core.data.schema import LETTERS, Sample
        from mgpo_core.reward import last_boxed, normalize_choice

        rows = _rows(model_input)
        root = getattr(self, "image_root", None) or os.environ.get(IMAGE_ROOT_ENV)
        with tempfile.TemporaryDirectory(prefix="mgpo-request-") as tmp:
            samples = []
            for i, r in enumerate(rows):
                choices = r.get("choices")
                if (not _present(r.get("question")) or isinstance(choices, str | bytes)
                        or not hasattr(choices, "__len__") or len(choices) < 2):
                    raise RequestError(f"row {i}: needs 'question' (text) and 'choices' (a list of at least two "
                                       "strings)")
                if _present(r.get("image")):
                    path = Path(tmp, f"image-{i}")
                    path.write_bytes(_image_bytes(r["image"], i))
                    path = str(path)
                elif _present(r.get("image_path")):
                    path = _allowed_path(str(r["image_path"]), root, i)
                else:
                    raise RequestError(f"row {i}: no image: send the image file's bytes in 'image' (base64 in "
                                       "JSON)")
                samples.append(Sample(id=str(i), image_path=path, question=str(r["question"]),
                                      choices=tuple(str(c) for c in choices), answer=LETTERS[0]))
            episodes = self._engine_for().generate_episodes(samples, n=1, greedy=True)
        return [normalize_choice(last_boxed(ep.turn2_text) or "") for ep in episodes]
