//! Stock signals end to end: stock changes made through the allocator, the
//! writer relaying them, and the signals read back from Kafka by a real
//! consumer: each crossing once, with the entry that caused it, on every
//! path (adjustments, settings, reservations, expiry, commits, a flash
//! sale's transfers between cells).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use allocator::{ReserveRequest, StockKey, StockSettings};

fn hold(key: &StockKey, qty: u32, ttl: Option<Duration>) -> ReserveRequest {
    ReserveRequest {
        key: key.clone(),
        qty,
        ttl,
        idempotency_key: testkit::unique_id("hold"),
        customer_ref: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_day_yields_each_crossing_once_with_its_entry() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    let _writer = common::start_writer(&setup);
    let key = StockKey::new("m1", testkit::unique_id("kettle"), "dc1");
    let quiet = StockKey::new("m1", testkit::unique_id("quiet"), "dc1");

    // Settings first (the key exists, with nothing): low at 3, reorder at 5
    // (at 0, that is at once a reorder).
    allocator
        .settings_of(
            &key,
            StockSettings {
                safety_stock: 0,
                backorder_limit: 0,
                low_stock_threshold: Some(3),
                reorder_point: Some(5),
                reorder_qty: 40,
            },
        )
        .await
        .expect("settings");
    // Restocked: back in stock.
    common::restock(&allocator, &key, 10).await;
    // Sold one at a time down to the threshold: reorder at 5, low at 3.
    let mut held = Vec::new();
    for _ in 0..7 {
        held.push(allocator.reserve(&hold(&key, 1, None)).await.expect("hold"));
    }
    // The last three on a short hold: out of stock.
    let short = allocator
        .reserve(&hold(&key, 3, Some(Duration::from_secs(1))))
        .await
        .expect("short hold");
    // Their expiry: back in stock (low).
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let expired = allocator
        .reservation(None, &short.reservation.reservation_id)
        .await
        .expect("reservation");
    assert_eq!(expired.status, allocator::ReservationStatus::Expired);
    // Commits of two holds change nothing available; a restock of 20:
    // in stock again, above the reorder point again (no signal for either).
    for (n, hold) in held.iter().take(2).enumerate() {
        allocator
            .commit(None, &hold.reservation.reservation_id, &format!("buy-{n}"))
            .await
            .expect("commit");
    }
    common::restock(&allocator, &key, 20).await;
    // A loss of 18 (a physical fact): back to the reorder point: reorder.
    common::restock(&allocator, &key, -18).await;
    // Another key: in stock once, then a hold that crosses nothing.
    common::restock(&allocator, &quiet, 100).await;
    allocator
        .reserve(&hold(&quiet, 1, None))
        .await
        .expect("hold");

    let all = common::signals(&setup.signals_topic, 8);
    assert!(
        !all.is_empty(),
        "no signals: {}",
        common::writer_logs(&setup)
    );
    let expected_key = format!("{}|{}|{}", key.merchant, key.sku, key.location);
    let (messages, others): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(message_key, _)| *message_key == expected_key);
    assert_eq!(others.len(), 1, "{others:#?}");
    assert_eq!(others[0].1["kind"], "back_in_stock");
    assert_eq!(others[0].1["sku"], quiet.sku.as_str());
    let kinds: Vec<&str> = messages
        .iter()
        .map(|(_, payload)| payload["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "reorder",
            "back_in_stock",
            "reorder",
            "low_stock",
            "out_of_stock",
            "back_in_stock",
            "reorder"
        ],
        "{messages:#?}"
    );
    let availables: Vec<i64> = messages
        .iter()
        .map(|(_, payload)| payload["available"].as_i64().expect("available"))
        .collect();
    assert_eq!(availables, [0, 10, 5, 3, 0, 3, 5]);
    let ops: Vec<&str> = messages
        .iter()
        .map(|(_, payload)| payload["op"].as_str().expect("op"))
        .collect();
    assert_eq!(
        ops,
        [
            "settings", "adjust", "reserve", "reserve", "reserve", "expire", "adjust"
        ]
    );
    let postgres = common::postgres(&setup).await;
    for (message_key, payload) in &messages {
        assert_eq!(message_key, &expected_key);
        assert_eq!(payload["v"], 1);
        assert_eq!(payload["sku"], key.sku.as_str());
        // The entry that caused it is in the ledger, and did what it says.
        let entry_id = payload["entry_id"].as_str().expect("entry id");
        let row = postgres
            .query_one("SELECT op FROM ledger WHERE entry_id = $1", &[&entry_id])
            .await
            .expect("the causing entry");
        assert_eq!(row.get::<_, String>(0), payload["op"].as_str().expect("op"));
        assert_eq!(
            payload["signal_id"].as_str().expect("signal id"),
            format!("{entry_id}:{}", payload["kind"].as_str().expect("kind"))
        );
    }
    let reorder = &messages[6].1;
    assert_eq!(
        (&reorder["reorder_point"], &reorder["reorder_qty"]),
        (&serde_json::json!(5), &serde_json::json!(40))
    );

    // Every signal was published once (the writer says so too).
    let published = common::metric(setup.metrics_port, "invgw_writer_signals_published_total")
        .await
        .expect("published");
    assert_eq!(published, 8.0);
    let rows = postgres
        .query(
            "SELECT kind, count(*) FROM signals WHERE published_at IS NOT NULL GROUP BY kind",
            &[],
        )
        .await
        .expect("signals");
    let counts: HashMap<String, i64> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(
        counts,
        HashMap::from([
            ("back_in_stock".to_owned(), 3),
            ("reorder".to_owned(), 3),
            ("low_stock".to_owned(), 1),
            ("out_of_stock".to_owned(), 1),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sales_refills_and_reclaims_are_no_crossings() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    let _writer = common::start_writer(&setup);
    let key = StockKey::new("m1", testkit::unique_id("console"), "dc1");
    // Few units, all split into the buckets: a debit seen without its
    // credits would be a key at 0.
    common::restock(&allocator, &key, 8).await;
    let mut sale = allocator::FlashSale {
        name: testkit::unique_id("drop"),
        key: key.clone(),
        nodes: vec!["node-a".to_owned(), "node-b".to_owned()],
        presplit_fraction: 1.0,
        refill_chunk_units_min: 1,
        refill_chunk_units_max: 4,
        buckets: Default::default(),
    };
    allocator.place(&mut sale).await.expect("place");
    allocator.activate(&sale, "e1").await.expect("activate");
    let view = allocator.stock_view(&key).await.expect("view");
    assert_eq!(
        view.pool.as_ref().map(|pool| pool.on_hand),
        Some(0),
        "{view:?}"
    );
    for node in ["node-a", "node-b"] {
        allocator.reclaim(&sale, node).await.expect("reclaim");
    }
    allocator.end_activation(&sale, "e1").await.expect("end");
    // Then a real crossing, so the reader knows when it has read enough.
    common::restock(&allocator, &key, -8).await;
    let messages = common::signals(&setup.signals_topic, 2);
    assert!(
        !messages.is_empty(),
        "no signals: {}",
        common::writer_logs(&setup)
    );
    let kinds: Vec<&str> = messages
        .iter()
        .map(|(_, payload)| payload["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["back_in_stock", "out_of_stock"], "{messages:#?}");
    assert_eq!(messages[1].1["op"], "adjust");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shortfall_migration_takes_backorder_limits_from_carried_settings_too() {
    let setup = common::setup(&testkit::stack().redis_url).await;
    let migrate = || {
        let output = common::run_writer(&setup, "migrate", &[]);
        assert!(output.status.success(), "{}", common::output_text(&output));
    };
    migrate();
    // The schema as the release before 011 left it: keys tracked, and a
    // backorder limit whose settings entry is in a day retention dropped.
    let postgres = common::postgres(&setup).await;
    postgres
        .batch_execute(
            r#"ALTER TABLE signal_state DROP COLUMN backorder_limit, DROP COLUMN short;
               DELETE FROM schema_migrations WHERE version = 11;
               INSERT INTO signal_state (merchant, sku, location, status)
               VALUES ('m1', 'carried', 'dc1', 'in_stock'), ('m1', 'plain', 'dc1', 'low');
               INSERT INTO ledger_carried_entries (day, entry_id, entry) VALUES
                 ('2026-01-01', '1-1000-0', '{"op":"settings","merchant":"m1","sku":"carried","location":"dc1","backorder_limit":4,"at_ms":1000}'),
                 ('2026-01-02', '1-2000-0', '{"op":"settings","merchant":"m1","sku":"carried","location":"dc1","backorder_limit":10,"at_ms":2000}');"#,
        )
        .await
        .expect("the schema before 011");
    migrate();
    let rows = postgres
        .query(
            "SELECT sku, backorder_limit, short FROM signal_state ORDER BY sku",
            &[],
        )
        .await
        .expect("signal state");
    let got: Vec<(String, i64, Option<bool>)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("carried".to_owned(), 10, None),
            ("plain".to_owned(), 0, None)
        ],
        "the last carried settings' limit; shortness unknown until seen"
    );
}
