//! Multi-line reservations, all or nothing, against the real Redis.

mod common;

use common::*;

use std::time::Duration;

use allocator::{Allocator, AllocatorError, CartLine, CartRequest, ReservationStatus, StockKey};

async fn reserved(allocator: &Allocator, key: &StockKey) -> (i64, i64) {
    let cell = allocator
        .cell(&key.pool(PARTITIONS))
        .await
        .expect("read")
        .expect("cell");
    (cell.on_hand, cell.reserved)
}

struct Shop {
    merchant: String,
    shirt: StockKey,
    shoes: StockKey,
    hat: StockKey,
}

async fn shop(allocator: &Allocator, shirts: i64, shoes: i64, hats: i64) -> Shop {
    let merchant = testkit::unique_id("m");
    let shop = Shop {
        shirt: StockKey::new(&merchant, "shirt", "dc1"),
        shoes: StockKey::new(&merchant, "shoes", "dc2"),
        hat: StockKey::new(&merchant, "hat", "dc1"),
        merchant,
    };
    stock(allocator, &shop.shirt, shirts).await;
    stock(allocator, &shop.shoes, shoes).await;
    stock(allocator, &shop.hat, hats).await;
    shop
}

fn cart(shop: &Shop, lines: &[(&StockKey, u32)], key: &str) -> CartRequest {
    CartRequest {
        merchant: shop.merchant.clone(),
        lines: lines
            .iter()
            .map(|(stock_key, qty)| CartLine::at(&stock_key.sku, &stock_key.location, *qty))
            .collect(),
        ttl: None,
        idempotency_key: key.to_owned(),
        customer_ref: Some("customer-42".to_owned()),
        allow_partial: false,
    }
}

#[tokio::test]
async fn a_cart_with_short_lines_holds_nothing_and_names_every_short_line() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 5, 1, 0).await;
    let request = cart(
        &shop,
        &[(&shop.shirt, 2), (&shop.shoes, 3), (&shop.hat, 1)],
        "k1",
    );

    let refused = allocator.reserve_cart(&request).await;
    let Err(AllocatorError::InsufficientStock { lines }) = refused else {
        panic!("refused: {refused:?}")
    };
    let short: Vec<_> = lines
        .iter()
        .map(|line| (line.sku.as_str(), line.requested, line.available))
        .collect();
    assert_eq!(short, [("shoes", 3, 1), ("hat", 1, 0)]);
    assert_eq!(
        reserved(&allocator, &shop.shirt).await,
        (5, 0),
        "the held line was released"
    );

    // A retry with the same key gets the same answer, even after a restock.
    stock(&allocator, &shop.shoes, 10).await;
    let retry = allocator.reserve_cart(&request).await;
    assert!(
        matches!(retry, Err(AllocatorError::InsufficientStock { .. })),
        "{retry:?}"
    );
    assert_eq!(reserved(&allocator, &shop.shirt).await, (5, 0));
}

