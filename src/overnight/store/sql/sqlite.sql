-- The SQLite ledger's SQL, one named query per block. Each `-- name: q(a, b)` declares the
-- query's parameters, in the order a caller passes them; the body uses them as `:a`, `:b`.
-- postgresql.sql holds the same names with the same parameters (tests/test_store_sql.py).
-- An item's id is `job_id << 40 | seq`, so `id BETWEEN :lo AND :hi` is a job's items in
-- input order (a range scan of the table itself).

-- Schema migrations ----------------------------------------------------------------------
-- `migration_N` blocks are applied in order, all pending ones in one transaction, and
-- `schema_version` records the last one applied. `legacy_column ...` blocks are the columns
-- added before migrations were versioned: migration 1 adds those a ledger lacks.

-- name: has_schema_version()
SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'

-- name: schema_version()
SELECT coalesce(max(version), 0) FROM schema_version

-- name: set_schema_version(version, now)
INSERT INTO schema_version (version, applied_at) VALUES (:version, :now)

-- name: lock_schema()
-- BEGIN IMMEDIATE has taken the write lock already: a second process waits there.
SELECT 1

-- name: table_columns(tbl)
SELECT name FROM pragma_table_info(:tbl)

-- name: migration_1()
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER NOT NULL,
    applied_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    spec_hash      TEXT NOT NULL,
    fp_size        INTEGER NOT NULL,
    fp_mtime_ns    INTEGER NOT NULL,
    fp_digest      TEXT NOT NULL,
    ingest_records INTEGER NOT NULL DEFAULT 0,
    ingest_line    INTEGER NOT NULL DEFAULT 1,
    ingest_offset  INTEGER NOT NULL DEFAULT 0,
    ingest_done    INTEGER NOT NULL DEFAULT 0,
    cancelled      INTEGER NOT NULL DEFAULT 0, -- when `cancel` ran (epoch seconds), 1: before
    created_at     REAL NOT NULL,
    token          TEXT,                       -- the job's mark on provider requests
    discarded_before REAL NOT NULL DEFAULT 0,  -- see JobInfo.discarded_before
    fp_how         INTEGER NOT NULL DEFAULT 0, -- 1: fp_digest covers how the input is read
    origin         TEXT,                       -- its job file (see JobInfo.origin)
    ingest_key     TEXT                        -- Cursor.key: a keyset source's resume point
);
CREATE TABLE IF NOT EXISTS items (
    id            INTEGER PRIMARY KEY,          -- job_id << 40 | seq
    job_id        INTEGER NOT NULL,
    custom_id     TEXT NOT NULL,
    line          INTEGER NOT NULL,
    payload       BLOB NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    not_before    REAL NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_expires REAL,
    error_class   TEXT,
    message       TEXT,
    result        BLOB,
    started_at    REAL,
    finished_at   REAL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    cost          REAL,
    list_cost     REAL,
    batch_chunk   INTEGER,                     -- the remote batch holding a submitted item
    vector        BLOB                         -- an embedding output: float32 bytes
);
CREATE UNIQUE INDEX IF NOT EXISTS items_custom_id ON items (job_id, custom_id);
-- Only pending items are indexed by state: most go from ingest straight to a lease.
CREATE INDEX IF NOT EXISTS items_pending ON items (id) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS remote_batches (
    job_id        INTEGER NOT NULL,
    chunk         INTEGER NOT NULL,
    provider      TEXT NOT NULL,
    status        TEXT NOT NULL,               -- creating | live | collected
    remote_id     TEXT,
    input_file_id TEXT,
    remote_status TEXT,
    requests      INTEGER NOT NULL,
    counts        TEXT,
    planned_at    REAL NOT NULL,
    ended_at      REAL,
    create_until  REAL,                        -- a create may land until then (0: none sent)
    tagged        INTEGER NOT NULL DEFAULT 0,  -- custom_ids carry the job's token
    PRIMARY KEY (job_id, chunk)
);
CREATE TABLE IF NOT EXISTS claims (
    name    TEXT PRIMARY KEY,                  -- the job's name: outlives --restart
    owner   TEXT NOT NULL,
    since   REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,               -- the job's name
    owner         TEXT NOT NULL,
    started_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    ended_at      REAL,                        -- NULL: running, or died without a word
    outcome       TEXT,                        -- finished | interrupted | cancelled | ...
    processed     INTEGER NOT NULL DEFAULT 0,  -- items finished by this run
    seconds       REAL NOT NULL DEFAULT 0,     -- processing time, model loading excluded
    setup_seconds REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_name ON runs (name, id);
CREATE TABLE IF NOT EXISTS inflight (          -- what each runner is computing right now
    job_id    INTEGER NOT NULL,
    owner     TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (job_id, owner)
);
CREATE TABLE IF NOT EXISTS rejects (
    job_id    INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    line      INTEGER NOT NULL,
    custom_id TEXT,
    message   TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- SQLite adds a column without rewriting the table. Rows of older ledgers get fp_how 0
-- (see JobInfo.legacy_fingerprint); every write sets 1.
-- name: legacy_column jobs token()
ALTER TABLE jobs ADD COLUMN token TEXT
-- name: legacy_column jobs discarded_before()
ALTER TABLE jobs ADD COLUMN discarded_before REAL NOT NULL DEFAULT 0
-- name: legacy_column jobs fp_how()
ALTER TABLE jobs ADD COLUMN fp_how INTEGER NOT NULL DEFAULT 0
-- name: legacy_column jobs origin()
ALTER TABLE jobs ADD COLUMN origin TEXT
-- name: legacy_column jobs ingest_key()
ALTER TABLE jobs ADD COLUMN ingest_key TEXT
-- name: legacy_column remote_batches create_until()
ALTER TABLE remote_batches ADD COLUMN create_until REAL
-- name: legacy_column remote_batches tagged()
ALTER TABLE remote_batches ADD COLUMN tagged INTEGER NOT NULL DEFAULT 0
-- name: legacy_column items batch_chunk()
ALTER TABLE items ADD COLUMN batch_chunk INTEGER
-- name: legacy_column items input_tokens()
ALTER TABLE items ADD COLUMN input_tokens INTEGER
-- name: legacy_column items output_tokens()
ALTER TABLE items ADD COLUMN output_tokens INTEGER
-- name: legacy_column items cost()
ALTER TABLE items ADD COLUMN cost REAL
-- name: legacy_column items list_cost()
ALTER TABLE items ADD COLUMN list_cost REAL
-- name: legacy_column items vector()
ALTER TABLE items ADD COLUMN vector BLOB

-- name: migration_2()
-- The LLM response cache in the ledger: every worker of a shared (PostgreSQL) ledger gets
-- the answers any of them paid for. (A SQLite ledger's jobs keep theirs in cache.db beside
-- it, off the ledger's write lock: see llm_job.response_cache.)
CREATE TABLE IF NOT EXISTS responses (
    scope         TEXT NOT NULL,               -- job:<name>
    key           TEXT NOT NULL,               -- cache_key(provider, endpoint, body)
    body          BLOB NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    PRIMARY KEY (scope, key)
)

-- name: migration_3()
-- A pending item's follow-up request (a batch's repair) gets a column of its own: it lived in
-- `result`, which meant two things. Requests already waiting move over.
ALTER TABLE items ADD COLUMN follow_up BLOB;
UPDATE items SET follow_up = result, result = NULL
WHERE state IN ('pending', 'submitted') AND result IS NOT NULL

-- name: migration_4()
-- Leased items indexed too (a partial index, as pending ones): a worker's lease owners,
-- renew, release and reclaim look at the few leased items, not at every item of the job
-- (a scan of a million-item job took ~0.2 s each, several times per run, in the heartbeat's
-- write transaction too). Fresh items never enter it: they are inserted finished.
CREATE INDEX IF NOT EXISTS items_leased ON items (id) WHERE state = 'leased'

-- name: migration_5()
-- Fresh work committed per batch: the records a runner read and computed once with success
-- (its fast path, SQLLedger.add_succeeded) are one row per committed range of seqs, not one
-- item row each (a million rows and their id index cost ~4x the rest of a run). Whatever
-- must change or inspect one of them item by item first turns its range back into item rows
-- (SQLLedger._explode); counts, exports and the dashboard read ranges as they are.
CREATE TABLE IF NOT EXISTS ranges (
    job_id      INTEGER NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,                -- every seq in between: no gaps
    finished_at REAL NOT NULL,               -- its items' started_at and finished_at
    ids         BLOB NOT NULL,               -- JSON array of the custom ids
    lines       BLOB NOT NULL,               -- JSON array of the input line numbers
    sizes       BLOB NOT NULL,               -- JSON array of the payload sizes
    payloads    BLOB NOT NULL,               -- the records, concatenated
    results     BLOB NOT NULL,               -- the results, one JSON object a line
    PRIMARY KEY (job_id, first_seq)
)

-- name: untokened_jobs()
SELECT id FROM jobs WHERE token IS NULL

-- name: set_token(token, id)
UPDATE jobs SET token = :token WHERE id = :id

-- Claims and runs ------------------------------------------------------------------------

-- name: claim(name, owner, now, expires, take_from)
INSERT INTO claims (name, owner, since, expires) VALUES (:name, :owner, :now, :expires)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, since = excluded.since,
    expires = excluded.expires
WHERE claims.expires < :now OR claims.owner = :take_from OR claims.owner = :owner

-- name: get_claim(name)
SELECT owner, since, expires FROM claims WHERE name = :name

-- name: renew_claim(expires, name, owner)
UPDATE claims SET expires = :expires WHERE name = :name AND owner = :owner

-- name: release_claim(name, owner)
DELETE FROM claims WHERE name = :name AND owner = :owner

-- name: run_started(name, owner, now)
-- After a lost connection: did the start_run that was cut off commit? (replay, ledger.py)
SELECT id FROM runs WHERE name = :name AND owner = :owner AND started_at = :now

-- name: start_run(name, owner, now)
INSERT INTO runs (name, owner, started_at, updated_at) VALUES (:name, :owner, :now, :now)
RETURNING id

-- name: update_run(now, processed, seconds, setup_seconds, outcome, id)
UPDATE runs SET updated_at = :now, processed = :processed, seconds = :seconds,
    setup_seconds = :setup_seconds, outcome = coalesce(:outcome, outcome),
    ended_at = CASE WHEN :outcome IS NULL THEN ended_at ELSE :now END
WHERE id = :id

-- name: last_run(name)
SELECT owner, started_at, updated_at, ended_at, outcome, processed, seconds, setup_seconds
FROM runs WHERE name = :name ORDER BY id DESC LIMIT 1

-- name: open_runs(name)
-- A job's runs that have not ended: its workers, and those killed without a word.
SELECT owner, started_at, updated_at, ended_at, outcome, processed, seconds, setup_seconds
FROM runs WHERE name = :name AND ended_at IS NULL ORDER BY id

-- name: finished_since(lo, hi, since)
SELECT count(*) FROM items WHERE id BETWEEN :lo AND :hi AND finished_at >= :since

-- Jobs -----------------------------------------------------------------------------------

-- name: get_job(name)
SELECT id, name, spec_hash, fp_size, fp_mtime_ns, fp_digest, ingest_records, ingest_line,
    ingest_offset, ingest_done, created_at, token, discarded_before, fp_how, origin, ingest_key
FROM jobs WHERE name = :name

-- name: create_job(name, spec_hash, size, mtime_ns, digest, now, token, discarded_before, origin)
-- ON CONFLICT: two processes creating one job at once get the same row.
INSERT INTO jobs (name, spec_hash, fp_size, fp_mtime_ns, fp_digest, created_at, token,
    discarded_before, fp_how, origin)
VALUES (:name, :spec_hash, :size, :mtime_ns, :digest, :now, :token, :discarded_before, 1, :origin)
ON CONFLICT (name) DO NOTHING

-- name: job_names()
SELECT name FROM jobs ORDER BY id

-- name: lock_job(id)
-- BEGIN IMMEDIATE has locked the whole ledger already.
SELECT :id

-- name: delete_items(lo, hi)
DELETE FROM items WHERE id BETWEEN :lo AND :hi

-- name: delete_rejects(job_id)
DELETE FROM rejects WHERE job_id = :job_id

-- name: delete_inflight(job_id)
DELETE FROM inflight WHERE job_id = :job_id

-- name: delete_chunks(job_id)
DELETE FROM remote_batches WHERE job_id = :job_id

-- name: delete_job(id)
DELETE FROM jobs WHERE id = :id

-- name: set_origin(origin, id)
UPDATE jobs SET origin = :origin WHERE id = :id

-- name: set_fingerprint(size, mtime_ns, digest, id)
UPDATE jobs SET fp_size = :size, fp_mtime_ns = :mtime_ns, fp_digest = :digest, fp_how = 1
WHERE id = :id

-- Incremental runs -----------------------------------------------------------------------

-- name: begin_generation(name, size, mtime_ns, digest, id)
INSERT INTO jobs (name, spec_hash, fp_size, fp_mtime_ns, fp_digest, created_at, token,
    discarded_before, fp_how, origin)
SELECT :name, spec_hash, :size, :mtime_ns, :digest, created_at, token, discarded_before, 1,
    origin
FROM jobs WHERE id = :id

-- name: count_gone(olo, ohi, new_id)
SELECT count(*) FROM items AS o WHERE o.id BETWEEN :olo AND :ohi AND NOT EXISTS
    (SELECT 1 FROM items AS n WHERE n.job_id = :new_id AND n.custom_id = o.custom_id)

-- name: carry_results(lo, hi, old_id)
UPDATE items SET state = o.state, result = o.result, vector = o.vector, attempts = o.attempts,
    error_class = o.error_class, message = o.message, started_at = o.started_at,
    finished_at = o.finished_at, input_tokens = o.input_tokens,
    output_tokens = o.output_tokens, cost = o.cost, list_cost = o.list_cost
FROM items AS o
WHERE items.id BETWEEN :lo AND :hi AND items.state = 'pending' AND o.job_id = :old_id
    AND o.custom_id = items.custom_id AND o.payload = items.payload
    AND o.state IN ('succeeded', 'failed', 'invalid')

-- name: move_chunks(new_id, old_id)
UPDATE remote_batches SET job_id = :new_id WHERE job_id = :old_id

-- name: copy_cancelled(old_id, new_id)
UPDATE jobs SET cancelled = (SELECT cancelled FROM jobs WHERE id = :old_id) WHERE id = :new_id

-- name: rename_job(name, id)
UPDATE jobs SET name = :name WHERE id = :id

-- Ingest ---------------------------------------------------------------------------------

-- name: ingest_position(id)
-- After a lost connection: did the add_items that was cut off commit? (replay, ledger.py)
SELECT ingest_records, ingest_line, ingest_offset, ingest_key FROM jobs WHERE id = :id

-- name: item_ids(lo, hi)
SELECT id FROM items WHERE id BETWEEN :lo AND :hi ORDER BY id

-- name: move_cursor(records, line, offset, key, id, first_seq)
UPDATE jobs SET ingest_records = :records, ingest_line = :line, ingest_offset = :offset,
    ingest_key = :key
WHERE id = :id AND ingest_records = :first_seq

-- name: insert_succeeded(id, custom_id, line, payload, result, job_id, now)
-- The runner's fast path, and the per-record cost of ingest: what is fixed is not bound.
INSERT INTO items (id, custom_id, line, payload, result, job_id, state, attempts, started_at,
    finished_at)
VALUES (:id, :custom_id, :line, :payload, :result, :job_id, 'succeeded', 1, :now, :now)
ON CONFLICT DO NOTHING

-- name: insert_item(id, job_id, custom_id, line, payload, state, attempts, not_before, error_class, message, result, started_at, finished_at, input_tokens, output_tokens, cost, list_cost, vector)
-- Only a repeated id is skipped (see SQLLedger._duplicates); a NULL where a value belongs
-- must raise, never silently drop the row (OR IGNORE would).
INSERT INTO items (id, job_id, custom_id, line, payload, state, attempts, not_before,
    error_class, message, result, started_at, finished_at, input_tokens, output_tokens, cost,
    list_cost, vector)
VALUES (:id, :job_id, :custom_id, :line, :payload, :state, :attempts, :not_before,
    :error_class, :message, :result, :started_at, :finished_at, :input_tokens,
    :output_tokens, :cost, :list_cost, :vector)
ON CONFLICT DO NOTHING

-- name: item_by_custom_id(job_id, custom_id)
SELECT id, line FROM items WHERE job_id = :job_id AND custom_id = :custom_id

-- name: insert_reject(job_id, seq, line, custom_id, message)
INSERT INTO rejects (job_id, seq, line, custom_id, message)
VALUES (:job_id, :seq, :line, :custom_id, :message)
ON CONFLICT DO NOTHING

-- name: finish_ingest(id)
UPDATE jobs SET ingest_done = 1 WHERE id = :id

-- Work -----------------------------------------------------------------------------------

-- name: leased_at(owner, now, lo, hi)
-- After a lost connection: the items a lease that was cut off took, if it committed (its
-- `now` is its own: started_at tells its items from the owner's others).
SELECT id, custom_id, line, payload, attempts, error_class FROM items
WHERE id BETWEEN :lo AND :hi AND state = 'leased' AND lease_owner = :owner AND started_at = :now

-- name: lease(owner, expires, now, lo, hi, limit)
-- BEGIN IMMEDIATE: one process at a time takes items, so no two get the same one.
UPDATE items SET state = 'leased', lease_owner = :owner, lease_expires = :expires,
    started_at = :now
WHERE id IN (SELECT id FROM items WHERE state = 'pending' AND id BETWEEN :lo AND :hi
    AND not_before <= :now ORDER BY id LIMIT :limit)
RETURNING id, custom_id, line, payload, attempts, error_class

-- Usage adds up over attempts: a failed or repaired attempt was paid for too.
-- name: complete_done(state, result, vector, error_class, message, now, input_tokens, output_tokens, cost, list_cost, attempts, id, owner)
UPDATE items SET state = :state, result = :result, vector = :vector,
    error_class = :error_class, message = :message, finished_at = :now,
    input_tokens = coalesce(input_tokens, 0) + :input_tokens,
    output_tokens = coalesce(output_tokens, 0) + :output_tokens,
    cost = CASE WHEN :cost IS NULL THEN cost ELSE coalesce(cost, 0) + :cost END,
    list_cost = CASE WHEN :list_cost IS NULL THEN list_cost
        ELSE coalesce(list_cost, 0) + :list_cost END,
    attempts = attempts + :attempts, lease_owner = NULL, lease_expires = NULL, follow_up = NULL
WHERE id = :id AND state = 'leased' AND lease_owner = :owner

-- name: complete_again(error_class, message, not_before, input_tokens, output_tokens, cost, list_cost, attempts, id, owner)
UPDATE items SET state = 'pending', error_class = :error_class, message = :message,
    not_before = :not_before,
    input_tokens = coalesce(input_tokens, 0) + :input_tokens,
    output_tokens = coalesce(output_tokens, 0) + :output_tokens,
    cost = CASE WHEN :cost IS NULL THEN cost ELSE coalesce(cost, 0) + :cost END,
    list_cost = CASE WHEN :list_cost IS NULL THEN list_cost
        ELSE coalesce(list_cost, 0) + :list_cost END,
    attempts = attempts + :attempts, lease_owner = NULL, lease_expires = NULL, follow_up = NULL
WHERE id = :id AND state = 'leased' AND lease_owner = :owner

-- name: release_all(lo, hi, owner)
UPDATE items SET state = 'pending', lease_owner = NULL, lease_expires = NULL
WHERE id BETWEEN :lo AND :hi AND state = 'leased' AND lease_owner = :owner

-- name: release_one(id, owner)
UPDATE items SET state = 'pending', lease_owner = NULL, lease_expires = NULL
WHERE id = :id AND state = 'leased' AND lease_owner = :owner

-- name: renew(expires, lo, hi, owner)
UPDATE items SET lease_expires = :expires
WHERE id BETWEEN :lo AND :hi AND state = 'leased' AND lease_owner = :owner

-- name: reclaim_expired(lo, hi, now)
UPDATE items SET state = 'pending', lease_owner = NULL, lease_expires = NULL
WHERE id BETWEEN :lo AND :hi AND state = 'leased' AND lease_expires < :now

-- name: lease_owners(lo, hi)
SELECT DISTINCT lease_owner FROM items WHERE id BETWEEN :lo AND :hi AND state = 'leased'

-- name: update_inflight(first_seq, last_seq, job_id, owner)
UPDATE inflight SET first_seq = :first_seq, last_seq = :last_seq
WHERE job_id = :job_id AND owner = :owner

-- name: insert_inflight(first_seq, last_seq, job_id, owner)
INSERT INTO inflight (first_seq, last_seq, job_id, owner)
VALUES (:first_seq, :last_seq, :job_id, :owner)

-- name: clear_inflight(job_id, owner)
DELETE FROM inflight WHERE job_id = :job_id AND owner = :owner

-- name: inflight(job_id)
SELECT owner, first_seq, last_seq FROM inflight WHERE job_id = :job_id ORDER BY first_seq

-- name: inflight_mark(job_id, owner)
SELECT first_seq, last_seq FROM inflight WHERE job_id = :job_id AND owner = :owner

-- name: count_dead_attempt(max_attempts, message, now, error_class, lo, hi, owner)
UPDATE items SET attempts = attempts + 1,
    state = CASE WHEN attempts + 1 >= :max_attempts THEN 'failed' ELSE 'pending' END,
    message = CASE WHEN attempts + 1 >= :max_attempts
        THEN :message || ' (gave up after ' || (attempts + 1) || ' attempts)' ELSE :message END,
    finished_at = CASE WHEN attempts + 1 >= :max_attempts THEN :now ELSE NULL END,
    error_class = :error_class, not_before = 0, lease_owner = NULL, lease_expires = NULL
WHERE id BETWEEN :lo AND :hi AND state = 'leased' AND lease_owner = :owner

-- name: drop_dead_mark(job_id, owner)
DELETE FROM inflight WHERE job_id = :job_id AND owner = :owner
    AND last_seq < (SELECT ingest_records FROM jobs WHERE id = :job_id)

-- name: next_due(lo, hi)
SELECT min(not_before) FROM items WHERE state = 'pending' AND id BETWEEN :lo AND :hi

-- Reading --------------------------------------------------------------------------------

-- name: count_states(lo, hi)
-- Per state: items, first start, last finish, tokens and cost (one scan of the job's items;
-- the caller adds the states up).
SELECT state, count(*), min(started_at), max(finished_at), total(input_tokens),
    total(output_tokens), total(cost), total(list_cost)
FROM items WHERE id BETWEEN :lo AND :hi GROUP BY state

-- name: count_rejects(job_id)
SELECT count(*) FROM rejects WHERE job_id = :job_id

-- name: results(lo, hi)
SELECT id, custom_id, result, NULL, vector FROM items
WHERE id BETWEEN :lo AND :hi AND state = 'succeeded' ORDER BY id

-- name: results_with_payload(lo, hi)
SELECT id, custom_id, result, payload, vector FROM items
WHERE id BETWEEN :lo AND :hi AND state = 'succeeded' ORDER BY id

-- name: result_lines(head, lo, hi)
-- The JSONL output: the id spliced into the stored result JSON here, which is cheaper than
-- handing a million rows to Python to splice. `head` is `{"<id name>":`.
SELECT id, CAST(:head || json_quote(custom_id) || ',' || substr(CAST(result AS TEXT), 2)
    || char(10) AS BLOB)
FROM items WHERE id BETWEEN :lo AND :hi AND state = 'succeeded' ORDER BY id

-- name: failures(lo, hi, job_id)
-- Items and ingest rejects, merged in input order.
SELECT seq, custom_id, line, state, error_class, message, attempts FROM (
    SELECT id - :lo AS seq, custom_id, line, state, error_class, message, attempts
    FROM items WHERE id BETWEEN :lo AND :hi AND state IN ('failed', 'invalid')
    UNION ALL
    SELECT seq, custom_id, line, 'failed', 'input_error', message, 0
    FROM rejects WHERE job_id = :job_id
) ORDER BY seq

-- name: failure_records(lo, hi, job_id, limit)
-- The first failures in input order, with each item's input record (NULL for a line that
-- could not be read): what the dashboard shows.
SELECT seq, custom_id, line, state, error_class, message, attempts, payload FROM (
    SELECT id - :lo AS seq, custom_id, line, state, error_class, message, attempts, payload
    FROM items WHERE id BETWEEN :lo AND :hi AND state IN ('failed', 'invalid')
    UNION ALL
    SELECT seq, custom_id, line, 'failed', 'input_error', message, 0, NULL
    FROM rejects WHERE job_id = :job_id
) ORDER BY seq LIMIT :limit

-- name: finished_per_interval(lo, hi, since, width)
-- Items finished at or after `since`, counted per interval of `width` seconds (0: the first).
SELECT CAST((finished_at - :since) / :width AS INTEGER) AS n, count(*) FROM items
WHERE id BETWEEN :lo AND :hi AND finished_at >= :since GROUP BY n

-- name: reject_lines(job_id, limit)
SELECT line FROM rejects WHERE job_id = :job_id ORDER BY seq LIMIT :limit

-- name: retry(lo, hi, states)
-- `states`: a list (a JSON array here).
UPDATE items SET state = 'pending', attempts = 0, not_before = 0, error_class = NULL,
    message = NULL, result = NULL, vector = NULL, follow_up = NULL
WHERE id BETWEEN :lo AND :hi AND state IN (SELECT value FROM json_each(:states))

-- name: mark_cancelled(now, id)
UPDATE jobs SET cancelled = :now WHERE id = :id

-- name: cancel_items(lo, hi)
UPDATE items SET state = 'cancelled', lease_owner = NULL, lease_expires = NULL
WHERE id BETWEEN :lo AND :hi AND state IN ('pending', 'leased')

-- name: is_cancelled(id)
SELECT cancelled FROM jobs WHERE id = :id

-- name: undo_cancel(id, before)
UPDATE jobs SET cancelled = 0 WHERE id = :id AND cancelled != 0 AND cancelled < :before

-- name: reopen_items(lo, hi)
UPDATE items SET state = 'pending' WHERE id BETWEEN :lo AND :hi AND state = 'cancelled'

-- Remote batches -------------------------------------------------------------------------

-- name: pending_page(lo, hi, now, limit)
SELECT id, custom_id, line, payload, attempts, follow_up FROM items
WHERE state = 'pending' AND id BETWEEN :lo AND :hi AND not_before <= :now
ORDER BY id LIMIT :limit

-- name: next_chunk(job_id)
SELECT coalesce(max(chunk), 0) + 1 FROM remote_batches WHERE job_id = :job_id

-- name: submit_item(chunk, now, id)
UPDATE items SET state = 'submitted', batch_chunk = :chunk, started_at = :now
WHERE id = :id AND state = 'pending'

-- name: planned_chunk(job_id, provider, requests, now)
-- After a lost connection: the chunk a plan_chunk that was cut off made, if it committed.
SELECT chunk FROM remote_batches WHERE job_id = :job_id AND provider = :provider
    AND requests = :requests AND planned_at = :now

-- name: insert_chunk(job_id, chunk, provider, requests, now)
INSERT INTO remote_batches (job_id, chunk, provider, status, requests, planned_at,
    create_until, tagged)
VALUES (:job_id, :chunk, :provider, 'creating', :requests, :now, 0, 1)

-- name: set_create_until(until, job_id, chunk)
UPDATE remote_batches SET create_until = :until
WHERE job_id = :job_id AND chunk = :chunk AND status = 'creating'

-- name: set_remote(remote_id, input_file_id, job_id, chunk)
UPDATE remote_batches SET status = 'live', remote_id = :remote_id,
    input_file_id = :input_file_id
WHERE job_id = :job_id AND chunk = :chunk

-- name: update_chunk(remote_status, counts, job_id, chunk)
UPDATE remote_batches SET remote_status = :remote_status, counts = :counts
WHERE job_id = :job_id AND chunk = :chunk

-- name: chunks(job_id, statuses)
-- `statuses`: a list (a JSON array here); NULL for every chunk.
SELECT chunk, provider, status, remote_id, input_file_id, remote_status, requests, counts,
    planned_at, ended_at, create_until, tagged
FROM remote_batches
WHERE job_id = :job_id
    AND (:statuses IS NULL OR status IN (SELECT value FROM json_each(:statuses)))
ORDER BY chunk

-- name: chunk_items(lo, hi, chunk)
SELECT id, custom_id, line, payload, attempts, follow_up FROM items
WHERE id BETWEEN :lo AND :hi AND state = 'submitted' AND batch_chunk = :chunk ORDER BY id

-- name: finish_chunk_done(state, result, vector, error_class, message, now, input_tokens, output_tokens, cost, list_cost, attempts, id, chunk)
UPDATE items SET state = :state, result = :result, vector = :vector,
    error_class = :error_class, message = :message, finished_at = :now,
    input_tokens = coalesce(input_tokens, 0) + :input_tokens,
    output_tokens = coalesce(output_tokens, 0) + :output_tokens,
    cost = CASE WHEN :cost IS NULL THEN cost ELSE coalesce(cost, 0) + :cost END,
    list_cost = CASE WHEN :list_cost IS NULL THEN list_cost
        ELSE coalesce(list_cost, 0) + :list_cost END,
    attempts = attempts + :attempts, batch_chunk = NULL, follow_up = NULL
WHERE id = :id AND state = 'submitted' AND batch_chunk = :chunk

-- name: finish_chunk_again(error_class, message, not_before, follow_up, input_tokens, output_tokens, cost, list_cost, attempts, id, chunk)
-- `follow_up`: the request the next batch sends for this item instead of its own (a repair).
UPDATE items SET state = 'pending', error_class = :error_class, message = :message,
    not_before = :not_before, follow_up = :follow_up,
    input_tokens = coalesce(input_tokens, 0) + :input_tokens,
    output_tokens = coalesce(output_tokens, 0) + :output_tokens,
    cost = CASE WHEN :cost IS NULL THEN cost ELSE coalesce(cost, 0) + :cost END,
    list_cost = CASE WHEN :list_cost IS NULL THEN list_cost
        ELSE coalesce(list_cost, 0) + :list_cost END,
    attempts = attempts + :attempts, batch_chunk = NULL
WHERE id = :id AND state = 'submitted' AND batch_chunk = :chunk

-- name: finish_chunk_leftover(leftover, attempts, lo, hi, chunk)
UPDATE items SET state = :leftover, batch_chunk = NULL, attempts = attempts + :attempts,
    error_class = coalesce(error_class, 'no_result'),
    message = coalesce(message, 'the batch ended without a result for this item')
WHERE id BETWEEN :lo AND :hi AND state = 'submitted' AND batch_chunk = :chunk

-- name: collect_chunk(now, remote_status, job_id, chunk)
UPDATE remote_batches SET status = 'collected', ended_at = :now,
    remote_status = coalesce(:remote_status, remote_status)
WHERE job_id = :job_id AND chunk = :chunk

-- The response cache (llm/cache.py) ---------------------------------------------------------

-- name: cache_get(scope, keys)
-- `keys`: a list (a JSON array here).
SELECT key, body, input_tokens, output_tokens FROM responses
WHERE scope = :scope AND key IN (SELECT value FROM json_each(:keys))

-- name: cache_put(scope, key, body, input_tokens, output_tokens, now)
INSERT INTO responses (scope, key, body, input_tokens, output_tokens, created_at)
VALUES (:scope, :key, :body, :input_tokens, :output_tokens, :now)
ON CONFLICT (scope, key) DO UPDATE SET body = excluded.body,
    input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
    created_at = excluded.created_at

-- name: cache_clear(scope)
DELETE FROM responses WHERE scope = :scope

-- Queue intake (intake/) -------------------------------------------------------------------

-- name: items_page(lo, hi, limit)
-- Items in input order from `lo`, whatever their state: a results queue publishes them.
SELECT id, custom_id, state, result, vector, error_class, message, attempts FROM items
WHERE id BETWEEN :lo AND :hi ORDER BY id LIMIT :limit

-- Ranges (migration_5, SQLLedger.add_succeeded) ---------------------------------------------

-- name: insert_range(job_id, first_seq, last_seq, now, ids, lines, sizes, payloads, results)
INSERT INTO ranges (job_id, first_seq, last_seq, finished_at, ids, lines, sizes, payloads,
    results)
VALUES (:job_id, :first_seq, :last_seq, :now, :ids, :lines, :sizes, :payloads, :results)

-- name: ranges_page(job_id, after, upto, limit)
-- A job's ranges that hold a seq in (after, upto], in input order.
SELECT first_seq, last_seq, finished_at, ids, lines, sizes, payloads, results FROM ranges
WHERE job_id = :job_id AND first_seq <= :upto AND last_seq > :after
ORDER BY first_seq LIMIT :limit

-- name: delete_range(job_id, first_seq)
DELETE FROM ranges WHERE job_id = :job_id AND first_seq = :first_seq

-- name: delete_ranges(job_id)
DELETE FROM ranges WHERE job_id = :job_id

-- name: range_ids(job_id)
SELECT ids FROM ranges WHERE job_id = :job_id

-- name: item_custom_ids(job_id)
SELECT custom_id FROM items WHERE job_id = :job_id

-- name: range_lines(job_id)
-- Every range's ids and lines (SQLLedger._first_lines: the first lines of many ids at once).
SELECT first_seq, ids, lines FROM ranges WHERE job_id = :job_id ORDER BY first_seq

-- name: ranges_with_id(job_id, needle)
-- The ranges whose ids may hold one (`needle`: the id as JSON; the caller checks exactly).
SELECT first_seq, ids, lines FROM ranges WHERE job_id = :job_id AND instr(ids, :needle) > 0
ORDER BY first_seq

-- name: count_ranges(job_id)
-- Items held in ranges (all succeeded, usage none), first start, last finish.
SELECT coalesce(sum(last_seq - first_seq + 1), 0), min(finished_at), max(finished_at) FROM ranges WHERE job_id = :job_id

-- name: ranges_finished_since(job_id, since)
SELECT coalesce(sum(last_seq - first_seq + 1), 0) FROM ranges WHERE job_id = :job_id AND finished_at >= :since

-- name: ranges_finished_per_interval(job_id, since, width)
SELECT CAST((finished_at - :since) / :width AS INTEGER) AS n, sum(last_seq - first_seq + 1) FROM ranges
WHERE job_id = :job_id AND finished_at >= :since GROUP BY n

-- The service's catalogue (service/catalogue.py) -------------------------------------------
-- `overnight serve`'s files and batches, in a SQLite file of their own (catalogue.db in the
-- service's folder, beside the files' bytes), so the tables keep their plain names. Lists of
-- statuses are JSON arrays here.

-- name: catalogue_schema()
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    api TEXT NOT NULL,  -- 'openai' or 'anthropic': each API lists its own batches
    status TEXT NOT NULL,
    object TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status)

