//! Coalescing: concurrent reservations on one cell become one
//! `reserve_batch` script call, and each request still gets its own answer.
//!
//! The first request on an idle cell opens a batch and schedules its flush
//! after `limits.coalesce_wait_us`; requests arriving meanwhile join it; a
//! batch that reaches `limits.coalesce_batch_max` flushes at once. The flush
//! runs as its own task, so a client that goes away never strands the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allocator::{Allocator, AllocatorError, CellRef, Hold, ReserveRequest};
use prometheus::Histogram;
use tokio::sync::oneshot;

type Answer = oneshot::Sender<Result<Hold, AllocatorError>>;

struct Batch {
    cell: CellRef,
    waiting: Vec<(ReserveRequest, Answer)>,
}

/// Open batches by cell id.
#[derive(Default)]
pub struct Coalescer {
    open: Arc<Mutex<HashMap<String, Batch>>>,
}

impl Coalescer {
    /// Reserves `request` in `cell`, batched with concurrent requests on it.
    pub async fn reserve(
        &self,
        allocator: &Allocator,
        sizes: &Histogram,
        cell: &CellRef,
        request: ReserveRequest,
        wait: Duration,
        batch_max: usize,
    ) -> Result<Hold, AllocatorError> {
        let (answer, reply) = oneshot::channel();
        let flush_now = {
            let mut open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let batch = open.entry(cell.id.clone()).or_insert_with(|| Batch {
                cell: cell.clone(),
                waiting: Vec::new(),
            });
            batch.waiting.push((request, answer));
            let first = batch.waiting.len() == 1;
            if batch.waiting.len() >= batch_max.max(1) {
                open.remove(&cell.id).map(|batch| (batch, Duration::ZERO))
            } else if first {
                Some((
                    Batch {
                        cell: cell.clone(),
                        waiting: Vec::new(),
                    },
                    wait,
                ))
            } else {
                None
            }
        };
        if let Some((batch, delay)) = flush_now {
            let open = Arc::clone(&self.open);
            let allocator = allocator.clone();
            let sizes = sizes.clone();
            tokio::spawn(async move {
                let batch = if batch.waiting.is_empty() {
                    // The opener: wait for company, then take whatever joined.
                    tokio::time::sleep(delay).await;
                    let taken = open
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&batch.cell.id);
                    match taken {
                        Some(batch) => batch,
                        None => return, // flushed already because it filled up
                    }
                } else {
                    batch
                };
                flush(&allocator, &sizes, batch).await;
            });
        }
        reply.await.unwrap_or_else(|_| {
            Err(AllocatorError::StoreUnavailable(
                "reservation batch was dropped".to_owned(),
            ))
        })
    }
}

async fn flush(allocator: &Allocator, sizes: &Histogram, batch: Batch) {
    let (requests, answers): (Vec<_>, Vec<_>) = batch.waiting.into_iter().unzip();
    sizes.observe(requests.len() as f64);
    match allocator.reserve_batch(&batch.cell, &requests).await {
        Ok(results) => {
            for (answer, result) in answers.into_iter().zip(results) {
                let _ = answer.send(result);
            }
        }
        Err(error) => {
            let message = error.to_string();
            for answer in answers {
                let _ = answer.send(Err(match &error {
                    AllocatorError::StoreUnavailable(_) => {
                        AllocatorError::StoreUnavailable(message.clone())
                    }
                    AllocatorError::InvalidRequest(_) => {
                        AllocatorError::InvalidRequest(message.clone())
                    }
                    _ => AllocatorError::Protocol(message.clone()),
                }));
            }
        }
    }
}
