"""Experiment trackers: a run's figures in TensorBoard, Trackio, Weights & Biases or MLflow.

The record of a run stays its files (GRPO's log.jsonl, distill.json's loss log, exploration's
summary.json, results.json); a tracker shows the same numbers, live, in the tool a team already
watches. `report_to` (a study config's top-level key, `--report-to` on a training command) names the
trackers; when it is empty every call here is a no-op, so the methods log without asking.

- `Tracking` says where one run's trackers write and what the run is called: RUN/tracking and the
  study's name (a single command's: OUT/tracking and OUT's name). It is plain data, so it crosses
  into the processes a study starts (stages side by side, launched ranks: `Tracker.spec`).
- `Tracker` is what a stage logs to: `log(metrics, step)` puts each number under the stage's name
  (`grpo/reward`, `leafe_distill/loss`, `leafe_explore/branches`); `for_stage` names another part of
  the same run. Only the main process reports (rank 0 under a multi-process launch). The trackers
  start at the first figure, so a stage that measures nothing starts none, and `close` ends them.

One tracker run per study. Its stages run one after another in the study's process, side by side in
processes of their own (`parallel_stages`) or over launched ranks; every process opens the study's
run again and appends its own stage's figures, with the trackers' own libraries (through accelerate's
`accelerate.tracking` classes):
- tensorboard: RUN/tracking/tensorboard, one event file per process that wrote, read as one run;
- trackio: project `leafe`, run `<name>-<id>` resumed by name (`resume="allow"`), in
  RUN/tracking/trackio unless TRACKIO_DIR is set; local only (no Space unless TRACKIO_SPACE_ID asks);
- wandb: project WANDB_PROJECT (default `leafe`), one run id every process resumes, each session's
  files in a directory of its own under RUN/tracking/wandb (wandb names a session's directory by the
  second it starts, and a second session started in the same second wrote over the first's); offline
  unless there is an API key (WANDB_API_KEY, a login in ~/.netrc) or WANDB_MODE says otherwise, and
  then `wandb sync RUN/tracking/wandb/*/wandb/offline-run-*` uploads the sessions of the run in the
  order they started. wandb's own step only goes forward and every stage counts from 1, so each stage
  has its own x axis, `<stage>/step`;
- mlflow: experiment MLFLOW_EXPERIMENT_NAME (default `leafe`), one run whose id the first process
  records, in a file store at RUN/tracking/mlflow unless MLFLOW_TRACKING_URI is set.
RUN/tracking/run.json holds the run's identity (name, id, MLflow's run id), made once under a lock,
so a rerun of the study and each of its processes report to the same run. A stage that resumes
after a kill logs the steps it redoes again (the files keep one copy: they are the record).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import netrc
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from leafe.errors import LeafeError
from leafe.files import is_main_process, process_rank, read_json, write_json

#: The trackers `report_to` may name: the module each needs and the install that brings it.
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard (or leafe[track])"),
    "trackio": ("trackio", "pip install trackio (or leafe[track])"),
    "wandb": ("wandb", "pip install wandb (or leafe[wandb])"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or leafe[mlflow])"),
}
#: The project (wandb, trackio) or experiment (mlflow) a run goes in when the environment names none.
PROJECT = "leafe"
IDENTITY = "run.json"


def check_report_to(names: Iterable[str]) -> list[str]:
    """The trackers `names` asks for (items may be comma-separated; repeats dropped; `none` is none),
    each known and installed, or one LeafeError line naming the install. Reads no tracker's code."""
    wanted: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if name and name != "none" and name not in wanted:
                wanted.append(name)
    for name in wanted:
        if name not in TRACKERS:
            raise LeafeError(f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise LeafeError(f"report_to: {name} is not installed: {install}")
    return wanted


def stage_name(key: str) -> str:
    """A study stage's name in the trackers: `grpo.train` -> grpo, `leafe.distill` -> leafe_distill."""
    return key.removesuffix(".train").replace(".", "_")


def scalars(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """The numbers of a record (a log.jsonl line, a summary): `step` is the x axis, not a figure, and
    text, lists and None are for the files."""
    return {k: int(v) if isinstance(v, Integral) else float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, Real)}


@dataclass(frozen=True)
class Tracking:
    """Where one run's trackers write (`directory`, RUN/tracking) and what the run is called."""

    report_to: tuple[str, ...] = ()
    directory: str = ""
    name: str = PROJECT

    @classmethod
    def of(cls, report_to: Iterable[str], directory: str | Path, name: str) -> Tracking:
        return cls(tuple(check_report_to(report_to)), str(directory), name)

    def open(self, stage: str = "") -> Tracker:
        """A tracker logging under `stage`; it reports nothing when `report_to` is empty or off the
        main process. Close it (or use it as a context manager) when the stage ends."""
        if not self.report_to or not is_main_process():
            return Tracker()
        return Tracker(_Session(self, f"{stage or 'run'}-{uuid.uuid4().hex[:8]}"), stage)


class Tracker:
    """What a stage logs to (see the module docstring). `Tracker()` reports nothing."""

    def __init__(self, session: _Session | None = None, stage: str = ""):
        self._session, self.stage = session, stage

    @property
    def active(self) -> bool:
        """Whether it reports anywhere (a figure that takes work to make can be skipped when not)."""
        return self._session is not None

    def log(self, metrics: Mapping[str, Any], step: int, stage: str | None = None) -> None:
        """Each number of `metrics` at `step`, named `<stage>/<key>` (this tracker's stage unless one
        is given)."""
        if self._session is not None and (values := scalars(metrics)):
            self._session.log(values, int(step), self.stage if stage is None else stage)

    def for_stage(self, stage: str) -> Tracker:
        """The same run under another name (Early Experience's world model: its steps count from 1 too)."""
        return Tracker(self._session, stage)

    def spec(self) -> dict[str, Any] | None:
        """What a launched process needs to report to the same run as this stage (`from_spec`)."""
        if self._session is None:
            return None
        return {**asdict(self._session.tracking), "stage": self.stage}

    @staticmethod
    def from_spec(spec: Mapping[str, Any] | None) -> Tracker:
        if not spec:
            return Tracker()
        tracking = Tracking(tuple(spec["report_to"]), spec["directory"], spec["name"])
        return tracking.open(spec.get("stage", ""))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Session:
    """The started trackers of one process, shared by the `Tracker`s of its stages."""

    def __init__(self, tracking: Tracking, name: str):
        self.tracking, self.name = tracking, name  # the name of this process's session of the run
        self.backends: list[_Backend] | None = None

    def log(self, values: dict[str, int | float], step: int, stage: str) -> None:
        if self.backends is None:
            self.backends = self._start()
        named = {f"{stage}/{k}" if stage else k: v for k, v in values.items()}
        for backend in self.backends:
            backend.log(named, step, stage)

    def close(self) -> None:
        backends, self.backends = self.backends or [], None
        with _quiet():
            for backend in backends:
                backend.close()

    def _start(self) -> list[_Backend]:
        from accelerate.state import PartialState

        # accelerate's trackers log through accelerate's logger, which wants its state made; a training
        # stage has made it, and elsewhere (exploration) a CPU one does: no CUDA context in a process
        # that may start an engine afterwards. A launched rank always has it (its trainer's).
        if not PartialState._shared_state and process_rank()[1] == 1:
            PartialState(cpu=True)
        directory = Path(self.tracking.directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory / ".run.lock"):  # the first process names the run; the others join it
            path = directory / IDENTITY
            identity = read_json(path) if path.exists() else {"name": self.tracking.name, "id": uuid.uuid4().hex[:8]}
            backends: list[_Backend] = []
            try:
                for name in self.tracking.report_to:
                    backends.append(_Backend.start(name, directory, identity, self.name))
            except BaseException:
                with _quiet():
                    for backend in backends:  # those that started before one failed
                        backend.close()
                raise
            write_json(path, identity)
        return backends


class _Backend:
    """One tracker of accelerate's, and what leafe needs of it beyond accelerate's `log`."""

    def __init__(self, name: str, tracker: Any):
        self.name, self.tracker = name, tracker
        self.axes: set[str] = set()  # wandb: the stages whose x axis is defined in this process

    @classmethod
    def start(cls, name: str, directory: Path, identity: dict[str, Any], session: str) -> _Backend:
        try:
            with _quiet():
                tracker = _STARTS[name](directory, identity, session)
                tracker.start()
        except LeafeError:
            raise
        except Exception as exc:  # noqa: BLE001 (a tracker's own error: one line naming it)
            raise LeafeError(f"report_to: {name} could not start ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:300]})") from exc
        if name == "mlflow":  # the other processes of the run (and its reruns) resume this run
            identity.setdefault("mlflow", {})[tracker.tracking_uri] = tracker.active_run.info.run_id
        identity.setdefault("stores", {})[name] = _where(name, directory, tracker)
        return cls(name, tracker)

    def log(self, named: dict[str, int | float], step: int, stage: str) -> None:
        if self.name != "wandb":
            self.tracker.log(named, step=step)
            return
        axis = f"{stage}/step" if stage else "step"
        if stage not in self.axes:
            self.tracker.run.define_metric(axis)
            self.tracker.run.define_metric(f"{stage}/*" if stage else "*", step_metric=axis)
            self.axes.add(stage)
        self.tracker.log({**named, axis: step})

    def close(self) -> None:
        if self.name == "trackio":
            import trackio

            # trackio.finish also forgets the run; accelerate's finish leaves it to be finished again at exit
            trackio.finish()
            return
        self.tracker.finish()
        if self.name == "wandb":
            import wandb

            # A run's finish returns before wandb's service has written the session's file; its teardown
            # waits for that, which a launched rank's exit (os._exit, no atexit) would not.
            wandb.teardown()


def _tensorboard(directory: Path, identity: dict[str, Any], session: str) -> Any:
    from accelerate.tracking import TensorBoardTracker

    return TensorBoardTracker("tensorboard", str(directory))  # -> directory/tensorboard


def _trackio(directory: Path, identity: dict[str, Any], session: str) -> Any:
    # trackio reads TRACKIO_DIR once, when it is first imported (`_where` says where it went)
    os.environ.setdefault("TRACKIO_DIR", str(directory / "trackio"))
    from accelerate.tracking import TrackioTracker

    return TrackioTracker(PROJECT, name=f"{identity['name']}-{identity['id']}", resume="allow",
                          auto_log_cpu=False, auto_log_gpu=False)


def _wandb(directory: Path, identity: dict[str, Any], session: str) -> Any:
    import wandb
    from accelerate.tracking import WandBTracker

    mode = {} if _wandb_can_log_in() else {"mode": "offline"}
    where = directory / "wandb" / session  # -> where/wandb/offline-run-<second>-<id>
    where.mkdir(parents=True, exist_ok=True)
    # console off: wandb would wrap this process's stdout and stderr, which are the CLI's display or a stage's log
    quiet = wandb.Settings(silent=True, console="off")
    return WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), dir=str(where), name=identity["name"],
                        id=identity["id"], resume="allow", settings=quiet, **mode)


