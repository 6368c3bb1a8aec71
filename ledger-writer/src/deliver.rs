//! Webhook deliveries: every stock signal to the webhooks of its merchant
//! that asked for its kind, signed, retried, in order per stock key.
//!
//! Owns fanning signals out into deliveries, making the attempts and
//! recording them (`webhook_deliveries`, `webhook_attempts`). The rules of
//! a registration, its sealed secret, the signature and the target checks
//! are the `webhooks` crate's.
//!
//! **One dispatcher at a time.** Every writer runs this loop; the one that
//! holds a PostgreSQL session lock on its connection dispatches, the others
//! wait for it (a dead writer's connection, and so its lock, goes with it).
//! Deliveries live in PostgreSQL, so they survive any writer's restart: a
//! delivery whose attempt was under way when its writer died is made again,
//! with the same `Webhook-Id` (receivers drop repeats by it).
//!
//! **Order and isolation.** Each pass takes, per webhook and stock key, the
//! oldest pending delivery only, and attempts it when it is due: a key's
//! next delivery waits until the one before it is delivered or
//! dead-lettered. Attempts run as tasks of their own, at most
//! `webhooks.concurrency_per_endpoint` per webhook, each bounded by
//! `webhooks.timeout_ms`: a slow or dead partner holds its own slots only,
//! never another partner's, and never the relay (which only records
//! signals).
//!
//! **Retries.** Anything but a 2xx (a refused target, a timeout, a 500, a
//! redirect) is retried after `retry_first_ms`, doubling up to
//! `retry_max_ms`, each delay jittered by ±50% (a partner back from an
//! outage is not hit by every delivery at once); once the signal is
//! `give_up_after_seconds` old the delivery is dead-lettered: `failed`,
//! counted, kept for the deliveries log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};
use webhooks::Sealer;

use crate::metrics::Metrics;

/// The session lock the dispatching writer holds (an arbitrary constant).
const DISPATCH_LOCK: i64 = 0x5765_6268;

/// How often the dispatcher looks for due deliveries and new signals.
const PASS_EVERY: Duration = Duration::from_millis(100);

/// How long a waiting or failed dispatcher rests.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Signals fanned out per pass.
const FAN_OUT_BATCH: i64 = 500;

/// Finished deliveries are kept this long.
const KEEP_FINISHED: &str = "7 days";

/// How often finished rows are deleted, and pending ones counted.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

/// One webhook's attempts under way, by delivery id.
type InFlight = Arc<Mutex<HashMap<(String, String), Vec<i64>>>>;

/// Attempts under way at once over every webhook (a merchant with many
/// endpoints at a hanging host holds at most these).
const ATTEMPTS_MAX: usize = 256;

/// How much longer than `webhooks.timeout_ms` a claimed attempt keeps its
/// delivery from being attempted again (its writer may have died mid-way).
const CLAIM_MARGIN_MS: u64 = 5_000;

/// Frees a delivery's slot when its attempt ends, however it ends.
struct Slot {
    in_flight: InFlight,
    endpoint: (String, String),
    id: i64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(endpoint) = running.get_mut(&self.endpoint) {
            endpoint.retain(|id| *id != self.id);
        }
    }
}

