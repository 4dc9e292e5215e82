-- Kiln's queue and history, after Buildbot's data model. Times are milliseconds since the Unix
-- epoch (the REST API reports whole seconds, as Buildbot does). Flags are 0/1 integers.

CREATE TABLE masters (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    active BIGINT NOT NULL DEFAULT 1,
    last_active BIGINT NOT NULL
);

CREATE TABLE builders (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT,
    tags TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE workers (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    info TEXT NOT NULL DEFAULT '{}',
    paused BIGINT NOT NULL DEFAULT 0,
    pause_reason TEXT,
    graceful BIGINT NOT NULL DEFAULT 0,
    connected_masterid BIGINT REFERENCES masters(id),
    last_connected_at BIGINT
);

CREATE TABLE sourcestamps (
    id BIGSERIAL PRIMARY KEY,
    ss_hash TEXT NOT NULL UNIQUE,
    branch TEXT,
    revision TEXT,
    repository TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    codebase TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
);

CREATE TABLE changes (
    changeid BIGSERIAL PRIMARY KEY,
    author TEXT NOT NULL,
    committer TEXT,
    comments TEXT NOT NULL,
    branch TEXT,
    revision TEXT,
    revlink TEXT,
    when_timestamp BIGINT NOT NULL,
    category TEXT,
    repository TEXT NOT NULL DEFAULT '',
    codebase TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '[]',
    properties TEXT NOT NULL DEFAULT '{}',
    sourcestampid BIGINT NOT NULL REFERENCES sourcestamps(id)
);
CREATE INDEX changes_sourcestampid ON changes (sourcestampid);

CREATE TABLE buildsets (
    id BIGSERIAL PRIMARY KEY,
    external_idstring TEXT,
    reason TEXT NOT NULL DEFAULT '',
    submitted_at BIGINT NOT NULL,
    complete BIGINT NOT NULL DEFAULT 0,
    complete_at BIGINT,
    results BIGINT NOT NULL DEFAULT -1,
    parent_buildid BIGINT,
    parent_relationship TEXT,
    rebuilt_buildid BIGINT,
    properties TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE buildset_sourcestamps (
    buildsetid BIGINT NOT NULL REFERENCES buildsets(id),
    sourcestampid BIGINT NOT NULL REFERENCES sourcestamps(id),
    UNIQUE (buildsetid, sourcestampid)
);

-- The queue. A request is claimable while complete = 0 and claimed_by_masterid IS NULL. A claim
-- carries a token (fencing: only the holder of the current token may finish it) and a lease.
CREATE TABLE buildrequests (
    id BIGSERIAL PRIMARY KEY,
    buildsetid BIGINT NOT NULL REFERENCES buildsets(id),
    builderid BIGINT NOT NULL REFERENCES builders(id),
    priority BIGINT NOT NULL DEFAULT 0,
    complete BIGINT NOT NULL DEFAULT 0,
    results BIGINT NOT NULL DEFAULT -1,
    submitted_at BIGINT NOT NULL,
    complete_at BIGINT,
    waited_for BIGINT NOT NULL DEFAULT 0,
    claimed_by_masterid BIGINT REFERENCES masters(id),
    claimed_at BIGINT,
    claim_token BIGINT,
    lease_expires_at BIGINT
);
CREATE INDEX buildrequests_claimable ON buildrequests (priority DESC, submitted_at, id)
    WHERE complete = 0 AND claimed_by_masterid IS NULL;
CREATE INDEX buildrequests_claimed ON buildrequests (claimed_by_masterid, lease_expires_at)
    WHERE complete = 0 AND claimed_by_masterid IS NOT NULL;
CREATE INDEX buildrequests_buildsetid ON buildrequests (buildsetid);

CREATE TABLE builds (
    id BIGSERIAL PRIMARY KEY,
    number BIGINT NOT NULL,
    builderid BIGINT NOT NULL REFERENCES builders(id),
    buildrequestid BIGINT NOT NULL REFERENCES buildrequests(id),
    workerid BIGINT REFERENCES workers(id),
    masterid BIGINT NOT NULL REFERENCES masters(id),
    started_at BIGINT NOT NULL,
    complete_at BIGINT,
    results BIGINT,
    state_string TEXT NOT NULL DEFAULT '',
    properties TEXT NOT NULL DEFAULT '{}',
    UNIQUE (builderid, number)
);
CREATE INDEX builds_buildrequestid ON builds (buildrequestid);
CREATE INDEX builds_incomplete ON builds (masterid) WHERE complete_at IS NULL;

CREATE TABLE steps (
    id BIGSERIAL PRIMARY KEY,
    number BIGINT NOT NULL,
    name TEXT NOT NULL,
    buildid BIGINT NOT NULL REFERENCES builds(id),
    started_at BIGINT,
    complete_at BIGINT,
    results BIGINT,
    state_string TEXT NOT NULL DEFAULT '',
    urls TEXT NOT NULL DEFAULT '[]',
    hidden BIGINT NOT NULL DEFAULT 0,
    UNIQUE (buildid, number),
    UNIQUE (buildid, name)
);

CREATE TABLE logs (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL,
    stepid BIGINT NOT NULL REFERENCES steps(id),
    complete BIGINT NOT NULL DEFAULT 0,
    num_lines BIGINT NOT NULL DEFAULT 0,
    type TEXT NOT NULL,
    UNIQUE (stepid, slug)
);

-- Lines first_line..=last_line (0-based) of a log; content is compressed when compressed = 4 (zstd).
CREATE TABLE logchunks (
    logid BIGINT NOT NULL REFERENCES logs(id),
    first_line BIGINT NOT NULL,
    last_line BIGINT NOT NULL,
    content BYTEA NOT NULL,
    compressed BIGINT NOT NULL,
    PRIMARY KEY (logid, first_line)
);
