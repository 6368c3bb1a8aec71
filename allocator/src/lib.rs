//! The stock model: Redis keys, Lua scripts (from `lua/`) and typed results.
//!
//! The only code that builds Redis keys or calls the scripts; the gateway and
//! the ledger writer use it through a typed Rust API. Built in the stock-engine
//! issue; this crate is the home the workspace layout reserves for it.
