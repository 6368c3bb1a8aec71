//! Versioned PostgreSQL migrations, embedded in the binary.
//!
//! Owns bringing a database to the schema this writer needs: each file of
//! `migrations/` is applied once, in order, in its own transaction, recorded
//! in `schema_migrations`. A transaction-level advisory lock makes writers
//! starting together apply each migration once. The views are not
//! migrations: `migrations/views.sql` is applied whole after them (see
//! `VIEWS`), so each view has one definition, edited in place.

use tokio_postgres::Client;

/// `(version, name, sql)` in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "ledger", include_str!("../migrations/001_ledger.sql")),
    (2, "views", include_str!("../migrations/002_views.sql")),
    (
        3,
        "relay_fence",
        include_str!("../migrations/003_relay_fence.sql"),
    ),
    (
        4,
        "reconciliation",
        include_str!("../migrations/004_reconciliation.sql"),
    ),
    (
        5,
        "partitioned_ledger",
        include_str!("../migrations/005_partitioned_ledger.sql"),
    ),
    (
        6,
        "adjust_source_index",
        include_str!("../migrations/006_adjust_source_index.sql"),
    ),
    (7, "signals", include_str!("../migrations/007_signals.sql")),
    (
        8,
        "webhooks",
        include_str!("../migrations/008_webhooks.sql"),
    ),
    (
        9,
        "signal_transfers",
        include_str!("../migrations/009_signal_transfers.sql"),
    ),
    (
        10,
        "webhook_expiry",
        include_str!("../migrations/010_webhook_expiry.sql"),
    ),
    (
        11,
        "signal_shortfall",
        include_str!("../migrations/011_signal_shortfall.sql"),
    ),
];

/// The analytics views, the one home of their definitions: applied whole
/// after a run that applied a migration (a migration may drop them with the
/// tables they read) or when the text changed since it was last applied.
const VIEWS: &str = include_str!("../migrations/views.sql");

/// An arbitrary constant: the advisory lock all writers take to migrate.
const MIGRATION_LOCK: i64 = 0x001e_d9e7;

/// Applies every migration the database does not have yet; returns how many.
pub async fn migrate(client: &mut Client) -> Result<usize, tokio_postgres::Error> {
    // Under the lock too: two writers starting together both "create if not
    // exists", and one of them fails on the catalog's unique index otherwise.
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS schema_views (
                 sha256 text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    transaction.commit().await?;
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        let transaction = client.transaction().await?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let done = transaction
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            // A migration may move a whole ledger (005 partitions it).
            transaction
                .batch_execute("SET LOCAL statement_timeout = 0")
                .await?;
            transaction.batch_execute(sql).await?;
            transaction
                .execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    &[version, name],
                )
                .await?;
            applied += 1;
            tracing::info!(version, name, "migration applied");
        }
        transaction.commit().await?;
    }
    let views_sha256 = crate::sha256_hex(VIEWS.as_bytes());
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let current = transaction
        .query_opt(
            "SELECT 1 FROM schema_views WHERE sha256 = $1",
            &[&views_sha256],
        )
        .await?
        .is_some();
    if applied > 0 || !current {
        transaction.batch_execute(VIEWS).await?;
        transaction
            .batch_execute("DELETE FROM schema_views")
            .await?;
        transaction
            .execute(
                "INSERT INTO schema_views (sha256) VALUES ($1)",
                &[&views_sha256],
            )
            .await?;
        tracing::info!("analytics views applied");
    }
    transaction.commit().await?;
    Ok(applied)
}
