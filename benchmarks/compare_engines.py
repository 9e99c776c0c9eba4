"""The same study sampled by two engines: each method's Pass@k in both runs, paired per task.

    python benchmarks/compare_engines.py runs/demo-hf runs/demo-vllm --out benchmarks/results/demo_vllm_vs_hf.json

Run B is typically run A's directory copied and rerun with `--set generation.backend=vllm`: the
training stages keep their fingerprints and are reused, and every sampling stage (and what trains on
its samples) is redone by the other engine. Engines draw different random numbers, so the two runs
agree within sampling noise, not digit for digit; the paired interval (same tasks) says how much.
Also prints each stage's wall time in both runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from leafe.passk import compare_tasks


def compare(a: dict, b: dict) -> dict:
    rows = {}
    for method, ma in a["methods"].items():
        mb = b["methods"].get(method)
        if mb is None:
            continue
        ks = [k for k in ma["pass_at_k"] if k in mb["pass_at_k"]]
        kmax = max(ks, key=int)
        paired = compare_tasks(ma["tasks"], mb["tasks"], ["1", kmax])
        rows[method] = {"k_max": int(kmax),
                        "a": {"pass@1": ma["pass_at_k"]["1"], "pass@kmax": ma["pass_at_k"][kmax]},
                        "b": {"pass@1": mb["pass_at_k"]["1"], "pass@kmax": mb["pass_at_k"][kmax]},
                        "b_minus_a": paired}
    walls = {stage: [a["cost"].get(stage, {}).get("wall_s"), b["cost"].get(stage, {}).get("wall_s")]
             for stage in a["cost"]}
    return {"methods": rows, "wall_s": walls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    a, b = (json.loads((run / "results.json").read_text()) for run in (args.a, args.b))
    result = {"a": str(args.a), "b": str(args.b), "machine": platform.processor() or platform.machine(),
              **compare(a, b)}
    print(f"| method | Pass@1 {args.a.name} | Pass@1 {args.b.name} | paired diff [95% CI] | Pass@k_max both | paired diff [95% CI] |")
    print("|---|---|---|---|---|---|")
    for method, r in result["methods"].items():
        d1, dk = r["b_minus_a"]["1"], r["b_minus_a"][str(r["k_max"])]
        print(f"| {method} | {100 * r['a']['pass@1']:.1f} | {100 * r['b']['pass@1']:.1f} | "
              f"{100 * d1['diff']:+.1f} [{100 * d1['ci95'][0]:+.1f}, {100 * d1['ci95'][1]:+.1f}] | "
              f"{100 * r['a']['pass@kmax']:.0f} / {100 * r['b']['pass@kmax']:.0f} (k={r['k_max']}) | "
              f"{100 * dk['diff']:+.1f} [{100 * dk['ci95'][0]:+.1f}, {100 * dk['ci95'][1]:+.1f}] |")
    for stage, (wa, wb) in result["wall_s"].items():
        print(f"  {stage}: {wa} s / {wb} s", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
