//! `ledger-writer archive`, `verify` and `replay`: the ledger's closed days
//! as Parquet files, and back.
//!
//! Owns the archive's layout, its file format and its manifests. One file
//! per UTC day and ledger partition, under the archive's root (a local
//! directory, or an S3-compatible bucket: `s3://bucket/prefix`, configured
//! by the usual `AWS_*` variables through the `object_store` crate):
//!
//! ```text
//! ledger/v1/day=2026-12-07/ledger_partition=3/part-<first 16 hex of its sha256>.parquet
//! ledger/v1/day=2026-12-07/ledger_partition=3/manifest.json
//! ```
//!
//! The columns are the typed ledger entry's fields ([`allocator::LedgerEntry`],
//! schema version 1), derived from the type itself by `serde_arrow`, so a
//! field added to the entry is archived without anyone listing it here; the
//! `v1` in the path is [`allocator::LEDGER_VERSION`]. Rows are in stream
//! order. Nothing in an entry is client text (the scripts write ids, counts
//! and the system's own names; the scoped idempotency key of early entries
//! is read and never written), so the archive is PII-free by construction.
//!
//! The manifest says what the file holds: row count, first and last entry
//! id, the hash of its sorted entry ids, the file's SHA-256 and size. A file
//! is trusted only through its manifest: it is written first, under a name
//! taken from its content, and the manifest after it, so a crash between the
//! two leaves the old manifest and its old file in force.
//!
//! Archiving only ever adds: a day's file is the union, by entry id, of what
//! the archive already holds for it and what PostgreSQL holds (entries of a
//! day relayed after it was archived, or after retention dropped it, join
//! the rows archived before). So archiving a period again yields the same
//! file, byte for byte, and nothing once archived is lost by archiving again.
//! Replay lands whole days, idempotent on entry id.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use allocator::{EntryId, LEDGER_VERSION, LedgerEntry};
use anyhow::Context;
use arrow_schema::FieldRef;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_arrow::schema::{SchemaLike, TracingOptions};
use time::Date;
use tokio_postgres::Client;

/// The archive's schema name, written in every manifest and file.
pub fn schema_name() -> String {
    format!("invgw.ledger-entry/v{LEDGER_VERSION}")
}

/// A day as the archive and the command line write it: `YYYY-MM-DD`.
pub fn day_text(day: Date) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    day.format(&format).expect("a date formats")
}

/// Parses `YYYY-MM-DD`.
pub fn parse_day(text: &str) -> Result<Date, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(text, &format).map_err(|_| format!("{text:?} is not a day (YYYY-MM-DD)"))
}

/// What one archived file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`schema_name`].
    pub schema: String,
    /// The UTC day of the entries' Redis times, `YYYY-MM-DD`.
    pub day: String,
    /// The ledger partition.
    pub partition: u32,
    /// The file's name, beside the manifest.
    pub file: String,
    /// Entries in the file.
    pub rows: u64,
    /// The first and last entry id, in stream order.
    pub first_entry_id: String,
    /// See `first_entry_id`.
    pub last_entry_id: String,
    /// SHA-256 of the sorted entry ids, one per line (compare with
    /// PostgreSQL's without reading the file).
    pub entry_ids_sha256: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// SHA-256 of a set of entry ids, as [`Manifest::entry_ids_sha256`].
pub fn ids_sha256<'a>(ids: impl IntoIterator<Item = &'a String>) -> String {
    let sorted: BTreeSet<&String> = ids.into_iter().collect();
    let mut text = String::new();
    for id in sorted {
        text.push_str(id);
        text.push('\n');
    }
    crate::sha256_hex(text.as_bytes())
}

/// What archiving one file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new file (the day and partition had none).
    Written,
    /// The archive already held every entry: nothing changed.
    Unchanged,
    /// Entries joined the ones archived before; a new file replaced the old.
    Extended,
}

/// The archive: an object store and the root the layout starts at.
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// Where it is, as configured.
    pub url: String,
}

