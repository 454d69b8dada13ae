"""PPO learns: on a toy bandit whose optimum is known, the stage's own steps raise the reward to it.

The bandit: a vocabulary of 6 tokens, every prompt the same two tokens, responses of at most 3 tokens.
The reward is 1 when the response contains TARGET and then ends with EOS, else 0 (a response that
never ends gets `missing_eos_penalty` = 0): the optimal policy answers "TARGET EOS" and earns 1; the
random initial policy earns about 0.1. The reward model is a fixed function read at the last real
token, as `rlhf.rm.rewards_from_ids` reads any RM. Everything else is the stage: `stages.ppo.PPOState`
and `ppo_step` (rollout, score, KL-penalized rewards, GAE, clipped updates).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from rlhf import ppo as P
from tests.conftest import tiny_params
EOS, PAD, TARGET, VOCAB = 2, 1, 4, 6


def tiny_llama(seed: int, *, seq_cls: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD, num_labels=1)
    torch.manual_seed(seed)
    return (LlamaForSequenceClassification if seq_cls else LlamaForCausalLM)(config).eval()


class TargetReward(torch.nn.Module):
    """An RM with `rlhf.rm`'s interface: 1 at every position from the first TARGET token on, else 0."""

    base_model_prefix = "backbone"

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(reward_bias=0.0)
        self.score = torch.nn.Identity()

    def backbone(self, input_ids, attention_mask, position_ids, use_cache):
        seen = (torch.cumsum((input_ids == TARGET).long() * attention_mask, 1) > 0).float()
        return SimpleNamespace(last_hidden_state=seen.unsqueeze(-1))  # (B, T, 1)


def bandit_state(steps: int):
    from rlhf.devices import make_optimizer
    from rlhf.dist import Dist
    from rlhf.rollout import Data
    from rlhf.training import Checkpointer
    from stages import ppo

    params = tiny_params("ppo", steps=steps, batch_size=64, minibatch_size=64, micro_batch_size=64, ppo_epochs=4,
                         lr=3e-3, value_lr=3e-3, max_new_tokens=3, kl_coef=0.01, target_kl=0.0,
                         whiten_rewards=False, missing_eos_penalty=0.0, ptx_coef=0.0, checkpoint_every=0)
    policy = tiny_llama(0)
    value = P.ValueModel(tiny_llama(1, seq_cls=True))
    device = torch.device("cpu")
    return ppo.PPOState(
        params=params, dist=Dist(), device=device, tokenizer=SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS),
        policy=policy, ref=copy.deepcopy(policy).requires_grad_(False), value=value, rm=TargetReward(),
        policy_opt=make_optimizer(policy.parameters(), params.lr, 0.0, device, eps=params.adam_eps),
        value_opt=make_optimizer(value.parameters(), params.value_lr, 0.0, device, eps=params.adam_eps),
        kl_ctl=P.make_kl_controller(params.kl_coef, 0.0, 1), sample_gen=torch.Generator().manual_seed(0),
        shuffle_gen=torch.Generator().manual_seed(1),
        data=Data(prompts=["p"] * 64, queries=[[0, 5]] * 64, prompts_too_long=0, test_prompts=[], ptx_docs=[],
                  heldout_docs=[]),
        judge=None, checkpointer=Checkpointer(None, ""), reuse=True,
    )


def test_ppo_raises_reward_to_the_known_optimum_of_a_bandit():
    from stages import ppo

    state = bandit_state(steps=30)
    history = [ppo.ppo_step(state, step) for step in range(state.params.steps)]
    start = sum(h["objective/scores"] for h in history[:3]) / 3
    end = sum(h["objective/scores"] for h in history[-3:]) / 3
    print(f"bandit reward: {start:.3f} -> {end:.3f}")
    assert start < 0.3, start  # the random policy: ~0.1
    assert end > 0.9, (start, end)  # the optimum is 1
    assert history[-1]["objective/kl"] > 0.5  # it got there by moving away from the reference
    assert all(h["sanity/first_approxkl"] == 0.0 for h in history)  # item 18 held on every step
