//! Model-based property test: random sequences of every stock operation run
//! against the real Redis and against a plain in-memory model. After every
//! step the results and every cell agree with the model, and the conservation
//! law of DESIGN.md holds computed from the ledger streams alone:
//!
//!   Σ cells' on_hand + units in flight = Σ adjustments − Σ commits
//!
//! Expiry is real: short holds live 1 s and a `Wait` step sleeps past them,
//! then sweeps, so the model and Redis agree on which holds expired.

mod common;

use common::PARTITIONS;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use allocator::{
    Adjustment, AdjustmentKind, AdjustmentOutcome, Allocator, AllocatorError, AllocatorSettings,
    CellRef, FlashSale, ReservationStatus, ReserveRequest, StockKey,
};
use proptest::prelude::*;
use serde_json::Value;

const NODES: [&str; 2] = ["node-a", "node-b"];
const SHORT_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
enum Step {
    Adjust { key: usize, delta: i64 },
    Count { key: usize, qty: i64 },
    Reserve { key: usize, qty: u32, short: bool },
    ReserveBucket { node: usize, qty: u32 },
    Commit { pick: usize },
    Release { pick: usize },
    Extend { pick: usize },
    Activate,
    Refill { node: usize, chunk: u64 },
    Reclaim { node: usize },
    Wait,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..2usize, -6..12i64)
            .prop_filter("a delta moves units", |(_, delta)| *delta != 0)
            .prop_map(|(key, delta)| Step::Adjust { key, delta }),
        1 => (0..2usize, 0..20i64).prop_map(|(key, qty)| Step::Count { key, qty }),
        4 => (0..2usize, 1..5u32, any::<bool>()).prop_map(|(key, qty, short)| Step::Reserve { key, qty, short }),
        3 => (0..2usize, 1..4u32).prop_map(|(node, qty)| Step::ReserveBucket { node, qty }),
        2 => any::<usize>().prop_map(|pick| Step::Commit { pick }),
        2 => any::<usize>().prop_map(|pick| Step::Release { pick }),
        1 => any::<usize>().prop_map(|pick| Step::Extend { pick }),
        1 => Just(Step::Activate),
        2 => (0..2usize, 1..8u64).prop_map(|(node, chunk)| Step::Refill { node, chunk }),
        1 => (0..2usize).prop_map(|node| Step::Reclaim { node }),
        1 => Just(Step::Wait),
    ]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ModelCell {
    on_hand: i64,
    reserved: i64,
}

impl ModelCell {
    fn sellable(&self) -> i64 {
        self.on_hand - self.reserved
    }
}

#[derive(Debug, Clone)]
struct ModelHold {
    id: String,
    cell: String,
    qty: i64,
    status: ReservationStatus,
    short: bool,
}

/// The whole model: cells by id (absent until created), holds, counters.
#[derive(Default)]
struct Model {
    cells: BTreeMap<String, ModelCell>,
    holds: Vec<ModelHold>,
    last_count_seq: [u64; 2],
    activated: bool,
}

struct World {
    allocator: Allocator,
    /// Redis time at the start of the case: its ledger entries come after.
    since_ms: u64,
    keys: [StockKey; 2],
    sale: FlashSale,
    model: Model,
    next_id: u64,
}

impl World {
    fn pool(&self, key: usize) -> CellRef {
        self.keys[key].pool(PARTITIONS)
    }
    fn bucket(&self, node: usize) -> CellRef {
        self.keys[0].bucket(NODES[node], PARTITIONS)
    }
    fn fresh(&mut self, label: &str) -> String {
        self.next_id += 1;
        format!("{label}-{}", self.next_id)
    }
    fn cell_mut(&mut self, cell: &CellRef) -> &mut ModelCell {
        self.model.cells.entry(cell.id.clone()).or_default()
    }
    fn partitions(&self) -> Vec<u32> {
        let mut partitions: Vec<u32> = (0..2)
            .map(|key| self.pool(key).partition)
            .chain((0..2).map(|node| self.bucket(node).partition))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        partitions
    }

    /// Model's transfer: up to `want` sellable units from `from` to `to`.
    fn model_transfer(&mut self, from: &CellRef, to: &CellRef, want: i64) -> i64 {
        let free = self
            .model
            .cells
            .get(&from.id)
            .map_or(0, |cell| cell.sellable().max(0));
        let moved = want.min(free);
        if moved > 0 {
            self.cell_mut(from).on_hand -= moved;
            self.cell_mut(to).on_hand += moved;
        }
        moved
    }

