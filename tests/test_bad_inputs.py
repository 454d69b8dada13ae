"""Bad input, nothing lost: every case of docs/bad_inputs.md through the real CLI.

Each case starts from valid tiny-run inputs, breaks one thing, runs one `rlhf <stage>` command (in
process, via typer's CliRunner) and checks the contract: exit code 1, exactly one line on stderr that
starts with `error:` and names the file and line, the record or the params key, and none of the
command's outputs on disk. One test per case (one parameter set each); the ids match the catalogue.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import TINY


@dataclass
class Ctx:
    tmp: Path
    run: object  # conftest.TinyRun
    params: Path = field(init=False)

    def __post_init__(self):
        self.params = self.tmp / "params.yaml"
        shutil.copy(TINY, self.params)

    # ---- inputs to break -------------------------------------------------------------------------
    def raw(self) -> Path:
        """A private copy of the world's raw inputs."""
        dst = self.tmp / "raw"
        if not dst.exists():
            shutil.copytree(self.run.raw, dst)
        return dst

    def prepared(self) -> Path:
        dst = self.tmp / "prepared-in"
        if not dst.exists():
            shutil.copytree(self.run.prepared, dst)
        return dst

    def model(self, src: Path | None = None) -> Path:
        dst = self.tmp / "model-in"
        if not dst.exists():
            shutil.copytree(src or self.run.base, dst)
        return dst

    def set_params(self, section: str, key: str, value=None, *, delete: bool = False) -> None:
        data = yaml.safe_load(self.params.read_text())
        if delete:
            del data[section][key]
        else:
            data[section][key] = value
        self.params.write_text(yaml.safe_dump(data, sort_keys=False))

    def test_prompt(self) -> str:
        return json.loads((self.run.prepared / "test.jsonl").read_text().splitlines()[0])["prompt"]

    # ---- commands and their outputs ---------------------------------------------------------------
    def world(self) -> tuple[list[str], list[Path]]:
        out = self.tmp / "world-out"
        return ["world", "--out", str(out)], [out]

    def prepare(self, raw: Path | None = None) -> tuple[list[str], list[Path]]:
        out, metrics = self.tmp / "prepared", self.tmp / "metrics/prepare.json"
        return ["prepare", "--raw", str(raw or self.raw()), "--out", str(out), "--metrics", str(metrics)], [out, metrics]

    def pretrain(self, corpus: Path | None = None) -> tuple[list[str], list[Path]]:
        out, metrics = self.tmp / "models/base", self.tmp / "metrics/pretrain.json"
        args = ["pretrain", "--corpus", str(corpus or self.run.prepared / "corpus.jsonl"), "--out", str(out),
                "--metrics", str(metrics), "--plots", str(self.tmp / "plots/pretrain"),
                "--checkpoints", str(self.tmp / "ckpt/pretrain")]
        return args, [out, metrics, self.tmp / "ckpt/pretrain"]

    def sft(self, base: Path | None = None, data: Path | None = None, world: Path | None = None):
        out, metrics = self.tmp / "models/sft", self.tmp / "metrics/sft.json"
        args = ["sft", "--base", str(base or self.run.base), "--data", str(data or self.run.prepared),
                "--world", str(world or self.run.world), "--out", str(out), "--metrics", str(metrics),
                "--plots", str(self.tmp / "plots/sft"), "--checkpoints", str(self.tmp / "ckpt/sft")]
        return args, [out, metrics, self.tmp / "ckpt/sft"]

    def rank(self, candidates: Path, labels: Path | None = None):
        out, metrics = self.tmp / "rankings.jsonl", self.tmp / "metrics/rank.json"
        args = ["rank", "--candidates", str(candidates), "--world", str(self.run.world),
                "--labels", str(labels or self.tmp / "labels.jsonl"), "--out", str(out), "--metrics", str(metrics)]
        return args, [out, metrics]

    def reward(self, data: Path):
        out, metrics = self.tmp / "models/reward", self.tmp / "metrics/reward.json"
        args = ["reward", "--sft", str(self.run.sft), "--data", str(data), "--demos", str(self.run.prepared / "sft.jsonl"),
                "--world", str(self.run.world), "--out", str(out), "--metrics", str(metrics),
                "--plots", str(self.tmp / "plots/reward"), "--checkpoints", str(self.tmp / "ckpt/reward")]
        return args, [out, metrics, self.tmp / "ckpt/reward"]

    def ppo(self, reward: Path):
        out, value, metrics = self.tmp / "models/policy", self.tmp / "models/value", self.tmp / "metrics/ppo.json"
        args = ["ppo", "--sft", str(self.run.sft), "--reward", str(reward), "--data", str(self.run.prepared),
                "--world", str(self.run.world), "--out", str(out), "--value-out", str(value), "--metrics", str(metrics),
                "--plots", str(self.tmp / "plots/ppo"), "--checkpoints", str(self.tmp / "ckpt/ppo")]
        return args, [out, value, metrics, self.tmp / "ckpt/ppo"]


