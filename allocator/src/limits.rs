//! Every bound of the stock model, once: its value, its unit and why.
//!
//! Owns the limits the scripts and the Rust side share. The scripts get them
//! rendered into their prologue ([`lua_prologue`], as the table `LIMITS`), the
//! gateway and ingestion check requests against the same constants, and
//! [`check_config`] validates the configured limits against them at start-up
//! and on every reload (a reload that breaks one is refused with the reason).

/// Units one reservation line may ask for (API.md: 1..=1,000,000).
pub const QTY_MAX: u32 = 1_000_000;

/// Units one delta adjustment may carry, either way (a physical event, not a
/// bulk load: larger changes come as counts).
pub const DELTA_QTY_MAX: i64 = 1_000_000;

/// Largest physical count, safety stock, backorder limit or threshold, and
/// the most units one transfer may move (a shelf, not a warehouse network).
pub const COUNT_QTY_MAX: i64 = 1_000_000_000;

/// Largest `source_seq`: every integer up to it is exact in the scripts'
/// numbers (IEEE doubles), so ordering by it is exact.
pub const SOURCE_SEQ_MAX: u64 = (1 << 53) - 1;

/// Characters in an id (merchant, sku, location, reservation, event, node):
/// API.md's `[A-Za-z0-9._:-]{1,128}`.
pub const ID_LENGTH_MAX: usize = 128;

/// Lines of one cart the allocator holds; the API's configured limit
/// (`limits.reservation_lines_max`) may only be lower.
pub const CART_LINES_MAX: usize = 256;

/// Holds one reservation may make in all (its lines, split across
/// locations): the cart record's limit, like its lines.
pub const RESERVATION_HOLDS_MAX: usize = CART_LINES_MAX;

/// Locations one line may name in `prefer`.
pub const PREFER_MAX: usize = 50;

/// Longest `customer_ref`, in characters (it is only ever stored as a
/// keyed hash; the bound keeps a request's size sane).
pub const CUSTOMER_REF_CHARS_MAX: usize = 256;

/// Holds in one coalesced `reserve_batch` call (one script run of bounded
/// length); `limits.coalesce_batch_max` may only be lower.
pub const RESERVE_BATCH_MAX: usize = 256;

/// Longest hold, ms (a week: claims and records are kept 24 h after they
/// end, so holds end well within their requests' memory).
pub const TTL_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// Longest cart line grace, ms.
pub const GRACE_MS_MAX: u64 = 3600 * 1000;

/// Largest partition number (Redis Cluster has 16,384 slots).
pub const PARTITION_MAX: u32 = 16_383;

/// The limits as a Lua table, prepended to every stock script.
pub fn lua_prologue() -> String {
    format!(
        "-- Rendered from allocator/src/limits.rs: change them there.\n\
         local LIMITS = {{ qty_max = {QTY_MAX}, delta_qty_max = {DELTA_QTY_MAX}, \
         count_qty_max = {COUNT_QTY_MAX}, source_seq_max = {SOURCE_SEQ_MAX}, \
         id_length_max = {ID_LENGTH_MAX}, cart_lines_max = {CART_LINES_MAX}, \
         reserve_batch_max = {RESERVE_BATCH_MAX}, ttl_ms_max = {TTL_MS_MAX}, \
         grace_ms_max = {GRACE_MS_MAX}, partition_max = {PARTITION_MAX} }}\n"
    )
}

/// Checks the configured limits against these: `Err` names every broken
/// one with the reason.
pub fn check_config(config: &config::Config) -> Result<(), String> {
    let mut broken = Vec::new();
    if config.limits.reservation_lines_max > CART_LINES_MAX {
        broken.push(format!(
            "limits.reservation_lines_max {} is over the allocator's {CART_LINES_MAX}",
            config.limits.reservation_lines_max
        ));
    }
    if config.limits.coalesce_batch_max > RESERVE_BATCH_MAX {
        broken.push(format!(
            "limits.coalesce_batch_max {} is over the allocator's {RESERVE_BATCH_MAX}",
            config.limits.coalesce_batch_max
        ));
    }
    if config
        .stock
        .reservation_ttl_seconds_max
        .saturating_mul(1000)
        > TTL_MS_MAX
    {
        broken.push(format!(
            "stock.reservation_ttl_seconds_max {} is over the allocator's {} s",
            config.stock.reservation_ttl_seconds_max,
            TTL_MS_MAX / 1000
        ));
    }
    if config.stock.cart_line_grace_seconds.saturating_mul(1000) > GRACE_MS_MAX {
        broken.push(format!(
            "stock.cart_line_grace_seconds {} is over the allocator's {} s",
            config.stock.cart_line_grace_seconds,
            GRACE_MS_MAX / 1000
        ));
    }
    if config.stock.partitions == 0 || config.stock.partitions > PARTITION_MAX + 1 {
        broken.push(format!(
            "stock.partitions {} must be 1 to {}",
            config.stock.partitions,
            PARTITION_MAX + 1
        ));
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prologue_names_every_limit_with_its_value() {
        let prologue = lua_prologue();
        assert!(prologue.contains("qty_max = 1000000,"), "{prologue}");
        assert!(
            prologue.contains("source_seq_max = 9007199254740991,"),
            "{prologue}"
        );
        assert!(prologue.contains("ttl_ms_max = 604800000,"), "{prologue}");
    }
}
