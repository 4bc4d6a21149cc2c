"""The history database: every run, every domain result, every disk, in one SQLite file.

Where it lives: ``--db FILE``; else ``$VMTRIM_HISTORY_DB``; else
``/var/lib/vmtrim/history.db`` for root, ``$XDG_STATE_HOME/vmtrim/history.db``
(``~/.local/state/...``) for anyone else.

How it is written:

- WAL journal, ``synchronous=NORMAL``: a killed writer (SIGKILL, OOM) never leaves a
  half-written transaction; readers (``vmtrim history``, the metrics) never block it.
- A run row is committed when the run starts (``ended`` NULL) and closed when it ends;
  each domain's result, with all its disks, is **one transaction**. A run killed in
  the middle of a domain keeps every earlier domain and loses only the one in flight.
- ``PRAGMA user_version`` is the schema version. :data:`MIGRATIONS` holds one step per
  version; opening a database applies the steps above its version, in one
  transaction each. A database written by a newer vmtrim is refused, not guessed at.
- A database that is corrupt, not a database, or locked longer than ``busy_timeout``
  raises :class:`~vmtrim.errors.HistoryUnavailable` (exit 3, one line).

Schema (version 1). Times are UNIX seconds (UTC, REAL); sizes are bytes (INTEGER);
NULL means "not measured" or "not known", never 0::

    runs                       one invocation of run / trim / verify, or one watch event
      id            INTEGER PRIMARY KEY
      kind          TEXT    'run' | 'trim' | 'verify' | 'watch'
      started       REAL    when it began
      ended         REAL    when it finished; NULL while running or if it was killed
      host          TEXT    socket.gethostname() of the host that ran it
      policy_hash   TEXT    sha256 (16 hex digits) of the effective policy; NULL for trim/verify
      version       TEXT    vmtrim version
      trigger       TEXT    why it ran: 'policy', 'command line', or the libvirt event (watch)

    domain_results             one domain (or one verify cell) in one run
      id            INTEGER PRIMARY KEY
      run_id        INTEGER REFERENCES runs(id)
      domain        TEXT    libvirt domain name (a verify cell: bus/format/mode/discard/fs)
      uuid          TEXT    libvirt UUID, when known
      uri           TEXT    libvirt connection URI, when known
      status        TEXT    'trimmed' | 'no_effect' | 'skipped' | 'blocked' | 'failed'
      reason        TEXT    why it was skipped, blocked or failed (or a note), else NULL
      blocking_layer TEXT   for 'blocked': the audit layer (device, block_node, host_storage)
      started       REAL
      seconds       REAL    wall time of this domain
      agent_seconds REAL    of which waiting for the guest's fstrim
      guest_trimmed INTEGER sum of guest-fstrim's per-path "trimmed" (an upper bound)
      reclaimed     INTEGER sum over disks of allocated_before - allocated_after

    disk_results               one disk of one domain result
      id                INTEGER PRIMARY KEY
      result_id         INTEGER REFERENCES domain_results(id)
      target            TEXT    guest-visible target (sda, vdb)
      source            TEXT    host path, device or protocol URL
      virtual_size      INTEGER the disk's capacity as the guest sees it
      allocated_before  INTEGER host allocation before the trim (du, or libvirt blockInfo)
      allocated_after   INTEGER host allocation after the trim
      reclaimed         INTEGER allocated_before - allocated_after
      guest_trimmed     INTEGER what the guest said it trimmed on this disk's filesystems
      guest_used        INTEGER used-bytes of the guest filesystems on this disk
      reclaimable_before INTEGER estimate before the trim: allocated_before - guest_used
      reclaimable_after INTEGER estimate of what is still reclaimable: allocated_after - guest_used
                              (for a disk not trimmed: allocated_before - guest_used)
      reclaimable_note  TEXT    why there is no estimate, when there is none
      unmap_bytes       INTEGER QMP query-blockstats delta, when QMP was used
      unmap_operations  INTEGER
      verdict           TEXT    audit verdict of the discard path below the guest filesystem
                              (guest driver, device, block node, host): 'pass' | 'unknown' |
                              'block'; the guest fs layer is left out, a host trim covers it
      blocking_layer    TEXT    the first layer that blocks discard, if any
      blocking_reason   TEXT    that layer's reason
      measured_by       TEXT    'du' | 'blockInfo' | 'qemu-img'
      error             TEXT    why a measurement failed

    domain_totals              (version 2) one row per domain and side, kept by triggers
      domain        TEXT
      fleet         INTEGER 1 for kinds run/trim/watch, 0 for verify cells
      runs          INTEGER how many results
      total_reclaimed INTEGER sum of domain_results.reclaimed
      first_started REAL
      last_started  REAL
      last_result_id INTEGER the domain_results row of the latest result (status, reason...)

    disk_results, version 3 adds (NULL in the rows written before):
      pool              TEXT    the dm-thin pool under the disk (vg/lv), when there is one
      pool_discards     TEXT    its discard mode: passdown | nopassdown | ignore
      pool_used_before  INTEGER the pool's used data bytes before the trim (dmsetup status)
      pool_used_after   INTEGER and after
      pool_percent_before REAL  the pool's data_percent before the trim (lvs)
      pool_percent_after REAL   and after
      causes            TEXT    trim --explain's causes for this disk: a JSON array of
                              {"id", "disk", "evidence", "facts"}; NULL: not explained

Fleet views (``vmtrim history``, metrics, the report) read kinds run, trim and watch;
verify cells are kept apart by ``runs.kind = 'verify'`` (``domain_totals.fleet = 0``).

Version 2 adds ``domain_totals`` (filled from the existing rows when a version-1
database is opened) and an index on ``domain_results(started)``: a summary of a year
of a thousand domains reads a thousand rows, not 365,000. Triggers on
``domain_results`` keep it right for any writer, this module or plain SQL; a
deleted result recomputes its domain's rows.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmtrim import __version__
from vmtrim.errors import HistoryUnavailable

SCHEMA_VERSION = 3
#: A reader (``create=False``) reads a database from this version on as it is: the later
#: steps only add columns, which are NULL for the rows written before them.
READABLE_FROM = 2
KINDS = ("run", "trim", "verify", "watch", "sparsify")
FLEET_KINDS = ("run", "trim", "watch")
STATUSES = ("trimmed", "no_effect", "skipped", "blocked", "failed")
BUSY_TIMEOUT_MS = 5000

_V1 = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    host TEXT NOT NULL,
    policy_hash TEXT,
    version TEXT NOT NULL,
    trigger TEXT
);
CREATE TABLE domain_results (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    domain TEXT NOT NULL,
    uuid TEXT,
    uri TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    blocking_layer TEXT,
    started REAL NOT NULL,
    seconds REAL NOT NULL,
    agent_seconds REAL,
    guest_trimmed INTEGER,
    reclaimed INTEGER
);
CREATE INDEX domain_results_domain ON domain_results(domain, started);
CREATE INDEX domain_results_run ON domain_results(run_id);
CREATE TABLE disk_results (
    id INTEGER PRIMARY KEY,
    result_id INTEGER NOT NULL REFERENCES domain_results(id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    source TEXT,
    virtual_size INTEGER,
    allocated_before INTEGER,
    allocated_after INTEGER,
    reclaimed INTEGER,
    guest_trimmed INTEGER,
    guest_used INTEGER,
    reclaimable_before INTEGER,
    reclaimable_after INTEGER,
    reclaimable_note TEXT,
    unmap_bytes INTEGER,
    unmap_operations INTEGER,
    verdict TEXT,
    blocking_layer TEXT,
    blocking_reason TEXT,
    measured_by TEXT,
    error TEXT
);
CREATE INDEX disk_results_result ON disk_results(result_id);
"""


