-- What collapsing compares (codebases with their repository, branch and project), hashed, so that
-- a new request finds the pending requests it may collapse by index, however deep the queue.
ALTER TABLE buildrequests ADD COLUMN collapse_key TEXT;
CREATE INDEX buildrequests_pending_by_key ON buildrequests (builderid, collapse_key, id)
    WHERE complete = 0 AND claimed_by_masterid IS NULL;
