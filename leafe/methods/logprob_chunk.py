"""How many positions' fp32 log-softmax the trainers compute at once (`leafe.methods.token_logprobs`).

A module of its own, without torch, because the planner (`leafe.study.budget`) sizes the same chunk
in a dry run, which loads no model library.
"""

#: Positions whose fp32 log-softmax is computed at once (x vocabulary x 4 bytes: 4096 x 152k = 2.5 GB).
CHUNK = 4096