_TOTALS_OF = """
    SELECT r.domain, runs.kind != 'verify' AS side, COUNT(*), COALESCE(SUM(r.reclaimed), 0),
        MIN(r.started), MAX(r.started),
        (SELECT r2.id FROM domain_results r2 JOIN runs k ON k.id = r2.run_id
         WHERE r2.domain = r.domain AND (k.kind != 'verify') = (runs.kind != 'verify')
         ORDER BY r2.started DESC, r2.id DESC LIMIT 1)
    FROM domain_results r JOIN runs ON runs.id = r.run_id
"""

_V2 = f"""
CREATE TABLE domain_totals (
    domain TEXT NOT NULL,
    fleet INTEGER NOT NULL,
    runs INTEGER NOT NULL,
    total_reclaimed INTEGER NOT NULL,
    first_started REAL NOT NULL,
    last_started REAL NOT NULL,
    last_result_id INTEGER NOT NULL,
    PRIMARY KEY (domain, fleet)
) WITHOUT ROWID;
CREATE INDEX domain_results_started ON domain_results(started);
INSERT INTO domain_totals {_TOTALS_OF} GROUP BY r.domain, side;
CREATE TRIGGER domain_totals_insert AFTER INSERT ON domain_results
BEGIN
    INSERT INTO domain_totals (domain, fleet, runs, total_reclaimed, first_started,
        last_started, last_result_id)
    VALUES (NEW.domain, (SELECT kind != 'verify' FROM runs WHERE id = NEW.run_id), 1,
        COALESCE(NEW.reclaimed, 0), NEW.started, NEW.started, NEW.id)
    ON CONFLICT (domain, fleet) DO UPDATE SET
        runs = runs + 1,
        total_reclaimed = total_reclaimed + excluded.total_reclaimed,
        first_started = MIN(first_started, excluded.first_started),
        last_result_id = CASE WHEN excluded.last_started >= last_started
            THEN excluded.last_result_id ELSE last_result_id END,
        last_started = MAX(last_started, excluded.last_started);
END;
CREATE TRIGGER domain_totals_delete AFTER DELETE ON domain_results
BEGIN
    DELETE FROM domain_totals WHERE domain = OLD.domain;
    INSERT INTO domain_totals {_TOTALS_OF} WHERE r.domain = OLD.domain GROUP BY r.domain, side;
END;
"""


