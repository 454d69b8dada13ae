"""User data in the common public formats: read a source with the `datasets` library, turn each record
into an `Example`, and count the records that do not fit (skipped, never fatal below a share).

Formats (docs/formats.md, "Importing your data"):

    hh        {"chosen", "rejected"}: HH-RLHF transcripts ("\\n\\nHuman: … \\n\\nAssistant: …") that differ in
              the final assistant turn (Bai et al. 2022)
    pairwise  {"prompt", "chosen", "rejected"}
    chat      {"messages": [{"role", "content"}, …]}: a demonstration, the conversation ending in an
              assistant turn (the format of chat SFT sets)
    ratings   {"prompt", "completions": [{"response", "score"}, …]} (UltraFeedback-style, `score` may also
              be `overall_score`): a K-way ranking, best first, equal scores tied

Sources: a JSONL/JSON file, a Parquet file, a folder written by `Dataset.save_to_disk`, or a Hugging Face
hub id (only where the network allows; offline it is one line saying so).

A multi-turn prompt is written as its transcript, the convention `rlhf.rm.parse_hh` uses for HH files:
"Human: q1\\n\\nAssistant: a1\\n\\nHuman: q2"; a single user turn is the plain question. Every stage
renders a transcript turn by turn with the tokenizer's chat template (rlhf.tokenization.chat_prompt).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import StageError

FORMATS = ("hh", "pairwise", "chat", "ratings")
MAX_MALFORMED_SHARE = 0.05
"""Default share of malformed records skipped before a reader gives up (4 of 2,312 in public HH data)."""


class Malformed(Exception):
    """A record that does not fit its format; the message is the reason, counted in the metrics."""


@dataclass(frozen=True)
class Example:
    prompt: str
    """The prompt text (earlier turns kept as text, see the module docstring)."""
    responses: tuple[str, ...]
    """Candidate responses: one for a demonstration, two or more for a comparison."""
    ranking: tuple[int, ...] = ()
    """Indices into `responses`, best first; empty for a demonstration."""
    ties: tuple[tuple[int, ...], ...] = ()
    """Groups of equally good responses (rankings' `ties` field, docs/formats.md)."""
    turns: int = 1
    """Messages in the prompt (user, assistant, system): 1 for a single question, which is plain text."""

    @property
    def is_comparison(self) -> bool:
        return len(self.ranking) >= 2

    @property
    def opening(self) -> str:
        """The conversation's first user turn (the prompt itself when it is a single question)."""
        if self.turns == 1:
            return self.prompt
        head = self.prompt.split("\n\nAssistant:", 1)[0]
        return head.rsplit("Human:", 1)[-1].strip()

    @property
    def prefers(self) -> bool:
        """A comparison that orders two different texts (not identical answers, not all tied)."""
        tied = max((len(t) for t in self.ties), default=1)
        return self.is_comparison and len(set(self.responses)) > 1 and tied < len(self.responses)


@dataclass
class Tally:
    """Records read and malformed ones by reason; `check` stops above `max_share` and warns below it."""

    source: str
    max_share: float = MAX_MALFORMED_SHARE
    records: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def metrics(self) -> dict[str, Any]:
        return {"records": self.records, "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped)}

    def check(self, key: str) -> None:
        """StageError when the malformed share exceeds `max_share` (named by the params `key`); else one warning line."""
        n = sum(self.skipped.values())
        if not n:
            return
        reasons = "; ".join(f"{c} {r}" for r, c in self.skipped.most_common())
        share = n / max(1, self.records)
        if share > self.max_share:
            raise StageError(f"{self.source}: {n} of {self.records} records malformed ({share:.1%} > {key}="
                             f"{self.max_share}): {reasons}; fix the data or raise {key}")
        from rlhf.terminal import visible

        print(visible(f"warning: {self.source}: skipped {n} of {self.records} malformed records ({reasons})",
                      one_line=True), file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Records -> examples


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise Malformed(f"'{key}' missing or not a string")
    if not value.strip():
        raise Malformed(f"empty '{key}'")
    return value.strip()


def render_prompt(turns: list[tuple[str, str]]) -> str:
    """(role, text) turns ending in the user's -> the prompt text (`rlhf.text.transcript`)."""
    from rlhf.text import transcript

    return transcript(turns)


def from_hh(record: dict[str, Any]) -> Example:
    from rlhf.rm import ASSISTANT, parse_hh

    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    if chosen.endswith(ASSISTANT.strip()) or rejected.endswith(ASSISTANT.strip()):
        raise Malformed("empty final assistant turn")
    try:
        prompt, good, bad = parse_hh("\n\n" + chosen, "\n\n" + rejected)
    except StageError as exc:
        raise Malformed(str(exc).split(": ", 1)[-1]) from None
    return Example(prompt, (good, bad), (0, 1), turns=1 + 2 * prompt.count(ASSISTANT))


def from_pairwise(record: dict[str, Any]) -> Example:
    prompt, good, bad = _text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected")
    return Example(prompt, (good, bad), (0, 1))


def from_chat(record: dict[str, Any]) -> Example:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Malformed("'messages' missing or not a list")
    turns = []
    for m in messages:
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise Malformed("a message is not {role: system/user/assistant, content: str}")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise Malformed("the conversation does not end with an assistant turn")
    if not turns[-1][1].strip():
        raise Malformed("empty final assistant turn")
    if len(turns) < 2 or turns[-2][0] != "user" or any(not t.strip() for _, t in turns[:-1]):
        raise Malformed("no user turn before the final assistant turn, or an empty turn")
    return Example(render_prompt(turns[:-1]), (turns[-1][1].strip(),), turns=len(turns) - 1)


def _score(completion: Any) -> tuple[str, float]:
    if not isinstance(completion, dict):
        raise Malformed("a completion is not an object")
    response = completion.get("response")
    score = next((completion[k] for k in ("score", "overall_score") if completion.get(k) is not None), None)
    if not isinstance(response, str) or not response.strip():
        raise Malformed("a completion has an empty or missing 'response'")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
        raise Malformed("a completion has no numeric 'score'")
    return response.strip(), float(score)


def from_ratings(record: dict[str, Any]) -> Example:
    prompt = _text(record, "prompt")
    completions = record.get("completions")
    if not isinstance(completions, list):
        raise Malformed("'completions' missing or not a list")
    scored: dict[str, float] = {}
    for c in completions:  # one text written twice counts once, at its best score
        response, score = _score(c)
        scored[response] = max(score, scored.get(response, score))
    if len(scored) < 2:
        raise Malformed("fewer than two different completions")
    responses = tuple(scored)
    ranking = tuple(sorted(range(len(responses)), key=lambda i: -scored[responses[i]]))
    ties: list[tuple[int, ...]] = []
    start = 0
    for end in range(1, len(ranking) + 1):
        if end == len(ranking) or scored[responses[ranking[end]]] != scored[responses[ranking[start]]]:
            if end - start > 1:
                ties.append(ranking[start:end])
            start = end
    return Example(prompt, responses, ranking, tuple(ties))


READERS = {"hh": from_hh, "pairwise": from_pairwise, "chat": from_chat, "ratings": from_ratings}


def detect_format(record: dict[str, Any], source: str) -> str:
    """The format whose keys the (first) record has."""
    keys = set(record) if isinstance(record, dict) else set()
    for fmt, need in (("ratings", {"prompt", "completions"}), ("pairwise", {"prompt", "chosen", "rejected"}),
                      ("hh", {"chosen", "rejected"}), ("chat", {"messages"})):
        if need <= keys:
            return fmt
    raise StageError(f"{source}: cannot tell the format from the first record's fields {sorted(keys)}; "
                     f"set ingest.format to one of {', '.join(FORMATS)}")


def to_examples(records: list[dict[str, Any]], fmt: str, tally: Tally) -> list[Example]:
    """Every record that fits `fmt` as an Example; the others are counted in `tally` by reason."""
    read = READERS[fmt]
    out = []
    for record in records:
        tally.records += 1
        try:
            if not isinstance(record, dict):
                raise Malformed("not an object")
            out.append(read(record))
        except Malformed as exc:
            tally.skip(str(exc))
    return out


# ----------------------------------------------------------------------------------------------
# Sources


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return (len(parts) <= 2 and all(parts) and not source.startswith((".", "~"))
            and Path(source).suffix.lower() not in (".jsonl", ".json", ".parquet"))


def load_records(source: str, split: str) -> list[dict[str, Any]]:
    """Records of a JSONL/JSON or Parquet file, a `save_to_disk` folder, or a hub id, via `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(source)
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        elif path.is_file():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
            if kind is None:
                raise StageError(f"{source}: unknown file type {path.suffix!r}; give a .jsonl, .json or .parquet "
                                 "file, a folder saved with Dataset.save_to_disk, or a hub id")
            import tempfile

            with tempfile.TemporaryDirectory(prefix="rlhf-ingest-") as cache:  # no stale cache between runs
                data = datasets.load_dataset(kind, data_files=str(path), cache_dir=cache, keep_in_memory=True)
                return pick_split(data, split, source).to_list()
        elif _is_hub_id(source):
            data = load_hub(source)
        else:
            raise StageError(f"{source}: file or folder not found")
    except StageError:
        raise
    except Exception as exc:  # pyarrow and datasets errors: one line, never a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StageError(f"{source}: could not read it with `datasets` ({type(exc).__name__}: {first[:300]})") from None
    return pick_split(data, split, source).to_list()


def load_hub(source: str):
    """A hub dataset; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or unreachable it is one clear line."""
    import os

    import datasets

    if any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise StageError(f"{source}: not a local file or folder, and the hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                         "is set); download the data set and pass its file or folder")
    try:
        return datasets.load_dataset(source)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StageError(f"{source}: could not load it from the Hugging Face hub ({first[:300]}); "
                         "download the data set and pass its file or folder") from None


def pick_split(data, split: str, source: str):
    """One split of a DatasetDict (`split`, or its only split); a Dataset as it is."""
    if not hasattr(data, "keys"):
        return data
    names = list(data.keys())
    if split in names:
        return data[split]
    if len(names) == 1 and split in ("", "train"):
        return data[names[0]]
    raise StageError(f"{source}: no split {split!r} (it has {', '.join(names)}); set ingest.split")
