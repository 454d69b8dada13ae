"""reward: train the reward model on rankings with InstructGPT's K-choose-2 loss.

Reads  models/sft, data/rankings/rankings.jsonl (or a pairwise / HH-RLHF file, `reward.data_format`),
       data/prepared/sft.jsonl (demonstrations, for the bias), data/raw/world.json (gold judge, optional)
Writes models/reward (HF folder, AutoModelForSequenceClassification, num_labels=1), metrics/reward.json,
       plots/reward (dvclive curves)
Run    rlhf reward

The recipe (Ouyang et al. 2022 sec. 3.5):
1. The RM is the SFT model with its LM head replaced by a scalar head (small init); the scalar is read
   at the last real token, the EOS that ends `chat prompt + response`.
2. All C(K,2) pairs of one prompt's ranking form ONE batch element: each response gets one forward
   pass, and the loss is -1/C(K,2) Σ log σ(r_w - r_l). Pairs of identical responses carry no
   preference and are dropped. (`batching: pairs` is the naive variant, one batch element per pair
   shuffled across batches, kept for bench/rm_kway_vs_pairwise.py.)
3. A cosine-annealed learning rate. InstructGPT trains one epoch on 33k prompts (more overfit); on the
   default world's ~1,300 ranked prompts one epoch underfits and the result swings with the sample
   draw (61-71% gold accuracy), while the held-out label accuracy still rises through 5 epochs,
   so the default is 5 (docs/world.md, "What limits the reward model").
4. A share of prompts (all of their rankings) is held out; held-out pairwise accuracy against the
   labels and, with a world, against the gold judge, and Spearman correlation with the gold judge.
5. A bias is added so the demonstrations' mean reward is 0 (InstructGPT's choice; lm-human-preferences
   normalized on policy samples instead). A Llama-style head has no bias term, so it is stored as
   `reward_bias` in config.json; `rlhf.rm.rewards_from_ids` / `score_texts` add it (see rlhf/rm.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhf.errors import StageError
from rlhf.io import DEMONSTRATION_SCHEMA, read_jsonl, timing, write_json
from rlhf.params import require, to_dict
from rlhf.preferences import heldout_metrics, heldout_summary, read_groups, split_heldout

BIAS_METHOD = "demonstrations_mean_zero"  # docs/ppo.md item 3: InstructGPT's centering


@dataclass(frozen=True)
class Params:
    data_format: Literal["rankings", "pairwise", "hh"]
    """Format of the --data file: 'rankings' (K-way, from `rank`), 'pairwise' {prompt, chosen, rejected},
    or 'hh' (Anthropic HH-RLHF {chosen, rejected} transcripts)."""
    extra_pairs: str
    """Optional extra comparisons file trained on together with --data ('' = none); add it to the
    reward stage's deps in dvc.yaml when you set it."""
    extra_format: Literal["pairwise", "hh", "rankings"]
    """Format of `extra_pairs` ('rankings': e.g. a second round ranked on a policy's samples)."""
    max_malformed_share: float
    """Share of an HH file's records that may be malformed (e.g. an empty final assistant turn): skipped,
    counted in the metrics' `data`, one warning line; above it the stage stops."""
    batching: Literal["kway", "pairs"]
    """'kway': all pairs of a prompt in one batch element (InstructGPT); 'pairs': one element per pair."""
    epochs: int
    """Passes over the comparisons; 1 is the norm at InstructGPT's data size (docs/ppo.md item 4), 5 here."""
    batch_size: int
    """Prompts (ranking records) per optimizer step."""
    lr: float
    """Peak AdamW learning rate, cosine-annealed to lr/10."""
    warmup_steps: int
    """Linear warm-up steps."""
    weight_decay: float
    """AdamW weight decay."""
    max_len: int
    """Longest prompt+response in tokens (lowered to the model's position limit); a longer one loses the start
    of its prompt, and a comparison with a response that alone does not fit is dropped (metrics: lengths)."""
    head_init_std: float
    """Std of the scalar head's initial weights: small, so the initial rewards are near 0."""
    val_fraction: float
    """Share of prompts held out (with all of their rankings) for validation."""
    eval_every: int
    """Steps between validation evaluations on the curve (0 = only at the end)."""
    checkpoint_every: int
    """Steps between resumable checkpoints (0 disables)."""
    seed: int
    """Head init, data order and split seed."""
    threads: int
    """torch CPU threads; 0 leaves torch's default."""
    device: str
    """'auto', 'cpu' or 'cuda'."""
    fsdp: bool
    """Under a multi-process launch, shard parameters, gradients and optimizer state across the processes
    (FSDP2, rlhf/dist.py) instead of a whole copy on each; false: plain data parallel. No effect with one
    process. docs/models.md, "When a model outgrows one device"."""
    lora_r: int
    """LoRA rank (rlhf/lora.py, docs/models.md); 0 trains every weight (the default). > 0: the SFT body's linear layers get adapters and the score head trains fully; merged into models/reward."""
    lora_alpha: float
    """LoRA scale numerator: the adapters' update is scaled by lora_alpha / lora_r."""
    lora_dropout: float
    """Dropout on the adapters' input while training (0 = none)."""
    lora_targets: list[str]
    """Names of the linear layers that get adapters (e.g. [q_proj, v_proj]); [all-linear]: every linear layer
    of the transformer body (never the LM head or the score head)."""

    def validate(self) -> None:
        from rlhf.lora import validate_params

        validate_params(self, "reward")
        for key in ("epochs", "batch_size", "max_len"):
            require(getattr(self, key) > 0, f"reward.{key}", "must be > 0")
        require(self.lr > 0, "reward.lr", "must be > 0")
        require(self.head_init_std >= 0, "reward.head_init_std", "must be >= 0")
        require(0.0 < self.val_fraction < 1.0, "reward.val_fraction", "must be in (0, 1)")
        require(self.eval_every >= 0, "reward.eval_every", "must be >= 0")
        require(0.0 <= self.max_malformed_share < 1.0, "reward.max_malformed_share", "must be in [0, 1)")