def _script(sql: str) -> Callable[[sqlite3.Connection], None]:
    # Not executescript(): it commits on its own, and a step must be one transaction.
    def step(db: sqlite3.Connection) -> None:
        statement = ""
        for line in sql.splitlines(keepends=True):
            statement += line
            # complete_statement: a trigger's inner ';' does not end the CREATE TRIGGER.
            if sqlite3.complete_statement(statement):
                db.execute(statement)
                statement = ""
        assert not statement.strip(), statement

    return step


_V3 = """
ALTER TABLE disk_results ADD COLUMN pool TEXT;
ALTER TABLE disk_results ADD COLUMN pool_discards TEXT;
ALTER TABLE disk_results ADD COLUMN pool_used_before INTEGER;
ALTER TABLE disk_results ADD COLUMN pool_used_after INTEGER;
ALTER TABLE disk_results ADD COLUMN pool_percent_before REAL;
ALTER TABLE disk_results ADD COLUMN pool_percent_after REAL;
ALTER TABLE disk_results ADD COLUMN causes TEXT;
"""

# MIGRATIONS[n] takes a database from user_version n to n + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _script(_V1),
    _script(_V2),
    _script(_V3),
]
assert len(MIGRATIONS) == SCHEMA_VERSION


@dataclass
class DiskRecord:
    """One disk of one domain result; field names are the disk_results columns."""

    target: str
    source: str | None = None
    virtual_size: int | None = None
    allocated_before: int | None = None
    allocated_after: int | None = None
    guest_trimmed: int | None = None
    guest_used: int | None = None
    reclaimable_before: int | None = None
    reclaimable_after: int | None = None
    reclaimable_note: str | None = None
    unmap_bytes: int | None = None
    unmap_operations: int | None = None
    verdict: str | None = None
    blocking_layer: str | None = None
    blocking_reason: str | None = None
    measured_by: str | None = None
    error: str | None = None
    pool: str | None = None
    pool_discards: str | None = None
    pool_used_before: int | None = None
    pool_used_after: int | None = None
    pool_percent_before: float | None = None
    pool_percent_after: float | None = None
    causes: str | None = None  # JSON array, as stored

    @property
    def reclaimed(self) -> int | None:
        if self.allocated_before is None or self.allocated_after is None:
            return None
        return self.allocated_before - self.allocated_after

    @property
    def pool_reclaimed(self) -> int | None:
        if self.pool_used_before is None or self.pool_used_after is None:
            return None
        return self.pool_used_before - self.pool_used_after


@dataclass
class DomainRecord:
    """One domain's result in a run, with its disks."""

    domain: str
    status: str
    reason: str | None = None
    uuid: str | None = None
    uri: str | None = None
    blocking_layer: str | None = None
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    agent_seconds: float | None = None
    guest_trimmed: int | None = None
    disks: list[DiskRecord] = field(default_factory=list)

    @property
    def reclaimed(self) -> int | None:
        values = [d.reclaimed for d in self.disks if d.reclaimed is not None]
        return sum(values) if values else None


def default_db_path() -> Path:
    """$VMTRIM_HISTORY_DB, else /var/lib/vmtrim/history.db (root) or the XDG state dir."""
    override = os.environ.get("VMTRIM_HISTORY_DB")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/vmtrim/history.db")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vmtrim" / "history.db"


def _unavailable(path: Path, exc: BaseException) -> HistoryUnavailable:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        text = f"{text} (another process is writing to it)"
    return HistoryUnavailable(f"history database: {text}", subject=str(path))