/// Dispatches deliveries while this writer holds the lock; forever. Does
/// nothing (and says so once) when webhooks are off (no secret key).
pub async fn deliver_forever(config: Arc<config::Config>, metrics: Arc<Metrics>) {
    let Some(sealer) = Sealer::new(&config.webhooks.secret_key) else {
        info!("webhooks are off (webhooks.secret_key is empty): nothing is delivered");
        return;
    };
    let sealer = Arc::new(sealer);
    loop {
        if let Err(error) = dispatch(&config, &metrics, &sealer).await {
            warn!(error = %format!("{error:#}"), "webhook dispatcher stopped; starting again");
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

async fn dispatch(
    config: &Arc<config::Config>,
    metrics: &Arc<Metrics>,
    sealer: &Arc<Sealer>,
) -> anyhow::Result<()> {
    let client = Arc::new(crate::connect_postgres(config).await?);
    // The lock lives as long as this session: a writer whose host vanishes
    // must lose it in seconds, not when TCP gives up hours later.
    client
        .batch_execute(
            "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5;
             SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000",
        )
        .await?;
    loop {
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&DISPATCH_LOCK])
            .await?
            .get(0);
        if locked {
            break;
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    info!("dispatching webhook deliveries");
    let in_flight: InFlight = Arc::default();
    let attempts = Arc::new(tokio::sync::Semaphore::new(ATTEMPTS_MAX));
    let mut housekept: Option<Instant> = None;
    loop {
        if client.is_closed() {
            anyhow::bail!("the dispatcher's postgresql connection closed");
        }
        fan_out(&client).await?;
        give_up_old(&client, config, metrics).await?;
        start_due(&client, config, metrics, sealer, &in_flight, &attempts).await?;
        if housekept.is_none_or(|at| at.elapsed() >= HOUSEKEEPING_EVERY) {
            housekeeping(&client, metrics).await?;
            housekept = Some(Instant::now());
        }
        tokio::time::sleep(PASS_EVERY).await;
    }
}

/// Turns signals not yet handed to webhooks into deliveries: one per
/// webhook of the signal's merchant that asks for its kind and was
/// registered before the signal was decided.
async fn fan_out(client: &Client) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "WITH batch AS (
                 UPDATE signals SET fanned_at = now()
                 WHERE id IN (SELECT id FROM signals WHERE fanned_at IS NULL ORDER BY id LIMIT $1)
                 RETURNING id, signal_id, kind, merchant, sku, location, payload, created_at
             )
             INSERT INTO webhook_deliveries
                 (merchant, name, signal_id, webhook_id, event, stock_key, payload, created_at)
             SELECT w.merchant, w.name, s.id, s.signal_id, s.kind,
                    s.merchant || '|' || s.sku || '|' || s.location, s.payload::text, s.created_at
             FROM batch s
             JOIN webhooks w ON w.merchant = s.merchant AND s.kind = ANY (w.events)
                 AND w.created_at <= s.created_at
             ORDER BY s.id
             ON CONFLICT (merchant, name, signal_id) DO NOTHING",
            &[&FAN_OUT_BATCH],
        )
        .await
}

/// Dead-letters every pending delivery whose signal is older than
/// `give_up_after_seconds`, attempted or not (one waiting behind its key's
/// head, or at an endpoint that never had a free slot, expires too).
async fn give_up_old(
    client: &Client,
    config: &config::Config,
    metrics: &Metrics,
) -> Result<(), tokio_postgres::Error> {
    let seconds = config.webhooks.give_up_after_seconds as f64;
    let expired = client
        .execute(
            "UPDATE webhook_deliveries SET status = 'failed',
                 last_error = coalesce(last_error || '; ', '') || 'given up: older than webhooks.give_up_after_seconds'
             WHERE status = 'pending' AND created_at < now() - $1 * interval '1 second'",
            &[&seconds],
        )
        .await?;
    if expired > 0 {
        warn!(
            expired,
            "webhook deliveries dead-lettered: not accepted in time"
        );
        metrics
            .webhook_deliveries
            .with_label_values(&["dead_lettered"])
            .inc_by(expired);
    }
    Ok(())
}

/// One delivery about to be attempted.
#[derive(Debug, Clone)]
struct Delivery {
    id: i64,
    merchant: String,
    name: String,
    webhook_id: String,
    payload: String,
    attempts: i32,
    url: String,
    secret_sealed: Vec<u8>,
}

