//! Substitutes: which SKUs may stand in for a short one (API.md "Bundles
//! and substitutes"), and how a short line is filled with them.
//!
//! Owns the definitions (one Redis hash per merchant,
//! [`keys::substitutes_key`]: SKU → its substitutes in order of
//! preference) and the fill rule, a pure function of what a read placed.
//! Where each hold lands is [`crate::placement`]'s; holding is
//! `crate::allocate`'s.
//!
//! **The fill.** A line that allows substitutes holds what it can of its
//! own SKU (by the placement rules, as a partial line would), and fills the
//! rest with whole *groups* of its substitutes: a group is `units` of the
//! substitute standing in for `replaces` units of the original. Each
//! substitute is held at one location (its groups are never split): by the
//! placement rules, the first that gives the most groups the rest needs.
//! The fill must be exact: among the exact ones, the one that takes the
//! most groups of the earliest substitute, then of the next (the
//! merchant's order), found by a search bounded at [`FILL_SEARCH_MAX`]
//! choices. If no exact fill is found the line is short, as without
//! substitutes, and holds no substitute; a partial reservation keeps its
//! own units and as many groups as fit, in order.

use std::collections::HashMap;

use fred::prelude::*;
use serde::{Deserialize, Serialize};

use crate::keys;

/// Most substitutes one SKU may have.
pub const SUBSTITUTES_MAX: usize = 10;

/// Largest `units` or `replaces` of a substitute.
pub const GROUP_UNITS_MAX: u32 = 1000;

/// One SKU that may stand in for another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Substitute {
    /// The substitute SKU.
    pub sku: String,
    /// Units of it in one group.
    pub units: u32,
    /// Units of the original one group stands in for.
    pub replaces: u32,
}

/// Most choices [`exact_fill`] tries before it gives up.
pub const FILL_SEARCH_MAX: usize = 10_000;

/// Groups of each substitute that make up `rest` exactly, given each one's
/// `(most groups it can give, units of the original one group stands
/// for)`, in the merchant's order: the fill that takes the most of the
/// earliest substitutes (then of the next, ...) among exact ones, found by
/// trying counts from the most down; `None` when none is exact (or none
/// was found in [`FILL_SEARCH_MAX`] tries).
pub fn exact_fill(rest: u32, options: &[(u32, u32)]) -> Option<Vec<u32>> {
    fn search(
        rest: u32,
        options: &[(u32, u32)],
        chosen: &mut Vec<u32>,
        budget: &mut usize,
    ) -> bool {
        let Some(((most, replaces), later)) = options.split_first() else {
            return rest == 0;
        };
        let most = if *replaces == 0 {
            0
        } else {
            (*most).min(rest / replaces)
        };
        for groups in (0..=most).rev() {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            chosen.push(groups);
            if search(rest - groups * replaces, later, chosen, budget) {
                return true;
            }
            chosen.pop();
        }
        false
    }
    let mut chosen = Vec::with_capacity(options.len());
    let mut budget = FILL_SEARCH_MAX;
    search(rest, options, &mut chosen, &mut budget).then_some(chosen)
}

/// The fill that takes as many groups as fit of each substitute in order
/// (what a partial line keeps when no fill is exact).
pub fn greedy_fill(rest: u32, options: &[(u32, u32)]) -> Vec<u32> {
    let mut rest = rest;
    options
        .iter()
        .map(|(most, replaces)| {
            let groups = if *replaces == 0 {
                0
            } else {
                (*most).min(rest / replaces)
            };
            rest -= groups * replaces;
            groups
        })
        .collect()
}

