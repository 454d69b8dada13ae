"""The evaluate stage end to end on the tiny run (base vs SFT when no policy exists), and its helpers."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil

import pytest
import torch

from tests.conftest import ROOT, tiny_params


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
    # The training stages' metrics as the pipeline writes them (the repository's committed files: RLOO's
    # episodes/s, best-of-n's gold per n), and one that is missing (a stage dropped from the pipeline).
    stage_metrics = []
    for name in ("rloo", "dpo", "bestofn"):
        (out / "stage_metrics").mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "metrics" / f"{name}.json", out / "stage_metrics" / f"{name}.json")
        stage_metrics.append(out / "stage_metrics" / f"{name}.json")
    stage_metrics.append(out / "stage_metrics" / "grpo.json")
    plots = [tiny_run.root / "plots" / s for s in ("pretrain", "sft", "ppo", "grpo")]
    result = evaluate.run(params, test=tiny_run.prepared / "test.jsonl", world=tiny_run.world,
                          truthfulqa=eval_dir / "truthfulqa_mc.json", crows_pairs=eval_dir / "crows_pairs.csv",
                          rtp=eval_dir / "rtp.jsonl", plots=plots, stage_metrics=stage_metrics, reports=out / "reports",
                          metrics=out / "metrics" / "evaluate.json")
    return result, out, params


def test_metrics_file(evaluated):
    result, out, params = evaluated
    written = json.loads((out / "metrics" / "evaluate.json").read_text())
    assert "timing" not in written  # metrics stay byte-identical between runs
    assert set(written["models"]) == set(params.models)
    for m in written["models"].values():
        assert {"length_words", "gold", "truthfulqa", "crows_pairs", "toxicity", "toxicity_respectful"} <= set(m)
        assert 0 <= m["truthfulqa"]["mc1"] <= 1 and 0 <= m["truthfulqa"]["mc2"] <= 1
        assert 0 <= m["crows_pairs"]["pct_stereotype"] <= 1
        assert m["toxicity"]["k"] == params.rtp_k and m["toxicity"]["prompts"] == params.rtp_prompts
        assert set(m["gold"]) >= {"helpful", "truthful", "harmless", "total", "by_family"}
    w = written["win_rates"]["sft_vs_base"]
    assert w["ci_low"] <= w["win_rate"] <= w["ci_high"]
    assert w["wins"] + w["ties"] + w["losses"] == written["prompts"] == params.test_prompts
    assert "gold_win_rate" in w
    # The same verdicts per task family: they partition the prompts and average back to the win rate.
    fams = w["by_family"]
    assert sum(f["prompts"] for f in fams.values()) == written["prompts"] and len(fams) > 1
    assert sum(f["ties"] for f in fams.values()) == w["ties"]
    assert abs(sum(f["win_rate"] * f["prompts"] for f in fams.values()) / written["prompts"] - w["win_rate"]) < 1e-3
    # Every metric carries a 95% interval over its items that contains it (issue: only win rates did).
    for m in written["models"].values():
        for suite, key in (("gold", "total"), ("truthfulqa", "mc1"), ("truthfulqa", "mc2"), ("crows_pairs", "pct_stereotype"),
                           ("toxicity", "expected_max_toxicity"), ("toxicity", "toxicity_probability"),
                           ("toxicity_respectful", "expected_max_toxicity")):
            assert m[suite][f"{key}_ci_low"] <= m[suite][key] <= m[suite][f"{key}_ci_high"], (suite, key)
    head = json.loads((out / "metrics" / "headline.json").read_text())
    first = "_vs_".join(params.pairs[0])
    wf = written["win_rates"][first]
    assert head["win_rate"][first] == {"mean": wf["win_rate"], "low": wf["ci_low"], "high": wf["ci_high"]}
    assert set(head["gold"]) == set(head["truthfulqa_mc1"]) == set(head["toxicity"]) == set(params.models)
    assert set(head["toxicity_respectful"]) == set(params.models)  # InstructGPT measured both ways (sec. 4.2)
    assert len(json.dumps(head)) < 1000  # a headline, not a dump
    rows = (out / "reports" / "plots" / "win_rates.csv").read_text().splitlines()
    assert rows[0] == "pair,win_rate,ci_low,ci_high,gold_win_rate" and len(rows) == 1 + len(params.pairs)


def test_bench_recomputes_the_family_verdicts_of_an_older_run(evaluated, tiny_run, tmp_path, monkeypatch):
    """bench/world_habit.py reads a run evaluated before by_family existed: the verdicts it recomputes from
    reports/responses.jsonl (evaluate's judge call, seed and tag) are evaluate's own, family by family."""
    import yaml

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from world_habit import family_verdicts

    _, out, params = evaluated
    d = tmp_path / "old"
    (d / "metrics").mkdir(parents=True)
    (d / "raw").mkdir()
    shutil.copy(tiny_run.world, d / "raw" / "world.json")
    shutil.copytree(out / "reports", d / "reports")
    (d / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"judge_seed": params.judge_seed}}))
    written = json.loads((out / "metrics" / "evaluate.json").read_text())
    expected = {t: {f: x["win_rate"] for f, x in w.pop("by_family").items()} for t, w in written["win_rates"].items()}
    (d / "metrics" / "evaluate.json").write_text(json.dumps(written))
    assert family_verdicts(d) == expected
    written["win_rates"]["sft_vs_base"]["win_rate"] += 0.01  # not this run's verdicts: refused, not mixed in
    (d / "metrics" / "evaluate.json").write_text(json.dumps(written))
    with pytest.raises(SystemExit, match="sft_vs_base"):
        family_verdicts(d)


def test_kl_from_sft_of_every_model(evaluated):
    """Every model's KL from SFT is measured on the same footing (rlhf.kl), SFT's own is exactly 0, and the
    gold-vs-KL table holds every model and best-of-n at its analytic KL."""
    result, out, params = evaluated
    written = json.loads((out / "metrics" / "evaluate.json").read_text())
    n = params.test_prompts * params.kl_samples
    for name, m in written["models"].items():
        kl = m["kl"]
        assert kl["reference"] == "sft" and kl["samples"] == n, name
        assert kl["mean_ci_low"] <= kl["mean"] <= kl["mean_ci_high"] and 0 <= kl["gold_sampled"] <= 1, name
    assert written["models"]["sft"]["kl"]["mean"] == 0.0
    assert written["models"]["base"]["kl"]["mean"] > 0  # SFT moved away from the base model (0.05 on the tiny profile)
    head = json.loads((out / "metrics" / "headline.json").read_text())
    assert head["kl"] == {n: m["kl"]["mean"] for n, m in written["models"].items()}
    rows = (out / "reports" / "plots" / "gold_vs_kl.csv").read_text().splitlines()
    assert rows[0] == "name,kind,kl,sqrt_kl,gold,gold_sampled"
    by_name = {r.split(",")[0]: r.split(",") for r in rows[1:]}
    assert {n for n, r in by_name.items() if r[1] == "policy"} == set(params.models)
    bestofn = json.loads((ROOT / "metrics" / "bestofn.json").read_text())["best_of"]
    for k, row in bestofn.items():
        got = by_name[f"best-of-{k}"]
        assert float(got[2]) == pytest.approx(row["kl"], abs=1e-4)  # best-of-n's KL from SFT (stages/bestofn.py)
        assert float(got[5]) == row["gold"]["mean"] and got[4] == ""  # sampled gold only: no greedy answer
    # KL's share of the wall time (0.1 s resolution: the tiny profile can measure it in under 0.05 s).
    assert 0 <= result["timing"]["kl_s"] <= result["timing"]["wall_s"]


def test_stage_cost_reads_every_training_stages_metrics():
    """The cost table reads the fields each training stage writes (the repository's committed metrics files);
    a metrics file without a timing block (written before stages recorded one) says so instead of failing."""
    from rlhf.report import cost_rows, read_stage_metrics, stage_cost

    timed = {"rloo": {"episodes": 7680, "timing": {"wall_s": 66.0, "train_s": 60.2, "episodes_per_s": 127.6}},
             "dpo": {"train": {"pairs": 1234}, "timing": {"wall_s": 59.1, "train_s": 40.0, "pairs_per_s": 86.4,
                                                          "reference_s": 3.0, "resumed_from": 0}},
             "bestofn": {"best_of": {}, "prompts": 3, "samples": 16, "timing": {"wall_s": 9.0, "train_s": 5.0,
                                                                              "samples_per_s": 10.2}},
             "sft": {"steps": 96, "timing": {"wall_s": 11.2, "train_s": 6.9, "examples_per_s": 277.9}},
             "old": {"steps": 5}}
    assert stage_cost(timed["rloo"]) == (66.0, 60.2, "7,680 episodes", "127.6 episodes/s")
    assert stage_cost(timed["dpo"]) == (59.1, 40.0, "1,234 pairs", "86.4 pairs/s")
    assert stage_cost(timed["bestofn"]) == (9.0, 5.0, "48 samples", "10.2 samples/s")
    assert stage_cost(timed["sft"]) == (11.2, 6.9, "96 steps", "277.9 examples/s")
    head, rows = cost_rows(timed)
    assert rows[-1] == ["old", "not recorded", None, "5 steps", None] and len(head) == len(rows[0])
    stages, missing = read_stage_metrics([ROOT / "metrics" / "sft.json", ROOT / "metrics" / "no_such_stage.json"])
    assert list(stages) == ["sft"] and missing == [f"{ROOT / 'metrics' / 'no_such_stage.json'}: not found"]


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
    # The first screen answers "did it win, by how much, how sure", with directions and run information.
    assert page.index('class="verdict"') < page.index("<table>")
    assert "; by task family " in page[page.index('class="verdict"'):page.index("<table>")]
    assert "↑" in page and "↓" in page and "git commit" in page and "torch" in page
    # Curves of the stages that ran (pretrain, sft); the missing ones are noted.
    assert "pretrain training curves" in page and "sft training curves" in page
    # Where each win rate comes from: one row per pair, one column per task family.
    fams = page[page.index("Win rates per task family"):page.index("Gold judge scores per task family")]
    assert all(f"<td>{' vs '.join(p)}</td>" in fams for p in params.pairs) and "tied)" in fams
    # Every model and best-of-n on one gold-vs-KL chart, with its caption; the training stages' costs.
    assert 'alt="gold against sqrt KL from sft"' in page and "temperature 1" in page and "rlhf/kl.py" in page
    assert (out / "reports" / "figures" / "gold_vs_kl.png").is_file() and "figures/gold_vs_kl.png" in md
    cost = page[page.index('id="training-cost"'):page.index('id="training-curves"')]
    assert "<td>rloo</td>" in cost and "episodes/s" in cost and "pairs/s" in cost and "<td>bestofn</td>" in cost
    assert "grpo.json: not found" in cost
    assert "ppo: no curves found" in page or "ppo training curves" in page
    for name in params.models:
        assert f"<th>{name}</th>" in page
    # Every table sits in a box that scrolls sideways (one column per model), so a report of many models
    # never makes the page wider than the window.
    assert page.count("<table>") == page.count('<div class="scroll"><table>') and "div.scroll{overflow-x:auto" in page
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
                         plots=(), reports=out / "reports2", metrics=out / "m2.json")
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
    from rlhf.sampling import top_p_filter

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


def test_family_win_rates():
    from stages.evaluate import family_win_rates

    out = family_win_rates([1.0, 0.5, 0.0, 1.0, 0.5], ["sort", "fact", "fact", "arith", "fact"])
    assert list(out) == ["arith", "fact", "sort"]
    assert out["fact"] == {"win_rate": 0.3333, "prompts": 3, "ties": 2}
    assert out["arith"] == {"win_rate": 1.0, "prompts": 1, "ties": 0} == out["sort"]
    with pytest.raises(ValueError):
        family_win_rates([1.0], ["sort", "fact"])


def test_judge_heldout_ties_and_order():
    from rlhf.judges import judge_heldout

    class Gold:  # prefers the longer answer, deterministically
        def prefer(self, prompt, a, b, rng):
            return 0.5 if a == b else float(len(a) > len(b))

    out = judge_heldout([Gold()], ["p"] * 3, ["long answer", "x", "same"], ["short", "longer one", "same"], seed=0, tag="t")
    assert out == [1.0, 0.0, 0.5]


def test_human_labels(tmp_path):
    from rlhf.judges import judge_labels, read_human_labels

    path = tmp_path / "labels.jsonl"
    path.write_text(
        json.dumps({"prompt_id": "1", "prompt": "p1", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "labeler": "me"}) + "\n"
        + json.dumps({"prompt": "p2", "chosen": "x", "rejected": "y", "tie": True}) + "\n"
    )
    labels = read_human_labels(path)
    out, missing = judge_labels(labels, ["p1", "p1", "p2", "p3", "p3"], ["a", "c", "y", "q", "same"], ["b", "a", "x", "r", "same"])
    assert out == [1.0, 1.0, 0.5, 0.5] and missing == 1


def test_reward_judge_scores():
    from rlhf.judges import judge_scores

    assert judge_scores([1.0, 0.0, 2.0], [0.5, 0.0, 3.0]) == [1.0, 0.5, 0.0]


def test_pick_examples_round_robin():
    from stages.evaluate import pick_examples

    fams = ["a", "a", "b", "c", "b"]
    assert pick_examples(["p"] * 5, fams, 4) == [0, 2, 3, 1]


def test_classifier_toxicity_scorer(tiny_run, tmp_path):
    """Any HF text-classification folder can score toxicity: the probability of `toxicity_label`."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf.errors import StageError
    from rlhf.models import load_tokenizer
    from rlhf.suites import make_toxicity_scorer

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


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "single_label_classification"])
def test_classifier_toxicity_scorer_sigmoid_for_multi_label_heads(tmp_path, problem_type):
    """A multi-label head (Detoxify-style: toxic, insult, threat, each its own yes/no) is read through a
    sigmoid per label, a single-label head through a softmax across labels; checked against the logits."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf.tokenization import train_tokenizer
    from rlhf.suites import make_toxicity_scorer

    texts = ["you are kind and good", "you are a rude fool", "go away now"]
    tok = train_tokenizer(texts * 20, vocab_size=300)
    labels = ["toxic", "insult", "threat"]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         num_labels=3, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
                         problem_type=problem_type)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.score.weight, std=3.0)  # logits far apart, so the two readings differ
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    scorers = {label: make_toxicity_scorer(str(tmp_path / "clf"), label, torch.device("cpu")) for label in labels}
    for text in texts:
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits[0]
        expected = torch.sigmoid(logits) if problem_type.startswith("multi") else torch.softmax(logits, -1)
        got = torch.tensor([scorers[label]([text])[0] for label in labels])
        assert torch.allclose(got, expected, atol=1e-4), (text, got, expected)
        if problem_type.startswith("multi"):
            assert abs(float(got.sum()) - 1.0) > 0.05  # labels do not compete
        else:
            assert float(got.sum()) == pytest.approx(1.0, abs=1e-4)


def test_read_curves_and_panels(tmp_path):
    """dvclive TSVs become curves; panels group one idea each, with human titles; constant curves are dropped;
    PPO's over-optimization table is read for the report's proxy-vs-gold chart."""
    from rlhf.report import fig_curves, fig_overoptimization, pick_panels, read_curves, read_overoptimization

    metrics = tmp_path / "ppo" / "plots" / "metrics"
    for name, values in (("objective/kl", (0.5, 0.7)), ("objective/rm_score", (0.1, 0.3)), ("gold/score", (0.2, 0.4)),
                         ("kl_coef", (0.05, 0.05)), ("loss/policy", (1.0, 0.9))):
        path = metrics / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        key = name.split("/")[-1]
        path.write_text(f"timestamp\tstep\t{key}\n1\t0\t{values[0]}\n2\t1\t{values[1]}\n")
    (tmp_path / "ppo" / "overoptimization.csv").write_text("step,sqrt_kl,proxy_score,gold_score\n1,0.9,1.0,0.6\n0,0.1,0.2,0.5\n")
    curves = read_curves([tmp_path / "ppo", tmp_path / "sft"])["ppo"]  # only the folders named are read
    assert curves["objective/kl"] == ([0.0, 1.0], [0.5, 0.7], "step")
    panels = pick_panels("ppo", curves)
    titles = [t for t, _, _ in panels]
    assert titles[:3] == ["Reward-model score (proxy)", "Gold judge score (true)", "KL to the SFT policy"]
    assert all("/" not in t for t in titles)  # human titles, not raw keys
    assert not any("kl_coef" in names for _, _, names in panels)  # a flat constant panel says nothing
    assert len(panels) == 3  # three groups exist: no filler panels
    other = pick_panels("dpo", curves)  # a stage without groups: every live curve, titled from its key
    assert ("Loss: policy", "policy", ["loss/policy"]) in other and len(other) == 4
    assert fig_curves("ppo", curves)[:4] == b"\x89PNG"
    rows = read_overoptimization([tmp_path / "ppo"])["ppo"]
    assert rows[1] == {"step": 0.0, "sqrt_kl": 0.1, "proxy_score": 0.2, "gold_score": 0.5}
    assert fig_overoptimization(rows)[:4] == b"\x89PNG"
    assert read_curves([tmp_path / "missing"]) == {} == read_overoptimization([tmp_path / "missing"])


def test_reward_model_as_proxy_judge(tiny_run, tmp_path):
    """judge: reward scores each answer with a reward-model folder; the higher reward wins."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import load_tokenizer
    from stages import evaluate

    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_run.sft), num_labels=1)
    rm.config.pad_token_id = load_tokenizer(tiny_run.sft).pad_token_id
    rm.config.reward_bias = 1.5  # the demonstration bias (docs/ppo.md item 3) must reach the reported scores
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(tiny_run.sft).save_pretrained(tmp_path / "rm")
    params = tiny_params("evaluate", models={"base": str(tiny_run.base), "sft": str(tiny_run.sft)},
                         pairs=[["sft", "base"]], judge="reward", reward_model=str(tmp_path / "rm"), test_prompts=8)
    result = evaluate.run(params, test=tiny_run.prepared / "test.jsonl", world=None, truthfulqa=None, crows_pairs=None,
                          rtp=None, plots=(), reports=tmp_path / "reports", metrics=tmp_path / "m.json")
    assert result["win_rates"]["sft_vs_base"]["prompts"] == 8
    assert "rm_score" in result["models"]["sft"] and "gold" not in result["models"]["sft"]
    assert set(result["skipped"]) == {"truthfulqa", "crows_pairs", "toxicity", "toxicity_respectful"}
    assert "PROXY" in (tmp_path / "reports" / "report.html").read_text()
    # The same scoring path as every stage (rlhf.rm.score_texts, bias included).
    from rlhf.models import load_reward_model
    from rlhf.rm import score_texts

    prompts = [json.loads(x)["prompt"] for x in (tmp_path / "reports" / "responses.jsonl").read_text().splitlines()]
    answers = [json.loads(x)["responses"][1] for x in (tmp_path / "reports" / "responses.jsonl").read_text().splitlines()]
    want = score_texts(load_reward_model(tmp_path / "rm"), load_tokenizer(tmp_path / "rm"), prompts, answers, max_len=10**6,
                       batch_size=4, device=torch.device("cpu"))
    assert result["models"]["sft"]["rm_score"] == pytest.approx(sum(want) / len(want), abs=1e-4)
    assert result["models"]["sft"]["rm_score"] > 1.0  # centered scores of a near-zero head + 1.5


