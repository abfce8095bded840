"""Several processes run random overlapping specs on real qcow2 images, some are
killed at random, recovers run in between: afterwards the world equals some serial
order of the committed runs, and no committed snapshot is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from qemu_helpers import make_image, needs_qemu_img, snapshots

from blktx.journal import SqliteJournal
from blktx.locks import Locker

DEVICES = 4
IMAGES = 3


def spec_for(run: int, devices: list[int], images: list[int]) -> str:
    lines = ["version = 1"]
    for d in devices:
        lines += ["[[action]]", 'type = "qcow2.external-create"', f'device = "dev{d}"', f'overlay = "ov-{run}-{d}.qcow2"']
    for i in images:
        lines += ["[[action]]", 'type = "qcow2.internal-create"', f'image = "img{i}.qcow2"', f'name = "s{run}"']
    return "\n".join(lines) + "\n"


def chain_of(folder: Path, device: str) -> list[str]:
    """The overlays from the device's active image down to its base, by file name."""
    out = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-U", str(folder / device)],
        capture_output=True,
        text=True,
        check=True,
    )
    names = [os.path.basename(os.path.realpath(folder / device))]
    names += [os.path.basename(i["backing-filename"]) for i in json.loads(out.stdout) if "backing-filename" in i]
    return names


def acyclic(edges: set[tuple[int, int]], nodes: set[int]) -> bool:
    incoming = {n: {a for a, b in edges if b == n} for n in nodes}
    done: set[int] = set()
    while len(done) < len(nodes):
        ready = [n for n in nodes - done if incoming[n] <= done]
        if not ready:
            return False
        done.update(ready)
    return True


@needs_qemu_img
def test_concurrent_runs_kills_and_recovers_equal_a_serial_order(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    for d in range(DEVICES):
        make_image(folder / f"base{d}.qcow2", size="1M")
        os.symlink(f"base{d}.qcow2", folder / f"dev{d}")
    for i in range(IMAGES):
        make_image(folder / f"img{i}.qcow2", size="1M")
    journals = [tmp_path / "j0.sqlite", tmp_path / "j1.sqlite"]  # whichever journal: one set of locks
    rng = random.Random(20261127)
    plans: dict[int, tuple[list[int], list[int]]] = {}
    txids: dict[int, str] = {}
    run = 0
    exits: dict[int, int] = {}
    for _round in range(4):
        procs = []
        for _ in range(4):
            run += 1
            devices = sorted(rng.sample(range(DEVICES), rng.randint(1, 3)))
            images = sorted(rng.sample(range(IMAGES), rng.randint(0, 2)))
            plans[run] = (devices, images)
            (folder / f"r{run}.toml").write_text(spec_for(run, devices, images))
            args = [sys.executable, "-m", "blktx", "run", "--json", "--journal", str(journals[run % 2])]
            if rng.random() < 0.5:
                args += ["--wait", "20"]
            procs.append(
                (
                    run,
                    subprocess.Popen(
                        [*args, str(folder / f"r{run}.toml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                    ),
                )
            )
        for n, proc in procs:
            if rng.random() < 0.35:
                time.sleep(rng.uniform(0.05, 0.6))
                proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode in (0, 1, 2, -signal.SIGKILL), f"run {n}: {proc.returncode} {out} {err}"
            exits[n] = proc.returncode
            if out.strip():
                txids[n] = json.loads(out)["txid"]
        if rng.random() < 0.7:  # a recover between rounds, on one journal or both
            for journal in journals[: rng.randint(1, 2)]:
                subprocess.run(
                    [sys.executable, "-m", "blktx", "recover", "--journal", str(journal)], capture_output=True, check=False
                )
    for journal in journals:
        done = subprocess.run(
            [sys.executable, "-m", "blktx", "recover", "--json", "--journal", str(journal)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert Locker().claims() == [], "every claim is released once all is recovered"

    committed: set[int] = set()
    statuses = {}
    for journal in journals:
        for tx in SqliteJournal(str(journal)).transactions(limit=1000):
            assert tx["status"] in ("DONE", "ABORTED"), tx
            run_no = int(Path(tx["file"]).stem[1:])
            statuses[run_no] = tx["status"]
            if tx["status"] == "DONE":
                committed.add(run_no)
    counts = {code: list(exits.values()).count(code) for code in (0, 2, -signal.SIGKILL)}
    assert all(counts.values()), f"the mix covers commits, lock refusals and kills: {counts}"
    assert committed >= {n for n, code in exits.items() if code == 0}

    edges: set[tuple[int, int]] = set()
    for d in range(DEVICES):
        chain = chain_of(folder, f"dev{d}")
        assert chain[-1] == f"base{d}.qcow2"
        overlays = [int(name.split("-")[1]) for name in chain[:-1]]
        expected = {r for r in committed if d in plans[r][0]}
        assert set(overlays) == expected, f"dev{d}: chain {chain}, committed runs on it {sorted(expected)}"
        assert len(overlays) == len(set(overlays))
        # newest first in the chain: each later overlay sits on the earlier one
        edges |= {(overlays[k + 1], overlays[k]) for k in range(len(overlays) - 1)}
        for name in os.listdir(folder):
            if name.startswith("ov-") and name.endswith(f"-{d}.qcow2"):
                assert int(name.split("-")[1]) in committed, f"{name} of an uncommitted run is left"
    assert acyclic(edges, committed), "no serial order of the committed runs explains every chain"
    for i in range(IMAGES):
        names = sorted(n for _, n in snapshots(folder / f"img{i}.qcow2"))
        assert names == sorted(f"s{r}" for r in committed if i in plans[r][1]), f"img{i}"
