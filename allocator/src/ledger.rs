//! The ledger entry, typed: the one Rust home of the schema the scripts
//! write (version 1, documented in the crate docs' table).
//!
//! Owns parsing an entry as the scripts wrote it (or as the relay stored it,
//! with its `entry_id` and `stream_id`) and refusing anything else: an
//! unknown field, a missing one, an unknown op or a field an op needs is an
//! error, never a silent 0. The relay, the audit and the rebuild read entries
//! only through it. It does not talk to Redis.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::AdjustmentKind;

/// The ledger schema version this crate writes and reads.
pub const LEDGER_VERSION: u32 = 1;

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerOp {
    /// Units held.
    Reserve,
    /// Held units sold: they leave on_hand.
    Commit,
    /// Held units returned on request.
    Release,
    /// Held units returned when the hold ran out.
    Expire,
    /// A hold's lifetime changed; no units moved.
    Extend,
    /// A physical change: a delta or a count.
    Adjust,
    /// Safety stock, backorder limit or threshold changed.
    Settings,
    /// The debit half of a transfer between cells.
    TransferOut,
    /// The credit half of a transfer between cells.
    TransferIn,
    /// `ledger-writer rebuild` set the cell to what the ledger says.
    Rebuild,
}

impl LedgerOp {
    /// The name the scripts write.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Commit => "commit",
            Self::Release => "release",
            Self::Expire => "expire",
            Self::Extend => "extend",
            Self::Adjust => "adjust",
            Self::Settings => "settings",
            Self::TransferOut => "transfer_out",
            Self::TransferIn => "transfer_in",
            Self::Rebuild => "rebuild",
        }
    }
}

impl fmt::Display for LedgerOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An entry's id: `<partition>-<stream id>`, unique, ordered within a
/// partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId {
    /// The partition whose stream holds it.
    pub partition: u32,
    /// Redis time (ms) of the stream id.
    pub ms: u64,
    /// Sequence within that ms.
    pub seq: u64,
}

impl EntryId {
    /// The id of stream entry `stream_id` (`ms-seq`) of `partition`.
    pub fn of_stream(partition: u32, stream_id: &str) -> Result<Self, String> {
        let (ms, seq) = stream_id
            .split_once('-')
            .ok_or_else(|| format!("stream id {stream_id:?}"))?;
        Ok(Self {
            partition,
            ms: ms.parse().map_err(|_| format!("stream id {stream_id:?}"))?,
            seq: seq
                .parse()
                .map_err(|_| format!("stream id {stream_id:?}"))?,
        })
    }

    /// Parses `<partition>-<ms>-<seq>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (partition, stream_id) = text
            .split_once('-')
            .ok_or_else(|| format!("entry id {text:?}"))?;
        Self::of_stream(
            partition
                .parse()
                .map_err(|_| format!("entry id {text:?}"))?,
            stream_id,
        )
    }

    /// The stream id part, `ms-seq`.
    pub fn stream_id(&self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.partition, self.ms, self.seq)
    }
}

/// A decimal string the scripts write for integers that may pass 14 digits.
mod decimal {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => serializer.serialize_str(&value.to_string()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            Number(u64),
            // Entries written before sequences left the scripts as text:
            // cjson wrote large ones as floats (inexact past 14 digits).
            Float(f64),
        }
        match Option::<Either>::deserialize(deserializer)? {
            None => Ok(None),
            Some(Either::Number(number)) => Ok(Some(number)),
            Some(Either::Float(float)) if float >= 0.0 && float.fract() == 0.0 => {
                Ok(Some(float as u64))
            }
            Some(Either::Float(float)) => {
                Err(serde::de::Error::custom(format!("source_seq {float}")))
            }
            Some(Either::Text(text)) => text
                .parse()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("integer {text:?}"))),
        }
    }
}

