-- The claimable requests of one builder in the order they are claimed. A worker claims among
-- the builders it serves: without this index the claim read every open request of those
-- builders and sorted them, so a claim's cost grew with the depth of the queue.
CREATE INDEX buildrequests_claimable_by_builder ON buildrequests (builderid, priority DESC, submitted_at, id)
    WHERE complete = 0 AND claimed_by_masterid IS NULL;