-- name: catalogue_durable()
-- A batch the client was told about survives an OS crash, not only a killed process.
PRAGMA synchronous=FULL

-- name: catalogue_add_file(id, tenant, filename, purpose, bytes, created_at)
-- The same id again (a result file written again) replaces it.
INSERT INTO files (id, tenant, filename, purpose, bytes, created_at)
VALUES (:id, :tenant, :filename, :purpose, :bytes, :created_at)
ON CONFLICT (id) DO UPDATE SET bytes = excluded.bytes, filename = excluded.filename

-- name: catalogue_get_file(id, tenant)
SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = :id AND tenant = :tenant

-- name: catalogue_file_seq(id, tenant)
SELECT seq FROM files WHERE id = :id AND tenant = :tenant

-- name: catalogue_files_asc(tenant, purpose, after, limit)
SELECT id, filename, purpose, bytes, created_at FROM files
WHERE tenant = :tenant AND (:purpose IS NULL OR purpose = :purpose) AND seq > :after
ORDER BY seq ASC LIMIT :limit

-- name: catalogue_files_desc(tenant, purpose, before, limit)
SELECT id, filename, purpose, bytes, created_at FROM files
WHERE tenant = :tenant AND (:purpose IS NULL OR purpose = :purpose) AND seq < :before
ORDER BY seq DESC LIMIT :limit

