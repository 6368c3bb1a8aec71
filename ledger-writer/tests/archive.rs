//! The ledger's days archived as Parquet, dropped from PostgreSQL by
//! retention and replayed, on the real stack: nothing is lost, the audit
//! balances at every step (from carried balances while a day is dropped),
//! and a day the archive does not hold whole is never dropped.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use allocator::LedgerEntry;
use ledger_writer::archive::{Archive, day_text};

use common::{output_text as text, run_writer as run};

/// `retention --day DAY --apply` against `archive`.
fn drop_day(setup: &common::Setup, day: &str, archive: &str) -> std::process::Output {
    run(
        setup,
        "retention",
        &["--day", day, "--apply", "--archive", archive],
    )
}

/// Runs `script` with `python` and `args`; its standard output (it must
/// succeed).
fn python(
    python: std::path::PathBuf,
    script: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::path::Path)],
) -> String {
    let mut command = std::process::Command::new(&python);
    command.args(["-c", script]).args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap_or_else(|error| {
        panic!(
            "{}: {error} (scripts/stack up installs it)",
            python.display()
        )
    });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The rows of `sql` as JSON arrays: its first `texts` columns text, the
/// rest bigint (to compare with what DuckDB gives).
async fn rows_as_json(
    client: &tokio_postgres::Client,
    sql: &str,
    texts: usize,
) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = client
        .query(sql, &[])
        .await
        .expect(sql)
        .iter()
        .map(|row| {
            let mut values: Vec<serde_json::Value> =
                (0..texts).map(|i| row.get::<_, String>(i).into()).collect();
            values.extend((texts..row.len()).map(|i| row.get::<_, i64>(i).into()));
            values.into()
        })
        .collect();
    assert!(!rows.is_empty(), "{sql}: no rows");
    rows.into()
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
    let dropped = drop_day(&setup, &day, archive_dir);
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
    let refused = drop_day(&setup, &day, blocked_path);
    assert!(!refused.status.success(), "{}", text(&refused));
    // An archive that holds nothing of the day: kept.
    let directory = tempfile::tempdir().expect("archive directory");
    let archive_dir = directory.path().to_str().expect("utf-8 path");
    let refused = drop_day(&setup, &day, archive_dir);
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
    let refused = drop_day(&setup, &day, archive_dir);
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
    let dropped = drop_day(&setup, &day, archive_dir);
    assert!(dropped.status.success(), "{}", text(&dropped));
    assert_eq!(count(&client, "ledger").await, 0);
    let history_entries = || async {
        client
            .query_one(
                "SELECT COALESCE(sum(entries), 0)::bigint FROM stock_history_daily",
                &[],
            )
            .await
            .expect("history")
            .get::<_, i64>(0)
    };
    assert_eq!(history_entries().await, rows);
    workload(&setup, &allocator, "c").await;
    let late_rows = count(&client, "ledger").await;
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");
    let refused = drop_day(&setup, &day, archive_dir);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("not archived"),
        "{}",
        text(&refused)
    );
    let extended = run(&setup, "archive", &["--day", &day, "--to", archive_dir]);
    assert!(text(&extended).contains("Extended"), "{}", text(&extended));
    let dropped = drop_day(&setup, &day, archive_dir);
    assert!(dropped.status.success(), "{}", text(&dropped));
    // The day's history holds both drops' entries (the second added to,
    // not written over, the first).
    assert_eq!(history_entries().await, rows + late_rows);
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

