//! Typed values the allocator hands out: cells, reservations, outcomes.
//!
//! Owns the Rust side of the scripts' reply schema (version 1). It does not
//! talk to Redis.

use serde::{Deserialize, Serialize};

/// One cell of a stock key: its pool, or a node's bucket in a flash sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Merchant of the stock key.
    pub merchant: String,
    /// SKU of the stock key.
    pub sku: String,
    /// Location of the stock key.
    pub location: String,
    /// `pool` or `bucket`.
    pub kind: String,
    /// The node owning a bucket.
    #[serde(default)]
    pub node: Option<String>,
    /// Physical units counted in this cell.
    pub on_hand: i64,
    /// Units held by reservations.
    pub reserved: i64,
    /// Units never offered for sale (pool only).
    pub safety_stock: i64,
    /// How far sellable may go below zero for backorders (pool only).
    pub backorder_limit: i64,
    /// `low` status at or under this; -1 means the configured default.
    pub low_stock_threshold: i64,
    /// Increases with every change; ETags and notifications carry it.
    pub version: u64,
    /// Units this cell debited for transfers not yet marked credited.
    #[serde(default)]
    pub out_in_flight: i64,
    /// Redis time of the last change, ms (idle buckets are reclaimed by it).
    #[serde(default)]
    pub touched_ms: u64,
    /// A pool's buckets: node → partition of every bucket it ever lent units
    /// to. The pool is the one home of this list (drains, reads and the
    /// reconciler find a key's buckets here, whatever the config says now).
    #[serde(default, deserialize_with = "lua_map")]
    pub buckets: std::collections::BTreeMap<String, u32>,
    /// A bucket that sells nothing: its key is being counted, is short, or
    /// its units were taken back; a refill debited after its fence reopens it.
    #[serde(default)]
    pub fenced: bool,
    /// The drain epoch of a bucket's last fence (only a drain at least this
    /// recent may take its units).
    #[serde(default)]
    pub fence_epoch: u64,
    /// A pool's last drain epoch.
    #[serde(default)]
    pub drain_epoch: u64,
    /// Redis time (ms) until which a pool's drain lease holds (the pool lends
    /// nothing meanwhile); 0 or past: no drain.
    #[serde(default)]
    pub drain_until_ms: u64,
}

/// Lua's cjson writes an empty table as `{}` and a table with string keys as
/// an object; either is a map here (an empty array too).
fn lua_map<'de, D>(deserializer: D) -> Result<std::collections::BTreeMap<String, u32>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(node, partition)| {
                partition
                    .as_u64()
                    .and_then(|partition| u32::try_from(partition).ok())
                    .map(|partition| (node, partition))
                    .ok_or_else(|| serde::de::Error::custom("bucket partition"))
            })
            .collect(),
        serde_json::Value::Array(items) if items.is_empty() => Ok(Default::default()),
        serde_json::Value::Null => Ok(Default::default()),
        other => Err(serde::de::Error::custom(format!("bucket list {other}"))),
    }
}

/// A stock key's status as the API shows it and signals track it: `available`
/// units (never below 0) against its low-stock `threshold`.
pub fn stock_status(available: i64, threshold: i64) -> &'static str {
    if available <= 0 {
        "out_of_stock"
    } else if available <= threshold {
        "low"
    } else {
        "in_stock"
    }
}

impl Cell {
    /// on_hand − reserved − safety_stock; negative while backordered or short.
    pub fn sellable(&self) -> i64 {
        self.on_hand - self.reserved - self.safety_stock
    }

    /// Whether a loss took the cell past what backorders allow; reservations
    /// are refused until stock is restored.
    pub fn is_short(&self) -> bool {
        self.sellable() < -self.backorder_limit
    }
}

/// Where a reservation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReservationStatus {
    /// Units are held until `expires_at_ms`.
    Held,
    /// Units left on_hand: sold.
    Committed,
    /// Units returned to sellable on request.
    Released,
    /// Units returned to sellable when the hold ran out.
    Expired,
}

impl ReservationStatus {
    /// The lowercase name used in the API and the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Held => "held",
            ReservationStatus::Committed => "committed",
            ReservationStatus::Released => "released",
            ReservationStatus::Expired => "expired",
        }
    }
}

