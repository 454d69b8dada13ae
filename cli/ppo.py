"""PPO-ptx against the reward model (InstructGPT step 3): ppo."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)


@app.command()
def ppo(
    sft: Path = typer.Option(Path("models/sft"), help="SFT model folder: the policy's start and the frozen reference"),
    reward: Path = typer.Option(Path("models/reward"), help="reward model folder (frozen; the value function starts from it)"),
    data: Path = typer.Option(Path("data/prepared"), help="folder with ppo.jsonl, test.jsonl, corpus.jsonl"),
    world: Path = typer.Option(Path("data/raw/world.json"), help="world file for the gold judge (skipped if absent)"),
    out: Path = typer.Option(Path("models/policy"), help="HF causal-LM folder to write (policy + tokenizer)"),
    value_out: Path = typer.Option(Path("models/value"), help="HF sequence-classification folder for the value model"),
    metrics: Path = typer.Option(Path("metrics/ppo.json"), help="metrics JSON"),
    plots: Path = typer.Option(Path("plots/ppo"), help="dvclive curves and the over-optimization plot"),
    checkpoints: Path = typer.Option(Path("checkpoints/ppo"), help="resumable checkpoints (removed on success)"),
    params: Path = Params,
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="override one key of the ppo: section for this run (dvc.yaml's control stages)"),
) -> None:
    """PPO-ptx against the reward model: policy from SFT, KL penalty to SFT, value function from the RM.

    Logs the gold judge beside the RM score every step (reward-hacking watch) and writes
    plots/ppo/overoptimization.png. Killed? Rerun the same command: it resumes from its last
    checkpoint and ends with the same weights as an uninterrupted run.

    Example:  rlhf ppo
    Example:  dvc exp run -S ppo.ptx_coef=0 -S ppo.target_kl=6
    Example:  rlhf ppo --set rl_coef=0 --out models/sft_ptx --metrics metrics/sft_ptx.json   (SFT + ptx control)
    """
    run_stage("ppo", params, overrides=set_, sft=sft, reward=reward, data=data, world=world, out=out, value_out=value_out,
              metrics=metrics, plots=plots, checkpoints=checkpoints)
