"""SQLite job journal of the zogy_stream daemon.

One row per input file.  A row moves through the states ``queued`` →
``running`` → ``done`` or ``failed``; a transient error sends it back to
``queued`` (with a back-off), a crash of the daemon leaves it ``running`` until
:meth:`Journal.recover` puts it back.  While the outputs of a job are being
renamed into place the row stays ``running`` and carries its *commit plan*
(the staged and final paths), so that a daemon restarted after a crash can
roll the commit forward or back.

The database is opened in WAL mode with ``synchronous=FULL``: readers (the
``status`` command, the metrics endpoint) never block the daemon, and a
committed transaction survives the death of the process or the machine.
Every write is one ``BEGIN IMMEDIATE`` transaction, so several connections
(threads or processes) can share the file.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["STATES", "Job", "Journal", "Recovery", "Status"]

STATES: tuple[str, ...] = ("queued", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    input        TEXT    NOT NULL UNIQUE,
    checksum     TEXT    NOT NULL,
    size         INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    crashes      INTEGER NOT NULL DEFAULT 0,
    template     TEXT,
    created      REAL    NOT NULL,
    updated      REAL    NOT NULL,
    started      REAL,
    finished     REAL,
    duration     REAL,
    not_before   REAL    NOT NULL DEFAULT 0,
    error        TEXT,
    outputs      TEXT,
    commit_plan  TEXT,
    moved_to     TEXT,
    duplicate_of INTEGER,
    mpix         REAL,
    worker       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, not_before, id);
CREATE INDEX IF NOT EXISTS jobs_by_checksum ON jobs (checksum, state);
"""

# Columns reset when a job is put back in the queue from scratch.
_RESET = ("attempts = 0, crashes = 0, template = NULL, started = NULL, finished = NULL, "
          "duration = NULL, not_before = 0, error = NULL, outputs = NULL, commit_plan = NULL, "
          "moved_to = NULL, duplicate_of = NULL, mpix = NULL, worker = NULL")


@dataclass(frozen=True)
class Job:
    """One row of the journal (a snapshot; re-read it to see later changes).

    Attributes
    ----------
    id, input, checksum, size, mtime_ns
        Row id, absolute input path, ``sha256:`` checksum and the size and
        mtime (ns) the input had when it was registered.
    state : str
        One of :data:`STATES`.
    attempts, crashes : int
        Attempts that ran to an end (success or error), and attempts lost
        because the daemon died under them.
    template : str or None
        Template the input was matched to.
    created, updated, started, finished, duration : float or None
        Unix times of registration, last change, last start and end, and the
        processing time in seconds.
    not_before : float
        Unix time before which a re-queued job is not retried.
    error : str or None
        One-line reason of the last failure or retry.
    outputs : tuple of str
        Final output paths of a done job.
    commit_plan : tuple of (str, str)
        ``(staged, final)`` pairs while a commit is in progress, else empty.
    moved_to : str or None
        Where the input was (or is being) moved: quarantine or archive.
    duplicate_of : int or None
        Id of the done job with the same checksum this row copies.
    mpix : float or None
        Image size in megapixels.
    worker : str or None
        ``host:pid`` of the process that ran it.
    """

    id: int
    input: str
    checksum: str
    size: int
    mtime_ns: int
    state: str
    attempts: int
    crashes: int
    template: str | None
    created: float
    updated: float
    started: float | None
    finished: float | None
    duration: float | None
    not_before: float
    error: str | None
    outputs: tuple[str, ...]
    commit_plan: tuple[tuple[str, str], ...]
    moved_to: str | None
    duplicate_of: int | None
    mpix: float | None
    worker: str | None

    @property
    def name(self) -> str:
        """File name of the input."""
        return Path(self.input).name

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Job:
        data = {f.name: row[f.name] for f in fields(cls)}  # tolerate columns added later
        data["outputs"] = tuple(json.loads(data["outputs"] or "[]"))
        data["commit_plan"] = tuple(tuple(p) for p in json.loads(data["commit_plan"] or "[]"))
        return cls(**data)