def test_n_models_each_against_sft(tiny_run, tmp_path):
    """Any number of policies: a win rate per listed pair, gold per family for each, all in the headline."""
    from stages import evaluate

    models = {"base": str(tiny_run.base), "sft": str(tiny_run.sft), "sft_ptx": str(tiny_run.sft), "policy_noptx": str(tiny_run.base)}
    pairs = [["sft_ptx", "sft"], ["policy_noptx", "sft"], ["sft", "base"]]
    params = tiny_params("evaluate", models=models, pairs=pairs, test_prompts=6, examples=2)
    result = evaluate.run(params, test=tiny_run.prepared / "test.jsonl", world=tiny_run.world, truthfulqa=None,
                          crows_pairs=None, rtp=None, plots=(), reports=tmp_path / "reports", metrics=tmp_path / "m" / "evaluate.json")
    assert list(result["win_rates"]) == ["sft_ptx_vs_sft", "policy_noptx_vs_sft", "sft_vs_base"]
    assert result["win_rates"]["sft_ptx_vs_sft"]["ties"] == 6  # the same folder answers the same
    head = json.loads((tmp_path / "m" / "headline.json").read_text())
    assert set(head["win_rate"]) == {"sft_ptx_vs_sft", "policy_noptx_vs_sft"}  # every policy against the first pair's B
    assert set(head["gold"]) == set(models)
    fams = (tmp_path / "reports" / "plots" / "gold_by_family.csv").read_text().splitlines()
    assert fams[0] == "model_family,family,model,gold_total" and {r.split(",")[2] for r in fams[1:]} == set(models)
    page = (tmp_path / "reports" / "report.html").read_text()
    assert all(f"<th>{n}</th>" in page for n in models)


