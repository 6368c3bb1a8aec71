//! Where a reservation line that names no location is held: the choice
//! rules of shared/API.md ("Allocation"), as a pure function of one read
//! of the SKU's locations.
//!
//! Owns the order in which a line's candidate locations are tried and how
//! many units each is asked for. It decides nothing about stock: the holds
//! it plans are made by the hold scripts, one atomic call per cell, which
//! refuse what is no longer there; a refused plan is planned again from a
//! fresh read. So two checkouts racing for the last units across locations
//! can both plan them, and only the scripts' answers count.
//!
//! **The rules**, first non-tie wins, as one ordering of the candidates:
//! 1. the line's `prefer` order (a location it names comes before one it
//!    does not, an earlier one before a later one);
//! 2. a location that can hold the whole line (fewest splits);
//! 3. the merchant's location `priority`, higher first (config
//!    `locations[].priority`, 0 by default);
//! 4. most available;
//! 5. location id.
//!
//! A location whose `ship_from` is false is a candidate only when the line
//! names it in `prefer`. A location with nothing available is never asked.
//!
//! **How much each is asked for.** Without `allow_split` a line is held
//! whole at the first location in that order that can hold it whole; with
//! it, the line takes what each location has, in that order, until it is
//! whole (rule 2 puts a location that can hold it all first, so a line that
//! fits anywhere is not split). What no location can give is the line's
//! shortfall: without `allow_partial` the request is refused; with it, a
//! line that is not split holds what its first location by the rules has.
//!
//! **Choices.** Lines are placed on units available now (`available` of
//! the availability API): a location-less line is never put on backorder,
//! since a backorder at one location while another has the units on its
//! shelf is not what a checkout asking "wherever" means; a line that
//! should backorder names its location. Priority is "higher first" so a
//! merchant raises the locations it wants to ship from.

use std::cmp::Ordering;
use std::collections::HashMap;

use fred::prelude::*;
use serde::{Deserialize, Serialize};

use crate::keys;

/// How a merchant ranks one of its locations for lines that name none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationSettings {
    /// Higher is tried first (rule 3).
    pub priority: i64,
    /// Whether the location may be chosen when a line does not name it.
    pub ship_from: bool,
}

impl Default for LocationSettings {
    /// Priority 0, may ship.
    fn default() -> Self {
        Self {
            priority: 0,
            ship_from: true,
        }
    }
}

/// The settings of every location the config names, by `(merchant,
/// location)`: the defaults that the admin API's settings override.
pub type LocationDefaults = HashMap<(String, String), LocationSettings>;

/// Largest priority the API accepts (either sign): the config's bound.
pub const PRIORITY_MAX: i64 = config::LOCATION_PRIORITY_MAX;

/// The config's `locations[]` settings.
pub fn location_defaults(config: &config::Config) -> LocationDefaults {
    config
        .locations
        .iter()
        .map(|location| {
            (
                (location.merchant.clone(), location.location.clone()),
                LocationSettings {
                    priority: location.priority,
                    ship_from: location.ship_from,
                },
            )
        })
        .collect()
}

/// One location a line may be held at, as one read of the SKU saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The location id.
    pub location: String,
    /// Units available now (the availability API's `available`; below 0
    /// counts as 0).
    pub available: i64,
    /// The merchant's priority for the location (higher first).
    pub priority: i64,
    /// Whether the location may be chosen when the line does not name it.
    pub ship_from: bool,
}

/// What a line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask<'a> {
    /// Units wanted.
    pub qty: u32,
    /// Locations in the buyer's order of preference.
    pub prefer: &'a [String],
    /// Whether the line may be held across several locations.
    pub allow_split: bool,
    /// Whether the request takes less than it asked (`allow_partial`).
    pub allow_partial: bool,
}

/// Where a line is to be held.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// `(location, units)` in the order they are held.
    pub holds: Vec<(String, u32)>,
    /// Units of the line no location can give.
    pub short: u32,
}

impl Plan {
    /// Units the plan holds.
    pub fn held(&self) -> u32 {
        self.holds.iter().map(|(_, qty)| qty).sum()
    }
}

/// `candidates` in the order the rules try them for `ask`, without those
/// that may not be chosen (`ship_from` false and not preferred) or have
/// nothing available.
pub fn order<'c>(ask: &Ask<'_>, candidates: &'c [Candidate]) -> Vec<&'c Candidate> {
    let rank = |candidate: &Candidate| {
        ask.prefer
            .iter()
            .position(|preferred| *preferred == candidate.location)
    };
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|candidate| candidate.available > 0)
        .filter(|candidate| candidate.ship_from || rank(candidate).is_some())
        .collect();
    let whole = |candidate: &Candidate| candidate.available >= i64::from(ask.qty);
    eligible.sort_by(|a, b| {
        // Named before unnamed, then in the named order.
        let preference = match (rank(a), rank(b)) {
            (Some(a), Some(b)) => a.cmp(&b),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        preference
            .then_with(|| whole(b).cmp(&whole(a)))
            .then_with(|| b.priority.cmp(&a.priority))
            .then_with(|| b.available.cmp(&a.available))
            .then_with(|| a.location.cmp(&b.location))
    });
    eligible
}