@dataclass(frozen=True)
class Recovery:
    """What :meth:`Journal.recover` found left ``running`` by a dead process.

    Attributes
    ----------
    requeued : tuple of Job
        Jobs put back in the queue.
    failed : tuple of Job
        Jobs marked failed because the process died under them too often.
    committing : tuple of Job
        Jobs caught in the middle of their commit, still ``running``: the
        caller must roll them forward or back.
    """

    requeued: tuple[Job, ...]
    failed: tuple[Job, ...]
    committing: tuple[Job, ...]


@dataclass(frozen=True)
class Status:
    """Summary of a journal for the ``status`` command and the metrics.

    Attributes
    ----------
    counts : dict
        Number of jobs per state (every state present, possibly 0).
    done_last_hour : int
        Jobs finished (not counting checksum duplicates) in the last hour.
    jobs_per_hour : float or None
        Throughput over the last (up to 100) finished jobs.
    mean_duration : float or None
        Mean processing time of those jobs, in seconds.
    mpix_done : float
        Megapixels processed by all done jobs.
    mpix_per_second : float or None
        Megapixels per second of processing time over the last jobs.
    last_failures : tuple of Job
        The most recent failed jobs, newest first.
    """

    counts: dict[str, int]
    done_last_hour: int
    jobs_per_hour: float | None
    mean_duration: float | None
    mpix_done: float
    mpix_per_second: float | None
    last_failures: tuple[Job, ...]

    @property
    def total(self) -> int:
        """Number of rows."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        out = asdict(self)
        out["total"] = self.total
        out["last_failures"] = [{"input": j.input, "error": j.error, "finished": j.finished,
                                 "attempts": j.attempts, "moved_to": j.moved_to}
                                for j in self.last_failures]
        return out

    def format(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"{state:<8} {self.counts[state]:>7d}" for state in STATES]
        lines.append(f"{'total':<8} {self.total:>7d}")
        rate = "n/a" if self.jobs_per_hour is None else f"{self.jobs_per_hour:.1f} jobs/h"
        mean = "n/a" if self.mean_duration is None else f"{self.mean_duration:.2f} s"
        mps = "n/a" if self.mpix_per_second is None else f"{self.mpix_per_second:.2f} Mpix/s"
        lines.append(f"throughput: {self.done_last_hour} done in the last hour, {rate} "
                     f"(mean job {mean}, {mps}, {self.mpix_done:.1f} Mpix in total)")
        if self.last_failures:
            lines.append("last failures:")
            for job in self.last_failures:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.finished or job.updated))
                lines.append(f"  {when}  {job.name}: {job.error}")
        return "\n".join(lines)


class Journal:
    """The job journal, a SQLite database in WAL mode.

    Parameters
    ----------
    path : str or Path
        Database file; created with its directory unless ``create`` is false.
    create : bool
        Create a missing database (else raise :class:`FileNotFoundError`).
    timeout : float
        Seconds to wait for a lock held by another connection.

    Notes
    -----
    One connection, guarded by a lock, serves all threads of a process.  All
    methods that change rows are single transactions.
    """

    def __init__(self, path: str | Path, *, create: bool = True, timeout: float = 30.0) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no journal at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self.journal_mode = str(self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        self._db.execute("PRAGMA synchronous = FULL")
        with self._write():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Job | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return None if row is None else Job._from_row(row)

    def _many(self, sql: str, args: Sequence[Any] = ()) -> list[Job]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Job._from_row(r) for r in rows]

    def _update(self, job_id: int, assignments: str, args: Sequence[Any] = (),
                states: Sequence[str] = ("running",)) -> bool:
        marks = ",".join("?" * len(states))
        with self._write() as db:
            cur = db.execute(f"UPDATE jobs SET {assignments}, updated = ? WHERE id = ? "
                             f"AND state IN ({marks})", (*args, time.time(), job_id, *states))
        return cur.rowcount == 1

    # -- queries ----------------------------------------------------------------------------
    def get(self, job: int | str | Path) -> Job | None:
        """Row by id or by input path, or None."""
        if isinstance(job, int):
            return self._one("SELECT * FROM jobs WHERE id = ?", (job,))
        return self._one("SELECT * FROM jobs WHERE input = ?", (str(job),))

    def jobs(self, states: Iterable[str] | None = None) -> list[Job]:
        """All rows (optionally only those in ``states``), oldest first."""
        if states is None:
            return self._many("SELECT * FROM jobs ORDER BY id")
        states = tuple(states)
        marks = ",".join("?" * len(states))
        return self._many(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states)

    def counts(self) -> dict[str, int]:
        """Number of rows per state."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {r[0]: r[1] for r in rows}

    # -- registration -----------------------------------------------------------------------
    def submit(self, input: str | Path, checksum: str, size: int, mtime_ns: int,
               now: float | None = None) -> tuple[Job, str]:
        """Register a complete input file.

        Parameters
        ----------
        input : str or Path
            Absolute path of the input.
        checksum : str
            Checksum of its content.
        size, mtime_ns : int
            Its size and modification time, to recognise it later without
            reading it again.
        now : float, optional
            Current Unix time (for tests).

        Returns
        -------
        job : Job
            The row after the call.
        action : str
            ``"queued"`` (new row), ``"duplicate"`` (new row, done at once as a
            copy of a done job with the same checksum), ``"known"`` (same path
            and checksum: nothing to do), ``"updated"`` (still queued, new
            content recorded), ``"busy"`` (running: left alone) or
            ``"changed"`` (done or failed before, new content: queued again).
        """
        now = time.time() if now is None else now
        path = str(input)
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE input = ?", (path,)).fetchone()
            old = None if row is None else Job._from_row(row)
            if old is not None and old.checksum == checksum:
                db.execute("UPDATE jobs SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, old.id))
                action = "known"
            elif old is not None and old.state in ("queued", "running"):
                if old.state == "queued":
                    db.execute("UPDATE jobs SET checksum = ?, size = ?, mtime_ns = ?, updated = ? "
                               "WHERE id = ?", (checksum, size, mtime_ns, now, old.id))
                action = "updated" if old.state == "queued" else "busy"
            else:
                dup = db.execute("SELECT * FROM jobs WHERE checksum = ? AND state = 'done' "
                                 "AND input != ? ORDER BY id LIMIT 1", (checksum, path)).fetchone()
                if old is None:
                    db.execute("INSERT INTO jobs (input, checksum, size, mtime_ns, state, created, updated) "
                               "VALUES (?, ?, ?, ?, 'queued', ?, ?)", (path, checksum, size, mtime_ns, now, now))
                else:
                    db.execute(f"UPDATE jobs SET state = 'queued', checksum = ?, size = ?, mtime_ns = ?, "
                               f"created = ?, updated = ?, {_RESET} WHERE id = ?",
                               (checksum, size, mtime_ns, now, now, old.id))
                action = "queued" if old is None else "changed"
                if dup is not None:
                    db.execute("UPDATE jobs SET state = 'done', duplicate_of = ?, outputs = ?, template = ?, "
                               "finished = ?, duration = 0 WHERE input = ?",
                               (dup["id"], dup["outputs"], dup["template"], now, path))
                    action = "duplicate"
            job = Job._from_row(db.execute("SELECT * FROM jobs WHERE input = ?", (path,)).fetchone())
        return job, action

    # -- the state machine ------------------------------------------------------------------
    def claim(self, worker: str | None = None, now: float | None = None) -> Job | None:
        """Take the oldest queued job that is due and mark it running.

        Parameters
        ----------
        worker : str, optional
            Identifies the claimant (``host:pid``).
        now : float, optional
            Current Unix time (for tests).

        Returns
        -------
        Job or None
            The claimed job (``attempts`` already incremented), or None.
        """
        now = time.time() if now is None else now
        with self._write() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' AND not_before <= ? "
                             "ORDER BY id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, started = ?, "
                       "finished = NULL, duration = NULL, commit_plan = NULL, worker = ?, updated = ? "
                       "WHERE id = ?", (now, worker, now, row[0]))
            return Job._from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (row[0],)).fetchone())

    def set_template(self, job_id: int, template: str | None) -> bool:
        """Record the template a running job was matched to."""
        return self._update(job_id, "template = ?", (template,))

    def begin_commit(self, job_id: int, plan: Sequence[tuple[str, str]], *,
                     duration: float | None = None, mpix: float | None = None) -> bool:
        """Record the ``(staged, final)`` renames about to be made for a running job.

        From here on, a restarted daemon rolls the job forward (all staged or
        final files present) instead of re-running it.
        """
        plan_json = json.dumps([[str(s), str(f)] for s, f in plan])
        return self._update(job_id, "commit_plan = ?, duration = ?, mpix = ?", (plan_json, duration, mpix))

    def finish_commit(self, job_id: int, *, moved_to: str | None = None, now: float | None = None) -> bool:
        """Mark a committing job done: its outputs are the finals of its plan."""
        now = time.time() if now is None else now
        job = self.get(job_id)
        if job is None or not job.commit_plan:
            return False
        outputs = json.dumps([f for _, f in job.commit_plan])
        return self._update(job_id, "state = 'done', outputs = ?, commit_plan = NULL, error = NULL, "
                            "finished = ?, duration = COALESCE(duration, ? - started), moved_to = ?",
                            (outputs, now, now, moved_to))

    def mark_done(self, job_id: int, outputs: Sequence[str], *, duration: float | None = None,
                  mpix: float | None = None, moved_to: str | None = None, now: float | None = None) -> bool:
        """Mark a running job done with the given final output paths (one transaction)."""
        now = time.time() if now is None else now
        return self._update(job_id, "state = 'done', outputs = ?, commit_plan = NULL, error = NULL, "
                            "finished = ?, duration = COALESCE(?, ? - started), mpix = COALESCE(?, mpix), "
                            "moved_to = ?", (json.dumps([str(o) for o in outputs]), now, duration, now,
                                             mpix, moved_to))

    def abort_commit(self, job_id: int) -> bool:
        """Put a job whose commit was rolled back in the queue again."""
        return self._update(job_id, "state = 'queued', commit_plan = NULL, attempts = MAX(attempts - 1, 0), "
                            "not_before = 0")

    def mark_failed(self, job_id: int, error: str, *, moved_to: str | None = None,
                    now: float | None = None) -> bool:
        """Mark a job failed with a one-line reason (and where its input goes)."""
        now = time.time() if now is None else now
        return self._update(job_id, "state = 'failed', error = ?, finished = ?, "
                            "duration = COALESCE(? - started, 0), commit_plan = NULL, moved_to = ?",
                            (error, now, now, moved_to), states=("running", "queued", "failed"))

    def retry(self, job_id: int, error: str, delay: float = 0.0, now: float | None = None) -> bool:
        """Send a running job back to the queue after a transient error."""
        now = time.time() if now is None else now
        return self._update(job_id, "state = 'queued', error = ?, not_before = ?, commit_plan = NULL",
                            (error, now + delay))

    def release(self, job_id: int, delay: float = 0.0) -> bool:
        """Send a running job back to the queue without charging an attempt (cancelled, input changed)."""
        return self._update(job_id, "state = 'queued', attempts = MAX(attempts - 1, 0), "
                            "commit_plan = NULL, not_before = ?", (time.time() + delay,))

    def set_moved(self, job_id: int, moved_to: str | None) -> bool:
        """Record where the input of a done or failed job is moved."""
        return self._update(job_id, "moved_to = ?", (moved_to,), states=("done", "failed"))

    def recover(self, max_crashes: int = 5) -> Recovery:
        """Deal with jobs left ``running`` by a process that died.

        Only call this while no other process is running jobs on this journal
        (the daemon holds a lock on it).

        Parameters
        ----------
        max_crashes : int
            A job under which the process died this many times is marked failed
            (it probably kills the process) instead of being re-queued.

        Returns
        -------
        Recovery
        """
        requeued, failed, committing = [], [], []
        now = time.time()
        with self._write() as db:
            for row in db.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY id").fetchall():
                job = Job._from_row(row)
                if job.commit_plan:
                    committing.append(job)
                elif job.crashes + 1 >= max_crashes:
                    db.execute("UPDATE jobs SET state = 'failed', crashes = crashes + 1, finished = ?, "
                               "updated = ?, error = ? WHERE id = ?",
                               (now, now, f"the daemon died {job.crashes + 1} times while processing it",
                                job.id))
                    failed.append(job)
                else:
                    db.execute("UPDATE jobs SET state = 'queued', crashes = crashes + 1, "
                               "attempts = MAX(attempts - 1, 0), not_before = 0, updated = ? WHERE id = ?",
                               (now, job.id))
                    requeued.append(job)
        reread = lambda jobs: tuple(self.get(j.id) for j in jobs)  # noqa: E731
        return Recovery(reread(requeued), reread(failed), tuple(committing))

    def select(self, states: Iterable[str] = ("failed",), inputs: Iterable[str] | None = None) -> list[Job]:
        """Rows in ``states``, optionally only those whose input path or file name is in ``inputs``."""
        jobs = self.jobs(states)
        if inputs is not None:
            wanted = {str(i) for i in inputs}
            jobs = [j for j in jobs if j.input in wanted or j.name in wanted
                    or str(Path(j.input).resolve()) in wanted]
        return jobs

    def requeue_ids(self, ids: Iterable[int]) -> int:
        """Put the given done or failed jobs back in the queue from scratch; returns how many."""
        ids = list(ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self._write() as db:
            cur = db.execute(f"UPDATE jobs SET state = 'queued', updated = ?, {_RESET} "
                             f"WHERE id IN ({marks}) AND state IN ('done', 'failed', 'queued')",
                             (time.time(), *ids))
        return cur.rowcount

    def requeue(self, states: Iterable[str] = ("failed",), inputs: Iterable[str] | None = None) -> list[Job]:
        """Select rows (see :meth:`select`) and put them back in the queue; returns them as they were."""
        jobs = [j for j in self.select(states, inputs) if j.state != "running"]
        self.requeue_ids(j.id for j in jobs)
        return jobs

    def pending_moves(self) -> list[Job]:
        """Done or failed rows that name a destination for their input (archive, quarantine)."""
        return self._many("SELECT * FROM jobs WHERE state IN ('done', 'failed') AND moved_to IS NOT NULL "
                          "ORDER BY id")

    # -- reporting --------------------------------------------------------------------------
    def status(self, n_failures: int = 5, now: float | None = None) -> Status:
        """Counts per state, throughput and the last failures.

        Parameters
        ----------
        n_failures : int
            How many recent failures to list.
        now : float, optional
            Current Unix time (for tests).
        """
        now = time.time() if now is None else now
        counts = self.counts()
        with self._lock:
            db = self._db
            last_hour = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done' AND duplicate_of IS NULL "
                                   "AND finished >= ?", (now - 3600.0,)).fetchone()[0]
            mpix_done = db.execute("SELECT COALESCE(SUM(mpix), 0) FROM jobs WHERE state = 'done' "
                                   "AND duplicate_of IS NULL").fetchone()[0]
            recent = db.execute("SELECT started, finished, duration, mpix FROM jobs WHERE state = 'done' "
                                "AND duplicate_of IS NULL AND finished IS NOT NULL "
                                "ORDER BY finished DESC LIMIT 100").fetchall()
        rate = mean = mps = None
        if recent:
            durations = [r["duration"] or 0.0 for r in recent]
            mean = sum(durations) / len(durations)
            busy = sum(durations)
            mpix = sum(r["mpix"] or 0.0 for r in recent)
            mps = mpix / busy if busy > 0 else None
            span = max(r["finished"] for r in recent) - min(r["started"] or r["finished"] for r in recent)
            rate = len(recent) / span * 3600.0 if span > 0 else None
        failures = self._many("SELECT * FROM jobs WHERE state = 'failed' ORDER BY finished DESC, id DESC "
                              "LIMIT ?", (n_failures,))
        return Status(counts, last_hour, rate, mean, float(mpix_done), mps, tuple(failures))
