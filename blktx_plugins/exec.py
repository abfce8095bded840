"""``exec``: run storage tools (lvcreate, zfs, rbd, an array's CLI) as an action.

Commands are argument lists, never run through a shell. Nothing runs unless the
caller allowed command execution (``blktx run --allow-exec``, or
``allow_exec=True`` in Python): a spec from elsewhere cannot run anything by
surprise, and the refusal comes at check time, before anything runs.

Each command gets ``BLKTX_TXID``, ``BLKTX_ACTION`` and ``BLKTX_PHASE`` in its
environment. Output (stdout and stderr, the last 4 KB) lands in the result and
the journal; a non-zero exit fails the step with the command's stderr; a command
that outlives its timeout is killed with its whole process group and every
descendant that left it (``setsid``, double fork: found by a token in their
environment), and fails the step. Output goes to files, not pipes, so a daemon
that keeps the command's stdout open never makes blktx wait. ``blktx recover``
runs a cancel command only when it too was given ``--allow-exec``. The
``cancel`` command must be idempotent: blktx may run it again after a crash,
and from START (the ``do`` command may have failed half-way).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from typing import Any

from blktx import Action, ActionFailed, ActionType, Param, Refused, Register, RunContext, hookimpl

TAIL = 4096
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Exec(ActionType):
    """Run external commands for do, invalidate and cancel (needs --allow-exec)."""

    name = "exec"
    params = (
        Param("target", "str", required=True, doc="a stable key of what the commands change, e.g. lvm:vg0/root"),
        Param("do", "list[str]", required=True, doc="argv that makes the new thing"),
        Param("cancel", "list[str]", required=True, doc="argv that undoes do; must be idempotent"),
        Param("invalidate", "list[str]", default=None, doc="argv that switches users over (optional)"),
        Param("check", "list[str]", default=None, doc="argv whose non-zero exit refuses the action (no side effects)"),
        Param("env", "table[str]", default=None, doc="extra environment variables"),
        Param("cwd", "path", default=".", doc="working directory (default: the spec's)"),
        Param("timeout", "float", default=60.0, doc="seconds before a command is killed"),
    )

    def target(self, action: Action) -> str:
        return "exec:" + str(action.params["target"])

    def check(self, action: Action, ctx: RunContext) -> None:
        if not ctx.options.allow_exec:
            raise Refused(
                "running external commands is not allowed",
                hint="pass --allow-exec to blktx run/check (allow_exec=True from Python) if you trust this spec",
            )
        for key in ("do", "cancel", "invalidate", "check"):
            argv = action.params[key]
            if argv is not None and not argv:
                raise Refused(f"'{key}' is an empty command")
        for name in action.params["env"] or {}:
            if not _ENV_NAME.match(name):
                raise Refused(f"env: {name!r} is not an environment variable name", hint="letters, digits and _")
        timeout = action.params["timeout"]
        if not 0 < timeout <= 86400:  # written so that NaN fails too
            raise Refused(
                f"timeout must be more than 0 and at most 86400 seconds, got {timeout!r}", hint="every command gets a deadline"
            )
        if action.params["check"]:
            try:
                self._run(action, ctx, "check")
            except ActionFailed as exc:
                raise Refused(str(exc)) from None

    def do(self, action: Action, ctx: RunContext) -> None:
        self._run(action, ctx, "do")

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        if action.params["invalidate"]:
            self._run(action, ctx, "invalidate")

    def cancel(self, action: Action, ctx: RunContext) -> None:
        self._run(action, ctx, "cancel")

    def leftovers(self, action: Action) -> list[Any]:
        from blktx import Leftover

        return [
            Leftover(
                action.target,
                f"whatever `{' '.join(action.params['do'])}` made (cancel command `{' '.join(action.params['cancel'])}` failed)",
            )
        ]

    def _run(self, action: Action, ctx: RunContext, phase: str) -> None:
        if not ctx.options.allow_exec:  # also in blktx recover, which runs no check
            raise ActionFailed(
                f"not running the {phase} command `{' '.join(action.params[phase])}`: "
                "running external commands is not allowed (pass --allow-exec)"
            )
        argv: list[str] = action.params[phase]
        token = os.urandom(12).hex()
        env = {
            **os.environ,
            **(action.params["env"] or {}),
            "BLKTX_TXID": ctx.txid,
            "BLKTX_ACTION": str(action.index),
            "BLKTX_PHASE": phase,
            "BLKTX_EXEC_TOKEN": token,
        }
        timeout = action.params["timeout"]
        with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=action.params["cwd"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out_f,
                    stderr=err_f,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ActionFailed(f"cannot run {argv[0]}: {exc.strerror}") from None
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_all(proc, token)
                self._record(action, phase, _tail(out_f), _tail(err_f))
                raise ActionFailed(
                    f"{phase} command `{' '.join(argv)}` timed out after {timeout:g} s and was killed with everything it started"
                ) from None
            out, err = _tail(out_f), _tail(err_f)
        self._record(action, phase, out, err)
        if proc.returncode != 0:
            detail = (err or out).strip()[-TAIL:] or "no output"
            raise ActionFailed(f"{phase} command `{' '.join(argv)}` exited {proc.returncode}: {detail}")

    @staticmethod
    def _record(action: Action, phase: str, out: str, err: str) -> None:
        text = "".join(f"[{phase} {name}] {s.strip()[-TAIL:]}\n" for name, s in (("stdout", out), ("stderr", err)) if s.strip())
        if text:
            action.output = (action.output or "") + text


def _tail(fh: Any) -> str:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(size - TAIL, 0))
    return str(fh.read().decode("utf-8", "replace"))


def _kill_all(proc: subprocess.Popen[bytes], token: str) -> None:
    """SIGKILL the command's process group and every process that carries its token
    (descendants that moved to a session of their own), then reap the command."""
    with _suppress():
        os.killpg(proc.pid, signal.SIGKILL)
    needle = f"BLKTX_EXEC_TOKEN={token}".encode()
    for _ in range(3):  # a dying parent may fork once more
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if needle not in fh.read().split(b"\0"):
                        continue
                os.kill(int(pid), signal.SIGKILL)
                found = True
            except OSError:
                continue
        if not found:
            break
        time.sleep(0.01)
    proc.wait()


def _suppress() -> Any:
    import contextlib

    return contextlib.suppress(ProcessLookupError, PermissionError)


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    register(Exec)