/// A reservation of units of one cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// `r<partition>.<hex>`.
    pub reservation_id: String,
    /// Merchant that owns it.
    pub merchant: String,
    /// SKU held.
    pub sku: String,
    /// Location held at.
    pub location: String,
    /// Cell id the units are held in.
    pub cell: String,
    /// Units held.
    pub qty: u32,
    /// Part of `qty` beyond sellable, taken from the backorder allowance.
    pub backordered: u32,
    /// Where it is in its life.
    pub status: ReservationStatus,
    /// Advertised expiry, Redis time in ms since the epoch.
    pub expires_at_ms: u64,
    /// When the hold really ends (expiry plus a cart's grace).
    pub hold_until_ms: u64,
    /// The cart this is a line of, if any.
    #[serde(default)]
    pub cart_id: Option<String>,
    /// The expiry the hold was made with, once an extension changed it.
    #[serde(default)]
    pub held_expires_at_ms: Option<u64>,
    /// The partition of the customer allowance that paid for the hold (a
    /// flash sale's customer limits), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_p: Option<u32>,
}

impl Reservation {
    /// The answer the request that made this one-line hold got, which every
    /// retry of that request gets again (API: "the original status and
    /// body"), whatever happened to the hold since.
    pub fn answer(&self) -> crate::CartView {
        let mut view = crate::CartView::from(self);
        view.status = ReservationStatus::Held;
        view.expires_at_ms = self.held_expires_at_ms.unwrap_or(self.expires_at_ms);
        view
    }
}

/// A successful reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The reservation now held.
    pub reservation: Reservation,
    /// True when this answers a retry with the same idempotency key.
    pub replayed: bool,
}

/// A line a reservation could not get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShortLine {
    /// SKU asked for.
    pub sku: String,
    /// Location asked at; `None` for a line that named none (its
    /// `available` is then what the allocator could place: the best
    /// location's units, or every eligible location's for a split line).
    pub location: Option<String>,
    /// The index of the request line (`None` in answers stored before
    /// allocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// Units asked for.
    pub requested: u32,
    /// Sellable units there were (never below 0).
    pub available: i64,
}

impl ShortLine {
    /// `requested` units of `key` refused with `available` there: a hold's
    /// refusal (the line it serves is the caller's to say).
    pub fn at(key: &crate::StockKey, requested: u32, available: i64) -> Self {
        Self {
            sku: key.sku.clone(),
            location: Some(key.location.clone()),
            line: None,
            requested,
            available,
        }
    }
}

/// What an adjustment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdjustmentOutcome {
    /// The change is applied; `shortfall` when sellable fell past the backorder limit.
    Applied {
        /// Sellable went below −backorder_limit (a loss to make good).
        shortfall: bool,
        /// The pool cell after the change (boxed: a cell is large).
        cell: Box<Cell>,
    },
    /// `(source, event_id)` was applied before; nothing changed.
    Duplicate,
    /// An absolute count with a `source_seq` not newer than the last applied one.
    Stale {
        /// The last applied sequence of that key and source.
        last_source_seq: u64,
    },
}

/// What the sweeper's call did in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct SweepOutcome {
    /// Holds released as expired by this call.
    pub expired: u64,
    /// Due holds left for the next call.
    pub remaining: u64,
}

/// How an absolute count or a delta changes on_hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdjustmentKind {
    /// Add `qty` (may be negative).
    Delta,
    /// Set on_hand to `qty` (a physical count), ordered by `source_seq`.
    Absolute,
}

/// A physical stock change from WMS, POS, ERP or ops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjustment {
    /// Merchant of the stock key.
    pub merchant: String,
    /// SKU of the stock key.
    pub sku: String,
    /// Location of the stock key.
    pub location: String,
    /// Delta or absolute.
    pub kind: AdjustmentKind,
    /// The delta, or the counted units.
    pub qty: i64,
    /// The system that sent it (`pos-store-12`).
    pub source: String,
    /// The sender's id of this event: `(source, event_id)` applies once.
    pub event_id: String,
    /// The sender's sequence; required for absolute counts.
    #[serde(default)]
    pub source_seq: Option<u64>,
}

use crate::limits::{COUNT_QTY_MAX, DELTA_QTY_MAX, SOURCE_SEQ_MAX};

