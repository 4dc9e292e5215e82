-- Control actions: a stop asked of a build whose request another master may hold, and the
-- rebuilt build of a rebuild buildset.
ALTER TABLE buildrequests ADD COLUMN stop_requested INTEGER NOT NULL DEFAULT 0;
