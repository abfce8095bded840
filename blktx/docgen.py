"""Generate the reference parts of the docs from the code: the hook reference from
``blktx/hookspecs.py`` docstrings and the lifecycle diagram from ``blktx/states.py``.

    python -m blktx.docgen          # rewrite docs/hooks.md and docs/lifecycle.md
    python -m blktx.docgen --check  # exit 1 when they are out of date
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from blktx import hookspecs
from blktx.context import spec_options
from blktx.states import CORE_TRANSITIONS, TX_TRANSITIONS, Lifecycle, TxLifecycle
from blktx.status import ACTION_WORDS, STATUS


def hook_names() -> list[str]:
    return [name for name, obj in vars(hookspecs).items() if name.startswith("blktx_") and inspect.isfunction(obj)]


def hooks_md() -> str:
    lines = [
        "# Hook reference",
        "",
        "Generated from `blktx/hookspecs.py` by `python -m blktx.docgen`; edit the docstrings, not this file.",
        "",
        inspect.cleandoc(hookspecs.__doc__ or ""),
        "",
    ]
    for name in hook_names():
        func = getattr(hookspecs, name)
        opts = getattr(func, "blktx_spec", {}) or {}
        sig = str(inspect.signature(func)).replace("'", "")
        lines += [f"## `{name}`", "", "```python", f"@hookimpl\ndef {name}{sig}", "```", ""]
        if opts.get("firstresult"):
            lines += ["*First result wins: the call stops at the first implementation that returns non-None.*", ""]
        lines += [inspect.cleandoc(func.__doc__ or "(undocumented)"), ""]
    return "\n".join(lines)


def lifecycle_md() -> str:
    lines = [
        "# The lifecycles",
        "",
        "Generated from `blktx/states.py` by `python -m blktx.docgen`. Both machines are",
        "built from these tables and decide every step; `blktx graph TYPE` prints an action",
        "type's own, `blktx graph transaction` the transaction's.",
        "",
        "## The action lifecycle",
        "",
        "```mermaid",
        Lifecycle().mermaid().rstrip(),
        "```",
        "",
        "| trigger | from | to | why |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| `{t.trigger}` | {t.source} | {t.dest} | {t.why} |" for t in CORE_TRANSITIONS]
    lines += [
        "",
        "The tables of `blktx run`, `check` and `show` print an action's state in these",
        "words; `--json` and the journal keep the state's name.",
        "",
        "| state | printed |",
        "| --- | --- |",
        *(f"| {state} | {word} |" for state, word in ACTION_WORDS.items()),
        "",
        "## The transaction lifecycle",
        "",
        "The journal stores these states; `blktx run`, `recover`, `log`, `show`, `--json` and",
        "the exit status all derive from them through one table (`blktx/status.py`).",
        "",
        "```mermaid",
        TxLifecycle.mermaid().rstrip(),
        "```",
        "",
        "| state | outcome | exit status | committed | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {s.value} | {st.outcome} | {st.exit_status} | {'yes' if st.committed else 'no'} | {st.words} |"
        for s, st in STATUS.items()
    ]
    lines += ["", "| trigger | from | to | why |", "| --- | --- | --- | --- |"]
    lines += [f"| `{t.trigger}` | {t.source} | {t.dest} | {t.why} |" for t in TX_TRANSITIONS]
    return "\n".join(lines) + "\n"


def options_md() -> str:
    """The table of spec options, from their one declaration (``Options``)."""
    from dataclasses import fields

    from blktx.context import Options

    defaults = {f.name: f.default for f in fields(Options)}
    lines = ["| option | kind | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, opt in spec_options().items():
        allowed = (
            ", ".join(f"`{c}`" for c in opt.choices)
            if opt.choices
            else " to ".join(f"{v:g}" for v in (opt.minimum, opt.maximum) if v is not None)
        )
        if opt.minimum is not None and opt.maximum is None:
            allowed = f"≥ {opt.minimum:g}"
        lines.append(f"| `{name}` | {opt.kind} | `{defaults[name]!r}` | {allowed} | {opt.doc} |")
    return "\n".join(lines) + "\n"


def _between_markers(text: str, name: str, body: str) -> str:
    begin = text.index(f"<!-- {name}:begin")
    begin = text.index("-->", begin) + 3
    end = text.index(f"<!-- {name}:end -->")
    return text[:begin] + "\n" + body + text[end:]


def outputs(root: Path) -> dict[Path, str]:
    spec_readme = root / "specs" / "README.md"
    return {
        root / "docs" / "hooks.md": hooks_md(),
        root / "docs" / "lifecycle.md": lifecycle_md(),
        spec_readme: _between_markers(spec_readme.read_text(), "options", options_md()),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parent.parent
    stale = [path for path, text in outputs(root).items() if not path.exists() or path.read_text() != text]
    if "--check" in args:
        for path in stale:
            print(f"{path} is out of date: run python -m blktx.docgen", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs(root).items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
