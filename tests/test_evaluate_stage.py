"""The evaluate stage end to end on the tiny run (base vs SFT when no policy exists), and its helpers."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from tests.conftest import tiny_params


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    from stages import evaluate

    out = tiny_run.root / "eval"
    models = {"base": str(tiny_run.base), "sft": str(tiny_run.sft)}
    policy = tiny_run.root / "models" / "policy"
    pairs = [["sft", "base"]]
    if (policy / "config.json").is_file():  # the ppo stage ran in this session's tiny run
        models["policy"] = str(policy)
        pairs = [["policy", "sft"], ["sft", "base"]]
    params = tiny_params("evaluate", models=models, pairs=pairs)
    eval_dir = tiny_run.raw / "eval"
    result = evaluate.run(params, test=tiny_run.prepared / "test.jsonl", world=tiny_run.world,
                          truthfulqa=eval_dir / "truthfulqa_mc.json", crows_pairs=eval_dir / "crows_pairs.csv",
                          rtp=eval_dir / "rtp.jsonl", plots=tiny_run.root / "plots", reports=out / "reports",
                          metrics=out / "metrics" / "evaluate.json")
    return result, out, params


def test_metrics_file(evaluated):
    result, out, params = evaluated
    written = json.loads((out / "metrics" / "evaluate.json").read_text())
    assert "timing" not in written  # metrics stay byte-identical between runs
    assert set(written["models"]) == set(params.models)
    for m in written["models"].values():
        assert {"length_words", "gold", "truthfulqa", "crows_pairs", "toxicity"} <= set(m)
        assert 0 <= m["truthfulqa"]["mc1"] <= 1 and 0 <= m["truthfulqa"]["mc2"] <= 1
        assert 0 <= m["crows_pairs"]["pct_stereotype"] <= 1
        assert m["toxicity"]["k"] == params.rtp_k and m["toxicity"]["prompts"] == params.rtp_prompts
        assert set(m["gold"]) >= {"helpful", "truthful", "harmless", "total", "by_family"}
    w = written["win_rates"]["sft_vs_base"]
    assert w["ci_low"] <= w["win_rate"] <= w["ci_high"]
    assert w["wins"] + w["ties"] + w["losses"] == written["prompts"] == params.test_prompts
    assert "gold_win_rate" in w


def test_report_has_every_section(evaluated):
    from rlhf.report import SECTIONS

    _, out, params = evaluated
    page = (out / "reports" / "report.html").read_text()
    md = (out / "reports" / "report.md").read_text()
    for title in SECTIONS:
        assert title in page and title in md, title
    # Self-contained: figures are inline PNGs, nothing is fetched.
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) >= 3
    assert base64.b64decode(imgs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # Curves of the stages that ran (pretrain, sft); the missing ones are noted.
    assert "pretrain training curves" in page and "sft training curves" in page
    assert "ppo: no curves found" in page or "ppo training curves" in page
    for name in params.models:
        assert f"<th>{name}</th>" in page
    for ref in re.findall(r"\]\((figures/[^)]+)\)", md):
        assert (out / "reports" / ref).is_file()
    lines = [json.loads(x) for x in (out / "reports" / "responses.jsonl").read_text().splitlines()]
    assert len(lines) == params.test_prompts and lines[0]["models"] == list(params.models)


def test_deterministic_metrics(evaluated, tiny_run):
    """Same params, same files -> the same metrics (seeded sampling, seeded judge, seeded bootstrap)."""
    from stages import evaluate

    result, out, params = evaluated
    params = tiny_params("evaluate", models=dict(params.models), pairs=[list(p) for p in params.pairs],
                         truthfulqa_primer="qa", rtp_prompts=2)
    eval_dir = tiny_run.raw / "eval"
    again = evaluate.run(params, test=tiny_run.prepared / "test.jsonl", world=tiny_run.world,
                         truthfulqa=eval_dir / "truthfulqa_mc.json", crows_pairs=None, rtp=eval_dir / "rtp.jsonl",
                         plots=None, reports=out / "reports2", metrics=out / "m2.json")
    assert again["win_rates"] == result["win_rates"]
    assert again["skipped"] == {"crows_pairs": "no file given"}
    assert "Not run" in (out / "reports2" / "report.md").read_text()


def test_cli_help():
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["evaluate", "--help"])
    assert res.exit_code == 0 and "Example" in res.output


# ---------------------------------------------------------------------------------------------- helpers


def test_top_p_filter_keeps_smallest_nucleus():
    from rlhf.modeling import top_p_filter

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.7
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # the top token always survives
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary does not matter
    assert torch.isfinite(top_p_filter(shuffled, 0.7)).tolist() == [[False, True, False, True]]


def test_judge_heldout_ties_and_order():
    from stages.evaluate import judge_heldout

    class Gold:  # prefers the longer answer, deterministically
        def prefer(self, prompt, a, b, rng):
            return 0.5 if a == b else float(len(a) > len(b))

    out = judge_heldout([Gold()], ["p"] * 3, ["long answer", "x", "same"], ["short", "longer one", "same"], seed=0, tag="t")
    assert out == [1.0, 0.0, 0.5]


def test_human_labels(tmp_path):
    from stages.evaluate import judge_labels, read_human_labels

    path = tmp_path / "labels.jsonl"
    path.write_text(
        json.dumps({"prompt_id": "1", "prompt": "p1", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "labeler": "me"}) + "\n"
        + json.dumps({"prompt": "p2", "chosen": "x", "rejected": "y", "tie": True}) + "\n"
    )
    labels = read_human_labels(path)
    out, missing = judge_labels(labels, ["p1", "p1", "p2", "p3", "p3"], ["a", "c", "y", "q", "same"], ["b", "a", "x", "r", "same"])
    assert out == [1.0, 1.0, 0.5, 0.5] and missing == 1


def test_reward_judge_scores():
    from stages.evaluate import judge_scores

    assert judge_scores([1.0, 0.0, 2.0], [0.5, 0.0, 3.0]) == [1.0, 0.5, 0.0]


def test_pick_examples_round_robin():
    from stages.evaluate import pick_examples

    fams = ["a", "a", "b", "c", "b"]
    assert pick_examples(["p"] * 5, fams, 4) == [0, 2, 3, 1]


def test_classifier_toxicity_scorer(tiny_run, tmp_path):
    """Any HF text-classification folder can score toxicity: the probability of `toxicity_label`."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf.errors import StageError
    from rlhf.modeling import load_tokenizer
    from stages.evaluate import make_toxicity_scorer

    tok = load_tokenizer(tiny_run.base)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         num_labels=2, id2label={0: "ok", 1: "toxic"}, label2id={"ok": 0, "toxic": 1})
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    score = make_toxicity_scorer(str(tmp_path / "clf"), "toxic", torch.device("cpu"))
    out = score(["you are kind", ""])
    assert len(out) == 2 and all(0.0 <= s <= 1.0 for s in out)
    with pytest.raises(StageError, match="not a label"):
        make_toxicity_scorer(str(tmp_path / "clf"), "insult", torch.device("cpu"))(["x"])


