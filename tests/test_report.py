"""report.html: self-contained, the numbers of results.json, and drawn for real in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ScriptedBackend, dancing_explorer, leafe

from leafe.errors import LeafeError
from leafe.method import Job
from leafe.methods.explore import explore
from leafe.passk import summarize
from leafe.settings import ExploreSettings
from leafe.study.report import write_report

METHODS = {"base": [(8, 1), (8, 0), (8, 3)], "grpo": [(8, 2), (8, 0), (8, 4)], "leafe": [(8, 2), (8, 1), (8, 5)],
           "early_experience": [(8, 1), (8, 1), (8, 2)], "ace": [(8, 0), (8, 0), (8, 3)]}


def make_run(run: Path, tokenizer) -> dict:
    """A run directory as `leafe run` leaves it: results.json plus real exploration trees."""
    methods = {}
    for name, counts in METHODS.items():
        s = summarize(counts)
        methods[name] = {"pass_at_k": s["pass_at_k"], "ci95": s["ci95"],
                         "tasks": [{"task_id": f"t{i}", "n": n, "c": c} for i, (n, c) in enumerate(counts)]}
    cost = {"base.eval": {"env_steps": 310, "generated_tokens": 4100, "wall_s": 12.0},
            "grpo.train": {"env_steps": 1200, "generated_tokens": 15000, "wall_s": 95.0}}
    results = {"name": "unit", "env": "sokoban", "model": "/m/base-agent", "tasks": 3, "task_seed": 900, "samples": 8,
               "temperature": 1.0, "leafe_start": "grpo", "methods": methods, "cost": cost}
    (run / "leafe" / "explore").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    # The scripted policy fails, reflects, rolls back and solves from the branch: a tree with branches.
    explore(Job("scripted", run / "leafe" / "explore", backend=ScriptedBackend(tokenizer, dancing_explorer("Step: 2\nExperience: stop dancing."))), ExploreSettings(tasks=2, task_seed=40, budget=40))
    return results


def test_report_is_self_contained_and_holds_the_results(tiny_tokenizer, tmp_path):
    results = make_run(tmp_path, tiny_tokenizer)
    page = write_report(tmp_path).read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)  # no CDN, nothing fetched
    assert "<link" not in page and "<script src" not in page
    for name in METHODS:
        assert f"data-method='{name}'" in page
    assert page.count("<polyline class=curve") == len(METHODS)
    base1 = results["methods"]["base"]["pass_at_k"]["1"]
    assert f"{100 * base1:.1f}" in page
    assert "1,510" in page and "1:47" in page  # cost totals: env steps, wall time
    # Paired on the same tasks: LEAFE solves more on every task (interval above 0, marked), GRPO on
    # two of three (+8.3 points), ACE one fewer on one (its interval reaches 0: not marked).
    assert "Against the base, task by task" in page
    assert "<td class=up>+16.7" in page and "<td>+8.3" in page and "<td>-4.2" in page
    assert page.count("class=panel") == 2 and "class=tree" in page
    assert "rollback" in page and "<b>tau</b> = 2" in page and "stop dancing." in page
    assert "cell box" in page and "cell player" in page  # Sokoban grids, not text


def test_report_says_the_model_each_method_started_from(tiny_tokenizer, tmp_path):
    results = make_run(tmp_path, tiny_tokenizer)
    starts = {"grpo": "base", "leafe": "grpo", "early_experience": "grpo", "ace": "base"}
    for name, start in starts.items():
        results["methods"][name] |= {"start": start, "start_model": f"/runs/unit/{start}"}
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = write_report(tmp_path).read_text()
    assert "<th>starts from</th>" in page
    rows = re.findall(r"</i>([^<]+)</th><td class=start title='([^']*)'>([^<]*)</td>", page)
    assert rows == [("Base", "", "-"), ("GRPO", "/runs/unit/base", "Base"), ("LEAFE", "/runs/unit/grpo", "GRPO"),
                    ("Early Experience", "/runs/unit/grpo", "GRPO"), ("ACE", "/runs/unit/base", "Base")]
    # Methods that record no start (none but the base): no column.
    for m in results["methods"].values():
        for key in ("start", "start_model"):
            m.pop(key, None)
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "<th>starts from</th>" not in write_report(tmp_path).read_text()


def test_report_command_rewrites_and_refuses_a_directory_without_results(tiny_tokenizer, tmp_path):
    (tmp_path / "run").mkdir()
    make_run(tmp_path / "run", tiny_tokenizer)
    done = leafe("report", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "report.html").exists()
    with pytest.raises(LeafeError, match="has no results.json"):
        write_report(tmp_path / "empty")
    assert leafe("report", tmp_path / "empty").returncode == 2


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium on this machine: `make test` installs Debian's chromium (apt-get install chromium)")


def headless(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--user-data-dir=" + args[0], *args[1:]],
                          capture_output=True, text=True, timeout=120)


def test_report_draws_curves_and_trees_in_headless_chromium(tiny_tokenizer, tmp_path):
    from PIL import Image

    make_run(tmp_path, tiny_tokenizer)
    url = write_report(tmp_path).as_uri()
    profile = str(tmp_path / "profile")
    dom = headless(profile, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # After the page's script ran: the first tree's tab is selected and the other tree hidden.
    assert re.search(r'class="tab on" data-panel="tree-0"', html)
    assert re.search(r'<section class="panel" id="tree-1" hidden', html)
    assert html.count('class="curve"') == len(METHODS) and html.count("<circle") >= len(METHODS) * 4
    assert len(re.findall(r'<div class="node ', html)) >= 3  # the attempt and its branches

    shot = tmp_path / "report.png"
    done = headless(profile, f"--screenshot={shot}", "--window-size=1100,1800", url)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    pixels = {color for _, color in image.getcolors(maxcolors=1 << 24)}
    assert len(pixels) > 50  # not a blank page
    for color in ("#059669", "#d97706"):  # LEAFE's and GRPO's curve colours were painted
        rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
        assert any(sum(abs(a - b) for a, b in zip(p, rgb)) < 30 for p in pixels), color
