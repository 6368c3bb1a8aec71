//! Reservations of several holds: carts, lines whose location the
//! allocator chooses, lines split across locations, partial holds.
//!
//! Owns turning a request into holds and holding them as one reservation.
//! Every hold is still one atomic script on one cell (the pool, or this
//! node's bucket while a sale of the key is in force here, through the hot
//! path); the reservation is a cart record that alone decides its status
//! (`crate::cart`). Where a line without a location goes is
//! [`crate::placement`]'s rules on one read of its SKU's locations.
//!
//! **A plan is recorded before it is held.** An attempt's holds (each with
//! its cell and reservation id) are its *plan*, recorded in the request's
//! claim (`lua/claim.lua`) before any of them is made: the first plan when
//! the claim is made; a plan grown after a refusal, and the next attempt's
//! once the one before is abandoned (`advance`) and its holds released,
//! with the `plan` action. A caller that takes a claim over runs
//! the recorded plan again (same cells, same ids, which the scripts answer
//! as they stand), so a request never holds twice, whatever a read would
//! say now; it plans afresh only when the claim recorded none (then nothing
//! of the attempt was held, or the claim was made before plans were
//! recorded: its cart's lines named their locations and held at their
//! pools, where the fresh plan puts them again). A hold refused and planned
//! again elsewhere is marked `refused` in the plan that grows from it, and
//! never run again (it could hold by then, on top of its replacement).
//! Every hold carries its claim's lease end less the clocks' margin
//! (`hold_by_ms`), as a one-line hold does: a caller whose lease lapsed
//! makes no new hold beside the plan of the caller that took over. An
//! abandoned attempt releases every hold of its plan, made by this caller
//! or by an earlier one.
//!
//! **A refused plan is planned again, never trusted.** Two checkouts may
//! plan the same last units; the scripts hold them for one, and refuse the
//! other, whose missing units are planned again from a fresh read (at most
//! [`REPLANS_MAX`] times per attempt). A line with nothing left to plan is
//! short: without `allow_partial` the attempt is abandoned (its holds
//! released, `advance`) and the request refused with every line known to
//! be short;
//! with it, what was held is the reservation, and each line that holds
//! less than asked is listed as `unfilled`. A line that names its
//! location holds there or not at all, as before allocation; under
//! `allow_partial` it takes what the location had when its hold was
//! refused (the script's figure). A partial line that is not split stays at
//! the one location it got units from.
//!
//! **Ids.** Hold `i` of an attempt's plan is `line|<digest.life>|<attempt>|<i>`
//! in its cell's partition: a fixed-location cart's plan is its lines in
//! order at their pools, the ids it had before allocation, so a claim made
//! before an upgrade is taken over onto the same holds.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cart::{CartHold, CartRequest, StoredCart, StoredLine, Unfilled};
use crate::keys::{self, CellRef, StockKey};
use crate::placement::{Ask, Candidate, LocationSettings, place};
use crate::reserve::{Claim, HoldRequest, Route};
use crate::scripts::Op;
use crate::{
    Allocator, AllocatorError, ReservationStatus, Result, ShortLine, check_refusal, derive_random,
    protocol,
};

/// Attempts one request makes before giving up (an attempt is abandoned
/// when a line it held before a takeover has ended since).
const ATTEMPTS_MAX: u64 = 3;

/// Times one attempt plans refused units again before the lines still
/// missing are short.
pub const REPLANS_MAX: usize = 3;

/// One hold of a plan: where, what, and as what reservation id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlannedHold {
    /// The index of the request line it serves.
    pub(crate) line: u32,
    pub(crate) sku: String,
    pub(crate) location: String,
    pub(crate) qty: u32,
    /// The cell's id and partition.
    pub(crate) cell: String,
    pub(crate) partition: u32,
    pub(crate) reservation_id: String,
    /// Refused when run, and planned again since: never run again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) refused: bool,
    /// The line's SKU, when this holds a substitute for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) substitute_for: Option<String>,
    /// Units of the line's SKU a substitute hold stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stands_for: Option<u32>,
}

/// A hold to plan.
struct Hold<'a> {
    line: u32,
    sku: &'a str,
    location: &'a str,
    qty: u32,
    substitute_for: Option<&'a str>,
    stands_for: Option<u32>,
}

impl<'a> Hold<'a> {
    /// A hold of the line's own SKU.
    fn own(line: u32, sku: &'a str, location: &'a str, qty: u32) -> Self {
        Self {
            line,
            sku,
            location,
            qty,
            substitute_for: None,
            stands_for: None,
        }
    }
}

/// One hold of a line's fill.
struct Filled {
    sku: String,
    location: String,
    qty: u32,
    /// A substitute's hold (else the line's own SKU).
    substitute: bool,
    /// Units of the line's SKU it stands for.
    stands_for: u32,
}

