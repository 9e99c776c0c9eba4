"""The same study sampled by two engines: each method's Pass@k in both runs, paired per task.

    python benchmarks/compare_engines.py runs/demo-hf runs/demo-vllm --out benchmarks/results/demo_vllm_vs_hf.json

Run B is typically run A's directory copied and rerun with `--set generation.backend=vllm`: the
training stages keep their fingerprints and are reused, and every sampling stage (and what trains on
its samples) is redone by the other engine. Engines draw different random numbers, so the two runs
agree within sampling noise, not digit for digit; the paired interval (same tasks) says how much.
Two intervals per method, for two questions:
- `b_minus_a` (leafe.passk.compare_tasks): levels resampled in pairs. It asks whether one method beats
  another across levels, and treats each level's Pass@k as known: it leaves out that a level's 32
  episodes are themselves a sample, the very noise two engines differ by.
- `sampling`: Pass@1 of the same levels, the episodes of each level compared as two binomial samples
  (tasks as strata): diff +- 1.96 sqrt(sum_t (p_t,a (1 - p_t,a) / n_a + p_t,b (1 - p_t,b) / n_b)) / T.
  For a stage whose model is the same in both runs (the base, GRPO's checkpoint), this is the test of
  "the engines sample the same distribution".
Also prints each stage's wall time in both runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from leafe.passk import compare_tasks


def sampling_interval(a: list[dict], b: list[dict]) -> dict:
    """Pass@1 of run b minus run a on the same tasks, with the episodes' binomial noise (see the doc)."""
    by_id = {t["task_id"]: t for t in a}
    diff = var = 0.0
    for tb in b:
        ta = by_id[tb["task_id"]]
        pa, pb = ta["c"] / ta["n"], tb["c"] / tb["n"]
        diff += pb - pa
        var += pa * (1 - pa) / ta["n"] + pb * (1 - pb) / tb["n"]
    diff, se = diff / len(b), var ** 0.5 / len(b)
    return {"diff": diff, "ci95": [diff - 1.96 * se, diff + 1.96 * se], "z": diff / se if se else 0.0}


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
                        "b_minus_a": paired, "sampling": sampling_interval(ma["tasks"], mb["tasks"])}
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
    print(f"| method | Pass@1 {args.a.name} | Pass@1 {args.b.name} | levels paired [95% CI] | episodes' noise [95% CI] | "
          f"Pass@k_max both | levels paired [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for method, r in result["methods"].items():
        d1, dk = r["b_minus_a"]["1"], r["b_minus_a"][str(r["k_max"])]
        print(f"| {method} | {100 * r['a']['pass@1']:.1f} | {100 * r['b']['pass@1']:.1f} | "
              f"{100 * d1['diff']:+.1f} [{100 * d1['ci95'][0]:+.1f}, {100 * d1['ci95'][1]:+.1f}] | "
              f"{100 * r['sampling']['diff']:+.1f} [{100 * r['sampling']['ci95'][0]:+.1f}, "
              f"{100 * r['sampling']['ci95'][1]:+.1f}] | "
              f"{100 * r['a']['pass@kmax']:.0f} / {100 * r['b']['pass@kmax']:.0f} (k={r['k_max']}) | "
              f"{100 * dk['diff']:+.1f} [{100 * dk['ci95'][0]:+.1f}, {100 * dk['ci95'][1]:+.1f}] |")
    for stage, (wa, wb) in result["wall_s"].items():
        print(f"  {stage}: {wa} s / {wb} s", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
