"""Every MBPP reference solution judged in the sandbox through the code env's loader, as the env judges a
submission: on the problem's `test_list` asserts (each after its `test_setup_code`), with the env's
default limits (2 s CPU, 512 MB). `challenge_test_list` is judged apart, for information: the env
leaves it out. APPS: the loader reads the 150-problem selection; it ships no solutions, so nothing of
it can be judged: the script says how many problems and tests of each kind it read.

    python benchmarks/mbpp_references.py [--mbpp ../shared/data/mbpp] [--apps ../shared/data/apps] \
        [--workers 2] [--time-limit 2] [--out benchmarks/results/mbpp_references.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from leafe.envs.code import default_sandbox, judge, load_problems

REPO = Path(__file__).resolve().parent.parent


def judge_references(problems: list[dict], workers: int, time_limit_s: float) -> list[dict]:
    sandbox = default_sandbox()

    def one(problem: dict) -> dict:
        source = problem["solutions"][0]
        verdict = judge(source, problem["public_tests"] + problem["private_tests"], time_limit_s, sandbox=sandbox,
                        stop_at_first_failure=False)
        row = {"id": problem["id"], "status": verdict.status, "tests": [t["status"] for t in verdict.tests]}
        if not verdict.passed:
            row["feedback"] = verdict.feedback
        if problem["challenge_tests"]:
            challenge = judge(source, problem["challenge_tests"], time_limit_s, sandbox=sandbox,
                              stop_at_first_failure=False)
            row["challenge"] = [t["status"] for t in challenge.tests]
        return row

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, problems))


def apps_summary(apps_dir: Path) -> dict:
    problems = load_problems("apps", apps_dir)
    kinds = Counter(p["format"] for p in problems)
    tests = Counter(p["format"] for p in problems for _ in p["public_tests"] + p["private_tests"])
    return {"problems": len(problems), "by_format": dict(kinds), "tests_by_format": dict(tests),
            "with_solutions": sum(bool(p["solutions"]) for p in problems)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbpp", type=Path, default=REPO.parent / "shared" / "data" / "mbpp")
    parser.add_argument("--apps", type=Path, default=REPO.parent / "shared" / "data" / "apps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=2.0, help="CPU seconds per test run (the env's default)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mbpp_references.json")
    args = parser.parse_args()

    problems = load_problems("mbpp", args.mbpp)
    started = time.perf_counter()
    rows = judge_references(problems, args.workers, args.time_limit)
    wall = time.perf_counter() - started
    rejected = [r for r in rows if r["status"] != "accepted"]
    challenged = [r for r in rows if "challenge" in r]
    report = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "command": "python benchmarks/mbpp_references.py",
        "time_limit_s": args.time_limit,
        "mbpp": {
            "problems": len(rows),
            "accepted": len(rows) - len(rejected),
            "statuses": dict(Counter(r["status"] for r in rows)),
            "wall_s": round(wall, 1),
            "not_accepted": rejected,
            "challenge_tests": {
                "problems": len(challenged),
                "all_accepted": sum(all(s == "accepted" for s in r["challenge"]) for r in challenged),
                "rows": [{"id": r["id"], "challenge": r["challenge"]} for r in challenged],
            },
        },
        "apps": apps_summary(args.apps) if args.apps.exists() else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"MBPP references accepted: {report['mbpp']['accepted']}/{len(rows)} ({wall:.0f} s)")
    for r in rejected:
        print(f"  {r['id']}: {r['status']} {r['tests']}")
    print(json.dumps(report["apps"]))


if __name__ == "__main__":
    main()