def test_missing_model_names_the_command(tiny_run, tmp_path, monkeypatch):
    from rlhf.errors import StageError
    from stages import evaluate

    (tmp_path / "dvc.yaml").write_text("stages:\n  ppo_ptx:\n    cmd: rlhf ppo_ptx\n    outs:\n      - models/sft_ptx\n")
    monkeypatch.chdir(tmp_path)
    params = tiny_params("evaluate", models={"sft": str(tiny_run.sft), "sft_ptx": "models/sft_ptx"}, pairs=[["sft_ptx", "sft"]])
    with pytest.raises(StageError) as err:
        evaluate.run(params, test=tiny_run.prepared / "test.jsonl", world=None, plots=(), reports=tmp_path / "r",
                     metrics=tmp_path / "m.json")
    msg = str(err.value)
    assert "\n" not in msg and "evaluate.models.sft_ptx" in msg and "`dvc repro ppo_ptx`" in msg
    params = tiny_params("evaluate", models={"sft": str(tiny_run.sft), "x": "models/x"}, pairs=[])
    with pytest.raises(StageError, match="the stage that writes it"):
        evaluate.run(params, test=tiny_run.prepared / "test.jsonl", world=None, plots=(), reports=tmp_path / "r",
                     metrics=tmp_path / "m.json")


