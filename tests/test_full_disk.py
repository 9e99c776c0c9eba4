"""A full disk (ENOSPC) during a write: one line that names the path and says to free space and rerun;
what was written before stays whole (results, the previous checkpoint); the rerun after space is
freed resumes to the result of a run that never met a full disk.

The disk fills where the write happens: `FullDisk` stands in for os.write, through which leafe writes
its own files (`leafe.files`), and makes the writes under one directory fail once a given file has
been written a given number of times: first a short write (what still fitted), then ENOSPC, as a
disk does when it fills. Native writers (safetensors, torch.save) do not call os.write: the CLI test
raises their errors as they are worded, the checkpoint test makes accelerate's save_state fail the
way they do, and one test runs them on a real full filesystem where a private tmpfs can be mounted
(`unshare`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import leafe.cli.methods  # noqa: F401  (the commands register themselves)
import leafe.cli.tools  # noqa: F401
from leafe.cli import app
from leafe.errors import DiskFull
from leafe.files import append_jsonl, read_jsonl, write_json
from leafe.lock import lock_path

FREE_AND_RERUN = "no space left on device; free space and rerun: the run resumes"


class FullDisk:
    """os.write on a disk that fills: writes to files under `root` go through until `fills_at` (a
    file name, or the temporary file of an atomic write of it) has been written `after` times; its
    next write is short, and every write under `root` after it fails with ENOSPC until `free()`."""

    def __init__(self, monkeypatch, root: Path, fills_at: str, after: int):
        self.root, self.fills_at, self.left = str(root.resolve()) + os.sep, fills_at, after
        self.full, self.freed = False, False
        self.real = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if self.freed or not target.startswith(self.root):
            return self.real(fd, data)
        name = os.path.basename(target)
        if not self.full and (name == self.fills_at or name.startswith(f".{self.fills_at}.")):
            if not self.left:
                self.full = True
                return self.real(fd, bytes(data[: len(data) // 2]))  # what still fitted
            self.left -= 1
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as os.write raises it: no filename
        return self.real(fd, data)

    def free(self) -> None:
        self.freed = True


def _fsync_fails(monkeypatch, root: Path) -> None:
    """A network filesystem that reports the full disk only when the data is flushed."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root.resolve())):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("fails_at", ["write", "fsync"])
def test_a_failed_append_leaves_the_file_as_it_was_and_the_next_append_is_whole(tmp_path, monkeypatch, fails_at):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 1})
    before = path.read_bytes()
    if fails_at == "write":
        disk = FullDisk(monkeypatch, tmp_path, "log.jsonl", after=0)
    else:
        _fsync_fails(monkeypatch, tmp_path)
    with pytest.raises(DiskFull) as failed:
        append_jsonl(path, {"step": 2, "text": "x" * 100})
    assert str(failed.value) == f"{path}: {FREE_AND_RERUN}"
    assert path.read_bytes() == before  # no torn half line for the next append to glue onto
    if fails_at == "write":
        disk.free()
    else:
        monkeypatch.undo()
    append_jsonl(path, {"step": 3})
    assert list(read_jsonl(path)) == [{"step": 1}, {"step": 3}]


@pytest.mark.parametrize("fails_at", ["write", "fsync"])
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, fails_at):
    path = tmp_path / "results.json"
    write_json(path, {"old": True})
    if fails_at == "write":
        FullDisk(monkeypatch, tmp_path, "results.json", after=0)
    else:
        _fsync_fails(monkeypatch, tmp_path)
    with pytest.raises(DiskFull, match=f"^{path}: {FREE_AND_RERUN}$"):
        write_json(path, {"new": "x" * 10_000})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _one_error_line(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.stdout[-2000:], result.stderr)
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    return line


@pytest.mark.parametrize("raised, said", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), FREE_AND_RERUN),  # os.write's: no filename
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "disk quota exceeded; free space and rerun: the run resumes"),
    ("safetensors", FREE_AND_RERUN),
], ids=["os.write", "quota", "safetensors"])
def test_a_full_disk_met_by_a_write_that_names_no_path_is_one_line_at_the_cli(tmp_path, monkeypatch, raised, said):
    if raised == "safetensors":  # its error as it reads on a full disk (measured on a full tmpfs)
        from safetensors import SafetensorError

        raised = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def write_report(run_dir):
        raise raised

    monkeypatch.setattr("leafe.study.report.write_report", write_report)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert _one_error_line(result) == f"error: {said}"
    assert not lock_path(tmp_path / "run").exists()


EVAL = ["--tasks", "3", "--samples", "2", "--max-new-tokens", "6", "--task-seed", "900", "--env-param", "max_steps=4"]


def test_eval_meets_a_full_disk_then_resumes_to_the_result_of_an_unbroken_run(tiny_model_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    clean, out = tmp_path / "clean", tmp_path / "full"
    assert runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(clean), *EVAL]).exit_code == 0

    disk = FullDisk(monkeypatch, out, "eval_tasks.jsonl", after=2)  # the header and one task, then full
    failed = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(out), *EVAL])
    assert _one_error_line(failed) == f"error: {out / 'eval_tasks.jsonl'}: {FREE_AND_RERUN}"
    progress = (out / "eval_tasks.jsonl").read_text()
    assert progress.endswith("\n") and len([json.loads(line) for line in progress.splitlines()]) == 2
    assert not (out / "eval.json").exists() and not lock_path(out).exists()

    disk.free()
    again = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(out), *EVAL])
    assert again.exit_code == 0, again.stderr
    records = list(read_jsonl(out / "eval_tasks.jsonl"))[1:]
    assert sorted(r["task_id"] for r in records) == [f"sokoban-{i}" for i in range(900, 903)]  # none twice
    assert len({r["session"] for r in records}) == 2  # one task from the first run, two from the rerun
    resumed, unbroken = (json.loads((d / "eval.json").read_text()) for d in (out, clean))
    assert resumed["tasks"] == unbroken["tasks"] and resumed["pass_at_k"] == unbroken["pass_at_k"]


