-- Kiln's queue and history, after Buildbot's data model. Times are milliseconds since the Unix
-- epoch (the REST API reports whole seconds, as Buildbot does). Flags are 0/1 integers.

CREATE TABLE masters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    active INTEGER NOT NULL DEFAULT 1,
    last_active INTEGER NOT NULL
);

CREATE TABLE builders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    description TEXT,
    tags TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE workers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    info TEXT NOT NULL DEFAULT '{}',
    paused INTEGER NOT NULL DEFAULT 0,
    pause_reason TEXT,
    graceful INTEGER NOT NULL DEFAULT 0,
    connected_masterid INTEGER REFERENCES masters(id),
    last_connected_at INTEGER
);

CREATE TABLE sourcestamps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ss_hash TEXT NOT NULL UNIQUE,
    branch TEXT,
    revision TEXT,
    repository TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    codebase TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL
);

CREATE TABLE changes (
    changeid INTEGER PRIMARY KEY AUTOINCREMENT,
    author TEXT NOT NULL,
    committer TEXT,
    comments TEXT NOT NULL,
    branch TEXT,
    revision TEXT,
    revlink TEXT,
    when_timestamp INTEGER NOT NULL,
    category TEXT,
    repository TEXT NOT NULL DEFAULT '',
    codebase TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '[]',
    properties TEXT NOT NULL DEFAULT '{}',
    sourcestampid INTEGER NOT NULL REFERENCES sourcestamps(id)
);
CREATE INDEX changes_sourcestampid ON changes (sourcestampid);

CREATE TABLE buildsets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    external_idstring TEXT,
    reason TEXT NOT NULL DEFAULT '',
    submitted_at INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    complete_at INTEGER,
    results INTEGER NOT NULL DEFAULT -1,
    parent_buildid INTEGER,
    parent_relationship TEXT,
    rebuilt_buildid INTEGER,
    properties TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE buildset_sourcestamps (
    buildsetid INTEGER NOT NULL REFERENCES buildsets(id),
    sourcestampid INTEGER NOT NULL REFERENCES sourcestamps(id),
    UNIQUE (buildsetid, sourcestampid)
);

-- The queue. A request is claimable while complete = 0 and claimed_by_masterid IS NULL. A claim
-- carries a token (fencing: only the holder of the current token may finish it) and a lease.
CREATE TABLE buildrequests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    buildsetid INTEGER NOT NULL REFERENCES buildsets(id),
    builderid INTEGER NOT NULL REFERENCES builders(id),
    priority INTEGER NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0,
    results INTEGER NOT NULL DEFAULT -1,
    submitted_at INTEGER NOT NULL,
    complete_at INTEGER,
    waited_for INTEGER NOT NULL DEFAULT 0,
    claimed_by_masterid INTEGER REFERENCES masters(id),
    claimed_at INTEGER,
    claim_token INTEGER,
    lease_expires_at INTEGER
);
CREATE INDEX buildrequests_claimable ON buildrequests (priority DESC, submitted_at, id)
    WHERE complete = 0 AND claimed_by_masterid IS NULL;
CREATE INDEX buildrequests_claimed ON buildrequests (claimed_by_masterid, lease_expires_at)
    WHERE complete = 0 AND claimed_by_masterid IS NOT NULL;
CREATE INDEX buildrequests_buildsetid ON buildrequests (buildsetid);

CREATE TABLE builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    number INTEGER NOT NULL,
    builderid INTEGER NOT NULL REFERENCES builders(id),
    buildrequestid INTEGER NOT NULL REFERENCES buildrequests(id),
    workerid INTEGER REFERENCES workers(id),
    masterid INTEGER NOT NULL REFERENCES masters(id),
    started_at INTEGER NOT NULL,
    complete_at INTEGER,
    results INTEGER,
    state_string TEXT NOT NULL DEFAULT '',
    properties TEXT NOT NULL DEFAULT '{}',
    UNIQUE (builderid, number)
);
CREATE INDEX builds_buildrequestid ON builds (buildrequestid);
CREATE INDEX builds_incomplete ON builds (masterid) WHERE complete_at IS NULL;

CREATE TABLE steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    number INTEGER NOT NULL,
    name TEXT NOT NULL,
    buildid INTEGER NOT NULL REFERENCES builds(id),
    started_at INTEGER,
    complete_at INTEGER,
    results INTEGER,
    state_string TEXT NOT NULL DEFAULT '',
    urls TEXT NOT NULL DEFAULT '[]',
    hidden INTEGER NOT NULL DEFAULT 0,
    UNIQUE (buildid, number),
    UNIQUE (buildid, name)
);

CREATE TABLE logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    slug TEXT NOT NULL,
    stepid INTEGER NOT NULL REFERENCES steps(id),
    complete INTEGER NOT NULL DEFAULT 0,
    num_lines INTEGER NOT NULL DEFAULT 0,
    type TEXT NOT NULL,
    UNIQUE (stepid, slug)
);

-- Lines first_line..=last_line (0-based) of a log; content is compressed when compressed = 4 (zstd).
CREATE TABLE logchunks (
    logid INTEGER NOT NULL REFERENCES logs(id),
    first_line INTEGER NOT NULL,
    last_line INTEGER NOT NULL,
    content BLOB NOT NULL,
    compressed INTEGER NOT NULL,
    PRIMARY KEY (logid, first_line)
);