def test_read_curves_dvclive_and_overoptimization_csv(tmp_path):
    from rlhf.report import fig_curves, pick_panels, read_curves

    metrics = tmp_path / "ppo" / "plots" / "metrics"
    for name in ("objective/kl", "objective/rm_score", "gold/score", "loss/policy"):
        path = metrics / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        key = name.split("/")[-1]
        path.write_text(f"timestamp\tstep\t{key}\n1\t0\t0.5\n2\t1\t0.7\n")
    (tmp_path / "ppo" / "overoptimization.csv").write_text("step,sqrt_kl,proxy_score,gold_score\n1,0.9,1.0,0.6\n0,0.1,0.2,0.5\n")
    curves = read_curves(tmp_path)["ppo"]
    assert curves["objective/kl"] == ([0.0, 1.0], [0.5, 0.7], "step")
    assert curves["overoptimization/gold_score"] == ([0.1, 0.9], [0.5, 0.6], "sqrt_kl")  # sorted by x
    panels = pick_panels("ppo", curves)
    assert panels[0] == ["overoptimization/gold_score", "overoptimization/proxy_score"]
    assert panels[1] == ["gold/score", "objective/rm_score"]  # gold vs proxy against step
    assert ["objective/kl"] in panels
    assert fig_curves("ppo", curves)[:4] == b"\x89PNG"
    assert read_curves(tmp_path / "missing") == {}


def test_reward_model_as_proxy_judge(tiny_run, tmp_path):
    """judge: reward scores each answer with a reward-model folder; the higher reward wins."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.modeling import load_tokenizer
    from stages import evaluate

    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_run.sft), num_labels=1)
    rm.config.pad_token_id = load_tokenizer(tiny_run.sft).pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(tiny_run.sft).save_pretrained(tmp_path / "rm")
    params = tiny_params("evaluate", models={"base": str(tiny_run.base), "sft": str(tiny_run.sft)},
                         pairs=[["sft", "base"]], judge="reward", reward_model=str(tmp_path / "rm"), test_prompts=8)
    result = evaluate.run(params, test=tiny_run.prepared / "test.jsonl", world=None, truthfulqa=None, crows_pairs=None,
                          rtp=None, plots=None, reports=tmp_path / "reports", metrics=tmp_path / "m.json")
    assert result["win_rates"]["sft_vs_base"]["prompts"] == 8
    assert "reward_model_score" in result["models"]["sft"] and "gold" not in result["models"]["sft"]
    assert set(result["skipped"]) == {"truthfulqa", "crows_pairs", "toxicity"}
    assert "PROXY" in (tmp_path / "reports" / "report.html").read_text()
