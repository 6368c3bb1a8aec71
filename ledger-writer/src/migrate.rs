//! Versioned PostgreSQL migrations, embedded in the binary.
//!
//! Owns bringing a database to the schema this writer needs: each file of
//! `migrations/` is applied once, in order, in its own transaction, recorded
//! in `schema_migrations`. A transaction-level advisory lock makes writers
//! starting together apply each migration once.

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
];

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
    Ok(applied)
}
