"""This project's PPO against TRL's PPOTrainer, same run, same machine, identical settings.

    .venv/bin/pip install trl==1.12.0          # the optional `bench` extra (last release with PPOTrainer)
    python bench/ppo_vs_trl.py                 # default pretrain size, batch 16, R 32, 4 epochs, 128 episodes
    python bench/ppo_vs_trl.py --episodes 256 --rounds 5 --out /tmp/x.json

Both sides get the same four models, built once from one config and saved to a temporary folder:
a Llama-architecture policy (reference = the same weights), and a `LlamaForSequenceClassification`
(num_labels=1) used as value-model init and as reward model, random-init (throughput does not care
about the weights). The tokenizer is a byte-level BPE trained with `rlhf.tokenization.train_tokenizer` on
a slice of data/raw/corpus.jsonl (synthetic text when the file is missing); PAD != EOS. Prompts come
from data/raw/prompts.jsonl in our chat template (synthetic when missing).

Identical settings: rollout batch 16, response length 32 (temperature 1, no top-k/top-p, stop at
EOS), 4 PPO epochs over 1 minibatch of 16 (no gradient accumulation), the same learning rate, KL
coefficient, clip ranges, γ/λ, missing-EOS penalty, Adam (β 0.9/0.999, ε 1e-8: TRL's defaults), fp32
on CPU, the same torch thread count. PPO-ptx is off on our side (TRL has no ptx term).

What is timed:
- ours: `stages.ppo.run` is called with a params object and temp dirs. `run` reports `timing.train_s`,
  the wall time of its training loop alone (model loading, data loading, saving and the held-out
  evaluation are outside it); its `on_step` hook records a timestamp at the end of every step.
- TRL: `PPOTrainer.train()` is timed with `time.perf_counter` (model loading and trainer construction
  are outside it), and a `TrainerCallback.on_step_end` records a timestamp after every step.
- `eps_loop` = episodes / loop time (includes the first step's warm-up); `eps_steady` = episodes of
  steps 2..n / time from the end of step 1 to the end of step n (excludes warm-up). The headline
  ratio uses `eps_steady`.

Model FLOPs (approximate, the usual 2·N·tokens rule, Kaplan et al. 2020): N = parameters of the
matmuls (nn.Linear weights, the tied LM head included, embedding lookups excluded), tokens = B·T
with T the padded query+response length; forward-only passes 2·N·tokens, training passes (forward +
backward) 6·N·tokens; attention score FLOPs are ignored. Per PPO step (ours, one minibatch per epoch):
generation and reference scoring 2·2·N_pol·B·T, reward scoring 2·N_v·B·T, and ppo_epochs ×
6·(N_pol + N_v)·B·T for the updates; the first update's forward also gives the rollout's old
log-probs and values (stages.ppo.reuses_first_forward), so there is no separate policy or value
scoring pass. TRL keeps the generation logits (no policy scoring pass) but runs a value scoring
pass: one value forward more than ours. Achieved FLOP/s = FLOPs per step ×
steps / loop time, shown as a share of the measured torch.mm throughput (1024×1024 fp32, same threads).

Rounds (`--rounds`, default 3): each round runs both sides on the same fixture, and the order
alternates (ours, TRL; TRL, ours; ...), because TRL measured 5-10% faster when it ran first.
Each side is represented by its run with the median `eps_steady`; the headline ratio is the ratio of
those medians, and the per-round ratios are recorded beside it.

Writes bench/results/ppo_vs_trl.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

RESULTS = ROOT / "bench" / "results"


# ----------------------------------------------------------------------------------------------
# Model sizes and the shared fixture


@dataclass(frozen=True)
class ModelSize:
    """A Llama config; the default is params.yaml's pretrain size (hidden 128, 4 layers, 4 heads)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    vocab: int = 1024
    max_len: int = 256


