//! The stock engine against the real Redis of the stack: never oversell,
//! idempotency, expiry exactly once, adjustments, and the ledger.

mod common;

use common::*;

use std::sync::Arc;
use std::time::Duration;

use allocator::{
    Adjustment, AdjustmentKind, AdjustmentOutcome, Allocator, AllocatorError, ReservationStatus,
    ReserveRequest, StockKey, StockSettings,
};
use serde_json::Value;

fn fresh_key() -> StockKey {
    StockKey::new(testkit::unique_id("m"), "sku-1", "dc1")
}

/// A one-line request in the cart form the allocator's entry point takes.
fn one_line(
    key: &StockKey,
    qty: u32,
    ttl_seconds: u64,
    idempotency_key: &str,
) -> allocator::CartRequest {
    allocator::CartRequest {
        merchant: key.merchant.clone(),
        lines: vec![allocator::CartLine::at(&key.sku, &key.location, qty)],
        ttl: Some(Duration::from_secs(ttl_seconds)),
        idempotency_key: idempotency_key.to_owned(),
        customer_ref: None,
        allow_partial: false,
    }
}

/// Changes the stored claim of `request` (found by the reservation id its
/// placement names), as time or a lost lease would.
async fn edit_claim(
    allocator: &Allocator,
    request: &allocator::CartRequest,
    reservation_id: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    use fred::prelude::*;
    let redis = raw_redis().await;
    let claims = format!(
        "inv:{{{}}}:idem",
        allocator.request_partition(&request.merchant, &request.idempotency_key)
    );
    let records: std::collections::HashMap<String, String> =
        redis.hgetall(&claims).await.expect("claims");
    let (field, mut claim) = records
        .into_iter()
        .filter(|(field, _)| field.starts_with("c|"))
        .map(|(field, text)| {
            let claim: serde_json::Value = serde_json::from_str(&text).expect("json");
            (field, claim)
        })
        .find(|(_, claim)| claim["reservation_id"] == reservation_id)
        .expect("the request's claim");
    edit(&mut claim);
    let _: i64 = redis
        .hset(&claims, (field.as_str(), claim.to_string()))
        .await
        .expect("edit the claim");
}

fn count(key: &StockKey, qty: i64, seq: u64) -> Adjustment {
    Adjustment {
        kind: AdjustmentKind::Absolute,
        source_seq: Some(seq),
        ..delta(key, qty, &format!("count-{seq}"))
    }
}

async fn pool(allocator: &Allocator, key: &StockKey) -> allocator::Cell {
    allocator
        .cell(&key.pool(PARTITIONS))
        .await
        .expect("read cell")
        .expect("cell exists")
}

