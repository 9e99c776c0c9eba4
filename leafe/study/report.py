"""A run directory -> `report.html`: one self-contained page (no CDN, no network, works offline).

It holds the Pass@k table with 95% intervals, the Pass@k curves of every method on a log2 k axis
(inline SVG, drawn here), the cost of every stage, and an experience-tree viewer: for a handful of
explored tasks, the failed attempt, the reflection (tau, e), the rollback point and the branches
that followed, with the Sokoban boards drawn as grids.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from leafe.errors import LeafeError
from leafe.files import expect, read_json, write_text
from leafe.methods import registry
from leafe.passk import compare_tasks
from leafe.trees import read_trees

COLORS = {"base": "#6b7280", "grpo": "#d97706", "leafe": "#059669", "early_experience": "#2563eb", "ace": "#9333ea"}
#: Tasks shown in the tree viewer: the most instructive first (a branch that succeeded, then any branch).
TREES_SHOWN = 6
SOKOBAN_CELLS = {"#": "wall", "_": "floor", "@": "player", "+": "player goal", "$": "box", "*": "box goal", ".": "goal"}

e = html.escape


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` from its results.json (and its exploration trees, if any)."""
    run = Path(run_dir)
    if not (run / "results.json").exists():
        raise LeafeError(f"{run} has no results.json; run `leafe run CONFIG --out {run}` first")
    results = read_results(run / "results.json")
    trees_path = run / "leafe" / "explore" / "trees.jsonl"
    trees = pick_trees(read_report_trees(trees_path)) if trees_path.exists() else []
    path = run / "report.html"
    write_text(path, render(results, trees))
    return path


def read_results(path: Path) -> dict[str, Any]:
    """results.json, checked for what the page reads of it, so another file is one line, not a KeyError."""
    results = expect(read_json(path), dict, path, ("env", "tasks", "samples", "model", "methods"))
    for name, method in expect(results["methods"], dict, f"{path}: methods").items():
        expect(method, dict, f"{path}: methods.{name}", ("pass_at_k", "ci95"))
    return results


#: What the tree viewer reads of a tree record (`leafe.methods.explore` writes them all).
TREE_KEYS = ("task_id", "success", "branches", "branches_succeeded", "env_steps", "budget", "reflections",
             "reflections_parsed", "nodes")


def read_report_trees(path: Path) -> list[dict[str, Any]]:
    """The tree records of a trees.jsonl with their nodes as plain dicts, every field there (the
    nodes are checked by `read_trees`)."""
    records = [expect(record, dict, path, TREE_KEYS) for record in read_trees(path)]
    for record in records:
        record["nodes"] = [node.to_dict() for node in record["nodes"]]
    return records


def pick_trees(records: list[dict[str, Any]], n: int = TREES_SHOWN) -> list[dict[str, Any]]:
    def rank(r: dict[str, Any]) -> tuple:
        return (-(r["branches_succeeded"] > 0), -(r["branches"] > 0), r["task_id"])

    return sorted(records, key=rank)[:n]


# -- page ----------------------------------------------------------------------------------------
def render(results: dict[str, Any], trees: list[dict[str, Any]]) -> str:
    methods = results["methods"]
    title = f"leafe: {results.get('name', 'study')}"
    head = (f"{e(results['env'])}, {results['tasks']} held-out tasks (seed {results.get('task_seed')}) x "
            f"{results['samples']} samples, T={results.get('temperature', 1.0)}; base model "
            f"<code>{e(Path(results['model']).name)}</code>")
    body = [
        f"<h1>{e(title)}</h1><p class=sub>{head}</p>",
        "<h2>Pass@k</h2>",
        passk_table(methods, starts_of(results)),
        differences_table(methods),
        "<h2>Pass@k curves</h2>",
        curves_svg(methods),
        "<h2>Cost</h2>",
        cost_table(results.get("cost", {})),
        "<h2>Experience trees</h2>",
        tree_viewer(trees),
    ]
    return PAGE.format(title=e(title), css=CSS, js=JS, body="\n".join(body))


def ks_of(methods: dict[str, Any]) -> list[str]:
    """Every k any method was evaluated at, in order (as results.json keys them: strings)."""
    ks = {k for m in methods.values() for k in m["pass_at_k"]}
    return sorted(ks, key=int)


