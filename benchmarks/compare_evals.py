"""Pass@k of every method a study has evaluated so far, with paired intervals against the base and
GRPO, for one run directory or several (e.g. the same study under two protocols), before the study
has written its results.json: each method's `<method>/eval/eval.json` is read as it is.

    python benchmarks/compare_evals.py RUN [RUN ...] [--ks 1 16] [--out FILE]

Rows of two runs are comparable where their stages are the same (the same fingerprint); each run's
paired columns are its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leafe.passk import compare_tasks

METHODS = ("base", "grpo", "leafe", "early_experience", "ace")


def evaluations(run: Path) -> dict[str, dict]:
    return {m: json.loads((run / m / "eval" / "eval.json").read_text())
            for m in METHODS if (run / m / "eval" / "eval.json").exists()}


def table(run: Path, ks: list[int]) -> dict[str, dict]:
    evals = evaluations(run)
    rows = {}
    for method, data in evals.items():
        row = {"pass_at_k": {k: data["pass_at_k"][str(k)] for k in ks},
               "ci95": {k: data["ci95"][str(k)] for k in ks}, "model": data["model"]}
        for against in ("base", "grpo"):
            if against in evals and against != method:
                row[f"vs_{against}"] = compare_tasks(evals[against]["tasks"], data["tasks"], ks)
        rows[method] = row
    return rows


def pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    found = {str(run): table(run, args.ks) for run in args.runs}
    for run, rows in found.items():
        print(f"\n{run}")
        for method, row in rows.items():
            cells = [f"Pass@{k} {100 * row['pass_at_k'][k]:.1f} [{100 * row['ci95'][k][0]:.1f}, "
                     f"{100 * row['ci95'][k][1]:.1f}]" for k in args.ks]
            for against in ("base", "grpo"):
                if f"vs_{against}" in row:
                    paired = row[f"vs_{against}"]
                    cells += [f"@{k} vs {against} {pct(paired[str(k)]['diff'])} [{pct(paired[str(k)]['ci95'][0])}, "
                              f"{pct(paired[str(k)]['ci95'][1])}]" for k in args.ks]
            print(f"  {method:17s} " + "; ".join(cells))
    if args.out:
        args.out.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
