-- Fencing of the relay: the newest partition lease token PostgreSQL has
-- seen per ledger partition. A batch carries its writer's token and is
-- refused when an older one (a writer that lost its lease) tries to write.
CREATE TABLE relay_fence (
    partition  integer PRIMARY KEY,
    token      bigint NOT NULL,
    owner      text NOT NULL,
    updated_at timestamptz NOT NULL
);
