"""SQLite as every part of the cloud opens it: autocommit (transactions are
explicit), WAL so readers never block the writer, synchronous=FULL so a
committed row survives a power cut, usable from the thread that a paho
callback runs on."""

import sqlite3


def connect(path, timeout_s=10):
    db = sqlite3.connect(path, isolation_level=None, timeout=timeout_s, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def atomic(db, fn):
    """fn() in one transaction: a row and the rows that go with it (its audit
    row, its actions) land together or not at all."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result
