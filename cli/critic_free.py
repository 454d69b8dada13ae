"""Critic-free policy gradients against the reward model: rloo (Ahmadian et al. 2024) and grpo (Shao et al. 2024)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)
SFT_HELP = "SFT model folder: the policy's start and the frozen reference"
REWARD_HELP = "reward model folder (frozen)"
DATA_HELP = "folder with ppo.jsonl (training prompts), test.jsonl, corpus.jsonl (alignment tax)"
WORLD_HELP = "world file for the gold judge (skipped if absent)"


@app.command()
def rloo(
    sft: Path = typer.Option(Path("models/sft"), help=SFT_HELP),
    reward: Path = typer.Option(Path("models/reward"), help=REWARD_HELP),
    data: Path = typer.Option(Path("data/prepared"), help=DATA_HELP),
    world: Path = typer.Option(Path("data/raw/world.json"), help=WORLD_HELP),
    out: Path = typer.Option(Path("models/rloo"), help="HF causal-LM folder to write (policy + tokenizer)"),
    metrics: Path = typer.Option(Path("metrics/rloo.json"), help="metrics JSON"),
    plots: Path = typer.Option(Path("plots/rloo"), help="dvclive curves and the over-optimization plot"),
    checkpoints: Path = typer.Option(Path("checkpoints/rloo"), help="resumable checkpoints (removed on success)"),
    params: Path = Params,
) -> None:
    """RLOO: k samples per prompt, each one's baseline the mean reward of the others; no value model.

    Reward = RM score - kl_coef * KL to SFT (summed over the response), one REINFORCE step per rollout.
    Killed? Rerun the same command: it resumes from its last checkpoint and ends with the same weights.

    Example:  rlhf rloo
    Example:  dvc exp run -S rloo.samples_per_prompt=8 -S rloo.prompts_per_step=8
    """
    run_stage("rloo", params, sft=sft, reward=reward, data=data, world=world, out=out, metrics=metrics, plots=plots,
              checkpoints=checkpoints)


@app.command()
def grpo(
    sft: Path = typer.Option(Path("models/sft"), help=SFT_HELP),
    reward: Path = typer.Option(Path("models/reward"), help=REWARD_HELP),
    data: Path = typer.Option(Path("data/prepared"), help=DATA_HELP),
    world: Path = typer.Option(Path("data/raw/world.json"), help=WORLD_HELP),
    out: Path = typer.Option(Path("models/grpo"), help="HF causal-LM folder to write (policy + tokenizer)"),
    metrics: Path = typer.Option(Path("metrics/grpo.json"), help="metrics JSON"),
    plots: Path = typer.Option(Path("plots/grpo"), help="dvclive curves and the over-optimization plot"),
    checkpoints: Path = typer.Option(Path("checkpoints/grpo"), help="resumable checkpoints (removed on success)"),
    params: Path = Params,
) -> None:
    """GRPO: group-normalized RM scores as every token's advantage, clipped ratio, KL to SFT as a loss term.

    No value model. Killed? Rerun the same command: it resumes from its last checkpoint and ends with
    the same weights.

    Example:  rlhf grpo
    Example:  dvc exp run -S grpo.kl_coef=0.04
    """
    run_stage("grpo", params, sft=sft, reward=reward, data=data, world=world, out=out, metrics=metrics, plots=plots,
              checkpoints=checkpoints)
