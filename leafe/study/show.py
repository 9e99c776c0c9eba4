"""Terminal views of exploration results: one task's tree, readable (`leafe show-tree`)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text
from rich.tree import Tree

from leafe.trees import Node

OUTCOME_STYLE = {"success": "bold green", "failed": "red", "rolled_back": "yellow", "budget": "magenta",
                 "stopped": "dim", "context": "magenta"}


def render_tree(record: dict[str, Any], steps: bool = True) -> Tree:
    """A rich Tree of one task: each node with where it branched, its experience, its steps
    (the board where it starts and where it ends), its reflections and how it ended."""
    nodes: list[Node] = record["nodes"]
    verdict = "[bold green]solved[/]" if record["success"] else "[red]not solved[/]"
    root = Tree(
        f"[bold]{record['task_id']}[/] ({record['strategy']}): {verdict} with {record['env_steps']} of "
        f"{record['budget']} env steps; {record['branches']} branches ({record['branches_succeeded']} succeeded), "
        f"{record['reflections']} reflections ({record['reflections_parsed']} parsed), "
        f"{record['replayed_steps']} replayed steps"
    )
    children: dict[int | None, list[Node]] = {}
    for node in nodes:
        children.setdefault(node.parent, []).append(node)

    def add(parent_tree: Tree, node: Node) -> None:
        branch = parent_tree.add(_node_label(node))
        for part in _node_body(node, steps):
            branch.add(part)
        for child in children.get(node.id, []):
            add(branch, child)

    for node in children.get(None, []):
        add(root, node)
    return root


def _node_label(node: Node) -> Text:
    style = OUTCOME_STYLE.get(node.outcome, "")
    where = "root episode" if node.parent is None else f"branch of #{node.parent}, rolled back to step {node.tau}"
    label = Text(f"#{node.id} {where} (depth {node.depth}): ")
    label.append(node.outcome.replace("_", " "), style=style)
    label.append(f", {node.env_steps} env steps, {node.generated_tokens} tokens")
    if node.replayed_steps:
        label.append(f", {node.replayed_steps} replayed")
    return label


def _node_body(node: Node, steps: bool) -> list[Any]:
    parts: list[Any] = []
    if node.experience is not None:
        parts.append(Text.assemble(("experience: ", "bold cyan"), node.experience))
    for text in node.context_experiences:
        parts.append(Text.assemble(("in context: ", "cyan"), text))
    episode = node.episode
    if episode is None:
        return parts
    first = node.tau or 0
    start = episode.first_observation if first == 0 else episode.steps[first - 1].observation
    if steps:
        parts.append(Group(Text(f"board before step {first}:", style="dim"), Text(start)))
    for step in episode.steps[first:]:
        feedback = step.observation.splitlines()[0] if step.observation else ""
        line = Text.assemble((f"step {step.index}: ", "bold"), (step.action or "(no action)", "bold blue"),
                             f" -> {feedback}")
        if steps and step.reply.strip() != f"Action: {step.action}":
            line.append(f"   [{' '.join(step.reply.split())[:80]}]", style="dim")
        parts.append(line)
    if steps and episode.steps[first:]:
        parts.append(Group(Text("board at the end:", style="dim"), Text(episode.steps[-1].observation)))
    for r in node.reflections:
        why = "the episode failed" if r["why"] == "failure" else "interval"
        head = Text.assemble((f"reflection after {r['after_step']} steps ({why}): ", "bold yellow"))
        if not r["parsed"]:
            head.append("unparseable", style="red")
        elif r["step"] is None:
            head.append("nothing lost yet (Step: none)")
        elif not r["valid"]:
            head.append(f"step {r['step']} is not a step to roll back to", style="red")
        else:
            head.append(f"roll back to step {r['step']}" + ("" if r["branched"] else " (no branch: limits)"))
        parts.append(Group(head, Text("  " + " ".join(r["text"].split())[:300], style="italic")))
    return parts