impl Archive {
    /// Opens the archive at `url`: a local directory (a path, or
    /// `file:///path`; created if missing) or `s3://bucket/prefix` (options
    /// from the `AWS_*` environment variables, e.g. `AWS_ENDPOINT` and
    /// `AWS_ALLOW_HTTP` for a local S3-compatible server).
    pub fn open(url: &str) -> anyhow::Result<Self> {
        let (store, root): (Arc<dyn ObjectStore>, Path) = if url.contains("://")
            && !url.starts_with("file://")
        {
            let parsed = url::Url::parse(url).with_context(|| format!("archive url {url:?}"))?;
            let options = std::env::vars()
                .filter(|(name, _)| name.starts_with("AWS_"))
                .map(|(name, value)| (name.to_ascii_lowercase(), value));
            let (store, root) = object_store::parse_url_opts(&parsed, options)
                .with_context(|| format!("archive url {url:?}"))?;
            (Arc::from(store), root)
        } else {
            let directory = url.strip_prefix("file://").unwrap_or(url);
            std::fs::create_dir_all(directory)
                .with_context(|| format!("creating the archive directory {directory}"))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(directory)
                .with_context(|| format!("archive directory {directory}"))?;
            (Arc::new(store), Path::default())
        };
        Ok(Self {
            store,
            root,
            url: url.to_owned(),
        })
    }

    fn directory(&self, day: Date, partition: u32) -> Path {
        let mut path = self.root.clone();
        for part in [
            "ledger".to_owned(),
            format!("v{LEDGER_VERSION}"),
            format!("day={}", day_text(day)),
            format!("ledger_partition={partition}"),
        ] {
            path = path.clone().join(part);
        }
        path
    }

    fn day_prefix(&self, day: Option<Date>) -> Path {
        let mut path = self
            .root
            .clone()
            .clone()
            .join("ledger")
            .clone()
            .join(format!("v{LEDGER_VERSION}"));
        if let Some(day) = day {
            path = path.clone().join(format!("day={}", day_text(day)));
        }
        path
    }

    /// The manifests of `day` (every day, when `None`), by day and partition.
    pub async fn manifests(
        &self,
        day: Option<Date>,
    ) -> anyhow::Result<BTreeMap<(Date, u32), Manifest>> {
        let objects: Vec<_> = self
            .store
            .list(Some(&self.day_prefix(day)))
            .try_collect()
            .await
            .with_context(|| format!("listing archive {}", self.url))?;
        let mut manifests = BTreeMap::new();
        for object in objects {
            if object.location.filename() != Some("manifest.json") {
                continue;
            }
            let bytes = self.get(&object.location).await?;
            let manifest: Manifest = serde_json::from_slice(&bytes)
                .with_context(|| format!("manifest {}", object.location))?;
            if manifest.schema != schema_name() {
                anyhow::bail!(
                    "manifest {}: schema {}, this writer reads {}",
                    object.location,
                    manifest.schema,
                    schema_name()
                );
            }
            let day = parse_day(&manifest.day).map_err(anyhow::Error::msg)?;
            manifests.insert((day, manifest.partition), manifest);
        }
        Ok(manifests)
    }

    async fn get(&self, path: &Path) -> anyhow::Result<Bytes> {
        let result = self
            .store
            .get(path)
            .await
            .with_context(|| format!("reading {path} from archive {}", self.url))?;
        Ok(result.bytes().await?)
    }