/// An adjustment as it arrives, over HTTP (`POST /v1/stock/adjustments`) or
/// on the events topic: the one place its rules are checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    /// Merchant.
    pub merchant: String,
    /// SKU.
    pub sku: String,
    /// Location.
    pub location: String,
    /// `delta` or `absolute`.
    pub kind: String,
    /// The delta, or the counted units.
    pub qty: i64,
    /// The system that sent it.
    pub source: String,
    /// The sender's event id.
    pub event_id: String,
    /// The sender's sequence (required for `absolute`).
    #[serde(default)]
    pub source_seq: Option<u64>,
}

impl AdjustmentRequest {
    /// Checks the request into an adjustment, or says what is wrong (the
    /// text an HTTP 400 or a dead letter carries).
    pub fn check(self) -> Result<Adjustment, String> {
        for (field, value) in [
            ("merchant", &self.merchant),
            ("sku", &self.sku),
            ("location", &self.location),
            ("source", &self.source),
            ("event_id", &self.event_id),
        ] {
            if !config::is_valid_id(value) {
                return Err(format!("{field} must match [A-Za-z0-9._:-]{{1,128}}"));
            }
        }
        let kind = match self.kind.as_str() {
            // Not `abs()`: it overflows on i64::MIN (a panic in a debug
            // build, and a wrap to a negative that passed in release).
            "delta" if self.qty == 0 || !(-DELTA_QTY_MAX..=DELTA_QTY_MAX).contains(&self.qty) => {
                return Err(format!(
                    "a delta qty must be non-zero, at most {DELTA_QTY_MAX} either way"
                ));
            }
            "delta" => AdjustmentKind::Delta,
            "absolute" if !(0..=COUNT_QTY_MAX).contains(&self.qty) => {
                return Err(format!(
                    "an absolute qty must be between 0 and {COUNT_QTY_MAX}"
                ));
            }
            "absolute" if self.source_seq.is_none() => {
                return Err("an absolute count needs source_seq".to_owned());
            }
            "absolute" => AdjustmentKind::Absolute,
            _ => return Err("kind must be delta or absolute".to_owned()),
        };
        if self.source_seq.is_some_and(|seq| seq > SOURCE_SEQ_MAX) {
            return Err(format!("source_seq must be at most {SOURCE_SEQ_MAX}"));
        }
        Ok(Adjustment {
            merchant: self.merchant,
            sku: self.sku,
            location: self.location,
            kind,
            qty: self.qty,
            source: self.source,
            event_id: self.event_id,
            source_seq: self.source_seq,
        })
    }
}

/// Reads a JSON object into `T`: the one door of every request body and
/// stock event from outside. Only an object: serde would also read an array
/// as a struct's fields in order (`[]` as all defaults). The error says what
/// is wrong, for a 400 or a dead letter.
///
/// The same holds one level down: the API's arrays hold objects (lines,
/// items) or scalars, never arrays, so an array inside an array (a line
/// written as its fields in order) is refused too.
pub fn from_json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|error| format!("malformed JSON: {error}"))?;
    if !value.is_object() {
        return Err("the body must be a JSON object".to_owned());
    }
    if nests_arrays(&value) {
        return Err("an array of the body holds an array; its items must be objects".to_owned());
    }
    serde_json::from_value(value).map_err(|error| format!("malformed JSON: {error}"))
}

/// Whether an array in `value` holds an array.
fn nests_arrays(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Array(items) => items
            .iter()
            .any(|item| item.is_array() || nests_arrays(item)),
        serde_json::Value::Object(fields) => fields.values().any(nests_arrays),
        _ => false,
    }
}

/// Settings of a stock key's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockSettings {
    /// Units never offered for sale.
    pub safety_stock: u64,
    /// How far sellable may go below zero for backorders.
    pub backorder_limit: u64,
    /// `low` at or under this; `None` means the configured default.
    pub low_stock_threshold: Option<u64>,
    /// A `reorder` signal when available falls to this or below; `None`:
    /// none. Not a stock decision: it is kept in the settings' ledger entry
    /// (the writer's signals read it there), not in the cell.
    pub reorder_point: Option<u64>,
    /// The quantity a `reorder` signal suggests (kept likewise).
    pub reorder_qty: u64,
}