def test_verdict_and_regressions():
    from rlhf.report import regressions, verdict

    def model(gold, lo, hi, tox):
        return {"gold": {"total": gold, "total_ci_low": lo, "total_ci_high": hi},
                "toxicity": {"expected_max_toxicity": tox, "expected_max_toxicity_ci_low": tox - 0.01,
                             "expected_max_toxicity_ci_high": tox + 0.01, "toxicity_probability": 0.1}}
    result = {"models": {"policy": model(0.71, 0.68, 0.74, 0.567), "sft": model(0.60, 0.57, 0.63, 0.398)},
              "win_rates": {"policy_vs_sft": {"win_rate": 0.58, "ci_low": 0.53, "ci_high": 0.62}}}
    pairs = [["policy", "sft"]]
    assert verdict(result, pairs, "held-out labelers prefer") == (
        "policy beat sft: held-out labelers prefer it 0.58 [0.53, 0.62]; test gold 0.60 → 0.71.")
    assert regressions(result, pairs) == ["policy RTP expected max toxicity 0.567 vs sft 0.398: worse"]
    # Where the rate comes from, best family first (ties in name order).
    result["win_rates"]["policy_vs_sft"]["by_family"] = {
        f: {"win_rate": r, "prompts": 10, "ties": 0} for f, r in (("sort", 0.47), ("unknown", 0.9), ("arith", 0.47))}
    assert verdict(result, pairs, "held-out labelers prefer") == (
        "policy beat sft: held-out labelers prefer it 0.58 [0.53, 0.62]; test gold 0.60 → 0.71; "
        "by task family unknown 0.90, arith 0.47, sort 0.47.")
    result["win_rates"]["policy_vs_sft"] = {"win_rate": 0.52, "ci_low": 0.47, "ci_high": 0.57}
    assert verdict(result, pairs, "labelers prefer").startswith("policy and sft are not distinguishable")
    result["win_rates"]["policy_vs_sft"] = {"win_rate": 0.40, "ci_low": 0.35, "ci_high": 0.45}
    assert verdict(result, pairs, "labelers prefer").startswith("policy lost to sft")
    result["models"]["policy"]["gold"] |= {"total": 0.59, "total_ci_low": 0.56}
    assert regressions(result, pairs)[0] == "policy gold total 0.590 vs sft 0.600: worse (the 95% intervals overlap: may be noise)"
    assert verdict({"models": {}, "win_rates": {}}, [], "x").startswith("No win rate")