/// Ledger entries of one stock key, oldest first.
async fn entries_of(allocator: &Allocator, key: &StockKey) -> Vec<Value> {
    let cell = key.pool(PARTITIONS);
    // Streams are not trimmed until the ledger writer runs: read the last
    // minutes only (every test here is far shorter).
    let since_ms = allocator.redis_time_ms().await.expect("time") - 120_000;
    allocator
        .ledger_entries(cell.partition, since_ms)
        .await
        .expect("read ledger")
        .into_iter()
        .filter(|entry| entry.cell == cell.id)
        .map(|entry| serde_json::to_value(&entry).expect("json"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_racers_for_fifty_units_get_exactly_fifty() {
    let allocator = Arc::new(allocator_for("test-node").await);
    let key = fresh_key();
    stock(&allocator, &key, 50).await;

    let racers: Vec<_> = (0..200)
        .map(|i| {
            let allocator = allocator.clone();
            let request = reserve(&key, 1, &format!("racer-{i}"));
            tokio::spawn(async move { allocator.reserve(&request).await })
        })
        .collect();
    let (mut held, mut refused) = (0, 0);
    for racer in racers {
        match racer.await.expect("task") {
            Ok(_) => held += 1,
            Err(AllocatorError::InsufficientStock { lines }) => {
                assert_eq!(lines[0].available, 0);
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!((held, refused), (50, 150));
    let cell = pool(&allocator, &key).await;
    assert_eq!((cell.on_hand, cell.reserved, cell.sellable()), (50, 50, 0));
    let reserves = entries_of(&allocator, &key)
        .await
        .into_iter()
        .filter(|entry| entry["op"] == "reserve")
        .count();
    assert_eq!(reserves, 50, "one ledger entry per hold");
}

#[tokio::test]
async fn a_retry_returns_the_same_hold_and_writes_one_entry() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 10).await;

    let first = allocator
        .reserve(&reserve(&key, 3, "cart-7"))
        .await
        .expect("hold");
    let retry = allocator
        .reserve(&reserve(&key, 3, "cart-7"))
        .await
        .expect("replay");
    assert!(!first.replayed);
    assert!(retry.replayed);
    assert_eq!(first.reservation, retry.reservation);
    assert_eq!(pool(&allocator, &key).await.reserved, 3);
    let reserves = entries_of(&allocator, &key)
        .await
        .into_iter()
        .filter(|entry| entry["op"] == "reserve")
        .count();
    assert_eq!(reserves, 1);

    let other_body = allocator.reserve(&reserve(&key, 4, "cart-7")).await;
    assert!(
        matches!(other_body, Err(AllocatorError::IdempotencyKeyReused)),
        "{other_body:?}"
    );
    assert_eq!(
        pool(&allocator, &key).await.reserved,
        3,
        "refusal changed nothing"
    );

    let commit = allocator
        .commit(None, &first.reservation.reservation_id, "commit-1")
        .await
        .expect("commit");
    let commit_again = allocator
        .commit(None, &first.reservation.reservation_id, "commit-1")
        .await
        .expect("commit replay");
    assert_eq!(commit.status, ReservationStatus::Committed);
    assert_eq!(commit_again.status, ReservationStatus::Committed);
    let cell = pool(&allocator, &key).await;
    assert_eq!((cell.on_hand, cell.reserved), (7, 0));
}

#[tokio::test]
async fn a_retry_answers_the_original_body_whatever_happened_to_the_hold_since() {
    let allocator = allocator_for("test-node").await;
    let other = allocator_for("test-node-2").await;
    let key = fresh_key();
    stock(&allocator, &key, 10).await;
    let request = one_line(&key, 2, 60, "order-1");
    let first = allocator.reserve_cart(&request).await.expect("hold");
    assert!(!first.replayed);
    let id = first.cart.reservation_id.clone();
    // Retried while the first caller's claim lease still runs, on another
    // node: answered by the hold itself.
    let early = other.reserve_cart(&request).await.expect("replay");
    assert!(early.replayed);
    assert_eq!(early.cart, first.cart);
    allocator
        .extend(None, &id, Duration::from_secs(600))
        .await
        .expect("extend");
    allocator
        .commit(None, &id, "commit-1")
        .await
        .expect("commit");
    for node in [&allocator, &other] {
        let retry = node.reserve_cart(&request).await.expect("replay");
        assert!(retry.replayed);
        assert_eq!(retry.cart, first.cart, "the original status and body");
    }
    let cell = pool(&allocator, &key).await;
    assert_eq!((cell.on_hand, cell.reserved), (8, 0), "held once");
}

#[tokio::test]
async fn a_claim_taken_over_keeps_the_answer_even_if_the_hold_record_is_lost() {
    use fred::prelude::*;
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 10).await;
    let request = one_line(&key, 1, 60, "order-taken-over");
    let first = allocator.reserve_cart(&request).await.expect("hold");
    let id = first.cart.reservation_id.clone();
    allocator
        .commit(None, &id, "commit-1")
        .await
        .expect("commit");

    // The first caller's lease runs out (it died before anyone retried).
    edit_claim(&allocator, &request, &id, |claim| {
        claim["lease_until_ms"] = 0.into();
    })
    .await;

    // A retry takes the claim over and answers from the hold...
    let retry = allocator.reserve_cart(&request).await.expect("replay");
    assert!(retry.replayed);
    assert_eq!(retry.cart, first.cart);
    // ...and stores that answer, so it no longer rests on the hold's record
    // (lost here, as a failed-over shard might lose it).
    let partition = allocator::keys::reservation_partition(&id, PARTITIONS).expect("partition");
    let _: i64 = raw_redis()
        .await
        .hdel(format!("inv:{{{partition}}}:res"), &id)
        .await
        .expect("lose the record");
    let again = allocator.reserve_cart(&request).await.expect("replay");
    assert!(again.replayed);
    assert_eq!(again.cart, first.cart);
    let cell = pool(&allocator, &key).await;
    assert_eq!(
        (cell.on_hand, cell.reserved),
        (9, 0),
        "held once, sold once"
    );
}

#[tokio::test]
async fn a_key_used_again_after_its_claims_life_makes_new_holds_not_replays_of_old_ones() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 10).await;
    let request = one_line(&key, 1, 600, "order-again");
    let first = allocator.reserve_cart(&request).await.expect("hold");
    allocator
        .commit(None, &first.cart.reservation_id, "commit-1")
        .await
        .expect("commit");

    // Its claim has lived its life (24 h less 10 min), though not deleted yet.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    edit_claim(&allocator, &request, &first.cart.reservation_id, |claim| {
        claim["created_at_ms"] = (now_ms - (24 * 3600 - 9 * 60) * 1000).into();
    })
    .await;

    // The key now names a new request: a new hold, never the old one
    // answered as if it were held.
    let again = allocator.reserve_cart(&request).await.expect("hold");
    assert!(!again.replayed, "{again:?}");
    assert_ne!(again.cart.reservation_id, first.cart.reservation_id);
    let cell = pool(&allocator, &key).await;
    assert_eq!((cell.on_hand, cell.reserved), (9, 1));
}

