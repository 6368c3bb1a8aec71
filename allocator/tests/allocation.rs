//! Lines whose location the allocator chooses, split lines and partial
//! holds, against the real Redis (API.md "Allocation").

mod common;

use common::*;

use std::collections::BTreeMap;
use std::sync::Arc;

use allocator::{
    Allocator, AllocatorError, CartLine, CartRequest, CartView, FlashSale, HotKey,
    LocationSettings, ReservationStatus, StockKey,
};

/// A merchant with one SKU stocked at the given locations.
async fn sku_at(allocator: &Allocator, stock_at: &[(&str, i64)]) -> (String, String) {
    let merchant = testkit::unique_id("alloc");
    let sku = "tee".to_owned();
    for (location, units) in stock_at {
        stock(
            allocator,
            &StockKey::new(&merchant, &sku, *location),
            *units,
        )
        .await;
    }
    (merchant, sku)
}

fn request(merchant: &str, lines: Vec<CartLine>, partial: bool) -> CartRequest {
    CartRequest {
        merchant: merchant.to_owned(),
        lines,
        ttl: None,
        idempotency_key: testkit::unique_id("k"),
        customer_ref: None,
        allow_partial: partial,
    }
}

fn line(sku: &str, qty: u32, prefer: &[&str], split: bool) -> CartLine {
    CartLine {
        prefer: prefer
            .iter()
            .map(|location| (*location).to_owned())
            .collect(),
        allow_split: split,
        ..CartLine::anywhere(sku, qty)
    }
}

/// `(location, qty, line)` of every hold.
fn holds(cart: &CartView) -> Vec<(String, u32, u32)> {
    cart.lines
        .iter()
        .map(|hold| (hold.location.clone(), hold.qty, hold.line))
        .collect()
}

/// Units reserved at each location (every cell of the key).
async fn reserved(allocator: &Allocator, merchant: &str, sku: &str) -> BTreeMap<String, i64> {
    allocator
        .sku_views(merchant, sku)
        .await
        .expect("views")
        .into_iter()
        .map(|(location, view)| {
            let reserved = view.pool.as_ref().map_or(0, |pool| pool.reserved)
                + view
                    .buckets
                    .iter()
                    .map(|(_, bucket)| bucket.reserved)
                    .sum::<i64>();
            (location, reserved)
        })
        .collect()
}

async fn release(allocator: &Allocator, merchant: &str, id: &str) {
    allocator
        .release_cart(Some(merchant), id, &testkit::unique_id("r"))
        .await
        .expect("release");
}