DEFAULT = ModelSize()
SMOKE = ModelSize(hidden=32, layers=2, heads=2, intermediate=64, vocab=300, max_len=128)


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Stand-in corpus when data/raw is absent (tests, a fresh clone): sentences of made-up words.

    Words are random syllable strings, so a BPE trained on them reaches a realistic vocabulary size.
    """
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    return [" ".join(rng.choice(lexicon) for _ in range(rng.randint(8, 30))) + f" {rng.randint(0, 99)}."
            for _ in range(n)]


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed + 1)
    forms = ("What is {a} plus {b}?", "Sort these numbers: {a} {b} {c}.", "Tell me about the fox number {a}.",
             "Is it true that {a} is bigger than {b}? Explain briefly.")
    return [rng.choice(forms).format(a=rng.randint(0, 99), b=rng.randint(0, 99), c=rng.randint(0, 99))
            for _ in range(n)]


def load_texts(path: Path, n: int) -> list[str]:
    """The first `n` corpus texts, or synthetic ones when the file is missing."""
    if path.is_file():
        from rlhf.io import CORPUS_SCHEMA, iter_jsonl

        out = []
        for rec in iter_jsonl(path, CORPUS_SCHEMA):
            out.append(rec["text"])
            if len(out) >= n:
                break
        if out:
            return out
    return synthetic_texts(n)


def load_prompts(path: Path, n: int) -> list[str]:
    if path.is_file():
        from rlhf.io import PROMPT_SCHEMA, iter_jsonl

        out = []
        for rec in iter_jsonl(path, PROMPT_SCHEMA):
            out.append(rec["prompt"])
            if len(out) >= n:
                break
        if out:
            return out
    return synthetic_prompts(n)


@dataclass
class Fixture:
    root: Path
    sft: Path
    reward: Path
    data: Path
    tokenizer: Any
    prompts: list[str]
    size: ModelSize
    sources: dict[str, str]



def repo_relative(path: Path) -> str:
    """A path as recorded in results: relative to the repository, never a machine's absolute path."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return Path(path).name

def build_fixture(root: Path, size: ModelSize, *, n_prompts: int = 512, n_texts: int = 2000, seed: int = 0,
                  corpus: Path = ROOT / "data/raw/corpus.jsonl",
                  prompts_path: Path = ROOT / "data/raw/prompts.jsonl") -> Fixture:
    """Tokenizer, policy (sft folder), value/reward model (reward folder) and data files under `root`."""
    import torch
    from transformers import LlamaForSequenceClassification

    from rlhf.io import write_jsonl
    from rlhf.models import build_llama, save_model
    from rlhf.tokenization import encode_prompt, train_tokenizer

    texts = load_texts(corpus, n_texts)
    prompts = load_prompts(prompts_path, n_prompts)
    tokenizer = train_tokenizer(texts, size.vocab)
    # Keep only prompts that leave room for the response (TRL does not filter; ours does).
    prompts = [p for p in prompts if len(encode_prompt(tokenizer, p)) + 64 <= size.max_len]
    policy = build_llama(tokenizer, hidden=size.hidden, layers=size.layers, heads=size.heads,
                         intermediate=size.intermediate, max_len=size.max_len, seed=seed)
    config = policy.config.to_dict()
    for key in ("id2label", "label2id"):  # the causal LM's default 2-label maps would fight num_labels=1
        config.pop(key, None)
    config.update(num_labels=1, architectures=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        rm = LlamaForSequenceClassification(type(policy.config)(**config))
    save_model(policy, tokenizer, root / "sft")
    save_model(rm, tokenizer, root / "reward")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "ppo.jsonl", [{"id": str(i), "prompt": p} for i, p in enumerate(prompts)])
    write_jsonl(data / "test.jsonl", [{"id": f"t{i}", "prompt": p} for i, p in enumerate(prompts[:4])])
    write_jsonl(data / "corpus.jsonl", [{"text": t} for t in texts[:16]])
    sources = {"corpus": repo_relative(corpus) if corpus.is_file() else "synthetic",
               "prompts": repo_relative(prompts_path) if prompts_path.is_file() else "synthetic"}
    return Fixture(root, root / "sft", root / "reward", data, tokenizer, prompts, size, sources)