/// One ledger entry, schema version 1 (the crate docs' table says what each
/// field means). Fields an op does not write are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    /// Schema version, [`LEDGER_VERSION`].
    pub v: u32,
    /// What happened.
    pub op: LedgerOp,
    /// The stream's partition.
    pub partition: u32,
    /// Cell id.
    pub cell: String,
    /// Merchant of the stock key.
    pub merchant: String,
    /// SKU of the stock key.
    pub sku: String,
    /// Location of the stock key.
    pub location: String,
    /// The cell's on_hand before.
    pub on_hand_before: i64,
    /// The cell's on_hand after.
    pub on_hand_after: i64,
    /// The cell's reserved before.
    pub reserved_before: i64,
    /// The cell's reserved after.
    pub reserved_after: i64,
    /// The cell's version after.
    pub version: u64,
    /// Units the op moved (for `adjust`, the applied delta).
    pub qty: i64,
    /// The node that made the call.
    pub node: String,
    /// Redis time of the change, ms.
    pub at_ms: u64,
    /// reserve, commit, release, expire, extend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    /// The cart a reservation line belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cart_id: Option<String>,
    /// reserve: units beyond sellable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backordered: Option<i64>,
    /// adjust: delta or absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<AdjustmentKind>,
    /// adjust: the sending system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// adjust: the sender's event id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event_id: Option<String>,
    /// adjust: the sender's sequence (a decimal string in the entry).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "decimal")]
    pub source_seq: Option<u64>,
    /// adjust: sellable fell below −backorder_limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shortfall: Option<bool>,
    /// absolute adjust: the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted: Option<i64>,
    /// absolute adjust of a key with buckets: what the fenced buckets held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets_on_hand: Option<i64>,
    /// adjust: the drain it ran in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_epoch: Option<u64>,
    /// settings: safety stock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_stock: Option<i64>,
    /// settings: backorder limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backorder_limit: Option<i64>,
    /// settings: low-stock threshold (-1: the configured default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_stock_threshold: Option<i64>,
    /// settings: reorder point (-1: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder_point: Option<i64>,
    /// settings: reorder quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder_qty: Option<i64>,
    /// rebuild: open holds whose records Redis had lost, released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Vec<String>>,
    /// rebuild: Redis's on_hand before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found_on_hand: Option<i64>,
    /// rebuild: Redis's reserved before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found_reserved: Option<i64>,
    /// rebuild: Redis's version before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found_version: Option<u64>,
    /// extend: the new expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// transfers: the id both halves share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    /// transfer_out: the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_cell: Option<String>,
    /// transfer_in: the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cell: Option<String>,
    /// transfers: activate, refill, drain (reclaim in older entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Entries written before this version carried the scoped idempotency
    /// key; read, never written any more (no client text in the ledger).
    #[serde(default, skip_serializing)]
    pub idempotency_key: Option<String>,
    /// Set by the relay: `<partition>-<stream id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<String>,
    /// Set by the relay: the stream id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
}

impl LedgerEntry {
    /// Parses an entry and checks what its op needs.
    pub fn parse(text: &str) -> Result<Self, String> {
        let entry: Self = serde_json::from_str(text).map_err(|error| error.to_string())?;
        entry.check()?;
        Ok(entry)
    }

    /// [`LedgerEntry::parse`] of a JSON value (a PostgreSQL `jsonb` row).
    pub fn from_value(value: serde_json::Value) -> Result<Self, String> {
        let entry: Self = serde_json::from_value(value).map_err(|error| error.to_string())?;
        entry.check()?;
        Ok(entry)
    }

    /// The fields each op must carry are there.
    pub fn check(&self) -> Result<(), String> {
        if self.v != LEDGER_VERSION {
            return Err(format!("ledger schema version {}", self.v));
        }
        let missing = |field: &str| Err(format!("a {} entry without {field}", self.op));
        match self.op {
            LedgerOp::Reserve
            | LedgerOp::Commit
            | LedgerOp::Release
            | LedgerOp::Expire
            | LedgerOp::Extend
                if self.reservation_id.is_none() =>
            {
                missing("reservation_id")
            }
            LedgerOp::TransferOut | LedgerOp::TransferIn if self.transfer_id.is_none() => {
                missing("transfer_id")
            }
            LedgerOp::Adjust if self.kind.is_none() => missing("kind"),
            LedgerOp::Adjust if self.source.is_none() || self.source_event_id.is_none() => {
                missing("source and source_event_id")
            }
            LedgerOp::Adjust if self.shortfall.is_none() => missing("shortfall"),
            _ => Ok(()),
        }
    }

