"""Tests of the daemon's SQLite job journal."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from zogy_stream.journal import Journal


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "state" / "journal.sqlite") as j:
        yield j


def submit(journal, name, checksum=None, size=100, mtime_ns=1, now=None):
    return journal.submit(f"/in/{name}", checksum or f"sha256:{name}", size, mtime_ns, now=now)


def test_wal_mode_and_schema(journal, tmp_path):
    assert journal.journal_mode == "wal"
    db = sqlite3.connect(journal.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    assert {"input", "checksum", "template", "state", "attempts", "created", "started", "finished",
            "duration", "error", "outputs"} <= cols
    with pytest.raises(sqlite3.IntegrityError):  # states are constrained
        db.execute("INSERT INTO jobs (input, checksum, size, mtime_ns, state, created, updated) "
                   "VALUES ('x', 'c', 1, 1, 'bogus', 0, 0)")
    with pytest.raises(FileNotFoundError):
        Journal(tmp_path / "missing.sqlite", create=False)


def test_state_machine_done(journal):
    job, action = submit(journal, "a.fits", now=100.0)
    assert action == "queued" and job.state == "queued" and job.attempts == 0 and job.created == 100.0
    claimed = journal.claim(worker="host:1", now=110.0)
    assert claimed.id == job.id and claimed.state == "running" and claimed.attempts == 1
    assert claimed.started == 110.0 and claimed.worker == "host:1"
    assert journal.claim(now=111.0) is None  # nothing else queued
    assert journal.set_template(job.id, "/tpl/t.fits")
    plan = [("/out/.stage/a.zogy.fits", "/out/a.zogy.fits"), ("/out/.stage/a.cands.ecsv", "/out/a.cands.ecsv")]
    assert journal.begin_commit(job.id, plan, duration=2.5, mpix=0.25)
    mid = journal.get(job.id)
    assert mid.state == "running" and mid.commit_plan == tuple(plan)
    assert journal.finish_commit(job.id, now=120.0)
    done = journal.get("/in/a.fits")
    assert done.state == "done" and done.outputs == ("/out/a.zogy.fits", "/out/a.cands.ecsv")
    assert done.commit_plan == () and done.duration == 2.5 and done.mpix == 0.25 and done.finished == 120.0
    assert done.template == "/tpl/t.fits" and done.error is None
    # transitions of a job that is no longer running are refused
    assert not journal.retry(job.id, "late")
    assert not journal.finish_commit(job.id)


def test_mark_done_direct_and_fifo(journal):
    for name in ("a", "b", "c"):
        submit(journal, name)
    order = [journal.claim().input for _ in range(3)]
    assert order == ["/in/a", "/in/b", "/in/c"]
    assert journal.mark_done(1, ["/out/a.zogy.fits"], duration=1.0, mpix=1.0)
    assert journal.get(1).state == "done" and journal.get(1).outputs == ("/out/a.zogy.fits",)


def test_retry_backoff_release_and_failure(journal):
    job, _ = submit(journal, "a.fits")
    job = journal.claim(now=0.0)
    assert journal.retry(job.id, "OSError: [Errno 28] No space left on device", delay=30.0, now=10.0)
    again = journal.get(job.id)
    assert again.state == "queued" and again.attempts == 1 and again.error.startswith("OSError")
    assert journal.claim(now=20.0) is None  # backing off
    job = journal.claim(now=41.0)
    assert job.attempts == 2
    assert journal.release(job.id)  # cancelled: the attempt is not charged
    assert journal.get(job.id).attempts == 1 and journal.get(job.id).state == "queued"
    job = journal.claim()
    assert journal.mark_failed(job.id, "InputError: corrupt", moved_to="/q/a.fits")
    failed = journal.get(job.id)
    assert failed.state == "failed" and failed.error == "InputError: corrupt" and failed.moved_to == "/q/a.fits"
    assert [j.id for j in journal.pending_moves()] == [job.id]


def test_recover_running_rows(journal):
    for name in ("a", "b", "c"):
        submit(journal, name)
    a, b, c = (journal.claim() for _ in range(3))
    journal.begin_commit(c.id, [("/s/c", "/o/c")])
    # the process dies here: a new one recovers
    rec = journal.recover(max_crashes=2)
    assert {j.id for j in rec.requeued} == {a.id, b.id} and rec.failed == ()
    assert [j.id for j in rec.committing] == [c.id] and journal.get(c.id).state == "running"
    assert all(journal.get(j.id).state == "queued" and journal.get(j.id).crashes == 1 for j in (a, b))
    assert journal.get(a.id).attempts == 0  # the lost attempt is not charged
    journal.abort_commit(c.id)
    assert journal.get(c.id).state == "queued" and journal.get(c.id).commit_plan == ()
    # a job under which the process dies again and again ends failed
    while (job := journal.claim()) is not None:
        pass
    rec = journal.recover(max_crashes=2)
    assert {j.id for j in rec.failed} == {a.id, b.id} and {j.id for j in rec.requeued} == {c.id}
    assert "died 2 times" in journal.get(a.id).error and journal.get(a.id).state == "failed"


def test_checksum_dedupe(journal):
    job, _ = submit(journal, "a.fits", checksum="sha256:X", mtime_ns=1)
    journal.claim()
    journal.mark_done(job.id, ["/out/a.zogy.fits"])
    # the same file seen again (touched): nothing to do
    again, action = submit(journal, "a.fits", checksum="sha256:X", mtime_ns=2)
    assert action == "known" and again.state == "done" and again.mtime_ns == 2
    # another name with the same content: done at once, not redone
    dup, action = submit(journal, "copy.fits", checksum="sha256:X")
    assert action == "duplicate" and dup.state == "done" and dup.duplicate_of == job.id
    assert dup.outputs == ("/out/a.zogy.fits",)
    assert journal.claim() is None
    # new content under a done name: queued again from scratch
    changed, action = submit(journal, "a.fits", checksum="sha256:Y", mtime_ns=3)
    assert action == "changed" and changed.state == "queued" and changed.outputs == () and changed.attempts == 0
    # while queued a content change is recorded; while running it is left alone
    updated, action = submit(journal, "a.fits", checksum="sha256:Z", mtime_ns=4)
    assert action == "updated" and updated.checksum == "sha256:Z"
    journal.claim()
    busy, action = submit(journal, "a.fits", checksum="sha256:W", mtime_ns=5)
    assert action == "busy" and busy.checksum == "sha256:Z"
    # a failed input sent again unchanged stays failed
    f, _ = submit(journal, "bad.fits", checksum="sha256:B")
    journal.mark_failed(f.id, "InputError: corrupt")
    assert submit(journal, "bad.fits", checksum="sha256:B")[1] == "known"
    assert journal.get(f.id).state == "failed"


def test_requeue(journal):
    a, _ = submit(journal, "a.fits")
    b, _ = submit(journal, "b.fits")
    c, _ = submit(journal, "c.fits")
    for _ in range(3):
        journal.claim()
    journal.mark_failed(a.id, "InputError: x", moved_to="/q/a.fits")
    journal.mark_done(b.id, ["/o/b"])
    # c is still running: never requeued
    back = journal.requeue(states=("failed",))
    assert [j.id for j in back] == [a.id] and back[0].moved_to == "/q/a.fits"
    fresh = journal.get(a.id)
    assert fresh.state == "queued" and fresh.attempts == 0 and fresh.error is None and fresh.moved_to is None
    assert [j.id for j in journal.requeue(states=("done", "running"), inputs=["b.fits", "c.fits"])] == [b.id]
    assert journal.get(c.id).state == "running"
    assert journal.requeue_ids([]) == 0


def test_status(journal):
    now = 10_000.0
    for i, name in enumerate(["a", "b", "c", "d"]):
        submit(journal, name, now=now)
        job = journal.claim(now=now + 10 * i)
        if name == "d":
            journal.mark_failed(job.id, "NoTemplateError: no template matches", now=now + 10 * i + 1)
        else:
            journal.mark_done(job.id, [f"/o/{name}"], duration=2.0, mpix=4.0, now=now + 10 * i + 2)
    submit(journal, "e", now=now)
    st = journal.status(now=now + 100)
    assert st.counts == {"queued": 1, "running": 0, "done": 3, "failed": 1} and st.total == 5
    assert st.done_last_hour == 3 and st.mpix_done == pytest.approx(12.0)
    assert st.mean_duration == pytest.approx(2.0) and st.mpix_per_second == pytest.approx(2.0)
    assert st.jobs_per_hour == pytest.approx(3 / 22 * 3600)
    assert [j.name for j in st.last_failures] == ["d"]
    text = st.format()
    assert "done" in text and "NoTemplateError" in text and "jobs/h" in text
    assert st.to_dict()["last_failures"][0]["error"].startswith("NoTemplateError")
    assert journal.status(now=now + 10_000).done_last_hour == 0


def test_concurrent_claims_never_share_a_job(tmp_path):
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        for i in range(60):
            submit(j, f"{i}.fits")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker():
        with Journal(path) as mine:  # one connection per thread, like separate processes
            while (job := mine.claim()) is not None:
                with lock:
                    claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 61))
