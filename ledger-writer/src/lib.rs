//! The ledger writer: drains each partition's Redis outbox stream into Kafka
//! `inventory.ledger` and the PostgreSQL ledger, ingests stock events from
//! Kafka, runs the reconciler, and audits Redis against the ledger.
//!
//! It will own the relay, partition leases, the reconciler loops and the
//! `audit`/`rebuild` commands. It never decides stock: adjustments it ingests go
//! through the `allocator` crate. Built in the ledger-writer issue; this crate is
//! the home the workspace layout reserves for it.