class History:
    """An open history database. Use :meth:`open`; every failure is HistoryUnavailable."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        create: bool = True,
        busy_timeout: float = BUSY_TIMEOUT_MS / 1000,
    ) -> History:
        """Open (and with ``create``, create and migrate) the database at ``path``.

        ``busy_timeout``: how long a write waits for another writer before giving up.
        """
        where = Path(path) if path is not None else default_db_path()
        if not create and not where.exists():
            raise HistoryUnavailable("no history database here yet", subject=str(where))
        try:
            if create:
                where.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            db = sqlite3.connect(where, timeout=busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise _unavailable(where, exc) from exc
        history = cls(db, where)
        try:
            with history._guard():
                db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
                db.execute("PRAGMA foreign_keys = ON")
                if create:
                    db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                history._migrate(create)
        except BaseException:
            db.close()
            raise
        return history

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise _unavailable(self.path, exc) from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._guard():
            # IMMEDIATE takes the write lock now, so a busy database waits here, not mid-way.
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _migrate(self, create: bool) -> None:
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise HistoryUnavailable(
                f"history database has schema version {version}; this vmtrim knows up to "
                f"{SCHEMA_VERSION} (written by a newer vmtrim)",
                subject=str(self.path),
            )
        if version == SCHEMA_VERSION or (not create and version >= READABLE_FROM):
            return
        if not create:
            raise HistoryUnavailable(
                f"history database has schema version {version}; run any vmtrim command "
                "that records, to upgrade it",
                subject=str(self.path),
            )
        for step in range(version, SCHEMA_VERSION):
            with self._transaction() as db:
                # Re-read under the write lock: another process may have migrated meanwhile.
                if int(db.execute("PRAGMA user_version").fetchone()[0]) != step:
                    continue
                MIGRATIONS[step](db)
                db.execute(f"PRAGMA user_version = {step + 1}")

    @property
    def version(self) -> int:
        with self._guard():
            return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    # --- writing -------------------------------------------------------------------------

    def begin_run(
        self,
        kind: str,
        *,
        policy_hash: str | None = None,
        trigger: str | None = None,
        started: float | None = None,
        host: str | None = None,
    ) -> int:
        """Insert the run row (committed at once, ``ended`` NULL) and return its id."""
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r}")
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (kind, started, host, policy_hash, version, trigger)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    started if started is not None else time.time(),
                    host or socket.gethostname(),
                    policy_hash,
                    __version__,
                    trigger,
                ),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def record(self, run_id: int, result: DomainRecord) -> int:
        """Store one domain result and its disks in one transaction; its row id."""
        with self._transaction() as db:
            return self._insert(db, run_id, result)

    def record_many(self, run_id: int, results: Sequence[DomainRecord]) -> None:
        """Bulk load (generated histories, imports): one transaction for all of them."""
        with self._transaction() as db:
            for result in results:
                self._insert(db, run_id, result)

    @staticmethod
    def _insert(db: sqlite3.Connection, run_id: int, r: DomainRecord) -> int:
        if r.status not in STATUSES:
            raise ValueError(f"unknown status {r.status!r}")
        cursor = db.execute(
            "INSERT INTO domain_results (run_id, domain, uuid, uri, status, reason,"
            " blocking_layer, started, seconds, agent_seconds, guest_trimmed, reclaimed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                r.domain,
                r.uuid,
                r.uri,
                r.status,
                r.reason,
                r.blocking_layer,
                r.started,
                r.seconds,
                r.agent_seconds,
                r.guest_trimmed,
                r.reclaimed,
            ),
        )
        result_id = cursor.lastrowid
        assert result_id is not None
        db.executemany(
            "INSERT INTO disk_results (result_id, target, source, virtual_size,"
            " allocated_before, allocated_after, reclaimed, guest_trimmed, guest_used,"
            " reclaimable_before, reclaimable_after, reclaimable_note, unmap_bytes,"
            " unmap_operations, verdict, blocking_layer, blocking_reason, measured_by, error,"
            " pool, pool_discards, pool_used_before, pool_used_after, pool_percent_before,"
            " pool_percent_after, causes)"
            f" VALUES ({', '.join(['?'] * 26)})",
            [
                (
                    result_id,
                    d.target,
                    d.source,
                    d.virtual_size,
                    d.allocated_before,
                    d.allocated_after,
                    d.reclaimed,
                    d.guest_trimmed,
                    d.guest_used,
                    d.reclaimable_before,
                    d.reclaimable_after,
                    d.reclaimable_note,
                    d.unmap_bytes,
                    d.unmap_operations,
                    d.verdict,
                    d.blocking_layer,
                    d.blocking_reason,
                    d.measured_by,
                    d.error,
                    d.pool,
                    d.pool_discards,
                    d.pool_used_before,
                    d.pool_used_after,
                    d.pool_percent_before,
                    d.pool_percent_after,
                    d.causes,
                )
                for d in r.disks
            ],
        )
        return result_id

    def end_run(self, run_id: int, ended: float | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET ended = ? WHERE id = ?",
                (ended if ended is not None else time.time(), run_id),
            )
