"""The ``ActionType`` base class: the contract every plugin's action type keeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from blktx.errors import ActionFailures
from blktx.params import Param
from blktx.states import START, Lifecycle

if TYPE_CHECKING:
    from blktx.context import RunContext


@dataclass(frozen=True)
class Leftover:
    """Something a failed cancel left behind: where it is, what it is."""

    target: str
    what: str
    #: Why it is left (the failed cancel's own message), when known.
    why: str = ""

    def __str__(self) -> str:
        return f"{self.target}: {self.what}" + (f" [{self.why}]" if self.why else "")


class Action:
    """One action of a transaction, and the model its type's machine moves.

    ``params`` holds the validated parameters. ``undo`` holds what ``cancel`` needs
    (the file ``do`` will create, the snapshot ids that existed before); it must stay
    JSON-serialisable, because the journal records it before every side effect and
    ``blktx recover`` rebuilds the action from it.
    """

    __slots__ = (
        "durations",
        "error",
        "failed_phase",
        "index",
        "line",
        "output",
        "params",
        "state",
        "target",
        "type",
        "undo",
    )

    def __init__(self, index: int, atype: ActionType, params: dict[str, Any], target: str, line: int | None = None) -> None:
        self.index = index
        self.type = atype
        self.params = params
        self.target = target
        self.state = START
        self.undo: dict[str, Any] = {}
        self.error: str | None = None
        self.failed_phase: str | None = None
        self.line = line
        self.durations: dict[str, float] | None = None
        self.output: str | None = None

    def claims(self) -> list[str]:
        """What this action changes and must own for the run: its target and every
        path it creates (params declared ``creates``)."""
        made = [str(self.params[p.name]) for p in self.type.params if p.creates and self.params.get(p.name)]
        return [self.target, *made] if made else [self.target]

    def __repr__(self) -> str:
        return f"<Action #{self.index} {self.type.name} {self.target} {self.state}>"

    def timed(self, phase: str, seconds: float) -> None:
        if self.durations is None:
            self.durations = {}
        self.durations[phase] = self.durations.get(phase, 0.0) + seconds


class ActionType:
    """Base class of every action type. Subclass it, declare, implement, register.

    **Declaration** (class attributes):

    - ``name``: the spec's ``type``, ``plugin.verb`` (``qcow2.internal-create``).
    - ``params``: a tuple of :class:`~blktx.params.Param`.
    - ``finalize``: True when ``do`` cannot be undone (deleting a snapshot). Such an
      action's ``do`` runs only after the commit point, is retried on failure, and
      what still fails is reported pending and finished by ``blktx recover``.
    - ``shares_target``: True when several actions of this type may change one
      target in one transaction (two internal snapshots of one image). Otherwise a
      second action on the target is refused at check time.
    - ``do_before_quiesce``: True when ``do`` only prepares and the point in time
      is taken in ``invalidate`` (an overlay created, the drive switched to it
      later), or when ``do`` acts on something no quiesced writer can change (an
      image no process has open). With a quiesce mode such a type's ``do`` runs
      before the VMs are paused, so their pause window holds only what needs it.
    - ``lifecycle``: the states and transitions (:mod:`blktx.states`); the default
      core lifecycle suits nearly every type. Its machine is built once per type.

    **Callbacks**, each given the :class:`Action` and the run's
    :class:`~blktx.context.RunContext`. Raise any exception to fail; its message
    is shown to the user as the backend's own words.

    ``target(action) -> str``
        The stable key of the one thing the action changes (an absolute path,
        ``vm:<address>/<drive>``). Targets are locked in sorted order.
    ``check(action, ctx)``
        Runs in START before anything in the transaction is touched. No side
        effects. Raise :class:`~blktx.errors.Refused` with a reason and a hint to
        refuse. It may set ``action.target`` to a more exact key it learned (the
        drive a node name stands for): conflicts and locks use that. Record in
        ``action.undo`` what a later ``cancel`` will need to tell what this
        transaction made from what already existed (for example the snapshot ids
        present now). For a finalize type, ``check`` must prove ``do`` can
        succeed.
    ``do(action, ctx)``
        START -> CREATED. Make the new thing without making anyone use it. Never
        delete or overwrite anything the transaction did not create. If ``do``
        learns more that ``cancel`` needs (the id the snapshot got), store it in
        ``action.undo`` before returning.
    ``invalidate(action, ctx)``
        CREATED -> INVALIDATED. Switch users over to the new thing (pivot a drive,
        re-point the active image). The default does nothing.
    ``cancel(action, ctx)``
        Any state -> CANCELED (finalize types need none). Undo whatever this action did, whichever state it is
        in, including a ``do`` that raised or was killed half-way (START). It must
        be idempotent: after a crash inside it, running it again leaves the same
        world as running it once. It must work from ``action.params`` and
        ``action.undo`` alone, because ``blktx recover`` calls it on an action
        rebuilt from the journal in a new process.
    ``finish(action, ctx)``
        Optional. Runs after the commit point on every committed action of the
        type, rolled forward like a finalize step (retried; pending ones are
        reported and finished by ``blktx recover``). For cleanup that must wait
        until nothing can roll back any more: deleting the old snapshot that a
        ``replace`` superseded. Must be idempotent.
    ``leftovers(action) -> list[Leftover]``
        What would stay behind if ``cancel`` failed now, named exactly (which file,
        which snapshot id). Reported when a cancel fails.
    ``member_exists(action) -> bool | None``
        Optional. For ``blktx list --verify``: whether what a committed action made
        is still there, judged by the identity in ``action.undo`` (a snapshot's id
        and date, an overlay's inode, a subvolume's UUID), never by name alone.

    **Group snapshots** (``blktx revert``/``delete``/``prune``): a type that makes
    something declares ``revert_type`` and ``delete_type``, the names of the types
    that bring its member back and remove it, and implements
    ``revert_params(action)``/``delete_params(action)``: the parameters of that
    action, from the committed action rebuilt from the catalog (its ``params`` and
    the identity in ``undo``). Pass the identity on (a snapshot's id *and* date)
    so that the revert or delete acts on what was made, never on a same-named
    remake. A revert type is an ordinary undoable type (its cancel restores the
    state before the revert); a delete type is a finalize type.

    **Batches**: ``check_many``/``do_many``/``invalidate_many``/``cancel_many``
    receive every action of this type in a phase, in order (reverse order for
    cancel). The defaults call the single-action callbacks in turn; override them
    to send one request for the whole batch (one QMP ``transaction``). A batch
    that fails for some actions only raises :class:`~blktx.errors.ActionFailures`;
    any other exception fails every action of the batch.
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    finalize: ClassVar[bool] = False
    shares_target: ClassVar[bool] = False
    do_before_quiesce: ClassVar[bool] = False
    lifecycle: ClassVar[Lifecycle] = Lifecycle()
    #: The types that revert and delete what this type makes; "" when there is none.
    revert_type: ClassVar[str] = ""
    delete_type: ClassVar[str] = ""
    #: Why a member of this type cannot be reverted, and what to do instead (shown by
    #: ``blktx revert`` when ``revert_type`` is empty).
    no_revert: ClassVar[str] = ""
    #: Whether this type overrides a ``*_many`` method (set at class creation).
    batched: ClassVar[bool] = False
    #: Whether this type overrides ``finish`` (set at class creation).
    has_finish: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.batched = any(
            getattr(cls, m) is not getattr(ActionType, m) for m in ("check_many", "do_many", "invalidate_many", "cancel_many")
        )
        cls.has_finish = cls.finish is not ActionType.finish

    # -- single-action callbacks -------------------------------------------------

    def target(self, action: Action) -> str:
        raise NotImplementedError(f"{type(self).__name__}.target")

    def check(self, action: Action, ctx: RunContext) -> None:
        return None

    def do(self, action: Action, ctx: RunContext) -> None:
        raise NotImplementedError(f"{type(self).__name__}.do")

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        return None

    def cancel(self, action: Action, ctx: RunContext) -> None:
        if self.finalize:
            return None  # a finalize action runs only after the commit point: nothing to cancel
        raise NotImplementedError(f"{type(self).__name__}.cancel")

    def finish(self, action: Action, ctx: RunContext) -> None:
        """After the commit point, drop what the committed action made obsolete."""
        return None

    def leftovers(self, action: Action) -> list[Leftover]:
        return [Leftover(action.target, f"whatever {self.name} action #{action.index} made")]

    def member_exists(self, action: Action) -> bool | None:
        """Whether what this committed action made is still there, by the identity in
        ``action.undo`` (``blktx list --verify``); None when the type cannot tell."""
        return None

    def catalog_member(self, action: Action) -> dict[str, Any] | None:
        """How the catalog records what this committed action made, or None for nothing.

        By default the action itself: its type, target, parameters and the identity in
        ``undo``. A revert type returns the state it kept (``keep_current``) as the
        member of the type that could have made it (a safety snapshot as a
        ``qcow2.internal-create`` member), so that ``blktx revert --keep-current``
        lists it as a group snapshot of its own, to revert to or delete; else None.
        """
        return {
            "index": action.index,
            "type": self.name,
            "target": action.target,
            "params": action.params,
            "identity": action.undo,
        }

    def revert_params(self, action: Action) -> dict[str, Any]:
        """The parameters of the ``revert_type`` action that brings back what the
        committed ``action`` (rebuilt from the catalog) made."""
        raise NotImplementedError(f"{self.name} declares no revert")

    def delete_params(self, action: Action) -> dict[str, Any]:
        """The parameters of the ``delete_type`` action that removes what the
        committed ``action`` (rebuilt from the catalog) made."""
        raise NotImplementedError(f"{self.name} declares no delete")

    # -- batches -----------------------------------------------------------------

    def check_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        self._each("check", actions, ctx, keep_going=True)

    def do_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        self._each("do", actions, ctx)

    def invalidate_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        self._each("invalidate", actions, ctx)

    def cancel_many(self, actions: Sequence[Action], ctx: RunContext) -> None:
        self._each("cancel", actions, ctx, keep_going=True)

    def _each(self, step: str, actions: Sequence[Action], ctx: RunContext, keep_going: bool = False) -> None:
        failures: dict[int, BaseException] = {}
        method = getattr(self, step)
        for n, action in enumerate(actions):
            try:
                method(action, ctx)
            except Exception as exc:
                failures[action.index] = exc
                if not keep_going:
                    raise ActionFailures(failures, [a.index for a in actions[n + 1 :]]) from exc
        if failures:
            raise ActionFailures(failures)

    # -- introspection -------------------------------------------------------------

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def param(cls, name: str) -> Param | None:
        for p in cls.params:
            if p.name == name:
                return p
        return None