    async fn apply(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match *step {
            Step::Adjust { key, delta } => {
                let event_id = self.fresh("evt");
                let outcome = self
                    .allocator
                    .adjust(&adjustment(
                        &self.keys[key],
                        AdjustmentKind::Delta,
                        delta,
                        event_id,
                        None,
                    ))
                    .await
                    .map_err(fail)?;
                let pool = self.pool(key);
                let cell = self.cell_mut(&pool);
                cell.on_hand += delta;
                let expected_shortfall = cell.sellable() < 0;
                prop_assert!(
                    matches!(outcome, AdjustmentOutcome::Applied { shortfall, .. } if shortfall == expected_shortfall),
                    "adjust {outcome:?}"
                );
            }
            Step::Count { key, qty } => {
                let seq = self.model.last_count_seq[key] + 1;
                self.model.last_count_seq[key] = seq;
                let event_id = self.fresh("count");
                let outcome = self
                    .allocator
                    .adjust(&adjustment(
                        &self.keys[key],
                        AdjustmentKind::Absolute,
                        qty,
                        event_id,
                        Some(seq),
                    ))
                    .await
                    .map_err(fail)?;
                prop_assert!(
                    matches!(outcome, AdjustmentOutcome::Applied { .. }),
                    "count {outcome:?}"
                );
                let pool = self.pool(key);
                self.cell_mut(&pool).on_hand = qty;
                // A stale count of the same source changes nothing.
                let stale = self
                    .allocator
                    .adjust(&adjustment(
                        &self.keys[key],
                        AdjustmentKind::Absolute,
                        qty + 5,
                        format!("stale-{seq}"),
                        Some(seq - 1),
                    ))
                    .await
                    .map_err(fail)?;
                prop_assert!(
                    matches!(stale, AdjustmentOutcome::Stale { .. }),
                    "stale {stale:?}"
                );
            }
            Step::Reserve { key, qty, short } => {
                let cell = self.pool(key);
                self.reserve(cell, key, qty, short).await?;
            }
            Step::ReserveBucket { node, qty } => {
                let cell = self.bucket(node);
                self.reserve(cell, 0, qty, false).await?;
            }
            Step::Commit { pick } | Step::Release { pick } | Step::Extend { pick } => {
                if self.model.holds.is_empty() {
                    return Ok(());
                }
                let index = pick % self.model.holds.len();
                let hold = self.model.holds[index].clone();
                let idempotency_key = self.fresh("op");
                let answer = match step {
                    Step::Commit { .. } => {
                        self.allocator
                            .commit(None, &hold.id, &idempotency_key)
                            .await
                    }
                    Step::Release { .. } => {
                        self.allocator
                            .release(None, &hold.id, &idempotency_key)
                            .await
                    }
                    _ => {
                        self.allocator
                            .extend(None, &hold.id, Duration::from_secs(600))
                            .await
                    }
                };
                let expected = match (step, hold.status) {
                    (_, ReservationStatus::Held) => Ok(match step {
                        Step::Commit { .. } => ReservationStatus::Committed,
                        Step::Release { .. } => ReservationStatus::Released,
                        _ => ReservationStatus::Held,
                    }),
                    (
                        Step::Release { .. },
                        ReservationStatus::Released | ReservationStatus::Expired,
                    ) => Ok(hold.status),
                    (Step::Commit { .. }, ReservationStatus::Committed) => Ok(hold.status),
                    (_, status) => Err(status),
                };
                match (&answer, expected) {
                    (Ok(reservation), Ok(status)) => prop_assert_eq!(reservation.status, status),
                    (Err(AllocatorError::NotHeld { status }), Err(expected)) => {
                        prop_assert_eq!(*status, expected)
                    }
                    _ => prop_assert!(
                        false,
                        "{step:?} on {hold:?}: {answer:?}, model {expected:?}"
                    ),
                }
                if hold.status == ReservationStatus::Held {
                    let cell = self
                        .model
                        .cells
                        .get_mut(&hold.cell)
                        .expect("held cell exists");
                    let entry = &mut self.model.holds[index];
                    match step {
                        Step::Commit { .. } => {
                            cell.on_hand -= hold.qty;
                            cell.reserved -= hold.qty;
                            entry.status = ReservationStatus::Committed;
                        }
                        Step::Release { .. } => {
                            cell.reserved -= hold.qty;
                            entry.status = ReservationStatus::Released;
                        }
                        _ => entry.short = false,
                    }
                }
            }
            Step::Activate => {
                let answer = self.allocator.activate(&self.sale, "e1").await;
                if !self.model.cells.contains_key(&self.pool(0).id) {
                    prop_assert!(
                        matches!(answer, Err(AllocatorError::NotFound)),
                        "activate {answer:?}"
                    );
                    return Ok(());
                }
                answer.map_err(fail)?;
                if !self.model.activated {
                    self.model.activated = true;
                    let pool = self.pool(0);
                    let free = self
                        .model
                        .cells
                        .get(&pool.id)
                        .map_or(0, |cell| cell.sellable().max(0));
                    let total = free / 2;
                    for node in 0..NODES.len() {
                        let share = total / 2 + i64::from((node as i64) < total % 2);
                        if share > 0 {
                            let bucket = self.bucket(node);
                            self.model_transfer(&pool, &bucket, share);
                        }
                    }
                }
            }
            Step::Refill { node, chunk } => {
                let answer = self
                    .allocator
                    .refill(&self.sale, NODES[node], chunk as f64)
                    .await;
                if !self.model.cells.contains_key(&self.pool(0).id) {
                    prop_assert!(
                        matches!(answer, Err(AllocatorError::NotFound)),
                        "refill {answer:?}"
                    );
                    return Ok(());
                }
                let moved = answer.map_err(fail)?;
                let (pool, bucket) = (self.pool(0), self.bucket(node));
                let expected = self.model_transfer(&pool, &bucket, chunk as i64);
                prop_assert_eq!(moved as i64, expected, "refill");
            }
            Step::Reclaim { node } => {
                let moved = self
                    .allocator
                    .reclaim(&self.sale, NODES[node], 0)
                    .await
                    .map_err(fail)?;
                let (pool, bucket) = (self.pool(0), self.bucket(node));
                let expected = self.model_transfer(&bucket, &pool, i64::MAX);
                prop_assert_eq!(moved as i64, expected, "reclaim");
            }
            Step::Wait => {
                tokio::time::sleep(SHORT_TTL + Duration::from_millis(80)).await;
                for partition in self.partitions() {
                    self.allocator
                        .expire_due(partition, 1000)
                        .await
                        .map_err(fail)?;
                }
                for index in 0..self.model.holds.len() {
                    let hold = self.model.holds[index].clone();
                    if hold.short && hold.status == ReservationStatus::Held {
                        self.model.holds[index].status = ReservationStatus::Expired;
                        self.model.cells.get_mut(&hold.cell).expect("cell").reserved -= hold.qty;
                    }
                }
            }
        }
        Ok(())
    }

