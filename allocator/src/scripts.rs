//! The Lua scripts of `lua/`, loaded once per Redis primary and run by SHA.
//!
//! Owns turning `lua/lib.lua` plus one operation file into the script Redis
//! runs, loading it, and reloading it when Redis answers NOSCRIPT (after a
//! restart or a `SCRIPT FLUSH`). It does not interpret replies.

use std::sync::Arc;

use fred::clients::{Client, Pool};
use fred::types::scripts::Script;

/// The reply schema version the scripts and this crate agree on.
pub const REPLY_VERSION: u32 = 1;

const LIB: &str = include_str!("../../lua/lib.lua");

/// One operation script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `lua/reserve_batch.lua`
    ReserveBatch,
    /// `lua/commit.lua`
    Commit,
    /// `lua/release.lua`
    Release,
    /// `lua/extend.lua`
    Extend,
    /// `lua/get_reservation.lua`
    GetReservation,
    /// `lua/expire_due.lua`
    ExpireDue,
    /// `lua/adjust.lua`
    Adjust,
    /// `lua/settings.lua`
    Settings,
    /// `lua/transfer_out.lua`
    TransferOut,
    /// `lua/transfer_in.lua`
    TransferIn,
    /// `lua/transfer_done.lua`
    TransferDone,
    /// `lua/pending_transfers.lua`
    PendingTransfers,
    /// `lua/cart.lua`
    Cart,
    /// `lua/activate.lua`
    Activate,
    /// `lua/rebuild.lua`
    Rebuild,
    /// `lua/drain.lua`
    Drain,
    /// `lua/fence.lua`
    Fence,
    /// `lua/claim.lua`
    Claim,
}

const OPS: [(Op, &str); 18] = [
    (
        Op::ReserveBatch,
        include_str!("../../lua/reserve_batch.lua"),
    ),
    (Op::Commit, include_str!("../../lua/commit.lua")),
    (Op::Release, include_str!("../../lua/release.lua")),
    (Op::Extend, include_str!("../../lua/extend.lua")),
    (
        Op::GetReservation,
        include_str!("../../lua/get_reservation.lua"),
    ),
    (Op::ExpireDue, include_str!("../../lua/expire_due.lua")),
    (Op::Adjust, include_str!("../../lua/adjust.lua")),
    (Op::Settings, include_str!("../../lua/settings.lua")),
    (Op::TransferOut, include_str!("../../lua/transfer_out.lua")),
    (Op::TransferIn, include_str!("../../lua/transfer_in.lua")),
    (
        Op::TransferDone,
        include_str!("../../lua/transfer_done.lua"),
    ),
    (
        Op::PendingTransfers,
        include_str!("../../lua/pending_transfers.lua"),
    ),
    (Op::Cart, include_str!("../../lua/cart.lua")),
    (Op::Activate, include_str!("../../lua/activate.lua")),
    (Op::Rebuild, include_str!("../../lua/rebuild.lua")),
    (Op::Drain, include_str!("../../lua/drain.lua")),
    (Op::Fence, include_str!("../../lua/fence.lua")),
    (Op::Claim, include_str!("../../lua/claim.lua")),
];

/// Every operation's script, ready to run.
#[derive(Clone)]
pub struct Scripts {
    /// Indexed like `OPS`.
    scripts: Arc<Vec<(Op, Script)>>,
}

impl Scripts {
    pub fn new() -> Self {
        let scripts = OPS
            .iter()
            .map(|(op, body)| {
                (
                    *op,
                    Script::from_lua(format!(
                        "{}{LIB}\n-- operation\n{body}",
                        crate::limits::lua_prologue()
                    )),
                )
            })
            .collect();
        Self {
            scripts: Arc::new(scripts),
        }
    }

    /// Loads every script on every primary the pool reaches.
    pub async fn load(&self, pool: &Pool) -> Result<(), fred::error::Error> {
        for (_, script) in self.scripts.iter() {
            for client in pool.clients() {
                script.load(client).await?;
            }
        }
        Ok(())
    }

    fn script(&self, op: Op) -> &Script {
        &self
            .scripts
            .iter()
            .find(|(candidate, _)| *candidate == op)
            .expect("every Op is in OPS")
            .1
    }

    /// Runs `op` with the partition's keys and arguments; reloads on NOSCRIPT.
    pub async fn run(
        &self,
        op: Op,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<String, fred::error::Error> {
        self.script(op)
            .evalsha_with_reload(client, keys, args)
            .await
    }
}