/// Plans where `ask` is held among `candidates` (one read of the SKU's
/// locations).
pub fn place(ask: &Ask<'_>, candidates: &[Candidate]) -> Plan {
    let ordered = order(ask, candidates);
    let wanted = i64::from(ask.qty);
    if !ask.allow_split {
        if let Some(whole) = ordered
            .iter()
            .find(|candidate| candidate.available >= wanted)
        {
            return Plan {
                holds: vec![(whole.location.clone(), ask.qty)],
                short: 0,
            };
        }
        return match ordered.first() {
            Some(best) if ask.allow_partial => {
                let held = best.available.clamp(0, wanted) as u32;
                Plan {
                    holds: vec![(best.location.clone(), held)],
                    short: ask.qty - held,
                }
            }
            _ => Plan {
                holds: Vec::new(),
                short: ask.qty,
            },
        };
    }
    let mut plan = Plan::default();
    let mut left = wanted;
    for candidate in ordered {
        if left == 0 {
            break;
        }
        let take = candidate.available.min(left);
        plan.holds.push((candidate.location.clone(), take as u32));
        left -= take;
    }
    plan.short = left as u32;
    if plan.short > 0 && !ask.allow_partial {
        // All or nothing: a split line that cannot be whole holds nothing.
        plan.holds.clear();
        plan.short = ask.qty;
    }
    plan
}

impl crate::Allocator {
    /// The location settings set for `merchant` through the admin API
    /// ([`crate::Allocator::set_location_settings`]), by location.
    pub async fn location_settings(
        &self,
        merchant: &str,
    ) -> crate::Result<HashMap<String, LocationSettings>> {
        let key = keys::location_settings_key(merchant);
        let client = self.store.for_key(&key)?;
        let stored: HashMap<String, String> = self.with_timeout(client.hgetall(key)).await?;
        Ok(stored
            .into_iter()
            .filter_map(|(location, text)| match serde_json::from_str(&text) {
                Ok(settings) => Some((location, settings)),
                Err(error) => {
                    tracing::warn!(merchant, location, %error, "unreadable location settings; the config's apply");
                    None
                }
            })
            .collect())
    }

    /// Sets `merchant`'s settings for `location` (they override the
    /// config's), for every node's next placement.
    pub async fn set_location_settings(
        &self,
        merchant: &str,
        location: &str,
        settings: LocationSettings,
    ) -> crate::Result<()> {
        if !(-PRIORITY_MAX..=PRIORITY_MAX).contains(&settings.priority) {
            return Err(crate::AllocatorError::InvalidRequest(format!(
                "priority must be between -{PRIORITY_MAX} and {PRIORITY_MAX}"
            )));
        }
        let key = keys::location_settings_key(merchant);
        let client = self.store.for_key(&key)?;
        let text = serde_json::to_string(&settings).map_err(crate::protocol)?;
        let _: i64 = self
            .with_timeout(client.hset(key, (location.to_owned(), text)))
            .await?;
        Ok(())
    }

