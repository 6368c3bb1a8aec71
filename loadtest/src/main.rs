//! `loadtest seed|browse|flash-sale|checkout|ingest`: the goose load test.
//!
//! Our flags come first, then goose's own (`--users`, `--increase-rate`,
//! `--run-time`, `--throttle-requests` for a request rate cap,
//! `--report-file` for goose's report); `loadtest browse --help` lists both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use goose::config::GooseConfiguration;
use goose::goose::GooseResponse;
use goose::metrics::GooseMetrics;
use goose::prelude::*;
use loadtest::{
    Catalog, KeyLevels, Outcomes, RequestFigures, StockCheck, Summary, catalog_sku, key_levels,
    uniform,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Load tests of the inventory gateway (goose)")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Gateway nodes, comma-separated; users are spread over them in turn.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080,http://127.0.0.1:8081"
    )]
    hosts: String,
    /// API key (bearer token) with read, checkout and admin scopes.
    #[arg(long, global = true, default_value = "dev-admin-key")]
    api_key: String,
    /// Merchant of the seeded catalog.
    #[arg(long, global = true, default_value = "m1")]
    merchant: String,
    /// Location of the seeded catalog.
    #[arg(long, global = true, default_value = "dc1")]
    location: String,
    /// Second location of the working keys (seeded with a hundredth of
    /// `--units`, at least 1): the checkout scenario's split lines prefer
    /// it, and take the rest from `--location`.
    #[arg(long, global = true, default_value = "dc2")]
    split_location: String,
    /// Catalog keys (`sku-000000` …).
    #[arg(long, global = true, default_value_t = 100_000)]
    keys: u64,
    /// Zipf exponent of catalog reads.
    #[arg(long, global = true, default_value_t = 1.0)]
    zipf_exponent: f64,
    /// Hot keys of the flash sale (`<hot-prefix>-0` …).
    #[arg(long, global = true, default_value_t = 3)]
    hot_keys: u64,
    /// Name prefix of the hot keys (the flash sales in the gateway config
    /// must name the same keys).
    #[arg(long, global = true, default_value = "hot")]
    hot_prefix: String,
    /// Keys the checkout and ingest scenarios use (the first N of the catalog).
    #[arg(long, global = true, default_value_t = 1000)]
    working_keys: u64,
    /// Hold time of flash-sale reservations left to expire, seconds.
    #[arg(long, global = true, default_value_t = 5)]
    hold_ttl_seconds: u64,
    /// Random seed (each user draws from seed + its index).
    #[arg(long, global = true, default_value_t = 1)]
    seed: u64,
    /// Kafka brokers for the ingest scenario's message half.
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// The stock events topic.
    #[arg(long, global = true, default_value = "inventory.events")]
    events_topic: String,
    /// Write the run's summary (figures, outcomes, stock check) as JSON here.
    #[arg(long, global = true)]
    summary: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Seed the catalog: +units on every catalog key, and the hot keys set
    /// to exactly hot-units (absolute count).
    Seed {
        /// Units added to each catalog key.
        #[arg(long, default_value_t = 1000)]
        units: u64,
        /// Units each hot key is set to.
        #[arg(long, default_value_t = 1000)]
        hot_units: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Availability reads, Zipf over the catalog, one in ten a batch of 20.
    Browse(GooseArgs),
    /// Users race for the hot keys; holds are committed, released or left.
    FlashSale(GooseArgs),
    /// Carts of 2 to 4 lines, committed or released.
    Checkout(GooseArgs),
    /// Adjustments, half over HTTP, half through Kafka.
    Ingest(GooseArgs),
}

#[derive(Args)]
struct GooseArgs {
    #[command(flatten)]
    goose: GooseConfiguration,
}

/// What every user of a run shares.
struct Shared {
    common: Common,
    hosts: Vec<String>,
    catalog: Catalog,
    outcomes: Outcomes,
    /// Units sold and added per SKU, for the end-of-run check.
    moved: Mutex<HashMap<(String, String), (i64, i64)>>,
    producer: Option<FutureProducer>,
    /// Makes idempotency keys and event ids unique per run.
    run_id: u64,
    sequence: AtomicU64,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

fn shared() -> &'static Shared {
    SHARED.get().expect("set before the load starts")
}

