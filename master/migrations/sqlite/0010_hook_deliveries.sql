-- Webhook deliveries already acted on, by the sender's delivery id (GitHub's X-GitHub-Delivery,
-- GitLab's X-Gitlab-Event-UUID), so that a redelivery stores nothing. Kept for a bounded time.
CREATE TABLE hook_deliveries (
    source TEXT NOT NULL,
    delivery TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (source, delivery)
);
CREATE INDEX hook_deliveries_received ON hook_deliveries (received_at);
