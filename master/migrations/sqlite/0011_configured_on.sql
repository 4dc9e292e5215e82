-- The builders each worker may run, on which master, as Buildbot's `configured_on` shows them:
-- a JSON list of {"builderid": n, "masterid": n}, written when the worker connects.
ALTER TABLE workers ADD COLUMN configured_on TEXT NOT NULL DEFAULT '[]';
