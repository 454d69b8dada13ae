"""GPU check: SFT tokens/s and model FLOP utilization, and PPO episodes/s, on a ~125M-parameter Llama.

    python bench/gpu_check.py              # on a CUDA machine: writes bench/results/gpu.json
    python bench/gpu_check.py --smoke      # tiny config, any device (CPU included), 2 steps each: a crash test

The model is built from a config, never downloaded: Llama hidden 768, 12 layers, 12 heads,
intermediate 3072, vocabulary from our byte-level BPE (`--vocab`, default 8192) trained on a slice of
data/raw/corpus.jsonl (synthetic text when absent): ~120M parameters (the exact count is recorded).
The device is picked automatically (`rlhf.devices.pick_device("auto")`); on CUDA the project's
defaults apply: bf16 autocast, TF32 matmuls, fused AdamW, SDPA attention (transformers' default; the
implementation in use is recorded).

1. SFT throughput: the SFT stage's inner step (forward under `rlhf.devices.autocast`, the masked LM
   loss of `rlhf.training`, backward, gradient clip, `make_optimizer`'s AdamW step) on `--sft-batch` ×
   `--seq` random tokens; `--warmup` untimed steps, then `--sft-steps` steps timed between CUDA
   synchronizations. tokens/s = batch × seq × steps / time.
   MFU = achieved model FLOP/s / peak; model FLOPs per token = 6·N + 12·L·d·T (N = matmul params, the
   tied LM head once; the second term is attention, PaLM appendix B). Peak = the card's dense bf16
   spec (table below, when known) and, separately, the measured bf16 torch.mm throughput (8192³).
2. Rollout generation: `rlhf.sampling.sample_tokens` against `model.generate` on this model, batch
   `--gen-batch`, 32 new tokens, both under bf16 autocast (bench/generation.py's `time_pair`).
3. PPO episodes/s: `stages.ppo.run` (as bench/ppo_vs_trl.py runs it) on this model as policy and
   reference, with a same-size `LlamaForSequenceClassification` as value init and reward model;
   batch `--ppo-batch`, response 32, 4 PPO epochs, 1 minibatch, `--ppo-episodes` episodes. Timed: the
   training loop (`timing.train_s`) and per-step stamps; eps_steady excludes the first step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import (  # noqa: E402
    RESULTS, ROOT, ModelSize, Settings, build_fixture, load_texts, machine, matmul_params, run_ours, sync,
)

GPT2_SMALL_LIKE = ModelSize(hidden=768, layers=12, heads=12, intermediate=3072, vocab=8192, max_len=1024)
TINY = ModelSize(hidden=32, layers=2, heads=2, intermediate=64, vocab=300, max_len=128)

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched on the device name.
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
             "A10G": 70e12, "L4": 121e12, "RTX 4090": 165e12}


def spec_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak
    return None


def bf16_matmul_tflops(device, n: int = 8192, iters: int = 20) -> float | None:
    """Measured bf16 torch.mm throughput on CUDA (None on CPU)."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


class _CurveLog:
    """Stand-in for dvclive's Live where dvclive is not installed (the GPU image has no DVC).

    Only what the PPO stage calls: curves as TSV files under `dir`, a summary, a step counter. The
    timings do not depend on it; the real logger is used wherever dvclive imports.
    """

    def __init__(self, directory: str, **_: Any) -> None:
        self.dir, self.step, self.summary = directory, 0, {}
        Path(directory).mkdir(parents=True, exist_ok=True)

    def log_metric(self, name: str, value: float) -> None:
        path = Path(self.dir) / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"{self.step}\t{value}\n")
        self.summary[name] = value

    def next_step(self) -> None:
        self.step += 1

    def make_summary(self) -> None:
        (Path(self.dir) / "metrics.json").write_text(json.dumps({"step": self.step, **self.summary}))

    def end(self) -> None:
        self.make_summary()


def ensure_curve_logger() -> bool:
    """True when dvclive imports; otherwise registers `_CurveLog` as `dvclive.Live` and returns False."""
    try:
        import dvclive  # noqa: F401
        return True
    except ImportError:
        import importlib.machinery
        import types

        module = types.ModuleType("dvclive")
        module.__spec__ = importlib.machinery.ModuleSpec("dvclive", None)  # find_spec() asks for one
        module.Live = _CurveLog
        sys.modules["dvclive"] = module
        return False