def edit_line(path: Path, lineno: int, new: str | bytes) -> None:
    """Replace line `lineno` (1-based) of a JSONL file."""
    lines = path.read_bytes().splitlines(keepends=True)
    lines[lineno - 1] = (new.encode() if isinstance(new, str) else new) + b"\n"
    path.write_bytes(b"".join(lines))


def edit_record(path: Path, lineno: int, change: Callable[[dict], None]) -> None:
    record = json.loads(path.read_bytes().splitlines()[lineno - 1])
    change(record)
    edit_line(path, lineno, json.dumps(record))


def rankings_file(c: Ctx, ranking, responses=("a b", "c d", "e f", "g h")) -> Path:
    path = c.tmp / "rankings.in.jsonl"
    path.write_text(json.dumps({"prompt_id": "p1", "prompt": "What is 2 + 2?", "responses": list(responses),
                                "ranking": ranking, "labeler": "ann"}) + "\n")
    return path


def candidates_file(c: Ctx, records: list[dict]) -> Path:
    path = c.tmp / "candidates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CAND = {"prompt_id": "p1", "prompt": "What is 2 + 2?", "responses": ["4", "5", "four", "2"], "ended": [True] * 4}


# ------------------------------------------------------------------------------------------------
# The catalogue: id -> (build(ctx) -> (args, outputs), expected fragments of the one-line error).
# Keep in step with docs/bad_inputs.md.


def _empty_file(c):
    (c.raw() / "prompts.jsonl").write_text("")
    return c.prepare()


def _broken_json_line(c):
    edit_line(c.raw() / "prompts.jsonl", 3, '{"id": "p00002", "prompt": "Write a rude')
    return c.prepare()


def _not_an_object(c):
    edit_line(c.raw() / "prompts.jsonl", 2, '["p00001", "Say something"]')
    return c.prepare()


def _missing_field(c):
    edit_record(c.raw() / "demonstrations.jsonl", 4, lambda r: r.pop("response"))
    return c.prepare()


def _mistyped_field(c):
    edit_record(c.raw() / "prompts.jsonl", 5, lambda r: r.update(prompt=42))
    return c.prepare()


def _empty_field(c):
    edit_record(c.raw() / "corpus.jsonl", 2, lambda r: r.update(text="   "))
    return c.prepare()


def _non_utf8(c):
    edit_line(c.raw() / "corpus.jsonl", 3, '{"text": "caf\u00e9"}'.encode("latin-1"))
    return c.prepare()


def _missing_file(c):
    (c.raw() / "corpus.jsonl").unlink()
    return c.prepare()


def _duplicate_ids(c):
    first = json.loads((c.raw() / "prompts.jsonl").read_text().splitlines()[0])["id"]
    edit_record(c.raw() / "prompts.jsonl", 2, lambda r: r.update(id=first))
    return c.prepare()


