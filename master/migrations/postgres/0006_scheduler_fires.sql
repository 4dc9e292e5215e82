-- When each Periodic or Nightly scheduler fires next. Firing moves this forward with a
-- compare-and-swap, so exactly one master fires it; `spec` notices a changed schedule.
CREATE TABLE scheduler_fires (
    scheduler TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    next_fire_at BIGINT NOT NULL
);
