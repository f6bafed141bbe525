"""Opening a job for a run: its ledger entry created, resumed, joined beside another worker,
or read again when the input changed (an incremental run); and the checks that the entry is
this job's (its origin, its fingerprint) and that the input read is the one fingerprinted."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from . import inputs, sources
from .claim import RunHandle, busy, describe
from .errors import InputChangedError, option
from .inputs import Since
from .runner import Progress, ingest_only
from .store import JobInfo, Ledger

if TYPE_CHECKING:
    from .job import Job

log = logging.getLogger(__name__)


def _mark_of(row: sources.Row, column: str | None) -> object:
    """A row's `changed_since` value (None: NULL, or not a record)."""
    record = row.record
    if record is None:
        try:
            record = orjson.loads(row.payload or b"null")
        except orjson.JSONDecodeError:
            return None
    return record.get(column) if isinstance(record, dict) and column else None


def origin_of(job: Job) -> str | None:
    """The job file, relative to the ledger's folder: a project moved with its ledger inside
    it is still the same job."""
    if job.job_file is None:
        return None
    return os.path.relpath(job.job_file.resolve(), job._ledger_dir.resolve())


def check_origin(job: Job, info: JobInfo) -> bool:
    """The ledger's entry of this name must be this job's: another job file of the same
    name (a copied job file, another project sharing the ledger through --ledger) would
    replace its results, and `export` would write them as its own. The same job moved or
    renamed (its input unchanged) is this job. True when the entry should learn this
    job file (it did not know one, or the job moved)."""
    mine = origin_of(job)
    if mine is None or info.origin == mine:
        return False
    if info.origin is not None and not job.input.same_input(info.fingerprint):
        raise job._usage(
            f"the ledger {job.ledger_name} already holds a job named {job.name!r}, run"
            f" from another job file ({os.path.normpath(job._ledger_dir / info.origin)})"
            " over another input; run here it would"
            " replace that job's results. Give this job a name of its own (`name = ...`),"
            " or a ledger of its own ([run] ledger)"
        )
    return True


def verify_read(job: Job, ledger: Ledger, info: JobInfo) -> None:
    """After this run read the input to its end: were the bytes it read those it started
    with? A file rewritten in place while it was read gives records of two inputs (and
    lines cut in two where reading went on): nothing of it is exported, and the job is
    marked so that the next run reads the input again (an incremental run). Appending
    to the input is fine: the next run reads what was added. (A database changes while
    it is read: the fingerprint taken before the read makes the next run read again.)"""
    read = inputs.read_fingerprint(job.input, info.fingerprint, info.cursor)
    if read is not None and info.name == job.name:  # a placeholder: what was read, now
        ledger.set_fingerprint(info.id, read)
    if not job.input.changed_while_read(info.fingerprint):
        return
    if info.name == job.name:  # (a generation being read is simply not used)
        ledger.set_fingerprint(info.id, sources.Fingerprint(0, 0, "changed while read"))
    raise InputChangedError(
        f"{job.input.describe()} changed while this run read it, so what was read mixes two"
        " versions of it; nothing was exported. Run again: the input is read again, and"
        " records that did not change keep their results"
    )