def _duplicate_candidate_ids(c):
    return c.rank(candidates_file(c, [CAND, {**CAND, "prompt": "What is 3 + 3?"}]))


def _leak_corpus(c):
    with (c.raw() / "corpus.jsonl").open("a") as fh:
        fh.write(json.dumps({"text": f"<|user|>{c.test_prompt()}<|assistant|>I do not know."}) + "\n")
    return c.prepare()


def _leak_user_rankings(c):
    record = {"prompt_id": "u1", "prompt": c.test_prompt(), "responses": ["a", "b"], "ranking": [0, 1], "labeler": "ann"}
    (c.raw() / "rankings.jsonl").write_text(json.dumps(record) + "\n")
    return c.prepare()


def _bad_user_rankings_record(c):
    record = {"prompt_id": "u1", "prompt": "Hello?", "responses": ["a", "b"], "ranking": "0>1", "labeler": "ann"}
    (c.raw() / "rankings.jsonl").write_text(json.dumps(record) + "\n")
    return c.prepare()


def _too_few_demonstrations(c):
    path = c.prepared() / "sft.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    return c.sft(data=c.prepared())


def _corpus_too_small(c):
    path = c.tmp / "corpus.jsonl"
    path.write_text(json.dumps({"text": "A kuv eats moss."}) + "\n")
    return c.pretrain(corpus=path)


def _params(section, key, value=None, delete=False, command="sft"):
    def build(c):
        c.set_params(section, key, value, delete=delete)
        return getattr(c, command)()
    return build


def _params_missing_section(c):
    data = yaml.safe_load(c.params.read_text())
    del data["sft"]
    c.params.write_text(yaml.safe_dump(data))
    return c.sft()


def _params_file_missing(c):
    c.params.unlink()
    return c.sft()


def _params_not_yaml(c):
    c.params.write_text("sft:\n  lr: [0.001\n")
    return c.sft()


def _params_not_a_mapping(c):
    c.params.write_text("- sft\n- lr\n")
    return c.sft()


def _rank_bad_choice(c):
    c.set_params("rank", "source", "robots")
    return c.rank(candidates_file(c, [CAND]))


def _world_file_broken(c):
    path = c.tmp / "world.json"
    path.write_text('{"creatures": [')
    return c.sft(world=path)


def _world_file_not_a_world(c):
    path = c.tmp / "world.json"
    path.write_text('{"seed": 0}')
    return c.sft(world=path)


def _model_missing(c):
    return c.sft(base=c.tmp / "no-such-model")


def _model_without_config(c):
    (c.model() / "config.json").unlink()
    return c.sft(base=c.model())


def _model_config_broken(c):
    (c.model() / "config.json").write_text("{")
    return c.sft(base=c.model())


def _model_pickle_only(c):
    import torch

    model = c.model()
    (model / "model.safetensors").unlink()
    torch.save({}, model / "pytorch_model.bin")
    return c.sft(base=model)


def _model_corrupt_weights(c):
    (c.model() / "model.safetensors").write_bytes(b"not a safetensors file")
    return c.sft(base=c.model())


def _model_without_tokenizer(c):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (c.model() / name).unlink()
    return c.sft(base=c.model())


def _hub_id_offline(c):
    c.set_params("pretrain", "base_model", "no-such-org/no-such-model")
    return c.pretrain()


def _ranking_not_permutation(c):
    return c.reward(rankings_file(c, [0, 0, 1, 2]))


def _ranking_bad_index(c):
    return c.reward(rankings_file(c, [0, 1, 2, 7]))


def _ranking_k_mismatch(c):
    return c.reward(rankings_file(c, [0, 1, 2]))


