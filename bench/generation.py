"""Rollout generation: our KV-cache sampling loop (`rlhf.sampling.sample_tokens`) against `model.generate`.

    python bench/generation.py                        # batches 16 and 64, 32 new tokens, 2 threads
    python bench/generation.py --batches 16 --new-tokens 32 --repeats 7

Same model (the default pretrain size: Llama hidden 128, 4 layers, 4 heads, vocab from our tokenizer,
random init), same left-padded prompts in our chat template, same batch, same length, same sampling:
temperature 1, no top-k (top_k=0), no top-p (top_p=1.0), fp32, `threads` torch threads. Both produce
exactly `new_tokens` tokens per sequence: ours gets an eos_id that no token has (-1), `generate` gets
`eos_token_id=None` (the output width is checked).

What is timed: one call producing the whole batch (`sample_tokens(...)` / `model.generate(...)`,
including the prompt's prefill), wall clock by `time.perf_counter`; the two are interleaved, after one
warm-up call each, and the median of `repeats` calls is reported. tokens/s = batch × new_tokens / median.

Writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import (  # noqa: E402
    DEFAULT, RESULTS, ROOT, SMOKE, load_prompts, load_texts, machine, matmul_gflops, sync,
)


def build_policy(size, *, seed: int = 0, n_prompts: int = 256):
    """Tokenizer (our BPE on a corpus slice), random-init Llama policy, encoded chat prompts."""
    from rlhf.models import build_llama
    from rlhf.tokenization import encode_prompt, train_tokenizer

    tokenizer = train_tokenizer(load_texts(ROOT / "data/raw/corpus.jsonl", 2000), size.vocab)
    model = build_llama(tokenizer, hidden=size.hidden, layers=size.layers, heads=size.heads,
                        intermediate=size.intermediate, max_len=size.max_len, seed=seed).eval()
    prompts = load_prompts(ROOT / "data/raw/prompts.jsonl", n_prompts)
    queries = [q for q in (encode_prompt(tokenizer, p) for p in prompts) if len(q) + 64 <= size.max_len]
    return tokenizer, model, queries


def time_pair(model, queries, *, pad_id: int, new_tokens: int, repeats: int, seed: int = 0,
              device=None) -> dict[str, Any]:
    """Median seconds per call of sample_tokens and model.generate on the same batch.

    On CUDA both run under the project's bf16 autocast and each call ends with a synchronization.
    """
    import torch
    from transformers import GenerationConfig

    from rlhf.batching import left_pad
    from rlhf.devices import autocast
    from rlhf.sampling import sample_tokens

    device = device or torch.device("cpu")
    ids, mask = left_pad(queries, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=pad_id, bos_token_id=None)
    model.generation_config.eos_token_id = None  # never stop early: both sides make exactly new_tokens
    gen = torch.Generator(device=device).manual_seed(seed)

    def ours():
        out = sample_tokens(model, queries, pad_id=pad_id, eos_id=-1, max_new_tokens=new_tokens, temperature=1.0,
                            generator=gen, device=device)
        assert out.shape == (len(queries), new_tokens)

    def hf():
        with torch.no_grad(), autocast(device):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        assert out.shape == (len(queries), ids.shape[1] + new_tokens), out.shape

    times: dict[str, list[float]] = {"ours": [], "generate": []}
    ours(), hf()  # warm-up
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("generate", hf)):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    tokens = len(queries) * new_tokens
    out: dict[str, Any] = {"batch": len(queries), "new_tokens": new_tokens, "prompt_width": int(ids.shape[1])}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_s": round(med, 4), "tokens_per_s": round(tokens / med, 1),
                     "all_s": [round(t, 4) for t in ts]}
    out["ratio_ours_over_generate"] = round(out["ours"]["tokens_per_s"] / out["generate"]["tokens_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model, batch 4, 4 tokens (tests)")
    ap.add_argument("--out", default=str(RESULTS / "generation.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    size = SMOKE if args.smoke else DEFAULT
    batches = [4] if args.smoke else [int(b) for b in args.batches.split(",")]
    new_tokens, repeats = (4, 1) if args.smoke else (args.new_tokens, args.repeats)
    tokenizer, model, queries = build_policy(size, n_prompts=max(batches))
    if len(queries) < max(batches):
        queries = (queries * max(batches))[: max(batches)]
    result: dict[str, Any] = {"machine": machine(args.threads),
                              "model": {**size.__dict__, "vocab": len(tokenizer),
                                        "params": sum(p.numel() for p in model.parameters())},
                              "sampling": "temperature 1, top_k 0, top_p 1.0, fp32, no early stop", "runs": []}
    for b in batches:
        r = time_pair(model, queries[:b], pad_id=tokenizer.pad_token_id, new_tokens=new_tokens, repeats=repeats)
        result["runs"].append(r)
        print(f"batch {b}: ours {r['ours']['tokens_per_s']} tok/s, generate {r['generate']['tokens_per_s']} tok/s, "
              f"ratio {r['ratio_ours_over_generate']}", flush=True)
    result["matmul_gflops_1024_fp32"] = round(matmul_gflops(threads=args.threads, seconds=0.3 if args.smoke else 2.0), 2)
    result["timed"] = ("one call producing the whole batch (prefill included), interleaved, median of repeats "
                       "after one warm-up each")
    if args.out:
        from rlhf.io import write_json

        write_json(args.out, result, sort_keys=False)
    return result


if __name__ == "__main__":
    main()