    /// Its stock key.
    pub fn key(&self) -> crate::StockKey {
        crate::StockKey::new(&self.merchant, &self.sku, &self.location)
    }

    /// Whether its cell is a bucket.
    pub fn in_bucket(&self) -> bool {
        self.cell.contains("|bucket|")
    }

    /// Its id, from `entry_id` (or the partition and `stream_id`).
    pub fn id(&self) -> Result<EntryId, String> {
        match (&self.entry_id, &self.stream_id) {
            (Some(id), _) => EntryId::parse(id),
            (None, Some(stream_id)) => EntryId::of_stream(self.partition, stream_id),
            (None, None) => Err("an entry without its id".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESERVE: &str = r#"{"v":1,"op":"reserve","partition":17,"cell":"m|s|l|pool","merchant":"m","sku":"s","location":"l","on_hand_before":4,"on_hand_after":4,"reserved_before":0,"reserved_after":2,"version":9,"qty":2,"reservation_id":"r17.a","backordered":0,"node":"n","at_ms":1795324414971}"#;

    #[test]
    fn an_entry_round_trips_and_its_id_orders_it() {
        let entry = LedgerEntry::parse(RESERVE).expect("valid");
        assert_eq!(entry.op, LedgerOp::Reserve);
        let again =
            LedgerEntry::parse(&serde_json::to_string(&entry).expect("json")).expect("again");
        assert_eq!(again, entry);
        let id = EntryId::parse("17-1795324414971-3").expect("id");
        assert_eq!((id.partition, id.ms, id.seq), (17, 1795324414971, 3));
        assert_eq!(id.to_string(), "17-1795324414971-3");
        assert!(EntryId::parse("17-1795324414971-10").expect("id") > id);
    }

    #[test]
    fn a_missing_or_unknown_field_is_an_error_never_a_zero() {
        let without_qty = RESERVE.replace(r#""qty":2,"#, "");
        assert!(
            LedgerEntry::parse(&without_qty)
                .unwrap_err()
                .contains("qty")
        );
        let unknown = RESERVE.replace(r#""qty":2,"#, r#""qty":2,"colour":"red","#);
        assert!(LedgerEntry::parse(&unknown).unwrap_err().contains("colour"));
        let op = RESERVE.replace(r#""op":"reserve""#, r#""op":"teleport""#);
        assert!(LedgerEntry::parse(&op).is_err());
        let no_id = RESERVE.replace(r#""reservation_id":"r17.a","#, "");
        assert!(
            LedgerEntry::parse(&no_id)
                .unwrap_err()
                .contains("reservation_id")
        );
    }

    #[test]
    fn a_source_sequence_above_fourteen_digits_stays_exact() {
        let adjust = r#"{"v":1,"op":"adjust","partition":1,"cell":"m|s|l|pool","merchant":"m","sku":"s","location":"l","on_hand_before":0,"on_hand_after":9,"reserved_before":0,"reserved_after":0,"version":1,"qty":9,"kind":"absolute","source":"wms","source_event_id":"e","source_seq":"9007199254740991","shortfall":false,"counted":9,"node":"n","at_ms":1}"#;
        let entry = LedgerEntry::parse(adjust).expect("valid");
        assert_eq!(entry.source_seq, Some(9_007_199_254_740_991));
        let text = serde_json::to_string(&entry).expect("json");
        assert!(
            text.contains(r#""source_seq":"9007199254740991""#),
            "{text}"
        );
    }
}
