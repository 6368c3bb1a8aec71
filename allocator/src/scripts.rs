//! The Lua of `lua/`, loaded once per Redis primary as one Redis Function
//! library and called by function name (FCALL).
//!
//! Owns turning `lua/lib.lua` plus the operation files into the library
//! Redis runs (each operation a function whose body is its file), loading
//! it, and loading it again when Redis answers that a function is not
//! there (after a restart without persistence, or a `FUNCTION FLUSH`). It
//! does not interpret replies.
//!
//! **Why functions, not EVALSHA.** A script runs its whole text on every
//! call, so every call made every helper of `lib.lua` anew; measured on
//! this machine that was ~11 µs of Redis time per call when hot, and most
//! of a claim's time cold (see `bench/report.md`). A library's top level
//! runs once, when it is loaded; a call runs only its function.
//!
//! **Versions side by side.** The library's name and its functions' names
//! carry a hash of its text (`invgw_<hash>`, `<op>_<hash>`), so nodes of
//! two releases sharing one Redis during a rolling deploy each call their
//! own code. Libraries of releases no longer running can be removed with
//! `FUNCTION DELETE` (they are small, and nothing calls them).

use std::sync::Arc;

use fred::clients::Client;
use fred::interfaces::FunctionInterface;
use fred::types::{Key, Value};
use sha2::{Digest as _, Sha256};

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
    /// `lua/throttle.lua`
    Throttle,
    /// `lua/allowance.lua`
    Allowance,
}

const OPS: [(Op, &str); 20] = [
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
    (Op::Throttle, include_str!("../../lua/throttle.lua")),
    (Op::Allowance, include_str!("../../lua/allowance.lua")),
];

/// The operation's function name in the library (its file's name).
fn op_name(op: Op) -> &'static str {
    match op {
        Op::ReserveBatch => "reserve_batch",
        Op::Commit => "commit",
        Op::Release => "release",
        Op::Extend => "extend",
        Op::GetReservation => "get_reservation",
        Op::ExpireDue => "expire_due",
        Op::Adjust => "adjust",
        Op::Settings => "settings",
        Op::TransferOut => "transfer_out",
        Op::TransferIn => "transfer_in",
        Op::TransferDone => "transfer_done",
        Op::PendingTransfers => "pending_transfers",
        Op::Cart => "cart",
        Op::Activate => "activate",
        Op::Rebuild => "rebuild",
        Op::Drain => "drain",
        Op::Fence => "fence",
        Op::Claim => "claim",
        Op::Throttle => "throttle",
        Op::Allowance => "allowance",
    }
}

/// The library, ready to load and call.
#[derive(Clone)]
pub struct Scripts {
    /// The library's text (`FUNCTION LOAD`).
    code: Arc<str>,
    /// Each operation's function name, indexed like `OPS`.
    names: Arc<Vec<(Op, String)>>,
}

impl Scripts {
    pub fn new() -> Self {
        let mut body = format!("{}{LIB}\n", crate::limits::lua_prologue());
        for (op, text) in OPS.iter() {
            body.push_str(&format!(
                "\n-- operation {name}\nredis.register_function('{name}_@', function(keys, argv)\n\
                 local refused = begin(keys, argv)\nif refused then return refused end\n{text}\nend)\n",
                name = op_name(*op),
            ));
        }
        let version = &hex::encode(Sha256::digest(body.as_bytes()))[..12];
        let names = OPS
            .iter()
            .map(|(op, _)| (*op, format!("{}_{version}", op_name(*op))))
            .collect();
        let code = format!(
            "#!lua name=invgw_{version}\n{}",
            body.replace("_@', function(keys", &format!("_{version}', function(keys"))
        );
        Self {
            code: Arc::from(code),
            names: Arc::new(names),
        }
    }

    /// Loads the library on the server `client` reaches (again, when it
    /// is there already: the same name always has the same text). Each
    /// master is given it when it is connected (`store`).
    pub async fn load(&self, client: &Client) -> Result<(), fred::error::Error> {
        let _: Value = Box::pin(client.function_load(true, &*self.code)).await?;
        Ok(())
    }

    /// The function serving the operation named `op` (its file's name,
    /// e.g. `claim`) in this library, if there is one.
    pub fn function_name(&self, op: &str) -> Option<&str> {
        self.names
            .iter()
            .find(|(candidate, _)| op_name(*candidate) == op)
            .map(|(_, name)| name.as_str())
    }

    fn name(&self, op: Op) -> &str {
        &self
            .names
            .iter()
            .find(|(candidate, _)| *candidate == op)
            .expect("every Op is in OPS")
            .1
    }

    /// Runs `op` with the partition's keys and arguments; loads the library
    /// again when Redis no longer has it.
    pub async fn run(
        &self,
        op: Op,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<String, fred::error::Error> {
        let name = self.name(op);
        // Kept as fred's shared byte types (made from the strings without a
        // copy), so keeping them for the rare second attempt costs reference
        // counts, not a copy of every argument on every call.
        let keys: Vec<Key> = keys.into_iter().map(Key::from).collect();
        let args: Vec<Value> = args.into_iter().map(Value::from).collect();
        // fred's command futures are ~5 KB each: boxed, so the futures of
        // every caller up to the HTTP handler stay small (they are moved
        // and boxed per request, and were memcpy and malloc hot spots).
        let first: Result<String, _> =
            Box::pin(client.fcall(name, keys.clone(), args.clone())).await;
        match first {
            Err(error) if error.details().contains("Function not found") => {
                self.load(client).await?;
                Box::pin(client.fcall(name, keys, args)).await
            }
            other => other,
        }
    }
}