#[tokio::test]
async fn a_cart_is_held_committed_and_replayed_as_one() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 5, 4, 0).await;
    let request = cart(&shop, &[(&shop.shirt, 2), (&shop.shoes, 3)], "k2");

    let hold = allocator.reserve_cart(&request).await.expect("held");
    assert!(!hold.replayed);
    assert_eq!(hold.cart.status, ReservationStatus::Held);
    assert_eq!(hold.cart.lines.len(), 2);
    let replay = allocator.reserve_cart(&request).await.expect("replay");
    assert!(replay.replayed);
    assert_eq!(replay.cart, hold.cart);
    assert_eq!(reserved(&allocator, &shop.shirt).await, (5, 2));
    assert_eq!(reserved(&allocator, &shop.shoes).await, (4, 3));

    let mut other_body = request.clone();
    other_body.lines[0].qty = 1;
    let reused = allocator.reserve_cart(&other_body).await;
    assert!(
        matches!(reused, Err(AllocatorError::IdempotencyKeyReused)),
        "{reused:?}"
    );

    let id = hold.cart.reservation_id.clone();
    let seen = allocator
        .cart(Some(&shop.merchant), &id)
        .await
        .expect("get");
    assert_eq!(seen, hold.cart);
    assert!(matches!(
        allocator.cart(Some("other-merchant"), &id).await,
        Err(AllocatorError::NotFound)
    ));

    let committed = allocator
        .commit_cart(Some(&shop.merchant), &id, "c1")
        .await
        .expect("commit");
    assert_eq!(committed.status, ReservationStatus::Committed);
    assert_eq!(reserved(&allocator, &shop.shirt).await, (3, 0));
    assert_eq!(reserved(&allocator, &shop.shoes).await, (1, 0));
    let again = allocator
        .commit_cart(Some(&shop.merchant), &id, "c2")
        .await
        .expect("commit again");
    assert_eq!(again.status, ReservationStatus::Committed);
    assert_eq!(
        reserved(&allocator, &shop.shirt).await,
        (3, 0),
        "committed once"
    );
    let release = allocator
        .release_cart(Some(&shop.merchant), &id, "r1")
        .await;
    assert!(matches!(
        release,
        Err(AllocatorError::NotHeld {
            status: ReservationStatus::Committed
        })
    ));
}

#[tokio::test]
async fn a_released_cart_returns_every_line() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 5, 4, 3).await;
    let request = cart(
        &shop,
        &[(&shop.shirt, 1), (&shop.shoes, 1), (&shop.hat, 1)],
        "k3",
    );
    let id = allocator
        .reserve_cart(&request)
        .await
        .expect("held")
        .cart
        .reservation_id;
    let extended = allocator
        .extend_cart(None, &id, Duration::from_secs(1800))
        .await
        .expect("extend");
    assert_eq!(extended.status, ReservationStatus::Held);

    let released = allocator
        .release_cart(None, &id, "r")
        .await
        .expect("release");
    assert_eq!(released.status, ReservationStatus::Released);
    for key in [&shop.shirt, &shop.shoes, &shop.hat] {
        assert_eq!(reserved(&allocator, key).await.1, 0);
    }
    let again = allocator
        .release_cart(None, &id, "r2")
        .await
        .expect("release again is fine");
    assert_eq!(again.status, ReservationStatus::Released);
    let commit = allocator.commit_cart(None, &id, "c").await;
    assert!(matches!(
        commit,
        Err(AllocatorError::NotHeld {
            status: ReservationStatus::Released
        })
    ));
}

#[tokio::test]
async fn an_expired_cart_cannot_be_committed_and_its_lines_expire_after_the_grace() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 5, 4, 0).await;
    let mut request = cart(&shop, &[(&shop.shirt, 2), (&shop.shoes, 1)], "k4");
    request.ttl = Some(Duration::from_secs(1));
    let id = allocator
        .reserve_cart(&request)
        .await
        .expect("held")
        .cart
        .reservation_id;
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let commit = allocator.commit_cart(None, &id, "late").await;
    assert!(
        matches!(
            commit,
            Err(AllocatorError::NotHeld {
                status: ReservationStatus::Expired
            })
        ),
        "{commit:?}"
    );
    assert_eq!(
        allocator.cart(None, &id).await.expect("get").status,
        ReservationStatus::Expired
    );
    assert_eq!(
        reserved(&allocator, &shop.shirt).await.1,
        2,
        "lines hold through the grace"
    );

    tokio::time::sleep(Duration::from_millis(2_200)).await;
    for key in [&shop.shirt, &shop.shoes] {
        allocator
            .expire_due(key.pool(PARTITIONS).partition, 1000)
            .await
            .expect("sweep");
        assert_eq!(
            reserved(&allocator, key).await,
            (if key == &shop.shirt { 5 } else { 4 }, 0)
        );
    }
}

