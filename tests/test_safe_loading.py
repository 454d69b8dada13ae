"""Safe loading: weights only from safetensors, no remote code unless params allow it, nothing
unpickled from user files.

Each attack is a planted file whose code, if it ever ran, would leave a marker file behind; the
tests assert the marker never appears (and, as a control, that it does appear when the unsafe path
is taken on purpose, so the test would notice).
"""

from __future__ import annotations

import inspect
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhf.errors import StageError
from tests.conftest import ROOT, TINY


class _Payload:
    """Unpickling this runs `Path(marker).write_text(...)`: what a malicious pickle would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def pickle_only_folder(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of a model folder whose only weights are a pickle (pytorch_model.bin) with a payload."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    torch.save({"payload": _Payload(marker)}, dst / "pytorch_model.bin")
    return dst


def test_pickle_only_weights_are_refused_and_never_unpickled(tiny_run, tmp_path):
    from rlhf.models import load_causal_lm, load_reward_model

    marker = tmp_path / "PWNED"
    folder = pickle_only_folder(tiny_run.base, tmp_path / "model", marker)
    for load in (load_causal_lm, load_reward_model):
        with pytest.raises(StageError, match=r"no \*\.safetensors weights; only safetensors are loaded"):
            load(folder)
    assert not marker.exists()
    # Control: the payload is live; torch.load without weights_only would have run it.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_pretrain_base_model_with_pickle_weights_fails_via_cli(tiny_run, tmp_path):
    from cli.main import app

    marker = tmp_path / "PWNED"
    folder = pickle_only_folder(tiny_run.base, tmp_path / "hf-model", marker)
    params = tmp_path / "params.yaml"
    params.write_text(TINY.read_text().replace('base_model: ""', f'base_model: "{folder}"', 1))
    out, metrics = tmp_path / "models/base", tmp_path / "metrics/pretrain.json"
    res = CliRunner().invoke(app, ["pretrain", "--corpus", str(tiny_run.prepared / "corpus.jsonl"), "--out", str(out),
                                   "--metrics", str(metrics), "--plots", str(tmp_path / "plots"),
                                   "--checkpoints", str(tmp_path / "ckpt"), "--params", str(params)])
    assert res.exit_code == 1
    assert "only safetensors are loaded" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists() and not metrics.exists()


def test_trust_remote_code_is_off_by_default():
    import yaml

    from rlhf import models

    for fn in (models.load_tokenizer, models.load_causal_lm, models.load_reward_model):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    for path in (ROOT / "params.yaml", TINY):
        assert yaml.safe_load(path.read_text())["pretrain"]["trust_remote_code"] is False, path


def remote_code_folder(src: Path, dst: Path, marker: Path, model_type: str | None = None) -> Path:
    """A model folder whose config and tokenizer config point (auto_map) at code shipped beside them."""
    shutil.copytree(src, dst)
    (dst / "custom_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_code.EvilConfig", "AutoModelForCausalLM": "custom_code.EvilModel"}
    if model_type:
        config["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(config))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["custom_code.EvilTokenizer", "custom_code.EvilTokenizer"]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    return dst


def test_auto_map_code_in_a_model_folder_is_not_executed(tiny_run, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dyn

    from rlhf.models import load_causal_lm, load_tokenizer

    marker = tmp_path / "EXECUTED"
    # A folder of a known architecture: loaded with the library's own class, its code ignored.
    known = remote_code_folder(tiny_run.base, tmp_path / "known", marker)
    assert type(load_causal_lm(known)).__name__ == "LlamaForCausalLM"
    load_tokenizer(known)
    assert not marker.exists()

    # An architecture only its own code defines: refused with a clear error, code still not run.
    custom = remote_code_folder(tiny_run.base, tmp_path / "custom", marker, model_type="evil-arch")
    with pytest.raises(StageError, match="cannot load a causal LM"):
        load_causal_lm(custom)
    assert not marker.exists()

    # Control: with trust_remote_code=True (what params must ask for explicitly) the code does run.
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    try:
        load_causal_lm(known, trust_remote_code=True)
    except Exception:  # noqa: BLE001 - only whether the module was imported matters here
        pass
    assert marker.exists()


def test_checkpoints_are_loaded_with_weights_only(tmp_path):
    from rlhf.training import Checkpointer

    marker = tmp_path / "PWNED"
    ckpt = Checkpointer(tmp_path / "ckpt", tag="run")
    ckpt.path.parent.mkdir(parents=True)
    torch.save({"tag": "run", "step": 3, "payload": _Payload(marker)}, ckpt.path)
    assert ckpt.load() is None  # refused as unreadable: a fresh start, not code execution
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # control: the payload is live
    assert marker.exists()


def test_source_never_unpickles_or_loads_non_safetensors_weights():
    """Static guard over the package: every torch.load is weights_only, no pickle, model loads safetensors-only."""
    sources = {p: p.read_text() for d in ("rlhf", "stages", "cli") for p in sorted((ROOT / d).glob("*.py"))}
    for path, text in sources.items():
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
        for call in re.finditer(r"AutoModel\w*\.from_pretrained\(", text):
            window = text[call.end(): call.end() + 300]
            assert "use_safetensors=True" in window or "_load_kwargs(" in window, f"{path}: {call.group(0)}"