def test_decode_continuation_drops_a_cut_character(tiny_run):
    """A continuation cut by the token limit inside a multi-byte character ends cleanly, without U+FFFD."""
    from rlhf.models import load_tokenizer
    from rlhf.suites import decode_continuation

    tok = load_tokenizer(tiny_run.base)
    ids = tok("they are ok", add_special_tokens=False)["input_ids"]
    cut = tok("é", add_special_tokens=False)["input_ids"]
    assert len(cut) == 2  # two bytes, two byte-level tokens (the tiny corpus is ASCII)
    assert decode_continuation(tok, ids + cut[:1]) == "they are ok"
    assert decode_continuation(tok, ids + cut) == "they are oké"
    assert decode_continuation(tok, ids + [tok.eos_token_id] + cut[:1]) == "they are ok"


def test_respectful_toxicity_prompts_carry_the_instruction(tiny_run):
    """The instructed condition (InstructGPT sec. 4.2) sends each RTP prompt as a chat turn after the
    instruction; the raw condition continues the bare text. Greedy (temperature ~0) so outputs compare."""
    import torch

    from rlhf.models import load_tokenizer
    from rlhf.suites import RESPECTFUL_INSTRUCTION, rtp_continuations
    from rlhf.tokenization import encode_prompt

    tok = load_tokenizer(tiny_run.sft)
    seen = []

    def spy(model, rows, **kw):
        seen.extend(rows)
        return torch.full((len(rows), 1), tok.eos_token_id)

    params = tiny_params("evaluate", rtp_k=1)
    import rlhf.sampling as M
    real = M.sample_tokens
    M.sample_tokens = spy
    try:
        rtp_continuations(None, tok, ["The Varns are"], params, torch.device("cpu"), "respectful")
        rtp_continuations(None, tok, ["The Varns are"], params, torch.device("cpu"), "raw")
    finally:
        M.sample_tokens = real
    assert seen[0] == encode_prompt(tok, f"{RESPECTFUL_INSTRUCTION} The Varns are")
    assert seen[1] == [tok.bos_token_id] + tok("The Varns are", add_special_tokens=False)["input_ids"]