#[tokio::test]
async fn a_cart_decided_by_a_node_that_died_is_finished_by_the_reconciler() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 5, 4, 0).await;
    let request = cart(&shop, &[(&shop.shirt, 2), (&shop.shoes, 1)], "k5");
    let id = allocator
        .reserve_cart(&request)
        .await
        .expect("held")
        .cart
        .reservation_id;

    let decided = allocator
        .decide_cart(None, &id, true)
        .await
        .expect("decide");
    assert_eq!(
        decided.status,
        ReservationStatus::Committed,
        "the decision is final"
    );
    assert_eq!(
        reserved(&allocator, &shop.shirt).await,
        (5, 2),
        "lines not applied yet"
    );

    let partition = allocator::keys::reservation_partition(&id, PARTITIONS).expect("partition");
    let finished = allocator
        .finish_carts(partition, Duration::ZERO)
        .await
        .expect("finish");
    assert!(finished >= 1);
    assert_eq!(reserved(&allocator, &shop.shirt).await, (3, 0));
    assert_eq!(reserved(&allocator, &shop.shoes).await, (3, 0));
    let again = allocator
        .finish_carts(partition, Duration::ZERO)
        .await
        .expect("finish again");
    assert_eq!(again, 0);
    assert_eq!(
        reserved(&allocator, &shop.shirt).await,
        (3, 0),
        "applied once"
    );
}

#[tokio::test]
async fn bad_carts_are_refused_before_anything_is_held() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 5, 4, 0).await;
    let empty = cart(&shop, &[], "k6");
    assert!(matches!(
        allocator.reserve_cart(&empty).await,
        Err(AllocatorError::InvalidRequest(_))
    ));
    let twice = cart(&shop, &[(&shop.shirt, 1), (&shop.shirt, 2)], "k7");
    assert!(matches!(
        allocator.reserve_cart(&twice).await,
        Err(AllocatorError::InvalidRequest(_))
    ));
    let zero = cart(&shop, &[(&shop.shirt, 0), (&shop.shoes, 1)], "k8");
    assert!(matches!(
        allocator.reserve_cart(&zero).await,
        Err(AllocatorError::InvalidRequest(_))
    ));
    assert_eq!(
        reserved(&allocator, &shop.shoes).await,
        (4, 0),
        "nothing held"
    );
}

