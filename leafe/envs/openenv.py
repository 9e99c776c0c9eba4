"""OpenEnv: any env an OpenEnv server serves (`reset`/`step` over its WebSocket), as a leafe env.

OpenEnv (meta-pytorch/OpenEnv, `openenv-core` on PyPI) serves an env by `create_app(Env, Action,
Observation)`. Its HTTP /reset and /step build a fresh env for every request, so an episode of many
steps lives in a WebSocket session (/ws), where each connection has an env of its own on the server.
This adapter speaks that session's messages: it sends {"type": "reset", "data": {...}} and
{"type": "step", "data": <action fields>} and reads {"type": "observation", "data": {"observation":
{...}, "reward": r, "done": d}} or {"type": "error", "data": {"message", "code"}}. Servers of
openenv-core 0.3 and openenv 0.10 send the same messages though their Python clients differ, so the
adapter talks to both with the `websockets` client alone: no event loop or thread of its own per env.

Text in and out, configurable for any Action/Observation pair (`--env-param`):
- the agent's action text goes in the Action field `action_field` (default `message`, the field of
  OpenEnv's text envs: echo, TextArena), with `action_defaults` as the Action's other fields;
- the agent sees the observation field `observation_field`; by default the whole observation: its
  one field's text when it has one field, else a `name: value` line per field (its `metadata` left
  out). Strings show as they are, lists of messages ({"content": ...}) as their contents, one per
  line, anything else as JSON;
- the instruction is `instruction`, or the reset observation's field `instruction_field`;
- a step is a success when the observation's (or its metadata's) `success_field` is true, or, when
  that is not set, when it ends the episode with reward >= `success_reward`; `max_steps` ends an
  episode the server would let run on.
An action the server's Action schema refuses (a validation error) is an ordinary step whose
observation says why, as any env's invalid action is; the server's env is not stepped.

Tasks are seeds: task i resets with {"seed": i, "episode_id": its task id} plus `reset_params` (say
a difficulty), which the server passes to its env's `reset` where the signature takes them. Rollback
is by verified replay, so it needs a server whose reset the seed makes deterministic; one that is
not is found out at the first replay, and `leafe explore` refuses that branch and counts it.

The server itself failing (down, an HTTP 5xx or a closed session, no answer within `timeout_s`, its
env raising) is an `EnvFault`: the session is dropped, and the rollout starts the episode again on a
new one. A bad `url`, a server that is not up when the env is made (checked once per process), a
field the server's Action does not have, or a server whose sessions are all taken, is an `EnvError`.
"""

from __future__ import annotations

import importlib.util
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from leafe.envs.base import DataStatus, Env, EnvError, EnvFault, StepResult, Task
from leafe.envs.registry import register

INSTALL_HINT = "pip install 'leafe[openenv]'"
PACKAGE_MISSING = f"the openenv env needs the websockets package: {INSTALL_HINT}"
DEFAULT_INSTRUCTION = "Act in this environment to complete its task; each observation follows your action."
FAULT_HINT = "check that the OpenEnv server is up and answers (its log says why it failed), then rerun"
#: Tries to open a session before a reset gives up with an `EnvFault` (a server restarting gets ~1.5 s).
CONNECT_TRIES, CONNECT_BACKOFF_S = 3, 0.5
#: (url, action fields) whose server answered the probe, so that making an env per branch probes once.
_PROBED: set[tuple[str, tuple[str, ...]]] = set()


def as_text(value: Any) -> str:
    """A structured observation value as the text an agent reads: a string as it is, a list of messages
    as their contents one per line, anything else as JSON (keys sorted, so the same value always reads
    the same: replays compare the text's hash)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(as_text(m["content"]) for m in value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def fields_text(fields: dict[str, Any]) -> str:
    """A dict observation as text: its one field's text, else a `name: text` line per field."""
    if len(fields) == 1:
        return as_text(next(iter(fields.values())))
    return "\n".join(f"{name}: {as_text(value)}" for name, value in fields.items())


