//! The node side of the usage ledger: a bounded buffer of records that a
//! background task ships to the control plane (`ShipUsage`).
//!
//! A record leaves the buffer only once the control plane acknowledged the
//! batch holding it (stored, or already stored: records carry a unique id),
//! so a control plane that is down or restarting loses nothing; the buffer
//! keeps up to its capacity meanwhile and counts what it had to drop.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::pb;
use crate::pb::node_client::NodeClient;
use crate::server::MAX_USAGE_BATCH;

/// Records a node holds while the control plane is unreachable.
pub const DEFAULT_CAPACITY: usize = 100_000;
const SHIP_EVERY: Duration = Duration::from_millis(500);
const SHIP_TIMEOUT: Duration = Duration::from_secs(5);

/// A cheap-to-clone handle on a node's ledger buffer.
#[derive(Clone)]
pub struct Ledger(Arc<Inner>);

struct Inner {
    queue: Mutex<VecDeque<pb::UsageRecordMsg>>,
    capacity: usize,
    dropped: AtomicU64,
    shipped: AtomicU64,
    wake: Notify,
}

impl Ledger {
    pub fn new(capacity: usize) -> Self {
        Ledger(Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            capacity,
            dropped: AtomicU64::new(0),
            shipped: AtomicU64::new(0),
            wake: Notify::new(),
        }))
    }

    /// Buffers one record; false (and counted) when the buffer is full.
    pub fn push(&self, record: pb::UsageRecordMsg) -> bool {
        let mut q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.0.capacity {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.push_back(record);
        if q.len() >= MAX_USAGE_BATCH {
            self.0.wake.notify_one();
        }
        true
    }

    /// Records waiting for the control plane.
    pub fn pending(&self) -> usize {
        self.0.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Records lost because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }

    /// Records the control plane acknowledged.
    pub fn shipped(&self) -> u64 {
        self.0.shipped.load(Ordering::Relaxed)
    }

    fn front(&self, n: usize) -> Vec<pb::UsageRecordMsg> {
        let q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().take(n).cloned().collect()
    }

    fn acknowledge(&self, n: usize) {
        let mut q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = n.min(q.len());
        q.drain(..n);
        self.0.shipped.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Ships the buffer's oldest records in batches, retrying with backoff;
/// runs for the agent's lifetime.
pub(crate) async fn ship_loop(
    node_id: String,
    channels: tokio::sync::watch::Receiver<Channel>,
    ledger: Ledger,
) {
    let mut failures = 0u32;
    loop {
        let pause = if failures == 0 {
            SHIP_EVERY
        } else {
            (SHIP_EVERY * 2u32.saturating_pow(failures.min(5))).min(Duration::from_secs(10))
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = ledger.0.wake.notified(), if failures == 0 => {}
        }
        // The current channel: a renewed certificate applies from here.
        let mut client = NodeClient::new(channels.borrow().clone());
        loop {
            let batch = ledger.front(MAX_USAGE_BATCH);
            if batch.is_empty() {
                break;
            }
            let n = batch.len();
            let call = client.ship_usage(pb::UsageBatch {
                node_id: node_id.clone(),
                records: batch,
            });
            match tokio::time::timeout(SHIP_TIMEOUT, call).await {
                Ok(Ok(_)) => {
                    ledger.acknowledge(n);
                    failures = 0;
                }
                Ok(Err(e)) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(error = %e, pending = ledger.pending(), "usage not shipped; keeping it");
                    break;
                }
                Err(_) => {
                    failures = failures.saturating_add(1);
                    break;
                }
            }
        }
    }
}
