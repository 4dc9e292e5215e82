-- The outbox's indexes hold only the rows each statement looks for: a claim reads the due,
-- unclaimed reports (not those being sent), a build's end finds its held reports, the order
-- check sees only pending reports, and expired claims are found without reading the rest. The
-- previous indexes covered every report ever written, so a claim read each report in flight.
DROP INDEX reports_pending;
DROP INDEX reports_order;
CREATE INDEX reports_due ON reports (next_attempt_at, id) WHERE state = 'pending' AND claimed_by_masterid IS NULL;
CREATE INDEX reports_held ON reports (buildid) WHERE state = 'held';
CREATE INDEX reports_order ON reports (order_key, id) WHERE state = 'pending';
CREATE INDEX reports_claimed ON reports (claim_expires_at) WHERE state = 'pending' AND claimed_by_masterid IS NOT NULL;
