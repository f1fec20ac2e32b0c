//! Counters shared by every edge in Redis, so a limit holds across the
//! fleet rather than per edge.
//!
//! One Lua script checks every counter of a request and counts it only if
//! all pass, atomically on the Redis server: two edges cannot both take the
//! last slot. Each call has a deadline; a Redis that is down or slow is an
//! error the caller turns into fail-open or fail-closed per tenant.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{Check, Decision};

/// KEYS: counters. ARGV: per counter `limit, cost, ttl_ms`. Returns
/// `{0, value...}` after counting, or `{index (1-based), used}` for the
/// first counter that would go over its limit (nothing counted then).
const ACQUIRE: &str = r#"
local n = #KEYS
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit = tonumber(ARGV[(i - 1) * 3 + 1])
  local cost = tonumber(ARGV[(i - 1) * 3 + 2])
  if cost < 1 then cost = 1 end
  if used + cost > limit then return {i, used} end
end
local out = {0}
for i = 1, n do
  local v = redis.call('INCRBY', KEYS[i], ARGV[(i - 1) * 3 + 2])
  redis.call('PEXPIRE', KEYS[i], ARGV[(i - 1) * 3 + 3])
  out[i + 1] = v
end
return out
"#;

/// KEYS: counters. ARGV: deltas. Counters that expired meanwhile are left
/// alone (a correction must not resurrect a finished window).
const ADJUST: &str = r#"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local v = redis.call('INCRBY', KEYS[i], ARGV[i])
    if v < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 0
"#;

/// Prefix of every key this module writes.
const PREFIX: &str = "switchyard:limits:";
/// After a failed connection attempt, requests do not try again for this
/// long (they fail open or closed at once instead of each waiting).
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// One Redis for an edge (limit counters, response cache): a connection
/// made on first use that reconnects by itself, and a deadline per call.
pub struct RedisLink {
    client: redis::Client,
    timeout: Duration,
    conn: Mutex<Conn>,
}

#[derive(Default)]
struct Conn {
    manager: Option<ConnectionManager>,
    last_attempt: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis is unreachable (reconnecting)")]
    Unreachable,
}

impl RedisLink {
    /// `url` as redis-rs reads it (`redis://host:port/db`); nothing is
    /// dialled until the first call.
    pub fn new(url: &str, timeout: Duration) -> Result<Arc<Self>, redis::RedisError> {
        Ok(Arc::new(RedisLink {
            client: redis::Client::open(url)?,
            timeout,
            conn: Mutex::new(Conn::default()),
        }))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub async fn connection(&self) -> Result<ConnectionManager, SharedError> {
        {
            let mut c = self.conn.lock();
            if let Some(m) = &c.manager {
                return Ok(m.clone());
            }
            if c.last_attempt
                .is_some_and(|t| t.elapsed() < RECONNECT_PAUSE)
            {
                return Err(SharedError::Unreachable);
            }
            c.last_attempt = Some(Instant::now());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| SharedError::Timeout(self.timeout))??;
        self.conn.lock().manager = Some(manager.clone());
        Ok(manager)
    }
}

pub struct SharedCounters {
    link: Arc<RedisLink>,
    acquire: Script,
    adjust: Script,
}

impl SharedCounters {
    pub fn new(link: Arc<RedisLink>) -> Self {
        SharedCounters {
            link,
            acquire: Script::new(ACQUIRE),
            adjust: Script::new(ADJUST),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, SharedError> {
        self.link.connection().await
    }

    pub async fn acquire(&self, checks: &[Check]) -> Result<Decision, SharedError> {
        let mut conn = self.connection().await?;
        let mut call = self.acquire.prepare_invoke();
        for c in checks {
            call.key(format!("{PREFIX}{}", c.key));
            call.arg(c.limit).arg(c.cost).arg(c.ttl_ms);
        }
        let reply: Vec<i64> =
            tokio::time::timeout(self.link.timeout(), call.invoke_async(&mut conn))
                .await
                .map_err(|_| SharedError::Timeout(self.link.timeout()))??;
        match reply.split_first() {
            Some((0, after)) => Ok(Decision::Admitted {
                after: after.to_vec(),
            }),
            Some((&i, rest)) if i >= 1 => Ok(Decision::Refused {
                index: (i - 1) as usize,
                used: rest.first().copied().unwrap_or(0),
            }),
            _ => Err(SharedError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "limit script answered an unexpected shape",
            )))),
        }
    }

    pub async fn adjust(&self, adjustments: &[(String, i64)]) -> Result<(), SharedError> {
        if adjustments.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        let mut call = self.adjust.prepare_invoke();
        for (key, delta) in adjustments {
            call.key(format!("{PREFIX}{key}"));
            call.arg(*delta);
        }
        let _: i64 = tokio::time::timeout(self.link.timeout(), call.invoke_async(&mut conn))
            .await
            .map_err(|_| SharedError::Timeout(self.link.timeout()))??;
        Ok(())
    }
}
