-- reserve: hold ARGS.qty units of one cell (pool or bucket) as a reservation.
-- Idempotent on ARGS.idempotency_key with ARGS.fingerprint; due holds of the
-- partition are released first (lazy expiry). Replies: held (with the
-- reservation), insufficient_stock {requested, available}, not_found,
-- idempotency_key_reused, bad_argument.
housekeeping()
return reserve_one(ARGS)