/// The python of the venv `scripts/stack up` fills with DuckDB and moto.
fn data_python() -> std::path::PathBuf {
    std::env::var_os("STACK_DATA_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| testkit::repository_root().join(".stack/py-data/bin/python"))
}

/// What DuckDB reads from the archive's files: every row, as a JSON object
/// of the columns that are not null (the hive columns of the path left out).
fn duckdb_rows(archive_dir: &str) -> Vec<serde_json::Value> {
    const SCRIPT: &str = r#"
import json, sys
import duckdb
rows = duckdb.sql(
    "SELECT * EXCLUDE (day, ledger_partition) FROM read_parquet(?, hive_partitioning = true)",
    params=[sys.argv[1] + "/ledger/v1/*/*/*.parquet"],
)
names = [column[0] for column in rows.description]
for row in rows.fetchall():
    print(json.dumps({name: value for name, value in zip(names, row) if value is not None}))
"#;
    python(data_python(), SCRIPT, &[archive_dir.as_ref()], &[])
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON row"))
        .collect()
}

/// The views of ops/duckdb/archive.sql over the archive at `archive_dir`:
/// the reconciliation and the funnel as rows of plain values (days and
/// hours as text), and the number of stockout episodes.
fn duckdb_views(archive_dir: &str) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, sys
import duckdb
con = duckdb.connect()
con.execute("SET VARIABLE archive = ?", [sys.argv[1]])
con.execute(open(sys.argv[2]).read())
reconciliation = con.execute(
    "SELECT merchant, sku, location, strftime(day, '%Y-%m-%d'), opening_on_hand, received, removed,"
    " sold, moved_in, moved_out, rebuilt, closing_on_hand, unexplained, cells, entries"
    " FROM stock_reconciliation_daily ORDER BY 1, 2, 3, 4").fetchall()
funnel = con.execute(
    "SELECT merchant, sku, location, strftime(hour, '%Y-%m-%d %H:00'), held, units_held, committed,"
    " released, expired, still_held FROM reservation_funnel_hourly ORDER BY 1, 2, 3, 4").fetchall()
stockouts = con.execute("SELECT count(*) FROM stockouts").fetchone()[0]
con.execute("SELECT * FROM flash_sale_postmortem").fetchall()
print(json.dumps({"stock_reconciliation_daily": reconciliation,
                  "reservation_funnel_hourly": funnel, "stockouts": stockouts}))
"#;
    let views = testkit::repository_root().join("ops/duckdb/archive.sql");
    let stdout = python(
        data_python(),
        SCRIPT,
        &[archive_dir.as_ref(), views.as_os_str()],
        &[],
    );
    serde_json::from_str(&stdout).expect("the views")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_every_field_exactly_and_the_archive_works_on_s3() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    workload(&setup, &allocator, "d").await;
    // An absolute count with the largest sequence there is (2^53 - 1): exact in every reader.
    let count = allocator::Adjustment {
        merchant: "m-ledger".to_owned(),
        sku: "sku-counted".to_owned(),
        location: "dc1".to_owned(),
        kind: allocator::AdjustmentKind::Absolute,
        qty: 7,
        source: "wms".to_owned(),
        event_id: "count-1".to_owned(),
        source_seq: Some(9_007_199_254_740_991),
    };
    allocator.adjust(&count).await.expect("count");
    let writer = common::start_writer(&setup);
    let total = common::ledger_rows(&setup).await as u64 + 1;
    assert_eq!(
        common::wait_for_rows(&setup, total, Duration::from_secs(60)).await as u64,
        total
    );
    drop(writer);
    let client = common::postgres(&setup).await;
    let before = entries(&client).await;
    let day = today(&client).await;
    let directory = tempfile::tempdir().expect("archive directory");
    let archive_dir = directory.path().to_str().expect("utf-8 path");
    let archived = run(&setup, "archive", &["--day", &day, "--to", archive_dir]);
    assert!(archived.status.success(), "{}", text(&archived));

    // DuckDB: every row, every field, exact.
    let rows = duckdb_rows(archive_dir);
    let read: BTreeMap<String, LedgerEntry> = rows
        .into_iter()
        .map(|row| {
            let entry = LedgerEntry::from_value(row).expect("a ledger entry from duckdb");
            (entry.entry_id.clone().expect("an id"), entry)
        })
        .collect();
    assert_eq!(read, before);
    assert!(
        read.values()
            .any(|entry| entry.source_seq == Some(9_007_199_254_740_991))
    );

    // The documented DuckDB views over the archive (ops/duckdb/archive.sql)
    // give what PostgreSQL's views give over the same entries.
    let analyst = duckdb_views(archive_dir);
    let reconciliation = rows_as_json(
        &client,
        "SELECT merchant, sku, location, to_char(day, 'YYYY-MM-DD'), opening_on_hand, received,
             removed, sold, moved_in, moved_out, rebuilt, closing_on_hand, unexplained, cells, entries
         FROM stock_reconciliation_daily ORDER BY 1, 2, 3, 4",
        4,
    )
    .await;
    assert_eq!(analyst["stock_reconciliation_daily"], reconciliation);
    let funnel = rows_as_json(
        &client,
        "SELECT merchant, sku, location, to_char(hour, 'YYYY-MM-DD HH24:00'), held, units_held,
             committed, released, expired, still_held
         FROM reservation_funnel_hourly ORDER BY 1, 2, 3, 4",
        4,
    )
    .await;
    assert_eq!(analyst["reservation_funnel_hourly"], funnel);
    let stockouts: i64 = client
        .query_one("SELECT count(*) FROM stockouts", &[])
        .await
        .expect("stockouts")
        .get(0);
    assert_eq!(analyst["stockouts"], serde_json::json!(stockouts));

    // The same archive on an S3-compatible server (moto): written,
    // verified, and replayed into an empty database.
    let port = testkit::free_port();
    let _s3 = testkit::KillOnDrop(
        std::process::Command::new(data_python().with_file_name("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server"),
    );
    testkit::wait_for_port(port);
    let bucket = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{port}/invgw-archive"))
        .send()
        .await
        .expect("create the bucket");
    assert!(bucket.status().is_success(), "{bucket:?}");
    let s3 = |command: &mut std::process::Command| {
        command
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1");
    };
    let url = "s3://invgw-archive/ledgers";
    let mut command = common::writer_command(&setup, "archive");
    s3(command.args(["--day", &day, "--to", url]));
    let archived = command.stderr(Stdio::piped()).output().expect("archive");
    assert!(archived.status.success(), "{}", text(&archived));
    let mut command = common::writer_command(&setup, "verify");
    s3(command.args(["--day", &day, "--archive", url]));
    let verified = command.stderr(Stdio::piped()).output().expect("verify");
    assert!(verified.status.success(), "{}", text(&verified));
    let fresh = common::setup_with(&setup.redis_url, &[]).await;
    let mut command = common::writer_command(&fresh, "replay");
    s3(command.args(["--from-archive", url]));
    let replayed = command.stderr(Stdio::piped()).output().expect("replay");
    assert!(replayed.status.success(), "{}", text(&replayed));
    assert_eq!(entries(&common::postgres(&fresh).await).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_hide_no_break_runs_of_a_day_take_turns_and_only_a_whole_archive_replays() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    workload(&setup, &allocator, "e").await;
    let mut client = common::postgres(&setup).await;
    let day = today(&client).await;
    let directory = tempfile::tempdir().expect("archive directory");
    let archive_dir = directory.path().to_str().expect("utf-8 path");

    // A reserve entry missing from a cell's chain: the drop is refused (it
    // would hide the break the audit shows).
    let missing: String = client
        .query_one(
            "SELECT entry::text FROM ledger WHERE op = 'reserve' ORDER BY at, entry_id LIMIT 1",
            &[],
        )
        .await
        .expect("a reserve")
        .get(0);
    let missing_id = LedgerEntry::parse(&missing)
        .expect("an entry")
        .entry_id
        .expect("an id");
    client
        .execute("DELETE FROM ledger WHERE entry_id = $1", &[&missing_id])
        .await
        .expect("delete");
    let archived = run(&setup, "archive", &["--day", &day, "--to", archive_dir]);
    assert!(archived.status.success(), "{}", text(&archived));
    let refused = drop_day(&setup, &day, archive_dir);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("do not chain"),
        "{}",
        text(&refused)
    );
    {
        let transaction = client.transaction().await.expect("transaction");
        ledger_writer::relay::insert_rows(&transaction, &format!("[{missing}]"))
            .await
            .expect("put it back");
        transaction.commit().await.expect("commit");
    }

    // An archive run of a day waits while another run (or a drop, or a
    // replay) of the same day holds it.
    let holder = common::postgres(&setup).await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}, {})",
            0x1ed9,
            ledger_writer::archive::parse_day(&day)
                .expect("a day")
                .to_julian_day()
        ))
        .await
        .expect("hold the day");
    let mut waiting = common::writer_command(&setup, "archive")
        .args(["--day", &day, "--to", archive_dir])
        .stdout(Stdio::piped())
        .spawn()
        .expect("archive");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        waiting.try_wait().expect("try_wait").is_none(),
        "the archive ran while the day was held"
    );
    holder.batch_execute("COMMIT").await.expect("release");
    let finished = tokio::task::spawn_blocking(move || waiting.wait_with_output())
        .await
        .expect("join")
        .expect("archive");
    assert!(finished.status.success());
    assert!(
        String::from_utf8_lossy(&finished.stdout).contains("Extended"),
        "the entry put back joins the archive"
    );

    let dropped = drop_day(&setup, &day, archive_dir);
    assert!(dropped.status.success(), "{}", text(&dropped));
    let carried = count(&client, "ledger_carried").await;
    let archive = Archive::open(archive_dir).expect("archive");
    let mut archived_entries = Vec::new();
    for manifest in archive.manifests(None).await.expect("manifests").values() {
        archived_entries.extend(archive.read(manifest).await.expect("a file"));
    }

    // A batch relayed again after its day was dropped (its acknowledgement
    // was lost): the carried balances cover it, nothing is inserted twice.
    ledger_writer::relay::ensure_days(
        &client,
        &[ledger_writer::archive::parse_day(&day).expect("a day")]
            .into_iter()
            .collect(),
    )
    .await
    .expect("the day's partition");
    {
        let transaction = client.transaction().await.expect("transaction");
        let inserted = ledger_writer::relay::insert_rows(
            &transaction,
            &serde_json::to_string(&archived_entries).expect("json"),
        )
        .await
        .expect("insert");
        transaction.commit().await.expect("commit");
        assert_eq!(inserted, 0);
    }
    assert_eq!(count(&client, "ledger").await, 0);
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");

    // A copy of the archive that lacks a partition: the replay lands
    // nothing and the carried balances stay; the whole archive replays.
    let partial = tempfile::tempdir().expect("a copy");
    let copied = std::process::Command::new("cp")
        .args([
            "-r",
            &format!("{archive_dir}/ledger"),
            partial.path().to_str().expect("path"),
        ])
        .status()
        .expect("cp");
    assert!(copied.success());
    let one_partition = walk(partial.path())
        .into_iter()
        .find(|path| path.file_name().is_some_and(|name| name == "manifest.json"))
        .expect("a manifest");
    std::fs::remove_dir_all(one_partition.parent().expect("its directory")).expect("remove");
    let refused = run(
        &setup,
        "replay",
        &["--from-archive", partial.path().to_str().expect("path")],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("nothing of it was replayed"),
        "{}",
        text(&refused)
    );
    assert_eq!(count(&client, "ledger").await, 0);
    assert_eq!(count(&client, "ledger_carried").await, carried);
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");
    let replayed = run(&setup, "replay", &["--from-archive", archive_dir]);
    assert!(replayed.status.success(), "{}", text(&replayed));
    assert_eq!(count(&client, "ledger_carried").await, 0);
    assert_eq!(
        count(&client, "ledger").await,
        archived_entries.len() as i64
    );
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_airflow_dag_parses_and_its_tasks_run_in_order_against_the_stack() {
    const SCRIPT: &str = r#"
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
dag = bag.dags["invgw_ledger_upkeep"]
print("TASKS " + json.dumps([[task.task_id, task.bash_command, sorted(task.downstream_task_ids)]
                  for task in dag.topological_sort()]))
"#;
    let (_redis, setup, allocator) = common::harness(&[]).await;
    workload(&setup, &allocator, "f").await;
    let home = tempfile::tempdir().expect("airflow home");
    let airflow_python = std::env::var_os("STACK_AIRFLOW_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| testkit::repository_root().join(".stack/py-airflow/bin/python"));
    let dags = testkit::repository_root().join("ops/airflow");
    // Airflow logs to standard output too.
    let stdout = python(
        airflow_python,
        SCRIPT,
        &[dags.as_os_str()],
        &[("AIRFLOW_HOME", home.path())],
    );
    let tasks: Vec<(String, String, Vec<String>)> = stdout
        .lines()
        .find_map(|line| line.strip_prefix("TASKS "))
        .map(|json| serde_json::from_str(json).expect("the task list"))
        .unwrap_or_else(|| panic!("no task list in {stdout}"));
    let order: Vec<&str> = tasks.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        order,
        ["partitions", "archive", "verify", "retention", "history"]
    );
    for pair in tasks.windows(2) {
        assert_eq!(pair[0].2, [pair[1].0.clone()], "a chain: {tasks:?}");
    }

    // Each task's command, as a worker would run it, against this stack.
    let stack = testkit::stack();
    let client = common::postgres(&setup).await;
    for (task, command, _) in &tasks {
        let output = std::process::Command::new("bash")
            .args(["-c", command])
            .current_dir(home.path())
            .env("INVGW_LEDGER_WRITER", env!("CARGO_BIN_EXE_ledger-writer"))
            .env("INVGW_CONFIG", &setup.config_path)
            .env("INVGW_REDIS_URL", &setup.redis_url)
            .env("INVGW_POSTGRES_URL", &setup.postgres_url)
            .env("INVGW_KAFKA_BROKERS", &stack.kafka_brokers)
            .output()
            .expect("bash");
        assert!(output.status.success(), "task {task}: {}", text(&output));
    }
    // What the run leaves: the days ahead, today's curated history; nothing
    // of today archived or dropped (it is not closed).
    let ahead: i64 = client
        .query_one(
            "SELECT count(*) FROM ledger_days WHERE day > (now() AT TIME ZONE 'UTC')::date",
            &[],
        )
        .await
        .expect("days")
        .get(0);
    assert!(ahead >= 7, "{ahead} days ahead");
    assert!(count(&client, "stock_history_daily").await > 0);
    assert!(count(&client, "ledger").await > 0);
    assert!(!home.path().join("archive/ledger").exists());
}

