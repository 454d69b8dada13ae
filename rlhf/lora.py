"""LoRA adapters (peft) for the training stages: sft, reward and ppo train low-rank adapters instead of every
weight, and write standard Hugging Face folders with the adapters merged in.

Why: full fine-tuning keeps AdamW's two moments and a gradient for every weight (16 bytes per parameter
in fp32 besides the weights), so a 1B model needs ~16 GB before activations. With LoRA (Hu et al. 2021)
the base weights are frozen and only `r`-rank factors A, B of the chosen linear layers train; their
optimizer state is a fraction of a percent of the model (docs/models.md, "Training a 1B model on one GPU").

How the stages use it: `add_adapters` injects the adapters into the Hugging Face model in place (peft's
`get_peft_model`) and returns that same model, so every forward in the stages (the backbone calls of the
reward and value heads included) runs through the adapters without knowing about peft. `merged` folds
them into the weights (`merge_and_unload`) before the stage saves, so the next stage and plain
`transformers` load an ordinary folder. `adapters_off` runs a model as its frozen base: PPO's reference
is the policy with its adapters switched off, not a second copy of the SFT weights.

peft is an optional dependency (`pip install 'rlhf[lora]'`); imported only when `lora_r > 0`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from rlhf.errors import StageError

ALL_LINEAR = "all-linear"
_WRAPPER = "_rlhf_peft_wrapper"  # the PeftModel of an adapted model, kept in its __dict__ (not a submodule)


@dataclass(frozen=True)
class LoraSettings:
    """A stage's `lora_*` params; `r` 0 means full fine-tuning (the default)."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    section: str

    @classmethod
    def of(cls, params: Any, section: str) -> LoraSettings:
        return cls(r=params.lora_r, alpha=params.lora_alpha, dropout=params.lora_dropout,
                   targets=tuple(params.lora_targets), section=section)

    @property
    def enabled(self) -> bool:
        return self.r > 0


def validate_params(params: Any, section: str) -> None:
    """Range checks of a stage's `lora_*` keys (called from its Params.validate)."""
    from rlhf.params import require

    require(params.lora_r >= 0, f"{section}.lora_r", "must be >= 0 (0 = off, full fine-tuning)")
    require(params.lora_alpha > 0, f"{section}.lora_alpha", "must be > 0")
    require(0.0 <= params.lora_dropout < 1.0, f"{section}.lora_dropout", "must be in [0, 1)")
    require(len(params.lora_targets) > 0, f"{section}.lora_targets",
            f"must name linear layers (e.g. [q_proj, v_proj]) or be [{ALL_LINEAR}]")
    require(not (getattr(params, "fsdp", False) and params.lora_r > 0), f"{section}.fsdp",
            "FSDP with LoRA is not supported yet: set fsdp: false (adapters are small; plain data parallel "
            "replicates them) or lora_r: 0")


def _linear_names(model) -> list[str]:
    """Leaf names of the linear layers inside the transformer body (Linear, and GPT-2's Conv1D): the
    `all-linear` targets. The LM head and the reward/value `score` head sit outside the body and are
    never adapted (the score head trains fully instead, `train_head`)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    body = getattr(model, model.base_model_prefix)
    return sorted({name.rsplit(".", 1)[-1] for name, m in body.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and "." in name})


def _targets(model, settings: LoraSettings) -> list[str]:
    """The module names to adapt; a name that matches nothing in the model is an error naming the key."""
    if settings.targets == (ALL_LINEAR,):
        return _linear_names(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.targets if t not in present]
    if missing:
        raise StageError(f"params key '{settings.section}.lora_targets': {missing[0]!r} is not a module of this "
                         f"{type(model).__name__}; its linear layers are {', '.join(_linear_names(model))} "
                         f"(or use [{ALL_LINEAR}])")
    return list(settings.targets)


def _import_peft():
    try:
        import peft
    except ImportError:
        raise StageError("LoRA (lora_r > 0) needs the peft package: pip install 'rlhf[lora]' (or pip install peft)") from None
    return peft


def add_adapters(model, settings: LoraSettings, *, seed: int, train_head: bool = False):
    """`model` with LoRA adapters injected (the same object; its other weights frozen), or `model` itself when
    LoRA is off. A = random (from `seed`, not the global RNG, so a run is reproducible), B = 0: the adapted
    model starts as the base. `train_head`: the `score` head of a reward or value model stays fully
    trainable (it is new, or the value function's, and small: hidden_size weights)."""
    if not settings.enabled:
        return model
    peft = _import_peft()
    import torch
    from transformers.pytorch_utils import Conv1D

    targets = _targets(model, settings)
    conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=targets, fan_in_fan_out=conv1d, bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        wrapper = peft.get_peft_model(model, config)
    inner = wrapper.get_base_model()
    if train_head:
        inner.score.requires_grad_(True)
    inner.__dict__[_WRAPPER] = wrapper
    return inner


def has_adapters(model) -> bool:
    return _WRAPPER in getattr(model, "__dict__", {})


def adapters_off(model):
    """Context in which `model` computes as its frozen base (a no-op for a model without adapters)."""
    if not has_adapters(model):
        return contextlib.nullcontext()
    return model.__dict__[_WRAPPER].disable_adapter()


def merged(model):
    """The model with its adapters folded into the weights, as a plain transformers model to save; the model
    itself when it has none. The adapted model is changed in place (its adapters are gone afterwards)."""
    if not has_adapters(model):
        return model
    wrapper = model.__dict__.pop(_WRAPPER)
    out = wrapper.merge_and_unload()
    for p in out.parameters():
        p.requires_grad_(True)  # as a freshly loaded model: nothing frozen
    return out


def trainable_parameters(model) -> list:
    """The parameters an optimizer updates: all of them, or the adapters (and a trainable head) under LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model) -> dict[str, int]:
    """{"trainable", "total"}: what a stage's metrics report under LoRA."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
