//! Reservations as the API sees them: carts of one or more lines, all or
//! nothing.
//!
//! Owns the cart protocol of shared/DESIGN.md. A one-line cart is a single
//! reservation record (one script call). A multi-line cart's lines live in
//! their own keys' partitions, so no script sees them all: the lines are held
//! one by one (each idempotent, each holding past the cart's expiry by
//! `cart_line_grace`), then one cart record in the partition of the cart's id
//! is created, and that record alone decides the cart's status. Commit and
//! release first flip the record (`held → committing | releasing`, refused once
//! expired), then apply the lines, then mark it done; a crash in between is
//! finished by [`Allocator::finish_carts`].
//!
//! A cart in `committing` is reported as `committed` (the decision is made and
//! will be carried out), one in `releasing` as `released`.
//!
//! Holding a cart (its lines, its record, its one idempotency record) is
//! [`crate::reserve`]'s; this module moves carts once they exist.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::scripts::Op;
use crate::{
    Allocator, AllocatorError, Reservation, ReservationStatus, Result, check_refusal, fingerprint,
    protocol,
};

pub use crate::limits::CART_LINES_MAX;

/// One line of a cart request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartLine {
    /// SKU to hold.
    pub sku: String,
    /// Location to hold at; `None`: the allocator chooses
    /// ([`crate::placement`]).
    pub location: Option<String>,
    /// Units, 1..=1,000,000.
    pub qty: u32,
    /// Locations in the buyer's order of preference (a line without a
    /// location).
    pub prefer: Vec<String>,
    /// Whether the line may be held across several locations (a line
    /// without a location).
    pub allow_split: bool,
    /// Whether a short line is filled with its SKU's substitutes
    /// ([`crate::substitutes`]).
    pub substitutes: bool,
}

impl CartLine {
    /// `qty` of `sku` at `location`: a line as the API had it before
    /// allocation.
    pub fn at(sku: &str, location: &str, qty: u32) -> Self {
        Self {
            sku: sku.to_owned(),
            location: Some(location.to_owned()),
            qty,
            prefer: Vec::new(),
            allow_split: false,
            substitutes: false,
        }
    }

    /// `qty` of `sku` wherever the allocator places it.
    pub fn anywhere(sku: &str, qty: u32) -> Self {
        Self {
            sku: sku.to_owned(),
            location: None,
            qty,
            prefer: Vec::new(),
            allow_split: false,
            substitutes: false,
        }
    }
}

/// A reservation request of one merchant for one or more lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartRequest {
    /// The merchant the lines belong to.
    pub merchant: String,
    /// The lines; one (sku, location) at most once.
    pub lines: Vec<CartLine>,
    /// Hold lifetime; the configured default when `None`.
    pub ttl: Option<Duration>,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// Opaque customer reference; stored only as a keyed hash.
    pub customer_ref: Option<String>,
    /// Hold what can be held rather than all or nothing.
    pub allow_partial: bool,
}

/// A hold of a reservation as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct CartLineView {
    /// SKU held.
    pub sku: String,
    /// Location held at.
    pub location: String,
    /// Units held.
    pub qty: u32,
    /// Units beyond sellable, on backorder.
    pub backordered: u32,
    /// The index of the request line this hold serves.
    #[serde(default = "line_unknown")]
    pub line: u32,
    /// The line's SKU, when this holds a substitute for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substitute_for: Option<String>,
    /// Units of the line's SKU a substitute hold stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stands_for: Option<u32>,
}

impl CartLineView {
    /// Units of its request line's SKU this hold makes up.
    pub fn counts_for(&self) -> u32 {
        self.stands_for.unwrap_or(self.qty)
    }
}

/// What a hold stored before allocation (one hold per line, in order)
/// reads as until [`CartView::number_lines`] numbers it.
fn line_unknown() -> u32 {
    u32::MAX
}

/// A request line of a partial reservation (`allow_partial`) that holds
/// less than it asked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Unfilled {
    /// The request line's index.
    pub line: u32,
    /// Its SKU.
    pub sku: String,
    /// Units it asked for.
    pub requested: u32,
    /// Units its holds hold (0 when none could be held).
    pub held: u32,
}

/// A reservation as the API shows it, one line or many.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct CartView {
    /// The id clients use.
    pub reservation_id: String,
    /// Its merchant.
    pub merchant: String,
    /// Where it is in its life.
    pub status: ReservationStatus,
    /// Advertised expiry, Redis time in ms.
    pub expires_at_ms: u64,
    /// Its holds, in the order they were placed.
    pub lines: Vec<CartLineView>,
    /// Whether it was asked for with `allow_partial` (its lines then show
    /// what each request line asked for and got).
    #[serde(default)]
    pub partial: bool,
    /// The request lines of a partial reservation holding less than asked.
    #[serde(default)]
    pub unfilled: Vec<Unfilled>,
}

