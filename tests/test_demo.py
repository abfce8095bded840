from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemu_helpers import needs_qemu_img, snapshots

from blktx.cli import main


@needs_qemu_img
def test_demo_commits_then_rolls_back_leaving_the_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path / "d"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["outcome"] for r in out["results"]] == ["committed", "rolled back"]
    assert out["rollback_left_world_unchanged"] is True
    states = out["states"]
    assert states["initial"]["snapshots"]["vm1-disk0.qcow2"] == ["weekly"]
    assert states["commit.toml"]["snapshots"]["vm1-disk0.qcow2"] == ["nightly"]
    assert states["commit.toml"]["vm2-disk0"] == "vm2-disk0.nightly.qcow2"
    assert states["commit.toml"]["data"] == states["initial"]["data"], "snapshots change no guest data"
    assert [n for _, n in snapshots(tmp_path / "d" / "vm1-disk1.qcow2")] == ["nightly"]
    # a second demo run remakes its own directory
    assert main(["demo", "--dir", str(tmp_path / "d"), "--json"]) == 0


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "precious.txt").write_text("keep")
    assert main(["demo", "--dir", str(tmp_path)]) == 2
    assert "is not a blktx demo directory" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep"