GRPO = ["--tasks", "2", "--task-seed", "3", "--steps", "3", "--tasks-per-step", "1", "--group-size", "2",
        "--max-new-tokens", "4", "--env-param", "max_steps=2", "--invalid-penalty", "0.1", "--lr", "1e-2",
        "--save-every", "1", "--device", "cpu"]


def test_grpo_checkpoint_on_a_full_disk_keeps_the_previous_one_and_the_rerun_resumes(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    from accelerate import Accelerator
    from safetensors.torch import load_file

    runner = CliRunner()
    clean, out = tmp_path / "clean", tmp_path / "full"
    done = runner.invoke(app, ["train", "grpo", "--model", str(tiny_model_dir), "--out", str(clean), *GRPO])
    assert done.exit_code == 0, done.stderr

    real_save_state, saves = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        saves.append(output_dir)
        if len(saves) < 2:
            return real_save_state(self, output_dir, **kwargs)
        os.makedirs(output_dir, exist_ok=True)  # the second checkpoint's state fills the disk half-way
        Path(output_dir, "optimizer.bin").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    failed = runner.invoke(app, ["train", "grpo", "--model", str(tiny_model_dir), "--out", str(out), *GRPO])
    assert _one_error_line(failed) == f"error: {out / 'checkpoints' / 'step-2'}: {FREE_AND_RERUN}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # no half checkpoint, no temp
    assert (out / "checkpoints" / "step-1" / "state" / "optimizer.bin").exists()
    load_file(out / "checkpoints" / "step-1" / "model.safetensors")  # whole
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2]
    assert not lock_path(out).exists()

    monkeypatch.setattr(Accelerator, "save_state", real_save_state)  # space freed
    again = runner.invoke(app, ["train", "grpo", "--model", str(tiny_model_dir), "--out", str(out), *GRPO])
    assert again.exit_code == 0, again.stderr
    resumed, unbroken = (list(read_jsonl(d / "log.jsonl")) for d in (out, clean))
    assert [r["step"] for r in resumed] == [1, 2, 3]  # step 2 redone from step 1's checkpoint, not doubled
    timing = ("wall_s", "rollout_s", "sync_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in unbroken]
    weights, expected = load_file(out / "model.safetensors"), load_file(clean / "model.safetensors")
    assert weights.keys() == expected.keys() and all((weights[k] == expected[k]).all() for k in expected)


REAL_FULL_DISK = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from leafe.errors import DiskFull
    from leafe.files import append_jsonl, write_json, writing

    disk = Path(sys.argv[1])
    write_json(disk / "results.json", {"old": True})
    append_jsonl(disk / "log.jsonl", {"step": 1})
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk up to its last byte
    try:
        while True:
            os.write(fd, b"\\0" * 4096)
    except OSError:
        os.close(fd)
    seen = {}

    def checkpoint(save):  # a native writer's file in a checkpoint's temporary directory
        def write():
            with writing(disk / "ckpt", scratch=disk / ".ckpt.tmp"):
                (disk / ".ckpt.tmp").mkdir(exist_ok=True)
                save(disk / ".ckpt.tmp")
        return write

    for name, write in [("write_json", lambda: write_json(disk / "results.json", {"new": "x" * 100_000})),
                        ("append_jsonl", lambda: append_jsonl(disk / "log.jsonl", {"step": 2, "x": "y" * 100_000})),
                        ("torch.save", checkpoint(lambda d: torch.save({"w": torch.zeros(100_000)}, d / "w.pt"))),
                        ("safetensors", checkpoint(lambda d: save_file({"w": torch.zeros(100_000)}, d / "w.st")))]:
        try:
            write()
            seen[name] = "no error"
        except DiskFull as exc:
            seen[name] = str(exc)
    seen["left"] = sorted(p.name for p in disk.iterdir())
    seen["results"] = json.loads((disk / "results.json").read_text())
    seen["log"] = (disk / "log.jsonl").read_text()
    print(json.dumps(seen))
""")


def test_a_real_full_filesystem_gives_one_disk_full_error_per_writer(tmp_path):
    # A tmpfs of 1 MiB in a private mount namespace (user namespaces; no root needed where they are on).
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "none", str(disk)]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("no private tmpfs here (unshare -rm: unprivileged user and mount namespaces)")
    script = f'mount -t tmpfs -o size=1m none "$1" && exec "{sys.executable}" -c "$2" "$1"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(disk), REAL_FULL_DISK],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout)
    assert {k: seen[k] for k in ("write_json", "append_jsonl", "torch.save", "safetensors")} == {
        "write_json": f"{disk / 'results.json'}: {FREE_AND_RERUN}", "append_jsonl": f"{disk / 'log.jsonl'}: {FREE_AND_RERUN}",
        "torch.save": f"{disk / 'ckpt'}: {FREE_AND_RERUN}", "safetensors": f"{disk / 'ckpt'}: {FREE_AND_RERUN}"}
    assert seen["left"] == ["filler", "log.jsonl", "results.json"]  # no temporary file, no half checkpoint
    assert seen["results"] == {"old": True} and seen["log"] == '{"step":1}\n'