    async fn reserve(
        &mut self,
        cell: CellRef,
        key: usize,
        qty: u32,
        short: bool,
    ) -> Result<(), TestCaseError> {
        let request = ReserveRequest {
            key: self.keys[key].clone(),
            qty,
            ttl: Some(if short {
                SHORT_TTL
            } else {
                Duration::from_secs(600)
            }),
            idempotency_key: self.fresh("res"),
            customer_ref: None,
        };
        let answer = self.allocator.reserve_in(&request, &cell).await;
        let model_cell = self.model.cells.get(&cell.id).copied();
        match (answer, model_cell) {
            (Err(AllocatorError::NotFound), None) => {}
            (Ok(hold), Some(model)) if model.sellable() >= i64::from(qty) => {
                self.cell_mut(&cell).reserved += i64::from(qty);
                self.model.holds.push(ModelHold {
                    id: hold.reservation.reservation_id,
                    cell: cell.id.clone(),
                    qty: i64::from(qty),
                    status: ReservationStatus::Held,
                    short,
                });
            }
            (Err(AllocatorError::InsufficientStock { lines }), Some(model))
                if model.sellable() < i64::from(qty) =>
            {
                prop_assert_eq!(lines[0].available, model.sellable().max(0));
            }
            (answer, model) => prop_assert!(
                false,
                "reserve {qty} in {}: {answer:?}, model {model:?}",
                cell.id
            ),
        }
        Ok(())
    }

