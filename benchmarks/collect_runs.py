"""Gather the results.json of several `leafe run` directories into one file (for BENCHMARKS.md).

    python benchmarks/collect_runs.py runs/sokoban-demo runs/demo-start-base ... --out benchmarks/results/demo.json

Each entry keeps the run's Pass@k with intervals per method, its stage costs, and the settings that
differ between the runs (read from each stage's recorded fingerprint), so a table can name what changed.
`--against grpo` also pairs every other method with GRPO on the same tasks (`vs_grpo`, as `vs_base`):
LEAFE against the checkpoint it started from.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def flatten(data, prefix: str = "") -> dict:
    out = {}
    for key, value in (data or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


def settings_of(run: Path) -> dict:
    found = {}
    for record in sorted(run.glob("**/stage.json")):
        data = json.loads(record.read_text())
        found |= flatten(data["fingerprint"]["settings"], data["stage"] + ".")
        if data.get("model"):  # which checkpoint the stage started from, relative to its run
            model = str(data["model"])
            found[data["stage"] + ".model"] = model.replace(str(run), "RUN") if model.startswith(str(run)) else Path(model).name
    return found


def against(results: dict, method: str) -> dict:
    """Every other method's Pass@k minus `method`'s on the same tasks, with paired intervals."""
    from leafe.passk import compare_tasks

    methods = results["methods"]
    if method not in methods:
        raise SystemExit(f"--against {method}: the run has no such method ({', '.join(methods)})")
    ks = [int(k) for k in methods[method]["pass_at_k"]]
    return {m: compare_tasks(methods[method]["tasks"], r["tasks"], ks) for m, r in methods.items()
            if m not in ("base", method)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--against", default=None, help="also pair every method with this one (vs_<method>)")
    args = parser.parse_args()
    settings = {run: settings_of(run) for run in args.runs}
    keys = set().union(*(s.keys() for s in settings.values()))
    differing = sorted(k for k in keys if len({json.dumps(s.get(k)) for s in settings.values()}) > 1)
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "runs": {}}
    for run in args.runs:
        results = json.loads((run / "results.json").read_text())
        report["runs"][str(run)] = {
            "differs": {k: settings[run].get(k) for k in differing},
            "tasks": results["tasks"], "samples": results["samples"],
            "methods": {m: {"pass_at_k": r["pass_at_k"], "ci95": r["ci95"],
                            **{key: r[key] for key in ("vs_base", "tasks", "note") if r.get(key)}}
                        for m, r in results["methods"].items()},
            "cost": results["cost"],
            **({f"vs_{args.against}": against(results, args.against)} if args.against else {}),
            "wall_s": round(sum(c["wall_s"] for c in results["cost"].values()), 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for run, entry in report["runs"].items():
        cells = "  ".join(f"{m} {100 * r['pass_at_k']['1']:.1f}/{100 * r['pass_at_k'][str(entry['samples'])]:.1f}"
                          for m, r in entry["methods"].items())
        print(f"{run}: {cells}  differs: {entry['differs']}")
        for m, pair in entry.get(f"vs_{args.against}", {}).items():
            print(f"  {m} vs {args.against}, Pass@1: {100 * pair['1']['diff']:+.1f} "
                  f"[{100 * pair['1']['ci95'][0]:+.1f}, {100 * pair['1']['ci95'][1]:+.1f}]")


if __name__ == "__main__":
    sys.exit(main())