/// `build_history` of `day` in a transaction of its own.
async fn build_history(client: &mut tokio_postgres::Client, day: time::Date, merge: bool) {
    let transaction = client.transaction().await.expect("transaction");
    ledger_writer::retention::build_history(&transaction, day, merge)
        .await
        .expect("history");
    transaction.commit().await.expect("commit");
}

/// The stockout minutes and entries of key m/s/l's history on `day`.
async fn history_minutes(client: &tokio_postgres::Client, day: time::Date) -> (f64, i64) {
    client
        .query_one(
            "SELECT stockout_minutes::float8, entries FROM stock_history_daily
             WHERE merchant = 'm' AND sku = 's' AND location = 'l' AND day = $1",
            &[&day],
        )
        .await
        .map(|row| (row.get::<_, f64>(0), row.get::<_, i64>(1)))
        .expect("the day's history")
}

/// A day's curated history, built when its ledger was dropped, takes late
/// entries of the day when it is dropped again: an episode open at the
/// day's end, which the first build counted to midnight, is not counted a
/// second time from a late entry inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stockout_open_at_midnight_is_counted_once_when_late_entries_of_its_day_are_merged() {
    let (_redis, setup, _allocator) = common::harness(&[]).await;
    let migrated = run(&setup, "partitions", &[]);
    assert!(migrated.status.success(), "{}", text(&migrated));
    let mut client = common::postgres(&setup).await;
    let day: time::Date = client
        .query_one("SELECT (now() AT TIME ZONE 'UTC')::date - 3", &[])
        .await
        .expect("a day")
        .get(0);
    client
        .execute("SELECT ledger_day_partition($1)", &[&day])
        .await
        .expect("the day's partition");
    // The pool of one key: stocked at 08:00, all of it held at 20:00 and
    // nothing sellable until the day ends; then, late, a commit at 21:00.
    let entry = |seq: i64, op: &str, hour: i32, on_hand: (i64, i64), reserved: (i64, i64)| {
        format!(
            "INSERT INTO ledger (entry_id, partition, stream_id, op, merchant, sku, location, cell,
                 qty, on_hand_before, on_hand_after, reserved_before, reserved_after, version, node, at, entry)
             VALUES ('1-{seq}-0', 1, '{seq}-0', '{op}', 'm', 's', 'l', 'm|s|l|pool', 1,
                 {}, {}, {}, {}, {seq}, 'n', '{day} {hour}:00:00+00', '{{}}')",
            on_hand.0, on_hand.1, reserved.0, reserved.1
        )
    };
    client
        .batch_execute(&format!(
            "{}; {}",
            entry(1, "adjust", 8, (0, 10), (0, 0)),
            entry(2, "reserve", 20, (10, 10), (0, 10))
        ))
        .await
        .expect("the day's entries");
    build_history(&mut client, day, false).await;
    assert_eq!(
        history_minutes(&client, day).await,
        (240.0, 2),
        "20:00 to midnight"
    );

    // Dropped (the history stays), then a late entry of the day arrives
    // and the day is dropped again: the history gains the entry, not the
    // minutes from 21:00 to midnight a second time.
    client
        .execute("DELETE FROM ledger WHERE at::date = $1", &[&day])
        .await
        .expect("drop the day's rows");
    client
        .batch_execute(&entry(3, "commit", 21, (10, 9), (10, 9)))
        .await
        .expect("a late entry");
    build_history(&mut client, day, true).await;
    assert_eq!(history_minutes(&client, day).await, (240.0, 3));
}