    /// The locations `sku` of `merchant` may be held at, as one read sees
    /// them (every location's cells in pipelined round trips,
    /// [`crate::Allocator::sku_views`]): each with its available units
    /// ([`crate::StockView::sellable`], the availability API's figure) and
    /// the merchant's `settings` for it.
    pub async fn candidates(
        &self,
        merchant: &str,
        sku: &str,
        settings: &(dyn Fn(&str) -> LocationSettings + Sync),
    ) -> crate::Result<Vec<Candidate>> {
        Ok(self
            .sku_views(merchant, sku)
            .await?
            .into_iter()
            .map(|(location, view)| {
                let LocationSettings {
                    priority,
                    ship_from,
                } = settings(&location);
                Candidate {
                    available: view.sellable().max(0),
                    location,
                    priority,
                    ship_from,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(location: &str, available: i64, priority: i64, ship_from: bool) -> Candidate {
        Candidate {
            location: location.to_owned(),
            available,
            priority,
            ship_from,
        }
    }

    fn ask<'a>(qty: u32, prefer: &'a [String]) -> Ask<'a> {
        Ask {
            qty,
            prefer,
            allow_split: false,
            allow_partial: false,
        }
    }

    fn names(prefer: &[&str]) -> Vec<String> {
        prefer.iter().map(|name| (*name).to_owned()).collect()
    }

    fn first(ask: &Ask<'_>, candidates: &[Candidate]) -> Option<String> {
        order(ask, candidates)
            .first()
            .map(|candidate| candidate.location.clone())
    }

    /// Each row is a tie of every rule before the one it tests, which
    /// decides it; the same candidates without that rule's difference fall
    /// to the next rule.
    #[test]
    fn each_rule_decides_only_a_tie_of_the_rules_before_it() {
        let none = names(&[]);
        let prefer_b = names(&["b"]);
        let prefer_b_a = names(&["b", "a"]);
        let prefer_a = names(&["a"]);
        let rows: Vec<(&str, Ask<'_>, Vec<Candidate>, &str)> = vec![
            (
                "1. prefer, over whole, priority, available, id",
                ask(5, &prefer_b),
                vec![at("a", 50, 9, true), at("b", 2, 0, true)],
                "b",
            ),
            (
                "1. prefer order among named",
                ask(1, &prefer_b_a),
                vec![at("a", 50, 9, true), at("b", 1, 0, true)],
                "b",
            ),
            (
                "2. whole line, over priority, available, id",
                ask(5, &none),
                vec![at("a", 4, 9, true), at("b", 5, 0, true)],
                "b",
            ),
            (
                "3. priority, over available and id",
                ask(5, &none),
                vec![at("a", 50, 1, true), at("b", 5, 2, true)],
                "b",
            ),
            (
                "4. most available, over id",
                ask(5, &none),
                vec![at("a", 6, 1, true), at("b", 7, 1, true)],
                "b",
            ),
            (
                "5. location id",
                ask(5, &none),
                vec![at("b", 7, 1, true), at("a", 7, 1, true)],
                "a",
            ),
            (
                "ship_from false: never unless named",
                ask(5, &none),
                vec![at("a", 50, 9, false), at("b", 5, 0, true)],
                "b",
            ),
            (
                "ship_from false, named: first",
                ask(5, &prefer_a),
                vec![at("a", 50, 0, false), at("b", 50, 9, true)],
                "a",
            ),
            (
                "nothing available: never",
                ask(5, &prefer_a),
                vec![at("a", 0, 9, true), at("b", 5, 0, true)],
                "b",
            ),
        ];
        for (rule, ask, candidates, expected) in rows {
            assert_eq!(
                first(&ask, &candidates).as_deref(),
                Some(expected),
                "{rule}"
            );
        }
    }

    #[test]
    fn a_line_that_does_not_split_is_held_whole_at_its_first_location_that_can() {
        let prefer = names(&["store-12"]);
        let candidates = [at("store-12", 3, 0, true), at("dc1", 40, 0, true)];
        // store-12 is preferred but cannot hold 5: dc1 holds them.
        assert_eq!(
            place(&ask(5, &prefer), &candidates),
            Plan {
                holds: vec![("dc1".to_owned(), 5)],
                short: 0
            }
        );
        // Nowhere whole: nothing held, the whole line short.
        assert_eq!(
            place(&ask(50, &prefer), &candidates),
            Plan {
                holds: vec![],
                short: 50
            }
        );
        // Partial: what the first location by the rules has.
        let partial = Ask {
            allow_partial: true,
            ..ask(50, &prefer)
        };
        assert_eq!(
            place(&partial, &candidates),
            Plan {
                holds: vec![("store-12".to_owned(), 3)],
                short: 47
            }
        );
    }

    #[test]
    fn a_split_line_fills_in_rule_order_and_is_all_or_nothing_unless_partial() {
        let none = names(&[]);
        let candidates = [
            at("a", 3, 0, true),
            at("b", 4, 5, true),
            at("c", 2, 0, true),
            at("shop", 9, 9, false),
        ];
        let split = Ask {
            allow_split: true,
            ..ask(8, &none)
        };
        assert_eq!(
            place(&split, &candidates),
            Plan {
                holds: vec![
                    ("b".to_owned(), 4),
                    ("a".to_owned(), 3),
                    ("c".to_owned(), 1)
                ],
                short: 0
            }
        );
        // A location that can hold it all is taken alone: no split.
        let fits = Ask {
            allow_split: true,
            ..ask(4, &none)
        };
        assert_eq!(place(&fits, &candidates).holds, vec![("b".to_owned(), 4)]);
        // More than all of them: nothing, or all of them when partial.
        let too_many = Ask {
            allow_split: true,
            ..ask(20, &none)
        };
        assert_eq!(
            place(&too_many, &candidates),
            Plan {
                holds: vec![],
                short: 20
            }
        );
        let partial = Ask {
            allow_partial: true,
            ..too_many
        };
        let plan = place(&partial, &candidates);
        assert_eq!((plan.held(), plan.short), (9, 11));
    }

    #[test]
    fn no_candidate_holds_nothing() {
        let none = names(&[]);
        let partial = Ask {
            allow_partial: true,
            allow_split: true,
            ..ask(3, &none)
        };
        assert_eq!(
            place(&partial, &[]),
            Plan {
                holds: vec![],
                short: 3
            }
        );
    }
}
