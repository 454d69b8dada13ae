"""Profile this project's PPO stage (torch.profiler, CPU and CUDA activities) on the gpu_check model.

    python bench/profile_ppo.py --out-dir DIR        # ~114M Llama on CUDA; --smoke: tiny, any device

Prints the operators by self CPU time and by self device time, and the share of the loop the device
was busy, so a CPU-bound (launch- or Python-bound) step shows as a low device share.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import GPT2_SMALL_LIKE, TINY, ensure_curve_logger  # noqa: E402
from ppo_vs_trl import Settings, build_fixture, run_ours  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--episodes", type=int, default=192)
    ap.add_argument("--out-dir", default=".")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from rlhf.devices import pick_device, setup_torch
    from rlhf.models import offline_hub

    offline_hub()
    ensure_curve_logger()
    device = pick_device("auto")
    setup_torch(2, device)
    size = TINY if args.smoke else GPT2_SMALL_LIKE
    batch, episodes = (4, 8) if args.smoke else (args.batch, args.episodes)
    s = Settings(batch=batch, response_len=8 if args.smoke else 32, epochs=4, episodes=episodes, threads=2,
                 device=device.type)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        fx = build_fixture(Path(tmp) / "fx", size, n_prompts=4 * batch, n_texts=200 if args.smoke else 20000)
        print("unprofiled:", run_ours(fx, s, Path(tmp) / "warm"), flush=True)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            res = run_ours(fx, s, Path(tmp) / "prof")
        wall = time.perf_counter() - t0
    print("profiled:", res, f"wall {wall:.2f}s", flush=True)
    ka = prof.key_averages()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = ka.table(sort_by="self_cpu_time_total", row_limit=40)
    if device.type == "cuda":
        text += "\n\n" + ka.table(sort_by="self_cuda_time_total", row_limit=30)
        busy = sum(e.self_device_time_total for e in ka) / 1e6
        text += f"\n\ndevice busy (sum of self device time) {busy:.2f}s of {wall:.2f}s wall\n"
    (out / "profile.txt").write_text(text)
    print(text[-6000:])


if __name__ == "__main__":
    main()
