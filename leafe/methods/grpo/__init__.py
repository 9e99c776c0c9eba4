"""Multi-turn GRPO, the outcome-reward baseline: G episodes per task, group-normalised advantages,
a clipped policy-gradient loss on the agent's own tokens, and a k3 KL penalty to the starting model.

`objective` holds the loss and its pieces (rewards, advantages, log-probs at the sampling temperature,
importance weights): pure functions, tested by hand. `trainer` holds `GRPOTrainer`: the policy, the
sampler, the frozen reference and the optimiser, one update on a batch of episodes, and the sync of
new weights into another engine. `checkpoints` holds what a run saves and resumes from, and `run`
holds `train_grpo`: the resumable, logged run that schedules the tasks and drives the trainer.

Why not TRL's GRPOTrainer: its `rollout_func`/`env_mask` path (experimental in TRL 1.16) could carry
our multi-turn episodes, but zero-variance groups stay in its batch (their tokens still count in the
loss normaliser and still carry the KL term), and its sampling without vLLM is its own `generate`
call, not our backend with its prefix cache. So this is a compact trainer on accelerate: sampling
goes through `rollout.py` with the backend holding the very weights being trained (its KV cache is
dropped after each update), and the loss, logging and checkpoints live here.
"""

from leafe.methods.grpo.objective import (
    LossParts,
    Sample,
    agent_logprobs,
    episode_reward,
    group_advantages,
    group_samples,
    importance_weights,
    sampler_logp_tensor,
    sampler_logprobs,
    token_loss,
)
from leafe.methods.grpo.run import check_tasks_per_step, task_schedule, train_grpo
from leafe.methods.grpo.trainer import SHARDED_WEIGHTS, GRPOTrainer
from leafe.settings import GRPOSettings

__all__ = [
    "SHARDED_WEIGHTS", "GRPOSettings", "GRPOTrainer", "LossParts", "Sample", "agent_logprobs", "check_tasks_per_step",
    "episode_reward", "group_advantages", "group_samples", "importance_weights", "sampler_logp_tensor",
    "sampler_logprobs", "task_schedule", "token_loss", "train_grpo",
]