/// A line's fill: its holds, and how many units of it they make up.
struct Fill {
    holds: Vec<Filled>,
    filled: u32,
}

/// `qty` units of `line` (which allows substitutes) from `candidates`: what
/// the placement rules give of its own SKU (only at `own_at` when set: a
/// line that is not split stays where it holds), then whole groups of
/// `substitutes`, each at one location (see `crate::substitutes`). An
/// inexact fill holds nothing unless `partial`.
fn fill_line(
    line: &crate::CartLine,
    qty: u32,
    partial: bool,
    own_at: Option<&str>,
    candidates: &HashMap<&str, Vec<Candidate>>,
    substitutes: &[crate::substitutes::Substitute],
) -> Fill {
    let named: Vec<String> = line.location.iter().cloned().collect();
    let prefer = if named.is_empty() {
        &line.prefer
    } else {
        &named
    };
    // A named line holds at its location only, substitutes too.
    let at = |sku: &str, only: Option<&str>| -> Vec<Candidate> {
        candidates
            .get(sku)
            .into_iter()
            .flatten()
            .filter(|candidate| {
                line.location
                    .as_deref()
                    .or(only)
                    .is_none_or(|location| candidate.location == location)
            })
            .cloned()
            .collect()
    };
    let mut holds: Vec<Filled> = Vec::new();
    let own = place(
        &Ask {
            qty,
            prefer,
            allow_split: line.allow_split,
            allow_partial: true,
        },
        &at(&line.sku, own_at),
    );
    for (location, units) in own.holds.into_iter().filter(|(_, units)| *units > 0) {
        holds.push(Filled {
            sku: line.sku.clone(),
            location,
            qty: units,
            substitute: false,
            stands_for: units,
        });
    }
    let rest = qty - holds.iter().map(|hold| hold.qty).sum::<u32>();
    // Each substitute's location: by the rules, the first that gives the
    // most whole groups of what the rest needs; and how many it gives.
    let options: Vec<(String, u32)> = substitutes
        .iter()
        .map(|substitute| {
            let needed =
                (rest / substitute.replaces).min(crate::limits::QTY_MAX / substitute.units.max(1));
            let ask = Ask {
                qty: needed.saturating_mul(substitute.units).max(1),
                prefer,
                allow_split: false,
                allow_partial: true,
            };
            let found = at(&substitute.sku, None);
            let mut best: (String, u32) = (String::new(), 0);
            for candidate in crate::placement::order(&ask, &found) {
                let available = u32::try_from(candidate.available.max(0)).unwrap_or(u32::MAX);
                let groups = needed.min(available / substitute.units.max(1));
                if groups > best.1 {
                    best = (candidate.location.clone(), groups);
                }
            }
            best
        })
        .collect();
    let caps: Vec<(u32, u32)> = substitutes
        .iter()
        .zip(&options)
        .map(|(substitute, (_, groups))| (*groups, substitute.replaces))
        .collect();
    let groups = crate::substitutes::exact_fill(rest, &caps)
        .unwrap_or_else(|| crate::substitutes::greedy_fill(rest, &caps));
    let mut filled = qty - rest;
    for ((substitute, (location, _)), groups) in substitutes.iter().zip(options).zip(groups) {
        if groups == 0 {
            continue;
        }
        let stands_for = groups * substitute.replaces;
        holds.push(Filled {
            sku: substitute.sku.clone(),
            location,
            qty: groups * substitute.units,
            substitute: true,
            stands_for,
        });
        filled += stands_for;
    }
    if filled < qty && !partial {
        holds.clear();
    }
    Fill { holds, filled }
}

impl PlannedHold {
    fn cell_ref(&self) -> CellRef {
        CellRef {
            partition: self.partition,
            id: self.cell.clone(),
        }
    }

    /// The cart record's line for this hold.
    fn stored(&self, backordered: u32) -> StoredLine {
        StoredLine {
            reservation_id: self.reservation_id.clone(),
            partition: self.partition,
            sku: self.sku.clone(),
            location: self.location.clone(),
            qty: self.qty,
            backordered,
            line: Some(self.line),
            substitute_for: self.substitute_for.clone(),
            stands_for: self.stands_for,
        }
    }
}

/// The holds planned for some of a request's lines, and for each line
/// without a location what the read could place of it (its `available`
/// should it be short).
#[derive(Debug, Default)]
pub(crate) struct Planned {
    pub(crate) holds: Vec<PlannedHold>,
    pub(crate) placeable: HashMap<u32, i64>,
}

impl Planned {
    /// The plan as the claim records it; `None` when it holds nothing.
    pub(crate) fn text(&self) -> Option<String> {
        if self.holds.is_empty() {
            None
        } else {
            serde_json::to_string(&self.holds).ok()
        }
    }
}