#[tokio::test]
async fn a_hold_whose_claim_lease_ran_out_is_not_made() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 5).await;
    let cell = key.pool(PARTITIONS);
    let hold = allocator::HoldRequest {
        key: key.clone(),
        qty: 1,
        ttl_ms: 60_000,
        grace_ms: 0,
        reservation_id: allocator::keys::reservation_id(cell.partition, [7; 12]),
        customer_hash: None,
        cart_id: None,
        // Long past: another caller may have taken the claim over.
        hold_by_ms: Some(1),
        allowance_partition: None,
    };
    let answer = allocator.hold(&cell, &hold).await;
    assert!(
        matches!(answer, Err(AllocatorError::InProgress)),
        "{answer:?}"
    );
    assert_eq!(pool(&allocator, &key).await.reserved, 0, "nothing held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_hold_is_released_once_and_never_committed() {
    let allocator = Arc::new(allocator_for("test-node").await);
    let key = fresh_key();
    stock(&allocator, &key, 5).await;
    let mut request = reserve(&key, 2, "short-lived");
    request.ttl = Some(Duration::from_secs(1));
    let hold = allocator.reserve(&request).await.expect("hold");
    let id = hold.reservation.reservation_id.clone();
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    // The sweeper and a reserve on the same partition race to expire it.
    let partition = key.pool(PARTITIONS).partition;
    let sweeper = {
        let allocator = allocator.clone();
        tokio::spawn(async move { allocator.expire_due(partition, 100).await })
    };
    let reserver = {
        let allocator = allocator.clone();
        let request = reserve(&key, 5, "after-expiry");
        tokio::spawn(async move { allocator.reserve(&request).await })
    };
    sweeper.await.expect("task").expect("sweep");
    let after = reserver
        .await
        .expect("task")
        .expect("the expired units are sellable again");
    assert_eq!(after.reservation.qty, 5);

    let expiries = entries_of(&allocator, &key)
        .await
        .into_iter()
        .filter(|entry| entry["op"] == "expire" && entry["reservation_id"] == id.as_str())
        .count();
    assert_eq!(expiries, 1, "released exactly once");

    let commit = allocator.commit(None, &id, "late-commit").await;
    assert!(
        matches!(
            commit,
            Err(AllocatorError::NotHeld {
                status: ReservationStatus::Expired
            })
        ),
        "{commit:?}"
    );
    let release = allocator
        .release(None, &id, "late-release")
        .await
        .expect("release is 200");
    assert_eq!(release.status, ReservationStatus::Expired);
    let cell = pool(&allocator, &key).await;
    assert_eq!((cell.on_hand, cell.reserved), (5, 5));
}

#[tokio::test]
async fn duplicates_and_stale_counts_are_ignored_and_counts_converge_to_the_newest() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    let first = allocator
        .adjust(&delta(&key, 7, "evt-1"))
        .await
        .expect("apply");
    assert!(matches!(first, AdjustmentOutcome::Applied { .. }));
    let duplicate = allocator
        .adjust(&delta(&key, 7, "evt-1"))
        .await
        .expect("dedupe");
    assert_eq!(duplicate, AdjustmentOutcome::Duplicate);
    assert_eq!(pool(&allocator, &key).await.on_hand, 7);

    // Physical counts arrive out of order: 3, then 1 and 2 late.
    let newest = allocator
        .adjust(&count(&key, 30, 3))
        .await
        .expect("count 3");
    assert!(matches!(newest, AdjustmentOutcome::Applied { .. }));
    for (qty, seq) in [(10, 1), (20, 2), (99, 3)] {
        let outcome = allocator
            .adjust(&count(&key, qty, seq))
            .await
            .expect("late count");
        let expected = if seq == 3 {
            AdjustmentOutcome::Duplicate
        } else {
            AdjustmentOutcome::Stale { last_source_seq: 3 }
        };
        assert_eq!(outcome, expected, "seq {seq}");
    }
    assert_eq!(pool(&allocator, &key).await.on_hand, 30);
    let mut newer = count(&key, 25, 4);
    newer.event_id = "count-4".to_owned();
    allocator.adjust(&newer).await.expect("count 4");
    assert_eq!(pool(&allocator, &key).await.on_hand, 25);
}

