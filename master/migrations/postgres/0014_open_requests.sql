-- The requests not yet complete, by builder, with whether they are claimed. The queue's depth,
-- read by every pool's scaler on each dispatch round, reads only these: without the index each
-- read scanned every request ever made, and a master's cost per build grew with its history.
CREATE INDEX buildrequests_open_by_builder ON buildrequests (builderid, claimed_by_masterid) WHERE complete = 0;