/// How one planned hold ended.
#[derive(Debug, Clone)]
enum Outcome {
    Held(StoredLine),
    /// Refused; the units its location had then.
    Refused(i64),
}

/// What the ids of planned holds derive from: the claim's digest and life,
/// the attempt, and the index of the first hold planned.
#[derive(Clone, Copy)]
struct Ids<'a> {
    lived: &'a str,
    attempt: u64,
    first_index: usize,
}

impl<'a> Ids<'a> {
    /// The ids of a whole plan of `attempt`.
    fn first(lived: &'a str, attempt: u64) -> Self {
        Self {
            lived,
            attempt,
            first_index: 0,
        }
    }
}

/// The id of hold `index` of `attempt`, in `partition`.
fn hold_id(lived: &str, attempt: u64, index: usize, partition: u32) -> String {
    keys::reservation_id(
        partition,
        derive_random(&format!("line|{lived}|{attempt}|{index}")),
    )
}

impl Allocator {
    /// Plans `wanted` (request line, units) as holds `first_index..` of
    /// `attempt`, from one read of the SKUs of the lines without a location.
    async fn plan_lines(
        &self,
        request: &CartRequest,
        route: &Route<'_>,
        wanted: &[(u32, u32)],
        ids: Ids<'_>,
        pins: &HashMap<u32, String>,
    ) -> Result<Planned> {
        let Ids {
            lived,
            attempt,
            first_index,
        } = ids;
        let mut planned = Planned::default();
        let line_of = |index: u32| &request.lines[index as usize];
        // The substitutes of the lines that allow them.
        let mut substituted: Vec<&str> = wanted
            .iter()
            .map(|(index, _)| line_of(*index))
            .filter(|line| line.substitutes)
            .map(|line| line.sku.as_str())
            .collect();
        substituted.sort_unstable();
        substituted.dedup();
        let definitions = self.substitutes_of(&request.merchant, &substituted).await?;
        // The SKUs to read, once each: every line placed from a read (one
        // without a location, or one that allows substitutes), and every
        // substitute of theirs.
        let mut skus: Vec<&str> = wanted
            .iter()
            .map(|(index, _)| line_of(*index))
            .filter(|line| line.location.is_none() || line.substitutes)
            .map(|line| line.sku.as_str())
            .chain(
                definitions
                    .values()
                    .flatten()
                    .map(|substitute| substitute.sku.as_str()),
            )
            .collect();
        skus.sort_unstable();
        skus.dedup();
        let mut candidates: HashMap<&str, Vec<Candidate>> = HashMap::new();
        if !skus.is_empty() {
            let overrides = self.location_settings(&request.merchant).await?;
            let settings = |location: &str| -> LocationSettings {
                overrides.get(location).copied().unwrap_or_else(|| {
                    route
                        .locations
                        .get(&(request.merchant.clone(), location.to_owned()))
                        .copied()
                        .unwrap_or_default()
                })
            };
            let reads = futures::future::try_join_all(
                skus.iter()
                    .map(|sku| self.candidates(&request.merchant, sku, &settings)),
            )
            .await?;
            candidates = skus.into_iter().zip(reads).collect();
            // A line without a location whose SKU (and every substitute it
            // may take) has no location at all is unknown, as a key is.
            let nowhere = |sku: &str| candidates.get(sku).is_none_or(Vec::is_empty);
            if wanted.iter().any(|(index, _)| {
                let line = line_of(*index);
                line.location.is_none()
                    && nowhere(&line.sku)
                    && (!line.substitutes
                        || definitions
                            .get(&line.sku)
                            .is_none_or(|list| list.iter().all(|other| nowhere(&other.sku))))
            }) {
                return Err(AllocatorError::NotFound);
            }
        }
        let mut push = |hold: Hold<'_>| {
            let key = StockKey::new(&request.merchant, hold.sku, hold.location);
            let cell = self.cell_for(&key, route.hot_of(&key));
            let index = first_index + planned.holds.len();
            planned.holds.push(PlannedHold {
                line: hold.line,
                sku: hold.sku.to_owned(),
                location: hold.location.to_owned(),
                qty: hold.qty,
                reservation_id: hold_id(lived, attempt, index, cell.partition),
                cell: cell.id,
                partition: cell.partition,
                refused: false,
                substitute_for: hold.substitute_for.map(str::to_owned),
                stands_for: hold.stands_for,
            });
        };
        // What a planned hold takes is not there for the next line.
        let take = |candidates: &mut HashMap<&str, Vec<Candidate>>,
                    sku: &str,
                    location: &str,
                    units: u32| {
            if let Some(found) = candidates.get_mut(sku) {
                for candidate in found.iter_mut().filter(|c| c.location == location) {
                    candidate.available -= i64::from(units);
                }
            }
        };
        // Lines that name their location hold there whatever the read says:
        // what they take is not there for the lines placed from the read.
        for &(index, qty) in wanted {
            let line = line_of(index);
            if let (Some(location), false) = (&line.location, line.substitutes) {
                take(&mut candidates, &line.sku, location, qty);
            }
        }
        for &(index, qty) in wanted {
            let line = line_of(index);
            if line.substitutes {
                let fill = fill_line(
                    line,
                    qty,
                    request.allow_partial,
                    pins.get(&index).map(String::as_str),
                    &candidates,
                    definitions.get(&line.sku).map_or(&[][..], Vec::as_slice),
                );
                planned.placeable.insert(index, i64::from(fill.filled));
                for hold in fill.holds {
                    take(&mut candidates, &hold.sku, &hold.location, hold.qty);
                    push(Hold {
                        line: index,
                        sku: &hold.sku,
                        location: &hold.location,
                        qty: hold.qty,
                        substitute_for: hold.substitute.then_some(line.sku.as_str()),
                        stands_for: hold.substitute.then_some(hold.stands_for),
                    });
                }
                continue;
            }
            if let Some(location) = &line.location {
                push(Hold::own(index, &line.sku, location, qty));
                continue;
            }
            let found = candidates.entry(line.sku.as_str()).or_default();
            let ask = Ask {
                qty,
                prefer: &line.prefer,
                allow_split: line.allow_split,
                allow_partial: request.allow_partial,
            };
            let plan = place(&ask, found);
            let placeable = place(
                &Ask {
                    allow_partial: true,
                    ..ask
                },
                found,
            )
            .held();
            planned.placeable.insert(index, i64::from(placeable));
            for (location, units) in plan.holds.into_iter().filter(|(_, units)| *units > 0) {
                take(&mut candidates, &line.sku, &location, units);
                push(Hold::own(index, &line.sku, &location, units));
            }
        }
        if first_index + planned.holds.len() > crate::limits::RESERVATION_HOLDS_MAX {
            return Err(AllocatorError::InvalidRequest(format!(
                "a reservation makes at most {} holds; split fewer lines",
                crate::limits::RESERVATION_HOLDS_MAX
            )));
        }
        Ok(planned)
    }

    /// Records `plan` as the holds of the claim's current attempt. False
    /// when another caller holds the claim now.
    async fn record_plan(&self, claim: &Claim, plan: &[PlannedHold]) -> Result<bool> {
        let text = serde_json::to_string(plan).map_err(protocol)?;
        let args = json!({
            "action": "plan", "digest": claim.digest, "token": claim.token,
            "attempt": claim.attempt, "plan": text,
        });
        let reply = self.call(Op::Claim, claim.partition, args).await?;
        match reply["status"].as_str() {
            Some("ok") => Ok(true),
            Some("lost") => Ok(false),
            _ => {
                check_refusal(&reply)?;
                Err(AllocatorError::Protocol(format!("claim plan: {reply}")))
            }
        }
    }

    /// Holds a request of several holds under its claim (see the module
    /// docs); `first` is the plan made before the claim, when this caller
    /// made it.
    pub(crate) async fn hold_planned(
        &self,
        claim: &mut Claim,
        request: &CartRequest,
        first: Option<Planned>,
        ttl_ms: u64,
        route: &Route<'_>,
    ) -> Result<CartHold> {
        let lived = crate::reserve::lived(&claim.digest, &claim.life);
        let cart_id =
            keys::reservation_id(claim.partition, derive_random(&format!("cart|{lived}")));
        if claim.taken_over {
            // An earlier holder of the claim may have made the cart and died
            // before storing the answer: that cart is the answer.
            let args = json!({ "reservation_id": cart_id });
            let reply = self.call(Op::GetReservation, claim.partition, args).await?;
            if reply["status"] != json!("not_found") {
                let cart = StoredCart::from_reply(reply)?;
                return Ok(CartHold {
                    cart: cart.view()?,
                    replayed: true,
                });
            }
            // The holds of an attempt abandoned by a caller that may have
            // died before releasing them: no cart can ever have them.
            if let Some(text) = &claim.abandoned {
                let abandoned: Vec<PlannedHold> = serde_json::from_str(text).map_err(protocol)?;
                let lines: Vec<StoredLine> = abandoned
                    .iter()
                    .filter(|planned| !planned.refused)
                    .map(|planned| planned.stored(0))
                    .collect();
                self.release_lines(&cart_id, lines.iter()).await;
            }
        }
        let mut placeable = HashMap::new();
        let mut plan: Vec<PlannedHold> = match (claim.taken_over, first, &claim.plan) {
            // This caller made the claim, with its plan.
            (false, Some(first), _) => {
                placeable = first.placeable;
                first.holds
            }
            (_, _, Some(text)) => serde_json::from_str(text).map_err(protocol)?,
            // Taken over from a caller that recorded no plan: it held
            // nothing of this attempt (a plan that placed nothing, or an
            // attempt abandoned before its next plan), or it ran before
            // plans were recorded (the claim is not marked planned), when
            // a cart's lines named their locations and held at their
            // pools: planned now so (pools then), and recorded first.
            (_, _, None) => {
                let pools = Route {
                    hot: Vec::new(),
                    coalescer: route.coalescer,
                    limits: route.limits,
                    locations: route.locations,
                };
                let planning = if claim.planned { route } else { &pools };
                let fresh = self
                    .plan_all(request, planning, &lived, claim.attempt)
                    .await?;
                placeable = fresh.placeable;
                if !fresh.holds.is_empty() && !self.record_plan(claim, &fresh.holds).await? {
                    return Err(AllocatorError::InProgress);
                }
                fresh.holds
            }
        };
        let grace_ms = self.hold_limits().cart_line_grace.as_millis() as u64;
        let customer_hash = request
            .customer_ref
            .as_deref()
            .map(|reference| self.customer_hash(reference));
        for _ in 0..ATTEMPTS_MAX {
            let mut outcomes: Vec<Outcome> = Vec::new();
            let mut again: Vec<StoredLine> = Vec::new();
            let mut void = false;
            let mut failure = None;
            let mut replans = 0;
            // Where this round of holds started in the plan.
            let mut round = 0;
            loop {
                // All or nothing, and a line the read could not place: no
                // hold is made only to be released.
                if outcomes.is_empty() && !request.allow_partial && !placed_whole(request, &plan) {
                    break;
                }
                while outcomes.len() < plan.len() && failure.is_none() && !void {
                    let planned = &plan[outcomes.len()];
                    if planned.refused {
                        // Refused when first run, and planned again since:
                        // never run again (it could hold now, on top of what
                        // was planned in its place).
                        outcomes.push(Outcome::Refused(0));
                        continue;
                    }
                    let key = StockKey::new(&request.merchant, &planned.sku, &planned.location);
                    let mut hold =
                        HoldRequest {
                            key: key.clone(),
                            qty: planned.qty,
                            ttl_ms,
                            grace_ms,
                            reservation_id: planned.reservation_id.clone(),
                            customer_hash: customer_hash.clone(),
                            cart_id: Some(cart_id.clone()),
                            // A caller whose lease lapsed makes no new hold: the
                            // one that took the claim over may have planned in
                            // its place.
                            hold_by_ms: Some(claim.lease_until_ms.saturating_sub(
                                crate::reserve::CLAIM_CLOCK_MARGIN.as_millis() as u64,
                            )),
                            allowance_partition: None,
                        };
                    let grant = match self.take_grant(route.limit(&key), &mut hold, claim).await {
                        Ok(grant) => grant,
                        Err(error) => {
                            failure = Some(error);
                            break;
                        }
                    };
                    let result = self.hold_one_cell(&planned.cell_ref(), &hold, route).await;
                    if let Some(grant) = &grant {
                        self.give_back_unless_paid(grant, &result).await;
                    }
                    match result {
                        Ok(line_hold) => {
                            let reservation = &line_hold.reservation;
                            if reservation.status != ReservationStatus::Held {
                                // This attempt ran before and one of its
                                // holds ended since: it cannot be the cart.
                                void = true;
                            } else {
                                let line = planned.stored(reservation.backordered);
                                if line_hold.replayed {
                                    again.push(line.clone());
                                }
                                outcomes.push(Outcome::Held(line));
                            }
                        }
                        Err(AllocatorError::InsufficientStock { lines }) => outcomes.push(
                            Outcome::Refused(lines.first().map_or(0, |line| line.available)),
                        ),
                        Err(error) => failure = Some(error),
                    }
                }
                if failure.is_some() || void || replans >= REPLANS_MAX {
                    break;
                }
                let wanted = Self::replan_wanted(request, &plan, &outcomes, round);
                if wanted.is_empty() {
                    break;
                }
                let pins = own_locations(request, &outcomes);
                let extra = match self
                    .plan_lines(
                        request,
                        route,
                        &wanted,
                        Ids {
                            lived: &lived,
                            attempt: claim.attempt,
                            first_index: plan.len(),
                        },
                        &pins,
                    )
                    .await
                {
                    Ok(extra) => extra,
                    // Past the holds one reservation may make: the lines
                    // still missing units are short.
                    Err(AllocatorError::InvalidRequest(_)) => break,
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                };
                // What a line could have: what it holds, and what the
                // fresh read could place of the rest.
                let held = held_by_line(&outcomes);
                for (line, more) in extra.placeable {
                    let got = held.get(&line).copied().unwrap_or(0);
                    placeable.insert(line, i64::from(got) + more);
                }
                if extra.holds.is_empty() {
                    break;
                }
                // The refused holds are marked so in the plan it grows into,
                // recorded before any of the new holds.
                let mut grown = plan.clone();
                for (planned, outcome) in grown.iter_mut().zip(&outcomes) {
                    if matches!(outcome, Outcome::Refused(_)) {
                        planned.refused = true;
                    }
                }
                grown.extend(extra.holds);
                if !self.record_plan(claim, &grown).await? {
                    // Another caller holds the claim now: its answer counts.
                    return Err(AllocatorError::InProgress);
                }
                plan = grown;
                round = outcomes.len();
                replans += 1;
            }
            let held = held_by_line(&outcomes);
            let missing: Vec<u32> = (0..request.lines.len() as u32)
                .filter(|line| {
                    held.get(line).copied().unwrap_or(0) < request.lines[*line as usize].qty
                })
                .collect();
            let acceptable = missing.is_empty() || (request.allow_partial && !held.is_empty());
            if failure.is_none() && !void && acceptable {
                // Lines held by an earlier run of this attempt must outlive
                // the cart about to be made (its expiry is from now).
                for line in &again {
                    let args = json!({
                        "reservation_id": line.reservation_id, "cart_flow": true,
                        "ttl_ms": ttl_ms, "grace_ms": grace_ms,
                    });
                    match crate::decode_reservation(
                        self.call(Op::Extend, line.partition, args).await?,
                    ) {
                        Ok(_) => {}
                        Err(AllocatorError::NotHeld { .. }) => void = true,
                        Err(error) => failure = Some(error),
                    }
                }
            }
            if failure.is_none() && !void && acceptable {
                let lines: Vec<&StoredLine> = outcomes
                    .iter()
                    .filter_map(|outcome| match outcome {
                        Outcome::Held(line) => Some(line),
                        Outcome::Refused(_) => None,
                    })
                    .collect();
                let unfilled: Vec<Unfilled> = missing
                    .iter()
                    .map(|&line| Unfilled {
                        line,
                        sku: request.lines[line as usize].sku.clone(),
                        requested: request.lines[line as usize].qty,
                        held: held.get(&line).copied().unwrap_or(0),
                    })
                    .collect();
                let mut args = json!({
                    "action": "create", "reservation_id": cart_id, "merchant": request.merchant,
                    "ttl_ms": ttl_ms, "lines": serde_json::to_value(&lines).map_err(protocol)?,
                    "customer_hash": customer_hash,
                    "digest": claim.digest, "token": claim.token, "attempt": claim.attempt,
                });
                if request.allow_partial {
                    args["partial"] = json!(true);
                    args["unfilled"] = serde_json::to_value(&unfilled).map_err(protocol)?;
                }
                let reply = self.call(Op::Cart, claim.partition, args).await?;
                if reply["status"] == json!("lost") {
                    // Another caller holds the claim now: its answer counts.
                    return Err(AllocatorError::InProgress);
                }
                check_refusal(&reply)?;
                let replayed = reply["replayed"] == json!(true);
                let cart = StoredCart::from_reply(reply)?;
                return Ok(CartHold {
                    cart: cart.view()?,
                    replayed,
                });
            }
            // Abandon this attempt before touching its holds: only the
            // caller still holding the claim may release them (a caller
            // that took the claim over may be making the cart from them
            // right now). Every hold of its plan is released, tried here or
            // not (an earlier run of the attempt may have made it).
            if !self.advance_claim(claim).await? {
                return Err(AllocatorError::InProgress);
            }
            let planned: Vec<StoredLine> = plan
                .iter()
                .filter(|planned| !planned.refused)
                .map(|planned| planned.stored(0))
                .collect();
            self.release_lines(&cart_id, planned.iter()).await;
            if let Some(error) = failure {
                return Err(error);
            }
            if !void {
                return Err(AllocatorError::InsufficientStock {
                    lines: short_lines(request, &plan, &outcomes, &held, &placeable),
                });
            }
            // A void attempt is followed by another, planned now that its
            // holds are back, and recorded before any of its own.
            let next = self.plan_all(request, route, &lived, claim.attempt).await?;
            if !next.holds.is_empty() && !self.record_plan(claim, &next.holds).await? {
                return Err(AllocatorError::InProgress);
            }
            placeable = next.placeable;
            plan = next.holds;
        }
        Err(AllocatorError::StoreUnavailable(
            "the reservation's holds kept ending before it could be made; try again".to_owned(),
        ))
    }

    /// A plan of every line of `request` for `attempt` (the first, made
    /// before the request's claim, is attempt 0's).
    pub(crate) async fn plan_all(
        &self,
        request: &CartRequest,
        route: &Route<'_>,
        lived: &str,
        attempt: u64,
    ) -> Result<Planned> {
        let wanted: Vec<(u32, u32)> = request
            .lines
            .iter()
            .enumerate()
            .map(|(index, line)| (index as u32, line.qty))
            .collect();
        self.plan_lines(
            request,
            route,
            &wanted,
            Ids::first(lived, attempt),
            &HashMap::new(),
        )
        .await
    }

    /// The units to plan again after a round of holds: for each line still
    /// missing units whose last hold was refused, what may be asked of a
    /// fresh read (see the module docs).
    fn replan_wanted(
        request: &CartRequest,
        plan: &[PlannedHold],
        outcomes: &[Outcome],
        round: usize,
    ) -> Vec<(u32, u32)> {
        let held = held_by_line(outcomes);
        let mut wanted = Vec::new();
        for (index, line) in request.lines.iter().enumerate() {
            let index = index as u32;
            let got = held.get(&index).copied().unwrap_or(0);
            let missing = line.qty.saturating_sub(got);
            // Only a line a hold of which was refused this round is planned
            // again: one the read could not place stays short.
            let refused = plan
                .iter()
                .zip(outcomes)
                .skip(round)
                .filter(|(planned, _)| planned.line == index)
                .filter_map(|(_, outcome)| match outcome {
                    Outcome::Refused(available) => Some(*available),
                    Outcome::Held(_) => None,
                })
                .next_back();
            let Some(available) = refused else {
                continue;
            };
            if missing == 0 {
                continue;
            }
            let ask = match &line.location {
                // A line that allows substitutes is filled again, from its
                // own SKU and its substitutes.
                _ if line.substitutes => missing,
                // A named line takes what its location had, only when
                // partial; else it is short.
                Some(_) if request.allow_partial && available > 0 => {
                    (available.min(i64::from(missing))) as u32
                }
                Some(_) => continue,
                None if line.allow_split => missing,
                // A line that is not split stays where it got units.
                None if got == 0 => line.qty,
                None => continue,
            };
            wanted.push((index, ask));
        }
        wanted
    }
}

