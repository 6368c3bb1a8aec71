//! `ledger-writer tail`: the Kafka ledger for people (auditors, partners).
//!
//! Owns reading `kafka.ledger_topic` with the project's rdkafka consumer and
//! printing each entry once: as the JSON line the relay published (the
//! typed entry of `allocator::LedgerEntry`, with its `entry_id`), or as a
//! table row. The topic may repeat an entry (a writer that died between
//! Kafka and its acknowledgement publishes the batch again; DESIGN.md:
//! at-least-once), so entries are dropped by `entry_id` as every consumer
//! must. It reads with a consumer group of its own that commits nothing, so
//! it never moves another consumer's offsets. It writes nothing anywhere.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use allocator::{LedgerEntry, StockKey};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};

/// How many entry ids are remembered to drop repeats: a repeat further
/// behind than this many (distinct, printed) entries is printed again. The
/// relay repeats a batch within seconds of its first publication, so this
/// is far more than a repeat ever needs, and bounds a `--follow` that runs
/// for days (about 100 bytes an id).
pub const DEDUPE_IDS_MAX: usize = 1_000_000;

/// Without `--follow`, how long the topic must be quiet before the read ends.
pub const QUIET_END: Duration = Duration::from_secs(2);

/// How long a read waits for its first message (joining a consumer group
/// takes a moment) before an empty topic counts as quiet.
const JOIN_WAIT: Duration = Duration::from_secs(10);

/// How each entry is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object a line, as the relay published it.
    Json,
    /// Aligned columns, a header first.
    Table,
}

/// What to read and how to print it.
#[derive(Debug, Clone)]
pub struct Options {
    /// From the topic's first message; else only what arrives from now on.
    pub from_beginning: bool,
    /// Only this stock key's entries.
    pub key: Option<StockKey>,
    /// Keep reading new entries until stopped; else end once the topic has
    /// been quiet for [`QUIET_END`].
    pub follow: bool,
    /// How to print.
    pub format: Format,
}

/// What a read did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Entries printed.
    pub printed: u64,
    /// Messages dropped as repeats of a printed entry.
    pub repeats: u64,
    /// Messages of other keys (with a key filter).
    pub skipped: u64,
}

/// A consumer of `topic` in a group of its own that commits nothing,
/// positioned at the topic's start (`from_beginning`) or its end. `purpose`
/// names the group (`<purpose>-<pid>-<nanos>`), so a broker's group list
/// says what read it.
pub fn throwaway_consumer(
    brokers: &str,
    topic: &str,
    purpose: &str,
    from_beginning: bool,
) -> anyhow::Result<BaseConsumer> {
    let group = format!(
        "{purpose}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default()
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &group)
        .set(
            "auto.offset.reset",
            if from_beginning { "earliest" } else { "latest" },
        )
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// Reads the ledger topic of `config` and prints its entries to `out`
/// until the topic is quiet (or, with `follow`, until `stop` is set).
/// Blocking: run it on a thread of its own. A closed `out` (a pipe into
/// `head`) ends the read without an error.
pub fn tail(
    config: &config::Config,
    options: &Options,
    out: &mut dyn Write,
    stop: &AtomicBool,
) -> anyhow::Result<Counts> {
    let topic = &config.kafka.ledger_topic;
    let consumer = throwaway_consumer(
        &config.kafka.brokers,
        topic,
        "ledger-tail",
        options.from_beginning,
    )?;
    let mut seen = Seen::default();
    let mut counts = Counts::default();
    if options.format == Format::Table && !write_or_end(out, &table_header())? {
        return Ok(counts);
    }
    read(&consumer, topic, options.follow, stop, |message| {
        let text = message.payload().unwrap_or_default();
        let entry: LedgerEntry = serde_json::from_slice(text).map_err(|error| {
            anyhow::anyhow!(
                "{topic} partition {} offset {}: not a ledger entry: {error}",
                message.partition(),
                message.offset()
            )
        })?;
        if options.key.as_ref().is_some_and(|key| &entry.key() != key) {
            counts.skipped += 1;
            return Ok(true);
        }
        let id = entry.entry_id.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "{topic} partition {} offset {}: an entry without entry_id",
                message.partition(),
                message.offset()
            )
        })?;
        if !seen.first_time(id) {
            counts.repeats += 1;
            return Ok(true);
        }
        let line = match options.format {
            Format::Json => String::from_utf8_lossy(text).into_owned(),
            Format::Table => table_row(&entry),
        };
        if !write_or_end(out, &line)? {
            return Ok(false);
        }
        counts.printed += 1;
        Ok(true)
    })?;
    Ok(counts)
}

