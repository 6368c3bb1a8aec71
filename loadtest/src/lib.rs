//! Load tests: goose scenarios (browse, flash sale, checkout, ingest) and the
//! benchmark driver behind `scripts/bench`.
//!
//! It talks to the gateway over HTTP only and shares no code with it, so it
//! measures what a real client sees. Built in the load-test issue; this crate
//! is the home the workspace layout reserves for it.