# ----------------------------------------------------------------------------------------------
# Machine description and matmul throughput


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(n: int = 1024, threads: int = 2, seconds: float = 2.0) -> float:
    """Measured fp32 torch.mm throughput (GFLOP/s) of n×n by n×n at `threads` threads: 2n³ per product."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    iters, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        iters += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and iters >= 5:
            break
    return 2 * n**3 * iters / elapsed / 1e9


def matmul_params(model) -> int:
    """Parameters used in matmuls: every nn.Linear weight (a tied LM head counts once, as a matmul)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def ppo_step_flops(n_policy: int, n_value: int, batch: int, width: int, epochs: int, *, trl: bool = False,
                   reuse_first_forward: bool = False) -> float:
    """Approximate model FLOPs of one PPO step (see the module docstring for the formula).

    `reuse_first_forward`: ours with one minibatch in one micro-batch (stages.ppo.reuses_first_forward),
    where epoch 0's update forward also gives the old log-probs and values, so neither the policy nor
    the value model has a separate scoring forward.
    """
    tokens = batch * width
    if trl:  # generation (logits kept) + reference; value + reward
        fwd_policy, fwd_value = 2, 2
    elif reuse_first_forward:  # generation + reference; reward
        fwd_policy, fwd_value = 2, 1
    else:  # generation + policy scoring + reference; value + reward
        fwd_policy, fwd_value = 3, 2
    return (fwd_policy * 2 * n_policy + fwd_value * 2 * n_value) * tokens + epochs * 6 * (n_policy + n_value) * tokens


def mean_width(fx: Fixture, batch: int, steps: int, response_len: int, seed: int) -> float:
    """Mean padded query+response length of our rollouts (batches as stages.ppo derives them)."""
    from rlhf.tokenization import encode_prompt
    from rlhf.training import epoch_batches

    lens = [len(encode_prompt(fx.tokenizer, p)) for p in fx.prompts]
    widths = [max(lens[i] for i in epoch_batches(len(lens), batch, s, seed)) + response_len for s in range(steps)]
    return sum(widths) / len(widths)


# ----------------------------------------------------------------------------------------------
# The two runs


@dataclass(frozen=True)
class Settings:
    batch: int = 16
    response_len: int = 32
    epochs: int = 4
    episodes: int = 128
    threads: int = 2
    lr: float = 1e-5
    kl_coef: float = 0.05
    seed: int = 0
    device: str = "cpu"


def eps_summary(stamps: list[float], loop_s: float, episodes: int, batch: int) -> dict[str, float]:
    steady = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else episodes / loop_s
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"loop_s": round(loop_s, 3), "eps_loop": round(episodes / loop_s, 3), "eps_steady": round(steady, 3),
            "step_s": [round(s, 3) for s in step_s], "steps": len(stamps)}


