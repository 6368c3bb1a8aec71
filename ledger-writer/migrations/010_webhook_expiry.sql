-- The dispatcher dead-letters every pending delivery past
-- webhooks.give_up_after_seconds each pass, attempted or not: by age.
CREATE INDEX webhook_deliveries_pending_age ON webhook_deliveries (created_at)
    WHERE status = 'pending';
