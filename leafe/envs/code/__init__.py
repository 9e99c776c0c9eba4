"""The code env: program synthesis with execution feedback, judged in a sandbox.
`leafe.envs.make("code", dataset=...)` builds the env.

env.py holds the judge (verdicts, token-wise comparison of outputs, calls of a submitted function)
and the env; datasets.py the problem format and the data sets (leafe's own problems in data/,
HumanEval, MBPP, APPS, CodeContests); sandbox.py the sandbox every submission runs in (bubblewrap,
an unprivileged user, rlimits, a wall clock, output caps).
"""

from leafe.envs.code.datasets import NAMES, dataset_status, load_problems
from leafe.envs.code.env import STATUSES, CodeEnv, Verdict, default_sandbox, extract_program, judge
from leafe.envs.code.sandbox import Limits, Outcome, Sandbox, SandboxError, SandboxFault

__all__ = [
    "NAMES", "STATUSES", "CodeEnv", "Limits", "Outcome", "Sandbox", "SandboxError", "SandboxFault", "Verdict",
    "dataset_status", "default_sandbox", "extract_program", "judge", "load_problems",
]