/// Where each line that is not split and allows substitutes holds its own
/// SKU so far: a replan of it places its own SKU there only.
fn own_locations(request: &CartRequest, outcomes: &[Outcome]) -> HashMap<u32, String> {
    let mut pins = HashMap::new();
    for outcome in outcomes {
        if let Outcome::Held(line) = outcome
            && line.substitute_for.is_none()
            && let Some(index) = line.line
        {
            let asked = &request.lines[index as usize];
            if asked.substitutes && !asked.allow_split {
                pins.insert(index, line.location.clone());
            }
        }
    }
    pins
}

/// Whether `plan` places every unit of every line placed from a read (one
/// without a location, or one that allows substitutes).
fn placed_whole(request: &CartRequest, plan: &[PlannedHold]) -> bool {
    request.lines.iter().enumerate().all(|(index, line)| {
        (line.location.is_some() && !line.substitutes)
            || plan
                .iter()
                .filter(|planned| planned.line == index as u32)
                .map(|planned| planned.stands_for.unwrap_or(planned.qty))
                .sum::<u32>()
                >= line.qty
    })
}

/// Units held so far, by request line.
fn held_by_line(outcomes: &[Outcome]) -> HashMap<u32, u32> {
    let mut held: HashMap<u32, u32> = HashMap::new();
    for outcome in outcomes {
        if let Outcome::Held(line) = outcome {
            *held.entry(line.line.unwrap_or_default()).or_default() +=
                line.stands_for.unwrap_or(line.qty);
        }
    }
    held
}