    /// The entries of the file `manifest` names, checked against it (size,
    /// checksum, rows, entry ids) and each entry against the schema.
    pub async fn read(&self, manifest: &Manifest) -> anyhow::Result<Vec<LedgerEntry>> {
        let day = parse_day(&manifest.day).map_err(anyhow::Error::msg)?;
        let path = self
            .directory(day, manifest.partition)
            .clone()
            .join(manifest.file.as_str());
        let bytes = self.get(&path).await?;
        let sha256 = crate::sha256_hex(&bytes);
        if bytes.len() as u64 != manifest.bytes || sha256 != manifest.sha256 {
            anyhow::bail!(
                "{path}: {} bytes with sha256 {sha256}, its manifest says {} bytes with {}",
                bytes.len(),
                manifest.bytes,
                manifest.sha256
            );
        }
        let entries = from_parquet(bytes).with_context(|| format!("{path}"))?;
        let ids: Vec<String> = entries.iter().map(entry_id).collect();
        if entries.len() as u64 != manifest.rows || ids_sha256(&ids) != manifest.entry_ids_sha256 {
            anyhow::bail!(
                "{path}: {} entries, not the {} its manifest lists",
                entries.len(),
                manifest.rows
            );
        }
        Ok(entries)
    }

    /// Archives `entries` (all of one day and partition) with what the
    /// archive already holds for that day and partition: see the module docs.
    pub async fn write(
        &self,
        day: Date,
        partition: u32,
        entries: Vec<LedgerEntry>,
        existing: Option<&Manifest>,
    ) -> anyhow::Result<(Manifest, Outcome)> {
        let mut union: BTreeMap<EntryId, LedgerEntry> = BTreeMap::new();
        if let Some(manifest) = existing {
            for entry in self.read(manifest).await? {
                union.insert(entry.id().map_err(anyhow::Error::msg)?, entry);
            }
        }
        let archived = union.len();
        for entry in entries {
            union
                .entry(entry.id().map_err(anyhow::Error::msg)?)
                .or_insert(entry);
        }
        if let Some(manifest) = existing
            && union.len() == archived
        {
            return Ok((manifest.clone(), Outcome::Unchanged));
        }
        let rows: Vec<LedgerEntry> = union.into_values().collect();
        let bytes = to_parquet(&rows)?;
        let sha256 = crate::sha256_hex(&bytes);
        let ids: Vec<String> = rows.iter().map(entry_id).collect();
        let manifest = Manifest {
            schema: schema_name(),
            day: day_text(day),
            partition,
            file: format!("part-{}.parquet", &sha256[..16]),
            rows: rows.len() as u64,
            first_entry_id: ids.first().cloned().unwrap_or_default(),
            last_entry_id: ids.last().cloned().unwrap_or_default(),
            entry_ids_sha256: ids_sha256(&ids),
            bytes: bytes.len() as u64,
            sha256,
        };
        let directory = self.directory(day, partition);
        self.store
            .put(
                &directory.clone().join(manifest.file.as_str()),
                Bytes::from(bytes).into(),
            )
            .await
            .with_context(|| format!("writing {directory} to archive {}", self.url))?;
        let text = serde_json::to_vec_pretty(&manifest)?;
        self.store
            .put(
                &directory.clone().join("manifest.json"),
                Bytes::from(text).into(),
            )
            .await
            .with_context(|| format!("writing {directory}/manifest.json"))?;
        if let Some(old) = existing
            && old.file != manifest.file
        {
            // Only now that the new manifest is in force.
            self.store
                .delete(&directory.clone().join(old.file.as_str()))
                .await
                .ok();
        }
        let outcome = if existing.is_some() {
            Outcome::Extended
        } else {
            Outcome::Written
        };
        Ok((manifest, outcome))
    }
}

fn entry_id(entry: &LedgerEntry) -> String {
    entry
        .id()
        .map(|id| id.to_string())
        .unwrap_or_else(|_| entry.entry_id.clone().unwrap_or_default())
}