@dataclass
class Opening:
    """Opening `job` in `ledger` for one run; `notes` gathers what the run should report."""

    job: Job
    ledger: Ledger
    notes: list[str]
    on_progress: Callable[[Progress], None] | None
    stop: threading.Event

    def join(self, spec_hash: str, restart: bool, run: RunHandle) -> JobInfo | None:
        """The job this worker works on. The primary sets it up (`open`); another worker
        waits until it is set up (its entry made, for this input and configuration), then
        works beside the primary. If the primary dies first, this one takes its place."""
        job, ledger = self.job, self.ledger
        digest = None
        while not run.take(ledger):
            info = ledger.get_job(job.name)
            if info is not None and info.spec_hash != spec_hash:
                who = describe(run.held.owner) if run.held else "another process"
                raise InputChangedError(
                    f"the [task] or [model] of job {job.name!r} (or its examples) differ from"
                    f" those of the run at work on it ({who}); another worker joins only the"
                    " same job. Let it finish, or give this job a new name"
                )
            if info is not None:
                if (
                    info.fingerprint == inputs.unread_fingerprint(job.input)
                    and not info.ingest_done
                ):
                    check_origin(job, info)  # the primary is reading it: the same input
                    return info
                digest = digest or job.input.fingerprint()[0].digest
                if info.fingerprint.digest == digest:
                    check_origin(job, info)
                    return info
            if self.stop.wait(0.1):
                return None
        return self.open(spec_hash, restart, others=run.others(ledger))

    def open(
        self, spec_hash: str, restart: bool, others: list[str] | None = None
    ) -> JobInfo | None:
        """The job's ledger entry: created, resumed, or (input changed) reconciled; None if
        stopped while reading a changed input. `others`: the job's other live workers,
        which a restart or a reconcile would pull the job from under."""
        from .executors import executor_class
        from .executors.remote_batch import cancel_earlier_batches, refuse_earlier_batches

        job, ledger = self.job, self.ledger
        others = others or []
        if restart and others:
            raise busy(job.name, others)
        info = ledger.get_job(job.name)
        if info is not None and check_origin(job, info):
            ledger.set_origin(info.id, origin_of(job) or "")
        discarded_before = 0.0
        if executor_class(job.spec.model.mode, job.spec.run.executor).remote_batches:
            # The provider is a second record of what was sent: look there before anything
            # is read or submitted.
            if restart:
                from .llm.batch import SKEW

                self.notes += cancel_earlier_batches(job, ledger, info)
                # Batches of earlier runs, made before now (by the provider's clock, which
                # may run ahead of ours), are theirs: later runs do not refuse.
                discarded_before = time.time() + SKEW
            else:
                refuse_earlier_batches(job, info)
        if info is not None and restart:
            ledger.delete_job(info.id)
            info = None
        unread = inputs.unread_fingerprint(job.input)
        if info is None:
            return ledger.create_job(
                job.name,
                spec_hash,
                unread or job.input.fingerprint()[0],
                discarded_before=discarded_before,
                origin=origin_of(job),
            )
        if spec_hash != info.spec_hash:
            raise InputChangedError(
                f"the [task] or [model] of job {job.name!r} (or its examples) changed since it "
                "started; results would mix two configurations. Undo the change, give the job a "
                f"new name, or run with {option('restart')} to start over."
            )
        if info.fingerprint == unread:
            if not info.ingest_done:
                return info  # its first read goes on; it fingerprints what it reads
            verify_read(job, ledger, info)  # (the run that read it to the end died first)
            info = ledger.get_job(job.name) or info
        fingerprint, content = job.input.fingerprint()
        if (since := job.input.since(info.fingerprint)) is not None:
            return self._read_changed(info, fingerprint, since)
        same = fingerprint.digest == info.fingerprint.digest  # by content: size and mtime lie
        if not same and info.legacy_fingerprint:
            # Stored by an older overnight, as the content hash alone: compare as it did
            # (calling the input changed would refuse to collect its live batches), then
            # store the full fingerprint.
            same = content == info.fingerprint.digest
        if same:
            if fingerprint != info.fingerprint or info.legacy_fingerprint:
                ledger.set_fingerprint(info.id, fingerprint)
            return info
        if others:
            raise busy(
                job.name,
                others,
                why=f"{job.input.describe()} changed since it started, and reading it again now"
                " would replace the items it works on",
            )
        return self._reconcile(info, fingerprint)

    def _ingest(
        self,
        info: JobInfo,
        reader: Callable[[sources.Cursor], Iterator[list[sources.Row]]],
        progress: Progress,
    ) -> bool:
        return ingest_only(
            self.ledger,
            info,
            reader,
            progress=progress,
            on_progress=self.on_progress or (lambda p: None),
            stop=self.stop,
        )

    def _reconcile(self, info: JobInfo, fingerprint: sources.Fingerprint) -> JobInfo | None:
        """An incremental run: read the changed input again; unchanged records keep their
        results, new and changed ones are computed, ids no longer in the input leave it."""
        job, ledger = self.job, self.ledger
        live = ledger.chunks(info.id, ("creating", "live"))
        if live:
            raise InputChangedError(
                f"{job.input_name} changed while {len(live)} provider batch(es) of job "
                f"{job.name!r} are still running; their results belong to the input as it was."
                " Restore the input and run again to collect them first, or run with"
                f" {option('restart')} to start over."
            )
        log.info("job %r: the input changed since the last run; reading it again", job.name)
        new = ledger.begin_generation(info, fingerprint)
        if not self._ingest(new, job._reader(sources.CHUNK), Progress(expected=job._expected())):
            return None
        verify_read(job, ledger, new)
        before = ledger.counts(info.id).total
        kept, gone = ledger.carry_results(info.id, new.id)
        info = ledger.replace_generation(info, new)
        counts = ledger.counts(info.id)
        self.notes.append(
            f"the input changed since the last run: {kept} of {before} records kept their"
            f" results, {counts['pending']} new or changed to compute, {gone} no longer in it"
        )
        return info

    def _read_changed(
        self, info: JobInfo, fingerprint: sources.Fingerprint, since: Since
    ) -> JobInfo | None:
        """An incremental run with `[source] changed_since`: only rows whose column is past the
        last run's high-water mark are read from the database. The next generation holds
        them, and every other record as the ledger has it (the failed ones read again by id,
        as the ledger keeps no input of theirs but the id); carry_results then keeps the
        results of all but the changed ones. A deleted row leaves no row behind: the ids
        counted now against those the ledger holds (and the new ones read) tell whether any
        went, and only then are the ledger's ids looked up in the source (the id column
        alone), so that deleted ones leave the output. A job still unfinished is resumed
        first; the next run reads what changed."""
        job, ledger = self.job, self.ledger
        counts = ledger.counts(info.id)
        if not info.ingest_done or counts.open or counts["cancelled"]:
            return info
        changed_n = since.count()
        mark = job.spec.source.changed_since
        changed: dict[str, sources.Row] = {}
        bad: list[sources.Row] = []
        if changed_n:
            log.info(
                "job %r: %d rows changed since the last run; reading them", job.name, changed_n
            )
            for rows in since.read(sources.CHUNK):
                for row in rows:
                    if row.custom_id is None:
                        if _mark_of(row, mark) is not None:
                            bad.append(row)
                    else:
                        changed[row.custom_id] = row
            # A row whose column is NULL says nothing of a change: only a new one (an id the
            # job does not have) is read, or each run would read it again as changed.
            unmarked = [cid for cid, row in changed.items() if _mark_of(row, mark) is None]
            for cid in ledger.known_ids(info.id, unmarked) if unmarked else ():
                del changed[cid]
        read = len(changed) + len(bad)
        new_ids = len(changed) - len(ledger.known_ids(info.id, list(changed)))
        held = counts.total - counts.rejected  # one item per id
        gone: set[str] = set()
        if since.count_ids() != held + new_ids:
            gone = self._deleted(info, since)
        if not read and not gone:
            return info
        new = ledger.begin_generation(info, fingerprint)

        def reader(_: sources.Cursor) -> Iterator[list[sources.Row]]:
            line = 0
            out: list[sources.Row] = []

            def put(row: sources.Row) -> Iterator[list[sources.Row]]:
                nonlocal line, out
                line += 1
                out.append(row._replace(line=line))
                if len(out) >= sources.CHUNK:
                    yield out
                    out = []

            other = job._connect()  # a second connection: this one writes while it reads
            try:
                for cid, _, payload, _ in other.iter_results(info.id, with_payload=True):
                    if cid in gone:
                        continue
                    row = changed.pop(cid, None)
                    yield from put(row or sources.Row(0, cid, payload, None, None))
                failed = [
                    f.custom_id
                    for f in other.iter_failures(info.id)
                    if f.custom_id is not None and f.error_class != "input_error"
                ]
            finally:
                other.close()
            again = [cid for cid in failed if cid not in changed]  # a deleted one is not read
            for row in since.read_ids(again):
                for r in row:
                    yield from put(r)
            for row in [*changed.values(), *bad]:
                yield from put(row)
            if out:
                yield out

        if not self._ingest(new, reader, Progress(expected=counts.total + changed_n)):
            return None
        kept, _ = ledger.carry_results(info.id, new.id)
        info = ledger.replace_generation(info, new)
        counts = ledger.counts(info.id)
        self.notes.append(
            f"read {read} rows changed since the last run ([source] changed_since):"
            f" {counts['pending']} new or changed to compute; {kept} records kept their results"
            + (f"; {len(gone)} deleted from the source" if gone else "")
        )
        return info

    def _deleted(self, info: JobInfo, since: Since, chunk: int = 2000) -> set[str]:
        """The ids of the job's items (results and failures) no longer in the source."""
        gone: set[str] = set()
        ids: list[str] = []

        def look() -> None:
            present = since.existing_ids(ids)
            gone.update(cid for cid in ids if cid not in present)
            ids.clear()

        for cid, *_ in self.ledger.iter_results(info.id):
            ids.append(cid)
            if len(ids) >= chunk:
                look()
        for f in self.ledger.iter_failures(info.id):
            if f.custom_id is not None and f.error_class != "input_error":
                ids.append(f.custom_id)
                if len(ids) >= chunk:
                    look()
        if ids:
            look()
        if gone:
            log.info("job %r: %d rows were deleted from the source", self.job.name, len(gone))
        return gone