def _labels_k_mismatch(c):
    c.set_params("rank", "source", "human")
    labels = c.tmp / "labels.jsonl"
    labels.write_text(json.dumps({"prompt_id": "p1", "prompt": CAND["prompt"], "responses": CAND["responses"][:3],
                                  "ranking": [0, 1, 2], "labeler": "ann"}) + "\n")
    return c.rank(candidates_file(c, [CAND]), labels)


def _tokenizers_differ(c):
    from rlhf.tokenization import train_tokenizer

    reward = c.model(src=c.run.sft)
    other = train_tokenizer(["a completely different corpus with other merges"] * 20, 300)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (reward / name).unlink()
    other.save_pretrained(reward)
    return c.ppo(reward)


CASES: dict[str, tuple[Callable, list[str]]] = {
    # data files
    "empty-file": (_empty_file, ["prompts.jsonl: file is empty"]),
    "broken-json-line": (_broken_json_line, ["prompts.jsonl:3: broken JSON"]),
    "record-not-an-object": (_not_an_object, ["prompts.jsonl:2: expected a JSON object, got list"]),
    "missing-field": (_missing_field, ["demonstrations.jsonl:4: missing field 'response'"]),
    "mistyped-field": (_mistyped_field, ["prompts.jsonl:5: field 'prompt' must be a string, got int"]),
    "empty-field": (_empty_field, ["corpus.jsonl:2: field 'text' is empty"]),
    "non-utf8-bytes": (_non_utf8, ["corpus.jsonl:3: not valid UTF-8", "re-encode"]),
    "missing-file": (_missing_file, ["corpus.jsonl: file not found"]),
    "duplicate-ids": (_duplicate_ids, ["prompts.jsonl:2: duplicate id"]),
    "duplicate-candidate-ids": (_duplicate_candidate_ids, ["candidates.jsonl:2: prompt_id 'p1' appears twice"]),
    "leakage-corpus": (_leak_corpus, ["test prompt", "corpus.jsonl (as a chat user turn)"]),
    "leakage-user-rankings": (_leak_user_rankings, ["test prompt", "rankings.jsonl"]),
    "mistyped-user-rankings": (_bad_user_rankings_record, ["rankings.jsonl:1: field 'ranking' must be a list"]),
    "too-few-demonstrations": (_too_few_demonstrations, ["sft.jsonl: 3 demonstrations, fewer than sft.batch_size=8"]),
    "corpus-too-small": (_corpus_too_small, ["corpus.jsonl: only 0 training blocks", "pretrain.batch_size"]),
    # params
    "params-unknown-key": (_params("sft", "lr_typo", 0.1), ["params key 'sft.lr_typo' is unknown"]),
    "params-mistyped": (_params("sft", "lr", "fast"), ["params key 'sft.lr': expected a number, got 'fast'"]),
    "params-missing-key": (_params("sft", "seed", delete=True), ["params key 'sft.seed' is missing"]),
    "params-nan": (_params("sft", "lr", float("nan")), ["params key 'sft.lr': expected a finite number"]),
    "params-inf": (_params("pretrain", "lr", float("inf"), command="pretrain"),
                   ["params key 'pretrain.lr': expected a finite number"]),
    "params-negative-lr": (_params("sft", "lr", -0.001), ["params key 'sft.lr': must be > 0"]),
    "params-zero-batch": (_params("sft", "batch_size", 0), ["params key 'sft.batch_size': must be > 0"]),
    "params-bool-for-int": (_params("sft", "epochs", True), ["params key 'sft.epochs': expected an integer"]),
    "params-fraction-out-of-range": (_params("prepare", "test_fraction", 1.5, command="prepare"),
                                     ["params key 'prepare.test_fraction': must be in [0, 1)"]),
    "params-bad-choice": (_rank_bad_choice, ["params key 'rank.source': expected one of"]),
    "params-missing-section": (_params_missing_section, ["no 'sft:' section"]),
    "params-file-missing": (_params_file_missing, ["params.yaml: params file not found"]),
    "params-not-yaml": (_params_not_yaml, ["params.yaml:3: not valid YAML"]),
    "params-not-a-mapping": (_params_not_a_mapping, ["expected a mapping of stage sections"]),
    "world-params-too-few-groups": (_params("world", "n_groups", 1, command="world"),
                                    ["params key 'world.n_groups': must be at least 2"]),
    "world-params-negative": (_params("world", "labeler_sigma", -0.5, command="world"),
                              ["params key 'world.labeler_sigma': must be >= 0"]),
    "world-file-broken": (_world_file_broken, ["world.json: broken JSON"]),
    "world-file-not-a-world": (_world_file_not_a_world, ["/world.json: missing key 'creatures'"]),
    # model folders
    "model-folder-missing": (_model_missing, ["no-such-model: model folder not found"]),
    "model-without-config": (_model_without_config, ["model-in: not a Hugging Face model folder (no config.json)"]),
    "model-config-broken": (_model_config_broken, ["model-in: cannot load", "config.json' is not a valid JSON file"]),
    "model-pickle-only": (_model_pickle_only, ["model-in: no *.safetensors weights; only safetensors are loaded"]),
    "model-corrupt-weights": (_model_corrupt_weights, ["model-in: corrupt *.safetensors weights"]),
    "model-without-tokenizer": (_model_without_tokenizer, ["model-in: no tokenizer files (tokenizer.json, tokenizer_config.json)"]),
    "hub-id-offline": (_hub_id_offline, ["pretrain.base_model 'no-such-org/no-such-model': cannot load its tokenizer"]),
    # later stages (rank, reward, ppo)
    "ranking-not-a-permutation": (_ranking_not_permutation, ["rankings.in.jsonl:1: response 0 appears twice"]),
    "ranking-bad-index": (_ranking_bad_index, ["rankings.in.jsonl:1: ranking [0, 1, 2, 7] is not a permutation"]),
    "k-mismatch-ranking": (_ranking_k_mismatch, ["rankings.in.jsonl:1: ranking has 3 entries but there are 4 responses"]),
    "k-mismatch-human-labels": (_labels_k_mismatch, ["labels.jsonl:1: prompt 'p1' was labeled on other responses"]),
    "tokenizers-differ": (_tokenizers_differ, ["model-in: the reward model's tokenizer differs"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_line_and_no_outputs(case, tiny_run, tmp_path):
    from cli.main import app

    build, fragments = CASES[case]
    ctx = Ctx(tmp_path, tiny_run)
    args, outputs = build(ctx)
    res = CliRunner().invoke(app, [*args, "--params", str(ctx.params)])
    assert res.exit_code == 1, f"exit {res.exit_code}: {res.output}{res.exception!r}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    left = [str(p) for p in outputs if p.exists()]
    assert not left, f"a failed run left outputs: {left}"


def test_catalogue_doc_lists_every_case():
    from tests.conftest import ROOT

    doc = (ROOT / "docs/bad_inputs.md").read_text()
    missing = [case for case in CASES if f"`{case}`" not in doc]
    assert not missing, f"docs/bad_inputs.md lacks {missing}"


def test_ppo_batch_that_does_not_split_over_the_processes(tiny_run, tmp_path):
    """Under a launcher every rank takes an equal share of each batch: 8 prompts over 3 processes fail
    at once, on every rank, before any process group is joined (the launcher's WORLD_SIZE is enough)."""
    from cli.main import app

    ctx = Ctx(tmp_path, tiny_run)
    args, outputs = ctx.ppo(tiny_run.sft)
    res = CliRunner().invoke(app, [*args, "--params", str(ctx.params)], env={"WORLD_SIZE": "3", "RANK": "0"})
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert lines == ["error: params key 'ppo.batch_size': 8 does not split evenly over 3 processes; make it a "
                     "multiple of 3 or launch a number of processes that divides it"], res.stderr
    assert not [p for p in outputs if p.exists()]
