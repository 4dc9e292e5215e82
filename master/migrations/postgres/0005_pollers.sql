-- Git pollers: the branch tips last seen, and which master polls each poller on schedule.
CREATE TABLE poller_tips (
    poller TEXT NOT NULL,
    branch TEXT NOT NULL,
    revision TEXT NOT NULL,
    PRIMARY KEY (poller, branch)
);

CREATE TABLE poller_claims (
    poller TEXT PRIMARY KEY,
    masterid BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);

-- Whether a poller has ever recorded its tips (a repository may have no branches yet).
CREATE TABLE poller_started (
    poller TEXT PRIMARY KEY
);
