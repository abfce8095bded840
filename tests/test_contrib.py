"""contrib/systemd: every command the units run is one blktx accepts."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from blktx.cli import build_parser

UNITS = sorted((Path(__file__).resolve().parent.parent / "contrib" / "systemd").glob("*"))


def commands(unit: Path) -> list[list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    found = []
    for section in parser.sections():
        for key, value in parser[section].items():
            if key.startswith("Exec"):
                # systemd splits $VAR into words: as /etc/blktx/web.env would set it
                value = value.replace("$BLKTX_RUN_ARGS", "--root /srv/vm --vm-root /run/vms")
                found.append(shlex.split(value.lstrip("-").replace("%i", "web")))
    return found


def test_there_are_a_service_and_a_timer_per_unit() -> None:
    names = {u.name for u in UNITS}
    assert {"blktx@.service", "blktx@.timer", "blktx-check@.service", "blktx-check@.timer"} <= names


@pytest.mark.parametrize("unit", [u for u in UNITS if u.suffix == ".service"], ids=lambda u: u.name)
def test_every_exec_line_parses_as_a_blktx_command(unit: Path) -> None:
    found = commands(unit)
    assert found, f"{unit.name} runs nothing"
    for argv in found:
        assert argv[0].endswith("/blktx"), argv
        build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown option


def test_the_service_recovers_runs_then_prunes_the_same_spec() -> None:
    (recover, run, prune) = commands(Path(UNITS[0]).parent / "blktx@.service")
    assert recover[1] == "recover" and run[1] == "run" and prune[1] == "prune"
    assert run[-1] == prune[prune.index("--spec") + 1] == "/etc/blktx/web.toml"
