-- Random keys every master of the database shares, made by whichever master needs one first:
-- `ui-session` signs the web UI's login cookies, so a session holds on any master.
CREATE TABLE master_keys (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