#[tokio::test]
async fn a_loss_below_the_held_units_is_a_shortfall_that_blocks_reservations() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 5).await;
    allocator
        .reserve(&reserve(&key, 3, "hold-3"))
        .await
        .expect("hold");

    let loss = allocator
        .adjust(&delta(&key, -4, "shrinkage-1"))
        .await
        .expect("loss");
    let AdjustmentOutcome::Applied { shortfall, cell } = loss else {
        panic!("loss applied: {loss:?}")
    };
    assert!(shortfall);
    assert_eq!((cell.on_hand, cell.reserved, cell.sellable()), (1, 3, -2));
    let shortfall_entries = entries_of(&allocator, &key)
        .await
        .into_iter()
        .filter(|entry| entry["shortfall"] == true)
        .count();
    assert_eq!(shortfall_entries, 1, "the ledger flags the loss");

    let refused = allocator
        .reserve(&reserve(&key, 1, "during-shortfall"))
        .await;
    let Err(AllocatorError::InsufficientStock { lines }) = refused else {
        panic!("refused while short: {refused:?}")
    };
    assert_eq!((lines[0].requested, lines[0].available), (1, 0));

    stock(&allocator, &key, 3).await;
    allocator
        .reserve(&reserve(&key, 1, "after-restock"))
        .await
        .expect("restored");
}

#[tokio::test]
async fn backorders_are_held_up_to_the_limit_and_reported() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 4).await;
    let settings = StockSettings {
        safety_stock: 1,
        backorder_limit: 2,
        low_stock_threshold: Some(2),
        reorder_point: None,
        reorder_qty: 0,
    };
    let cell = allocator
        .settings_of(&key, settings)
        .await
        .expect("settings");
    assert_eq!(cell.sellable(), 3);

    let hold = allocator
        .reserve(&reserve(&key, 5, "backorder"))
        .await
        .expect("hold");
    assert_eq!(hold.reservation.backordered, 2);
    let refused = allocator.reserve(&reserve(&key, 1, "past-limit")).await;
    assert!(
        matches!(refused, Err(AllocatorError::InsufficientStock { .. })),
        "{refused:?}"
    );
    let cell = pool(&allocator, &key).await;
    assert_eq!(cell.sellable(), -2);
}

#[tokio::test]
async fn release_commit_and_extend_follow_the_lifecycle() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 10).await;
    let hold = allocator
        .reserve(&reserve(&key, 4, "life"))
        .await
        .expect("hold");
    let id = hold.reservation.reservation_id;

    let other_merchant = allocator.reservation(Some("someone-else"), &id).await;
    assert!(
        matches!(other_merchant, Err(AllocatorError::NotFound)),
        "{other_merchant:?}"
    );
    let foreign_commit = allocator.commit(Some("someone-else"), &id, "steal").await;
    assert!(matches!(foreign_commit, Err(AllocatorError::NotFound)));

    let extended = allocator
        .extend(Some(&key.merchant), &id, Duration::from_secs(1200))
        .await
        .expect("extend");
    assert!(extended.expires_at_ms > hold.reservation.expires_at_ms);

    let released = allocator
        .release(Some(&key.merchant), &id, "rel-1")
        .await
        .expect("release");
    assert_eq!(released.status, ReservationStatus::Released);
    let again = allocator
        .release(Some(&key.merchant), &id, "rel-2")
        .await
        .expect("release again");
    assert_eq!(again.status, ReservationStatus::Released);
    assert_eq!(pool(&allocator, &key).await.reserved, 0, "released once");
    let commit = allocator.commit(Some(&key.merchant), &id, "too-late").await;
    assert!(matches!(
        commit,
        Err(AllocatorError::NotHeld {
            status: ReservationStatus::Released
        })
    ));
    let extend = allocator.extend(None, &id, Duration::from_secs(60)).await;
    assert!(matches!(extend, Err(AllocatorError::NotHeld { .. })));

    let sold = allocator
        .reserve(&reserve(&key, 2, "sold"))
        .await
        .expect("hold");
    let sold_id = sold.reservation.reservation_id;
    allocator.commit(None, &sold_id, "c").await.expect("commit");
    let release_committed = allocator.release(None, &sold_id, "r").await;
    assert!(matches!(
        release_committed,
        Err(AllocatorError::NotHeld {
            status: ReservationStatus::Committed
        })
    ));
    let unknown = allocator
        .reservation(None, "r3.000000000000000000000000")
        .await;
    assert!(matches!(unknown, Err(AllocatorError::NotFound)));
    let malformed = allocator.reservation(None, "not-an-id").await;
    assert!(matches!(malformed, Err(AllocatorError::NotFound)));
}