/// Starts an attempt for every due head delivery (the oldest pending one
/// of each webhook and stock key) whose webhook has a free slot.
async fn start_due(
    client: &Arc<Client>,
    config: &Arc<config::Config>,
    metrics: &Arc<Metrics>,
    sealer: &Arc<Sealer>,
    in_flight: &InFlight,
    attempts: &Arc<tokio::sync::Semaphore>,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT h.id, h.merchant, h.name, h.webhook_id, h.payload, h.attempts, h.created_at,
                    w.url, w.secret_sealed
             FROM (SELECT DISTINCT ON (merchant, name, stock_key) *
                   FROM webhook_deliveries WHERE status = 'pending'
                   ORDER BY merchant, name, stock_key, id) h
             JOIN webhooks w USING (merchant, name)
             WHERE h.next_attempt_at <= now()
             ORDER BY h.id",
            &[],
        )
        .await?;
    let slots = config.webhooks.concurrency_per_endpoint as usize;
    for row in rows {
        let delivery = Delivery {
            id: row.get(0),
            merchant: row.get(1),
            name: row.get(2),
            webhook_id: row.get(3),
            payload: row.get(4),
            attempts: row.get(5),
            url: row.get(7),
            secret_sealed: row.get(8),
        };
        {
            let mut running = in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let endpoint = running
                .entry((delivery.merchant.clone(), delivery.name.clone()))
                .or_default();
            if endpoint.len() >= slots || endpoint.contains(&delivery.id) {
                continue;
            }
            endpoint.push(delivery.id);
        }
        let slot = Slot {
            in_flight: Arc::clone(in_flight),
            endpoint: (delivery.merchant.clone(), delivery.name.clone()),
            id: delivery.id,
        };
        let Ok(permit) = Arc::clone(attempts).try_acquire_owned() else {
            // Every attempt slot of the writer is taken: next pass.
            break;
        };
        // Claimed in the database before it is made: the attempt counts,
        // and the delivery is not due again until the attempt could have
        // ended (a query answered before this claim, or a dispatcher after
        // this one's death, cannot start it twice).
        let hold_ms = (config.webhooks.timeout_ms + CLAIM_MARGIN_MS) as f64;
        let claimed = client
            .query_opt(
                "UPDATE webhook_deliveries SET attempts = attempts + 1,
                     next_attempt_at = now() + $3 * interval '1 millisecond'
                 WHERE id = $1 AND status = 'pending' AND attempts = $2
                   AND next_attempt_at <= now()
                 RETURNING attempts",
                &[&delivery.id, &delivery.attempts, &hold_ms],
            )
            .await?;
        let Some(claimed) = claimed else {
            continue;
        };
        let attempt_number: i32 = claimed.get(0);
        let (client, config, metrics, sealer) = (
            Arc::clone(client),
            Arc::clone(config),
            Arc::clone(metrics),
            Arc::clone(sealer),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let _permit = permit;
            if let Err(error) = attempt(
                &client,
                &config,
                &metrics,
                &sealer,
                &delivery,
                attempt_number,
            )
            .await
            {
                warn!(delivery = delivery.id, %error, "recording a webhook attempt failed; it is made again after its claim");
            }
        });
    }
    Ok(())
}

/// Makes claimed attempt number `attempt` and records it.
async fn attempt(
    client: &Client,
    config: &config::Config,
    metrics: &Metrics,
    sealer: &Sealer,
    delivery: &Delivery,
    attempt: i32,
) -> Result<(), tokio_postgres::Error> {
    let started = Instant::now();
    let outcome = post(config, sealer, delivery).await;
    let duration_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
    let (status_code, error) = match &outcome {
        Ok(code) => (Some(i32::from(*code)), None),
        Err(error) => (None, Some(error.clone())),
    };
    let delivered = matches!(outcome, Ok(code) if (200..300).contains(&code));
    let error = match (&error, status_code) {
        (Some(error), _) => Some(error.clone()),
        (None, Some(code)) if !delivered => Some(format!("answered {code}")),
        _ => None,
    };
    // Times in PostgreSQL's clock (the signal's `created_at` is too): a
    // writer's clock off by hours moves nothing.
    let backoff_ms = if delivered {
        0.0
    } else {
        backoff(&config.webhooks, attempt).as_millis() as f64
    };
    let give_up_seconds = config.webhooks.give_up_after_seconds as f64;
    let recorded = client
        .query_opt(
            "WITH updated AS (
                 UPDATE webhook_deliveries SET
                     status = CASE
                         WHEN $2 THEN 'delivered'
                         WHEN created_at + $3 * interval '1 second'
                              <= now() + $4 * interval '1 millisecond' THEN 'failed'
                         ELSE 'pending' END,
                     next_attempt_at = now() + $4 * interval '1 millisecond',
                     last_status_code = $5, last_error = $6,
                     delivered_at = CASE WHEN $2 THEN now() END
                 WHERE id = $1 AND status = 'pending' AND attempts = $7
                 RETURNING id, status, extract(epoch FROM now() - created_at)::float8 AS age
             ), logged AS (
                 INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error, duration_ms)
                 SELECT id, $7, $5, $6, $8 FROM updated
                 ON CONFLICT DO NOTHING
             )
             SELECT status, age FROM updated",
            &[
                &delivery.id,
                &delivered,
                &give_up_seconds,
                &backoff_ms,
                &status_code,
                &error,
                &attempt,
                &duration_ms,
            ],
        )
        .await?;
    // A claim that lapsed (another pass made the attempt since) records
    // nothing.
    let Some(recorded) = recorded else {
        return Ok(());
    };
    let status: String = recorded.get(0);
    let age_seconds: f64 = recorded.get(1);
    let outcome = match status.as_str() {
        "delivered" => {
            metrics
                .webhook_delivery_seconds
                .observe(age_seconds.max(0.0));
            "delivered"
        }
        "failed" => {
            warn!(
                delivery = delivery.id,
                webhook = %format!("{}/{}", delivery.merchant, delivery.name),
                attempts = attempt,
                error = error.as_deref().unwrap_or_default(),
                "webhook delivery dead-lettered"
            );
            "dead_lettered"
        }
        _ => "retried",
    };
    metrics
        .webhook_deliveries
        .with_label_values(&[outcome])
        .inc();
    Ok(())
}