def test_set_judges_other_models_as_the_compare_stage_does(tiny_run, tmp_path):
    """`rlhf evaluate --set "models={...}" --set "pairs=[...]"` (dvc.yaml's compare stage): YAML values, typed
    and validated like the file's; a pair naming a model outside the overridden models stops with one line."""
    from typer.testing import CliRunner

    from cli.main import app
    from tests.conftest import TINY

    paths = ["--params", str(TINY), "--test", str(tiny_run.prepared / "test.jsonl"), "--world", str(tiny_run.world),
             "--rtp", str(tmp_path / "none.jsonl"), "--reports", str(tmp_path / "r"), "--metrics", str(tmp_path / "m.json"),
             "--headline", str(tmp_path / "h.json"), "--plots", str(tmp_path / "no_plots"),
             "--stage-metrics", str(tmp_path / "none.json")]
    models = f"models={{base: {tiny_run.base}, sft: {tiny_run.sft}}}"
    bad = CliRunner().invoke(app, ["evaluate", "--set", models, "--set", "pairs=[[sft, policy]]", *paths])
    assert bad.exit_code == 1 and "'policy' is not in evaluate.models" in bad.output, bad.output
    assert "Traceback" not in bad.output
    good = CliRunner().invoke(app, ["evaluate", "--set", models, "--set", "pairs=[[sft, base]]", *paths])
    assert good.exit_code == 0, good.output
    written = json.loads((tmp_path / "m.json").read_text())
    assert set(written["models"]) == {"base", "sft"} and set(written["win_rates"]) == {"sft_vs_base"}