#[tokio::test]
async fn the_ledger_alone_proves_conservation() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 20).await;
    let a = allocator.reserve(&reserve(&key, 5, "a")).await.expect("a");
    let b = allocator.reserve(&reserve(&key, 3, "b")).await.expect("b");
    allocator
        .commit(None, &a.reservation.reservation_id, "ca")
        .await
        .expect("commit a");
    allocator
        .release(None, &b.reservation.reservation_id, "rb")
        .await
        .expect("release b");
    allocator
        .adjust(&delta(&key, -2, "damaged"))
        .await
        .expect("loss");

    let entries = entries_of(&allocator, &key).await;
    let sum = |op: &str| -> i64 {
        entries
            .iter()
            .filter(|entry| entry["op"] == op)
            .map(|entry| entry["qty"].as_i64().expect("qty"))
            .sum()
    };
    let last = entries.last().expect("entries");
    let on_hand = last["on_hand_after"].as_i64().expect("on_hand_after");
    assert_eq!(on_hand, sum("adjust") - sum("commit"));
    assert_eq!(on_hand, pool(&allocator, &key).await.on_hand);
    assert_eq!(last["reserved_after"].as_i64(), Some(0));
    for pair in entries.windows(2) {
        assert_eq!(
            pair[0]["on_hand_after"], pair[1]["on_hand_before"],
            "entries chain"
        );
        assert_eq!(
            pair[0]["reserved_after"], pair[1]["reserved_before"],
            "entries chain"
        );
    }
    for entry in &entries {
        assert_eq!(entry["v"], 1);
        assert!(entry.get("customer_ref").is_none() && entry.get("customer_hash").is_none());
    }
}

