"""Probe a base agent's decisions on held-out boards, one forward pass each (no sampling).

policy: at the token where the thought names its move ("Thought: go _"), is the model's most
likely direction one of the expert's optimal moves? Boards are states reached by noisy expert play
(as in the bootstrap data) on held-out levels; chance is the share of optimal moves among the four.
copy: the same boards with an experience message that names the move to play ("... Instead, go X."):
is the most likely direction X?
episode: the same decision as `policy`, but in the conversation a rollout builds (system prompt,
instructions, every earlier turn and board), which is where the agent has to read the board.
act: in that conversation, generate the whole reply (greedy, and sampled at T = 1) and check that the
action it ends in is optimal; this works whatever the thought looks like (agents built with --plans
decide over several tokens, so the one-token figures above do not apply to them). plan_push: the
share of greedy plan replies ("push D from (r,c); ...") whose push is the one the optimal line makes next.
reflect: a reflection fragment as the bootstrap draws them (the last turns of an attempt that lost
the level, the feedback marking the losing step, then the reflection prompt): does the greedy
reflection name that step (reflect_step), or say nothing is lost (reflect_none)? In-distribution by
construction; `benchmarks/reflection_audit.py` grades the reflections of a real exploration.

    python benchmarks/probe_base_agent.py --model .leafe/models/base-agent-<hash> --boards 400
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from functools import partial
from pathlib import Path

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leafe.base_agent.synthetic import (
        Fragment,
        NoisyExpert,
        _actions,
        _shown_observations,
        fragment_ids,
        make_reflection_fragment,
    )
    from leafe.chat import ChatFormat
    from leafe.envs.sokoban import ACTIONS, SokobanEnv, next_push, parse_direction
    from leafe.envs.sokoban.oracle import Expert, describe_mistake
    from leafe.files import write_json
    from leafe.prompts import experience_message, parse_action
    from leafe.rollout import Recorder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--boards", type=int, default=400)
    parser.add_argument("--task-seed", type=int, default=950_000, help="held out: bootstrap uses seeds >= 10M")
    parser.add_argument("--max-steps", type=int, default=15)
    parser.add_argument("--mistake-rate", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    fmt = ChatFormat(tokenizer)
    prefix = fmt.encode("Thought: go")
    direction_ids = {a: fmt.encode(f"Thought: go {a}")[len(prefix)] for a in ACTIONS}
    reply_length = len(fmt.encode("Thought: go up.")) + (fmt.end_of_turn_id is not None)  # the stand-in reply
    rng = random.Random(0)
    env = SokobanEnv(max_steps=args.max_steps)
    counts = {"policy": [0, 0], "copy": [0, 0], "episode": [0, 0], "act_greedy": [0, 0], "act_sampled": [0, 0],
              "plan_push": [0, 0], "reflect_step": [0, 0], "reflect_none": [0, 0]}
    built = Path(args.model) / "bootstrap.json"
    plans = built.exists() and json.loads(built.read_text())["config"].get("plans", False)
    reflect_rng = random.Random(1)  # its own stream, so the board probes keep the draws of earlier runs
    recorder = Recorder(fmt)

    mass = {"policy": 0.0, "episode": 0.0}  # probability of an optimal direction when sampling at T = 1

    def most_likely(ids: list[int], right: set[str], name: str) -> bool:
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        if name in mass:
            mass[name] += sum(probs[direction_ids[a]].item() for a in right)
        return max(ACTIONS, key=lambda a: probs[direction_ids[a]].item()) in right

    def act(ids: list[int], sample: bool) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=sample, top_k=0,
                                 eos_token_id=list(fmt.stop_token_ids), pad_token_id=tokenizer.pad_token_id)
        return fmt.decode(out[0, len(ids):].tolist())

    torch.manual_seed(0)
    chance = 0.0
    for task in env.make_tasks(args.boards, args.task_seed):
        expert = Expert.of(task, args.max_steps)
        replies = NoisyExpert(expert, rng, args.mistake_rate).play(expert.start, args.max_steps)
        cut = rng.randrange(len(replies)) if replies else 0
        state = expert.states(_actions(replies[:cut]))[-1]
        fixes = expert.optimal(state)
        if not fixes:
            continue
        shown = _shown_observations(task, replies[:cut], args.max_steps)[-1]
        wrong = rng.choice([a for a in ACTIONS if a not in fixes] or list(ACTIONS))
        probes = {"policy": ([("user", shown)], set(fixes)),
                  "copy": ([("user", shown), ("user", experience_message(describe_mistake(expert, state, cut,
                                                                                          wrong)))], {fixes[0]})}
        chance += len(fixes) / len(ACTIONS)
        for name, (messages, right) in probes.items():
            # the board (and experience) as the bootstrap's move fragments show it, up to "Thought: go"
            ids, _ = fragment_ids(Fragment(messages, "Thought: go up."), fmt)
            cut_at = len(ids) - reply_length + len(prefix)
            counts[name][0] += most_likely(ids[:cut_at], right, name)
            counts[name][1] += 1
        live = recorder.start(SokobanEnv(max_steps=args.max_steps), task)
        for reply in replies[:cut]:
            recorder.apply(live, recorder.scripted(reply))
        counts["episode"][0] += most_likely(live.conv.prompt_ids() + prefix, set(fixes), "episode")
        counts["episode"][1] += 1
        for name, sample in (("act_greedy", False), ("act_sampled", True)):
            reply = act(live.conv.prompt_ids(), sample)
            counts[name][0] += parse_direction(parse_action(reply)) in fixes
            counts[name][1] += 1
            plan = re.search(r"push (\w+) from", reply)
            if plan and not sample:
                pushes = {p[0] for p in map(partial(next_push, expert.room, expert.table, state), fixes) if p}
                counts["plan_push"][0] += plan.group(1) in pushes
                counts["plan_push"][1] += 1
        fragment = make_reflection_fragment(task, args.max_steps, reflect_rng, args.mistake_rate, plans=plans)
        truth = re.match(r"Step: (\d+)", fragment.reply) if fragment else None
        if truth:
            ids, mask = fragment_ids(fragment, fmt)
            said = re.match(r"Step:\s*(\w+)", act(ids[: mask.index(1)], False))
            for name, hit in (("reflect_step", said and said.group(1) == truth.group(1)),
                              ("reflect_none", said and said.group(1) == "none")):
                counts[name][0] += bool(hit)
                counts[name][1] += 1
    boards = counts["policy"][1]
    result = {"model": str(args.model), "boards": boards, "task_seed": args.task_seed,
              "policy": counts["policy"][0] / boards, "policy_chance": chance / boards,
              "copy": counts["copy"][0] / boards, "copy_chance": 0.25, "episode": counts["episode"][0] / boards,
              "policy_sampled": mass["policy"] / boards, "episode_sampled": mass["episode"] / boards,
              **{name: counts[name][0] / max(counts[name][1], 1) for name in ("act_greedy", "act_sampled", "plan_push",
                                                                              "reflect_step", "reflect_none")},
              "plan_replies": counts["plan_push"][1], "reflections": counts["reflect_step"][1], "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