def starts_of(results: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each method's starting model as the table shows it: its name ("GRPO") and its path (the base
    has none)."""
    methods = results["methods"]
    starts = {name: (str(m["start"]), str(m.get("start_model", ""))) for name, m in methods.items() if m.get("start")}
    return {name: (registry.label(start), path) for name, (start, path) in starts.items()}


def passk_table(methods: dict[str, Any], starts: dict[str, tuple[str, str]] | None = None) -> str:
    """Pass@k of every method with its interval, and, where known, the model it started from."""
    if not methods:
        return "<p class=empty>No method has been evaluated yet.</p>"
    ks = ks_of(methods)
    starts = starts or {}
    best = {k: max(m["pass_at_k"].get(k, -1) for m in methods.values()) for k in ks}
    head = "<tr><th>method</th>" + ("<th>starts from</th>" if starts else "")
    rows = [head + "".join(f"<th>Pass@{k}</th>" for k in ks) + "</tr>"]
    for name, m in methods.items():
        cells = []
        for k in ks:
            if k not in m["pass_at_k"]:
                cells.append("<td>-</td>")
                continue
            value, (lo, hi) = m["pass_at_k"][k], m["ci95"][k]
            mark = " class=best" if value == best[k] else ""
            cells.append(f"<td{mark}>{100 * value:.1f}<span class=ci>[{100 * lo:.1f}, {100 * hi:.1f}]</span></td>")
        label, path = starts.get(name, ("-", ""))
        start = f"<td class=start title='{e(path)}'>{e(label)}</td>" if starts else ""
        rows.append(f"<tr><th><i class=dot style='background:{COLORS.get(name, '#000')}'></i>{e(registry.label(name))}"
                    f"</th>{start}{''.join(cells)}</tr>")
    said = (" Starts from: the model each method began with (GRPO: GRPO's checkpoint; hover for its path); ACE "
            "plays it with the playbook in its system prompt." if starts else "")
    return ("<table class=passk>" + "".join(rows) + "</table><p class=note>Success %, unbiased Pass@k estimator; "
            "95% bootstrap intervals over tasks in brackets; the best value of each column in bold." + said + "</p>")


def differences_table(methods: dict[str, Any]) -> str:
    """Each method minus the base on the same tasks, paired (empty without per-task records)."""
    base = methods.get("base")
    others = {n: m for n, m in methods.items() if n != "base" and m.get("tasks")}
    if not base or not base.get("tasks") or not others:
        return ""
    ks = [k for k in ks_of(methods) if all(k in m["pass_at_k"] for m in (base, *others.values()))]
    rows = ["<tr><th>method</th>" + "".join(f"<th>Pass@{k}</th>" for k in ks) + "</tr>"]
    for name, m in others.items():
        vs = m.get("vs_base") or compare_tasks(base["tasks"], m["tasks"], ks)
        cells = []
        for k in ks:
            d, (lo, hi) = vs[k]["diff"], vs[k]["ci95"]
            mark = " class=up" if lo > 0 else " class=down" if hi < 0 else ""
            cells.append(f"<td{mark}>{100 * d:+.1f}<span class=ci>[{100 * lo:+.1f}, {100 * hi:+.1f}]</span></td>")
        rows.append(f"<tr><th><i class=dot style='background:{COLORS.get(name, '#000')}'></i>{e(registry.label(name))}"
                    f"</th>{''.join(cells)}</tr>")
    return ("<h3>Against the base, task by task</h3><table class=passk>" + "".join(rows) + "</table><p class=note>"
            "Points of Pass@k above the base on the same tasks; the 95% bootstrap interval resamples tasks and keeps "
            "each task's two results together, so it is narrower than the two methods' own intervals suggest. "
            "Green: the interval is above 0; red: below 0.</p>")


def curves_svg(methods: dict[str, Any], width: int = 720, height: int = 400) -> str:
    """Pass@k against log2 k, one line per method, its 95% interval as a band."""
    if not methods:
        return ""
    ks = [int(k) for k in ks_of(methods)]
    left, right, top, bottom = 56, 170, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max(math.log2(max(ks)), 1.0)

    def x(k: int) -> float:
        return left + plot_w * math.log2(k) / span

    def y(v: float) -> float:
        return top + plot_h * (1 - v)

    parts = [f"<svg class=curves viewBox='0 0 {width} {height}' width='{width}' height='{height}' role=img "
             f"aria-label='Pass@k curves'>"]
    for v in range(0, 101, 20):
        parts.append(f"<line class=grid x1={left} x2={left + plot_w} y1={y(v / 100):.1f} y2={y(v / 100):.1f} />"
                     f"<text class=tick x={left - 8} y={y(v / 100) + 4:.1f} text-anchor=end>{v}%</text>")
    for k in ks:
        parts.append(f"<line class=grid x1={x(k):.1f} x2={x(k):.1f} y1={top} y2={top + plot_h} />"
                     f"<text class=tick x={x(k):.1f} y={top + plot_h + 18} text-anchor=middle>{k}</text>")
    parts.append(f"<text class=axis x={left + plot_w / 2} y={height - 6} text-anchor=middle>k (log2 scale)</text>"
                 f"<text class=axis transform='translate(14 {top + plot_h / 2}) rotate(-90)' text-anchor=middle>"
                 f"Pass@k</text>")
    for i, (name, m) in enumerate(methods.items()):
        color = COLORS.get(name, "#111")
        points = sorted((int(k), v) for k, v in m["pass_at_k"].items())
        lows = [(k, m["ci95"][str(k)][0]) for k, _ in points]
        highs = [(k, m["ci95"][str(k)][1]) for k, _ in points]
        band = " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v in highs + lows[::-1])
        line = " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v in points)
        parts.append(f"<g class=method data-method='{e(name)}'>"
                     f"<polygon class=band points='{band}' fill='{color}' />"
                     f"<polyline class=curve points='{line}' stroke='{color}' />")
        for k, v in points:
            parts.append(f"<circle cx={x(k):.1f} cy={y(v):.1f} r=3.5 fill='{color}'>"
                         f"<title>{e(registry.label(name))}: Pass@{k} = {100 * v:.1f}%</title></circle>")
        parts.append("</g>")
    for i, name in enumerate(methods):  # legend entries toggle their method's curve (script below)
        color, ly = COLORS.get(name, "#111"), top + 10 + 22 * i
        parts.append(f"<g class=legend-item data-method='{e(name)}'><rect x={left + plot_w + 12} y={ly - 9} "
                     f"width=150 height=18 fill=transparent /><line x1={left + plot_w + 18} x2={left + plot_w + 40} "
                     f"y1={ly} y2={ly} stroke='{color}' stroke-width=3 /><text class=legend x={left + plot_w + 46} "
                     f"y={ly + 4}>{e(registry.label(name))}</text></g>")
    parts.append("</svg><p class=note>Shaded: 95% bootstrap interval over tasks. Click a legend entry to hide or "
                 "show its curve.</p>")
    return "".join(parts)


def cost_table(cost: dict[str, Any]) -> str:
    if not cost:
        return "<p class=empty>No stage has run yet.</p>"
    rows = ["<tr><th>stage</th><th>env steps</th><th>generated tokens</th><th>wall time</th></tr>"]
    for stage, c in cost.items():
        rows.append(f"<tr><th>{e(stage)}</th><td>{c['env_steps']:,}</td><td>{c['generated_tokens']:,}</td>"
                    f"<td>{_duration(c['wall_s'])}</td></tr>")
    total = {k: sum(c[k] for c in cost.values()) for k in ("env_steps", "generated_tokens", "wall_s")}
    rows.append(f"<tr class=total><th>total</th><td>{total['env_steps']:,}</td><td>{total['generated_tokens']:,}</td>"
                f"<td>{_duration(total['wall_s'])}</td></tr>")
    return "<table class=cost>" + "".join(rows) + "</table>"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


# -- experience trees ----------------------------------------------------------------------------
def tree_viewer(records: list[dict[str, Any]]) -> str:
    if not records:
        return "<p class=empty>No exploration trees in this run (LEAFE was not among the methods).</p>"
    tabs, panels = [], []
    for i, record in enumerate(records):
        outcome = "solved" if record["success"] else "not solved"
        tabs.append(f"<button class=tab data-panel='tree-{i}'>{e(record['task_id'])} "
                    f"<small>{record['branches']} branches, {outcome}</small></button>")
        panels.append(f"<section class=panel id='tree-{i}'>{_tree(record)}</section>")
    legend = ("<p class=note>Each box is one episode. A reflection on a failed attempt names the step tau where it "
              "went wrong and writes an experience e; the environment is rolled back to the state before step tau "
              "and the branch re-plays from there with e in its context. The rollback point is marked in the "
              "parent's moves.</p>")
    return f"<div class=viewer>{legend}<nav class=tabs>{''.join(tabs)}</nav>{''.join(panels)}</div>"


def _tree(record: dict[str, Any]) -> str:
    nodes = record["nodes"]
    children: dict[int | None, list[dict]] = {}
    for node in nodes:
        children.setdefault(node["parent"], []).append(node)

    def subtree(node: dict) -> str:
        kids = children.get(node["id"], [])
        inner = "".join(f"<li>{subtree(k)}</li>" for k in kids)
        return _node(node, kids) + (f"<ul>{inner}</ul>" if kids else "")

    roots = children.get(None, [])
    return ("<ul class=tree>" + "".join(f"<li>{subtree(r)}</li>" for r in roots) + "</ul>"
            f"<p class=note>{record['env_steps']} env steps of a budget of {record['budget']}, "
            f"{record['reflections']} reflections ({record['reflections_parsed']} parsed), "
            f"{record['branches']} branches ({record['branches_succeeded']} succeeded).</p>")


def _node(node: dict, kids: list[dict]) -> str:
    episode = node.get("episode") or {"steps": [], "first_observation": ""}
    steps = episode["steps"]
    tau = node["tau"] or 0
    where = "attempt" if node["parent"] is None else f"branch of #{node['parent']} from step {tau}"
    head = (f"<header><b>#{node['id']}</b> {e(where)} <span class='outcome {e(node['outcome'])}'>"
            f"{e(node['outcome'].replace('_', ' '))}</span></header>")
    parts = [head]
    if node.get("experience"):
        parts.append(f"<p class=experience><b>e</b> {e(node['experience'])}</p>")
    start = episode["first_observation"] if tau == 0 else steps[tau - 1]["observation"]
    parts.append(f"<div class=boards>{_board(start, f'before step {tau}')}")
    if len(steps) > tau:
        parts.append(_board(steps[-1]["observation"], "at the end"))
    parts.append("</div>")
    rollbacks = {k["tau"] for k in kids}
    moves = []
    for step in steps:
        if step["index"] < tau:
            continue  # the parent's steps, replayed by the rollback
        cls = "move rollback" if step["index"] in rollbacks else "move"
        feedback = step["observation"].splitlines()[0] if step["observation"] else ""
        moves.append(f"<span class='{cls}' title='{e(feedback)}'>{step['index']}: {e(step['action'] or '?')}</span>")
    if moves:
        parts.append(f"<div class=moves>{''.join(moves)}</div>")
    for r in node.get("reflections", []):
        if r["parsed"]:
            text = f"<b>tau</b> = {r['step']}, <b>e</b> = {e(r['experience'] or '')}"
        else:
            text = f"unparsed: {e(' '.join(r['text'].split())[:160])}"
        flag = "branched" if r.get("branched") else ("valid" if r.get("valid") else "not used")
        parts.append(f"<p class=reflection>reflection after {r['after_step']} steps ({e(r['why'])}, {flag}): "
                     f"{text}</p>")
    return f"<div class='node {e(node['outcome'])}'>{''.join(parts)}</div>"


def _board(observation: str, caption: str) -> str:
    grid = [line for line in observation.splitlines() if line and set(line) <= set(SOKOBAN_CELLS) | {" "}]
    if not grid:
        return f"<figure><pre>{e(observation)}</pre><figcaption>{e(caption)}</figcaption></figure>"
    width = max(len(line) for line in grid)
    cells = []
    for line in grid:
        for ch in line.ljust(width):
            cells.append(f"<i class='cell {SOKOBAN_CELLS.get(ch, 'outside')}'></i>")
    return (f"<figure><div class=board style='grid-template-columns:repeat({width},14px)' "
            f"title='{e(chr(10).join(grid))}'>{''.join(cells)}</div><figcaption>{e(caption)}</figcaption></figure>")


PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width,initial-scale=1'>
<title>{title}</title><style>{css}</style></head>
<body><main>
{body}
<footer>Written by <code>leafe report</code>. Every number comes from this run directory's results.json.</footer>
</main><script>{js}</script></body></html>
"""