def run_ours(fx: Fixture, s: Settings, work: Path) -> dict[str, Any]:
    """stages.ppo.run on the fixture; timing from its `timing.train_s` and per-step stamps."""
    from stages import ppo as S

    steps = s.episodes // s.batch
    params = S.Params(
        steps=steps, batch_size=s.batch, minibatch_size=s.batch, micro_batch_size=s.batch, ppo_epochs=s.epochs,
        lr=s.lr, value_lr=s.lr, adam_eps=1e-8, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, temperature=1.0, max_new_tokens=s.response_len,
        kl_coef=s.kl_coef, target_kl=0.0, kl_horizon=10000, gamma=1.0, lam=0.95, clip_range=0.2,
        clip_range_value=0.2, whiten_rewards=False, missing_eos_penalty=-1.0, rl_coef=1.0, ptx_coef=0.0, ptx_batch_size=1,
        ptx_max_len=64, heldout_corpus=0, eval_prompts=0, checkpoint_every=0, seed=s.seed, threads=s.threads,
        device=s.device, fsdp=False, lora_r=0, lora_alpha=16.0, lora_dropout=0.0, lora_targets=["all-linear"],
    )
    params.validate()
    stamps: list[float] = []
    t0 = time.perf_counter()
    m = S.run(params, sft=fx.sft, reward=fx.reward, data=fx.data, world=None, out=work / "policy",
              value_out=work / "value", metrics=work / "ppo.json", plots=work / "plots", checkpoints=None,
              on_step=lambda step, metrics: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    import torch

    out = eps_summary(stamps, m["timing"]["train_s"], steps * s.batch, s.batch)
    out.update(wall_s=round(wall, 2), threads_seen=torch.get_num_threads(),
               final_kl=m["final_rollout"]["kl"], response_length=m["final_rollout"]["response_length"])
    return out


def run_trl(fx: Fixture, s: Settings, work: Path) -> dict[str, Any]:
    """TRL's PPOTrainer on the same folders; `trainer.train()` timed, per-step stamps by callback."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf.models import load_tokenizer
    from rlhf.tokenization import encode_prompt

    torch.manual_seed(s.seed)
    tok = load_tokenizer(fx.sft)
    assert tok.pad_token_id != tok.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(str(fx.sft), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(fx.sft), dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(str(fx.reward), dtype=torch.float32, num_labels=1)
    rm = AutoModelForSequenceClassification.from_pretrained(str(fx.reward), dtype=torch.float32, num_labels=1)
    dataset = Dataset.from_dict({"input_ids": [encode_prompt(tok, p) for p in fx.prompts]})
    config = PPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=s.batch, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=s.epochs, response_length=s.response_len, total_episodes=s.episodes,
        local_rollout_forward_batch_size=s.batch, learning_rate=s.lr, temperature=1.0, stop_token="eos",
        missing_eos_penalty=1.0, kl_coef=s.kl_coef, whiten_rewards=False, cliprange=0.2, cliprange_value=0.2,
        gamma=1.0, lam=0.95, vf_coef=1.0, max_grad_norm=1.0, use_cpu=True, bf16=False, fp16=False, report_to=[],
        save_strategy="no", num_sample_generations=0, disable_tqdm=True, seed=s.seed, dataloader_num_workers=0,
        logging_strategy="steps", logging_steps=1,
    )
    stamps: list[float] = []
    history: list[dict[str, Any]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                history.append(dict(logs))

    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=dataset, value_model=value, callbacks=[StepTimer()])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - t0
    steps = len(stamps)
    out = eps_summary(stamps, loop, steps * s.batch, s.batch)
    out.update(threads_seen=torch.get_num_threads(),
               final_kl=round(history[-1].get("objective/kl", float("nan")), 4) if history else None)
    return out


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--order", default="ours,trl", help="which side runs first in round 1, e.g. trl,ours")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds, each running both sides, the order alternating (headline: ratio of medians)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 steps (tests)")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (ours only)")
    ap.add_argument("--out", default=str(RESULTS / "ppo_vs_trl.json"))
    args = ap.parse_args(argv)

    import torch

    size = SMOKE if args.smoke else DEFAULT
    s = Settings(batch=args.batch, response_len=args.response_len, epochs=args.epochs, episodes=args.episodes,
                 threads=args.threads)
    if args.smoke:
        s = dataclasses.replace(s, batch=4, response_len=8, epochs=1, episodes=8)
    torch.set_num_threads(s.threads)
    use_trl = not args.no_trl
    if use_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl not installed (pip install trl==1.12.0); running ours only", file=sys.stderr)
            use_trl = False

    result: dict[str, Any] = {"machine": machine(s.threads), "settings": dataclasses.asdict(s),
                              "model": dataclasses.asdict(size)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fx = build_fixture(work / "fixture", size, n_prompts=64 if args.smoke else 512,
                           n_texts=200 if args.smoke else 2000)
        result["data"] = {**fx.sources, "prompts_used": len(fx.prompts), "vocab": len(fx.tokenizer)}
        order = [o for o in args.order.split(",") if o == "ours" or (o == "trl" and use_trl)]
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in order}
        for r in range(max(1, args.rounds)):
            # Alternating which side goes first evens out the order effect (in one-run-each comparisons
            # TRL measured 5-10% faster when it ran first in the process; bench/README.md).
            for position, side in enumerate(order if r % 2 == 0 else order[::-1], start=1):
                print(f"round {r + 1}: running {side} ...", file=sys.stderr, flush=True)
                run = (run_ours if side == "ours" else run_trl)(fx, s, work / f"{side}{r}")
                runs[side].append({"round": r + 1, "position": position, **run})
                print(f"  {side}: {json.dumps({k: v for k, v in run.items() if k != 'step_s'})}",
                      file=sys.stderr, flush=True)
        for side, side_runs in runs.items():
            # The run with the median steady rate stands for the side (an actual run: odd round counts).
            result[side] = sorted(side_runs, key=lambda x: x["eps_steady"])[(len(side_runs) - 1) // 2]
        result["runs"] = runs

        from rlhf.models import load_causal_lm, load_reward_model

        n_pol, n_val = matmul_params(load_causal_lm(fx.sft)), matmul_params(load_reward_model(fx.reward))
        width = mean_width(fx, s.batch, s.episodes // s.batch, s.response_len, s.seed)
    gflops = matmul_gflops(threads=s.threads, seconds=0.3 if args.smoke else 2.0)
    flops: dict[str, Any] = {
        "matmul_gflops_1024_fp32": round(gflops, 2), "matmul_params_policy": n_pol, "matmul_params_value": n_val,
        "mean_query_response_tokens": round(width, 2),
        "formula": "per step: (2·2·N_pol + 1·2·N_val)·B·T forward-only (generation and reference scoring; reward "
                   "scoring: with one minibatch the first update forward also scores policy and value) + "
                   "epochs·6·(N_pol+N_val)·B·T updates; TRL: (2·2·N_pol + 2·2·N_val)·B·T forward-only (generation "
                   "logits kept, reference; value and reward scoring). N = nn.Linear weights (tied LM head once), "
                   "T = mean padded query+response length, attention score FLOPs ignored",
    }
    for side in ("ours", "trl"):
        if side in result:
            # run_ours uses minibatch = micro-batch = batch: the one-minibatch shortcut applies.
            per_step = ppo_step_flops(n_pol, n_val, s.batch, width, s.epochs, trl=side == "trl",
                                      reuse_first_forward=side == "ours")
            achieved = per_step * result[side]["eps_steady"] / s.batch
            flops[side] = {"gflop_per_step": round(per_step / 1e9, 3), "achieved_gflops": round(achieved / 1e9, 2),
                           "share_of_matmul": round(achieved / 1e9 / gflops, 4)}
    result["flops"] = flops
    if "ours" in result and "trl" in result:
        result["ratio_eps_steady"] = round(result["ours"]["eps_steady"] / result["trl"]["eps_steady"], 3)
        result["ratio_eps_loop"] = round(result["ours"]["eps_loop"] / result["trl"]["eps_loop"], 3)
        result["ratio_eps_steady_by_round"] = [
            round(o["eps_steady"] / t["eps_steady"], 3) for o, t in zip(runs["ours"], runs["trl"], strict=True)]
    result["timed"] = ("ours: stages.ppo.run's training loop (timing.train_s) and per-step stamps; TRL: "
                       "PPOTrainer.train() and per-step on_step_end stamps; model loading excluded on both sides")

    from rlhf.io import write_json

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result, sort_keys=False)
    summary = {k: result[k]["eps_steady"] for k in ("ours", "trl") if k in result}
    print(f"episodes/s (steady): {summary}; ratio ours/trl: {result.get('ratio_eps_steady')}; "
          f"ours at {flops.get('ours', {}).get('share_of_matmul')} of matmul peak ({gflops:.1f} GFLOP/s)")
    return result


if __name__ == "__main__":
    main()