impl CartView {
    /// Numbers the holds of an answer stored before allocation (one hold
    /// per request line, in order) by their position.
    pub(crate) fn number_lines(mut self) -> Self {
        for (index, hold) in self.lines.iter_mut().enumerate() {
            if hold.line == line_unknown() {
                hold.line = index as u32;
            }
        }
        self
    }
}

/// A successful cart reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartHold {
    /// The held cart.
    pub cart: CartView,
    /// True when this answers a retry with the same idempotency key.
    pub replayed: bool,
}

/// A cart record's line (one hold), with the ids the allocator needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub(crate) struct StoredLine {
    pub(crate) reservation_id: String,
    pub(crate) partition: u32,
    pub(crate) sku: String,
    pub(crate) location: String,
    pub(crate) qty: u32,
    pub(crate) backordered: u32,
    /// The request line it serves (records made before allocation have
    /// one hold per line, in order, and no index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) line: Option<u32>,
    /// The line's SKU, when this holds a substitute for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) substitute_for: Option<String>,
    /// Units of the line's SKU a substitute hold stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stands_for: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct StoredCart {
    reservation_id: String,
    merchant: String,
    status: String,
    expires_at_ms: u64,
    lines: Vec<StoredLine>,
    #[serde(default)]
    partial: bool,
    #[serde(default)]
    unfilled: Vec<Unfilled>,
}

impl StoredCart {
    /// A cart script's reply as the record it shows.
    pub(crate) fn from_reply(reply: Value) -> Result<Self> {
        match record(reply)? {
            Record::Cart(cart) => Ok(cart),
            Record::Line(line) => Err(AllocatorError::Protocol(format!(
                "cart reply is a line: {line:?}"
            ))),
        }
    }

    pub(crate) fn view(&self) -> Result<CartView> {
        let status = match self.status.as_str() {
            "held" => ReservationStatus::Held,
            "committed" | "committing" => ReservationStatus::Committed,
            "released" | "releasing" => ReservationStatus::Released,
            "expired" => ReservationStatus::Expired,
            other => return Err(AllocatorError::Protocol(format!("cart status {other}"))),
        };
        Ok(CartView {
            reservation_id: self.reservation_id.clone(),
            merchant: self.merchant.clone(),
            status,
            expires_at_ms: self.expires_at_ms,
            lines: self
                .lines
                .iter()
                .enumerate()
                .map(|(index, line)| CartLineView {
                    sku: line.sku.clone(),
                    location: line.location.clone(),
                    qty: line.qty,
                    backordered: line.backordered,
                    line: line.line.unwrap_or(index as u32),
                    substitute_for: line.substitute_for.clone(),
                    stands_for: line.stands_for,
                })
                .collect(),
            partial: self.partial,
            unfilled: self.unfilled.clone(),
        })
    }
}

impl From<&Reservation> for CartView {
    fn from(reservation: &Reservation) -> Self {
        CartView {
            reservation_id: reservation.reservation_id.clone(),
            merchant: reservation.merchant.clone(),
            status: reservation.status,
            expires_at_ms: reservation.expires_at_ms,
            lines: vec![CartLineView {
                sku: reservation.sku.clone(),
                location: reservation.location.clone(),
                qty: reservation.qty,
                backordered: reservation.backordered,
                line: 0,
                substitute_for: None,
                stands_for: None,
            }],
            partial: false,
            unfilled: Vec::new(),
        }
    }
}

/// A script reply that is either a cart record or a one-line reservation.
enum Record {
    Cart(StoredCart),
    Line(Reservation),
}

fn record(reply: Value) -> Result<Record> {
    check_refusal(&reply)?;
    if reply["kind"] == json!("cart") {
        serde_json::from_value(reply)
            .map(Record::Cart)
            .map_err(protocol)
    } else {
        serde_json::from_value(reply)
            .map(Record::Line)
            .map_err(protocol)
    }
}

