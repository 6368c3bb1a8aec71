//! A flash sale's customer limits on the stack's Redis: one customer racing
//! from two nodes never holds or buys more than the limit, whatever mix of
//! commits, releases and expiries follows; released and expired holds give
//! their units back, commits do not; a crash between a grant and its hold
//! is repaired, and a grant whose hold landed is not.

mod common;

use std::sync::Arc;
use std::time::Duration;

use allocator::{AllocatorError, CartLine, CartRequest, CustomerLimit, Reserver, StockKey};

/// Two reservers ("nodes") with `limit` in force.
async fn fleet(limit: &CustomerLimit) -> Vec<Arc<Reserver>> {
    let mut nodes = Vec::new();
    for node in ["node-a", "node-b"] {
        let reserver = common::reserver(common::allocator_for(node).await);
        reserver.set_customer_limits(vec![limit.clone()]);
        nodes.push(Arc::new(reserver));
    }
    nodes
}

fn limit(units_max: Option<u32>, holds_max: Option<u32>) -> CustomerLimit {
    let key = StockKey::new("m-limits", testkit::unique_id("sku"), "dc1");
    CustomerLimit::new(&testkit::unique_id("sale"), key, 0, 0, units_max, holds_max)
}

fn request(key: &StockKey, qty: u32, customer: Option<&str>, ttl: Option<Duration>) -> CartRequest {
    CartRequest {
        merchant: key.merchant.clone(),
        lines: vec![CartLine::at(&key.sku, &key.location, qty)],
        ttl,
        idempotency_key: testkit::unique_id("order"),
        customer_ref: customer.map(str::to_owned),
        allow_partial: false,
    }
}

/// Settles every note and repairs every grant older than the repair's
/// least delay, over every partition.
async fn finish_all(allocator: &allocator::Allocator) -> allocator::AllowancesFinished {
    let mut total = allocator::AllowancesFinished::default();
    for partition in 0..common::settings("x").partitions {
        let done = allocator
            .finish_allowances(partition, Duration::ZERO)
            .await
            .expect("finish");
        total.settled += done.settled;
        total.given_back += done.given_back;
    }
    total
}

