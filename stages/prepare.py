"""prepare: validate the raw inputs, deduplicate, and split prompts into disjoint sft / rm / ppo / test sets.

Reads  data/raw/{prompts,demonstrations,corpus}.jsonl (and, when present, rankings.jsonl and
       pairwise.jsonl supplied by the user, checked for leakage only). A prompt or demonstration may be a
       conversation given as `messages` (docs/formats.md); it is written as its transcript text.
Writes data/prepared/{sft,sft_val,rm,ppo,test,corpus}.jsonl and metrics/prepare.json.
Run    rlhf prepare --raw data/raw --out data/prepared

Splits are made by a hash of each prompt's normalized text, so the same prompt always lands in the
same split and two spellings of one prompt can never straddle train and test. Demonstration prompts
form the sft split. The run refuses to finish if a test prompt appears in any training input.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import StageError
from rlhf.io import (
    CORPUS_SCHEMA, DEMONSTRATION_SCHEMA, PAIRWISE_SCHEMA, PROMPT_SCHEMA, RANKING_SCHEMA, atomic_dir,
    read_jsonl, write_json, write_jsonl,
)
from rlhf.params import require
from rlhf.text import chat_turns, normalize, transcript


@dataclass(frozen=True)
class Params:
    seed: int
    """Salt of the split hash: change it to draw a different split of the same prompts."""
    test_fraction: float
    """Share of the prompt pool held out for evaluation (never trained on)."""
    rm_fraction: float
    """Share of the prompt pool whose sampled responses get ranked for the reward model."""
    sft_val_fraction: float
    """Share of demonstrations held out to measure SFT validation loss."""

    def validate(self) -> None:
        for key in ("test_fraction", "rm_fraction", "sft_val_fraction"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"prepare.{key}", f"must be in [0, 1), got {value}")
        require(self.test_fraction > 0, "prepare.test_fraction", "must be > 0: evaluation needs held-out prompts")
        require(self.test_fraction + self.rm_fraction < 1.0, "prepare.rm_fraction",
                "test_fraction + rm_fraction must leave prompts for ppo")


def split_unit(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the prompt's normalized text and the seed."""
    digest = hashlib.sha256(f"{seed}\x00{normalize(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(text: str, p: Params) -> str:
    u = split_unit(text, p.seed)
    if u < p.test_fraction:
        return "test"
    if u < p.test_fraction + p.rm_fraction:
        return "rm"
    return "ppo"


class CorpusTurns:
    """The chat turns of the corpus's documents in any common format (`rlhf.text.chat_turns`: this project's
    markers, HH transcripts, ChatML, Llama, …), normalized; `in` asks whether a prompt is one of their user
    turns, or, for a multi-turn prompt, a run of their turns in order. Plain documents have no turns."""

    def __init__(self, texts: list[str]) -> None:
        self.docs = [chat_turns(t) for t in texts]
        self.by_user_turn: dict[str, list[int]] = {}
        for i, turns in enumerate(self.docs):
            for role, body in turns:
                if role == "user":
                    self.by_user_turn.setdefault(body, []).append(i)

    def __contains__(self, prompt: str) -> bool:
        want = chat_turns(prompt, default="user")
        first = next((body for role, body in want if role == "user"), None)
        if first is None:
            return False
        n = len(want)
        for i in self.by_user_turn.get(first, ()):
            turns = self.docs[i]
            if any(turns[j: j + n] == want for j in range(len(turns) - n + 1)):
                return True
        return False


def from_messages(record: Any, where: str, *, demonstration: bool) -> Any:
    """A record that gives a conversation as `messages` ([{role: system/user/assistant, content}, …], the chat
    format) instead of `prompt` (and, for a demonstration, `response`), with those fields filled in: the
    prompt is the conversation up to the final user turn as text (`rlhf.text.transcript`), a demonstration's
    response its final assistant turn. Other records are returned as they are."""
    if not isinstance(record, dict) or "messages" not in record or "prompt" in record:
        return record
    messages = record["messages"]
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str) and m["content"].strip() for m in messages)
    if not ok:
        raise StageError(f"{where}: field 'messages' must be a list of {{role: system/user/assistant, content: "
                         "non-empty string}")
    turns = [(m["role"], m["content"]) for m in messages]
    last = "assistant" if demonstration else "user"
    if turns[-1][0] != last or (demonstration and (len(turns) < 2 or turns[-2][0] != "user")):
        raise StageError(f"{where}: 'messages' must end with " + ("a user turn and the assistant's answer"
                         if demonstration else "the user turn the model answers"))
    rest = {k: v for k, v in record.items() if k != "messages"}
    if demonstration:
        return {**rest, "prompt": transcript(turns[:-1]), "response": turns[-1][1].strip()}
    return {**rest, "prompt": transcript(turns)}


def read_records(path: Path, schema: dict, *, demonstration: bool = False) -> list[dict[str, Any]]:
    """prompts.jsonl or demonstrations.jsonl, each record in the flat format or as `messages` (`from_messages`)."""
    from rlhf.io import check_record

    records = read_jsonl(path)
    return [check_record(from_messages(r, f"{path}:{i}", demonstration=demonstration), schema, f"{path}:{i}")
            for i, r in enumerate(records, start=1)]