/// The archive's Arrow fields, traced by `serde_arrow` from how
/// [`LedgerEntry`] serializes: from one entry with every field set, written
/// out below so that the compiler rejects it when a field is added and not
/// given a value here (a field it leaves out would have no column).
/// `source_seq` is written as a decimal string (exact past 2^53), so its
/// column is text; `idempotency_key` is never serialized, so it has none.
pub fn fields() -> anyhow::Result<Vec<FieldRef>> {
    let text = || Some("text".to_owned());
    let sample = LedgerEntry {
        v: LEDGER_VERSION,
        op: allocator::LedgerOp::Adjust,
        partition: 0,
        cell: String::new(),
        merchant: String::new(),
        sku: String::new(),
        location: String::new(),
        on_hand_before: 0,
        on_hand_after: 0,
        reserved_before: 0,
        reserved_after: 0,
        version: 0,
        qty: 0,
        node: String::new(),
        at_ms: 0,
        reservation_id: text(),
        cart_id: text(),
        backordered: Some(0),
        kind: Some(allocator::AdjustmentKind::Delta),
        source: text(),
        source_event_id: text(),
        source_seq: Some(0),
        shortfall: Some(false),
        counted: Some(0),
        buckets_on_hand: Some(0),
        drain_epoch: Some(0),
        safety_stock: Some(0),
        backorder_limit: Some(0),
        low_stock_threshold: Some(0),
        reorder_point: Some(0),
        reorder_qty: Some(0),
        released: Some(vec![String::new()]),
        found_on_hand: Some(0),
        found_reserved: Some(0),
        found_version: Some(0),
        expires_at_ms: Some(0),
        transfer_id: text(),
        to_cell: text(),
        from_cell: text(),
        reason: text(),
        idempotency_key: None,
        entry_id: text(),
        stream_id: text(),
    };
    // The two enums are written as their names.
    let options = TracingOptions::default()
        .strings_as_large_utf8(false)
        .guess_dates(false)
        .overwrite("op", serde_json::json!({"name": "op", "data_type": "Utf8"}))?
        .overwrite(
            "kind",
            serde_json::json!({"name": "kind", "data_type": "Utf8", "nullable": true}),
        )?;
    let mut fields = Vec::<FieldRef>::from_samples(&[sample], options)?;
    // Every field of the sample is set, but only the ones every op writes
    // are never null.
    let always = [
        "v",
        "op",
        "partition",
        "cell",
        "merchant",
        "sku",
        "location",
        "on_hand_before",
        "on_hand_after",
        "reserved_before",
        "reserved_after",
        "version",
        "qty",
        "node",
        "at_ms",
    ];
    for field in &mut fields {
        if !always.contains(&field.name().as_str()) {
            *field = std::sync::Arc::new(field.as_ref().clone().with_nullable(true));
        }
    }
    Ok(fields)
}

/// `entries` as one Parquet file (Snappy; the schema name in its metadata).
pub fn to_parquet(entries: &[LedgerEntry]) -> anyhow::Result<Vec<u8>> {
    let batch = serde_arrow::to_record_batch(&fields()?, &entries)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
            "invgw.schema".to_owned(),
            schema_name(),
        )]))
        .build();
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), Some(properties))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(bytes)
}

/// The entries of a Parquet file [`to_parquet`] wrote, each checked.
pub fn from_parquet(bytes: Bytes) -> anyhow::Result<Vec<LedgerEntry>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let mut entries = Vec::new();
    for batch in reader {
        let batch = batch?;
        let mut part: Vec<LedgerEntry> = serde_arrow::from_record_batch(&batch)?;
        entries.append(&mut part);
    }
    for entry in &entries {
        entry.check().map_err(anyhow::Error::msg)?;
    }
    Ok(entries)
}

/// The ledger partitions with entries of `day` in PostgreSQL.
pub async fn postgres_partitions(client: &Client, day: Date) -> anyhow::Result<Vec<u32>> {
    let mut partitions = Vec::new();
    for row in client
        .query(
            "SELECT DISTINCT partition FROM ledger
             WHERE at >= $1::date::timestamp AT TIME ZONE 'UTC'
               AND at < ($1::date + 1)::timestamp AT TIME ZONE 'UTC'
             ORDER BY 1",
            &[&day],
        )
        .await?
    {
        partitions.push(u32::try_from(row.get::<_, i32>(0))?);
    }
    Ok(partitions)
}