# ----------------------------------------------------------------------------------------------
# Comparison groups: one prompt, its responses, and the (winner, loser) pairs among them


def as_pair_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The naive variant: every (winner, loser) pair becomes its own 2-response group."""
    return [{"prompt": g["prompt"], "responses": [g["responses"][w], g["responses"][l]], "pairs": [(0, 1)]}
            for g in groups for w, l in g["pairs"]]


def batch_loss(model, encoded: list[list[list[int]]], groups: list[dict[str, Any]], pad_id: int, device) -> torch.Tensor:
    """The K-way loss of a batch of groups: one forward pass per response, pairs share the scalars."""
    from rlhf.batching import left_pad
    from rlhf.devices import autocast
    from rlhf.rm import flat_pairs, kway_ranking_loss, rewards_from_ids

    seqs = [s for enc in encoded for s in enc]
    ids, mask = left_pad(seqs, pad_id)
    with autocast(device):
        rewards = rewards_from_ids(model, ids.to(device), mask.to(device), centered=False)  # (N,)
    win, lose, weight = flat_pairs([(len(g["responses"]), g["pairs"]) for g in groups])
    return kway_ranking_loss(rewards.float(), win.to(device), lose.to(device), weight.to(device), len(groups))


@torch.no_grad()
def score_groups(model, encoded: list[list[list[int]]], pad_id: int, device, batch_size: int) -> list[list[float]]:
    """Raw rewards of every response of every group, grouped like `encoded`."""
    from rlhf.batching import left_pad
    from rlhf.devices import autocast
    from rlhf.rm import rewards_from_ids

    flat = [s for enc in encoded for s in enc]
    scores: list[float] = []
    for i in range(0, len(flat), batch_size):
        ids, mask = left_pad(flat[i: i + batch_size], pad_id)
        with autocast(device):
            scores.extend(rewards_from_ids(model, ids.to(device), mask.to(device), centered=False).float().cpu().tolist())
    out, pos = [], 0
    for enc in encoded:
        out.append(scores[pos: pos + len(enc)])
        pos += len(enc)
    return out


def split_groups(params: Params, data: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, dict[str, Any]]:
    """(training groups, held-out groups, groups per optimizer step, records read and skipped per file)
    from --data and `extra_pairs`."""
    limit = {"max_malformed_share": params.max_malformed_share, "key": "reward.max_malformed_share"}
    groups, read = read_groups(data, params.data_format, **limit)
    report = {"data": read}
    if params.extra_pairs:
        extra, report["extra_pairs"] = read_groups(Path(params.extra_pairs), params.extra_format, **limit)
        groups += extra
    train, val = split_heldout(groups, params.val_fraction, params.seed)
    if not val:
        raise StageError(f"{data}: reward.val_fraction={params.val_fraction} held out no prompt; raise it or add data")
    # 'pairs' (the naive variant) takes as many pairs per step as 'kway' covers, so both make the same
    # number of steps with the same schedule; only the batching differs.
    per_step, n_kway = params.batch_size, len(train)
    if params.batching == "pairs":
        train = as_pair_groups(train)
        per_step = math.ceil(len(train) / max(1, n_kway // params.batch_size))
    if len(train) < per_step:
        raise StageError(f"{data}: {len(train)} training comparisons, fewer than reward.batch_size={per_step}")
    return train, val, per_step, report


def demonstration_bias(model, tokenizer, demos: Path, *, max_len: int, device) -> tuple[float, int]:
    """(bias, demonstrations scored): the shift that makes the demonstrations' mean reward 0 (item 3)."""
    from rlhf.rm import score_texts

    rows = read_jsonl(demos, DEMONSTRATION_SCHEMA)
    raw = score_texts(model, tokenizer, [d["prompt"] for d in rows], [d["response"] for d in rows],
                      max_len=max_len, batch_size=256, device=device, centered=False)
    return -sum(raw) / len(raw), len(raw)