#[tokio::test]
async fn an_expired_cart_is_refused_even_behind_a_backlog_of_due_holds() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 5, 4, 0).await;
    let mut request = cart(&shop, &[(&shop.shirt, 1), (&shop.shoes, 1)], "backlog-cart");
    request.ttl = Some(Duration::from_secs(1));
    // The cart record's partition (its request's): fill it first with 200
    // short holds, so they all fall due before the cart does.
    let partition = allocator.request_partition(&shop.merchant, &request.idempotency_key);
    let mut made = 0;
    let mut n = 0;
    while made < 200 {
        n += 1;
        let key = StockKey::new(&shop.merchant, format!("filler-{n}"), "dc1");
        if key.partition(PARTITIONS) != partition {
            continue;
        }
        stock(&allocator, &key, 1).await;
        let mut hold = reserve(&key, 1, &format!("filler-{n}"));
        hold.ttl = Some(Duration::from_secs(1));
        allocator.reserve(&hold).await.expect("filler hold");
        made += 1;
    }
    let id = allocator
        .reserve_cart(&request)
        .await
        .expect("held")
        .cart
        .reservation_id;
    assert_eq!(
        allocator::keys::reservation_partition(&id, PARTITIONS),
        Some(partition)
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let commit = allocator.commit_cart(None, &id, "late").await;
    assert!(
        matches!(
            commit,
            Err(AllocatorError::NotHeld {
                status: ReservationStatus::Expired
            })
        ),
        "{commit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_line_key_that_looks_like_a_cart_line_key_is_its_own_order() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 5, 4, 0).await;
    let carted = allocator
        .reserve_cart(&cart(&shop, &[(&shop.shirt, 1), (&shop.shoes, 1)], "K"))
        .await
        .expect("cart");
    // The old line keys were the cart's key plus `#index`.
    let single = allocator
        .reserve_cart(&cart(&shop, &[(&shop.shoes, 1)], "K#1"))
        .await
        .expect("one line");
    assert!(!single.replayed, "a new order, not the cart's line");
    assert_ne!(single.cart.reservation_id, carted.cart.reservation_id);
    assert_eq!(reserved(&allocator, &shop.shoes).await, (4, 2));
    allocator
        .release_cart(None, &carted.cart.reservation_id, "release-K")
        .await
        .expect("release the cart");
    assert_eq!(
        reserved(&allocator, &shop.shoes).await,
        (4, 1),
        "the other order is still held"
    );
    let view = allocator
        .cart(None, &single.cart.reservation_id)
        .await
        .expect("the one-line order exists");
    assert_eq!(view.status, ReservationStatus::Held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_remembered_like_a_success() {
    let allocator = allocator_for("cart-node").await;
    let shop = shop(&allocator, 1, 1, 0).await;
    let request = cart(&shop, &[(&shop.shirt, 2)], "too-many");
    let first = allocator.reserve_cart(&request).await;
    assert!(
        matches!(first, Err(AllocatorError::InsufficientStock { .. })),
        "{first:?}"
    );
    stock(&allocator, &shop.shirt, 10).await;
    let again = allocator.reserve_cart(&request).await;
    assert!(
        matches!(again, Err(AllocatorError::InsufficientStock { .. })),
        "the same key and body get the same answer: {again:?}"
    );
    assert_eq!(reserved(&allocator, &shop.shirt).await, (11, 0));
    let other_body = allocator
        .reserve_cart(&cart(&shop, &[(&shop.shirt, 1)], "too-many"))
        .await;
    assert!(
        matches!(other_body, Err(AllocatorError::IdempotencyKeyReused)),
        "{other_body:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_retried_on_another_node_returns_the_original_hold() {
    let node_a = allocator_for("node-a").await;
    let node_b = allocator_for("node-b").await;
    let shop = shop(&node_a, 5, 4, 0).await;
    for request in [
        cart(&shop, &[(&shop.shirt, 2)], "retry-one"),
        cart(&shop, &[(&shop.shirt, 1), (&shop.shoes, 1)], "retry-cart"),
    ] {
        let first = node_a.reserve_cart(&request).await.expect("first");
        let retry = node_b.reserve_cart(&request).await.expect("retry");
        assert!(retry.replayed);
        assert_eq!(retry.cart.reservation_id, first.cart.reservation_id);
    }
    assert_eq!(
        reserved(&node_a, &shop.shirt).await,
        (5, 3),
        "held once each"
    );
    assert_eq!(reserved(&node_a, &shop.shoes).await, (4, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_racing_release_on_one_cart_answers_every_caller_cleanly() {
    let allocator = std::sync::Arc::new(allocator_for("cart-node").await);
    let shop = shop(&allocator, 100, 100, 0).await;
    for round in 0..20 {
        let held = allocator
            .reserve_cart(&cart(
                &shop,
                &[(&shop.shirt, 1), (&shop.shoes, 1)],
                &format!("race-{round}"),
            ))
            .await
            .expect("cart");
        let id = held.cart.reservation_id;
        let (commit_key, release_key) = (format!("c-{round}"), format!("r-{round}"));
        let (commit, release) = tokio::join!(
            allocator.commit_cart(None, &id, &commit_key),
            allocator.release_cart(None, &id, &release_key)
        );
        for answer in [&commit, &release] {
            assert!(
                matches!(answer, Ok(_) | Err(AllocatorError::NotHeld { .. })),
                "round {round}: {answer:?}"
            );
        }
        let status = allocator.cart(None, &id).await.expect("cart").status;
        assert!(
            matches!(
                status,
                ReservationStatus::Committed | ReservationStatus::Released
            ),
            "{status:?}"
        );
    }
    let (shirts, shirts_held) = reserved(&allocator, &shop.shirt).await;
    let (shoes, shoes_held) = reserved(&allocator, &shop.shoes).await;
    assert_eq!((shirts_held, shoes_held), (0, 0));
    assert_eq!(shirts, shoes, "each cart ended whole, both lines alike");
}
