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
    let mut housekept = Instant::now() - HOUSEKEEPING_EVERY;
    loop {
        if client.is_closed() {
            anyhow::bail!("the dispatcher's postgresql connection closed");
        }
        fan_out(&client).await?;
        start_due(&client, config, metrics, sealer, &in_flight).await?;
        if housekept.elapsed() >= HOUSEKEEPING_EVERY {
            housekeeping(&client, metrics).await?;
            housekept = Instant::now();
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

/// One delivery about to be attempted.
#[derive(Debug, Clone)]
struct Delivery {
    id: i64,
    merchant: String,
    name: String,
    webhook_id: String,
    payload: String,
    attempts: i32,
    created_at: time::OffsetDateTime,
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
            created_at: row.get(6),
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
        let (client, config, metrics, sealer, in_flight) = (
            Arc::clone(client),
            Arc::clone(config),
            Arc::clone(metrics),
            Arc::clone(sealer),
            Arc::clone(in_flight),
        );
        tokio::spawn(async move {
            if let Err(error) = attempt(&client, &config, &metrics, &sealer, &delivery).await {
                warn!(delivery = delivery.id, %error, "recording a webhook attempt failed; it is made again");
            }
            let mut running = in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(endpoint) = running.get_mut(&(delivery.merchant, delivery.name)) {
                endpoint.retain(|id| *id != delivery.id);
            }
        });
    }
    Ok(())
}

/// Makes one attempt and records it.
async fn attempt(
    client: &Client,
    config: &config::Config,
    metrics: &Metrics,
    sealer: &Sealer,
    delivery: &Delivery,
) -> Result<(), tokio_postgres::Error> {
    let started = Instant::now();
    let outcome = post(config, sealer, delivery).await;
    let duration_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
    let attempt = delivery.attempts + 1;
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
    let now = time::OffsetDateTime::now_utc();
    let give_up_at =
        delivery.created_at + Duration::from_secs(config.webhooks.give_up_after_seconds);
    let (status, next) = if delivered {
        ("delivered", now)
    } else {
        let next = now + backoff(&config.webhooks, attempt);
        if next >= give_up_at {
            ("failed", now)
        } else {
            ("pending", next)
        }
    };
    client
        .execute(
            "WITH updated AS (
                 UPDATE webhook_deliveries SET status = $2, attempts = $3, next_attempt_at = $4,
                     last_status_code = $5, last_error = $6,
                     delivered_at = CASE WHEN $2 = 'delivered' THEN now() END
                 WHERE id = $1 AND status = 'pending'
                 RETURNING id
             )
             INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error, duration_ms)
             SELECT id, $3, $5, $6, $7 FROM updated
             ON CONFLICT DO NOTHING",
            &[
                &delivery.id,
                &status,
                &attempt,
                &next,
                &status_code,
                &error,
                &duration_ms,
            ],
        )
        .await?;
    let outcome = match status {
        "delivered" => {
            metrics
                .webhook_delivery_seconds
                .observe((now - delivery.created_at).as_seconds_f64().max(0.0));
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
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(config.webhooks.timeout_ms))
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
                format!("{error}")
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