def sft_throughput(model, device, *, batch: int, seq: int, steps: int, warmup: int, vocab: int,
                   n_special: int = 5) -> dict[str, Any]:
    """Tokens/s of the SFT training step on random tokens (ids past the special tokens)."""
    import torch

    from rlhf.devices import autocast, make_optimizer
    from rlhf.training import masked_lm_loss

    model.train()
    opt = make_optimizer(model.parameters(), 1e-4, 0.0, device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(n_special, vocab, (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def step():
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = masked_lm_loss(logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - t0
    cfg = model.config
    n = matmul_params(model)
    flops_per_token = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    tps = batch * seq * steps / elapsed
    return {"batch": batch, "seq": seq, "steps": steps, "seconds": round(elapsed, 3),
            "tokens_per_s": round(tps, 1), "model_tflops": round(tps * flops_per_token / 1e12, 3),
            "flops_per_token": flops_per_token, "final_loss": round(float(loss.detach()), 4)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config, 2 steps, any device (tests)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--ppo-batch", type=int, default=64)
    ap.add_argument("--ppo-episodes", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    ap.add_argument("--cudnn-sdpa", action="store_true",
                    help="turn SDPA's cuDNN backend back on (setup_torch turns it off on CUDA): the comparison")
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args(argv)

    import torch

    from rlhf.devices import pick_device, setup_torch
    from rlhf.models import build_llama, offline_hub
    from rlhf.tokenization import train_tokenizer

    offline_hub()
    has_dvclive = ensure_curve_logger()
    device = pick_device("auto")
    setup_torch(args.threads, device)
    if args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(True)
    size = TINY if args.smoke else dataclasses.replace(GPT2_SMALL_LIKE, vocab=args.vocab)
    if args.smoke:
        args.sft_batch, args.seq, args.sft_steps, args.warmup = 2, 16, 2, 1
        args.ppo_batch, args.ppo_episodes, args.gen_batch = 4, 8, 4
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: this check is meant for a GPU (use --smoke for a CPU crash test)", file=sys.stderr)

    result: dict[str, Any] = {"machine": machine(args.threads), "device": str(device), "smoke": args.smoke,
                              "dvclive": has_dvclive, "cudnn_sdpa": torch.backends.cuda.cudnn_sdp_enabled()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                         "tf32": torch.backends.cuda.matmul.allow_tf32}
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(load_texts(ROOT / "data/raw/corpus.jsonl", 200 if args.smoke else 20000), size.vocab)
    model = build_llama(tokenizer, hidden=size.hidden, layers=size.layers, heads=size.heads,
                        intermediate=size.intermediate, max_len=size.max_len, seed=0).to(device)
    result["model"] = {**dataclasses.asdict(size), "vocab": len(tokenizer),
                       "params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul_params(model),
                       "attn_implementation": getattr(model.config, "_attn_implementation", None),
                       "autocast": "bf16" if device.type == "cuda" else "off (fp32)",
                       "fused_adamw": device.type == "cuda"}
    print(f"model: {result['model']['params'] / 1e6:.1f}M params on {device} "
          f"({result['model']['attn_implementation']})", flush=True)

    # 1. SFT throughput and MFU.
    sft = sft_throughput(model, device, batch=args.sft_batch, seq=args.seq, steps=args.sft_steps,
                         warmup=args.warmup, vocab=len(tokenizer))
    measured = bf16_matmul_tflops(device)
    peak = spec_peak(torch.cuda.get_device_name(0)) if device.type == "cuda" else None
    sft["bf16_matmul_tflops_measured"] = round(measured, 1) if measured else None
    sft["bf16_peak_tflops_spec"] = peak / 1e12 if peak else None
    sft["mfu_vs_spec"] = round(sft["model_tflops"] * 1e12 / peak, 4) if peak else None
    sft["mfu_vs_measured_matmul"] = round(sft["model_tflops"] / measured, 4) if measured else None
    result["sft"] = sft
    print(f"sft: {sft['tokens_per_s']} tokens/s, {sft['model_tflops']} TFLOP/s, MFU {sft['mfu_vs_spec']}", flush=True)
    save(args.out, result)

    # 2. Rollout generation against model.generate (bench/generation.py's comparison, on this model).
    from generation import time_pair
    from ppo_vs_trl import load_prompts

    from rlhf.tokenization import encode_prompt

    queries = [encode_prompt(tokenizer, p) for p in load_prompts(ROOT / "data/raw/prompts.jsonl", args.gen_batch)]
    queries = (queries * args.gen_batch)[: args.gen_batch]
    model.eval()
    gen = time_pair(model, queries, pad_id=tokenizer.pad_token_id, new_tokens=8 if args.smoke else 32,
                    repeats=1 if args.smoke else 5, device=device)
    result["generation"] = gen
    print(f"generation (batch {gen['batch']}): ours {gen['ours']['tokens_per_s']} tokens/s, generate "
          f"{gen['generate']['tokens_per_s']}, ratio {gen['ratio_ours_over_generate']}", flush=True)
    save(args.out, result)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. PPO episodes/s with this project's stage.
    s = Settings(batch=args.ppo_batch, response_len=8 if args.smoke else 32, epochs=1 if args.smoke else 4,
                 episodes=args.ppo_episodes, threads=args.threads, device=device.type)
    with tempfile.TemporaryDirectory() as tmp:
        fx = build_fixture(Path(tmp) / "fixture", size, n_prompts=max(64, 4 * s.batch),
                           n_texts=200 if args.smoke else 20000)
        result["ppo"] = {"settings": dataclasses.asdict(s), **run_ours(fx, s, Path(tmp) / "ours")}
    print(f"ppo: {result['ppo']['eps_steady']} episodes/s (steady), {result['ppo']['eps_loop']} (loop)", flush=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    save(args.out, result)
    return result


def save(out: str, result: dict[str, Any]) -> None:
    """Write what is measured so far (after each part: a later crash keeps the earlier numbers)."""
    if out:
        from rlhf.io import write_json

        write_json(out, result, sort_keys=False)


if __name__ == "__main__":
    main()