impl Shared {
    fn unique(&self, kind: &str, user: usize) -> String {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!("lt-{kind}-{}-{user}-{n}", self.run_id)
    }

    fn sold(&self, sku: &str, location: &str, units: i64) {
        let mut moved = self.moved.lock().expect("not poisoned");
        moved
            .entry((sku.to_owned(), location.to_owned()))
            .or_default()
            .0 += units;
    }

    fn added(&self, sku: &str, location: &str, units: i64) {
        let mut moved = self.moved.lock().expect("not poisoned");
        moved
            .entry((sku.to_owned(), location.to_owned()))
            .or_default()
            .1 += units;
    }
}

/// Each user's state: its random stream and index.
#[derive(Clone)]
struct UserState {
    rng: StdRng,
    index: usize,
}

async fn on_start(user: &mut GooseUser) -> TransactionResult {
    let shared = shared();
    let index = user.weighted_users_index;
    user.set_base_url(&shared.hosts[index % shared.hosts.len()])?;
    user.set_session_data(UserState {
        rng: StdRng::seed_from_u64(shared.common.seed.wrapping_add(index as u64)),
        index,
    });
    Ok(())
}

fn state(user: &mut GooseUser) -> &mut UserState {
    user.get_session_data_unchecked_mut::<UserState>()
}

/// Whether an answer is a flash sale's checkout throttle refusing the
/// attempt (429 with its message; a per-key limit's 429 is not).
fn is_throttled(status: u16, body: &Value) -> bool {
    status == 429
        && body["message"]
            .as_str()
            .is_some_and(|message| message.contains("flash sale"))
}

/// Sends one request named `name` (so ids in paths do not split the
/// metrics); a 409, or a 429 of a flash sale's checkout throttle, counts as
/// a success (a refusal is an answer). Returns the status (0 when no
/// response came) and the JSON body.
async fn send(
    user: &mut GooseUser,
    method: GooseMethod,
    path: &str,
    name: &str,
    body: Option<&Value>,
    idempotency_key: Option<String>,
) -> Result<(u16, Value), Box<TransactionError>> {
    let mut builder = user.get_request_builder(&method, path)?.header(
        "authorization",
        format!("Bearer {}", shared().common.api_key),
    );
    if let Some(key) = idempotency_key {
        builder = builder.header("idempotency-key", key);
    }
    if let Some(body) = body {
        builder = builder.json(body);
    }
    let request = GooseRequest::builder()
        .method(method)
        .path(path)
        .name(name)
        .set_request_builder(builder)
        .build();
    let GooseResponse {
        mut request,
        response,
    } = user.request(request).await?;
    match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.json::<Value>().await.unwrap_or(Value::Null);
            if status == 409 || is_throttled(status, &body) {
                user.set_success(&mut request)?;
            } else if !(200..300).contains(&status) {
                Outcomes::count(&shared().outcomes.unexpected);
            }
            Ok((status, body))
        }
        Err(_) => {
            Outcomes::count(&shared().outcomes.unexpected);
            Ok((0, Value::Null))
        }
    }
}

async fn read_one(user: &mut GooseUser) -> TransactionResult {
    let shared = shared();
    let index = shared.catalog.pick(&mut state(user).rng);
    let path = format!(
        "/v1/availability/{}/{}",
        shared.common.merchant,
        catalog_sku(index)
    );
    send(user, GooseMethod::Get, &path, "availability", None, None).await?;
    Ok(())
}

async fn read_batch(user: &mut GooseUser) -> TransactionResult {
    let shared = shared();
    let items: Vec<Value> = (0..20)
        .map(|_| {
            let index = shared.catalog.pick(&mut state(user).rng);
            json!({"merchant": shared.common.merchant, "sku": catalog_sku(index),
                   "location": shared.common.location})
        })
        .collect();
    let body = json!({ "items": items });
    send(
        user,
        GooseMethod::Post,
        "/v1/availability/batch",
        "availability_batch",
        Some(&body),
        None,
    )
    .await?;
    Ok(())
}

