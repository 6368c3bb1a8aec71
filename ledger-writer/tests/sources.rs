//! An offline POS end to end, on the writer's side: what it sends on the
//! events topic (heartbeats, its backlog of sales) read by a real writer
//! from a real Kafka-protocol broker. The gateway's side (a quiet source's
//! locations shown `source_offline`, less their buffer) is tested in
//! `gateway/tests/sources.rs`.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use allocator::{ReserveRequest, StockKey};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
    at_ms: Option<u64>,
) {
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(at) = at_ms {
        record = record.timestamp(at as i64);
    }
    producer
        .send(record, Duration::from_secs(5))
        .await
        .expect("produce");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pos_heard_from_at_its_reports_and_its_shuffled_duplicated_backlog_leaves_on_hand_exact_with_one_shortfall()
 {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &testkit::stack().kafka_brokers)
        .create()
        .expect("producer");
    let pos = "pos-store-12";
    let skewed = "pos-fast-clock";
    let behind = "pos-backlog";
    let heartbeat = |merchant: &str, source: &str| {
        json!({"kind": "heartbeat", "merchant": merchant, "source": source}).to_string()
    };

    // Heartbeats: the POS's, sent 100 s ago (current: an unlisted source's
    // messages count for 5 minutes); one from a till whose clock runs an
    // hour ahead; one sent 10 minutes ago (a backlog: applied, but it says
    // nothing of the till now); and m2's till of that name, current: it is
    // another source.
    let sends = [
        ("m1", pos, now_ms() - 100_000),
        ("m1", skewed, now_ms() + 3_600_000),
        ("m1", behind, now_ms() - 600_000),
        ("m2", behind, now_ms()),
    ];
    for (merchant, source, at) in sends {
        send(
            &producer,
            &setup.events_topic,
            source,
            &heartbeat(merchant, source),
            Some(at),
        )
        .await;
    }
    let before = allocator.redis_time_ms().await.expect("redis time");
    let _writer = common::start_writer(&setup);
    let members: Vec<String> = sends
        .iter()
        .map(|(merchant, source, _)| allocator::sources::source_member(merchant, source))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (seen, after) = loop {
        let (seen, now) = allocator
            .sources_seen(&members)
            .await
            .expect("sources seen");
        if seen[0].is_some() && seen[1].is_some() && seen[3].is_some() {
            break (seen, now);
        }
        assert!(
            Instant::now() < deadline,
            "heartbeats not recorded: {seen:?}\n{}",
            common::writer_logs(&setup)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Recorded on Redis's clock as when the till reported: 100 s ago, not
    // when the writer got to it (seconds of slack for the hosts' clocks).
    let slack = 3_000;
    assert!(
        seen[0]
            .is_some_and(|at| (before - 100_000 - slack..=after - 100_000 + slack).contains(&at)),
        "{seen:?}: not 100 s before {before}..={after}"
    );
    assert!(
        seen[1].is_some_and(|at| (before - slack..=after).contains(&at)),
        "a report from the future counts as now: {seen:?} not in {before}..={after}"
    );
    // A second for the late one to have been written, were it counted.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (seen, _) = allocator
        .sources_seen(&members)
        .await
        .expect("sources seen");
    assert_eq!(
        seen[2], None,
        "a 10-minute-old heartbeat says nothing of m1's till now, though m2's of that name spoke"
    );
    assert!(
        common::writer_logs(&setup).contains("too old to say it is there now"),
        "the writer says why it did not count"
    );

    // The store: 1,005 on the shelf; 8 promised online (held) while the
    // POS was offline selling 1,000 over the counter.
    let key = StockKey::new("m1", "tee", "store-12");
    common::restock(&allocator, &key, 1_005).await;
    for n in 0..8 {
        allocator
            .reserve(&ReserveRequest {
                key: key.clone(),
                qty: 1,
                ttl: Some(Duration::from_secs(600)),
                idempotency_key: format!("online-{n}"),
                customer_ref: None,
            })
            .await
            .expect("online hold");
    }
    // The backlog on reconnect: each sale once, 250 of them twice, in a
    // shuffled order, spread over the topic's partitions by event id.
    let sale = |n: usize| {
        json!({
            "merchant": "m1", "sku": "tee", "location": "store-12", "kind": "delta",
            "qty": -1, "source": pos, "event_id": format!("sale-{n}"),
        })
        .to_string()
    };
    let mut backlog: Vec<usize> = (0..1_000).chain(0..250).collect();
    backlog.shuffle(&mut rand::rngs::StdRng::seed_from_u64(12));
    for n in backlog {
        send(
            &producer,
            &setup.events_topic,
            &format!("sale-{n}"),
            &sale(n),
            None,
        )
        .await;
    }
    let pool = key.pool(common::PARTITIONS);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cell = allocator.cell(&pool).await.expect("cell").expect("pool");
        if cell.on_hand <= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog not applied: {cell:?}\n{}",
            common::writer_logs(&setup)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A duplicate applied late would show now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cell = allocator.cell(&pool).await.expect("cell").expect("pool");
    assert_eq!(
        (cell.on_hand, cell.reserved),
        (5, 8),
        "every sale applied once: 1,005 - 1,000 on the shelf, 8 still promised"
    );
    assert!(cell.is_short(), "3 promised units are not on the shelf");

    // The ledger: each sale once; exactly the 3 applied past the shelf's
    // last sellable unit flagged, whatever the order.
    let postgres = common::postgres(&setup).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (sales, distinct, flagged) = loop {
        let row = postgres
            .query_one(
                "SELECT count(*), count(DISTINCT source_event_id),
                        count(*) FILTER (WHERE shortfall)
                 FROM ledger WHERE op = 'adjust' AND source = $1",
                &[&pos],
            )
            .await
            .expect("ledger");
        let counts: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if counts.0 >= 1_000 || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((sales, distinct, flagged), (1_000, 1_000, 3));
    let (balanced, report) = common::audit(&setup);
    assert!(balanced, "{report}");

    // Signalled once: the key went out of stock, then short by 3.
    // back_in_stock (the restock), out_of_stock, shortfall at least.
    let messages = common::signals(&setup.signals_topic, 3);
    let of_key: Vec<&Value> = messages
        .iter()
        .map(|(_, signal)| signal)
        .filter(|signal| signal["sku"] == "tee" && signal["location"] == "store-12")
        .collect();
    let shortfalls: Vec<&&Value> = of_key
        .iter()
        .filter(|signal| signal["kind"] == "shortfall")
        .collect();
    assert_eq!(shortfalls.len(), 1, "{of_key:?}");
    assert_eq!(
        shortfalls[0]["short_by"],
        json!(1),
        "signalled as it crossed"
    );
    let ids: HashSet<&str> = of_key
        .iter()
        .filter_map(|signal| signal["signal_id"].as_str())
        .collect();
    assert_eq!(ids.len(), of_key.len(), "no signal twice: {of_key:?}");
    let flagged_first: String = postgres
        .query_one(
            "SELECT entry_id FROM ledger WHERE op = 'adjust' AND source = $1 AND shortfall
             ORDER BY split_part(stream_id, '-', 1)::bigint, split_part(stream_id, '-', 2)::bigint
             LIMIT 1",
            &[&pos],
        )
        .await
        .expect("first flagged")
        .get(0);
    assert_eq!(
        shortfalls[0]["entry_id"].as_str(),
        Some(flagged_first.as_str()),
        "caused by the first sale past the shelf"
    );
    assert_eq!(
        common::metric(
            setup.metrics_port,
            "invgw_writer_events_total{outcome=\"heartbeat\""
        )
        .await,
        Some(4.0)
    );
}
