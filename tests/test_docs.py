"""The docs and the comments stay true to the tree.

- The annotated module tree that docs/architecture.md and the README share names every module under
  leafe/ and nothing that is not there, and the two copies are the same.
- Every link between the project's markdown files reaches a file, and a heading where it names one.
- Comments and docstrings in leafe/ (and the shipped configs' comments) say why, not when: no commit
  hashes, no CI anecdotes, no measured figures. Measurements live in BENCHMARKS.md and
  docs/experiment-log.md, with the command and the machine that gave them.
"""

from __future__ import annotations

import ast
import io
import re
import shutil
import subprocess
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEAFE = ROOT / "leafe"
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

# -- the module tree ---------------------------------------------------------------------------------

TREE_START, TREE_END = "<!-- module tree -->", "<!-- /module tree -->"


def tree_block(path: Path) -> str:
    """The fenced block between the module-tree markers of a markdown file."""
    text = path.read_text()
    assert TREE_START in text and TREE_END in text, f"{path.name} has no {TREE_START} ... {TREE_END} block"
    block = text.split(TREE_START, 1)[1].split(TREE_END, 1)[0]
    return block.strip().removeprefix("```").removesuffix("```").strip("\n")


def tree_paths(block: str) -> list[str]:
    """The paths a tree block lists, relative to the repository: `leafe/` on the first line, then one
    entry a line as `tree` draws it (4 columns a level), a folder ending in '/', words after it."""
    lines = block.splitlines()
    assert lines[0].split()[0] == "leafe/", lines[0]
    stack, paths = ["leafe"], []
    for line in lines[1:]:
        match = re.match(r"^((?:│   |    )*)[├└]── (\S+)", line)
        assert match, f"not a tree line: {line!r}"
        depth = len(match.group(1)) // 4 + 1
        name = match.group(2)
        del stack[depth:]
        path = "/".join([*stack, name.rstrip("/")])
        paths.append(path + ("/" if name.endswith("/") else ""))
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return paths


def python_modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in LEAFE.rglob("*.py") if "__pycache__" not in p.parts}


def test_the_module_tree_of_architecture_md_and_the_readme_is_one_tree():
    assert tree_block(ROOT / "README.md") == tree_block(ROOT / "docs" / "architecture.md"), \
        "README.md's module tree differs from docs/architecture.md's: copy the one into the other"


def test_the_module_tree_names_every_module_and_nothing_else():
    listed = tree_paths(tree_block(ROOT / "docs" / "architecture.md"))
    missing = sorted(python_modules() - set(listed))
    gone = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing, f"modules missing from the tree in docs/architecture.md (and the README): {missing}"
    assert not gone, f"the tree in docs/architecture.md (and the README) lists what does not exist: {gone}"
    folders = sorted({p.parent.relative_to(ROOT).as_posix() + "/" for p in LEAFE.rglob("*.py")
                      if "__pycache__" not in p.parts} - {"leafe/"})
    assert not set(folders) - set(listed), f"packages missing from the tree: {sorted(set(folders) - set(listed))}"


def test_the_tree_parser_reads_nesting_and_folders():
    block = "leafe/\n├── a.py          words\n├── pkg/          more\n│   ├── b.py\n│   └── sub/\n│       └── c.py\n└── d.py"
    assert tree_paths(block) == ["leafe/a.py", "leafe/pkg/", "leafe/pkg/b.py", "leafe/pkg/sub/", "leafe/pkg/sub/c.py",
                                 "leafe/d.py"]