def dedupe_prompts(records: list[dict[str, Any]], path: Path) -> tuple[list[dict[str, Any]], int]:
    seen_ids: set[str] = set()
    seen_text: set[str] = set()
    kept = []
    for i, r in enumerate(records, start=1):
        if r["id"] in seen_ids:
            raise StageError(f"{path}:{i}: duplicate id '{r['id']}'; ids must be unique")
        seen_ids.add(r["id"])
        key = normalize(r["prompt"])
        if key in seen_text:
            continue
        seen_text.add(key)
        kept.append(r)
    return kept, len(records) - len(kept)


def check_leakage(test: list[dict[str, Any]], sources: dict[str, set[str] | CorpusTurns]) -> None:
    """Refuse to run if a test prompt appears in any training input (named in the message): a set holds
    normalized prompts, a `CorpusTurns` the corpus's chat turns."""
    for r in test:
        key = normalize(r["prompt"])
        for name, texts in sources.items():
            if (r["prompt"] if isinstance(texts, CorpusTurns) else key) in texts:
                raise StageError(
                    f"test prompt '{r['id']}' ({r['prompt'][:60]!r}) also appears in {name}: "
                    "remove it from the training input or from the prompt pool"
                )


def run(params: Params, *, raw: Path, out: Path, metrics: Path) -> dict[str, Any]:
    raw, out = Path(raw), Path(out)
    prompts_path, demos_path, corpus_path = raw / "prompts.jsonl", raw / "demonstrations.jsonl", raw / "corpus.jsonl"
    prompts = read_records(prompts_path, PROMPT_SCHEMA)
    demos = read_records(demos_path, DEMONSTRATION_SCHEMA, demonstration=True)
    corpus = read_jsonl(corpus_path, CORPUS_SCHEMA)
    extra: dict[str, set[str]] = {}
    if (raw / "rankings.jsonl").exists():
        extra["rankings.jsonl"] = {normalize(r["prompt"]) for r in read_jsonl(raw / "rankings.jsonl", RANKING_SCHEMA)}
    if (raw / "pairwise.jsonl").exists():
        extra["pairwise.jsonl"] = {normalize(r["prompt"]) for r in read_jsonl(raw / "pairwise.jsonl", PAIRWISE_SCHEMA)}

    prompts, dup_prompts = dedupe_prompts(prompts, prompts_path)

    # 1. Demonstrations: one per normalized prompt (the first wins); their prompts form the sft split.
    demo_seen: set[str] = set()
    sft_all = []
    for i, d in enumerate(demos):
        key = normalize(d["prompt"])
        if key in demo_seen:
            continue
        demo_seen.add(key)
        sft_all.append({"id": d.get("id", f"demo-{i:05d}"), **d})
    dup_demos = len(demos) - len(sft_all)
    sft, sft_val = [], []
    for d in sft_all:
        (sft_val if split_unit(d["prompt"], params.seed + 1) < params.sft_val_fraction else sft).append(d)

    # 2. The prompt pool minus demonstrated prompts splits into rm / ppo / test by normalized text.
    splits: dict[str, list[dict[str, Any]]] = {"rm": [], "ppo": [], "test": []}
    overlap_with_demos = 0
    for r in prompts:
        if normalize(r["prompt"]) in demo_seen:
            overlap_with_demos += 1
            continue
        splits[assign_split(r["prompt"], params)].append(r)
    if not splits["test"]:
        raise StageError(f"{prompts_path}: no prompt fell in the test split; add prompts or raise prepare.test_fraction")
    if not sft:
        raise StageError(f"{demos_path}: no demonstrations left for training after the validation split")

    # 3. Leakage: a test prompt must not be a demonstration, a corpus chat turn or a user-supplied label.
    check_leakage(splits["test"], {
        str(demos_path): demo_seen,
        f"{corpus_path} (as a chat user turn)": CorpusTurns([c["text"] for c in corpus]),
        "the rm split": {normalize(r["prompt"]) for r in splits["rm"]},
        "the ppo split": {normalize(r["prompt"]) for r in splits["ppo"]},
        **{str(raw / k): v for k, v in extra.items()},
    })

    corpus_seen: set[str] = set()
    corpus_kept = []
    for c in corpus:
        if c["text"] not in corpus_seen:
            corpus_seen.add(c["text"])
            corpus_kept.append({"text": c["text"]})

    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "sft.jsonl", sft)
        write_jsonl(tmp / "sft_val.jsonl", sft_val)
        for name, records in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", records)
        write_jsonl(tmp / "corpus.jsonl", corpus_kept)

    families = Counter(r.get("family", "unknown") for r in splits["test"])
    result = {
        "split_sizes": {"sft": len(sft), "sft_val": len(sft_val), "rm": len(splits["rm"]), "ppo": len(splits["ppo"]),
                        "test": len(splits["test"])},
        "corpus_docs": len(corpus_kept),
        "duplicates_dropped": {"prompts": dup_prompts, "demonstrations": dup_demos,
                               "corpus": len(corpus) - len(corpus_kept), "pool_prompts_demonstrated": overlap_with_demos},
        "test_families": dict(sorted(families.items())),
    }
    write_json(metrics, result)
    return result


def summary(m: dict[str, Any]) -> str:
    s = m["split_sizes"]
    return f"sft {s['sft']} (+{s['sft_val']} val), rm {s['rm']}, ppo {s['ppo']}, test {s['test']} prompts; corpus {m['corpus_docs']} docs"