#[tokio::test]
async fn a_batch_answers_each_request_as_a_single_call_would() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 5).await;
    let cell = key.pool(PARTITIONS);
    let hold = |i: u8| allocator::HoldRequest {
        key: key.clone(),
        qty: 1,
        ttl_ms: 600_000,
        grace_ms: 0,
        reservation_id: allocator::keys::reservation_id(cell.partition, {
            // Unique for ever: the merchant is (its tail is time and a counter).
            let tail = &key.merchant.as_bytes()[key.merchant.len() - 11..];
            let mut random = [i; 12];
            random[..11].copy_from_slice(tail);
            random
        }),
        customer_hash: None,
        cart_id: None,
        hold_by_ms: None,
        allowance_partition: None,
    };
    // Eight claimed holds, a bad one among them, and the first one's
    // attempt run again.
    // The first one is a cart's line, with a customer (whose hash needs
    // JSON escaping), so its record and entry carry every field there is.
    let first = allocator::HoldRequest {
        grace_ms: 2_000,
        cart_id: Some("c-batch".to_owned()),
        customer_hash: Some("h\"\\\u{1}é".to_owned()),
        ..hold(0)
    };
    let mut requests: Vec<_> = (1..8).map(hold).collect();
    requests.insert(0, first.clone());
    requests.insert(3, allocator::HoldRequest { qty: 0, ..hold(9) });
    requests.push(first.clone());
    let answers = allocator.hold_batch(&cell, &requests).await.expect("batch");
    assert!(
        matches!(&answers[3], Err(AllocatorError::InvalidRequest(reason)) if reason == "qty"),
        "{:?}",
        answers[3]
    );
    let held = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(hold) if !hold.replayed))
        .count();
    let short = answers
        .iter()
        .filter(|answer| matches!(answer, Err(AllocatorError::InsufficientStock { .. })))
        .count();
    assert_eq!((held, short), (5, 3));
    let replay = answers
        .last()
        .expect("ten answers")
        .as_ref()
        .expect("replay of batch-0");
    assert!(replay.replayed);
    assert_eq!(
        replay.reservation,
        answers[0].as_ref().expect("first held").reservation
    );

    // The record and the ledger entry, written as text per hold, are the
    // documents the decision describes: every field, nothing else.
    use fred::interfaces::{HashesInterface, StreamsInterface};
    let redis = raw_redis().await;
    let names = allocator::keys::partition_keys(cell.partition);
    let id = &first.reservation_id;
    let text: String = redis.hget(&names[1], id).await.expect("record");
    let record: Value = serde_json::from_str(&text).expect("the record is JSON");
    let made = record["created_at_ms"].as_u64().expect("created_at_ms");
    assert_eq!(
        record,
        serde_json::json!({
            "reservation_id": id, "merchant": key.merchant, "sku": key.sku,
            "location": key.location, "cell": cell.id, "partition": cell.partition,
            "qty": 1, "backordered": 0, "status": "held", "created_at_ms": made,
            "expires_at_ms": made + 600_000, "hold_until_ms": made + 602_000,
            "node": "test-node", "cart_id": "c-batch", "customer_hash": first.customer_hash,
        })
    );
    let stream: Vec<(String, std::collections::HashMap<String, String>)> = redis
        .xrange(&names[5], format!("{}-0", made - 60_000), "+", None)
        .await
        .expect("ledger");
    let entries: Vec<Value> = stream
        .iter()
        .map(|(_, fields)| serde_json::from_str(&fields["e"]).expect("an entry is JSON"))
        .filter(|entry: &Value| entry["cell"] == cell.id.as_str() && entry["op"] == "reserve")
        .collect();
    assert_eq!(entries.len(), 5, "one entry per hold");
    for pair in entries.windows(2) {
        assert_eq!(pair[0]["reserved_after"], pair[1]["reserved_before"]);
        assert_eq!(
            pair[1]["version"].as_i64(),
            pair[0]["version"].as_i64().map(|version| version + 1)
        );
        assert_eq!(pair[1]["on_hand_before"], pair[0]["on_hand_after"]);
    }
    let before = entries[0]["reserved_before"]
        .as_i64()
        .expect("reserved_before");
    let version = entries[0]["version"].as_i64().expect("version");
    assert_eq!(
        entries[0],
        serde_json::json!({
            "v": 1, "op": "reserve", "partition": cell.partition, "cell": cell.id,
            "merchant": key.merchant, "sku": key.sku, "location": key.location,
            "node": "test-node", "at_ms": made, "on_hand_before": 5, "on_hand_after": 5,
            "reserved_before": before, "reserved_after": before + 1, "version": version,
            "reservation_id": id, "qty": 1, "backordered": 0, "cart_id": "c-batch",
        })
    );
    let cell = pool(&allocator, &key).await;
    assert_eq!((cell.reserved, cell.sellable()), (5, 0));
}

#[tokio::test]
async fn a_cells_own_dead_holds_are_released_before_deciding_whatever_the_backlog() {
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    let partition = key.partition(PARTITIONS);
    // 70 other keys of the same partition, each with a short hold.
    let mut others = Vec::new();
    let mut n = 0;
    while others.len() < 70 {
        n += 1;
        let other = StockKey::new(&key.merchant, format!("other-{n}"), "dc1");
        if other.partition(PARTITIONS) == partition {
            others.push(other);
        }
    }
    let short = |key: &StockKey, name: String| ReserveRequest {
        ttl: Some(Duration::from_secs(1)),
        ..reserve(key, 1, &name)
    };
    for (index, other) in others.iter().enumerate() {
        stock(&allocator, other, 1).await;
        allocator
            .reserve(&short(other, format!("backlog-{index}")))
            .await
            .expect("hold");
    }
    // Our key's only unit is held last, so it is the newest due hold.
    stock(&allocator, &key, 1).await;
    allocator
        .reserve(&short(&key, "mine".to_owned()))
        .await
        .expect("hold");
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let again = allocator.reserve(&reserve(&key, 1, "after")).await;
    assert!(
        again.is_ok(),
        "the cell's dead hold was released first: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_text_reaches_redis_or_the_ledger() {
    use fred::prelude::*;
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 5).await;
    let marker = testkit::unique_id("order-4711-alice-at-example.com");
    let email = format!("{marker}-customer");
    let mut request = reserve(&key, 1, &marker);
    request.customer_ref = Some(email.clone());
    let hold = allocator.reserve(&request).await.expect("hold");
    allocator
        .commit(
            None,
            &hold.reservation.reservation_id,
            &format!("{marker}-commit"),
        )
        .await
        .expect("commit");

    let redis = raw_redis().await;
    let mut partitions = vec![
        key.partition(PARTITIONS),
        allocator.request_partition(&key.merchant, &marker),
    ];
    partitions.dedup();
    let mut seen = String::new();
    for partition in partitions {
        for name in ["cells", "res", "idem", "xfer"] {
            // Bytes: reservation records are MessagePack, not text.
            let hash: std::collections::HashMap<String, Vec<u8>> = redis
                .hgetall(format!("inv:{{{partition}}}:{name}"))
                .await
                .expect("hash");
            for (field, value) in hash {
                seen.push_str(&field);
                seen.push_str(&String::from_utf8_lossy(&value));
            }
        }
        for entry in allocator
            .ledger_entries(partition, 0)
            .await
            .expect("ledger")
        {
            seen.push_str(&serde_json::to_string(&entry).expect("json"));
        }
    }
    assert!(!seen.is_empty());
    assert!(
        !seen.contains(&marker),
        "the Idempotency-Key's text is stored"
    );
    assert!(
        !seen.contains(&email),
        "the customer reference's text is stored"
    );
}

