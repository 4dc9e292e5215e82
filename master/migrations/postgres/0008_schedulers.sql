-- Schedulers by name, with stable ids for the data API and the enable control action.
CREATE TABLE schedulers (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    enabled BIGINT NOT NULL DEFAULT 1
);