/// The delay before attempt `attempt + 1`: `retry_first_ms` doubled per
/// attempt made, at most `retry_max_ms`, times a jitter of 0.5 to 1.5.
fn backoff(settings: &config::WebhooksConfig, attempt: i32) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(40);
    let base = settings
        .retry_first_ms
        .saturating_mul(1u64 << doublings)
        .min(settings.retry_max_ms);
    let jitter = 0.5 + rand::random::<f64>();
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// POSTs the delivery to its checked target: the answer's status, or why
/// there was none.
async fn post(
    config: &config::Config,
    sealer: &Sealer,
    delivery: &Delivery,
) -> Result<u16, String> {
    let target = webhooks::check_target(&delivery.url, config.webhooks.allow_private_targets)
        .await
        .map_err(|refused| refused.0)?;
    let secret = sealer
        .open(&delivery.merchant, &delivery.name, &delivery.secret_sealed)
        .map_err(|refused| refused.0)?;
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature =
        webhooks::signature(&secret, &delivery.webhook_id, timestamp, &delivery.payload);
    // Connects to the checked addresses only, follows no redirect.
    // No proxy from the environment either: a proxy would resolve the
    // name again, past the check.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(config.webhooks.timeout_ms))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .resolve_to_addrs(&target.host, &target.addresses)
        .build()
        .map_err(|error| error.to_string())?;
    let response = http
        .post(target.url)
        .header("content-type", "application/json")
        .header("webhook-id", &delivery.webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(delivery.payload.clone())
        .send()
        .await
        .map_err(|error| {
            if error.is_timeout() {
                format!("no answer within {} ms", config.webhooks.timeout_ms)
            } else {
                // Without the URL: its query may hold a partner's token.
                format!("{}", error.without_url())
            }
        })?;
    Ok(response.status().as_u16())
}

/// Deletes finished deliveries past [`KEEP_FINISHED`], and counts what is
/// pending.
async fn housekeeping(client: &Client, metrics: &Metrics) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "DELETE FROM webhook_deliveries
                 WHERE status <> 'pending' AND created_at < now() - interval '{KEEP_FINISHED}'"
            ),
            &[],
        )
        .await?;
    let pending: i64 = client
        .query_one(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'",
            &[],
        )
        .await?
        .get(0);
    metrics.webhook_pending.set(pending);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_the_cap() {
        let settings = config::WebhooksConfig {
            retry_first_ms: 1_000,
            retry_max_ms: 60_000,
            ..config::WebhooksConfig::default()
        };
        for (attempt, base) in [
            (1, 1_000),
            (2, 2_000),
            (3, 4_000),
            (7, 60_000),
            (90, 60_000),
        ] {
            for _ in 0..50 {
                let delay = backoff(&settings, attempt).as_millis() as u64;
                assert!(
                    (base / 2..=base * 3 / 2).contains(&delay),
                    "attempt {attempt}: {delay} ms, base {base}"
                );
            }
        }
    }
}