-- name: catalogue_delete_file(id, tenant)
DELETE FROM files WHERE id = :id AND tenant = :tenant

-- name: catalogue_lock_tenant(tenant)
-- BEGIN IMMEDIATE has locked the whole file already: a tenant's creates take turns.
SELECT :tenant

-- name: catalogue_count_active(tenant, statuses)
SELECT count(*) FROM batches
WHERE tenant = :tenant AND status IN (SELECT value FROM json_each(:statuses))

-- name: catalogue_add_batch(id, tenant, api, status, object)
INSERT INTO batches (id, tenant, api, status, object)
VALUES (:id, :tenant, :api, :status, :object)

-- name: catalogue_get_batch(id)
SELECT object, tenant FROM batches WHERE id = :id

-- name: catalogue_batch_for_update(id)
-- BEGIN IMMEDIATE has locked the whole file already.
SELECT object FROM batches WHERE id = :id

-- name: catalogue_update_batch(id, status, object)
UPDATE batches SET status = :status, object = :object WHERE id = :id

-- name: catalogue_batch_seq(id, tenant, api)
SELECT seq FROM batches WHERE id = :id AND tenant = :tenant AND api = :api

-- name: catalogue_batches_older(tenant, api, before, limit)
SELECT object FROM batches WHERE tenant = :tenant AND api = :api AND seq < :before
ORDER BY seq DESC LIMIT :limit

-- name: catalogue_batches_newer(tenant, api, after, limit)
SELECT object FROM batches WHERE tenant = :tenant AND api = :api AND seq > :after
ORDER BY seq ASC LIMIT :limit

-- name: catalogue_delete_batch(id, tenant)
DELETE FROM batches WHERE id = :id AND tenant = :tenant

-- name: catalogue_batches_in(statuses)
SELECT id FROM batches WHERE status IN (SELECT value FROM json_each(:statuses)) ORDER BY seq

-- name: catalogue_expired(statuses, now)
SELECT id FROM batches
WHERE status IN (SELECT value FROM json_each(:statuses))
    AND json_extract(object, '$.expires_at') <= :now
ORDER BY seq

-- name: catalogue_next_expiry(statuses, now)
SELECT min(json_extract(object, '$.expires_at')) FROM batches
WHERE status IN (SELECT value FROM json_each(:statuses))
    AND json_extract(object, '$.expires_at') > :now

-- name: catalogue_sizes()
SELECT api, status, coalesce(json_extract(object, '$.request_counts.total'), 0) FROM batches
