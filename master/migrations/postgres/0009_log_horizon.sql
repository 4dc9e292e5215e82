-- The logs still holding text, for the log janitor: deleted logs (type 'd') drop out, so
-- finding what to delete costs the logs kept, not every log ever written.
CREATE INDEX logs_kept ON logs (id) WHERE type <> 'd';