/// A reader that hears a key's creation must find it: its location is in
/// the SKU's location set before the script that creates it publishes.
/// (When the set was written after the script, a reader hearing the
/// notification could find the SKU unknown, and the gateway cached that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_hears_a_keys_creation_finds_it() {
    let allocator = Arc::new(allocator_for("test-node").await);
    let mut feed = allocator.change_feed(64).await.expect("feed");
    let merchant = testkit::unique_id("created");
    for round in 0..20 {
        let key = StockKey::new(&merchant, format!("sku-{round}"), "dc1");
        let adjuster = tokio::spawn({
            let (allocator, key) = (Arc::clone(&allocator), key.clone());
            async move { stock(&allocator, &key, 5).await }
        });
        // The first notification naming the key: read at once, as a
        // gateway's cache fill would.
        let views = loop {
            match tokio::time::timeout(Duration::from_secs(5), feed.next()).await {
                Ok(Some(allocator::ChangeEvent::Changed(change)))
                    if change.merchant == key.merchant && change.sku == key.sku =>
                {
                    break allocator
                        .sku_views(&key.merchant, &key.sku)
                        .await
                        .expect("views");
                }
                Ok(Some(_)) => continue,
                other => panic!("no notification for {key}: {other:?}"),
            }
        };
        assert_eq!(views.len(), 1, "round {round}: {key} heard but not found");
        adjuster.await.expect("adjuster");
    }
    feed.close().await;
}

/// Pipelined reads answer every cell in the order asked, across partitions,
/// with repeats and absent cells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_are_read_in_the_order_asked_across_partitions() {
    let allocator = allocator_for("test-node").await;
    let merchant = testkit::unique_id("cells");
    let keys: Vec<StockKey> = (0..12)
        .map(|i| StockKey::new(&merchant, format!("sku-{i}"), "dc1"))
        .collect();
    for (units, key) in keys.iter().enumerate() {
        stock(&allocator, key, units as i64 + 1).await;
    }
    let missing = StockKey::new(&merchant, "never", "dc1");
    let mut asked: Vec<allocator::CellRef> = keys.iter().map(|key| key.pool(PARTITIONS)).collect();
    asked.push(missing.pool(PARTITIONS));
    asked.push(keys[3].pool(PARTITIONS));
    let partitions: std::collections::HashSet<u32> =
        asked.iter().map(|cell| cell.partition).collect();
    assert!(partitions.len() > 1, "the keys span partitions");
    let cells = allocator.cells(&asked).await.expect("cells");
    assert_eq!(cells.len(), asked.len());
    for (units, cell) in cells.iter().take(keys.len()).enumerate() {
        assert_eq!(cell.as_ref().expect("stocked").on_hand, units as i64 + 1);
    }
    assert!(cells[keys.len()].is_none());
    assert_eq!(cells[keys.len() + 1].as_ref().expect("repeat").on_hand, 4);
    assert!(allocator.cells(&[]).await.expect("none").is_empty());
}

/// `FCALL` of the library's function for operation `op` on `partition`,
/// with the JSON argument `args` and the plain arguments `rest`.
async fn fcall_raw(
    allocator: &Allocator,
    op: &str,
    partition: u32,
    args: Value,
    rest: &[&str],
) -> Value {
    use fred::interfaces::FunctionInterface;
    let redis = raw_redis().await;
    let name = allocator
        .function_name(op)
        .expect("an operation of the library");
    let mut argv = vec![args.to_string(), "1".to_owned()];
    argv.extend(rest.iter().map(|text| (*text).to_owned()));
    let reply: String = redis
        .fcall(name, allocator::keys::partition_keys(partition), argv)
        .await
        .expect("fcall");
    serde_json::from_str(&reply).expect("a JSON reply")
}

