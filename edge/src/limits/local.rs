//! Counters held in this edge's memory: the whole store when no Redis is
//! configured (each edge then enforces the share of every limit the
//! control plane leased it), and the fallback while Redis is unreachable
//! for tenants that fail open.

use std::collections::HashMap;
use std::hash::BuildHasher;

use parking_lot::Mutex;

use super::{Check, Decision};

const SHARDS: usize = 32;
/// Expired counters are swept from a shard every this many operations.
const SWEEP_EVERY: u32 = 1024;

#[derive(Default)]
struct Shard {
    slots: HashMap<Box<str>, Slot>,
    ops: u32,
}

struct Slot {
    value: i64,
    expires_ms: u64,
}

/// Sharded by tenant: one request's checks (its tenant's and its key's
/// counters) live in one shard, so they are checked and counted under one
/// short lock that is never held across an await, and tenants do not
/// contend with each other.
pub struct LocalCounters {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for LocalCounters {
    fn default() -> Self {
        LocalCounters {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: Default::default(),
        }
    }
}

impl LocalCounters {
    fn shard(&self, tenant: &str) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(tenant) as usize % SHARDS]
    }

    /// All checks pass and are counted, or none is counted.
    pub fn acquire(&self, tenant: &str, checks: &[Check], now_ms: u64) -> Decision {
        let mut shard = self.shard(tenant).lock();
        shard.ops = shard.ops.wrapping_add(1);
        if shard.ops.is_multiple_of(SWEEP_EVERY) {
            shard.slots.retain(|_, s| s.expires_ms > now_ms);
        }
        let current = |shard: &Shard, key: &str| {
            shard
                .slots
                .get(key)
                .filter(|s| s.expires_ms > now_ms)
                .map_or(0, |s| s.value)
        };
        let previous =
            |shard: &Shard, c: &Check| c.previous.as_deref().map_or(0, |k| current(shard, k));
        for (i, c) in checks.iter().enumerate() {
            let (now, before) = (current(&shard, &c.key), previous(&shard, c));
            let used = c.effective(now, before);
            if c.exceeded_by(used) {
                return Decision::Refused {
                    index: i,
                    used,
                    retry_ms: c.retry_ms(now, before),
                };
            }
        }
        let mut after = Vec::with_capacity(checks.len());
        for c in checks {
            let used = current(&shard, &c.key);
            let before = previous(&shard, c);
            let slot = shard.slots.entry(c.key.as_str().into()).or_insert(Slot {
                value: 0,
                expires_ms: 0,
            });
            slot.value = used + c.cost;
            slot.expires_ms = now_ms + c.ttl_ms;
            let value = slot.value;
            after.push(c.effective(value, before));
        }
        Decision::Admitted { after }
    }

    /// Adds `delta` to counters counted earlier (token corrections, a
    /// finished request, its cost); an expired counter stays expired.
    pub fn adjust(&self, tenant: &str, adjustments: &[(String, i64)], now_ms: u64) {
        let mut shard = self.shard(tenant).lock();
        for (key, delta) in adjustments {
            if let Some(slot) = shard.slots.get_mut(key.as_str()) {
                if slot.expires_ms > now_ms {
                    slot.value = (slot.value + delta).max(0);
                }
            }
        }
    }

    /// The value of a counter (for tests and the budget figures).
    pub fn get(&self, tenant: &str, key: &str, now_ms: u64) -> i64 {
        let shard = self.shard(tenant).lock();
        shard
            .slots
            .get(key)
            .filter(|s| s.expires_ms > now_ms)
            .map_or(0, |s| s.value)
    }
}