def base_url(url: str) -> str:
    """The server's http(s) address without a trailing slash (ws:// and wss:// name the same server);
    an `EnvError` for anything that is not an address."""
    parts = urlsplit(str(url).strip())
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise EnvError(f"env 'openenv': url={url!r} is not an OpenEnv server's address; give --env-param "
                       f"url=http://HOST:PORT (the address its uvicorn serves)")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def probe(url: str, action_fields: tuple[str, ...], timeout_s: float) -> DataStatus:
    """Whether an OpenEnv server answers at `url` and its Action has `action_fields` (GET /schema,
    which every OpenEnv server serves): the env's `data_status`, a server being an env's data."""
    base = base_url(url)
    start = "start it (e.g. `uvicorn server.app:app --port 8000`) or give --env-param url= of a running one"
    try:
        with urllib.request.urlopen(f"{base}/schema", timeout=timeout_s) as answer:
            schema = json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return DataStatus(False, base, f"the server at {base} answered GET /schema with HTTP {error.code}: is it an "
                                       f"OpenEnv server, and up? {start}")
    except (OSError, TimeoutError) as error:  # URLError is an OSError
        reason = getattr(error, "reason", error)
        return DataStatus(False, base, f"no OpenEnv server answers at {base} ({reason}): {start}")
    except ValueError:
        return DataStatus(False, base, f"the server at {base} answered GET /schema with something that is not JSON: "
                                       f"is it an OpenEnv server?")
    action = schema.get("action") if isinstance(schema, dict) else None
    known = list((action or {}).get("properties") or {})
    missing = [f for f in action_fields if f not in known]
    if known and missing:
        return DataStatus(False, base, f"the Action of the OpenEnv server at {base} has no field "
                                       f"{', '.join(map(repr, missing))} (it has {', '.join(known)}): set "
                                       f"--env-param action_field=NAME, the field the agent's text goes in")
    return DataStatus(True, f"the OpenEnv server at {base}")


