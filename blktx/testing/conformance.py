"""The all-or-none contract as a test suite any action type can be run through.

Subclass :class:`ActionTypeConformance` in a test module, name the type, and say
how to make a world for one action and how to observe it::

    from blktx.testing import ActionTypeConformance

    class TestFileCopy(ActionTypeConformance):
        type_name = "file.copy"

        def setup_world(self, base):             # make what one action needs
            (base / "data").write_text("x")
            return {"path": "data"}               # that action's parameters

        def observe(self, base):                  # everything the action could change
            return sorted((p.name, p.read_bytes()) for p in base.iterdir())

Every test says which property broke in its failure message.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from blktx.actiontype import Action
from blktx.context import RunContext
from blktx.executor import Executor
from blktx.plugins import Registry, default_registry
from blktx.spec import ActionSpec, Transaction, bind


class ConformanceError(AssertionError):
    """An action type broke a property of the contract."""


def _require(ok: bool, prop: str, detail: str) -> None:
    if not ok:
        raise ConformanceError(f"conformance: {prop}: {detail}")


class ActionTypeConformance:
    """The contract of ``blktx.ActionType``, as pytest tests (see the module docstring).

    Class attributes: ``type_name`` (required); ``allow_exec`` for types that run
    commands; ``changes_world`` False for types whose committed action leaves no
    trace (a no-op or a drill).
    """

    type_name: ClassVar[str] = ""
    allow_exec: ClassVar[bool] = False
    changes_world: ClassVar[bool] = True

    # -- what a subclass provides ------------------------------------------------------

    def setup_world(self, base: Path) -> dict[str, Any]:
        """Make the world one action needs under ``base``; return its parameters."""
        raise NotImplementedError

    def observe(self, base: Path) -> Any:
        """Everything the action could change under ``base``, comparable with ==."""
        raise NotImplementedError

    def make_foreign(self, base: Path, action: Action) -> bool:
        """Make, as somebody else would, an object at the name the checked ``action``
        will create (a file at its dest, a snapshot of its name); return True.

        Called between check and do. The default makes none and returns False:
        the property "cancel never removes what it did not make" is then skipped.
        """
        return False

    #: False when the type has no objects of its own that somebody else could make
    #: at the same name (its commands are the spec's): that property does not apply.
    foreign: ClassVar[bool] = True

    def change(self, base: Path) -> None:
        """Change, as users would, what a committed action's snapshot keeps (write new
        data to the image or device). Used by the revert properties; the default
        changes nothing (the properties then show only that a revert of an unchanged
        world commits and changes nothing users see)."""
        return None

    def observe_data(self, base: Path) -> Any:
        """What a revert must bring back: the data users see (default: ``observe``)."""
        return self.observe(base)

    def registry(self) -> Registry:
        return default_registry()

    #: The properties about cancel: they do not apply to a finalize type.
    CANCEL_PROPERTIES: ClassVar[frozenset[str]] = frozenset(
        {
            "test_do_then_cancel_restores_the_world",
            "test_invalidate_then_cancel_restores_the_world",
            "test_cancel_is_idempotent",
            "test_cancel_after_a_crash_works_from_the_journal",
            "test_cancel_never_removes_what_it_did_not_make",
        }
    )

    #: The properties of a type's declared revert.
    REVERT_PROPERTIES: ClassVar[frozenset[str]] = frozenset(
        {"test_revert_brings_back_what_create_kept", "test_a_rolled_back_revert_leaves_the_world"}
    )

    @classmethod
    def not_applicable(cls, test: str) -> str | None:
        """Why the property ``test`` does not apply to this type (it is then not
        collected: the kit's pytest plugin deselects it), or None."""
        entry = cls().registry().types.get(cls.type_name)
        if entry is not None and entry.cls.finalize and test in cls.CANCEL_PROPERTIES:
            return f"{cls.type_name} is a finalize type: never cancelled"
        if test == "test_cancel_never_removes_what_it_did_not_make" and (not cls.foreign or not cls.changes_world):
            return f"{cls.type_name} makes no object of its own"
        atype = entry.cls if entry is not None else None
        if test in cls.REVERT_PROPERTIES and (atype is None or not atype.revert_type):
            return f"{cls.type_name} declares no revert_type"
        if test == "test_delete_removes_what_create_made" and (atype is None or not atype.delete_type):
            return f"{cls.type_name} declares no delete_type"
        if (
            test == "test_every_crash_point_is_recovered_in_a_fresh_process"
            and default_registry().types.get(cls.type_name) is None
        ):
            return f"{cls.type_name} is not installed as an entry point: a child process cannot load it"
        return None

    def roots(self, base: Path) -> list[str]:
        """Where the action's paths may lie (default: under ``base``)."""
        return [str(base)]

    # -- helpers -----------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _close_contexts(self) -> Iterator[None]:
        """Close every run context a test opened (connections, daemons), however it ends."""
        self._contexts: list[RunContext] = []
        yield
        for ctx in self._contexts:
            ctx.close()

    def _bind(self, base: Path, params: dict[str, Any]) -> tuple[Executor, Action, RunContext]:
        registry = self.registry()
        executor = Executor(registry)
        actions, options = bind(
            Transaction([ActionSpec(self.type_name, params)], base_dir=str(base)),
            registry,
            allow_exec=self.allow_exec,
            roots=self.roots(base),
        )
        ctx = RunContext("conformance", options, str(base), registry.pm.hook)
        self._contexts.append(ctx)
        return executor, actions[0], ctx

    def _checked(self, base: Path) -> tuple[Executor, Action, RunContext, Any]:
        params = self.setup_world(base)
        executor, action, ctx = self._bind(base, params)
        before = self.observe(base)
        problems = executor.check_actions([action], ctx, None)
        _require(not problems, "check refused a valid action", "; ".join(str(p) for p in problems))
        return executor, action, ctx, before

    def _step(self, executor: Executor, action: Action, ctx: RunContext, step: str, prop: str) -> None:
        failures = executor.step(step, [action], ctx)
        _require(not failures, prop, f"{step} failed: {failures[0].message}" if failures else "")

    def _run(self, base: Path, params: dict[str, Any], fault: str | None) -> Any:
        specs = [ActionSpec(self.type_name, params)]
        if fault:
            specs.append(ActionSpec("fault", {"phase": fault}))
        return Executor(self.registry()).run(
            Transaction(specs, base_dir=str(base)), allow_exec=self.allow_exec, roots=self.roots(base)
        )

    # -- the properties ----------------------------------------------------------------

    def test_check_has_no_side_effects(self, tmp_path: Path) -> None:
        executor, action, ctx, before = self._checked(tmp_path)
        executor.check_actions([action], ctx, None)
        ctx.close()
        _require(self.observe(tmp_path) == before, "check has no side effects", "the world changed during check")

    def test_do_then_cancel_restores_the_world(self, tmp_path: Path) -> None:
        executor, action, ctx, before = self._checked(tmp_path)
        if action.type.finalize:
            pytest.skip(f"{action.type.name} is a finalize type: it runs after the commit point and is never cancelled")
        self._step(executor, action, ctx, "do", "do succeeds after check")
        self._step(executor, action, ctx, "cancel", "cancel after do succeeds")
        ctx.close()
        _require(
            self.observe(tmp_path) == before,
            "cancel after do restores the world",
            "something do made is still there after cancel",
        )

    def test_invalidate_then_cancel_restores_the_world(self, tmp_path: Path) -> None:
        executor, action, ctx, before = self._checked(tmp_path)
        if action.type.finalize:
            pytest.skip(f"{action.type.name} is a finalize type: it runs after the commit point and is never cancelled")
        for step in ("do", "invalidate", "cancel"):
            self._step(executor, action, ctx, step, f"{step} succeeds")
        ctx.close()
        _require(
            self.observe(tmp_path) == before,
            "cancel after invalidate restores the world",
            "the world differs from before the action",
        )

    def test_cancel_is_idempotent(self, tmp_path: Path) -> None:
        executor, action, ctx, before = self._checked(tmp_path)
        if action.type.finalize:
            pytest.skip(f"{action.type.name} is a finalize type: it runs after the commit point and is never cancelled")
        self._step(executor, action, ctx, "do", "do succeeds")
        self._step(executor, action, ctx, "cancel", "cancel succeeds")
        once = self.observe(tmp_path)
        self._step(executor, action, ctx, "cancel", "cancel is idempotent (a second cancel succeeds)")
        ctx.close()
        _require(self.observe(tmp_path) == once == before, "cancel is idempotent", "a second cancel changed the world")

    def test_cancel_after_a_crash_works_from_the_journal(self, tmp_path: Path) -> None:
        """What ``blktx recover`` does: a new action from the JSON of params and undo."""
        executor, action, ctx, before = self._checked(tmp_path)
        if action.type.finalize:
            pytest.skip(f"{action.type.name} is a finalize type: it runs after the commit point and is never cancelled")
        self._step(executor, action, ctx, "do", "do succeeds")
        ctx.close()
        params, undo = json.loads(json.dumps(action.params)), json.loads(json.dumps(action.undo))
        reborn = Action(action.index, action.type, params, action.target)
        reborn.undo = undo
        reborn.state = "START"  # the crash came before the journal recorded the do
        ctx2 = RunContext("conformance-recover", ctx.options, str(tmp_path), ctx.hook)
        self._contexts.append(ctx2)
        for attempt in (1, 2):
            self._step(executor, reborn, ctx2, "cancel", f"cancel from the journal succeeds (attempt {attempt})")
        ctx2.close()
        _require(
            self.observe(tmp_path) == before,
            "cancel works from params and undo alone",
            "a cancel rebuilt from the journal left something behind",
        )

    def test_cancel_without_do_changes_nothing(self, tmp_path: Path) -> None:
        executor, action, ctx, before = self._checked(tmp_path)
        self._step(executor, action, ctx, "cancel", "cancel from START succeeds")
        ctx.close()
        _require(
            self.observe(tmp_path) == before,
            "cancel from START changes nothing",
            "cancel removed or changed something the action never made",
        )

    def test_rolled_back_transaction_leaves_the_world(self, tmp_path: Path) -> None:
        for phase in ("do", "invalidate"):
            base = Path(tempfile.mkdtemp(dir=tmp_path))
            params = self.setup_world(base)
            before = self.observe(base)
            result = self._run(base, params, fault=phase)
            _require(
                result.outcome == "rolled back",
                "a failure later in the transaction rolls back",
                f"fault in {phase}: {result.summary()}",
            )
            _require(self.observe(base) == before, "all or none", f"a rollback (fault in {phase}) left the world changed")

    def _committed(self, base: Path) -> Action:
        """A committed action of this type, as the catalog would give it back."""
        result = self._run(base, self.setup_world(base), fault=None)
        _require(result.outcome == "committed", "a valid action commits", result.summary())
        made = result.actions[0]
        member = Action(made.index, made.type, json.loads(json.dumps(made.params)), made.target)
        member.undo = json.loads(json.dumps(made.undo))
        return member

    def _run_type(self, base: Path, kind: str, params: dict[str, Any], fault: str | None) -> Any:
        specs = [ActionSpec(kind, params), *([ActionSpec("fault", {"phase": fault})] if fault else [])]
        return Executor(self.registry()).run(
            Transaction(specs, base_dir=str(base)), allow_exec=self.allow_exec, roots=self.roots(base)
        )

    def test_revert_brings_back_what_create_kept(self, tmp_path: Path) -> None:
        """create, change, revert: users see again what they saw at the create."""
        base = Path(tempfile.mkdtemp(dir=tmp_path))
        member = self._committed(base)
        kept = self.observe_data(base)
        self.change(base)
        result = self._run_type(base, member.type.revert_type, member.type.revert_params(member), fault=None)
        _require(result.outcome == "committed", "a revert of a committed action commits", result.summary())
        _require(self.observe_data(base) == kept, "revert brings back what the create kept", "the data differs")

    def test_a_rolled_back_revert_leaves_the_world(self, tmp_path: Path) -> None:
        """create, change, a revert that fails later in its transaction: as before it."""
        for phase in ("do", "invalidate"):
            base = Path(tempfile.mkdtemp(dir=tmp_path))
            member = self._committed(base)
            self.change(base)
            before = self.observe(base)
            result = self._run_type(base, member.type.revert_type, member.type.revert_params(member), fault=phase)
            _require(result.outcome == "rolled back", "a failed revert rolls back", f"fault in {phase}: {result.summary()}")
            _require(self.observe(base) == before, "cancel of a revert restores the world", f"fault in {phase}")

    def test_delete_removes_what_create_made(self, tmp_path: Path) -> None:
        """create, then its declared delete: committed, and the member is gone."""
        base = Path(tempfile.mkdtemp(dir=tmp_path))
        member = self._committed(base)
        result = self._run_type(base, member.type.delete_type, member.type.delete_params(member), fault=None)
        _require(result.outcome == "committed", "a delete of a committed action commits", result.summary())
        _require(member.type.member_exists(member) is not True, "a deleted member is gone", "member_exists says present")

    def test_finalize_runs_only_after_the_commit_point(self, tmp_path: Path) -> None:
        base = Path(tempfile.mkdtemp(dir=tmp_path))
        params = self.setup_world(base)
        before = self.observe(base)
        result = self._run(base, params, fault=None)
        _require(result.outcome == "committed", "a valid action commits", result.summary())
        if self.changes_world:
            _require(self.observe(base) != before, "a committed action takes effect", "the world did not change")
        if result.actions[0].type.finalize:
            _require("finalize" in result.phases, "a finalize action runs after the commit point", "no finalize phase ran")

    def test_machine_matches_behaviour(self, tmp_path: Path) -> None:
        executor, action, ctx, _ = self._checked(tmp_path)
        lifecycle = action.type.lifecycle
        for step in ("invalidate",):
            _require(
                not lifecycle.allowed(step, action.state),
                "the machine refuses invalidate from START",
                "the declared lifecycle allows it",
            )
            try:
                executor.step(step, [action], ctx)
            except RuntimeError:
                pass
            else:
                raise ConformanceError("conformance: the executor refuses a step the machine forbids: it ran")
        _require(action.state == "START", "a refused step changes no state", action.state)
        if action.type.finalize:
            ctx.close()
            return
        expected = {"do": "CREATED", "invalidate": "INVALIDATED", "cancel": "CANCELED"}
        for step, state in expected.items():
            self._step(executor, action, ctx, step, f"{step} succeeds")
            _require(
                action.state == state,
                "the declared machine matches behaviour",
                f"after {step} the action is {action.state}, not {state}",
            )
        ctx.close()

    def test_cancel_never_removes_what_it_did_not_make(self, tmp_path: Path) -> None:
        """Somebody makes an object at the action's name after the check. Whether the
        run died before do (cancel from DOING) or do failed on it, cancel from the
        journal's facts must leave it: "made" is proven by identity, never by name."""
        for crash_before_do in (True, False):
            base = Path(tempfile.mkdtemp(dir=tmp_path))
            executor, action, ctx, _ = self._checked(base)
            if action.type.finalize:
                pytest.skip(f"{action.type.name} is a finalize type: it is never cancelled")
            if not self.make_foreign(base, action):
                pytest.skip(
                    f"{type(self).__name__}.make_foreign makes no foreign object: override it to check "
                    "that cancel never removes what it did not make"
                )
            with_foreign = self.observe(base)
            if crash_before_do:
                action.state = "DOING"  # the journal said it began; do never ran
            else:
                executor.step("do", [action], ctx)  # may fail: the name is taken
            ctx.close()
            reborn = Action(action.index, action.type, json.loads(json.dumps(action.params)), action.target)
            reborn.undo, reborn.state = json.loads(json.dumps(action.undo)), "DOING"
            ctx2 = RunContext("conformance-recover", ctx.options, str(base), ctx.hook)
            self._contexts.append(ctx2)
            executor.step("cancel", [reborn], ctx2)
            ctx2.close()
            when = "the run died before do" if crash_before_do else "do met it"
            _require(
                self.observe(base) == with_foreign,
                "cancel never removes what it did not make",
                f"an object somebody else made at the action's name was removed or changed ({when})",
            )

    def test_every_crash_point_is_recovered_in_a_fresh_process(self, tmp_path: Path) -> None:
        """A real ``blktx run`` in a child process, killed after each journal write in
        turn, then ``blktx recover`` in a fresh process: the world is as before, or as
        after a clean run. A cancel that reads anything but ``action.params`` and
        ``action.undo`` (a class attribute, a module global) fails here."""
        from blktx.plugins import default_registry as installed

        if installed().types.get(self.type_name) is None:
            pytest.skip(f"{self.type_name} is not installed as an entry point: a child process cannot load it")
        for fault in (None, "invalidate"):
            ref = Path(tempfile.mkdtemp(dir=tmp_path))
            params = self.setup_world(ref)
            before = _seen(self.observe(ref), ref)
            code, _ = _child_run(ref, self, params, fault, crash_after=None)
            _require(code == (1 if fault else 0), "a real run commits (or rolls back at the fault)", f"exit {code}")
            after = _seen(self.observe(ref), ref)
            for n in range(1, 40):
                base = Path(tempfile.mkdtemp(dir=tmp_path))
                params = self.setup_world(base)
                if _seen(self.observe(base), base) != before:
                    pytest.skip(f"{type(self).__name__}.observe(base) differs between two fresh worlds: they cannot be compared")
                code, journal = _child_run(base, self, params, fault, crash_after=n)
                if code in (0, 1):
                    break
                _require(code == -9, "a run killed at a journal write dies there", f"exit {code}")
                recovered = _child_recover(base, self, journal)
                _require(
                    recovered.returncode == 0,
                    "blktx recover finishes a killed run",
                    f"kill after write {n}: recover exited {recovered.returncode}: {recovered.stdout.strip()}",
                )
                world = _seen(self.observe(base), base)
                where = f"kill after write {n}{' (fault in ' + fault + ')' if fault else ''}"
                _require(
                    world in (before, after),
                    "after a crash and recover the world is as before or after",
                    f"{where}: {world}, not {before} nor {after}",
                )
                said = {t["outcome"] for t in json.loads(recovered.stdout or "{}").get("transactions", [])}
                if said == {"rolled back"}:
                    _require(world == before, "recover says rolled back: the world is as before", f"{where}: {world}")
                elif said == {"committed"}:
                    _require(world == after, "recover says committed: the world is as after", f"{where}: {world}")


def _seen(world: Any, base: Path) -> str:
    """A world as text, with its folder's path written ``{base}``: worlds made in two
    folders compare equal when they are alike."""
    return repr(world).replace(str(base), "{base}")


def _toml(value: Any) -> str:
    """A parameter's value as TOML (strings, numbers, booleans, lists, tables)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _aside(base: Path) -> Path:
    """Where a child run keeps its journal and claims: beside the world, not in it."""
    aside = base.parent / (base.name + ".run")
    aside.mkdir(mode=0o700, exist_ok=True)
    return aside


def _child_env(base: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "BLKTX_CRASH_AFTER"}
    env["BLKTX_LOCK_DIR"] = str(_aside(base) / "locks")
    return env


def _child_run(
    base: Path, suite: ActionTypeConformance, action_params: dict[str, Any], fault: str | None, crash_after: int | None
) -> tuple[int, Path]:
    import subprocess
    import sys

    lines = ["version = 1", "[[action]]", f"type = {json.dumps(suite.type_name)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in action_params.items() if v is not None]
    if fault:
        lines += ["[[action]]", 'type = "fault"', f"phase = {json.dumps(fault)}"]
    journal = _aside(base) / "journal.sqlite"
    env = _child_env(base)
    if crash_after is not None:
        env["BLKTX_CRASH_AFTER"] = str(crash_after)
    # the spec on stdin: its relative paths resolve against the world's folder, and no file lands in it
    args = [sys.executable, "-m", "blktx", "run", "-", "--journal", str(journal)]
    args += [a for root in suite.roots(base) for a in ("--root", root, "--vm-root", root)]
    args += ["--allow-exec"] if suite.allow_exec else []
    out = subprocess.run(args, input="\n".join(lines) + "\n", capture_output=True, text=True, env=env, cwd=base, check=False)
    if crash_after is None and out.returncode not in (0, 1):
        raise ConformanceError(
            f"conformance: a real run of {suite.type_name} in a child process exited "
            f"{out.returncode}: {(out.stdout + out.stderr).strip()[-2000:]}"
        )
    return out.returncode, journal


def _child_recover(base: Path, suite: ActionTypeConformance, journal: Path) -> Any:
    import subprocess
    import sys

    args = [sys.executable, "-m", "blktx", "recover", "--json", "--journal", str(journal)]
    args += ["--allow-exec"] if suite.allow_exec else []
    return subprocess.run(args, capture_output=True, text=True, env=_child_env(base), cwd=base, check=False)