CSS = """
body{margin:0;font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1f2937;background:#f8fafc}
main{max-width:1080px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.sub,.note,footer{color:#6b7280;font-size:13px}footer{margin-top:40px}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0001}
th,td{padding:6px 12px;border-bottom:1px solid #eef0f3;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td.start{text-align:left}tr:first-child th{background:#f1f5f9;font-size:13px}
td.best{font-weight:700}td.up{color:#047857;font-weight:700}td.down{color:#b91c1c;font-weight:700}.ci{display:block;color:#9ca3af;font-size:11px}tr.total{font-weight:700}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:8px}
svg.curves{background:#fff;box-shadow:0 1px 2px #0001;max-width:100%;height:auto}
.grid{stroke:#eef0f3}.tick{font-size:11px;fill:#6b7280}.axis{font-size:12px;fill:#374151}.legend{font-size:13px;fill:#1f2937}
.band{opacity:.08}.method.off{display:none}.legend-item{cursor:pointer}.curve{fill:none;stroke-width:2.5}
.tabs{display:flex;flex-wrap:wrap;gap:6px;margin:8px 0 14px}
.tab{border:1px solid #d1d5db;background:#fff;border-radius:6px;padding:6px 10px;cursor:pointer;font:inherit}
.tab small{color:#6b7280}.tab.on{border-color:#059669;box-shadow:0 0 0 2px #05966933}
.tree,.tree ul{list-style:none;margin:0;padding:0}.tree ul{margin-left:28px;padding-left:18px;border-left:2px solid #cbd5e1}
.tree li{position:relative;margin:10px 0}.tree ul>li::before{content:'';position:absolute;left:-18px;top:22px;width:16px;border-top:2px solid #cbd5e1}
.node{background:#fff;border:1px solid #e5e7eb;border-left:4px solid #9ca3af;border-radius:6px;padding:8px 12px;display:inline-block;max-width:920px}
.node.success{border-left-color:#059669}.node.failed,.node.budget{border-left-color:#dc2626}.node.rolled_back{border-left-color:#d97706}
header{font-size:13px;margin-bottom:6px}.outcome{padding:1px 6px;border-radius:4px;background:#f3f4f6;margin-left:6px}
.outcome.success{background:#d1fae5;color:#065f46}.outcome.failed,.outcome.budget{background:#fee2e2;color:#991b1b}
.outcome.rolled_back{background:#fef3c7;color:#92400e}
.experience{margin:4px 0;padding:4px 8px;background:#ecfdf5;border-radius:4px;font-size:13px}
.reflection{margin:6px 0 0;padding:4px 8px;background:#fffbeb;border-radius:4px;font-size:13px}
.boards{display:flex;gap:14px}figure{margin:0}figcaption{font-size:11px;color:#6b7280}
.board{display:grid;gap:1px}.cell{width:14px;height:14px;display:block;border-radius:2px}
.cell.outside{background:transparent}.cell.wall{background:#475569}.cell.floor{background:#f1f5f9}
.cell.goal{background:#f1f5f9;box-shadow:inset 0 0 0 4px #fca5a5}.cell.box{background:#b45309}
.cell.box.goal{background:#059669;box-shadow:none}.cell.player{background:#2563eb;border-radius:50%}
.cell.player.goal{box-shadow:inset 0 0 0 3px #fca5a5}
.moves{display:flex;flex-wrap:wrap;gap:4px;margin-top:6px}.move{font:12px ui-monospace,monospace;background:#f3f4f6;border-radius:4px;padding:1px 6px}
.move.rollback{background:#fde68a;outline:2px solid #d97706}
pre{font-size:12px;background:#f9fafb;padding:6px;margin:0;white-space:pre-wrap;max-width:420px}
.empty{color:#6b7280;font-style:italic}
"""

JS = """
(function(){
  var tabs=document.querySelectorAll('.tab'),panels=document.querySelectorAll('.panel');
  function show(id){panels.forEach(function(p){p.hidden=p.id!==id});
    tabs.forEach(function(t){t.classList.toggle('on',t.dataset.panel===id)})}
  tabs.forEach(function(t){t.addEventListener('click',function(){show(t.dataset.panel)})});
  if(tabs.length)show(tabs[0].dataset.panel);
  document.querySelectorAll('.legend-item').forEach(function(l){l.addEventListener('click',function(){
    var g=document.querySelector('g.method[data-method="'+l.dataset.method+'"]');
    g.classList.toggle('off');l.style.opacity=g.classList.contains('off')?.35:1})});
})();
"""
