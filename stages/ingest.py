"""ingest: turn a preference or chat data set in a common public format into the pipeline's raw files.

Reads  --source: a JSONL/JSON or Parquet file, a folder saved with `Dataset.save_to_disk`, or a hub id
       (read with the `datasets` library), in one of the formats of rlhf/sources.py: HH-RLHF transcripts
       {chosen, rejected}, pairwise {prompt, chosen, rejected}, chat {messages} or multi-completion
       ratings {prompt, completions: [{response, score}]}
Writes --out/prompts.jsonl {id, prompt, family}, demonstrations.jsonl {prompt, response, family},
       corpus.jsonl {text}, rankings.jsonl (the rankings format `reward` reads; absent without
       comparisons), and metrics/ingest.json (records read, skipped by reason, written per file)
Run    rlhf ingest --source data/hh_sample.jsonl --out data/raw   (examples/hh/dvc.yaml runs it)

Every conversation gets one role, drawn by a hash of its normalized (rlhf/text.py) opening question, the
first user turn: demonstration (its best answer is an SFT example), comparison (its ranking trains the
reward model) or pool (the prompt alone; `prepare` splits the pool into ppo and test prompts). So no
prompt is in two files, and a pool (test) question never opens a conversation trained on, even when many
conversations open alike, as in HH-RLHF. A chat record has no comparison: drawn for one, it is pooled.
The corpus (pretraining text, PPO-ptx's batches) is the demonstrations' and comparisons' conversations with
their best answers, written in the chat template's form (`<|user|>…<|assistant|>…`), never a pool prompt. Malformed records are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.errors import StageError
from rlhf.io import atomic_dir, write_json, write_jsonl
from rlhf.params import require
from rlhf.preferences import prompt_unit
from rlhf.sources import Example, Tally, detect_format, load_records, to_examples
from rlhf.text import conversation, normalize, template_text


@dataclass(frozen=True)
class Params:
    format: Literal["auto", "hh", "pairwise", "chat", "ratings"]
    """The source's format; 'auto' tells it from the first record's fields."""
    split: str
    """Split of a data set with several (a hub id, a DatasetDict folder); a single split is taken as is."""
    max_records: int
    """Read at most this many records (0 = all): a quick run on a large data set."""
    demonstration_fraction: float
    """Share of prompts whose best answer becomes an SFT demonstration."""
    comparison_fraction: float
    """Share of prompts whose comparison becomes a ranking for the reward model; the rest is the prompt
    pool that `prepare` splits into ppo and test prompts."""
    max_malformed_share: float
    """Share of records that may be malformed (skipped, counted, one warning line); above it the stage stops."""
    seed: int
    """Salt of the role hash: another seed draws other prompts for each role."""

    def validate(self) -> None:
        require(self.max_records >= 0, "ingest.max_records", "must be >= 0 (0 = all)")
        for key in ("demonstration_fraction", "comparison_fraction", "max_malformed_share"):
            require(0.0 <= getattr(self, key) < 1.0, f"ingest.{key}", "must be in [0, 1)")
        require(self.demonstration_fraction > 0, "ingest.demonstration_fraction", "must be > 0: SFT needs demonstrations")
        require(self.demonstration_fraction + self.comparison_fraction < 1.0, "ingest.comparison_fraction",
                "demonstration_fraction + comparison_fraction must leave a prompt pool for ppo and test")


def role(example: Example, params: Params) -> str:
    """'demonstration', 'comparison' or 'pool', fixed by the normalized opening question (a chat record: no comparison)."""
    u = prompt_unit(example.opening, f"ingest-{params.seed}")
    if u < params.demonstration_fraction:
        return "demonstration"
    if u < params.demonstration_fraction + params.comparison_fraction and example.is_comparison:
        return "comparison"
    return "pool"


def transcript(prompt: str, response: str) -> str:
    """A conversation as pretraining text in this project's chat template (rlhf.text.template_text), so a
    base model pretrained on it has seen the turns the way every later stage renders them."""
    return template_text(conversation(prompt) + [{"role": "assistant", "content": response}])


def split_examples(examples: list[Example], fmt: str, params: Params) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """The raw files' records by role, and the comparisons dropped for ordering nothing (all tied, same text)."""
    files: dict[str, list[dict[str, Any]]] = {"demonstrations": [], "rankings": [], "prompts": [], "corpus": []}
    pooled: set[str] = set()
    no_preference = 0
    for i, ex in enumerate(examples):
        family = "multi-turn" if ex.turns > 1 else "single-turn"
        best = ex.responses[ex.ranking[0]] if ex.ranking else ex.responses[0]
        r = role(ex, params)
        if r == "pool":
            if normalize(ex.prompt) not in pooled:
                pooled.add(normalize(ex.prompt))
                files["prompts"].append({"id": f"{fmt}-{i:06d}", "prompt": ex.prompt, "family": family})
            continue
        if r == "comparison":
            if not ex.prefers:
                no_preference += 1
                continue
            record = {"prompt_id": f"{fmt}-{i:06d}", "prompt": ex.prompt, "responses": list(ex.responses),
                      "ranking": list(ex.ranking), "labeler": f"imported:{fmt}"}
            if ex.ties:
                record["ties"] = [list(t) for t in ex.ties]
            files["rankings"].append(record)
        else:
            files["demonstrations"].append({"prompt": ex.prompt, "response": best, "family": family})
        files["corpus"].append({"text": transcript(ex.prompt, best)})
    return files, no_preference


def run(params: Params, *, source: str, out: Path, metrics: Path) -> dict[str, Any]:
    source = str(source)
    records = load_records(source, params.split)[: params.max_records or None]
    if not records:
        raise StageError(f"{source}: no records")
    fmt = detect_format(records[0], source) if params.format == "auto" else params.format
    tally = Tally(source, params.max_malformed_share)
    examples = to_examples(records, fmt, tally)
    tally.check("ingest.max_malformed_share")
    files, no_preference = split_examples(examples, fmt, params)
    for name, fix in (("demonstrations", "raise ingest.demonstration_fraction"),
                      ("prompts", "lower ingest.demonstration_fraction + ingest.comparison_fraction")):
        if not files[name]:
            raise StageError(f"{source}: no conversation drew the {name} role among {len(examples)} usable records; "
                             f"add data or {fix}")
    with atomic_dir(out) as tmp:
        for name, rows in files.items():
            if rows:  # no rankings.jsonl without comparisons: `prepare` reads it only when present
                write_jsonl(tmp / f"{name}.jsonl", rows)
    result = {"source": source, "format": fmt, **tally.metrics(), "no_preference": no_preference,
              "written": {name: len(rows) for name, rows in files.items()},
              "multi_turn_prompts": sum(ex.turns > 1 for ex in examples)}
    write_json(metrics, result)
    return result


def summary(m: dict[str, Any]) -> str:
    w = m["written"]
    text = (f"{m['records']} {m['format']} records: {w['demonstrations']} demonstrations, {w['rankings']} rankings, "
            f"{w['prompts']} pool prompts, {w['corpus']} corpus docs")
    if m["skipped"]:
        text += f"; {m['skipped']} malformed skipped"
    return text

