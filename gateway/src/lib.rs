//! The gateway node: a Pingora HTTP service that answers `/v1/*`, `/health`,
//! `/ready` and `/metrics` locally and proxies every other path to the origin.
//!
//! It will own routing, authentication, request validation, the availability
//! cache, request coalescing and the mapping of `allocator` errors to the HTTP
//! error codes of shared/API.md. It owns no stock decision: every stock change
//! goes through the `allocator` crate. Its service is built in the gateway issue;
//! this crate is the home the workspace layout reserves for it.
