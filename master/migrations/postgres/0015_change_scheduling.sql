-- A change is stored with a marker that goes once every scheduler has acted on it. A master that
-- stops in between (killed, or its database gone) leaves the marker behind, and housekeeping on
-- any master schedules the change again. Each scheduler's action records (change, scheduler) in
-- the transaction that acts, so a change scheduled again never gets the same action twice.
CREATE TABLE unscheduled_changes (
    changeid BIGINT PRIMARY KEY,
    stored_at BIGINT NOT NULL
);
CREATE TABLE change_schedulings (
    changeid BIGINT NOT NULL,
    scheduler TEXT NOT NULL,
    acted_at BIGINT NOT NULL,
    PRIMARY KEY (changeid, scheduler)
);
CREATE INDEX change_schedulings_acted ON change_schedulings (acted_at);
