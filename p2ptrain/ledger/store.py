"""The peer's own copy of the ledger: one append-only SQLite file (WAL) under its run directory.

Rows hold each record's JSON text verbatim plus a few columns copied out of it for ordering and lookup.
``records()`` returns them in one canonical order -- (epoch, signer, seq) -- so two peers holding the same
records hold the same ledger, whatever order the records reached them in. Triggers refuse UPDATE and
DELETE; ``verify`` (audit.py) re-checks everything from the JSON text anyway, since anyone can edit a file.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from p2ptrain.errors import UserError
from p2ptrain.ledger.records import RUN_ID_RE, Record, RecordError, bulk, from_json

logger = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    kind TEXT NOT NULL,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_order ON records (epoch, public_key, seq);
CREATE INDEX IF NOT EXISTS records_chain ON records (public_key, seq);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


def default_ledger_path(home: Path, run_id: str, identity_name: str) -> Path:
    """Where a peer of run ``run_id`` keeps its ledger: ``<home>/runs/<run_id>/<peer name>/ledger.sqlite``.

    Raises:
        UserError: for a run id that records cannot carry (it also keeps the path inside ``home``).
    """
    if RUN_ID_RE.fullmatch(run_id) is None:
        raise UserError(f"run id {run_id!r} cannot name a ledger: use 1-64 letters, digits, '_', '.', '-' "
                        f"(starting with a letter or digit)")
    return Path(home) / "runs" / run_id / identity_name / "ledger.sqlite"


class Ledger:
    """An append-only ledger file.

    Args:
        path: the SQLite file. Its directory must exist.
        create: make a new ledger when ``path`` does not exist (a peer); ``False`` for readers (the CLI).
        run_id: the run this ledger belongs to; stored on first use and checked on every later open.

    Raises:
        UserError: (exit code 2) when the file is missing, unreadable, not a ledger or of another run.
    """

    def __init__(self, path: Path | str, *, create: bool = True, run_id: str | None = None):
        self.path = Path(path)
        # one connection, shared by the training loop and a publishing thread: transactions must not interleave
        self._lock = threading.RLock()
        if not self.path.parent.is_dir():
            raise UserError(f"cannot open ledger {self.path}: directory {self.path.parent} does not exist")
        exists = self.path.exists()
        if not exists and not create:
            raise UserError(f"no ledger at {self.path} (pass --ledger PATH, or run a peer first)")
        if exists:
            _check_magic(self.path)
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 10000")
            if create:
                self._db.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL mode never fsyncs on commit, only at checkpoints: a committed record survives a
                # crash or kill -9 of the process (it is in the WAL file); a power cut may lose the last few
                # records but never corrupts the file or a chain. FULL would add an fsync (~ms) to every round.
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.executescript(_SCHEMA)
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"meta", "records"} <= tables:
                raise UserError(f"{self.path} is not a p2ptrain ledger (it is an SQLite file without ledger tables)")
            stored = self._db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise UserError(f"cannot read ledger {self.path}: {e} (the file is damaged or not a ledger)") from e
        except UserError:
            self._close_quietly()
            raise
        self.run_id: str | None = stored[0] if stored else None
        if run_id is not None and self.run_id is not None and run_id != self.run_id:
            self._close_quietly()
            raise UserError(f"ledger {self.path} belongs to run {self.run_id!r}, not {run_id!r}")
        if run_id is not None and self.run_id is None and create:
            self._execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('run_id', ?)", (run_id,))
            self.run_id = run_id

    # ---- writing -----------------------------------------------------------------------------------------

    def append(self, record: Record) -> None:
        """Append one of this peer's own freshly signed records (one transaction, ~0.1 ms)."""
        self._check_run(record)
        row = _row(record)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO records (hash, public_key, seq, epoch, kind, json) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", row)
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                self._rollback_quietly()
                raise ValueError(f"record {record.hash[:12]} is already in the ledger") from e
            except sqlite3.DatabaseError as e:
                self._rollback_quietly()
                raise UserError(f"cannot write ledger {self.path}: {e}") from e

    def add_verified(self, records: Iterable[Record]) -> int:
        """Add records received from other peers: those whose signature verifies and that belong to this run.

        Records already present are skipped; everything is added in one transaction.

        Returns:
            how many records were new.
        """
        rows = []
        for record in records:
            if not record.verify():
                logger.warning(f"dropping {record.kind} {record.hash[:12]}: its signature does not verify")
            elif self.run_id is not None and record.run_id != self.run_id:
                logger.warning(f"dropping {record.kind} {record.hash[:12]} of run {record.run_id!r}")
            else:
                rows.append(_row(record))
        return self._insert_all(rows)

    def import_jsonl(self, path: Path | str) -> tuple[int, int]:
        """Add every record of a JSONL file, all or nothing.

        Every line must be a valid record of this ledger's run whose signature verifies; otherwise nothing is
        added and :class:`UserError` names the first bad line.

        Returns:
            (records added, records already present)
        """
        records = read_jsonl(path)
        for number, record in enumerate(records, 1):
            if not record.verify():
                raise UserError(f"{path} line {number}: the {record.kind}'s signature does not verify; "
                                "nothing imported")
            if self.run_id is not None and record.run_id != self.run_id:
                raise UserError(f"{path} line {number}: record of run {record.run_id!r}, this ledger is run "
                                f"{self.run_id!r}; nothing imported")
        if self.run_id is None and records:
            runs = {record.run_id for record in records}
            if len(runs) > 1:
                raise UserError(f"{path} mixes records of runs {sorted(runs)}; nothing imported")
        added = self._insert_all([_row(record) for record in records],
                                 run_id=records[0].run_id if records and self.run_id is None else None)
        return added, len(records) - added

    def _insert_all(self, rows: list[tuple], run_id: str | None = None) -> int:
        with self._lock:
            return self._insert_all_locked(rows, run_id)

    def _insert_all_locked(self, rows: list[tuple], run_id: str | None) -> int:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            if run_id is not None:
                self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('run_id', ?)", (run_id,))
            cursor = self._db.executemany("INSERT OR IGNORE INTO records (hash, public_key, seq, epoch, kind, json) "
                                          "VALUES (?, ?, ?, ?, ?, ?)", rows)
            added = max(cursor.rowcount, 0)  # rows actually inserted; ignored duplicates do not count
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            self._rollback_quietly()
            raise UserError(f"cannot write ledger {self.path}: {e}; nothing was added") from e
        if run_id is not None:
            self.run_id = run_id
        return added

    # ---- reading -----------------------------------------------------------------------------------------

    def records(self) -> list[Record]:
        """Every record, in canonical order (epoch, signer, seq).

        Raises:
            UserError: when a row does not hold a valid record (the file was damaged or edited).
        """
        return [record for record, _ in self.entries()]

    def entries(self) -> list[tuple[Record, str]]:
        """Like :meth:`records`, each with where it is stored (``"row N"``) for error messages."""
        rows = self._query("SELECT id, json FROM records ORDER BY epoch, public_key, seq, id")
        out = []
        with bulk():
            for row_id, text in rows:
                try:
                    out.append((from_json(text), f"row {row_id}"))
                except RecordError as e:
                    raise UserError(f"ledger {self.path} row {row_id} is not a valid record: {e}") from None
        return out

    def last_record(self, public_key: bytes) -> Record | None:
        """The record with the highest ``seq`` signed by ``public_key`` (the head of its chain), if any."""
        rows = self._query("SELECT id, json FROM records WHERE public_key = ? ORDER BY seq DESC, id DESC LIMIT 1",
                           (public_key.hex(),))
        if not rows:
            return None
        try:
            return from_json(rows[0][1])
        except RecordError as e:
            raise UserError(f"ledger {self.path} row {rows[0][0]} is not a valid record: {e}") from None

    def chain_tail(self, public_key: bytes, count: int) -> list[Record]:
        """The last ``count`` records signed by ``public_key``, in chain order."""
        rows = self._query("SELECT id, json FROM records WHERE public_key = ? ORDER BY seq DESC, id DESC LIMIT ?",
                           (public_key.hex(), count))
        try:
            return [from_json(text) for _, text in reversed(rows)]
        except RecordError as e:
            raise UserError(f"ledger {self.path}: a record of this peer is not valid: {e}") from None

    def last_hash(self, public_key: bytes) -> str | None:
        last = self.last_record(public_key)
        return None if last is None else last.hash

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM records")[0][0]

    def export_jsonl(self, path: Path | str) -> int:
        """Write every record as one JSON line, in canonical order, atomically (temp file + rename).

        The file carries each record's public key and signature, so anyone can verify it offline.

        Returns:
            the number of records written.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise UserError(f"cannot export to {path}: directory {path.parent} does not exist")
        records = self.records()
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="ascii") as f:
                for record in records:
                    f.write(record.to_json() + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from e
        return len(records)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers -----------------------------------------------------------------------------------------

    def _check_run(self, record: Record) -> None:
        if self.run_id is not None and record.run_id != self.run_id:
            raise ValueError(f"record of run {record.run_id!r} cannot go into the ledger of run {self.run_id!r}")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            raise UserError(f"cannot read ledger {self.path}: {e} (the file is damaged)") from e

    def _execute(self, sql: str, params: tuple = ()) -> None:
        try:
            with self._lock:
                self._db.execute(sql, params)
        except sqlite3.DatabaseError as e:
            raise UserError(f"cannot write ledger {self.path}: {e}") from e

    def _rollback_quietly(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _close_quietly(self) -> None:
        try:
            self._db.close()
        except (sqlite3.Error, AttributeError):
            pass


def _row(record: Record) -> tuple:
    return record.hash, record.public_key.hex(), record.seq, record.epoch, record.kind, record.to_json()


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise UserError(f"cannot read ledger {path}: {e.strerror}") from e
    if head and head != SQLITE_MAGIC:
        raise UserError(f"{path} is not a p2ptrain ledger (not an SQLite file; for a JSONL export use "
                        f"'p2ptrain ledger import' or 'verify FILE.jsonl')")


def is_sqlite(path: Path) -> bool:
    """True when ``path`` starts like an SQLite database (how the CLI tells a ledger from a JSONL file)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def read_jsonl(path: Path | str) -> list[Record]:
    """Parse a JSONL ledger file strictly: every non-empty line must be one record.

    Raises:
        UserError: naming the file and line of the first problem (a missing file, a line that is not a record,
            an unknown schema version, a truncated last line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    lines = data.split(b"\n")
    records = []
    with bulk():
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(from_json(line))
            except RecordError as e:
                hint = " (the file looks truncated)" if number == len(lines) and not data.endswith(b"\n") else ""
                raise UserError(f"{path} line {number}: {e}{hint}") from None
    return records
