-- The reporters' outbox: one row per report a build owes a reporter ("started" or "finished"),
-- written in the transaction that starts or finishes the build and sent afterwards, by whichever
-- master claims it. Reports with the same order key (reporter, builder, revision) go out in id
-- order: a later one waits until the earlier ones are settled.
CREATE TABLE reports (
    id BIGSERIAL PRIMARY KEY,
    reporter TEXT NOT NULL,
    buildid BIGINT NOT NULL,
    event TEXT NOT NULL,
    order_key TEXT NOT NULL,
    -- pending, sent, skipped (its mode does not report this result), failed (refused), abandoned (too old)
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    claimed_by_masterid BIGINT,
    claim_expires_at BIGINT,
    last_answer TEXT,
    created_at BIGINT NOT NULL,
    settled_at BIGINT
);
CREATE INDEX reports_pending ON reports (state, next_attempt_at);
CREATE INDEX reports_order ON reports (order_key, state, id);