def build_reward_model(sft: Path, tokenizer, head_init_std: float, seed: int):
    """The SFT transformer with a fresh scalar head: AutoModelForSequenceClassification, num_labels=1."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import check_model_dir

    check_model_dir(sft, "SFT model")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialized" is the point here
    transformers.logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(sft), num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32, use_safetensors=True,
            trust_remote_code=False,
        )
    except (OSError, ValueError) as exc:
        raise StageError(f"{sft}: cannot build a reward model from it ({str(exc).splitlines()[0]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=gen) * head_init_std)
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.zero_()
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_comparisons(params: Params, *, sft: Path, data: Path, tokenizer, train: list[dict[str, Any]],
                       val: list[dict[str, Any]], per_step: int) -> tuple[list, list, list, list]:
    """(train, train encodings, val, val encodings) that fit the model (docs/models.md): prompts cut on the
    left; a comparison with a response that alone does not fit is dropped whole."""
    from rlhf.rm import encode_pair
    from rlhf.training import fitting_groups, training_max_len

    max_len = training_max_len(params.max_len, sft)
    enc = lambda gs: [[encode_pair(tokenizer, g["prompt"], r, max_len, drop=True) for r in g["responses"]] for g in gs]  # noqa: E731
    (train, train_enc), (val, val_enc) = fitting_groups(train, enc(train)), fitting_groups(val, enc(val))
    if len(train) < per_step or not val:
        raise StageError(f"{data}: {len(train)} training and {len(val)} held-out comparisons fit {max_len} tokens; "
                         f"need reward.batch_size={per_step} and one held out (raise reward.max_len or shorten responses)")
    return train, train_enc, val, val_enc


def train_reward_model(params: Params, *, sft: Path, data: Path, tokenizer, train: list[dict[str, Any]],
                       val: list[dict[str, Any]], train_enc: list, val_enc: list, per_step: int, dist, device,
                       plots: Path, checkpoints: Path | None):
    """Items 1-3: SFT transformer + scalar head trained with the K-way loss (dropout off: the configs here
    have none; eval-mode forward). Returns (model, held-out encodings, last logged values, checkpointer,
    training seconds)."""
    from rlhf.devices import make_optimizer
    from rlhf.dist import gather_model, shard_model
    from rlhf.lora import LoraSettings, add_adapters, trainable_parameters
    from rlhf.training import Checkpointer, cosine_lr, epoch_batches, file_digest, fingerprint, open_live, train_loop

    total_steps = params.epochs * (len(train) // per_step)
    model = build_reward_model(sft, tokenizer, params.head_init_std, params.seed).to(device)
    # LoRA (lora_r > 0): adapters on the SFT body, the new score head trained fully (rlhf/lora.py).
    model = add_adapters(model, LoraSettings.of(params, "reward"), seed=params.seed, train_head=True)
    model = shard_model(model, dist, device)  # under `fsdp: true` and several processes; else the model itself
    optimizer = make_optimizer(trainable_parameters(model), params.lr, params.weight_decay, device)
    checkpointer = Checkpointer(checkpoints, fingerprint(to_dict(params), file_digest(sft), file_digest(data)))
    pad = tokenizer.pad_token_id

    def loss_fn(step: int) -> torch.Tensor:
        idx = dist.shard(epoch_batches(len(train), per_step, step, params.seed))
        return batch_loss(model, [train_enc[i] for i in idx], [train[i] for i in idx], pad, device)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        scores = score_groups(model, val_enc, pad, device, batch_size=256)
        m = heldout_metrics(val, scores, None)
        loss = batch_loss(model, val_enc, val, pad, device) if len(val) <= 512 else None
        out = {"val_accuracy": m["accuracy_labels"]}
        if loss is not None:
            out["val_loss"] = float(loss)
        return out

    live = open_live(plots, resume=checkpointer.load() is not None) if dist.is_main else None
    t_train = time.time()
    last = train_loop(
        model=model, optimizer=optimizer, loss_fn=loss_fn, total_steps=total_steps,
        lr_at=lambda s: cosine_lr(s, total_steps, lr=params.lr, warmup=params.warmup_steps),
        checkpointer=checkpointer, checkpoint_every=params.checkpoint_every, live=live, description="reward",
        evaluate=evaluate, eval_every=params.eval_every or total_steps, device=device, dist=dist,
    )
    train_s = time.time() - t_train
    model = gather_model(model, dist, device)  # sharded: whole on rank 0 (None elsewhere)
    if dist.is_main:
        model.eval()
        live.end()
    return model, val_enc, last, checkpointer, train_s


def lora_metrics(model, params: Params) -> dict[str, Any]:
    """{"lora": rank and parameter counts} under LoRA, else {} (the metrics of a full fine-tuning stay as they were)."""
    from rlhf.lora import parameter_counts

    return {"lora": {"r": params.lora_r, "parameters": parameter_counts(model)}} if params.lora_r > 0 else {}


def run(params: Params, *, sft: Path, data: Path, demos: Path, world: Path | None, out: Path, metrics: Path,
        plots: Path, checkpoints: Path | None) -> dict[str, Any]:
    from rlhf.dist import start_stage
    from rlhf.gold import load_judge
    from rlhf.io import remove_outputs
    from rlhf.lengths import length_tally
    from rlhf.models import load_tokenizer, save_model
    from rlhf.lora import merged
    from rlhf.rm import REWARD_BIAS_KEY

    t0 = time.time()
    # Data parallel under `accelerate launch` / `torchrun`: each rank takes whole K-way groups of the
    # same global batch (rlhf.dist), so a prompt's C(K,2) pairs never straddle processes.
    dist, device = start_stage(params)
    tokenizer = load_tokenizer(sft)
    if dist.is_main:
        remove_outputs(out, metrics)  # a failed or killed run leaves no stale result behind

    # Comparison groups split by prompt into train / held-out (item 4), then items 1-3: model and training.
    train, val, per_step, read = split_groups(params, data)
    lengths = length_tally()
    train, train_enc, val, val_enc = encode_comparisons(params, sft=sft, data=data, tokenizer=tokenizer, train=train,
                                                        val=val, per_step=per_step)
    model, val_enc, last, checkpointer, train_s = train_reward_model(
        params, sft=sft, data=data, tokenizer=tokenizer, train=train, val=val, train_enc=train_enc, val_enc=val_enc,
        per_step=per_step, dist=dist, device=device, plots=plots, checkpoints=checkpoints)
    if not dist.is_main:  # rank 0 evaluates, centers and writes
        return {"timing": timing(t0, resumed_from=last["resumed_from"]), "rank": dist.rank}

    # 4. Held-out evaluation against the labels and the gold judge.
    judge = load_judge(world)
    scores = score_groups(model, val_enc, tokenizer.pad_token_id, device, batch_size=256)
    gold = None if judge is None else [[judge.score(g["prompt"], r)["total"] for r in g["responses"]] for g in val]
    heldout = {**heldout_metrics(val, scores, gold), "prompts": len({g["prompt"] for g in val}), "records": len(val)}

    # 5. Demonstration bias (docs/ppo.md item 3): shift so the demonstrations' mean reward is 0.
    bias, n_demos = demonstration_bias(model, tokenizer, demos, max_len=params.max_len, device=device)
    setattr(model.config, REWARD_BIAS_KEY, round(bias, 6))
    model.config.reward_bias_method = BIAS_METHOD
    lora = lora_metrics(model, params)
    save_model(merged(model).cpu(), tokenizer, out)  # adapters, if any, folded in: a plain HF folder

    flat_val = [x for s in scores for x in s]
    result: dict[str, Any] = {
        "train": {"comparisons": len(train), "pairs": sum(len(g["pairs"]) for g in train),
                  "steps": params.epochs * (len(train) // per_step), "per_step": per_step,
                  "train_loss": round(last.get("train_loss", math.nan), 4)},
        "heldout": heldout,
        "read": read,
        "bias": {"method": BIAS_METHOD, "value": round(bias, 6), "demonstrations": n_demos,
                 "heldout_mean_reward_centered": round(sum(flat_val) / len(flat_val) + bias, 4)},
        "lengths": lengths.report("reward"),
        **lora,
    }
    # Pairs per second: the C(K,2) comparisons of every epoch this invocation trained, over training time alone.
    steps, start = result["train"]["steps"], last["resumed_from"]
    result["timing"] = timing(t0, train_s=train_s, unit="pairs", resumed_from=start,
                              done=result["train"]["pairs"] * params.epochs * (steps - start) / max(1, steps))
    write_json(metrics, result)  # written last: its presence marks a finished run
    checkpointer.clear()  # only now, so a kill before this point still resumes
    return result


def summary(m: dict[str, Any]) -> str:
    if "heldout" not in m:
        return f"rank {m['rank']} done ({m['timing']['wall_s']} s)"
    agreement = m["heldout"].get("labels_gold_agreement", float("nan"))
    text = heldout_summary(m, f" (labels vs gold {agreement:.1%})")
    return text + f"; demonstration bias {m['bias']['value']:+.3f} ({m['timing']['wall_s']} s)"