def _json_object(value: Any, name: str, example: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EnvError(f"env 'openenv': {name} must be a JSON object such as {example} (got {value!r})")
    return dict(value)


@register
class OpenEnvEnv(Env):
    """An OpenEnv server's env, one WebSocket session per episode; rollback by verified replay."""

    name = "openenv"

    def __init__(self, url: str = "", action_field: str = "message", observation_field: str = "",
                 instruction: str = "", instruction_field: str = "", success_field: str = "",
                 success_reward: float = 1.0, max_steps: int = 30, reset_params: dict[str, Any] | None = None,
                 action_defaults: dict[str, Any] | None = None, timeout_s: float = 30.0):
        """`url`: the server's address, http://HOST:PORT (required). `action_field`: the Action field
        the agent's text goes in. `action_defaults`: the Action's other fields, a JSON object.
        `observation_field`: the observation field the agent sees (empty: all of them).
        `instruction`: the task instruction (empty: a generic one). `instruction_field`: a field of the
        reset observation to use as the instruction instead. `success_field`: a true/false field of the
        observation that says the task is solved. `success_reward`: else an ending step with at least
        this reward is a success. `max_steps`: steps before leafe ends the episode unsolved. `reset_params`:
        more fields for every reset, a JSON object (the seed and episode_id are leafe's).
        `timeout_s`: seconds to wait for the server's every answer."""
        if not url:
            raise EnvError(self.data_status().fix)
        if max_steps < 1 or timeout_s <= 0:
            raise EnvError(f"env 'openenv': max_steps must be >= 1 and timeout_s > 0 (got {max_steps}, {timeout_s})")
        self.url = base_url(url)
        self.action_defaults = _json_object(action_defaults, "action_defaults", '{"kind": "say"}')
        self.reset_params = _json_object(reset_params, "reset_params", '{"difficulty": "easy"}')
        if action_field in self.action_defaults:
            raise EnvError(f"env 'openenv': action_defaults sets {action_field!r}, the field the agent's text goes in")
        self.action_field, self.observation_field = action_field, observation_field
        self.instruction_text, self.instruction_field = instruction, instruction_field
        self.success_field, self.success_reward = success_field, float(success_reward)
        self.max_steps, self.timeout_s = max_steps, float(timeout_s)
        key = (self.url, (action_field, *self.action_defaults))
        if key not in _PROBED:
            self.data_status(url, action_field, action_defaults, timeout_s).require()
            _PROBED.add(key)
        self._ws: Any = None
        self._steps = 0
        self._done = True  # no episode under way: a step needs a reset first
        self._refused = ""  # why the server refused the last message it refused

    @classmethod
    def data_status(cls, url: str = "", action_field: str = "message", action_defaults: dict[str, Any] | None = None,
                    timeout_s: float = 30.0, **_: object) -> DataStatus:
        """The env's data is a running server: whether it answers at `url`, with the Action fields asked for."""
        if importlib.util.find_spec("websockets") is None:
            return DataStatus(False, "the websockets package is not installed", PACKAGE_MISSING)
        if not url:
            return DataStatus(False, "a running OpenEnv server", "env 'openenv' needs the address of a running OpenEnv "
                                                                 "server: --env-param url=http://HOST:PORT")
        defaults = _json_object(action_defaults, "action_defaults", '{"kind": "say"}')
        return probe(url, (action_field, *defaults), min(float(timeout_s), 10.0))

    # -- tasks ---------------------------------------------------------------------------------
    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """Seeds seed..seed+n-1; the server makes each seed's episode (a server that ignores seeds
        gives another episode each reset, and no rollback)."""
        return [Task(f"openenv-{s}", self.name, {"seed": s}) for s in range(seed, seed + n)]

    # -- episode -------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        seed = task.spec.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise EnvError(f"OpenEnv task {task.task_id!r} has no integer seed (its spec: {task.spec})")
        data = self._ask({"type": "reset", "data": {**self.reset_params, "seed": seed, "episode_id": task.task_id}})()
        if data is None:
            raise EnvError(f"the OpenEnv server at {self.url} refused the reset ({self._refused}): check --env-param "
                           f"reset_params")
        observation = data["observation"]
        self._steps, self._done = 0, False
        if self.instruction_field:
            self.instruction = as_text(self._field(observation, self.instruction_field, "instruction_field"))
        else:
            self.instruction = self.instruction_text or DEFAULT_INSTRUCTION
        return self._text(observation)

    def step(self, action: str) -> StepResult:
        return self._act(action)()

    def submit(self, reply: str) -> Callable[[], tuple[str, StepResult]]:
        """Send the action now and wait for the server's answer when asked: a batch of episodes on one
        server is stepped concurrently."""
        action = self.parse_action(reply)
        answer = self._act(action)
        return lambda: (action, answer())

    def _act(self, action: str) -> Callable[[], StepResult]:
        if self._done:
            raise RuntimeError("step() outside an episode of the openenv env; call reset(task) first")
        answer = self._ask({"type": "step", "data": {**self.action_defaults, self.action_field: action}})

        def result() -> StepResult:
            data = answer()
            self._steps += 1
            if data is None:  # the server's Action refused it: a step with feedback, the env untouched
                observation, reward, done, success = f"Invalid action: {self._refused}", 0.0, False, False
            else:
                fields, metadata = data["observation"], data.get("metadata") or data["observation"].get("metadata")
                observation, reward = self._text(fields), data.get("reward")
                reward = float(reward) if isinstance(reward, (int, float)) else 0.0
                done = bool(data.get("done"))
                if self.success_field:
                    flag = fields.get(self.success_field, (metadata or {}).get(self.success_field))
                    success = bool(flag)
                    done = done or success
                else:
                    success = done and reward >= self.success_reward
            if not done and self._steps >= self.max_steps:
                done = True
                observation += f"\nNo steps left ({self.max_steps} used): the task was not completed."
            if done:
                self._done = True
                self.close()  # the episode is over: free the server's session for another
            return StepResult(observation, reward, done, success, {"invalid": data is None})

        return result

    def _text(self, observation: dict[str, Any]) -> str:
        if self.observation_field:
            return as_text(self._field(observation, self.observation_field, "observation_field"))
        hidden = {"metadata", self.instruction_field, self.success_field}
        return fields_text({k: v for k, v in observation.items() if k not in hidden})

    def _field(self, observation: dict[str, Any], name: str, param: str) -> Any:
        if name not in observation:
            raise EnvError(f"the observations of the OpenEnv server at {self.url} have no field {name!r} (they have "
                           f"{', '.join(observation) or 'none'}): set --env-param {param}=NAME")
        return observation[name]

    # -- the session -----------------------------------------------------------------------------
    def _connect(self) -> None:
        """Open a session (/ws); an `EnvFault` when the server cannot be reached after a few tries."""
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        ws_url = "ws" + self.url[len("http"):] + "/ws"
        last = ""
        for attempt in range(CONNECT_TRIES):
            if attempt:
                time.sleep(CONNECT_BACKOFF_S * 2 ** (attempt - 1))
            try:
                # Entered as the context manager websockets (17) asks for; the session outlives this
                # call, and `close` ends it.
                self._ws = connect(ws_url, open_timeout=self.timeout_s, close_timeout=1, max_size=None).__enter__()
                return
            except InvalidStatus as error:
                status = error.response.status_code
                if status < 500:
                    raise EnvError(f"the server at {self.url} refused a session on /ws (HTTP {status}): is it an "
                                   f"OpenEnv server?") from None
                last = f"HTTP {status}"
            except (OSError, TimeoutError, WebSocketException) as error:
                last = str(error) or type(error).__name__
        raise EnvFault(f"cannot open a session with the OpenEnv server at {self.url} ({last}) after "
                       f"{CONNECT_TRIES} tries", hint=FAULT_HINT)

    def _ask(self, message: dict[str, Any]) -> Callable[[], dict[str, Any] | None]:
        """Send `message` now; the returned function waits for the answer's data: None when the server
        refused the message's content (a validation error, its text in `_refused`); an `EnvFault`
        (the session dropped) when the server failed or did not answer."""
        from websockets.exceptions import WebSocketException

        what = message["type"]
        if self._ws is None:
            self._connect()
        try:
            self._ws.send(json.dumps(message))
        except (OSError, WebSocketException) as error:
            self._drop()
            raise EnvFault(f"the OpenEnv server at {self.url} dropped the session ({error})", hint=FAULT_HINT) from None

        def answer() -> dict[str, Any] | None:
            try:
                raw = self._ws.recv(timeout=self.timeout_s)
            except TimeoutError:
                self._drop()
                raise EnvFault(f"the OpenEnv server at {self.url} did not answer a {what} within {self.timeout_s:g}s",
                               hint=FAULT_HINT) from None
            except (OSError, WebSocketException, AttributeError) as error:  # AttributeError: closed meanwhile
                self._drop()
                raise EnvFault(f"the OpenEnv server at {self.url} dropped the session during a {what} ({error})",
                               hint=FAULT_HINT) from None
            return self._answer(raw, what)

        return answer

    def _answer(self, raw: str | bytes, what: str) -> dict[str, Any] | None:
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = None
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, dict):
            self._drop()
            raise EnvFault(f"the OpenEnv server at {self.url} answered a {what} with {str(raw)[:200]!r}",
                           hint=FAULT_HINT)
        if reply.get("type") == "error":
            code, text = data.get("code"), data.get("message", "no message")
            if code == "VALIDATION_ERROR":
                errors = data.get("errors") or []
                self._refused = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}"
                                          for e in errors if isinstance(e, dict)) or text
                return None
            self._drop()
            if code == "CAPACITY_REACHED":
                raise EnvError(f"the OpenEnv server at {self.url} holds {data.get('max_sessions', 'its')} sessions at "
                               f"once and all are taken; leafe keeps one per episode in flight: start it with a larger "
                               f"max_concurrent_envs (create_app(..., max_concurrent_envs=N)) or run fewer episodes at "
                               f"once (--parallel-tasks, --max-batch)")
            raise EnvFault(f"the OpenEnv server at {self.url} failed a {what}: {text} ({code})", hint=FAULT_HINT)
        if reply.get("type") != "observation" or not isinstance(data.get("observation"), dict):
            self._drop()
            raise EnvFault(f"the OpenEnv server at {self.url} answered a {what} with {str(raw)[:200]!r}",
                           hint=FAULT_HINT)
        return data

    def close(self) -> None:
        """End the server's session (it frees the env the server holds for it) and with it the
        episode; a later reset opens another. The server closes the connection when told to: one
        closed under it first logs a traceback on the server (openenv-core 0.3)."""
        ws = self._ws
        if ws is not None:
            try:
                ws.send('{"type": "close"}')
                ws.recv(timeout=1.0)  # returns only through ConnectionClosed, once the server closed
            except Exception:  # noqa: BLE001 (closed, as asked; or a session already gone)
                pass
        self._drop()

    def _drop(self) -> None:
        """Let go of the session at once (after a fault: the server may not answer a polite close)."""
        ws, self._ws, self._done = self._ws, None, True
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 (a session already gone has nothing to close)
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