impl crate::Allocator {
    /// Sets `sku`'s substitutes for `merchant` (in order of preference);
    /// checked first (1 to [`SUBSTITUTES_MAX`], each another SKU, once,
    /// groups of 1 to [`GROUP_UNITS_MAX`]).
    pub async fn set_substitutes(
        &self,
        merchant: &str,
        sku: &str,
        substitutes: &[Substitute],
    ) -> crate::Result<()> {
        let invalid = |reason: String| Err(crate::AllocatorError::InvalidRequest(reason));
        if substitutes.is_empty() || substitutes.len() > SUBSTITUTES_MAX {
            return invalid(format!("a sku has 1 to {SUBSTITUTES_MAX} substitutes"));
        }
        let mut seen = std::collections::HashSet::new();
        for substitute in substitutes {
            if substitute.sku == sku {
                return invalid(format!("{sku} cannot substitute for itself"));
            }
            if !seen.insert(&substitute.sku) {
                return invalid(format!("{} is listed twice", substitute.sku));
            }
            for (name, value) in [
                ("units", substitute.units),
                ("replaces", substitute.replaces),
            ] {
                if !(1..=GROUP_UNITS_MAX).contains(&value) {
                    return invalid(format!(
                        "{name} of {} must be between 1 and {GROUP_UNITS_MAX}",
                        substitute.sku
                    ));
                }
            }
        }
        let key = keys::substitutes_key(merchant);
        let client = self.store.for_key(&key)?;
        let text = serde_json::to_string(substitutes).map_err(crate::protocol)?;
        let _: i64 = self
            .with_timeout(client.hset(key, (sku.to_owned(), text)))
            .await?;
        Ok(())
    }

    /// `sku`'s substitutes for `merchant`, in order (`None`: none set).
    pub async fn substitutes(
        &self,
        merchant: &str,
        sku: &str,
    ) -> crate::Result<Option<Vec<Substitute>>> {
        Ok(self.substitutes_of(merchant, &[sku]).await?.remove(sku))
    }

    /// The substitutes of each of `skus` that has any.
    pub(crate) async fn substitutes_of(
        &self,
        merchant: &str,
        skus: &[&str],
    ) -> crate::Result<HashMap<String, Vec<Substitute>>> {
        if skus.is_empty() {
            return Ok(HashMap::new());
        }
        let key = keys::substitutes_key(merchant);
        let client = self.store.for_key(&key)?;
        let fields: Vec<String> = skus.iter().map(|sku| (*sku).to_owned()).collect();
        let found: Vec<Option<String>> = self.with_timeout(client.hmget(key, fields)).await?;
        let mut substitutes = HashMap::new();
        for (sku, text) in skus.iter().zip(found) {
            let Some(text) = text else { continue };
            match serde_json::from_str(&text) {
                Ok(list) => {
                    substitutes.insert((*sku).to_owned(), list);
                }
                Err(error) => {
                    tracing::warn!(merchant, sku, %error, "unreadable substitutes; none apply");
                }
            }
        }
        Ok(substitutes)
    }

    /// Removes `sku`'s substitutes; whether there were any.
    pub async fn delete_substitutes(&self, merchant: &str, sku: &str) -> crate::Result<bool> {
        let key = keys::substitutes_key(merchant);
        let client = self.store.for_key(&key)?;
        let removed: i64 = self.with_timeout(client.hdel(key, sku)).await?;
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exact_fill_takes_the_most_of_the_earliest_substitutes() {
        // (most groups, replaces): pairs, then singles.
        assert_eq!(exact_fill(5, &[(10, 2), (10, 1)]), Some(vec![2, 1]));
        // Greedy would take one pair and be stuck at 1 of triples; the
        // exact fill takes no pair.
        assert_eq!(exact_fill(3, &[(5, 2), (5, 3)]), Some(vec![0, 1]));
        assert_eq!(greedy_fill(3, &[(5, 2), (5, 3)]), vec![1, 0]);
        // Bounded by what each can give.
        assert_eq!(exact_fill(6, &[(1, 2), (10, 1)]), Some(vec![1, 4]));
        // No exact fill: a group larger than the rest, or too few.
        assert_eq!(exact_fill(1, &[(10, 2)]), None);
        assert_eq!(exact_fill(4, &[(1, 2)]), None);
        assert_eq!(greedy_fill(4, &[(1, 2)]), vec![1]);
        // Nothing to fill.
        assert_eq!(exact_fill(0, &[(3, 2)]), Some(vec![0]));
    }

    #[test]
    fn the_search_is_bounded() {
        // Ten substitutes of a million groups each, none able to end the
        // rest exactly: the search stops at its budget.
        let options = vec![(1_000_000, 2); 10];
        assert_eq!(exact_fill(1_000_001, &options), None);
    }
}