/// Hands each message of `consumer` (reading `topic`) to `each` until it
/// answers `false`, `stop` is set, or, unless `follow`, the topic has been
/// quiet for [`QUIET_END`] (after its first message, or 10 s after it
/// started when none comes: joining a consumer group takes a moment). The one read loop of the writer's
/// readers for people (`tail`, `redrive-dlq`). Blocking.
pub fn read(
    consumer: &BaseConsumer,
    topic: &str,
    follow: bool,
    stop: &AtomicBool,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    let mut heard = false;
    while !stop.load(Ordering::Relaxed) {
        if !follow
            && quiet_since.elapsed() >= QUIET_END
            && (heard || started.elapsed() >= JOIN_WAIT)
        {
            break;
        }
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(error)) => anyhow::bail!("reading {topic}: {error}"),
            Some(Ok(message)) => message,
        };
        heard = true;
        quiet_since = Instant::now();
        if !each(&message)? {
            break;
        }
    }
    Ok(())
}

/// Writes `line` and a newline, flushed: `false` once the reader has gone
/// (a broken pipe), an error for anything else.
fn write_or_end(out: &mut dyn Write, line: &str) -> anyhow::Result<bool> {
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// The entry ids printed lately, at most [`DEDUPE_IDS_MAX`].
#[derive(Default)]
struct Seen {
    ids: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
}

impl Seen {
    /// Whether `id` is new (it is remembered then).
    fn first_time(&mut self, id: String) -> bool {
        let id: Arc<str> = id.into();
        if self.ids.contains(&id) {
            return false;
        }
        if self.order.len() == DEDUPE_IDS_MAX
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.ids.insert(Arc::clone(&id));
        self.order.push_back(id);
        true
    }
}

fn table_header() -> String {
    format!(
        "{:<24}  {:<12}  {:<32}  {:<36}  {:>6}  {:>13}  {:>13}  {:<24}  {}",
        "at (UTC)",
        "op",
        "merchant/sku/location",
        "cell",
        "qty",
        "on_hand",
        "reserved",
        "reference",
        "entry_id"
    )
}

/// One entry as a table row: its time (Redis's), op, key, cell, quantity,
/// the cell's on_hand and reserved before → after, the reservation,
/// transfer or source event it belongs to, and its id.
fn table_row(entry: &LedgerEntry) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(entry.at_ms) * 1_000_000)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| entry.at_ms.to_string());
    let reference = entry
        .reservation_id
        .as_deref()
        .or(entry.transfer_id.as_deref())
        .map(str::to_owned)
        .or_else(|| {
            entry
                .source
                .as_ref()
                .zip(entry.source_event_id.as_ref())
                .map(|(source, event)| format!("{source}:{event}"))
        })
        .unwrap_or_default();
    format!(
        "{:<24}  {:<12}  {:<32}  {:<36}  {:>6}  {:>13}  {:>13}  {:<24}  {}",
        at,
        entry.op.to_string(),
        format!("{}/{}/{}", entry.merchant, entry.sku, entry.location),
        entry.cell,
        entry.qty,
        format!("{}→{}", entry.on_hand_before, entry.on_hand_after),
        format!("{}→{}", entry.reserved_before, entry.reserved_after),
        reference,
        entry.entry_id.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_dropped_until_it_is_further_behind_than_the_bound() {
        let mut seen = Seen::default();
        assert!(seen.first_time("0-1-0".to_owned()));
        assert!(!seen.first_time("0-1-0".to_owned()));
        for index in 0..DEDUPE_IDS_MAX {
            assert!(seen.first_time(format!("1-{index}-0")));
        }
        assert_eq!(seen.ids.len(), DEDUPE_IDS_MAX);
        assert!(
            seen.first_time("0-1-0".to_owned()),
            "forgotten once a million newer ids came"
        );
    }

    #[test]
    fn a_table_row_names_the_time_the_cell_change_and_the_reservation() {
        let entry = LedgerEntry::parse(
            r#"{"v":1,"op":"reserve","partition":17,"cell":"m|s|l|pool","merchant":"m","sku":"s","location":"l","on_hand_before":4,"on_hand_after":4,"reserved_before":0,"reserved_after":2,"version":9,"qty":2,"reservation_id":"r17.a","backordered":0,"node":"n","at_ms":1795324414971,"entry_id":"17-1795324414971-0"}"#,
        )
        .expect("an entry");
        let row = table_row(&entry);
        for part in [
            "2026-11-22T05:13:34.971Z",
            "reserve",
            "m/s/l",
            "m|s|l|pool",
            "4→4",
            "0→2",
            "r17.a",
            "17-1795324414971-0",
        ] {
            assert!(row.contains(part), "{part} in {row}");
        }
    }
}
