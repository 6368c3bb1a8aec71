//! The ledger's days archived as Parquet, dropped from PostgreSQL by
//! retention and replayed, on the real stack: nothing is lost, the audit
//! balances at every step (from carried balances while a day is dropped),
//! and a day the archive does not hold whole is never dropped.

mod common;

use std::collections::BTreeMap;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use allocator::LedgerEntry;
use ledger_writer::archive::{Archive, day_text};

/// Runs a writer subcommand with `args`; its output.
fn run(setup: &common::Setup, subcommand: &str, args: &[&str]) -> Output {
    common::writer_command(setup, subcommand)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run ledger-writer")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every ledger row's entry, by entry id.
async fn entries(client: &tokio_postgres::Client) -> BTreeMap<String, LedgerEntry> {
    client
        .query("SELECT entry_id, entry::text FROM ledger", &[])
        .await
        .expect("ledger")
        .iter()
        .map(|row| {
            (
                row.get::<_, String>(0),
                LedgerEntry::parse(row.get::<_, &str>(1)).expect("an entry"),
            )
        })
        .collect()
}

async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

async fn today(client: &tokio_postgres::Client) -> String {
    let day: time::Date = client
        .query_one("SELECT (now() AT TIME ZONE 'UTC')::date", &[])
        .await
        .expect("today")
        .get(0);
    day_text(day)
}

/// Runs the workload with a writer until PostgreSQL has every entry, then
/// stops the writer (nothing else writes the ledger until it runs again).
async fn workload(
    setup: &common::Setup,
    allocator: &Arc<allocator::Allocator>,
    batch: &'static str,
) {
    let writer = common::start_writer(setup);
    let before = common::ledger_rows(setup).await as u64;
    let written = common::operations(Arc::clone(allocator), 25, batch).await;
    let rows = common::wait_for_rows(setup, before + written, Duration::from_secs(60)).await;
    assert_eq!(
        rows as u64,
        before + written,
        "{}",
        common::writer_logs(setup)
    );
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_archived_dropped_and_replayed_loses_nothing_and_balances_throughout() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    workload(&setup, &allocator, "a").await;
    let client = common::postgres(&setup).await;
    let before = entries(&client).await;
    let day = today(&client).await;
    let directory = tempfile::tempdir().expect("archive directory");
    let archive_dir = directory.path().to_str().expect("utf-8 path");

    let archived = run(&setup, "archive", &["--day", &day, "--to", archive_dir]);
    assert!(archived.status.success(), "{}", text(&archived));
    assert!(text(&archived).contains("Written"), "{}", text(&archived));
    // Again: the same files, byte for byte.
    let again = run(&setup, "archive", &["--day", &day, "--to", archive_dir]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        !text(&again).contains("Written") && !text(&again).contains("Extended"),
        "{}",
        text(&again)
    );

    // The crate reads back every entry exactly as PostgreSQL holds it.
    let archive = Archive::open(archive_dir).expect("archive");
    let mut read_back = BTreeMap::new();
    for manifest in archive.manifests(None).await.expect("manifests").values() {
        for entry in archive.read(manifest).await.expect("a file") {
            read_back.insert(entry.entry_id.clone().expect("an id"), entry);
        }
    }
    assert_eq!(read_back, before);

    // Dropped: the ledger holds nothing of the day, and the audit still
    // balances, from the carried balances.
    let dropped = run(
        &setup,
        "retention",
        &["--day", &day, "--apply", "--archive", archive_dir],
    );
    assert!(dropped.status.success(), "{}", text(&dropped));
    assert!(text(&dropped).contains(": dropped ("), "{}", text(&dropped));
    assert_eq!(count(&client, "ledger").await, 0);
    assert!(count(&client, "ledger_carried").await > 0);
    assert!(count(&client, "stock_history_daily").await > 0);
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");

    // Replayed into an empty database (and its Kafka topic): the same
    // entries, and the books balance there too.
    let fresh = common::setup_with(&setup.redis_url, &[]).await;
    let replayed = run(&fresh, "replay", &["--from-archive", archive_dir]);
    assert!(replayed.status.success(), "{}", text(&replayed));
    let into_kafka = run(
        &fresh,
        "replay",
        &["--from-archive", archive_dir, "--into", "kafka"],
    );
    assert!(into_kafka.status.success(), "{}", text(&into_kafka));
    let fresh_client = common::postgres(&fresh).await;
    assert_eq!(entries(&fresh_client).await, before);
    let (balanced, report) = common::audit(&fresh);
    assert!(balanced, "{report}");

    // Replayed into the database it was dropped from: the day is back and
    // its carried balances are gone; a second replay adds nothing.
    let back = run(
        &setup,
        "replay",
        &[
            "--from-archive",
            archive_dir,
            "--since",
            &day,
            "--until",
            &day,
        ],
    );
    assert!(back.status.success(), "{}", text(&back));
    assert_eq!(entries(&client).await, before);
    assert_eq!(count(&client, "ledger_carried").await, 0);
    let twice = run(&setup, "replay", &["--from-archive", archive_dir]);
    assert!(
        text(&twice).contains("; 0 rows new to postgresql"),
        "{}",
        text(&twice)
    );
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_drops_a_day_the_archive_does_not_hold_whole() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    workload(&setup, &allocator, "b").await;
    let client = common::postgres(&setup).await;
    let rows = count(&client, "ledger").await;
    let day = today(&client).await;

    // The archive target is not writable (a file where its directory should
    // be): archiving fails, and retention drops nothing.
    let blocked = tempfile::NamedTempFile::new().expect("a file");
    let blocked_path = blocked.path().to_str().expect("utf-8 path");
    let failed = run(&setup, "archive", &["--day", &day, "--to", blocked_path]);
    assert!(!failed.status.success(), "{}", text(&failed));
    let refused = run(
        &setup,
        "retention",
        &["--day", &day, "--apply", "--archive", blocked_path],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    // An archive that holds nothing of the day: kept.
    let directory = tempfile::tempdir().expect("archive directory");
    let archive_dir = directory.path().to_str().expect("utf-8 path");
    let refused = run(
        &setup,
        "retention",
        &["--day", &day, "--apply", "--archive", archive_dir],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("kept: not archived"),
        "{}",
        text(&refused)
    );
    assert_eq!(count(&client, "ledger").await, rows);

    // Archived, then one file damaged: verify and retention say which, and
    // archiving again refuses to build on it.
    let archived = run(&setup, "archive", &["--day", &day, "--to", archive_dir]);
    assert!(archived.status.success(), "{}", text(&archived));
    let damaged = walk(directory.path())
        .into_iter()
        .find(|path| {
            path.extension()
                .is_some_and(|extension| extension == "parquet")
        })
        .expect("a parquet file");
    let original = std::fs::read(&damaged).expect("read");
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    std::fs::write(&damaged, &flipped).expect("damage");
    let verify = run(&setup, "verify", &["--day", &day, "--archive", archive_dir]);
    assert!(!verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("sha256"), "{}", text(&verify));
    let refused = run(
        &setup,
        "retention",
        &["--day", &day, "--apply", "--archive", archive_dir],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    assert_eq!(count(&client, "ledger").await, rows);
    let rebuilt_on_damage = run(&setup, "archive", &["--day", &day, "--to", archive_dir]);
    assert!(
        !rebuilt_on_damage.status.success(),
        "{}",
        text(&rebuilt_on_damage)
    );
    std::fs::write(&damaged, &original).expect("mend");

    // Dropped; then the writer relays more of the same day (the partition
    // comes back): the audit chains the new entries onto the carried
    // balances, and the day cannot be dropped again until those are archived.
    let dropped = run(
        &setup,
        "retention",
        &["--day", &day, "--apply", "--archive", archive_dir],
    );
    assert!(dropped.status.success(), "{}", text(&dropped));
    assert_eq!(count(&client, "ledger").await, 0);
    workload(&setup, &allocator, "c").await;
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");
    let refused = run(
        &setup,
        "retention",
        &["--day", &day, "--apply", "--archive", archive_dir],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("not archived"),
        "{}",
        text(&refused)
    );
    let extended = run(&setup, "archive", &["--day", &day, "--to", archive_dir]);
    assert!(text(&extended).contains("Extended"), "{}", text(&extended));
    let dropped = run(
        &setup,
        "retention",
        &["--day", &day, "--apply", "--archive", archive_dir],
    );
    assert!(dropped.status.success(), "{}", text(&dropped));
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");

    // Rebuild needs the dropped entries: refused without the archive, done
    // with it, and the books still balance.
    let refused = run(&setup, "rebuild", &["--all", "--force"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("rebuild --from-archive"),
        "{}",
        text(&refused)
    );
    let rebuilt = run(
        &setup,
        "rebuild",
        &["--all", "--force", "--from-archive", archive_dir],
    );
    assert!(rebuilt.status.success(), "{}", text(&rebuilt));
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");
}

/// Every file under `directory`.
fn walk(directory: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(directory).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