/// One cell as the ledger says it should be, for [`crate::Allocator::rebuild_cell`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CellRebuild {
    /// The cell (its partition and id).
    #[serde(skip)]
    pub cell: crate::CellRef,
    /// Merchant of the stock key.
    pub merchant: String,
    /// SKU of the stock key.
    pub sku: String,
    /// Location of the stock key.
    pub location: String,
    /// `pool` or `bucket`.
    pub kind: String,
    /// The node owning a bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket_node: Option<String>,
    /// The cell's version in Redis when the caller checked it was quiet; -1
    /// when it was missing. The rebuild is refused if it is no longer so.
    pub expect_version: i64,
    /// on_hand after the last ledger entry.
    pub on_hand: i64,
    /// reserved after the last ledger entry.
    pub reserved: i64,
    /// version of the last ledger entry (the rebuilt cell gets one more).
    pub version: u64,
    /// Units this cell debited for transfers the ledger has not seen credited.
    pub out_in_flight: i64,
    /// From the last `settings` entry (0 without one).
    pub safety_stock: i64,
    /// From the last `settings` entry (0 without one).
    pub backorder_limit: i64,
    /// From the last `settings` entry (-1, the configured default, without one).
    pub low_stock_threshold: i64,
    /// Reservation ids the ledger has reserved on this cell and not yet
    /// committed, released, expired or rebuilt away.
    pub open_holds: Vec<String>,
}

/// What a rebuild did to one cell.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RebuildOutcome {
    /// The cell as now stored.
    pub cell: Cell,
    /// Units of open holds Redis had lost, released.
    pub released_units: i64,
    /// How many such holds.
    pub released_holds: u64,
}

#[cfg(test)]
mod tests {
    //! The adjustment rules, the one home of what an HTTP body and a Kafka
    //! event may ask, against the rules written out independently.

    use super::*;
    use proptest::prelude::*;

    /// Ids around the valid ones: valid, empty, too long, a bad character.
    fn id() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9._:-]{1,128}",
            Just(String::new()),
            "[a-z]{129,140}",
            "[a-z]{0,5}[ /%ü][a-z]{0,5}",
        ]
    }

    /// Quantities around the bounds, the extremes included.
    fn qty() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(0i64),
            Just(i64::MIN),
            Just(i64::MAX),
            Just(DELTA_QTY_MAX),
            Just(-DELTA_QTY_MAX),
            Just(DELTA_QTY_MAX + 1),
            Just(COUNT_QTY_MAX),
            Just(COUNT_QTY_MAX + 1),
            -2_000_000i64..2_000_000,
            any::<i64>(),
        ]
    }

    proptest! {
        #[test]
        fn an_adjustment_is_accepted_exactly_when_it_keeps_the_rules(
            merchant in id(),
            sku in id(),
            kind in prop_oneof![Just("delta"), Just("absolute"), Just("teleport")],
            qty in qty(),
            source_seq in proptest::option::of(prop_oneof![
                Just(SOURCE_SEQ_MAX),
                Just(SOURCE_SEQ_MAX + 1),
                Just(u64::MAX),
                any::<u64>(),
            ]),
        ) {
            let request = AdjustmentRequest {
                merchant: merchant.clone(),
                sku: sku.clone(),
                location: "dc1".to_owned(),
                kind: kind.to_owned(),
                qty,
                source: "pos-1".to_owned(),
                event_id: "e1".to_owned(),
                source_seq,
            };
            let ids = config::is_valid_id(&merchant) && config::is_valid_id(&sku);
            let quantity = match kind {
                "delta" => qty != 0 && (-1_000_000..=1_000_000).contains(&qty),
                "absolute" => (0..=1_000_000_000).contains(&qty) && source_seq.is_some(),
                _ => false,
            };
            let sequence = source_seq.is_none_or(|seq| seq < (1 << 53));
            let verdict = request.check();
            prop_assert_eq!(verdict.is_ok(), ids && quantity && sequence, "{:?}", verdict);
            if let Ok(adjustment) = verdict {
                prop_assert_eq!(adjustment.qty, qty);
                prop_assert_eq!(adjustment.source_seq, source_seq);
            }
        }
    }
}