/// Holds `lines` (sku, qty) for `customer` (a `customer_ref`, if any); on
/// success commits, releases or leaves it as the roll says.
/// How a reservation's lines say where to hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Placing {
    /// Every line names `--location`.
    Fixed,
    /// No line names a location: the allocator places them.
    Anywhere,
    /// As `Anywhere`, and the first line prefers `--split-location` and
    /// may be split.
    Split,
}

impl Placing {
    /// The request name its reservations are measured under.
    fn name(self) -> &'static str {
        match self {
            Placing::Fixed => "reserve",
            Placing::Anywhere => "reserve_anywhere",
            Placing::Split => "reserve_split",
        }
    }
}

async fn reserve(
    user: &mut GooseUser,
    lines: &[(String, u64)],
    placing: Placing,
    ttl_seconds: u64,
    commit_share: f64,
    release_share: f64,
    customer: Option<String>,
) -> TransactionResult {
    let shared = shared();
    let common = &shared.common;
    let body_lines: Vec<Value> = lines
        .iter()
        .enumerate()
        .map(|(index, (sku, qty))| match placing {
            Placing::Fixed => json!({ "sku": sku, "location": common.location, "qty": qty }),
            Placing::Split if index == 0 => json!({
                "sku": sku, "qty": qty, "prefer": [common.split_location], "allow_split": true,
            }),
            _ => json!({ "sku": sku, "qty": qty }),
        })
        .collect();
    let mut body = json!({
        "merchant": common.merchant,
        "lines": body_lines,
        "ttl_seconds": ttl_seconds,
    });
    if let Some(customer) = customer {
        body["customer_ref"] = json!(customer);
    }
    let index = state(user).index;
    let key = shared.unique("reserve", index);
    let (status, reply) = send(
        user,
        GooseMethod::Post,
        "/v1/reservations",
        placing.name(),
        Some(&body),
        Some(key),
    )
    .await?;
    match status {
        201 => {
            Outcomes::count(&shared.outcomes.held);
            let holds = reply["lines"].as_array().map_or(0, Vec::len);
            if holds > lines.len() {
                Outcomes::count(&shared.outcomes.split_lines);
            }
            let id = reply["reservation_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let roll: f64 = state(user).rng.random();
            if roll < commit_share {
                let path = format!("/v1/reservations/{id}/commit");
                let key = shared.unique("commit", index);
                let (status, _) =
                    send(user, GooseMethod::Post, &path, "commit", None, Some(key)).await?;
                if status == 200 {
                    Outcomes::count(&shared.outcomes.committed);
                    // Sold where each hold was placed.
                    for hold in reply["lines"].as_array().into_iter().flatten() {
                        let (Some(sku), Some(location), Some(qty)) = (
                            hold["sku"].as_str(),
                            hold["location"].as_str(),
                            hold["qty"].as_u64(),
                        ) else {
                            continue;
                        };
                        shared.sold(sku, location, qty as i64);
                        shared.outcomes.sold_units.fetch_add(qty, Ordering::Relaxed);
                    }
                }
            } else if roll < commit_share + release_share {
                let path = format!("/v1/reservations/{id}/release");
                let key = shared.unique("release", index);
                let (status, _) =
                    send(user, GooseMethod::Post, &path, "release", None, Some(key)).await?;
                if status == 200 {
                    Outcomes::count(&shared.outcomes.released);
                }
            } else {
                Outcomes::count(&shared.outcomes.left_to_expire);
            }
        }
        429 if is_throttled(status, &reply) => Outcomes::count(&shared.outcomes.throttled),
        // A customer at its limit: an answer, and no sign of stock left.
        409 if reply["error"] == "customer_limit" => {
            Outcomes::count(&shared.outcomes.customer_limited)
        }
        409 => {
            Outcomes::count(&shared.outcomes.refused);
            if let [(sku, _)] = lines {
                let path = format!(
                    "/v1/availability/{}/{sku}?location={}",
                    shared.common.merchant, shared.common.location
                );
                let (status, levels) = send(
                    user,
                    GooseMethod::Get,
                    &path,
                    "availability_after_refusal",
                    None,
                    None,
                )
                .await?;
                if status == 200 && levels["available"].as_i64().unwrap_or_default() > 0 {
                    Outcomes::count(&shared.outcomes.refused_while_available);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Buyers of a flash sale: few enough that each comes back several times in
/// a scenario (a sale with a limit per customer refuses the ones at their
/// limit), many enough to stay under the per-customer request rate.
const FLASH_CUSTOMERS: u64 = 10_000;

async fn flash_sale(user: &mut GooseUser) -> TransactionResult {
    let shared = shared();
    let hot = uniform(&mut state(user).rng, shared.common.hot_keys);
    let sku = format!("{}-{hot}", shared.common.hot_prefix);
    let customer = uniform(&mut state(user).rng, FLASH_CUSTOMERS);
    reserve(
        user,
        &[(sku, 1)],
        Placing::Fixed,
        shared.common.hold_ttl_seconds,
        0.60,
        0.25,
        Some(format!("buyer-{customer}")),
    )
    .await
}

async fn checkout(user: &mut GooseUser) -> TransactionResult {
    let shared = shared();
    let rng = &mut state(user).rng;
    let count = rng.random_range(2..=4);
    let placing = [Placing::Fixed, Placing::Anywhere, Placing::Split][rng.random_range(0..3)];
    let mut lines: Vec<(String, u64)> = Vec::with_capacity(count);
    while lines.len() < count {
        let sku = catalog_sku(shared.catalog.pick(rng) % shared.common.working_keys.max(1));
        if !lines.iter().any(|(taken, _)| *taken == sku) {
            // A split line asks for more than its preferred location
            // usually has left.
            let qty = if placing == Placing::Split && lines.is_empty() {
                3
            } else {
                1
            };
            lines.push((sku, qty));
        }
    }
    reserve(user, &lines, placing, 600, 0.80, 0.20, None).await
}

async fn ingest(user: &mut GooseUser) -> TransactionResult {
    let shared = shared();
    let index = state(user).index;
    let rng = &mut state(user).rng;
    let sku = catalog_sku(shared.catalog.pick(rng) % shared.common.working_keys.max(1));
    let through_kafka = rng.random_bool(0.5);
    let event = json!({
        "merchant": shared.common.merchant, "sku": sku, "location": shared.common.location,
        "kind": "delta", "qty": 1, "source": "loadtest",
        "event_id": shared.unique("event", index),
    });
    if let (true, Some(producer)) = (through_kafka, shared.producer.as_ref()) {
        let key = format!(
            "{}|{sku}|{}",
            shared.common.merchant, shared.common.location
        );
        let payload = event.to_string();
        let record = FutureRecord::to(&shared.common.events_topic)
            .key(&key)
            .payload(&payload);
        match producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => {
                Outcomes::count(&shared.outcomes.adjustments_kafka);
                shared.added(&sku, &shared.common.location, 1);
            }
            Err(_) => Outcomes::count(&shared.outcomes.unexpected),
        }
        return Ok(());
    }
    let (status, reply) = send(
        user,
        GooseMethod::Post,
        "/v1/stock/adjustments",
        "adjustment",
        Some(&event),
        None,
    )
    .await?;
    if status == 200 && reply["applied"] == json!(true) {
        Outcomes::count(&shared.outcomes.adjustments_http);
        shared.added(&sku, &shared.common.location, 1);
    }
    Ok(())
}

/// The figures of each request kind.
fn figures(metrics: &GooseMetrics) -> Vec<RequestFigures> {
    let seconds = metrics.duration.max(1) as f64;
    let mut figures: Vec<RequestFigures> = metrics
        .requests
        .values()
        .map(|aggregate| {
            let data = &aggregate.raw_data;
            let requests = (aggregate.success_count + aggregate.fail_count) as u64;
            let conflicts = aggregate
                .status_code_counts
                .get(&409)
                .copied()
                .unwrap_or_default() as u64;
            let ms = |us: u64| us as f64 / 1000.0;
            RequestFigures {
                name: aggregate.path.clone(),
                requests,
                requests_per_second: requests as f64 / seconds,
                p50_ms: ms(data.percentile_us(0.50)),
                p95_ms: ms(data.percentile_us(0.95)),
                p99_ms: ms(data.percentile_us(0.99)),
                max_ms: ms(data.maximum_time_us),
                error_rate: aggregate.fail_count as f64 / requests.max(1) as f64,
                conflict_rate: conflicts as f64 / requests.max(1) as f64,
            }
        })
        .collect();
    figures.sort_by_key(|figure| std::cmp::Reverse(figure.requests));
    figures
}

/// Reads the levels of `skus` through `host`, 32 at a time.
async fn levels_of(
    client: &reqwest::Client,
    common: &Common,
    host: &str,
    skus: &[String],
) -> anyhow::Result<HashMap<(String, String), KeyLevels>> {
    let mut levels = HashMap::new();
    for chunk in skus.chunks(32) {
        let mut reads = tokio::task::JoinSet::new();
        for sku in chunk {
            let (client, host, sku) = (client.clone(), host.to_owned(), sku.clone());
            let (api_key, merchant) = (common.api_key.clone(), common.merchant.clone());
            reads.spawn(async move {
                let read = key_levels(&client, &host, &api_key, &merchant, &sku).await;
                (sku, read)
            });
        }
        while let Some(joined) = reads.join_next().await {
            let (sku, read) = joined?;
            for (location, at) in read? {
                levels.insert((sku.clone(), location), at);
            }
        }
    }
    Ok(levels)
}

async fn seed(
    common: &Common,
    units: u64,
    hot_units: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let host = common
        .hosts
        .split(',')
        .next()
        .unwrap_or_default()
        .to_owned();
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut bodies: Vec<Value> = (0..common.keys)
        .map(|index| {
            let sku = catalog_sku(index);
            json!({"merchant": common.merchant, "sku": sku, "location": common.location,
                   "kind": "delta", "qty": units, "source": "loadtest-seed",
                   "event_id": format!("seed-{sku}-{run}")})
        })
        .collect();
    bodies.extend((0..common.working_keys.min(common.keys)).map(|index| {
        let sku = catalog_sku(index);
        json!({"merchant": common.merchant, "sku": sku, "location": common.split_location,
               "kind": "delta", "qty": (units / 100).max(1), "source": "loadtest-seed",
               "event_id": format!("seed-{sku}-{}-{run}", common.split_location)})
    }));
    bodies.extend((0..common.hot_keys).map(|index| {
        json!({"merchant": common.merchant, "sku": format!("{}-{index}", common.hot_prefix),
               "location": common.location, "kind": "absolute", "qty": hot_units,
               "source": "loadtest-seed", "event_id": format!("seed-hot-{index}-{run}"),
               "source_seq": run})
    }));
    let started = std::time::Instant::now();
    let total = bodies.len();
    let bodies = Arc::new(Mutex::new(bodies));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, host, bodies, api_key) = (
            client.clone(),
            host.clone(),
            Arc::clone(&bodies),
            common.api_key.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let Some(body) = bodies.lock().expect("not poisoned").pop() else {
                    return Ok::<(), anyhow::Error>(());
                };
                let response = client
                    .post(format!("{host}/v1/stock/adjustments"))
                    .bearer_auth(&api_key)
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "seeding {}: {} {}",
                    body["sku"],
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    eprintln!(
        "loadtest: seeded {total} keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let common = cli.common;
    let (name, configuration) = match cli.command {
        Command::Seed {
            units,
            hot_units,
            concurrency,
        } => {
            seed(&common, units, hot_units, concurrency).await?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Browse(args) => ("browse", args.goose),
        Command::FlashSale(args) => ("flash-sale", args.goose),
        Command::Checkout(args) => ("checkout", args.goose),
        Command::Ingest(args) => ("ingest", args.goose),
    };
    let hosts: Vec<String> = common
        .hosts
        .split(',')
        .map(|host| host.trim().trim_end_matches('/').to_owned())
        .filter(|host| !host.is_empty())
        .collect();
    anyhow::ensure!(!hosts.is_empty(), "--hosts names no gateway node");
    // The keys whose stock the end-of-run check reads.
    let checked: Vec<String> = match name {
        "flash-sale" => (0..common.hot_keys)
            .map(|index| format!("{}-{index}", common.hot_prefix))
            .collect(),
        "checkout" | "ingest" => (0..common.working_keys.min(common.keys))
            .map(catalog_sku)
            .collect(),
        _ => Vec::new(),
    };
    let client = reqwest::Client::new();
    let before = levels_of(&client, &common, &hosts[0], &checked).await?;
    let producer = if name == "ingest" {
        Some(
            ClientConfig::new()
                .set("bootstrap.servers", &common.kafka_brokers)
                .set("linger.ms", "5")
                .create::<FutureProducer>()?,
        )
    } else {
        None
    };
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let shared_state = Shared {
        catalog: Catalog::new(common.keys, common.zipf_exponent)?,
        hosts: hosts.clone(),
        common: common.clone(),
        outcomes: Outcomes::default(),
        moved: Mutex::new(HashMap::new()),
        producer,
        run_id,
        sequence: AtomicU64::new(0),
    };
    if SHARED.set(shared_state).is_err() {
        anyhow::bail!("the load test state was set twice");
    }

    let mut scenario =
        scenario!("Users").register_transaction(transaction!(on_start).set_on_start());
    scenario = match name {
        "browse" => scenario
            .register_transaction(transaction!(read_one).set_weight(9)?)
            .register_transaction(transaction!(read_batch).set_weight(1)?),
        "flash-sale" => scenario.register_transaction(transaction!(flash_sale)),
        "checkout" => scenario.register_transaction(transaction!(checkout)),
        _ => scenario.register_transaction(transaction!(ingest)),
    };
    let users = configuration.users.unwrap_or(0);
    let run_time = configuration.run_time.clone();
    let throttle = configuration.throttle_requests.unwrap_or(0);
    let metrics = GooseAttack::initialize_with_config(configuration)?
        .set_default(GooseDefault::Host, hosts[0].as_str())?
        .register_scenario(scenario)
        .execute()
        .await?;

    // Let holds settle and caches expire, then read the keys back: the
    // ingest feed's Kafka half is applied by the ledger writer, a moment later.
    let moved = shared().moved.lock().expect("not poisoned").clone();
    let mut check = StockCheck {
        keys_checked: checked.len() as u64,
        ..StockCheck::default()
    };
    // Read again while the numbers still move (the Kafka half of a feed is
    // applied as fast as the writer ingests it), up to two minutes; stop
    // after 20 s without progress.
    let (mut last, mut still) = (i64::MIN, 0);
    for attempt in 0..60 {
        tokio::time::sleep(Duration::from_secs(if attempt == 0 { 3 } else { 2 })).await;
        let after = levels_of(&client, &common, &hosts[0], &checked).await?;
        let (mut oversold, mut unaccounted) = (0, 0);
        // Every stock key seen or moved: each location on its own.
        let mut keys: Vec<&(String, String)> = before
            .keys()
            .chain(after.keys())
            .chain(moved.keys())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let (sold, added) = moved.get(key).copied().unwrap_or_default();
            let start = before.get(key).copied().unwrap_or_default();
            let end = after.get(key).copied().unwrap_or_default();
            oversold += (sold - start.available.max(0) - added).max(0);
            unaccounted += start.on_hand + added - sold - end.on_hand;
        }
        check.units_oversold = oversold;
        check.units_unaccounted = unaccounted;
        if unaccounted == 0 {
            break;
        }
        still = if unaccounted == last { still + 1 } else { 0 };
        last = unaccounted;
        if still >= 10 {
            break;
        }
    }
    let summary = Summary {
        scenario: name.to_owned(),
        hosts,
        users,
        duration_seconds: metrics.duration,
        throttle_requests_per_second: throttle,
        seed: common.seed,
        requests: figures(&metrics),
        outcomes: shared().outcomes.snapshot(),
        check,
    };
    let text = serde_json::to_string_pretty(&summary)?;
    eprintln!("loadtest: {name}: run time {run_time:?}\n{text}");
    if let Some(path) = &common.summary {
        std::fs::write(path, &text)?;
    }
    if check.units_oversold != 0 || check.units_unaccounted != 0 {
        eprintln!("loadtest: the stock check failed");
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}