    /// Every cell agrees with the model, and the ledger alone balances.
    async fn check(&self) -> Result<(), TestCaseError> {
        for (id, model) in &self.model.cells {
            let partition = [self.pool(0), self.pool(1), self.bucket(0), self.bucket(1)]
                .into_iter()
                .find(|cell| &cell.id == id)
                .expect("known cell")
                .partition;
            let cell = self
                .allocator
                .cell(&CellRef {
                    partition,
                    id: id.clone(),
                })
                .await
                .map_err(fail)?
                .expect("cell in redis");
            prop_assert_eq!(
                (cell.on_hand, cell.reserved),
                (model.on_hand, model.reserved),
                "cell {}",
                id
            );
        }

        let merchant = &self.keys[0].merchant;
        let mut last_on_hand: BTreeMap<String, i64> = BTreeMap::new();
        let (mut adjusted, mut committed, mut out, mut into) = (0i64, 0i64, 0i64, 0i64);
        let mut transfers_out = HashSet::new();
        for partition in self.partitions() {
            for (_, entry) in self
                .allocator
                .ledger_entries(partition, self.since_ms)
                .await
                .map_err(fail)?
            {
                if entry["merchant"].as_str() != Some(merchant) {
                    continue;
                }
                let qty = entry["qty"].as_i64().unwrap_or_default();
                match entry["op"].as_str().unwrap_or_default() {
                    "adjust" => adjusted += qty,
                    "commit" => committed += qty,
                    "transfer_out" => {
                        out += qty;
                        transfers_out.insert(value_string(&entry["transfer_id"]));
                    }
                    "transfer_in" => into += qty,
                    _ => {}
                }
                let cell = value_string(&entry["cell"]);
                last_on_hand.insert(cell, entry["on_hand_after"].as_i64().unwrap_or_default());
            }
        }
        let on_hand: i64 = last_on_hand.values().sum();
        let in_flight = out - into;
        prop_assert_eq!(in_flight, 0, "every transfer here completes in its step");
        prop_assert_eq!(
            on_hand + in_flight,
            adjusted - committed,
            "conservation from the ledger"
        );
        let model_on_hand: i64 = self.model.cells.values().map(|cell| cell.on_hand).sum();
        prop_assert_eq!(on_hand, model_on_hand);
        Ok(())
    }
}

fn value_string(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn adjustment(
    key: &StockKey,
    kind: AdjustmentKind,
    qty: i64,
    event_id: String,
    source_seq: Option<u64>,
) -> Adjustment {
    Adjustment {
        merchant: key.merchant.clone(),
        sku: key.sku.clone(),
        location: key.location.clone(),
        kind,
        qty,
        source: "model".to_owned(),
        event_id,
        source_seq,
    }
}

fn fail(error: AllocatorError) -> TestCaseError {
    TestCaseError::fail(format!("allocator: {error}"))
}

async fn run_case(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let settings = AllocatorSettings {
        node: "model-node".to_owned(),
        partitions: PARTITIONS,
        command_timeout: Duration::from_secs(5),
        ttl_default: Duration::from_secs(600),
        ttl_max: Duration::from_secs(3600),
        customer_ref_key: "model-customer-ref-key".to_owned(),
        cart_line_grace: Duration::from_secs(2),
    };
    let allocator = Allocator::connect(&testkit::stack().redis_url, settings, 2)
        .await
        .map_err(fail)?;
    let merchant = testkit::unique_id("model");
    let keys = [
        StockKey::new(&merchant, "hot", "dc1"),
        StockKey::new(&merchant, "calm", "dc2"),
    ];
    let sale = FlashSale {
        name: testkit::unique_id("sale"),
        key: keys[0].clone(),
        nodes: NODES.iter().map(|node| (*node).to_owned()).collect(),
        presplit_fraction: 0.5,
        refill_chunk_units_min: 1,
        refill_chunk_units_max: 10,
    };
    let since_ms = allocator.redis_time_ms().await.map_err(fail)?;
    let mut world = World {
        since_ms,
        allocator,
        keys,
        sale,
        model: Model::default(),
        next_id: 0,
    };
    // At most one Wait per case keeps the whole property under a minute.
    let mut waited = false;
    for step in steps {
        if matches!(step, Step::Wait) {
            if waited {
                continue;
            }
            waited = true;
        }
        world.apply(&step).await?;
        world.check().await?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operation_sequences_match_the_model_and_conserve_units(steps in prop::collection::vec(step(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run_case(steps))?;
    }
}
