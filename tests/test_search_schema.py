"""The index database's WAL switch while another process holds the new database (the two-creators race)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from clip.search.schema import _use_wal


def test_wal_switch_waits_for_a_creator_holding_the_database(tmp_path):
    db = tmp_path / "index.sqlite"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # as another process creating the index
    other = sqlite3.connect(db, isolation_level=None, timeout=0.2)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("PRAGMA journal_mode=WAL")  # the busy timeout alone does not get past it
    timer = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    timer.start()
    _use_wal(other, wait_s=10)
    timer.join()
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    _use_wal(other, wait_s=0)  # already WAL: nothing to change, nothing to wait for