async fn reserved(allocator: &allocator::Allocator, key: &StockKey) -> i64 {
    allocator
        .stock_view(key)
        .await
        .expect("view")
        .pool
        .expect("pool")
        .reserved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_racing_requests_of_one_customer_over_two_nodes_hold_at_most_the_limit() {
    let limit = limit(Some(2), None);
    let nodes = fleet(&limit).await;
    let allocator = nodes[0].allocator().clone();
    common::stock(&allocator, &limit.key, 1_000).await;
    let customer = testkit::unique_id("alice");

    let mut racers = Vec::new();
    for index in 0..50 {
        let node = Arc::clone(&nodes[index % 2]);
        let request = request(&limit.key, 1, Some(&customer), None);
        racers.push(tokio::spawn(async move { node.reserve(&request).await }));
    }
    let mut held = Vec::new();
    let mut refused = 0;
    for racer in racers {
        match racer.await.expect("racer") {
            Ok(hold) => held.push(hold.cart.reservation_id),
            Err(AllocatorError::CustomerLimit {
                limit,
                used,
                counts,
                ..
            }) => {
                assert_eq!((limit, counts.as_str()), (2, "units"));
                assert!(used <= 2, "{used}");
                refused += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!((held.len(), refused), (2, 48), "exactly the limit is held");
    assert_eq!(reserved(&allocator, &limit.key).await, 2);
    let counted: u64 = nodes
        .iter()
        .flat_map(|node| node.customer_limit_refusals())
        .map(|(_, count)| count)
        .sum();
    assert_eq!(counted, 48, "every refusal is counted");
    let allowance = allocator
        .customer_allowance(&limit, &customer)
        .await
        .expect("allowance");
    assert_eq!((allowance.units, allowance.holds), (2, 2));

    // Another customer is not held back by the first.
    let bob = nodes[1]
        .reserve(&request(&limit.key, 2, Some("bob"), None))
        .await
        .expect("bob holds");
    assert_eq!(bob.cart.lines[0].qty, 2);

    // A commit keeps its units counted: still at the limit.
    allocator
        .commit(None, &held[0], "commit-1")
        .await
        .expect("commit");
    let again = nodes[0]
        .reserve(&request(&limit.key, 1, Some(&customer), None))
        .await;
    assert!(
        matches!(again, Err(AllocatorError::CustomerLimit { used: 2, .. })),
        "{again:?}"
    );
    // A release gives its unit back at once, on the node that released it.
    allocator
        .release(None, &held[1], "release-1")
        .await
        .expect("release");
    let allowance = allocator
        .customer_allowance(&limit, &customer)
        .await
        .expect("allowance");
    assert_eq!(
        (allowance.units, allowance.holds),
        (1, 0),
        "units bought stay counted; holds ended do not"
    );
    // One more unit, held for a second: its expiry gives it back once the
    // reconciler settles the expiry's note.
    let short = nodes[1]
        .reserve(&request(
            &limit.key,
            1,
            Some(&customer),
            Some(Duration::from_secs(1)),
        ))
        .await
        .expect("the released unit's place");
    let over = nodes[0]
        .reserve(&request(&limit.key, 1, Some(&customer), None))
        .await;
    assert!(
        matches!(over, Err(AllocatorError::CustomerLimit { .. })),
        "{over:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let expired = allocator
        .reservation(None, &short.cart.reservation_id)
        .await
        .expect("reservation");
    assert_eq!(expired.status, allocator::ReservationStatus::Expired);
    tokio::time::sleep(allocator::NOTE_SETTLE_AFTER).await;
    let finished = finish_all(&allocator).await;
    assert!(finished.settled >= 1, "{finished:?}");
    let allowance = allocator
        .customer_allowance(&limit, &customer)
        .await
        .expect("allowance");
    assert_eq!((allowance.units, allowance.holds), (1, 0));
    nodes[0]
        .reserve(&request(&limit.key, 1, Some(&customer), None))
        .await
        .expect("the expired unit's place");
    // Settling again counts nothing twice.
    finish_all(&allocator).await;
    let allowance = allocator
        .customer_allowance(&limit, &customer)
        .await
        .expect("allowance");
    assert_eq!((allowance.units, allowance.holds), (2, 1));
    assert_eq!(
        reserved(&allocator, &limit.key).await,
        1 + 2,
        "alice's last hold and bob's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_held_request_takes_nothing_twice_and_a_refusal_is_remembered() {
    let limit = limit(Some(3), None);
    let nodes = fleet(&limit).await;
    let allocator = nodes[0].allocator().clone();
    common::stock(&allocator, &limit.key, 10).await;
    let first = request(&limit.key, 2, Some("carol"), None);
    let held = nodes[0].reserve(&first).await.expect("held");
    let again = nodes[1].reserve(&first).await.expect("replayed");
    assert!(again.replayed);
    assert_eq!(again.cart.reservation_id, held.cart.reservation_id);
    let allowance = allocator
        .customer_allowance(&limit, "carol")
        .await
        .expect("allowance");
    assert_eq!(allowance.units, 2, "the retry took nothing again");

    let greedy = request(&limit.key, 2, Some("carol"), None);
    let refusal = nodes[1].reserve(&greedy).await;
    assert!(
        matches!(
            refusal,
            Err(AllocatorError::CustomerLimit {
                limit: 3,
                used: 2,
                ..
            })
        ),
        "{refusal:?}"
    );
    // Once room is made, the same request is still the refusal it was.
    allocator
        .release(None, &held.cart.reservation_id, "make-room")
        .await
        .expect("release");
    let replay = nodes[0].reserve(&greedy).await;
    assert!(
        matches!(replay, Err(AllocatorError::CustomerLimit { .. })),
        "{replay:?}"
    );
    // A refused hold (no stock) gives its grant back at once.
    let too_many = request(&limit.key, 3, Some("carol"), None);
    allocator
        .adjust(&common::delta(&limit.key, -9, &testkit::unique_id("loss")))
        .await
        .expect("loss");
    let short = nodes[0].reserve(&too_many).await;
    assert!(
        matches!(short, Err(AllocatorError::InsufficientStock { .. })),
        "{short:?}"
    );
    let allowance = allocator
        .customer_allowance(&limit, "carol")
        .await
        .expect("allowance");
    assert_eq!((allowance.units, allowance.holds), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_at_once_are_limited_and_a_customer_ref_is_required() {
    let limit = limit(None, Some(1));
    let nodes = fleet(&limit).await;
    let allocator = nodes[0].allocator().clone();
    common::stock(&allocator, &limit.key, 10).await;
    let anonymous = nodes[0].reserve(&request(&limit.key, 1, None, None)).await;
    assert!(
        matches!(&anonymous, Err(AllocatorError::InvalidRequest(reason)) if reason.contains("customer_ref")),
        "{anonymous:?}"
    );
    let first = nodes[0]
        .reserve(&request(&limit.key, 5, Some("dave"), None))
        .await
        .expect("one hold");
    let second = nodes[1]
        .reserve(&request(&limit.key, 1, Some("dave"), None))
        .await;
    assert!(
        matches!(
            &second,
            Err(AllocatorError::CustomerLimit { limit: 1, used: 1, counts, .. }) if counts == "holds"
        ),
        "{second:?}"
    );
    allocator
        .commit(None, &first.cart.reservation_id, "buy")
        .await
        .expect("commit");
    nodes[1]
        .reserve(&request(&limit.key, 1, Some("dave"), None))
        .await
        .expect("a bought hold is no longer held");
    // A cart with the key counts one hold too.
    let other = StockKey::new("m-limits", testkit::unique_id("sku"), "dc1");
    common::stock(&allocator, &other, 10).await;
    let mut cart = request(&limit.key, 1, Some("dave"), None);
    cart.lines
        .push(CartLine::at(&other.sku, &other.location, 1));
    let refused = nodes[0].reserve(&cart).await;
    assert!(
        matches!(refused, Err(AllocatorError::CustomerLimit { .. })),
        "{refused:?}"
    );
    assert_eq!(
        reserved(&allocator, &other).await,
        0,
        "nothing of the cart held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_whose_hold_never_came_is_given_back_and_one_whose_hold_landed_is_not() {
    let limit = limit(Some(2), None);
    let nodes = fleet(&limit).await;
    let allocator = nodes[0].allocator().clone();
    common::stock(&allocator, &limit.key, 10).await;
    let customer = testkit::unique_id("erin");
    let hash = allocator.customer_hash(&customer);
    let partition = allocator.allowance_partition(&limit, &customer);
    let now_ms = allocator.redis_time_ms().await.expect("time");

    // A node took a grant and died before its hold: the limit is reached...
    let lost = allocator::keys::reservation_id(limit.key.pool(64).partition, [9; 12]);
    allocator
        .take_allowance(&limit, &hash, &lost, 2, now_ms + 60_000)
        .await
        .expect("grant");
    let blocked = nodes[0]
        .reserve(&request(&limit.key, 1, Some(&customer), None))
        .await;
    assert!(
        matches!(blocked, Err(AllocatorError::CustomerLimit { .. })),
        "{blocked:?}"
    );
    // ...and stays so while its caller's lease may still let the hold land.
    let early = allocator
        .finish_allowances(partition, Duration::ZERO)
        .await
        .expect("finish");
    assert_eq!(early.given_back, 0);

    // A lease long over: the repair finds no hold and gives it back.
    let dead = allocator::keys::reservation_id(limit.key.pool(64).partition, [8; 12]);
    let allocator_b = nodes[1].allocator();
    let other = testkit::unique_id("frank");
    let other_hash = allocator.customer_hash(&other);
    let other_partition = allocator.allowance_partition(&limit, &other);
    allocator_b
        .take_allowance(&limit, &other_hash, &dead, 2, now_ms - 60_000)
        .await
        .expect("grant");
    // A grant whose hold did land (staged as old the same way) is kept.
    let held = nodes[0]
        .reserve(&request(&limit.key, 1, Some(&other), None))
        .await;
    assert!(
        matches!(held, Err(AllocatorError::CustomerLimit { .. })),
        "the dead grant counts until repaired: {held:?}"
    );
    let repaired = allocator
        .finish_allowances(other_partition, Duration::ZERO)
        .await
        .expect("finish");
    assert_eq!(repaired.given_back, 1, "{repaired:?}");
    let held = nodes[0]
        .reserve(&request(&limit.key, 1, Some(&other), None))
        .await
        .expect("room again");
    let redis = common::raw_redis().await;
    {
        use fred::interfaces::HashesInterface;
        let field = format!("grant|{}", held.cart.reservation_id);
        let hash = format!("inv:{{{other_partition}}}:xfer");
        let _: i64 = redis
            .hset(
                &hash,
                (
                    field.as_str(),
                    format!(
                        "{{\"grant\":\"{}\",\"until_ms\":1,\"take\":1}}",
                        held.cart.reservation_id
                    )
                    .as_str(),
                ),
            )
            .await
            .expect("stage an old watch");
    }
    let kept = allocator
        .finish_allowances(other_partition, Duration::ZERO)
        .await
        .expect("finish");
    assert_eq!(kept.given_back, 0, "its hold is there: {kept:?}");
    let allowance = allocator
        .customer_allowance(&limit, &other)
        .await
        .expect("allowance");
    assert_eq!((allowance.units, allowance.holds), (1, 1));
}

/// Calls the allowance function of the library directly (what a stalled
/// caller's late call would be).
async fn allowance_call(
    allocator: &allocator::Allocator,
    partition: u32,
    mut args: serde_json::Value,
) -> serde_json::Value {
    use fred::interfaces::FunctionInterface;
    args["partition"] = serde_json::json!(partition);
    args["node"] = serde_json::json!("test-node");
    let redis = common::raw_redis().await;
    let name = allocator
        .function_name("allowance")
        .expect("the allowance function");
    let reply: String = redis
        .fcall(
            name,
            allocator::keys::partition_keys(partition),
            vec![args.to_string(), "1".to_owned()],
        )
        .await
        .expect("fcall");
    serde_json::from_str(&reply).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_give_back_never_matches_a_later_take_of_the_same_grant() {
    let limit = limit(Some(5), None);
    let allocator = common::allocator_for("node-a").await;
    let customer = testkit::unique_id("gina");
    let hash = allocator.customer_hash(&customer);
    let partition = allocator.allowance_partition(&limit, &customer);
    let grant = allocator::keys::reservation_id(limit.key.pool(64).partition, [7; 12]);
    let now_ms = allocator.redis_time_ms().await.expect("time");
    let first = allocator
        .take_allowance(&limit, &hash, &grant, 2, now_ms + 60_000)
        .await
        .expect("take");
    // Given back (its hold was refused), then taken again by a retry.
    let given = allowance_call(
        &allocator,
        partition,
        serde_json::json!({ "action": "give", "grant": grant, "take": first.take }),
    )
    .await;
    assert_eq!(given["given"], true, "{given}");
    let again = allocator
        .take_allowance(&limit, &hash, &grant, 2, now_ms + 60_000)
        .await
        .expect("take again");
    assert!(again.take > first.take, "{again:?} after {first:?}");
    // The first caller's late give-back matches nothing now.
    let stale = allowance_call(
        &allocator,
        partition,
        serde_json::json!({ "action": "give", "grant": grant, "take": first.take }),
    )
    .await;
    assert_eq!(stale["given"], false, "{stale}");
    let allowance = allocator
        .customer_allowance(&limit, &customer)
        .await
        .expect("allowance");
    assert_eq!((allowance.units, allowance.holds), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_from_the_sales_first_moment_whenever_the_config_was_read() {
    let key = StockKey::new("m-limits", testkit::unique_id("sku"), "dc1");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let limit = CustomerLimit::new(
        &testkit::unique_id("sale"),
        key.clone(),
        now_ms + 800,
        0,
        Some(2),
        None,
    );
    let nodes = fleet(&limit).await;
    let allocator = nodes[0].allocator().clone();
    common::stock(&allocator, &key, 100).await;
    // Before the start: not limited, no customer needed.
    for _ in 0..3 {
        nodes[0]
            .reserve(&request(&key, 1, None, None))
            .await
            .expect("before the sale");
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    // The limits were set once, before; the sale has started since.
    for _ in 0..2 {
        nodes[1]
            .reserve(&request(&key, 1, Some("hank"), None))
            .await
            .expect("within the limit");
    }
    let third = nodes[0]
        .reserve(&request(&key, 1, Some("hank"), None))
        .await;
    assert!(
        matches!(third, Err(AllocatorError::CustomerLimit { .. })),
        "{third:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_made_before_the_limit_is_answered_as_it_was_and_pays_nothing() {
    let limit = limit(Some(1), Some(1));
    let nodes = fleet(&limit).await;
    let allocator = nodes[0].allocator().clone();
    common::stock(&allocator, &limit.key, 10).await;
    let unlimited = common::reserver(allocator.clone());
    // Held before the limit, without a customer, then retried after it.
    let anonymous = request(&limit.key, 2, None, None);
    let first = unlimited.reserve(&anonymous).await.expect("held");
    let retry = nodes[0].reserve(&anonymous).await.expect("its answer");
    assert!(retry.replayed);
    assert_eq!(retry.cart.reservation_id, first.cart.reservation_id);

    // Held before the limit with a customer, retried after the claim's
    // lease (a takeover runs the attempt again): the hold is replayed, and
    // the grant the retry took goes back at once.
    let customer = testkit::unique_id("ivan");
    let known = request(&limit.key, 1, Some(&customer), None);
    let held = unlimited.reserve(&known).await.expect("held");
    lapse_claim_of(&held.cart.reservation_id).await;
    let retry = nodes[1].reserve(&known).await.expect("its answer");
    assert!(retry.replayed);
    assert_eq!(retry.cart.reservation_id, held.cart.reservation_id);
    let allowance = allocator
        .customer_allowance(&limit, &customer)
        .await
        .expect("allowance");
    assert_eq!(
        (allowance.units, allowance.holds),
        (0, 0),
        "the old hold pays nothing"
    );
    // A new request of the same customer is counted as usual.
    nodes[0]
        .reserve(&request(&limit.key, 1, Some(&customer), None))
        .await
        .expect("within the limit");
}

/// Makes the claim that placed `reservation_id` look abandoned (its lease
/// over), as if its caller had died: the next use takes it over.
async fn lapse_claim_of(reservation_id: &str) {
    use fred::interfaces::HashesInterface;
    let redis = common::raw_redis().await;
    for partition in 0..64 {
        let hash = format!("inv:{{{partition}}}:idem");
        let records: std::collections::HashMap<String, String> =
            redis.hgetall(&hash).await.expect("claims");
        for (field, record) in records {
            if field.starts_with("c|") && record.contains(reservation_id) {
                let mut claim: serde_json::Value = serde_json::from_str(&record).expect("claim");
                claim["lease_until_ms"] = serde_json::json!(0);
                let _: i64 = redis
                    .hset(&hash, (field.as_str(), claim.to_string().as_str()))
                    .await
                    .expect("lapse");
                return;
            }
        }
    }
    panic!("no claim placed {reservation_id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_ended_without_a_note_is_settled_from_its_status() {
    let limit = limit(Some(2), None);
    let nodes = fleet(&limit).await;
    let allocator = nodes[0].allocator().clone();
    common::stock(&allocator, &limit.key, 10).await;
    let customer = testkit::unique_id("judy");
    let held = nodes[0]
        .reserve(&request(&limit.key, 2, Some(&customer), None))
        .await
        .expect("held");
    let id = held.cart.reservation_id.clone();
    let partition = allocator.allowance_partition(&limit, &customer);
    let hold_partition = allocator::keys::reservation_partition(&id, 64).expect("partition");
    // Released by something that wrote no note (a rebuild, or a node of an
    // older release): staged as a release whose note is gone, and whose
    // settling the releasing node never got to.
    allocator
        .release(None, &id, "release")
        .await
        .expect("release");
    let redis = common::raw_redis().await;
    {
        use fred::interfaces::HashesInterface;
        // Undo the settling the release did (as if it never ran) and drop
        // the note.
        let grant_field = format!("g|{id}");
        let idem = format!("inv:{{{partition}}}:idem");
        let record: String = redis.hget(&idem, &grant_field).await.expect("grant");
        let mut grant: serde_json::Value = serde_json::from_str(&record).expect("grant json");
        grant["state"] = serde_json::json!("taken");
        let allowance_field = format!("a|{}", grant["allowance"].as_str().expect("allowance"));
        let _: i64 = redis
            .hset(
                &idem,
                [
                    (grant_field.as_str(), grant.to_string()),
                    (
                        allowance_field.as_str(),
                        r#"{"units":2,"holds":1}"#.to_owned(),
                    ),
                ],
            )
            .await
            .expect("stage");
        let _: i64 = redis
            .hset(
                format!("inv:{{{partition}}}:xfer"),
                (
                    format!("grant|{id}").as_str(),
                    format!(r#"{{"grant":"{id}","until_ms":1,"take":1}}"#).as_str(),
                ),
            )
            .await
            .expect("watch");
        let _: i64 = redis
            .hdel(
                format!("inv:{{{hold_partition}}}:xfer"),
                format!("allow|{id}"),
            )
            .await
            .expect("no note");
    }
    let before = allocator
        .customer_allowance(&limit, &customer)
        .await
        .expect("allowance");
    assert_eq!((before.units, before.holds), (2, 1), "staged");
    allocator
        .finish_allowances(partition, Duration::ZERO)
        .await
        .expect("finish");
    let after = allocator
        .customer_allowance(&limit, &customer)
        .await
        .expect("allowance");
    assert_eq!((after.units, after.holds), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowance_of_a_sale_with_no_end_is_kept_a_month_past_its_last_use() {
    use fred::interfaces::ClientLike;
    use fred::types::{ClusterHash, CustomCommand};
    let limit = limit(Some(2), None);
    let allocator = common::allocator_for("node-a").await;
    let customer = testkit::unique_id("kim");
    let hash = allocator.customer_hash(&customer);
    let partition = allocator.allowance_partition(&limit, &customer);
    let now_ms = allocator.redis_time_ms().await.expect("time");
    let grant = allocator::keys::reservation_id(limit.key.pool(64).partition, [5; 12]);
    allocator
        .take_allowance(&limit, &hash, &grant, 1, now_ms + 60_000)
        .await
        .expect("take");
    let redis = common::raw_redis().await;
    let member = format!("i|a|{}@0|{hash}", limit.sale);
    let gc = format!("inv:{{{partition}}}:gc");
    let score: Option<String> = redis
        .custom(
            CustomCommand::new_static("ZSCORE", ClusterHash::FirstKey, false),
            vec![gc.as_str(), member.as_str()],
        )
        .await
        .expect("score");
    let score: f64 = score
        .expect("its deletion is scheduled")
        .parse()
        .expect("a number");
    assert!(
        score >= (now_ms + 29 * 24 * 3600 * 1000) as f64,
        "{score} vs now {now_ms}"
    );
}

/// A flash sale's limit on a SKU applies when it is held as a substitute
/// for another: without a customer the request is refused, and a customer
/// gets no more than the limit through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_sku_held_as_a_substitute_is_limited_too() {
    let limit = limit(Some(1), None);
    let nodes = fleet(&limit).await;
    let key = &limit.key;
    common::stock(nodes[0].allocator(), key, 50).await;
    let short = StockKey::new(&key.merchant, testkit::unique_id("short"), "dc1");
    common::stock(nodes[0].allocator(), &short, 0).await;
    nodes[0]
        .allocator()
        .set_substitutes(
            &short.merchant,
            &short.sku,
            &[allocator::substitutes::Substitute {
                sku: key.sku.clone(),
                units: 1,
                replaces: 1,
            }],
        )
        .await
        .expect("substitutes");
    let line = |qty| CartLine {
        substitutes: true,
        ..CartLine::at(&short.sku, &short.location, qty)
    };
    let mut asked = request(&short, 5, None, None);
    asked.lines = vec![line(5)];
    let refused = nodes[0].reserve(&asked).await;
    assert!(
        matches!(&refused, Err(AllocatorError::InvalidRequest(reason)) if reason.contains("customer_ref")),
        "{refused:?}"
    );
    let mut asked = request(&short, 5, Some("buyer-1"), None);
    asked.lines = vec![line(5)];
    let limited = nodes[1].reserve(&asked).await;
    assert!(
        matches!(limited, Err(AllocatorError::CustomerLimit { .. })),
        "{limited:?}"
    );
    let mut asked = request(&short, 1, Some("buyer-1"), None);
    asked.lines = vec![line(1)];
    let held = nodes[0].reserve(&asked).await.expect("within the limit");
    assert_eq!(
        held.cart.lines[0].substitute_for.as_deref(),
        Some(short.sku.as_str())
    );
}