impl Allocator {
    /// Releases lines of a cart that will not be held (best effort: a line
    /// not released here expires after its hold).
    pub(crate) async fn release_lines<'a>(
        &self,
        cart_id: &str,
        lines: impl Iterator<Item = &'a StoredLine>,
    ) {
        for line in lines {
            match self.move_line(Op::Release, cart_id, line).await {
                // A line id an abandoned attempt never got to hold.
                Ok(_) | Err(AllocatorError::NotFound | AllocatorError::NotHeld { .. }) => {}
                Err(error) => {
                    tracing::warn!(cart_id, line = %line.reservation_id, %error, "cannot release cart line; it will expire");
                }
            }
        }
    }

    async fn move_line(&self, op: Op, cart_id: &str, line: &StoredLine) -> Result<Reservation> {
        let name = if op == Op::Commit {
            "commit"
        } else {
            "release"
        };
        let args = json!({
            "reservation_id": line.reservation_id, "cart_flow": true,
            "idempotency_key": format!("cart{name}|{cart_id}|{}", line.reservation_id),
            "fingerprint": fingerprint(&json!({ "op": name, "reservation_id": line.reservation_id })),
        });
        let reply = self.call(op, line.partition, args).await?;
        self.settle_after(line.partition, &reply).await;
        crate::decode_reservation(reply)
    }

    async fn record_of(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
    ) -> Result<(u32, Record)> {
        let partition = self.reservation_partition(reservation_id)?;
        let args = json!({ "reservation_id": reservation_id, "merchant": merchant });
        let reply = self.call(Op::GetReservation, partition, args).await?;
        Ok((partition, record(reply)?))
    }

    /// A reservation (one line or a cart) as it stands.
    pub async fn cart(&self, merchant: Option<&str>, reservation_id: &str) -> Result<CartView> {
        match self.record_of(merchant, reservation_id).await?.1 {
            Record::Cart(cart) => cart.view(),
            Record::Line(line) => Ok(CartView::from(&line)),
        }
    }

    /// Commits a reservation (one line or a cart).
    pub async fn commit_cart(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
        idempotency_key: &str,
    ) -> Result<CartView> {
        self.move_cart(Op::Commit, merchant, reservation_id, idempotency_key)
            .await
    }

    /// Releases a reservation (one line or a cart); a released or expired one
    /// is answered as it is, a committed one is refused.
    pub async fn release_cart(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
        idempotency_key: &str,
    ) -> Result<CartView> {
        self.move_cart(Op::Release, merchant, reservation_id, idempotency_key)
            .await
    }

    async fn move_cart(
        &self,
        op: Op,
        merchant: Option<&str>,
        reservation_id: &str,
        idempotency_key: &str,
    ) -> Result<CartView> {
        let (partition, found) = self.record_of(merchant, reservation_id).await?;
        if let Record::Line(_) = found {
            let line = if op == Op::Commit {
                self.commit(merchant, reservation_id, idempotency_key)
                    .await?
            } else {
                self.release(merchant, reservation_id, idempotency_key)
                    .await?
            };
            return Ok(CartView::from(&line));
        }
        let to = if op == Op::Commit {
            "commit"
        } else {
            "release"
        };
        let args = json!({ "action": "begin", "reservation_id": reservation_id, "merchant": merchant, "to": to });
        let begun = self.call(Op::Cart, partition, args).await;
        let cart = match begun {
            Err(error) => return Err(error),
            Ok(reply) => match record(reply) {
                Ok(Record::Cart(cart)) => cart,
                Ok(Record::Line(_)) => {
                    return Err(AllocatorError::Protocol(
                        "cart begin answered a line".to_owned(),
                    ));
                }
                Err(AllocatorError::NotHeld { status })
                    if op == Op::Release && status != ReservationStatus::Committed =>
                {
                    return self.cart(merchant, reservation_id).await;
                }
                Err(error) => return Err(error),
            },
        };
        self.carry_out(partition, op, &cart).await
    }

    /// Records a cart's decision (commit or release) without applying its
    /// lines: what a node that dies right after deciding leaves behind.
    /// [`Allocator::finish_carts`] or a repeated commit/release completes it.
    pub async fn decide_cart(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
        commit: bool,
    ) -> Result<CartView> {
        let partition = self.reservation_partition(reservation_id)?;
        let to = if commit { "commit" } else { "release" };
        let args = json!({ "action": "begin", "reservation_id": reservation_id, "merchant": merchant, "to": to });
        match record(self.call(Op::Cart, partition, args).await?)? {
            Record::Cart(cart) => cart.view(),
            Record::Line(_) => Err(AllocatorError::InvalidRequest(
                "not a multi-line cart".to_owned(),
            )),
        }
    }

    async fn carry_out(&self, partition: u32, op: Op, cart: &StoredCart) -> Result<CartView> {
        if matches!(cart.status.as_str(), "committing" | "releasing") {
            for line in &cart.lines {
                match self.move_line(op, &cart.reservation_id, line).await {
                    Ok(_) => {}
                    Err(AllocatorError::NotHeld { status }) if op == Op::Release => {
                        tracing::debug!(line = %line.reservation_id, ?status, "cart line already ended");
                    }
                    Err(error @ AllocatorError::NotHeld { .. }) => {
                        return Err(AllocatorError::Protocol(format!(
                            "cart {} line {} could not be committed within its grace: {error}",
                            cart.reservation_id, line.reservation_id
                        )));
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        let args = json!({ "action": "finish", "reservation_id": cart.reservation_id });
        match record(self.call(Op::Cart, partition, args).await?)? {
            Record::Cart(done) => done.view(),
            Record::Line(_) => Err(AllocatorError::Protocol(
                "cart finish answered a line".to_owned(),
            )),
        }
    }

    /// Gives a held reservation (one line or a cart) a new lifetime from now;
    /// a cart's lines are extended first, so they always outlive it.
    pub async fn extend_cart(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
        ttl: Duration,
    ) -> Result<CartView> {
        let (partition, found) = self.record_of(merchant, reservation_id).await?;
        let cart = match found {
            Record::Line(_) => {
                return Ok(CartView::from(
                    &self.extend(merchant, reservation_id, ttl).await?,
                ));
            }
            Record::Cart(cart) => cart,
        };
        let view = cart.view()?;
        if view.status != ReservationStatus::Held {
            return Err(AllocatorError::NotHeld {
                status: view.status,
            });
        }
        let ttl_ms = self.ttl_ms(Some(ttl))?;
        let grace_ms = self.hold_limits().cart_line_grace.as_millis() as u64;
        for line in &cart.lines {
            let args = json!({
                "reservation_id": line.reservation_id, "cart_flow": true, "ttl_ms": ttl_ms, "grace_ms": grace_ms,
            });
            crate::decode_reservation(self.call(Op::Extend, line.partition, args).await?)?;
        }
        let args = json!({ "reservation_id": reservation_id, "merchant": merchant, "ttl_ms": ttl_ms, "grace_ms": 0 });
        match record(self.call(Op::Extend, partition, args).await?)? {
            Record::Cart(cart) => cart.view(),
            Record::Line(_) => Err(AllocatorError::Protocol(
                "cart extend answered a line".to_owned(),
            )),
        }
    }

    /// Finishes carts of `partition` left committing or releasing for at
    /// least `older_than` (their process died half way). Returns how many.
    pub async fn finish_carts(&self, partition: u32, older_than: Duration) -> Result<u64> {
        let mut failed = Vec::new();
        let finished = self
            .finish_carts_reporting(partition, older_than, &|_| false, &mut failed)
            .await?;
        crate::hot::first_failure(finished, failed)
    }

    /// [`Allocator::finish_carts`] for the reconciler: carts for which `skip`
    /// says so are left alone (they are backing off), and a cart that cannot
    /// be finished is reported in `failed` with its id while the others go on.
    /// Only an unreachable store stops the pass.
    pub async fn finish_carts_reporting(
        &self,
        partition: u32,
        older_than: Duration,
        skip: &(dyn Fn(&str) -> bool + Sync),
        failed: &mut Vec<(String, AllocatorError)>,
    ) -> Result<u64> {
        let mut cursor = "0".to_owned();
        let mut finished = 0;
        loop {
            let args = json!({ "older_than_ms": older_than.as_millis() as u64, "limit": 200, "cursor": cursor });
            let reply = self.call(Op::PendingTransfers, partition, args).await?;
            check_refusal(&reply)?;
            let carts: Vec<Value> = crate::hot::list(&reply["carts"])?;
            for pending in carts {
                let id = pending["reservation_id"].as_str().unwrap_or_default();
                if skip(id) {
                    continue;
                }
                match self.finish_cart(partition, id).await {
                    Ok(true) => finished += 1,
                    Ok(false) => {}
                    Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                    Err(error) => failed.push((id.to_owned(), error)),
                }
            }
            cursor = reply["cursor"].as_str().unwrap_or("0").to_owned();
            if cursor == "0" {
                return Ok(finished);
            }
        }
    }

    async fn finish_cart(&self, partition: u32, id: &str) -> Result<bool> {
        let args = json!({ "reservation_id": id });
        let Record::Cart(cart) = record(self.call(Op::GetReservation, partition, args).await?)?
        else {
            return Ok(false);
        };
        let op = match cart.status.as_str() {
            "committing" => Op::Commit,
            "releasing" => Op::Release,
            _ => return Ok(false),
        };
        self.carry_out(partition, op, &cart).await?;
        Ok(true)
    }
}
