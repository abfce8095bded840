"""The example plugin package installs into a fresh virtual environment next to blktx,
is found, listed, and passes its own tests there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "blktx-plugin-example"


def test_example_plugin_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # system site packages give blktx's own dependencies without a download
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(EXAMPLE)], check=True, capture_output=True
    )
    where = subprocess.run(
        [py, "-c", "import blktx_file_snapshot; print(blktx_file_snapshot.__file__)"], capture_output=True, text=True, check=True
    ).stdout
    assert where.startswith(str(venv)), f"the venv's own install is used, not {where}"
    listed = subprocess.run([py, "-m", "blktx.cli", "types", "--json"], capture_output=True, text=True, check=True)
    types = {t["name"]: t for t in json.loads(listed.stdout)["types"]}
    assert types["file.snapshot"]["plugin"] == "file"
    tests = subprocess.run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")], capture_output=True, text=True, cwd=tmp_path
    )
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert " passed" in tests.stdout.splitlines()[-1]
