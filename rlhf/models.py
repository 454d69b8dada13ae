"""Models: building, loading and saving Hugging Face model folders (weights, config and tokenizer).

The safety rules live here: safetensors only, `trust_remote_code` off unless params turn it on, nothing
read from the Hub in tests and CI (`offline_hub`); a folder that is missing or incomplete is one line
naming the command that writes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from rlhf.errors import StageError
from rlhf.tokenization import prepare_tokenizer


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """`path` if it is a Hugging Face model folder with safetensors weights; else a StageError naming
    the fix (for a pipeline folder, the command that writes it)."""
    path = Path(path)
    if not path.is_dir():
        # The pipeline's model folders (dvc.yaml outs) and the stage that writes each; a test checks dvc.yaml.
        written_by = {"base": "pretrain", "sft": "sft", "reward": "reward", "dpo": "dpo", "policy": "ppo", "value": "ppo",
                      "rloo": "rloo", "grpo": "grpo"}
        # The controls (`rlhf ppo --set KEY=0`) and the second round: outputs of their own, run by their dvc.yaml stage.
        controls = {"sft_ptx": "sft_ptx", "policy_noptx": "ppo_noptx", "value_noptx": "ppo_noptx",
                    "reward_round2": "reward_round2", "policy_round2": "ppo_round2", "value_round2": "ppo_round2"}
        in_models = path.parent.name == "models"
        stage = written_by.get(path.name) if in_models else None
        if stage is not None:
            raise StageError(f"{path}: {what} folder not found; run `rlhf {stage}` (or `dvc repro {stage}`) first")
        if in_models and path.name in controls:
            raise StageError(f"{path}: {what} folder not found; run `dvc repro {controls[path.name]}` first")
        raise StageError(f"{path}: {what} folder not found; check the path, or run `dvc repro` to build the "
                         "pipeline's models")
    if not (path / "config.json").is_file():
        raise StageError(f"{path}: not a Hugging Face {what} folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise StageError(
            f"{path}: no *.safetensors weights; only safetensors are loaded (re-save the model with "
            "save_pretrained(..., safe_serialization=True))"
        )
    return path


def _load_kwargs(trust_remote_code: bool) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Safe loading: safetensors only, no remote code unless params say so.
    return {"use_safetensors": True, "trust_remote_code": trust_remote_code}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if not Path(path).exists():  # else transformers reports a missing folder as a malformed hub id
            check_model_dir(path)  # raises, naming the command that writes the folder
        if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            raise StageError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                             "save the tokenizer into the model folder (tokenizer.save_pretrained)") from None
        raise StageError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    prepare_tokenizer(tok)
    return tok


def load_causal_lm(path: str | Path, *, trust_remote_code: bool = False, local_only: bool = True):
    from transformers import AutoModelForCausalLM

    if local_only:
        check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **_load_kwargs(trust_remote_code))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot load a causal LM ({str(exc).splitlines()[0]})") from None
    except SafetensorError as exc:
        raise StageError(f"{path}: corrupt *.safetensors weights ({exc}); re-save or re-download the model") from None
    return model


def load_reward_model(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification

    check_model_dir(path, "reward model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=torch.float32, **_load_kwargs(trust_remote_code)
        )
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot load a reward model ({str(exc).splitlines()[0]})") from None
    except SafetensorError as exc:
        raise StageError(f"{path}: corrupt *.safetensors weights ({exc}); re-save or re-download the model") from None
    if model.config.num_labels != 1:
        raise StageError(f"{path}: reward model must have num_labels=1, has {model.config.num_labels}")
    return model


def build_llama(tokenizer, *, hidden: int, layers: int, heads: int, intermediate: int, max_len: int, seed: int):
    """A Llama-architecture decoder built from a config (no downloaded weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_model(model, tokenizer, out: str | Path) -> None:
    """Write a standard HF folder (config, safetensors, tokenizer with chat template) atomically.

    A failed write (a full disk, a permission) leaves no folder under `out` and is one line naming
    the file: safetensors reports it as SafetensorError "(os error 28)", turned here into the OSError
    it is, named after the weights file, so `atomic_dir` reports it like any other write.
    """
    from transformers.utils import logging as hf_logging

    from rlhf.io import atomic_dir, write_errno

    hf_logging.disable_progress_bar()  # our own progress bars are enough; keep the log one line per stage

    # The weights, plus the tokenizer files (tokenizer.json takes ~60 bytes per vocabulary entry) and config.
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 64 * len(tokenizer) + 100_000
    with atomic_dir(out, need=need) as tmp:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        except Exception as exc:
            code = write_errno(exc)
            if code is None or isinstance(exc, OSError):
                raise
            raise OSError(code, os.strerror(code), str(tmp / "model.safetensors")) from exc
        tokenizer.save_pretrained(tmp)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def offline_hub() -> None:
    """Tests and CI never reach the Hub: a hub id would otherwise hang ~47 s before failing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
