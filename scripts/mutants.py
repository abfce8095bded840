#!/usr/bin/env python3
"""Mutants of the commit path, the locks and the rollback: each is applied to the
source, the tests that must catch it run, and the source is restored.

    python scripts/mutants.py            # every mutant with its tests
    python scripts/mutants.py NAME       # one

Each line says CAUGHT (a test failed, as it must) or SURVIVED (a hole in the tests).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = {
    "commit-before-write": (
        "blktx/transaction.py",
        """        with together(journal):
            journal.done(txid, last, undoable)
            journal.state(txid, TxState.COMMITTED, {})
            commit_change(journal, txid, ctx.options, self.actions, bool(undoable))
        self._to("commit")""",
        """        self._to("commit")
        with contextlib.suppress(Exception), together(journal):
            journal.done(txid, last, undoable)
            journal.state(txid, TxState.COMMITTED, {})
            commit_change(journal, txid, ctx.options, self.actions, bool(undoable))""",
    ),
    "drop-cancel-intent": (
        "blktx/transaction.py",
        """            self.journal.intent(self.txid, "cancel", victims)""",
        """            pass""",
    ),
    "release-at-exit-3": (
        "blktx/transaction.py",
        """self.locker.release(self.claim, finished=self.state in TX_FINAL)""",
        """self.locker.release(self.claim, finished=True)""",
    ),
    "check-before-lock": (
        "blktx/transaction.py",
        """            if self.lock() and self.check() and self.begin():""",
        """            problems = check_actions(self.actions, self.ctx, self.file)
            if problems:
                self.result.problems = problems
                self._to("refuse")
            elif self.lock() and self.check() and self.begin():""",
    ),
    "rollback-skips-one-cancel": (
        "blktx/transaction.py",
        """        victims = [a for a in self.undoable if a.state in LIVE_STATES]""",
        """        victims = [a for a in self.undoable if a.state in LIVE_STATES][1:]""",
    ),
    "delete-keeps-catalog-entry": (
        "blktx/catalog.py",
        """        forget(options.forgets)""",
        """        pass""",
    ),
    "claim-not-durable-before-intent": (
        "blktx/transaction.py",
        """            self.claim.durable()""",
        """            pass""",
    ),
}
TESTS = {
    "claim-not-durable-before-intent": ["tests/test_locks.py"],
    "delete-keeps-catalog-entry": ["tests/test_cli_groups.py"],
    "commit-before-write": ["tests/test_transaction.py"],
    "drop-cancel-intent": ["tests/test_recover.py::test_the_cancel_intent_is_durable_before_any_cancel"],
    "release-at-exit-3": ["tests/test_transaction.py"],
    "check-before-lock": ["tests/test_transaction.py"],
    "rollback-skips-one-cancel": ["tests/test_properties.py"],
}


def run(name: str) -> bool:
    rel, old, new = MUTANTS[name]
    path = ROOT / rel
    text = path.read_text()
    assert old in text, f"mutant {name} no longer applies: update scripts/mutants.py"
    path.write_text(text.replace(old, new))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS[name]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
    finally:
        path.write_text(text)
    caught = out.returncode != 0
    print(f"{name}: {'CAUGHT' if caught else 'SURVIVED'} ({out.stdout.strip().splitlines()[-1]})")
    return caught


if __name__ == "__main__":
    names = sys.argv[1:] or list(MUTANTS)
    sys.exit(0 if all([run(n) for n in names]) else 1)
