"""Message buffers: memory below the threshold, a private file beyond it, never left over."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relate_smtp.handlers.parsing import SpooledMessage
from relate_smtp.runtime.spool import PREFIX, Spool


def test_a_small_message_stays_in_memory(tmp_path: Path) -> None:
    buffer = Spool(str(tmp_path), threshold=100).buffer()
    buffer.append(b"a" * 60)
    buffer.append(b"b" * 40)
    assert buffer.finish() == b"a" * 60 + b"b" * 40
    assert list(tmp_path.iterdir()) == []


def test_a_large_message_goes_to_a_private_file(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        buffer = Spool(str(tmp_path), threshold=100).buffer()
        buffer.append(b"a" * 60)
        buffer.append(b"b" * 60)
        buffer.append(b"c" * 10)
    finally:
        os.umask(old)
    message = buffer.finish()
    assert isinstance(message, SpooledMessage) and message.size == 130
    path = Path(message.path)
    assert path.parent == tmp_path and path.name.startswith(f"{PREFIX}{os.getpid()}-")
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == b"a" * 60 + b"b" * 60 + b"c" * 10
    buffer.discard()
    assert not path.exists()
    buffer.discard()  # twice is fine


def test_discard_mid_message_removes_the_file(tmp_path: Path) -> None:
    buffer = Spool(str(tmp_path), threshold=10).buffer()
    buffer.append(b"x" * 50)
    assert len(list(tmp_path.iterdir())) == 1
    buffer.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_spool_that_cannot_be_written_marks_the_message_failed(tmp_path: Path) -> None:
    buffer = Spool(str(tmp_path / "missing"), threshold=10).buffer()
    buffer.append(b"x" * 50)
    buffer.append(b"y" * 50)
    assert buffer.failed and buffer.size == 100


@pytest.mark.skipif(sys.platform != "linux", reason="pids of exited processes")
def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = tmp_path / f"{PREFIX}{done.stdout.strip()}-abc"
    mine = tmp_path / f"{PREFIX}{os.getpid()}-def"
    parent = tmp_path / f"{PREFIX}{os.getppid()}-ghi"
    other = tmp_path / "unrelated-file"
    for path in (dead, mine, parent, other):
        path.write_bytes(b"x")
    assert Spool(str(tmp_path), threshold=10).remove_leftovers() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (mine, parent, other)
    )
