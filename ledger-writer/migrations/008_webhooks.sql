-- Partner webhooks (the `webhooks` crate; the gateway's /v1/webhooks routes
-- write registrations, the ledger writer's dispatcher delivers).

CREATE TABLE webhooks (
    merchant      text NOT NULL,
    name          text NOT NULL,
    url           text NOT NULL,
    events        text[] NOT NULL,
    -- XChaCha20-Poly1305 under webhooks.secret_key: nonce, then ciphertext.
    secret_sealed bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant, name)
);

-- Signals handed to the webhooks (each signal once, whatever the webhooks).
ALTER TABLE signals ADD COLUMN fanned_at timestamptz;
UPDATE signals SET fanned_at = now();
CREATE INDEX signals_unfanned ON signals (id) WHERE fanned_at IS NULL;

-- One row per (webhook, signal): its attempts until a 2xx (delivered) or
-- until webhooks.give_up_after_seconds (failed: the dead letter).
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    merchant         text NOT NULL,
    name             text NOT NULL,
    signal_id        bigint NOT NULL,
    -- The Webhook-Id of every attempt: the signal's signal_id.
    webhook_id       text NOT NULL,
    event            text NOT NULL,
    -- merchant|sku|location: one key's deliveries to one webhook go in order.
    stock_key        text NOT NULL,
    -- The body, exactly as signed.
    payload          text NOT NULL,
    status           text NOT NULL DEFAULT 'pending',
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    FOREIGN KEY (merchant, name) REFERENCES webhooks ON DELETE CASCADE,
    UNIQUE (merchant, name, signal_id)
);
CREATE INDEX webhook_deliveries_pending
    ON webhook_deliveries (merchant, name, stock_key, id) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (merchant, name, id);

CREATE TABLE webhook_attempts (
    delivery_id bigint NOT NULL REFERENCES webhook_deliveries ON DELETE CASCADE,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    status_code integer,
    error       text,
    duration_ms integer NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
