//! The stack that `scripts/stack up` starts answers the clients the project
//! uses, and has the database and topics the services expect.

use std::time::Duration;

use fred::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

#[tokio::test]
async fn redis_answers_and_runs_lua() {
    let stack = testkit::stack();
    let client = Builder::from_config(Config::from_url(&stack.redis_url).expect("redis url"))
        .build()
        .expect("redis client");
    client.init().await.expect("connect to redis");
    let answer: i64 = client
        .eval(
            "return tonumber(ARGV[1]) + 1",
            Vec::<String>::new(),
            vec!["41"],
        )
        .await
        .expect("eval");
    assert_eq!(answer, 42);
    let info: String = client
        .info(Some(fred::types::InfoKind::Server))
        .await
        .expect("info");
    assert!(info.contains("redis_version:7"), "redis 7 expected: {info}");
    client.quit().await.expect("quit");
}

#[tokio::test]
async fn postgres_has_the_inventory_database() {
    let stack = testkit::stack();
    let (client, connection) = tokio_postgres::connect(&stack.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("connect to postgresql");
    tokio::spawn(connection);
    let row = client
        .query_one(
            "select current_database(), current_setting('server_version_num')::int",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "inventory");
    assert!(row.get::<_, i32>(1) >= 150_000, "postgresql 15 or newer");
}

#[tokio::test]
async fn kafka_has_the_three_topics_with_the_configured_partitions() {
    let stack = testkit::stack();
    let brokers = stack.kafka_brokers.clone();
    let topics = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("kafka client");
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("broker metadata");
        metadata
            .topics()
            .iter()
            .map(|topic| (topic.name().to_owned(), topic.partitions().len()))
            .collect::<Vec<_>>()
    })
    .await
    .expect("metadata task");
    let dev =
        config::load_file(&testkit::repository_root().join("config/dev.toml")).expect("dev config");
    for name in [
        &dev.kafka.ledger_topic,
        &dev.kafka.events_topic,
        &dev.kafka.dlq_topic,
    ] {
        let partitions = topics
            .iter()
            .find(|(topic, _)| topic == name)
            .map(|(_, partitions)| *partitions);
        assert_eq!(
            partitions,
            Some(dev.kafka.topic_partitions as usize),
            "topic {name} in {topics:?}"
        );
    }
}
