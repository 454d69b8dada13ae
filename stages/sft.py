"""sft: supervised fine-tuning of the base model on labelers' demonstrations.

Reads  models/base, data/prepared/{sft,sft_val,test}.jsonl, data/raw/world.json (gold judge, optional)
Writes models/sft (HF folder), metrics/sft.json, plots/sft (dvclive curves)
Run    rlhf sft

Each example is the chat prompt followed by the demonstration and EOS; the loss counts response
tokens (and the EOS) only, so the model learns to answer and stop, not to imitate prompts. After
training, base and SFT answer the held-out test prompts greedily and the world's gold judge scores both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import StageError
from rlhf.gold import gold_compare
from rlhf.io import DEMONSTRATION_SCHEMA, PROMPT_SCHEMA, read_jsonl, remove_outputs, timing, write_json
from rlhf.params import require, to_dict
from rlhf.training import IGNORE_INDEX, build_example, collate


@dataclass(frozen=True)
class Params:
    epochs: int
    """Passes over the demonstrations: ~5-10 on ~300 demos works; longer collapses diversity (measured on a prototype of this world)."""
    batch_size: int
    """Examples per optimizer step."""
    lr: float
    """Peak AdamW learning rate, cosine-annealed to lr/10."""
    warmup_steps: int
    """Linear warm-up steps."""
    weight_decay: float
    """AdamW weight decay."""
    max_len: int
    """Longest prompt+response in tokens (lowered to the model's position limit); a longer example loses the
    start of its prompt, one whose response alone does not fit is dropped (metrics: lengths)."""
    eval_max_new_tokens: int
    """Response length cap when answering test prompts for the gold comparison; a warning when it is below
    the demonstrations' 95th-percentile response length (metrics: response_tokens_p95)."""
    eval_prompts: int
    """How many test prompts the gold judge scores for base vs SFT (0 = all)."""
    checkpoint_every: int
    """Steps between resumable checkpoints (0 disables)."""
    seed: int
    """Data-order seed."""
    threads: int
    """torch CPU threads; 0 leaves torch's default."""
    device: str
    """'auto', 'cpu' or 'cuda'."""
    fsdp: bool
    """Under a multi-process launch, shard parameters, gradients and optimizer state across the processes
    (FSDP2, rlhf/dist.py) instead of a whole copy on each; false: plain data parallel. No effect with one
    process. docs/models.md, "When a model outgrows one device"."""
    lora_r: int
    """LoRA rank (rlhf/lora.py, docs/models.md); 0 trains every weight (the default). > 0: the causal LM's linear layers get adapters; merged into models/sft at the end."""
    lora_alpha: float
    """LoRA scale numerator: the adapters' update is scaled by lora_alpha / lora_r."""
    lora_dropout: float
    """Dropout on the adapters' input while training (0 = none)."""
    lora_targets: list[str]
    """Names of the linear layers that get adapters (e.g. [q_proj, v_proj]); [all-linear]: every linear layer
    of the transformer body (never the LM head or the score head)."""

    def validate(self) -> None:
        from rlhf.lora import validate_params

        validate_params(self, "sft")
        for key in ("epochs", "batch_size", "max_len", "eval_max_new_tokens"):
            require(getattr(self, key) > 0, f"sft.{key}", "must be > 0")
        require(self.lr > 0, "sft.lr", "must be > 0")
        require(self.eval_prompts >= 0, "sft.eval_prompts", "must be >= 0")


@torch.no_grad()
def validation_loss(model, examples: list[tuple[list[int], list[int]]], pad_id: int, device,
                    batch_size: int = 64) -> float:
    """Mean loss per response token over `examples` (batches weighted by their response tokens)."""
    from rlhf.devices import autocast
    from rlhf.training import masked_lm_loss

    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask, labels = (t.to(device) for t in collate(examples[i: i + batch_size], pad_id))
        with autocast(device):
            loss = masked_lm_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    return total / count


def fitting_examples(tokenizer, demos: list[dict[str, Any]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """The demonstrations as examples that fit `max_len`; the ones whose response alone does not are left out."""
    examples = (build_example(tokenizer, d["prompt"], d["response"], max_len) for d in demos)
    return [e for e in examples if e is not None]


def response_p95(tokenizer, demos: list[dict[str, Any]]) -> int:
    """95th percentile of the demonstrations' response lengths in tokens, EOS included (nearest rank)."""
    from rlhf.tokenization import encode_response

    sizes = sorted(len(encode_response(tokenizer, d["response"])) for d in demos)
    return sizes[max(0, math.ceil(0.95 * len(sizes)) - 1)] if sizes else 0


def check_response_budget(p95: int, max_new_tokens: int) -> None:
    """One warning line when a response cap is below what most demonstrations need: SFT learns to stop
    after ~p95 tokens, and a sampler cut before that rarely sees an EOS (sample, ppo: ended_share)."""
    if max_new_tokens < p95:
        from rlhf.progress import console

        console.print(f"[yellow]sft: 95% of the demonstrations' responses take up to {p95} tokens, more than "
                      f"sft.eval_max_new_tokens={max_new_tokens}; give sample and ppo a max_new_tokens of at least "
                      f"{p95} so responses can end with EOS", soft_wrap=True)


def save_merged(model, tokenizer, out: Path, lora, result: dict[str, Any]):
    """Save `model` as a plain HF folder, LoRA adapters folded into the weights (rlhf/lora.py), and return that
    model; under LoRA the metrics get the rank and the trainable share of the parameters."""
    from rlhf.lora import merged, parameter_counts
    from rlhf.models import save_model

    if lora.enabled:
        result["lora"] = {"r": lora.r, "parameters": parameter_counts(model)}
    model = merged(model)
    save_model(model, tokenizer, out)
    return model


def gold_test(params: Params, *, base: Path, sft, tokenizer, test: list[dict[str, Any]], judge, device) -> dict[str, Any]:
    """Greedy answers of the base model and SFT on the test prompts (`eval_prompts` of them; 0 = all), scored
    by the gold judge: evaluation only, never trained on."""
    from rlhf.models import load_causal_lm

    prompts = [r["prompt"] for r in test][: params.eval_prompts or None]
    return gold_compare({"base": load_causal_lm(base).to(device), "sft": sft}, tokenizer, prompts, judge,
                        max_new_tokens=params.eval_max_new_tokens, device=device)


def run(params: Params, *, base: Path, data: Path, world: Path | None, out: Path, metrics: Path, plots: Path,
        checkpoints: Path | None) -> dict[str, Any]:
    from rlhf.devices import autocast, make_optimizer
    from rlhf.dist import gather_model, shard_model, start_stage
    from rlhf.gold import load_judge
    from rlhf.lengths import length_tally
    from rlhf.lora import LoraSettings, add_adapters, trainable_parameters
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.training import (Checkpointer, cosine_lr, epoch_batches, file_digest, fingerprint, masked_lm_loss, open_live,
                               train_loop, training_max_len)

    t0, data = time.time(), Path(data)
    dist, device = start_stage(params)
    tokenizer = load_tokenizer(base)
    lora = LoraSettings.of(params, "sft")
    model = add_adapters(load_causal_lm(base).to(device), lora, seed=params.seed)  # the model itself when lora_r is 0
    demos = read_jsonl(data / "sft.jsonl", DEMONSTRATION_SCHEMA)
    val_demos = read_jsonl(data / "sft_val.jsonl", DEMONSTRATION_SCHEMA, allow_empty=True)
    test = read_jsonl(data / "test.jsonl", PROMPT_SCHEMA)
    judge = load_judge(world) if dist.is_main else None  # a broken world file fails now, not after training
    if dist.is_main:
        # Like `dvc repro`, which deletes a stage's outs first: a killed or failed run leaves no stale
        # model or metrics from an earlier run that would look like this run's result.
        remove_outputs(out, metrics)

    # 1. Examples: prompt tokens masked out of the loss, EOS appended to every response; too long for the
    #    model: the prompt cut on the left, or the example dropped when its response alone does not fit.
    lengths, max_len = length_tally(), training_max_len(params.max_len, model)
    train_ex, val_ex = fitting_examples(tokenizer, demos, max_len), fitting_examples(tokenizer, val_demos, max_len)
    if len(train_ex) < params.batch_size:
        raise StageError(f"{data / 'sft.jsonl'}: {len(train_ex)} demonstrations, fewer than sft.batch_size={params.batch_size}")
    p95 = response_p95(tokenizer, demos)
    steps_per_epoch = len(train_ex) // params.batch_size
    total_steps = params.epochs * steps_per_epoch

    model = shard_model(model, dist, device)  # under `fsdp: true` and several processes; else the model itself
    optimizer = make_optimizer(trainable_parameters(model), params.lr, params.weight_decay, device)
    checkpointer = Checkpointer(checkpoints, fingerprint(to_dict(params), file_digest(base), file_digest(data / "sft.jsonl")))

    def loss_fn(step: int) -> torch.Tensor:
        batch = [train_ex[i] for i in dist.shard(epoch_batches(len(train_ex), params.batch_size, step, params.seed))]
        ids, mask, labels = (t.to(device) for t in collate(batch, tokenizer.pad_token_id))
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return masked_lm_loss(logits, labels)

    def evaluate() -> dict[str, float]:
        return {"val_loss": validation_loss(model, val_ex, tokenizer.pad_token_id, device)} if val_ex else {}

    live = open_live(plots, resume=checkpointer.load() is not None) if dist.is_main else None
    t_train = time.time()
    last = train_loop(
        model=model, optimizer=optimizer, loss_fn=loss_fn, total_steps=total_steps,
        lr_at=lambda s: cosine_lr(s, total_steps, lr=params.lr, warmup=params.warmup_steps),
        checkpointer=checkpointer, checkpoint_every=params.checkpoint_every, live=live,
        description="sft", evaluate=evaluate, eval_every=steps_per_epoch, dist=dist, device=device,
    )
    train_s, start = time.time() - t_train, last["resumed_from"]
    model = gather_model(model, dist, device)  # sharded: whole on rank 0 (None elsewhere)
    result: dict[str, Any] = {
        "demonstrations": len(train_ex), "val_demonstrations": len(val_ex), "steps": total_steps,
        "train_loss": round(last["train_loss"], 4), "processes": dist.world_size, "response_tokens_p95": p95,
        **({"val_loss": round(last["val_loss"], 4)} if "val_loss" in last else {}),
    }
    if not dist.is_main:  # rank 0 writes the model and metrics and runs the gold comparison
        result["timing"] = timing(t0, resumed_from=start)
        return result
    live.end()
    model = save_merged(model, tokenizer, out, lora, result)

    # 2. Gold judge on held-out test prompts: base vs SFT, greedy (evaluation only, never trained on).
    if judge is not None:
        result["test"] = gold_test(params, base=base, sft=model, tokenizer=tokenizer, test=test, judge=judge, device=device)
    result["lengths"] = lengths.report("sft")
    check_response_budget(p95, params.eval_max_new_tokens)
    # Demonstrations per second of the training loop (every rank's share of each batch).
    result["timing"] = timing(t0, train_s=train_s, done=(total_steps - start) * params.batch_size, unit="examples", resumed_from=start)
    write_json(metrics, result)  # written last: its presence marks a finished run
    checkpointer.clear()  # only now: a kill during the gold comparison still resumes near the end
    return result


def summary(m: dict[str, Any]) -> str:
    text = f"{m['steps']} steps, train loss {m['train_loss']}"
    if "val_loss" in m:
        text += f", val loss {m['val_loss']}"
    if "test" in m:
        g = m["test"]
        text += f"; gold on {g['prompts']} test prompts: base {g['base']['gold']['total']:.3f} -> sft {g['sft']['gold']['total']:.3f}"
    return text + f" ({m['timing']['wall_s']} s)"
