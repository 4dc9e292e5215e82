-- Schedulers by name, with stable ids for the data API and the enable control action.
CREATE TABLE schedulers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    enabled INTEGER NOT NULL DEFAULT 1
);