async fn place_one(
    allocator: &Allocator,
    merchant: &str,
    line: CartLine,
) -> Vec<(String, u32, u32)> {
    let hold = allocator
        .reserve_cart(&request(merchant, vec![line], false))
        .await
        .expect("held");
    let placed = holds(&hold.cart);
    release(allocator, merchant, &hold.cart.reservation_id).await;
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_of_location_choice_holds_on_the_real_store() {
    let allocator = allocator_for("alloc-node").await;
    let (merchant, sku) = sku_at(&allocator, &[("dc1", 10), ("dc2", 4), ("store-12", 6)]).await;
    let at = |location: &str, qty: u32| vec![(location.to_owned(), qty, 0)];

    // Most available, among locations that can hold it whole.
    assert_eq!(
        place_one(&allocator, &merchant, line(&sku, 3, &[], false)).await,
        at("dc1", 3)
    );
    // The line's preference first, even over a bigger one.
    assert_eq!(
        place_one(
            &allocator,
            &merchant,
            line(&sku, 3, &["dc2", "store-12"], false)
        )
        .await,
        at("dc2", 3)
    );
    // A preferred location that cannot hold it whole gives way to one that can.
    assert_eq!(
        place_one(
            &allocator,
            &merchant,
            line(&sku, 5, &["dc2", "store-12"], false)
        )
        .await,
        at("store-12", 5)
    );
    // The merchant's priority before most available.
    allocator
        .set_location_settings(
            &merchant,
            "store-12",
            LocationSettings {
                priority: 5,
                ship_from: true,
            },
        )
        .await
        .expect("settings");
    assert_eq!(
        place_one(&allocator, &merchant, line(&sku, 3, &[], false)).await,
        at("store-12", 3)
    );
    // A location that may not ship is chosen only when named.
    allocator
        .set_location_settings(
            &merchant,
            "store-12",
            LocationSettings {
                priority: 5,
                ship_from: false,
            },
        )
        .await
        .expect("settings");
    assert_eq!(
        place_one(&allocator, &merchant, line(&sku, 3, &[], false)).await,
        at("dc1", 3)
    );
    assert_eq!(
        place_one(&allocator, &merchant, line(&sku, 3, &["store-12"], false)).await,
        at("store-12", 3)
    );
    // A named location behaves as before.
    assert_eq!(
        place_one(&allocator, &merchant, CartLine::at(&sku, "dc2", 4)).await,
        at("dc2", 4)
    );
    // Nothing stays held.
    assert!(
        reserved(&allocator, &merchant, &sku)
            .await
            .values()
            .all(|units| *units == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_line_takes_what_each_location_has_and_acts_as_one() {
    let allocator = allocator_for("alloc-node").await;
    let (merchant, sku) = sku_at(&allocator, &[("dc1", 3), ("dc2", 4)]).await;

    // Without a split, 6 fits nowhere: nothing is held.
    let refused = allocator
        .reserve_cart(&request(&merchant, vec![line(&sku, 6, &[], false)], false))
        .await;
    let Err(AllocatorError::InsufficientStock { lines }) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(lines.len(), 1);
    assert_eq!(
        (
            lines[0].location.as_deref(),
            lines[0].line,
            lines[0].requested,
            lines[0].available
        ),
        (None, Some(0), 6, 4)
    );

    // Split: most available first.
    let split = request(&merchant, vec![line(&sku, 6, &[], true)], false);
    let hold = allocator.reserve_cart(&split).await.expect("held");
    assert_eq!(
        holds(&hold.cart),
        vec![("dc2".to_owned(), 4, 0), ("dc1".to_owned(), 2, 0)]
    );
    assert_eq!(
        reserved(&allocator, &merchant, &sku).await,
        BTreeMap::from([("dc1".to_owned(), 2), ("dc2".to_owned(), 4)])
    );
    // A retry is the same reservation, whatever the stock says now.
    stock(&allocator, &StockKey::new(&merchant, &sku, "dc1"), 100).await;
    let replay = allocator.reserve_cart(&split).await.expect("replay");
    assert!(replay.replayed);
    assert_eq!(replay.cart, hold.cart);
    // The same key with another body is refused.
    let mut other = split.clone();
    other.lines[0].allow_split = false;
    assert!(matches!(
        allocator.reserve_cart(&other).await,
        Err(AllocatorError::IdempotencyKeyReused)
    ));

    // Commit acts on every hold.
    let id = &hold.cart.reservation_id;
    let committed = allocator
        .commit_cart(Some(&merchant), id, &testkit::unique_id("c"))
        .await
        .expect("commit");
    assert_eq!(committed.status, ReservationStatus::Committed);
    let views = allocator.sku_views(&merchant, &sku).await.expect("views");
    let on_hand: BTreeMap<String, (i64, i64)> = views
        .into_iter()
        .map(|(location, view)| {
            let pool = view.pool.expect("pool");
            (location, (pool.on_hand, pool.reserved))
        })
        .collect();
    assert_eq!(
        on_hand,
        BTreeMap::from([("dc1".to_owned(), (101, 0)), ("dc2".to_owned(), (0, 0))])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_holds_what_can_be_held_and_refuses_only_when_nothing_can() {
    let allocator = allocator_for("alloc-node").await;
    let (merchant, sku) = sku_at(&allocator, &[("dc1", 3), ("dc2", 4)]).await;
    let other = StockKey::new(&merchant, "cap", "dc1");
    stock(&allocator, &other, 1).await;

    // A line that is not split takes what its best location has; a named
    // line takes what its location has.
    let hold = allocator
        .reserve_cart(&request(
            &merchant,
            vec![line(&sku, 10, &[], false), CartLine::at("cap", "dc1", 5)],
            true,
        ))
        .await
        .expect("partial");
    assert!(hold.cart.partial);
    assert_eq!(
        holds(&hold.cart),
        vec![("dc2".to_owned(), 4, 0), ("dc1".to_owned(), 1, 1)]
    );
    let unfilled: Vec<(u32, u32, u32)> = hold
        .cart
        .unfilled
        .iter()
        .map(|line| (line.line, line.requested, line.held))
        .collect();
    assert_eq!(unfilled, vec![(0, 10, 4), (1, 5, 1)]);
    // The record shows the same.
    let seen = allocator
        .cart(Some(&merchant), &hold.cart.reservation_id)
        .await
        .expect("get");
    assert_eq!(seen, hold.cart);

    // A split partial line takes the rest; a line with nothing anywhere
    // holds nothing and is listed.
    let hold = allocator
        .reserve_cart(&request(
            &merchant,
            vec![line(&sku, 10, &[], true), CartLine::at("cap", "dc1", 1)],
            true,
        ))
        .await
        .expect("partial");
    assert_eq!(holds(&hold.cart), vec![("dc1".to_owned(), 3, 0)]);
    let unfilled: Vec<(u32, u32, u32)> = hold
        .cart
        .unfilled
        .iter()
        .map(|line| (line.line, line.requested, line.held))
        .collect();
    assert_eq!(unfilled, vec![(0, 10, 3), (1, 1, 0)]);

    // Nothing at all: 409, nothing held.
    let refused = allocator
        .reserve_cart(&request(&merchant, vec![line(&sku, 1, &[], true)], true))
        .await;
    assert!(
        matches!(refused, Err(AllocatorError::InsufficientStock { .. })),
        "{refused:?}"
    );
    // Release returns every hold.
    release(&allocator, &merchant, &hold.cart.reservation_id).await;
    assert_eq!(
        reserved(&allocator, &merchant, &sku).await,
        BTreeMap::from([("dc1".to_owned(), 0), ("dc2".to_owned(), 4)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_or_nothing_with_a_short_line_holds_nothing() {
    let allocator = allocator_for("alloc-node").await;
    let (merchant, sku) = sku_at(&allocator, &[("dc1", 3), ("dc2", 4)]).await;
    let cap = StockKey::new(&merchant, "cap", "dc1");
    stock(&allocator, &cap, 5).await;
    let refused = allocator
        .reserve_cart(&request(
            &merchant,
            vec![CartLine::at("cap", "dc1", 2), line(&sku, 8, &[], true)],
            false,
        ))
        .await;
    let Err(AllocatorError::InsufficientStock { lines }) = refused else {
        panic!("{refused:?}")
    };
    let short: Vec<_> = lines
        .iter()
        .map(|line| (line.sku.as_str(), line.line, line.requested, line.available))
        .collect();
    assert_eq!(short, vec![("tee", Some(1), 8, 7)]);
    assert!(
        reserved(&allocator, &merchant, &sku)
            .await
            .values()
            .all(|units| *units == 0)
    );
    assert!(
        reserved(&allocator, &merchant, "cap")
            .await
            .values()
            .all(|units| *units == 0)
    );
}

/// Checkouts racing for the last units spread over two locations, each
/// line placed by the allocator from its own read: the scripts hold at
/// most what is there, and every unit promised is reserved in a cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_checkouts_for_the_last_units_over_two_locations_never_hold_more() {
    let nodes = [
        allocator_for("alloc-a").await,
        allocator_for("alloc-b").await,
    ];
    let (merchant, sku) = sku_at(&nodes[0], &[("dc1", 1), ("dc2", 2)]).await;
    let mut racers = Vec::new();
    for racer in 0..24 {
        let allocator = nodes[racer % 2].clone();
        let request = request(
            &merchant,
            vec![line(&sku, 1 + (racer % 2) as u32, &[], racer % 3 == 0)],
            racer % 4 == 0,
        );
        racers.push(tokio::spawn(async move {
            allocator.reserve_cart(&request).await
        }));
    }
    let mut held = 0;
    for racer in racers {
        match racer.await.expect("racer") {
            Ok(hold) => {
                held += hold
                    .cart
                    .lines
                    .iter()
                    .map(|hold| i64::from(hold.qty))
                    .sum::<i64>()
            }
            Err(AllocatorError::InsufficientStock { .. }) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
    let reserved = reserved(&nodes[0], &merchant, &sku).await;
    assert!(held <= 3, "held {held} of 3");
    assert_eq!(reserved.values().sum::<i64>(), held, "{reserved:?}");
    assert!(reserved["dc1"] <= 1 && reserved["dc2"] <= 2, "{reserved:?}");
}

/// A flash-sale key takes part: its buckets count for its location, and a
/// line placed there holds in this node's bucket through the hot path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_location_is_chosen_by_its_buckets_and_held_in_them() {
    let node = allocator_for("alloc-hot-a").await;
    let (merchant, sku) = sku_at(&node, &[("dc1", 20), ("dc2", 5)]).await;
    let sale = FlashSale {
        name: testkit::unique_id("sale"),
        key: StockKey::new(&merchant, &sku, "dc1"),
        nodes: vec!["alloc-hot-a".to_owned(), "alloc-hot-b".to_owned()],
        presplit_fraction: 0.5,
        refill_chunk_units_min: 1,
        refill_chunk_units_max: 10,
        buckets: Default::default(),
    };
    node.activate(&sale, "e1").await.expect("activate");
    let hot = Arc::new(HotKey::new(sale.clone(), "e1".to_owned()));
    let hold = node
        .reserve_cart_hot(
            &[&hot],
            &request(&merchant, vec![line(&sku, 12, &[], false)], false),
        )
        .await
        .expect("held");
    assert_eq!(holds(&hold.cart), vec![("dc1".to_owned(), 12, 0)]);
    let view = node
        .stock_view(&StockKey::new(&merchant, &sku, "dc1"))
        .await
        .expect("view");
    let in_buckets: i64 = view.buckets.iter().map(|(_, bucket)| bucket.reserved).sum();
    assert_eq!(in_buckets, 12, "held in the buckets: {view:?}");
    release(&node, &merchant, &hold.cart.reservation_id).await;
    assert_eq!(
        reserved(&node, &merchant, &sku).await,
        BTreeMap::from([("dc1".to_owned(), 0), ("dc2".to_owned(), 0)])
    );
}

/// A caller that died after its holds landed and before its cart: the
/// caller that takes the claim over runs the plan the claim recorded (the
/// same holds), not a fresh one, though a fresh read would now place the
/// line elsewhere. Without the recorded plan the line would be held twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_runs_the_recorded_plan_and_never_holds_twice() {
    let allocator = allocator_for("alloc-node").await;
    let (merchant, sku) = sku_at(&allocator, &[("dc1", 3), ("dc2", 4)]).await;
    let split = request(&merchant, vec![line(&sku, 6, &[], true)], false);
    let first = allocator.reserve_cart(&split).await.expect("held");
    let cart_id = first.cart.reservation_id.clone();

    // Undo the end of the request: its claim pending with a lapsed lease,
    // its cart record gone (the caller died between its holds and its cart).
    let claim = undo_the_end(&allocator, &split, &cart_id, |_| {}).await;
    assert!(
        claim["plan"].is_string(),
        "the claim records the plan: {claim}"
    );
    // A fresh read would now place the whole line at dc3.
    stock(&allocator, &StockKey::new(&merchant, &sku, "dc3"), 50).await;

    let retry = allocator.reserve_cart(&split).await.expect("taken over");
    assert!(retry.replayed);
    assert_eq!(holds(&retry.cart), holds(&first.cart));
    assert_eq!(
        reserved(&allocator, &merchant, &sku).await,
        BTreeMap::from([
            ("dc1".to_owned(), 2),
            ("dc2".to_owned(), 4),
            ("dc3".to_owned(), 0)
        ]),
        "held once"
    );
    let again = allocator.reserve_cart(&split).await.expect("replay");
    assert_eq!(again.cart, retry.cart);
}

/// Undoes the end of `request`, answered as `cart_id`: its claim pending
/// with a lapsed lease (after `edit` of its plan), its cart record gone, as
/// a caller that died between its holds and its cart leaves them. The
/// claim as it was.
async fn undo_the_end(
    allocator: &Allocator,
    request: &CartRequest,
    cart_id: &str,
    edit: impl FnOnce(&mut Vec<serde_json::Value>),
) -> serde_json::Value {
    use fred::prelude::*;
    let redis = raw_redis().await;
    let partition = allocator.request_partition(&request.merchant, &request.idempotency_key);
    let claims = format!("inv:{{{partition}}}:idem");
    let records: std::collections::HashMap<String, String> =
        redis.hgetall(&claims).await.expect("claims");
    let (field, claim) = records
        .into_iter()
        .filter(|(field, _)| field.starts_with("c|"))
        .map(|(field, text)| {
            (
                field,
                serde_json::from_str::<serde_json::Value>(&text).expect("json"),
            )
        })
        .find(|(_, claim)| {
            claim["reply"]
                .as_str()
                .is_some_and(|reply| reply.contains(cart_id))
        })
        .expect("the request's claim");
    let mut edited = claim.clone();
    let mut plan: Vec<serde_json::Value> =
        serde_json::from_str(claim["plan"].as_str().unwrap_or("[]")).expect("plan");
    edit(&mut plan);
    edited["plan"] = serde_json::Value::String(serde_json::to_string(&plan).expect("plan"));
    edited["state"] = "pending".into();
    edited["lease_until_ms"] = 0.into();
    edited.as_object_mut().expect("object").remove("reply");
    let _: i64 = redis
        .hset(&claims, (field.as_str(), edited.to_string()))
        .await
        .expect("edit the claim");
    let _: i64 = redis
        .hdel(format!("inv:{{{partition}}}:res"), cart_id)
        .await
        .expect("lose the cart");
    claim
}

/// A hold refused when first run and planned again elsewhere is marked so
/// in the plan the claim records; a caller that takes the claim over does
/// not run it again (it could hold now, on top of what replaced it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_does_not_run_again_a_hold_that_was_refused_and_replaced() {
    let allocator = allocator_for("alloc-node").await;
    let (merchant, sku) = sku_at(&allocator, &[("dc1", 3), ("dc2", 4)]).await;
    let split = request(&merchant, vec![line(&sku, 6, &[], true)], false);
    let first = allocator.reserve_cart(&split).await.expect("held");
    let cart_id = first.cart.reservation_id.clone();
    // The dead caller's plan began with 6 at dc3, refused then (dc3 had
    // none), replaced by the two holds it made; dc3 has 50 now.
    let dc3 = StockKey::new(&merchant, &sku, "dc3").pool(PARTITIONS);
    undo_the_end(&allocator, &split, &cart_id, |plan| {
        let mut refused = plan[0].clone();
        refused["location"] = "dc3".into();
        refused["cell"] = dc3.id.clone().into();
        refused["partition"] = dc3.partition.into();
        refused["qty"] = 6.into();
        refused["reservation_id"] = allocator::keys::reservation_id(dc3.partition, [7; 12]).into();
        refused["refused"] = true.into();
        plan.insert(0, refused);
    })
    .await;
    stock(&allocator, &StockKey::new(&merchant, &sku, "dc3"), 50).await;

    let retry = allocator.reserve_cart(&split).await.expect("taken over");
    assert_eq!(holds(&retry.cart), holds(&first.cart));
    assert_eq!(
        reserved(&allocator, &merchant, &sku).await,
        BTreeMap::from([
            ("dc1".to_owned(), 2),
            ("dc2".to_owned(), 4),
            ("dc3".to_owned(), 0)
        ]),
        "the refused hold was not run again"
    );
}

/// An answer stored before allocation (its holds without `line`) is
/// replayed, its holds numbered by their request lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stored_before_allocation_is_replayed_with_its_lines_numbered() {
    use fred::prelude::*;
    let allocator = allocator_for("alloc-node").await;
    let (merchant, sku) = sku_at(&allocator, &[("dc1", 3), ("dc2", 4)]).await;
    let cart = request(
        &merchant,
        vec![CartLine::at(&sku, "dc1", 1), CartLine::at(&sku, "dc2", 2)],
        false,
    );
    let first = allocator.reserve_cart(&cart).await.expect("held");
    let redis = raw_redis().await;
    let partition = allocator.request_partition(&merchant, &cart.idempotency_key);
    let claims = format!("inv:{{{partition}}}:idem");
    let records: std::collections::HashMap<String, String> =
        redis.hgetall(&claims).await.expect("claims");
    let (field, mut claim) = records
        .into_iter()
        .map(|(field, text)| {
            (
                field,
                serde_json::from_str::<serde_json::Value>(&text).expect("json"),
            )
        })
        .find(|(_, claim)| {
            claim["reply"]
                .as_str()
                .is_some_and(|reply| reply.contains(&first.cart.reservation_id))
        })
        .expect("the request's claim");
    let mut reply: serde_json::Value =
        serde_json::from_str(claim["reply"].as_str().expect("reply")).expect("json");
    for hold in reply["cart"]["lines"].as_array_mut().expect("lines") {
        hold.as_object_mut().expect("hold").remove("line");
    }
    for field in ["partial", "unfilled"] {
        reply["cart"].as_object_mut().expect("cart").remove(field);
    }
    claim["reply"] = reply.to_string().into();
    let _: i64 = redis
        .hset(&claims, (field.as_str(), claim.to_string()))
        .await
        .expect("edit the claim");
    let replay = allocator.reserve_cart(&cart).await.expect("replay");
    assert!(replay.replayed);
    assert_eq!(replay.cart, first.cart);
}

/// Substitutes fill a short line with whole groups, in the merchant's
/// order, exactly or not at all (unless partial), and each hold says what
/// it stands in for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn substitutes_fill_whole_groups_in_order_and_never_less_than_asked() {
    use allocator::substitutes::Substitute;
    let allocator = allocator_for("alloc-node").await;
    let merchant = testkit::unique_id("subs");
    for (sku, units) in [("six-pack", 3), ("twelve-pack", 1), ("can", 20)] {
        stock(&allocator, &StockKey::new(&merchant, sku, "dc1"), units).await;
    }
    let substitute = |sku: &str, units, replaces| Substitute {
        sku: sku.to_owned(),
        units,
        replaces,
    };
    // Checked: not itself, not twice, groups of 1 to 1000.
    for bad in [
        vec![substitute("six-pack", 1, 1)],
        vec![substitute("can", 6, 1), substitute("can", 1, 1)],
        vec![substitute("can", 0, 1)],
        vec![],
    ] {
        assert!(matches!(
            allocator.set_substitutes(&merchant, "six-pack", &bad).await,
            Err(AllocatorError::InvalidRequest(_))
        ));
    }
    allocator
        .set_substitutes(
            &merchant,
            "six-pack",
            &[substitute("twelve-pack", 1, 2), substitute("can", 6, 1)],
        )
        .await
        .expect("set");
    assert_eq!(
        allocator
            .substitutes(&merchant, "six-pack")
            .await
            .expect("get")
            .map(|list| list.len()),
        Some(2)
    );
    let with_substitutes = |qty, location: Option<&str>| CartLine {
        location: location.map(str::to_owned),
        substitutes: true,
        ..CartLine::anywhere("six-pack", qty)
    };
    let shown = |cart: &CartView| -> Vec<(String, u32, Option<String>, Option<u32>)> {
        cart.lines
            .iter()
            .map(|hold| {
                (
                    hold.sku.clone(),
                    hold.qty,
                    hold.substitute_for.clone(),
                    hold.stands_for,
                )
            })
            .collect()
    };

    // Without substitutes, 6 is short.
    assert!(matches!(
        allocator
            .reserve_cart(&request(
                &merchant,
                vec![CartLine::at("six-pack", "dc1", 6)],
                false
            ))
            .await,
        Err(AllocatorError::InsufficientStock { .. })
    ));
    // With them: its own 3, one twelve-pack for 2, six cans for the last 1.
    let hold = allocator
        .reserve_cart(&request(
            &merchant,
            vec![with_substitutes(6, Some("dc1"))],
            false,
        ))
        .await
        .expect("filled");
    let six = Some("six-pack".to_owned());
    assert_eq!(
        shown(&hold.cart),
        vec![
            ("six-pack".to_owned(), 3, None, None),
            ("twelve-pack".to_owned(), 1, six.clone(), Some(2)),
            ("can".to_owned(), 6, six.clone(), Some(1)),
        ]
    );

    // 4 more: only 14 cans left, two groups of six for 2: not exact, so
    // short, with what could be filled; nothing held.
    let refused = allocator
        .reserve_cart(&request(&merchant, vec![with_substitutes(4, None)], false))
        .await;
    let Err(AllocatorError::InsufficientStock { lines }) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!((lines[0].requested, lines[0].available), (4, 2));
    let cans = allocator
        .cell(&StockKey::new(&merchant, "can", "dc1").pool(PARTITIONS))
        .await
        .expect("read")
        .expect("cell");
    assert_eq!(cans.reserved, 6, "nothing more held");
    // Partial: the two whole groups.
    let partial = allocator
        .reserve_cart(&request(&merchant, vec![with_substitutes(4, None)], true))
        .await
        .expect("partial");
    assert_eq!(
        shown(&partial.cart),
        vec![("can".to_owned(), 12, six.clone(), Some(2))]
    );
    assert_eq!(
        partial
            .cart
            .unfilled
            .iter()
            .map(|line| (line.requested, line.held))
            .collect::<Vec<_>>(),
        vec![(4, 2)]
    );

    // Commit sells every hold of the fill.
    allocator
        .commit_cart(
            Some(&merchant),
            &hold.cart.reservation_id,
            &testkit::unique_id("c"),
        )
        .await
        .expect("commit");
    for (sku, on_hand) in [("six-pack", 0), ("twelve-pack", 0), ("can", 14)] {
        let cell = allocator
            .cell(&StockKey::new(&merchant, sku, "dc1").pool(PARTITIONS))
            .await
            .expect("read")
            .expect("cell");
        assert_eq!(cell.on_hand, on_hand, "{sku}");
    }
    assert!(
        allocator
            .delete_substitutes(&merchant, "six-pack")
            .await
            .expect("delete")
    );
    assert_eq!(
        allocator
            .substitutes(&merchant, "six-pack")
            .await
            .expect("get"),
        None
    );
}

/// Lines that name their location are planned first: a substitute never
/// takes the units another line of the cart names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_substitute_leaves_what_a_named_line_of_the_cart_takes() {
    use allocator::substitutes::Substitute;
    let allocator = allocator_for("alloc-node").await;
    let merchant = testkit::unique_id("subs");
    for (sku, units) in [("a", 0), ("b", 2), ("c", 2)] {
        stock(&allocator, &StockKey::new(&merchant, sku, "dc1"), units).await;
    }
    let one_for_one = |sku: &str| Substitute {
        sku: sku.to_owned(),
        units: 1,
        replaces: 1,
    };
    allocator
        .set_substitutes(&merchant, "a", &[one_for_one("b"), one_for_one("c")])
        .await
        .expect("set");
    let cart = request(
        &merchant,
        vec![
            CartLine {
                substitutes: true,
                ..CartLine::at("a", "dc1", 2)
            },
            CartLine::at("b", "dc1", 2),
        ],
        false,
    );
    let hold = allocator.reserve_cart(&cart).await.expect("held");
    let held: Vec<(String, u32)> = hold
        .cart
        .lines
        .iter()
        .map(|hold| (hold.sku.clone(), hold.qty))
        .collect();
    assert_eq!(held, vec![("c".to_owned(), 2), ("b".to_owned(), 2)]);
}
