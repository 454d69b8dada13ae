"""Schema validation names file, line and field; atomic writes leave nothing half-written."""

import json

import pytest

from rlhf.errors import StageError
from rlhf.io import PROMPT_SCHEMA, atomic_dir, read_jsonl, write_jsonl, write_metrics


def write(path, text: bytes):
    path.write_bytes(text)
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty"),
        (b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n', r":2: broken JSON"),
        (b'{"id": "a"}\n', r":1: missing field 'prompt'"),
        (b'{"id": 3, "prompt": "x"}\n', r":1: field 'id' must be a string"),
        (b'{"id": "a", "prompt": "  "}\n', r":1: field 'prompt' is empty"),
        (b'["a", "b"]\n', r":1: expected a JSON object"),
        (b'{"id": "a", "prompt": "caf\xe9"}\n', r":1: not valid UTF-8"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, content, message):
    path = write(tmp_path / "prompts.jsonl", content)
    with pytest.raises(StageError, match=message) as exc:
        read_jsonl(path, PROMPT_SCHEMA)
    assert "prompts.jsonl" in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(StageError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_write_then_read_roundtrip_keeps_extra_fields(tmp_path):
    records = [{"id": "a", "prompt": "x", "family": "f"}]
    write_jsonl(tmp_path / "p.jsonl", records)
    assert read_jsonl(tmp_path / "p.jsonl", PROMPT_SCHEMA) == records


def test_atomic_dir_keeps_old_folder_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps({"v": 1}))
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text(json.dumps({"v": 2}))
            raise RuntimeError("killed mid-write")
    assert json.loads((out / "config.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_metrics_keeps_settings_out(tmp_path):
    path = tmp_path / "m.json"
    write_metrics(path, {"source": "human", "records": 3, "b": 1}, settings=["source"])
    assert json.loads(path.read_text()) == {"b": 1, "records": 3}
    assert path.read_text().index('"b"') < path.read_text().index('"records"')  # sorted, as write_json
