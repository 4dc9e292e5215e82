-- Tree-stable timers and the changes classified under them, so both survive a restart and any
-- master sharing the database can fire a timer that is due (exactly one does).
CREATE TABLE scheduler_changes (
    scheduler TEXT NOT NULL,
    timer_key TEXT NOT NULL,
    changeid INTEGER NOT NULL REFERENCES changes(changeid),
    important INTEGER NOT NULL,
    PRIMARY KEY (scheduler, changeid)
);
CREATE INDEX scheduler_changes_timer ON scheduler_changes (scheduler, timer_key);

CREATE TABLE scheduler_timers (
    scheduler TEXT NOT NULL,
    timer_key TEXT NOT NULL,
    fire_at INTEGER NOT NULL,
    PRIMARY KEY (scheduler, timer_key)
);
CREATE INDEX scheduler_timers_fire_at ON scheduler_timers (fire_at);
