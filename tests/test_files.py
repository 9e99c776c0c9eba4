"""Crash-safe files."""

import json

from leafe.files import append_jsonl, read_jsonl, write_json, write_jsonl


def test_torn_last_line_is_dropped_and_appends_continue_cleanly(tmp_path):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"a": 2})
    with open(path, "a") as f:
        f.write('{"a": 3, "b"')  # the writer died mid-line
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, {"a": 4})
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}, {"a": 4}]


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"v": 1})
    write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp files left behind


def test_write_jsonl_replaces_and_appends_continue(tmp_path):
    path = tmp_path / "log.jsonl"
    for i in range(3):
        append_jsonl(path, {"step": i})
    write_jsonl(path, [{"step": 0}])
    append_jsonl(path, {"step": 5})
    assert list(read_jsonl(path)) == [{"step": 0}, {"step": 5}]
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]



def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    from leafe import files

    write_json(tmp_path / "a.json", {"x": 1})
    # mkstemp's 0600 would hide reports and results from other users; open() gives 0666 - umask.
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~files._UMASK
