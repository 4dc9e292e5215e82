-- An outbox of completed buildsets: written in the transaction that completes a buildset, taken
-- (and deleted) by whichever master acts on it, e.g. to fire Dependent schedulers exactly once.
CREATE TABLE completed_buildsets (
    bsid BIGINT PRIMARY KEY REFERENCES buildsets(id),
    results BIGINT NOT NULL
);