/// The entries of `day` and ledger `partition` in PostgreSQL (one
/// partition at a time: a day of a busy ledger does not fit in memory).
pub async fn postgres_entries(
    client: &Client,
    day: Date,
    partition: u32,
) -> anyhow::Result<Vec<LedgerEntry>> {
    let mut entries = Vec::new();
    for row in client
        .query(
            "SELECT entry_id, entry::text FROM ledger
             WHERE at >= $1::date::timestamp AT TIME ZONE 'UTC'
               AND at < ($1::date + 1)::timestamp AT TIME ZONE 'UTC'
               AND partition = $2",
            &[&day, &i32::try_from(partition)?],
        )
        .await?
    {
        let entry_id: String = row.get(0);
        let entry = LedgerEntry::parse(row.get::<_, &str>(1))
            .map_err(|error| anyhow::anyhow!("ledger entry {entry_id}: {error}"))?;
        entries.push(entry);
    }
    Ok(entries)
}

/// The days PostgreSQL's ledger has a partition for, oldest first.
pub async fn postgres_days(client: &Client) -> anyhow::Result<Vec<Date>> {
    Ok(client
        .query("SELECT day FROM ledger_days", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// What archiving one file did, for the report.
#[derive(Debug, Clone)]
pub struct Archived {
    /// Its manifest now.
    pub manifest: Manifest,
    /// Written, unchanged or extended.
    pub outcome: Outcome,
}

/// The advisory lock (two-key form: this class, the day's Julian day) that
/// every archive run, retention drop and replay of a day holds, so that
/// they take turns: two archive runs at once could otherwise each union
/// with the same old manifest and the slower one put back fewer entries
/// than the faster one wrote (and retention may have dropped the day on
/// the faster one's word).
const DAY_LOCK_CLASS: i32 = 0x1ed9;

/// Takes the day's lock for the rest of `transaction`.
pub async fn lock_day(
    transaction: &tokio_postgres::Transaction<'_>,
    day: Date,
) -> Result<(), tokio_postgres::Error> {
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&DAY_LOCK_CLASS, &day.to_julian_day()],
        )
        .await?;
    Ok(())
}

/// Archives every partition of `day` PostgreSQL holds, holding the day's
/// lock ([`lock_day`]) on `client`'s session throughout.
pub async fn archive_day(
    client: &Client,
    archive: &Archive,
    day: Date,
) -> anyhow::Result<Vec<Archived>> {
    let key = (DAY_LOCK_CLASS, day.to_julian_day());
    client
        .execute("SELECT pg_advisory_lock($1, $2)", &[&key.0, &key.1])
        .await?;
    let archived = async {
        // Read under the lock: no other run changes them until it ends.
        let existing = archive.manifests(Some(day)).await?;
        let mut archived = Vec::new();
        for partition in postgres_partitions(client, day).await? {
            let entries = postgres_entries(client, day, partition).await?;
            let (manifest, outcome) = archive
                .write(day, partition, entries, existing.get(&(day, partition)))
                .await?;
            archived.push(Archived { manifest, outcome });
        }
        anyhow::Ok(archived)
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1, $2)", &[&key.0, &key.1])
        .await?;
    archived
}

/// What [`verify_day`] found for one day.
#[derive(Debug, Default)]
pub struct Verified {
    /// Files read back and matching their manifests.
    pub files: usize,
    /// Entries in those files.
    pub archived: u64,
    /// Entries PostgreSQL holds for the day.
    pub in_postgres: u64,
    /// What is wrong; empty when PostgreSQL's day may be dropped.
    pub problems: Vec<String>,
    /// The entry ids the files hold.
    pub archived_ids: BTreeSet<String>,
}

/// Reads back every file of `day` and checks it against its manifest, and
/// that every entry PostgreSQL holds for the day is in the archive.
pub async fn verify_day(client: &Client, archive: &Archive, day: Date) -> anyhow::Result<Verified> {
    let mut verified = Verified::default();
    for manifest in archive.manifests(Some(day)).await?.values() {
        match archive.read(manifest).await {
            Ok(entries) => {
                verified.files += 1;
                verified.archived += entries.len() as u64;
                verified.archived_ids.extend(entries.iter().map(entry_id));
            }
            Err(error) => verified.problems.push(format!("{error:#}")),
        }
    }
    for partition in postgres_partitions(client, day).await? {
        let ids: Vec<String> = client
            .query(
                "SELECT entry_id FROM ledger
                 WHERE at >= $1::date::timestamp AT TIME ZONE 'UTC'
                   AND at < ($1::date + 1)::timestamp AT TIME ZONE 'UTC'
                   AND partition = $2",
                &[&day, &i32::try_from(partition)?],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        verified.in_postgres += ids.len() as u64;
        let missing = ids
            .iter()
            .filter(|id| !verified.archived_ids.contains(*id))
            .count();
        if missing > 0 {
            verified.problems.push(format!(
                "partition {partition}: {missing} of {} entries in postgresql are not archived",
                ids.len()
            ));
        }
    }
    Ok(verified)
}

/// Where [`replay`] lands entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The PostgreSQL ledger (and snapshot), each entry once.
    Postgres,
    /// The Kafka ledger topic, keyed and partitioned as the relay does;
    /// consumers drop repeats by entry id, as after any redelivery.
    Kafka,
}

/// What [`replay`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Replayed {
    /// Days replayed.
    pub days: usize,
    /// Files read.
    pub files: usize,
    /// Entries read from them.
    pub entries: u64,
    /// Of those, rows PostgreSQL did not have (for `--into postgres`).
    pub inserted: u64,
}

