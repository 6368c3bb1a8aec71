//! `propagation`: how long after a reservation on node A its effect is on
//! node B's screen. For each of `--changes` reservations of one unit on A
//! (a key of its own, nothing else touching it), it times, from the moment
//! A's 201 reached the client:
//! * **sse**: the first `availability` event on a stream from B showing
//!   the new count;
//! * **read**: the first plain read on B (polled every `--poll-ms`) that
//!   shows it.
//!
//! A change B already showed when the 201 arrived counts as 0 ms. Prints
//! one JSON object: the samples' p50, p99 and max per path, in ms, and
//! how many changes never showed within `--timeout-ms` (counted as lost,
//! never as fast).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::watch;

#[derive(Parser)]
struct Args {
    /// Node A, where reservations are made.
    #[arg(long)]
    a: String,
    /// Node B, where their effect is watched.
    #[arg(long)]
    b: String,
    #[arg(long)]
    merchant: String,
    /// A SKU nothing else touches, stocked with at least `changes` units at `location`.
    #[arg(long)]
    sku: String,
    #[arg(long, default_value = "dc1")]
    location: String,
    /// Bearer key with checkout and read scopes.
    #[arg(long)]
    key: String,
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Pause between reservations.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    #[arg(long, default_value_t = 1)]
    poll_ms: u64,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Hold lifetime of the probe's reservations.
    #[arg(long, default_value_t = 30)]
    ttl_seconds: u64,
}

fn available(body: &Value) -> Option<i64> {
    body["available"].as_i64()
}

/// Follows B's stream; publishes each event's `available`.
async fn follow(
    client: reqwest::Client,
    url: String,
    key: String,
    seen: watch::Sender<Option<i64>>,
) -> anyhow::Result<()> {
    let mut response = client
        .get(&url)
        .bearer_auth(&key)
        .send()
        .await?
        .error_for_status()?;
    let mut buffer = String::new();
    while let Some(chunk) = response.chunk().await? {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|line| line.strip_prefix("data: "))
                && let Ok(body) = serde_json::from_str::<Value>(data)
            {
                let _ = seen.send(available(&body));
            }
        }
    }
    bail!("the stream from node B ended")
}

fn percentiles(mut samples: Vec<f64>) -> Value {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| -> Value {
        if samples.is_empty() {
            return Value::Null;
        }
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        json!((samples[index] * 1000.0).round() / 1000.0)
    };
    json!({ "samples": samples.len(), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1.0) })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let stream_client = reqwest::Client::builder().build()?;
    let read_url = format!(
        "{}/v1/availability/{}/{}?location={}",
        args.b, args.merchant, args.sku, args.location
    );
    let stream_url = format!(
        "{}/v1/stream?merchant={}&sku={}",
        args.b, args.merchant, args.sku
    );
    let (seen, mut events) = watch::channel(None);
    let follower = tokio::spawn(follow(stream_client, stream_url, args.key.clone(), seen));
    // The stream's first event is the current state.
    tokio::time::timeout(Duration::from_secs(5), events.wait_for(Option::is_some))
        .await
        .context("no first event on node B's stream")??;
    let read = |client: reqwest::Client, url: String, key: String| async move {
        let body: Value = client
            .get(&url)
            .bearer_auth(&key)
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(available(&body))
    };
    let mut expected = read(client.clone(), read_url.clone(), args.key.clone())
        .await?
        .context("the probe key has no availability on node B")?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let (mut sse, mut reads, mut lost_sse, mut lost_reads) = (Vec::new(), Vec::new(), 0, 0);
    let run = std::process::id();
    for change in 0..args.changes {
        let body = json!({
            "merchant": args.merchant, "ttl_seconds": args.ttl_seconds,
            "lines": [{ "sku": args.sku, "location": args.location, "qty": 1 }],
        });
        let response = client
            .post(format!("{}/v1/reservations", args.a))
            .bearer_auth(&args.key)
            .header("Idempotency-Key", format!("propagation-{run}-{change}"))
            .json(&body)
            .send()
            .await?;
        if response.status().as_u16() != 201 {
            bail!(
                "reservation {change} on node A answered {}",
                response.status()
            );
        }
        let answered = Instant::now();
        expected -= 1;
        let shows = |value: Option<i64>| value.is_some_and(|value| value <= expected);
        // Both watched at once, from the same instant.
        let stream_wait = async {
            let mut events = events.clone();
            tokio::time::timeout(timeout, events.wait_for(|value| shows(*value)))
                .await
                .ok()
                .map(|_| answered.elapsed())
        };
        let read_wait = async {
            loop {
                if shows(read(client.clone(), read_url.clone(), args.key.clone()).await?) {
                    return anyhow::Ok(Some(answered.elapsed()));
                }
                if answered.elapsed() > timeout {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
            }
        };
        let (stream_after, read_after) = tokio::join!(stream_wait, read_wait);
        match stream_after {
            Some(after) => sse.push(after.as_secs_f64() * 1000.0),
            None => lost_sse += 1,
        }
        match read_after? {
            Some(after) => reads.push(after.as_secs_f64() * 1000.0),
            None => lost_reads += 1,
        }
        events.mark_unchanged();
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    follower.abort();
    println!(
        "{}",
        json!({
            "changes": args.changes,
            "sse": percentiles(sse), "sse_never_shown": lost_sse,
            "read": percentiles(reads), "read_never_shown": lost_reads,
        })
    );
    Ok(())
}
