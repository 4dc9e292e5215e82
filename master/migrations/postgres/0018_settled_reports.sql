-- Settled reports are forgotten a while after they were settled, oldest first: this index finds
-- them without reading the reports still owed.
CREATE INDEX reports_settled ON reports (settled_at) WHERE settled_at IS NOT NULL;