/// Lands the archived entries of the days from `since` to `until`
/// (inclusive; unbounded when `None`) into `target`. Into PostgreSQL, a day
/// lands in one transaction that also removes its carried balances (the day
/// is back in the ledger: see `retention`).
pub async fn replay(
    config: &config::Config,
    archive: &Archive,
    client: Option<&mut Client>,
    target: Target,
    since: Option<Date>,
    until: Option<Date>,
) -> anyhow::Result<Replayed> {
    let mut days: BTreeMap<Date, Vec<Manifest>> = BTreeMap::new();
    for ((day, _), manifest) in archive.manifests(None).await? {
        if since.is_some_and(|since| day < since) || until.is_some_and(|until| day > until) {
            continue;
        }
        days.entry(day).or_default().push(manifest);
    }
    let mut replayed = Replayed::default();
    let producer = match target {
        Target::Kafka => Some(crate::producer(config)?),
        Target::Postgres => None,
    };
    let mut client = client;
    for (day, manifests) in days {
        replayed.days += 1;
        replayed.files += manifests.len();
        match (target, producer.as_ref(), client.as_deref_mut()) {
            (Target::Kafka, Some(producer), _) => {
                for manifest in &manifests {
                    let entries = archive.read(manifest).await?;
                    replayed.entries += entries.len() as u64;
                    crate::relay::publish_entries(
                        producer,
                        config,
                        manifest.partition,
                        entries.iter(),
                    )
                    .await
                    .with_context(|| format!("publishing {} to kafka", day_text(day)))?;
                }
            }
            (Target::Postgres, _, Some(client)) => {
                crate::relay::ensure_days(client, &[day].into_iter().collect()).await?;
                let transaction = client.transaction().await?;
                lock_day(&transaction, day).await?;
                // The day comes back whole or not at all: its carried rows
                // go (else the relay's insert would skip what they cover),
                // and the transaction commits only if the ledger then holds
                // every entry they stood for.
                let carried = crate::retention::take_carried(&transaction, day).await?;
                for manifest in archive.manifests(Some(day)).await?.values() {
                    let entries = archive.read(manifest).await?;
                    replayed.entries += entries.len() as u64;
                    for chunk in entries.chunks(2_000) {
                        let batch = serde_json::to_string(chunk)?;
                        replayed.inserted +=
                            crate::relay::insert_rows(&transaction, &batch).await?;
                    }
                }
                crate::retention::check_covered(&transaction, day, &carried)
                    .await
                    .with_context(|| {
                        format!(
                            "replaying {} from {}: nothing of it was replayed",
                            day_text(day),
                            archive.url
                        )
                    })?;
                transaction.commit().await?;
            }
            _ => anyhow::bail!("replay into postgres needs a database connection"),
        }
    }
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADJUST: &str = r#"{"v":1,"op":"adjust","partition":3,"cell":"m|s|l|pool","merchant":"m","sku":"s","location":"l","on_hand_before":0,"on_hand_after":9,"reserved_before":0,"reserved_after":0,"version":1,"qty":9,"kind":"absolute","source":"wms","source_event_id":"e1","source_seq":"9007199254740993","shortfall":false,"counted":9,"node":"n","at_ms":1795324414971,"entry_id":"3-1795324414971-0","stream_id":"1795324414971-0"}"#;
    const RESERVE: &str = r#"{"v":1,"op":"reserve","partition":3,"cell":"m|s|l|pool","merchant":"m","sku":"s","location":"l","on_hand_before":9,"on_hand_after":9,"reserved_before":0,"reserved_after":2,"version":2,"qty":2,"reservation_id":"r3.a","cart_id":"c1","backordered":0,"node":"n","at_ms":1795324414972,"entry_id":"3-1795324414972-0","stream_id":"1795324414972-0"}"#;
    const REBUILD: &str = r#"{"v":1,"op":"rebuild","partition":3,"cell":"m|s|l|pool","merchant":"m","sku":"s","location":"l","on_hand_before":9,"on_hand_after":9,"reserved_before":2,"reserved_after":0,"version":3,"qty":0,"released":["r3.a","r3.b"],"found_on_hand":9,"found_reserved":4,"found_version":7,"node":"n","at_ms":1795324414973,"entry_id":"3-1795324414973-0","stream_id":"1795324414973-0"}"#;

    #[test]
    fn entries_round_trip_through_parquet_exactly_and_the_bytes_repeat() {
        let entries: Vec<LedgerEntry> = [ADJUST, RESERVE, REBUILD]
            .iter()
            .map(|text| LedgerEntry::parse(text).expect("valid"))
            .collect();
        let bytes = to_parquet(&entries).expect("parquet");
        assert_eq!(
            to_parquet(&entries).expect("parquet"),
            bytes,
            "the same entries give the same file"
        );
        let back = from_parquet(Bytes::from(bytes)).expect("read back");
        assert_eq!(back, entries);
        assert_eq!(back[0].source_seq, Some(9_007_199_254_740_993));
    }

    #[test]
    fn a_file_written_before_the_reorder_fields_reads_as_entries_without_them() {
        let entries: Vec<LedgerEntry> = [ADJUST, RESERVE, REBUILD]
            .iter()
            .map(|text| LedgerEntry::parse(text).expect("valid"))
            .collect();
        // The columns of the release before settings had reorder fields.
        let older: Vec<FieldRef> = fields()
            .expect("fields")
            .into_iter()
            .filter(|field| !field.name().starts_with("reorder_"))
            .collect();
        let batch = serde_arrow::to_record_batch(&older, &entries).expect("batch");
        let mut bytes = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let back = from_parquet(Bytes::from(bytes)).expect("read back");
        assert_eq!(back, entries);
    }

    #[test]
    fn days_print_and_parse() {
        let day = parse_day("2026-12-07").expect("a day");
        assert_eq!(day_text(day), "2026-12-07");
        assert!(parse_day("2026-13-07").is_err());
        assert!(parse_day("yesterday").is_err());
    }
}
