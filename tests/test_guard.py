"""One process at a time in a run folder, and worker processes that do not outlive their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from genspec.errors import RunError
from genspec.train.guard import LOCK_FILE, folder_lock
from spec_helpers import cli_in_process as run_cli

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "specs" / "quickstart.yaml"
FAST = ["train.device=cpu", "data.split.train=64", "data.split.test=32", "train.batch_size=16",
        "train.max_steps=2", "train.epochs=1", "evaluate.grids=[]"]


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from genspec.train.guard import folder_lock
        with folder_lock(Path({str(folder)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_kept_out_of_a_run_folder(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_FILE}
    holder = hold_lock(out)
    try:
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST))
        assert rc == 1 and f"pid {holder.pid}" in err and "is in use" in err and "Traceback" not in err
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--resume", *sets(FAST))
        assert rc == 1 and "is in use" in err
    finally:
        holder.kill()
        holder.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_FILE} == before
    # the kernel dropped the dead holder's lock: no stale lock to clear by hand
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST))
    assert rc == 0, err


def test_the_lock_is_held_for_the_block_only(tmp_path):
    folder = tmp_path / "a"
    with folder_lock(folder):
        (folder / "x").write_text("1")
        assert (folder / LOCK_FILE).read_text() == str(os.getpid())
    with folder_lock(folder):  # released: taken again at once
        pass
    assert [p.name for p in folder.iterdir()] == ["x"]  # the lock file goes with the lock


def test_a_failed_run_in_a_new_folder_leaves_no_folder(tmp_path):
    out = tmp_path / "never"
    rc, _, err = run_cli("run", ROOT / "specs" / "mnist_vae.yaml", "--out", out, "--no-progress",
                         *sets(["data.root=/nonexistent", "train.epochs=1"]))
    assert rc == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    """A parent killed outright (no Ctrl-C to handle) takes its watched child with it."""
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import multiprocessing, time
        def child(path):
            import os, time
            from genspec.train.guard import exit_with_parent
            exit_with_parent(poll_s=0.05)
            open(path, "w").write(str(os.getpid()))
            time.sleep(600)
        if __name__ == "__main__":
            p = multiprocessing.get_context("spawn").Process(target=child, args=({str(pid_file)!r},))
            p.start()
            time.sleep(600)
    """)
    script = tmp_path / "parent.py"  # spawn pickles `child` by reference: it needs a file
    script.write_text(code)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT)
    try:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(child, 0)  # alive
        parent.kill()
        parent.wait()
        for _ in range(200):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child outlived its parent by 10 s")
    finally:
        parent.kill()


def test_a_second_tuning_is_kept_out_of_a_tune_folder(tmp_path):
    out = tmp_path / "tune"
    holder = hold_lock(out)
    try:
        rc, _, err = run_cli("tune", ROOT / "specs" / "beta_vae_digits.yaml", "--param", "beta", "--trials", "1",
                             "--out", out, "--no-progress", "--set", "train.epochs=1")
    finally:
        holder.kill()
        holder.wait()
    assert rc == 1 and "is in use" in err and "its tuning there" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing of a tuning was written
