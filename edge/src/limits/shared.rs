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

/// KEYS: per counter, the counter and the previous window's (the same key
/// again for fixed windows, at weight 0). ARGV: per counter `limit, cost,
/// ttl_ms, weight_ppm`. The count compared with the limit is the counter
/// plus the previous window's share (`floor(previous * weight / 1e6)`, the
/// sliding-window estimate, as [`Check::effective`]). Returns `{0, count...}`
/// after counting, or `{index (1-based), count, current, previous}` for the
/// first counter that would go over its limit (nothing counted then).
const ACQUIRE: &str = r#"
local n = #KEYS / 2
local function counts(i)
  local cur = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local prev = 0
  local w = tonumber(ARGV[(i - 1) * 4 + 4])
  if w > 0 then
    prev = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  end
  return cur, prev, cur + math.floor(prev * w / 1000000)
end
for i = 1, n do
  local cur, prev, used = counts(i)
  local limit = tonumber(ARGV[(i - 1) * 4 + 1])
  local cost = tonumber(ARGV[(i - 1) * 4 + 2])
  if cost < 1 then cost = 1 end
  if used + cost > limit then return {i, used, cur, prev} end
end
local out = {0}
for i = 1, n do
  local _, prev, _ = counts(i)
  local w = tonumber(ARGV[(i - 1) * 4 + 4])
  local v = redis.call('INCRBY', KEYS[2 * i - 1], ARGV[(i - 1) * 4 + 2])
  redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[(i - 1) * 4 + 3])
  out[i + 1] = v + math.floor(prev * w / 1000000)
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
            call.key(format!(
                "{PREFIX}{}",
                c.previous.as_deref().unwrap_or(c.key.as_str())
            ));
            call.arg(c.limit)
                .arg(c.cost)
                .arg(c.ttl_ms)
                .arg(if c.previous.is_some() {
                    c.weight_ppm
                } else {
                    0
                });
        }
        let reply: Vec<i64> =
            tokio::time::timeout(self.link.timeout(), call.invoke_async(&mut conn))
                .await
                .map_err(|_| SharedError::Timeout(self.link.timeout()))??;
        match reply.split_first() {
            Some((0, after)) => Ok(Decision::Admitted {
                after: after.to_vec(),
            }),
            Some((&i, rest)) if i >= 1 && (i as usize) <= checks.len() => {
                let index = (i - 1) as usize;
                let at = |n: usize| rest.get(n).copied().unwrap_or(0);
                Ok(Decision::Refused {
                    index,
                    used: at(0),
                    retry_ms: checks[index].retry_ms(at(1), at(2)),
                })
            }
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
