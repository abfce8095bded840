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

Every test checks one property (:attr:`ActionTypeConformance.PROPERTIES`) and names
it in its failure message, ``conformance: <property>: <what went wrong>``, followed,
when worlds were compared, by the world's diff (:func:`blktx.testing.diff.world_diff`). A property that
fails only as a simpler one does (a cancel that leaves a file breaks every property
that cancels) is skipped, naming the simpler one: one cause, one failure.
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
from blktx.testing.diff import _normal, _seen, world_diff


class ConformanceError(AssertionError):
    """An action type broke a property of the contract."""


def _require(ok: bool, prop: str, detail: str) -> None:
    if not ok:
        raise ConformanceError(f"conformance: {prop}: {detail}")


def _require_same(expected: Any, seen: Any, base: Path, prop: str, detail: str, label: str) -> None:
    """``seen`` (an ``observe`` result) equals ``expected``, or the property fails with their diff."""
    _require(seen == expected, prop, f"{detail}\n  {world_diff(expected, seen, base, label)}")


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

    #: Each test's property, as its failure message names it: ``conformance:
    #: <property>: <what went wrong>`` (docs/testing.md lists them).
    PROPERTIES: ClassVar[dict[str, str]] = {
        "test_check_has_no_side_effects": "check has no side effects",
        "test_do_then_cancel_restores_the_world": "cancel after do restores the world",
        "test_invalidate_then_cancel_restores_the_world": "cancel after invalidate restores the world",
        "test_cancel_is_idempotent": "cancel is idempotent",
        "test_cancel_after_a_crash_works_from_the_journal": "cancel works from params and undo alone",
        "test_cancel_without_do_changes_nothing": "cancel from START changes nothing",
        "test_rolled_back_transaction_leaves_the_world": "all or none",
        "test_finalize_runs_only_after_the_commit_point": "a committed action takes effect",
        "test_machine_matches_behaviour": "the declared machine matches behaviour",
        "test_every_crash_point_is_recovered_in_a_fresh_process": "after a crash and recover the world is as before or after",
        "test_revert_brings_back_what_create_kept": "revert brings back what the create kept",
        "test_a_rolled_back_revert_leaves_the_world": "cancel of a revert restores the world",
        "test_delete_removes_what_create_made": "a delete removes what the create made",
        "test_cancel_never_removes_what_it_did_not_make": "cancel never removes what it did not make",
    }

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
    def _close_contexts(self, request: pytest.FixtureRequest) -> Iterator[None]:
        """Close every run context a test opened (connections, daemons), however it ends;
        skip, with the reason, a property that does not apply (when the kit's pytest
        plugin did not already deselect it)."""
        self._test: str = request.function.__name__
        why = type(self).not_applicable(self._test)
        if why is not None:
            pytest.skip(why)
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

    def _checked(self, base: Path, prop: str) -> tuple[Executor, Action, RunContext, Any]:
        params = self.setup_world(base)
        executor, action, ctx = self._bind(base, params)
        before = self.observe(base)
        problems = executor.check_actions([action], ctx, None)
        _require(not problems, prop, "check refused the action setup_world made: " + "; ".join(str(p) for p in problems))
        return executor, action, ctx, before

    def _step(self, executor: Executor, action: Action, ctx: RunContext, step: str, prop: str, what: str = "") -> None:
        failures = executor.step(step, [action], ctx)
        _require(not failures, prop, f"{what or step} failed: {failures[0].message}" if failures else "")

    #: The in-process steps after check whose world the simpler properties judge, and
    #: the test that judges it: () is check alone.
    SIMPLER: ClassVar[tuple[tuple[tuple[str, ...], str], ...]] = (
        ((), "test_check_has_no_side_effects"),
        (("do", "cancel"), "test_do_then_cancel_restores_the_world"),
        (("do", "invalidate", "cancel"), "test_invalidate_then_cancel_restores_the_world"),
    )

    def _reported_by(self, tmp_path: Path, seen: str, simpler: tuple[str, ...]) -> str | None:
        """The simpler property (among the tests named in ``simpler``) that already fails
        with exactly the world ``seen`` (``_seen`` of an observed world), or None.

        Each is checked, not assumed: a fresh world under ``tmp_path``, check and the
        property's steps in this process, and its world compared. One cause (a cancel
        that leaves a file) then gives one failure, and the properties that depend on
        it skip naming it."""
        for steps, test in self.SIMPLER:
            if test not in simpler or type(self).not_applicable(test) is not None:
                continue
            base = Path(tempfile.mkdtemp(dir=tmp_path, prefix="simpler-"))
            params = self.setup_world(base)
            executor, action, ctx = self._bind(base, params)
            before = _seen(self.observe(base), base)
            ok = not executor.check_actions([action], ctx, None)
            for step in steps:
                ok = ok and not executor.step(step, [action], ctx)
            ctx.close()
            world = _seen(self.observe(base), base)
            if ok and world == seen and world != before:
                return test
        return None

    def _second_cancel_fails(self, tmp_path: Path) -> bool:
        """Whether a second cancel fails in this process too (do, cancel, cancel in a
        fresh world): then "cancel is idempotent" fails and reports it."""
        base = Path(tempfile.mkdtemp(dir=tmp_path, prefix="simpler-"))
        executor, action, ctx = self._bind(base, self.setup_world(base))
        try:
            if executor.check_actions([action], ctx, None) or executor.step("do", [action], ctx):
                return False
            return not executor.step("cancel", [action], ctx) and bool(executor.step("cancel", [action], ctx))
        finally:
            ctx.close()

    def _skip_reported(self, owners: list[str]) -> None:
        if owners:
            names = ", ".join(sorted({f"'{self.PROPERTIES[t]}' ({t})" for t in owners}))
            pytest.skip(
                f"{self.PROPERTIES.get(self._test, self._test)!r} not judged: it fails exactly as "
                f"{names} does, which reports it (one cause, one failure)"
            )

    def _run(self, base: Path, params: dict[str, Any], fault: str | None) -> Any:
        specs = [ActionSpec(self.type_name, params)]
        if fault:
            specs.append(ActionSpec("fault", {"phase": fault}))
        return Executor(self.registry()).run(
            Transaction(specs, base_dir=str(base)), allow_exec=self.allow_exec, roots=self.roots(base)
        )

    # -- the properties ----------------------------------------------------------------

    def test_check_has_no_side_effects(self, tmp_path: Path) -> None:
        prop = self.PROPERTIES["test_check_has_no_side_effects"]
        executor, action, ctx, before = self._checked(tmp_path, prop)
        executor.check_actions([action], ctx, None)  # again: a second check is no different
        ctx.close()
        _require_same(before, self.observe(tmp_path), tmp_path, prop, "the world changed during check", "before -> after check")

    def test_do_then_cancel_restores_the_world(self, tmp_path: Path) -> None:
        prop = self.PROPERTIES["test_do_then_cancel_restores_the_world"]
        executor, action, ctx, before = self._checked(tmp_path, prop)
        self._step(executor, action, ctx, "do", prop)
        self._step(executor, action, ctx, "cancel", prop)
        ctx.close()
        self._restored(tmp_path, before, prop, "something do made is still there after cancel", "after cancel")

    def _restored(self, base: Path, before: Any, prop: str, detail: str, when: str, simpler: tuple[str, ...] = ()) -> None:
        """The world under ``base`` is ``before`` again, or the property fails with the
        diff, unless one of the ``simpler`` properties fails with this very world."""
        world = self.observe(base)
        if world != before:
            owner = self._reported_by(base, _seen(world, base), (*simpler, "test_check_has_no_side_effects"))
            if owner is not None:
                self._skip_reported([owner])
        _require_same(before, world, base, prop, detail, f"before the action -> {when}")

    def test_invalidate_then_cancel_restores_the_world(self, tmp_path: Path) -> None:
        prop = self.PROPERTIES["test_invalidate_then_cancel_restores_the_world"]
        executor, action, ctx, before = self._checked(tmp_path, prop)
        for step in ("do", "invalidate", "cancel"):
            self._step(executor, action, ctx, step, prop)
        ctx.close()
        self._restored(
            tmp_path,
            before,
            prop,
            "the world differs from before the action",
            "after do, invalidate and cancel",
            simpler=("test_do_then_cancel_restores_the_world",),
        )

    def test_cancel_is_idempotent(self, tmp_path: Path) -> None:
        """A second cancel changes nothing the first left (whether the first restored
        the world is "cancel after do restores the world": not failed twice)."""
        prop = self.PROPERTIES["test_cancel_is_idempotent"]
        executor, action, ctx, _ = self._checked(tmp_path, prop)
        self._step(executor, action, ctx, "do", prop)
        self._step(executor, action, ctx, "cancel", prop, "the first cancel")
        once = self.observe(tmp_path)
        self._step(executor, action, ctx, "cancel", prop, "the second cancel")
        ctx.close()
        _require_same(
            once,
            self.observe(tmp_path),
            tmp_path,
            prop,
            "a second cancel changed the world",
            "after the first cancel -> after the second",
        )

    def test_cancel_after_a_crash_works_from_the_journal(self, tmp_path: Path) -> None:
        """What ``blktx recover`` does: a new action from the JSON of params and undo."""
        prop = self.PROPERTIES["test_cancel_after_a_crash_works_from_the_journal"]
        executor, action, ctx, before = self._checked(tmp_path, prop)
        self._step(executor, action, ctx, "do", prop)
        ctx.close()
        params, undo = json.loads(json.dumps(action.params)), json.loads(json.dumps(action.undo))
        reborn = Action(action.index, action.type, params, action.target)
        reborn.undo = undo
        reborn.state = "START"  # the crash came before the journal recorded the do
        ctx2 = RunContext("conformance-recover", ctx.options, str(tmp_path), ctx.hook)
        self._contexts.append(ctx2)
        self._step(executor, reborn, ctx2, "cancel", prop, "cancel from the journal")
        again = executor.step("cancel", [reborn], ctx2)  # recover may cancel again
        ctx2.close()
        if again and self._second_cancel_fails(tmp_path):
            self._skip_reported(["test_cancel_is_idempotent"])
        _require(not again, prop, f"a second cancel from the journal failed: {again[0].message}" if again else "")
        self._restored(
            tmp_path,
            before,
            prop,
            "a cancel rebuilt from the journal left something behind",
            "after do and a cancel from the journal",
            simpler=("test_do_then_cancel_restores_the_world",),
        )

    def test_cancel_without_do_changes_nothing(self, tmp_path: Path) -> None:
        prop = self.PROPERTIES["test_cancel_without_do_changes_nothing"]
        executor, action, ctx, before = self._checked(tmp_path, prop)
        self._step(executor, action, ctx, "cancel", prop, "cancel from START")
        ctx.close()
        self._restored(
            tmp_path, before, prop, "cancel removed or changed something the action never made", "after cancel from START"
        )

    def test_rolled_back_transaction_leaves_the_world(self, tmp_path: Path) -> None:
        prop = self.PROPERTIES["test_rolled_back_transaction_leaves_the_world"]
        owners = []
        for phase, steps in (("do", ("do",)), ("invalidate", ("do", "invalidate"))):
            base = Path(tempfile.mkdtemp(dir=tmp_path))
            params = self.setup_world(base)
            before = self.observe(base)
            result = self._run(base, params, fault=phase)
            _require(result.outcome == "rolled back", prop, f"a fault in {phase} did not roll back: {result.summary()}")
            world = self.observe(base)
            if world != before:
                simpler = [t for s, t in self.SIMPLER if s in ((), (*steps, "cancel"), ("do", "cancel"))]
                owner = self._reported_by(tmp_path, _seen(world, base), tuple(simpler))
                if owner is not None:
                    owners.append(owner)
                    continue
            _require_same(
                before,
                world,
                base,
                prop,
                f"a rollback (fault in {phase}) left the world changed",
                f"before the run -> after its rollback (fault in {phase})",
            )
        self._skip_reported(owners)

    def _committed(self, base: Path, prop: str) -> Action:
        """A committed action of this type, as the catalog would give it back."""
        result = self._run(base, self.setup_world(base), fault=None)
        _require(result.outcome == "committed", prop, f"a valid action did not commit: {result.summary()}")
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
        prop = self.PROPERTIES["test_revert_brings_back_what_create_kept"]
        base = Path(tempfile.mkdtemp(dir=tmp_path))
        member = self._committed(base, prop)
        kept = self.observe_data(base)
        self.change(base)
        result = self._run_type(base, member.type.revert_type, member.type.revert_params(member), fault=None)
        _require(result.outcome == "committed", prop, f"the revert did not commit: {result.summary()}")
        _require_same(
            kept, self.observe_data(base), base, prop, "the data differs", "observe_data after the create -> after the revert"
        )

    def test_a_rolled_back_revert_leaves_the_world(self, tmp_path: Path) -> None:
        """create, change, a revert that fails later in its transaction: as before it."""
        prop = self.PROPERTIES["test_a_rolled_back_revert_leaves_the_world"]
        for phase in ("do", "invalidate"):
            base = Path(tempfile.mkdtemp(dir=tmp_path))
            member = self._committed(base, prop)
            self.change(base)
            before = self.observe(base)
            result = self._run_type(base, member.type.revert_type, member.type.revert_params(member), fault=phase)
            _require(
                result.outcome == "rolled back", prop, f"a revert with a fault in {phase} did not roll back: {result.summary()}"
            )
            _require_same(
                before,
                self.observe(base),
                base,
                prop,
                f"the rolled-back revert (fault in {phase}) left the world changed",
                f"before the revert -> after its rollback (fault in {phase})",
            )

    def test_delete_removes_what_create_made(self, tmp_path: Path) -> None:
        """create, then its declared delete: committed, and the member is gone."""
        prop = self.PROPERTIES["test_delete_removes_what_create_made"]
        base = Path(tempfile.mkdtemp(dir=tmp_path))
        member = self._committed(base, prop)
        result = self._run_type(base, member.type.delete_type, member.type.delete_params(member), fault=None)
        _require(result.outcome == "committed", prop, f"the delete did not commit: {result.summary()}")
        _require(member.type.member_exists(member) is not True, prop, "after the delete, member_exists says present")

    def test_finalize_runs_only_after_the_commit_point(self, tmp_path: Path) -> None:
        prop = self.PROPERTIES["test_finalize_runs_only_after_the_commit_point"]
        base = Path(tempfile.mkdtemp(dir=tmp_path))
        params = self.setup_world(base)
        before = self.observe(base)
        result = self._run(base, params, fault=None)
        _require(result.outcome == "committed", prop, f"a valid action did not commit: {result.summary()}")
        if self.changes_world:
            _require(
                self.observe(base) != before,
                prop,
                "the world did not change (set changes_world = False for a type whose action leaves no trace)",
            )
        if result.actions[0].type.finalize:
            _require("finalize" in result.phases, prop, "a finalize action ran, but no finalize phase after the commit point")

    def test_machine_matches_behaviour(self, tmp_path: Path) -> None:
        prop = self.PROPERTIES["test_machine_matches_behaviour"]
        executor, action, ctx, _ = self._checked(tmp_path, prop)
        lifecycle = action.type.lifecycle
        _require(not lifecycle.allowed("invalidate", action.state), prop, "the declared lifecycle allows invalidate from START")
        try:
            executor.step("invalidate", [action], ctx)
        except RuntimeError:
            pass
        else:
            raise ConformanceError(f"conformance: {prop}: the executor ran invalidate from START, which the machine forbids")
        _require(action.state == "START", prop, f"a refused step changed the state to {action.state}")
        if action.type.finalize:
            ctx.close()
            return
        expected = {"do": "CREATED", "invalidate": "INVALIDATED", "cancel": "CANCELED"}
        for step, state in expected.items():
            self._step(executor, action, ctx, step, prop)
            _require(action.state == state, prop, f"after {step} the action is {action.state}, not {state}")
        ctx.close()

    def test_cancel_never_removes_what_it_did_not_make(self, tmp_path: Path) -> None:
        """Somebody makes an object at the action's name after the check. Whether the
        run died before do (cancel from DOING) or do failed on it, cancel from the
        journal's facts must leave it: "made" is proven by identity, never by name."""
        prop = self.PROPERTIES["test_cancel_never_removes_what_it_did_not_make"]
        for crash_before_do in (True, False):
            base = Path(tempfile.mkdtemp(dir=tmp_path))
            executor, action, ctx, _ = self._checked(base, prop)
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
            _require_same(
                with_foreign,
                self.observe(base),
                base,
                prop,
                f"an object somebody else made at the action's name was removed or changed ({when})",
                "with the foreign object -> after the cancel",
            )

    def test_every_crash_point_is_recovered_in_a_fresh_process(self, tmp_path: Path) -> None:
        """A real ``blktx run`` in a child process, killed after each journal write in
        turn, then ``blktx recover`` in a fresh process: the world is as before, or as
        after a clean run. A cancel that reads anything but ``action.params`` and
        ``action.undo`` (a class attribute, a module global) fails here."""
        prop = self.PROPERTIES["test_every_crash_point_is_recovered_in_a_fresh_process"]
        owners: list[str] = []
        for fault in (None, "invalidate"):
            ref = Path(tempfile.mkdtemp(dir=tmp_path))
            params = self.setup_world(ref)
            before = self.observe(ref)
            code, _ = _child_run(ref, self, params, fault, crash_after=None)
            _require(code == (1 if fault else 0), prop, f"a real run {'rolls back' if fault else 'commits'}: exit {code}")
            after = self.observe(ref)
            seen_before, seen_after = _seen(before, ref), _seen(after, ref)
            for n in range(1, 40):
                base = Path(tempfile.mkdtemp(dir=tmp_path))
                params = self.setup_world(base)
                if _seen(self.observe(base), base) != seen_before:
                    pytest.skip(f"{type(self).__name__}.observe(base) differs between two fresh worlds: they cannot be compared")
                code, journal = _child_run(base, self, params, fault, crash_after=n)
                if code in (0, 1):
                    break
                where = f"killed after journal write {n}{' (fault in ' + fault + ')' if fault else ''}"
                _require(code == -9, prop, f"a run to be {where} exited {code}")
                recovered = _child_recover(base, self, journal)
                _require(
                    recovered.returncode == 0,
                    prop,
                    f"{where}: blktx recover exited {recovered.returncode}: {recovered.stdout.strip()}",
                )
                world = self.observe(base)
                seen = _seen(world, base)
                said = {t["outcome"] for t in json.loads(recovered.stdout or "{}").get("transactions", [])}
                if said == {"committed"}:
                    expected, label = after, "after a clean run -> after recover"
                    why = "recover said committed, but the world is not as after a clean run"
                else:
                    expected, label = before, "before the run -> after recover"
                    why = "recover said rolled back, but the world is not as before"
                if said not in ({"committed"}, {"rolled back"}):
                    why = f"recover said {sorted(said)}, and the world is neither as before nor as after a clean run"
                    ok = seen in (seen_before, seen_after)
                else:
                    ok = seen == _seen(expected, ref)
                if ok:
                    continue
                if said != {"committed"}:
                    owner = self._reported_by(tmp_path, seen, tuple(t for _, t in self.SIMPLER))
                    if owner is not None:  # a cancel in this process leaves this very world
                        owners.append(owner)
                        continue
                diff = world_diff(_normal(expected, ref), _normal(world, base), None, label)
                raise ConformanceError(f"conformance: {prop}: {where}: {why}\n  {diff}")
        self._skip_reported(owners)


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