# -- links between the docs ----------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a markdown file's headings: lower case, punctuation but '-' and
    '_' dropped, spaces to '-', a repeated heading numbered -1, -2, ...; headings in code blocks skipped."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_the_anchors_are_githubs():
    assert anchors(ROOT / "BENCHMARKS.md") >= {"the-demo-study", "engines-and-speed"}
    assert "stage-2-base-vs-l_reh-only-vs-l_cf--beta-l_reh" in anchors(ROOT / "BENCHMARKS.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_between_the_docs_arrives(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.name}: {broken}"


# -- comments say why, not when ------------------------------------------------------------------------


def prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file, or every comment of a YAML file:
    the prose, not the code or the data (a model digest in a string is data)."""
    text = path.read_text()
    if path.suffix == ".yaml":
        for number, line in enumerate(text.splitlines(), 1):
            if match := re.search(r"(?:^|\s)#(.*)", line):
                yield number, match.group(1)
        return
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                for offset, line in enumerate(first.value.value.splitlines()):
                    yield first.lineno + offset, line


def shipped_prose() -> Iterator[tuple[str, int, str]]:
    for path in sorted([*LEAFE.rglob("*.py"), *LEAFE.rglob("*.yaml")]):
        if "__pycache__" not in path.parts:
            for number, line in prose(path):
                yield path.relative_to(ROOT).as_posix(), number, line


HEX = re.compile(r"\b[0-9a-f]{7,40}\b")
#: A short hash beside the word: "commit b0ee1b1", "b0ee1b1's commit", "(c2215f0, the commit ...)".
COMMIT_NEAR_HASH = re.compile(r"\bcommit\w*\W{1,3}(?:\w+\W{1,3}){0,2}[0-9a-f]{7,40}\b|\b[0-9a-f]{7,40}\W{1,3}commit",
                              re.IGNORECASE)
#: A story of what the CI did, rather than why the code is as it is.
CI_ANECDOTE = re.compile(r"\bCI\b[^.;]{0,40}\b(?:hung|hangs?|failed|fails|flak\w*|crash\w*|broke|died|timed out|"
                         r"once|red)\b|\b(?:hung|failed|flaked|crashed|broke|died)\b[^.;]{0,30}\b(?:in|on) CI\b|py-spy")
#: What a run measured: points of Pass@k won or lost, wall clocks set against each other, speed-ups,
#: throughputs, a before -> after percentage, "(measured)".
MEASURED = re.compile(
    r"\b\d+(?:\.\d+)? points? (?:of|in)? ?Pass@"
    r"|\b\d{1,2}:\d{2} (?:against|vs\.?|versus) \d"
    r"|\b\d+(?:\.\d+)?x (?:faster|slower|the wall|less|more)\b"
    r"|\b\d+(?:\.\d+)? ?(?:tok/s|tokens/s|steps/s|episodes/s|[KMG]B/s)\b"
    r"|\b\d+(?:\.\d+)?% ?(?:->|→) ?\d"
    r"|\b\d+(?:\.\d+)? ?(?:s|ms|min|minutes) against \d"
    r"|\(measured[,;)]")


def lab_notes(lines) -> list[str]:
    return [f"{where}:{number}: {text.strip()}" for where, number, text in lines
            if COMMIT_NEAR_HASH.search(text) or CI_ANECDOTE.search(text) or MEASURED.search(text)]


def test_comments_cite_no_commit_ci_incident_or_measurement():
    found = lab_notes(shipped_prose())
    assert not found, ("comments that are lab notes (say why in words; the figure goes to BENCHMARKS.md or "
                       "docs/experiment-log.md):\n" + "\n".join(found))


def test_comments_name_no_commit_of_this_repository():
    hashes = {h for _, _, text in shipped_prose() for h in HEX.findall(text) if re.search(r"[a-f]", h)
              and re.search(r"\d", h)}
    if not hashes:
        return
    if shutil.which("git") is None:
        pytest.skip("no git")
    asked = sorted(hashes)
    check = subprocess.run(["git", "-C", str(ROOT), "cat-file", "--batch-check"], capture_output=True, text=True,
                           input="".join(f"{h}^{{commit}}\n" for h in asked))
    if check.returncode != 0:
        pytest.skip("not a git checkout")
    commits = [h for h, line in zip(asked, check.stdout.splitlines()) if " commit " in line]
    assert not commits, f"comments name commits of this repository: {commits}"


def test_the_lab_note_patterns_catch_what_they_are_for_and_leave_the_rest():
    notes = ["commit b0ee1b1 made GRPO slower: 7:42 against 7:09", "CI hung there once, after the model was written",
             "(py-spy: ~Reducer -> ~ProcessGroupGloo -> join)", "1 decoded 1.8x faster and lost 12.5 points of Pass@1",
             "two evaluations side by side took 0.82x the wall", "copy accuracy 71% -> 22%", "measured ~250 MB/s",
             "0.36 s against 0.17 s to reset a loaded one", "checkpoint into CPU memory first (measured), and"]
    fine = ["A stage's progress where stdout is a log, not a terminal (CI, `| tee`)", "digest f52a886ddef8",
            "three tries in all, over 1.5 s, outlast a machine short of processes", "a 7B layer is ~0.47 GB in bf16",
            "the wall clock allows 2x this plus a second of start-up", "with what it was measured on"]
    assert len(lab_notes(("x", 1, text) for text in notes)) == len(notes)
    assert lab_notes(("x", 1, text) for text in fine) == []