/// The request's lines that are short, as the 409 lists them: a named
/// line whose hold was refused, with what its location had then; a line
/// without a location, with what the allocator could place of it.
fn short_lines(
    request: &CartRequest,
    plan: &[PlannedHold],
    outcomes: &[Outcome],
    held: &HashMap<u32, u32>,
    placeable: &HashMap<u32, i64>,
) -> Vec<ShortLine> {
    request
        .lines
        .iter()
        .enumerate()
        .filter(|(index, line)| held.get(&(*index as u32)).copied().unwrap_or(0) < line.qty)
        .filter_map(|(index, line)| {
            let index = index as u32;
            let refused = plan
                .iter()
                .zip(outcomes)
                .rev()
                .find(|(planned, _)| planned.line == index)
                .and_then(|(_, outcome)| match outcome {
                    Outcome::Refused(available) => Some(*available),
                    Outcome::Held(_) => None,
                });
            let available = match (&line.location, refused) {
                // A named line not tried (another line was short first)
                // is not known to be short.
                (Some(_), refused) if !line.substitutes => refused?,
                (_, refused) => {
                    let could = placeable.get(&index).copied().unwrap_or(0);
                    // Nor is a line the read could place whole, not tried.
                    if refused.is_none() && could >= i64::from(line.qty) {
                        return None;
                    }
                    could
                }
            };
            Some(ShortLine {
                sku: line.sku.clone(),
                location: line.location.clone(),
                line: Some(index),
                requested: line.qty,
                available: available.max(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::substitutes::Substitute;

    fn at(location: &str, available: i64, priority: i64) -> Candidate {
        Candidate {
            location: location.to_owned(),
            available,
            priority,
            ship_from: true,
        }
    }

    fn substitute(sku: &str, units: u32, replaces: u32) -> Substitute {
        Substitute {
            sku: sku.to_owned(),
            units,
            replaces,
        }
    }

    fn shown(fill: &Fill) -> Vec<(String, String, u32, bool, u32)> {
        fill.holds
            .iter()
            .map(|hold| {
                (
                    hold.sku.clone(),
                    hold.location.clone(),
                    hold.qty,
                    hold.substitute,
                    hold.stands_for,
                )
            })
            .collect()
    }

    fn line(sku: &str) -> crate::CartLine {
        crate::CartLine {
            substitutes: true,
            ..crate::CartLine::anywhere(sku, 1)
        }
    }

    /// A substitute is held where it gives the most whole groups, not
    /// where the rules would put its raw units (a location with stock but
    /// less than one group gives none).
    #[test]
    fn a_substitute_goes_where_it_gives_whole_groups() {
        let candidates: HashMap<&str, Vec<Candidate>> = HashMap::from([
            ("own", vec![]),
            ("single", vec![at("dc2", 5, 10), at("dc1", 6, 0)]),
            ("half", vec![at("dc1", 1, 0)]),
        ]);
        let fill = fill_line(
            &line("own"),
            2,
            false,
            None,
            &candidates,
            &[substitute("single", 6, 1), substitute("half", 1, 1)],
        );
        assert_eq!(
            shown(&fill),
            vec![
                ("single".to_owned(), "dc1".to_owned(), 6, true, 1),
                ("half".to_owned(), "dc1".to_owned(), 1, true, 1),
            ]
        );
        assert_eq!(fill.filled, 2);
    }

    /// An exact fill that taking the most of the first substitute would
    /// miss is found; none at all leaves the line short (nothing held
    /// unless partial).
    #[test]
    fn the_fill_is_exact_or_nothing() {
        let candidates: HashMap<&str, Vec<Candidate>> = HashMap::from([
            ("own", vec![]),
            ("pair", vec![at("dc1", 5, 0)]),
            ("triple", vec![at("dc1", 5, 0)]),
        ]);
        let subs = [substitute("pair", 1, 2), substitute("triple", 1, 3)];
        let fill = fill_line(&line("own"), 3, false, None, &candidates, &subs);
        assert_eq!(
            shown(&fill),
            vec![("triple".to_owned(), "dc1".to_owned(), 1, true, 3)]
        );
        let only_pairs = [substitute("pair", 1, 2)];
        let fill = fill_line(&line("own"), 3, false, None, &candidates, &only_pairs);
        assert!(fill.holds.is_empty());
        assert_eq!(fill.filled, 2, "what could be made up is reported");
        let fill = fill_line(&line("own"), 3, true, None, &candidates, &only_pairs);
        assert_eq!(
            shown(&fill),
            vec![("pair".to_owned(), "dc1".to_owned(), 1, true, 2)]
        );
    }

    /// A line that is not split and already holds its own SKU somewhere
    /// takes no more of it elsewhere on a replan.
    #[test]
    fn a_pinned_line_takes_its_own_sku_only_where_it_holds() {
        let candidates: HashMap<&str, Vec<Candidate>> = HashMap::from([
            ("own", vec![at("dc1", 0, 0), at("dc2", 10, 0)]),
            ("pair", vec![at("dc1", 5, 0)]),
        ]);
        let fill = fill_line(
            &line("own"),
            4,
            false,
            Some("dc1"),
            &candidates,
            &[substitute("pair", 1, 2)],
        );
        assert_eq!(
            shown(&fill),
            vec![("pair".to_owned(), "dc1".to_owned(), 2, true, 4)]
        );
    }

    /// A substitute hold never asks more than one hold may.
    #[test]
    fn a_substitute_hold_stays_within_the_units_one_hold_may_ask() {
        let candidates: HashMap<&str, Vec<Candidate>> = HashMap::from([
            ("own", vec![]),
            ("crate", vec![at("dc1", 2_000_000_000, 0)]),
        ]);
        let fill = fill_line(
            &crate::CartLine {
                substitutes: true,
                ..crate::CartLine::anywhere("own", 1_000_000)
            },
            1_000_000,
            true,
            None,
            &candidates,
            &[substitute("crate", 1000, 1)],
        );
        assert!(
            fill.holds
                .iter()
                .all(|hold| hold.qty <= crate::limits::QTY_MAX),
            "{:?}",
            shown(&fill)
        );
    }
}