def _mlflow(directory: Path, identity: dict[str, Any], session: str) -> Any:
    import mlflow
    from accelerate.tracking import MLflowTracker

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (directory / "mlflow").resolve().as_uri()
        # MLflow 3 keeps its file store but refuses it unless asked: a run's own directory is the point here
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    tracker = MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT),
                            run_id=identity.get("mlflow", {}).get(uri), run_name=identity["name"])
    tracker.tracking_uri = uri
    return tracker


_STARTS = {"tensorboard": _tensorboard, "trackio": _trackio, "wandb": _wandb, "mlflow": _mlflow}


def _wandb_can_log_in() -> bool:
    """Whether wandb has an API key to go online with: WANDB_MODE set by the user (wandb obeys it),
    WANDB_API_KEY, or a login for its host in the netrc file `wandb login` writes."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _where(name: str, directory: Path, tracker: Any) -> str:
    """Where a tracker's run is (for run.json and the docs' `trackio show`, `tensorboard --logdir`)."""
    if name == "tensorboard":
        return str(tracker.logging_dir)
    if name == "trackio":
        import trackio.utils

        wanted = os.environ["TRACKIO_DIR"]
        if Path(trackio.utils.TRACKIO_DIR) != Path(wanted):  # imported earlier in this process
            warnings.warn(f"trackio was imported before TRACKIO_DIR={wanted} was set in this process: it "
                          f"writes to {trackio.utils.TRACKIO_DIR}", stacklevel=4)
        return str(trackio.utils.TRACKIO_DIR)
    if name == "wandb":
        return str(directory / "wandb")
    return tracker.tracking_uri


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """trackio prints banners when a run starts and ends: not into the CLI's display or a stage's log."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