#[tokio::test]
async fn the_scripts_refuse_arguments_the_allocator_never_sends_and_change_nothing() {
    use fred::interfaces::HashesInterface;
    let allocator = allocator_for("test-node").await;
    let key = fresh_key();
    stock(&allocator, &key, 5).await;
    let cell = key.pool(PARTITIONS);
    let redis = raw_redis().await;

    // A hold-by time that is not a number is refused, not read as none.
    let id = allocator::keys::reservation_id(cell.partition, [7; 12]);
    let reply = fcall_raw(
        &allocator,
        "reserve_batch",
        cell.partition,
        serde_json::json!({ "partition": cell.partition, "node": "test-node", "cell": cell.id, "count": 1 }),
        &[&id, "1", "600000", "0", "", "", "soon", ""],
    )
    .await;
    assert_eq!(
        reply["answers"],
        serde_json::json!([["b", "hold_by_ms"]]),
        "{reply}"
    );
    // So is an allowance partition that is not one.
    let reply = fcall_raw(
        &allocator,
        "reserve_batch",
        cell.partition,
        serde_json::json!({ "partition": cell.partition, "node": "test-node", "cell": cell.id, "count": 1 }),
        &[&id, "1", "600000", "0", "", "", "", "p1"],
    )
    .await;
    assert_eq!(
        reply["answers"],
        serde_json::json!([["b", "allow_p"]]),
        "{reply}"
    );
    assert_eq!(pool(&allocator, &key).await.reserved, 0);

    // A claim's placement is all of cell, partition and reservation id, or
    // none of them.
    let digest = hex::encode([9u8; 32]);
    let claim_partition = 3;
    for partial in [
        serde_json::json!({ "reservation_id": id }),
        serde_json::json!({ "cell_partition": cell.partition }),
        serde_json::json!({ "cell": cell.id, "reservation_id": id }),
    ] {
        let mut args = serde_json::json!({
            "partition": claim_partition, "node": "test-node", "action": "open",
            "digest": digest, "fingerprint": "f", "lease_ms": 10_000, "life": "l1",
        });
        for (name, value) in partial.as_object().expect("fields") {
            args[name] = value.clone();
        }
        let reply = fcall_raw(&allocator, "claim", claim_partition, args, &[]).await;
        assert_eq!(reply["status"], "bad_argument", "{partial}: {reply}");
        let claims = &allocator::keys::partition_keys(claim_partition)[3];
        let record: Option<String> = redis
            .hget(claims, format!("c|{digest}"))
            .await
            .expect("claims");
        assert_eq!(record, None, "{partial}: nothing is recorded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skus_candidates_are_every_location_with_what_it_has_available_now() {
    let allocator = common::allocator_for("node-a").await;
    let sku = testkit::unique_id("candidates");
    let store = StockKey::new("m1", &sku, "store-12");
    let dc = StockKey::new("m1", &sku, "dc1");
    common::stock(&allocator, &store, 3).await;
    common::stock(&allocator, &dc, 40).await;
    allocator
        .reserve(&common::reserve(&dc, 5, &testkit::unique_id("hold")))
        .await
        .expect("hold");
    let settings = |location: &str| {
        if location == "store-12" {
            allocator::LocationSettings {
                priority: 10,
                ship_from: false,
            }
        } else {
            allocator::LocationSettings::default()
        }
    };
    let mut candidates = allocator
        .candidates("m1", &sku, &settings)
        .await
        .expect("candidates");
    candidates.sort_by(|a, b| a.location.cmp(&b.location));
    assert_eq!(
        candidates,
        vec![
            allocator::placement::Candidate {
                location: "dc1".to_owned(),
                available: 35,
                priority: 0,
                ship_from: true,
            },
            allocator::placement::Candidate {
                location: "store-12".to_owned(),
                available: 3,
                priority: 10,
                ship_from: false,
            },
        ]
    );
    // The rules over them: store-12 may not ship unless named.
    let prefer: Vec<String> = Vec::new();
    let plan = allocator::placement::place(
        &allocator::placement::Ask {
            qty: 2,
            prefer: &prefer,
            allow_split: false,
            allow_partial: false,
        },
        &candidates,
    );
    assert_eq!(plan.holds, vec![("dc1".to_owned(), 2)]);
}
