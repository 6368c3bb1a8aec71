//! Substitutes: which SKUs may stand in for a short one (API.md "Bundles
//! and substitutes"), and how a short line is filled with them.
//!
//! Owns the definitions (one Redis hash per merchant,
//! [`keys::substitutes_key`]: SKU → its substitutes in order of
//! preference) and the fill rule, a pure function of what a read placed.
//! Where each hold lands is [`crate::placement`]'s; holding is
//! [`crate::allocate`]'s.
//!
//! **The fill.** A line that allows substitutes holds what it can of its
//! own SKU (by the placement rules, as a partial line would), and fills the
//! rest with whole *groups* of its substitutes in order: a group is `units`
//! of the substitute standing in for `replaces` units of the original, and
//! each substitute takes as many groups as the rest needs and one location
//! can give (a substitute's groups are never split across locations). The
//! fill must be exact: if the rest is not made up exactly (a group too
//! large for what is left, or not enough of any substitute), the line is
//! short, as without substitutes, and holds no substitute; a partial
//! reservation keeps what was filled. Greedy in the merchant's order,
//! by design: an earlier substitute is preferred even when a later one
//! would fill more exactly.

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

/// How many groups of `substitute` fill `rest` units of the original, given
/// `placeable` units of it at one location: `(groups, units of the original
/// they stand for)`.
pub fn groups(substitute: &Substitute, rest: u32, placeable: u32) -> (u32, u32) {
    if substitute.units == 0 || substitute.replaces == 0 {
        return (0, 0);
    }
    let groups = (rest / substitute.replaces).min(placeable / substitute.units);
    (groups, groups * substitute.replaces)
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

    fn twelve() -> Substitute {
        Substitute {
            sku: "twelve-pack".to_owned(),
            units: 1,
            replaces: 2,
        }
    }

    #[test]
    fn groups_are_whole_and_bounded_by_the_rest_and_the_shelf() {
        // 5 six-packs short: two twelve-packs stand for 4, 1 is left.
        assert_eq!(groups(&twelve(), 5, 10), (2, 4));
        // Only one twelve-pack there.
        assert_eq!(groups(&twelve(), 4, 1), (1, 2));
        // A group larger than the rest fills nothing.
        assert_eq!(groups(&twelve(), 1, 10), (0, 0));
        let three_for_two = Substitute {
            sku: "three-pack".to_owned(),
            units: 3,
            replaces: 2,
        };
        // 8 units of three-pack make 2 groups (6 units) for 4 originals.
        assert_eq!(groups(&three_for_two, 6, 8), (2, 4));
    }
}
