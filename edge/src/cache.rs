//! Exact-match response cache at the edge, opt-in per request.
//!
//! A caller asks for it with `x-switchyard-cache: use` (and optionally
//! `x-switchyard-cache-ttl: SECONDS`, at most a day; default five minutes).
//! The key is the SHA-256 of the tenant, the request's jurisdictions, the
//! endpoint and the body with its JSON keys sorted, so two tenants, or one
//! tenant under two residency sets, never share an entry, and a request
//! differing in any parameter (model, temperature, stream, ...) misses.
//!
//! A miss is teed as it is written ([`CacheTee`], a response observer):
//! every frame of a stream or the whole body, already in the caller's
//! protocol; a complete 200 answer is stored, a failed, cut or oversized
//! one is not. A hit replays it (a stream as the same SSE frames) without
//! planning or calling a provider, with `x-switchyard-cache: hit`; its
//! ledger record says `cache_hit` and costs nothing. Entries live in a
//! bounded in-memory cache (moka, weighed by bytes) and, when the edge has
//! a Redis, there too (with the entry's TTL), so every edge sharing it
//! serves what one of them stored; the edge looks in its memory first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ctx::RequestCtx;
use crate::hooks::ResponseObserver;
use crate::limits::RedisLink;

pub const HEADER: &str = "x-switchyard-cache";
pub const TTL_HEADER: &str = "x-switchyard-cache-ttl";
/// [`HEADER`] as the answer carries it.
pub const HEADER_NAME: http::HeaderName = http::HeaderName::from_static(HEADER);
const DEFAULT_TTL: Duration = Duration::from_secs(300);
const MAX_TTL: Duration = Duration::from_secs(86_400);
/// Larger answers are not kept.
const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// A stored answer, in the caller's protocol.
#[derive(Debug)]
pub struct CachedAnswer {
    pub stream: bool,
    /// The whole body, or each SSE frame as it was written.
    pub frames: Vec<Bytes>,
    expires_at: Instant,
}

/// What `admit` decided for a request that asked for the cache.
#[derive(Debug, Clone)]
pub struct CacheKey {
    pub key: [u8; 32],
    pub ttl: Duration,
}

pub struct ResponseCache {
    entries: moka::sync::Cache<[u8; 32], Arc<CachedAnswer>>,
    /// `switchyard_cache_lookups_total{result="hit|miss"}`.
    lookups: prometheus::IntCounterVec,
    /// Answers being teed, by request id.
    pending: Mutex<HashMap<String, Pending>>,
    shared: Option<Arc<RedisLink>>,
}

const REDIS_PREFIX: &str = "switchyard:cache:";

struct Pending {
    key: CacheKey,
    stream: bool,
    frames: Vec<Bytes>,
    bytes: usize,
    ok: bool,
}

impl ResponseCache {
    /// A cache holding at most `max_bytes` of answers.
    pub fn new(max_bytes: u64) -> Arc<Self> {
        Arc::new(ResponseCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, v: &Arc<CachedAnswer>| {
                    v.frames
                        .iter()
                        .map(|f| f.len() as u32)
                        .fold(64u32, u32::saturating_add)
                })
                .time_to_live(MAX_TTL)
                .build(),
            lookups: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "cache_lookups_total",
                    "Response-cache lookups of requests that opted in, by result (hit|miss)",
                ),
                &["result"],
            )
            .expect("metric"),
            pending: Mutex::new(HashMap::new()),
            shared: None,
        })
    }

    /// The same, with a second tier in Redis shared by edges.
    pub fn with_redis(max_bytes: u64, link: Arc<RedisLink>) -> Arc<Self> {
        let mut cache = Arc::into_inner(Self::new(max_bytes)).expect("new cache");
        cache.shared = Some(link);
        Arc::new(cache)
    }

    /// The key of a request that opted in, or `None`.
    pub fn key_for(
        opt_in: Option<&str>,
        ttl: Option<&str>,
        tenant: &str,
        residency: Option<&[String]>,
        endpoint: &str,
        raw: bool,
        body: &[u8],
    ) -> Option<CacheKey> {
        if !opt_in.is_some_and(|v| v.trim().eq_ignore_ascii_case("use")) {
            return None;
        }
        let value: Value = serde_json::from_slice(body).ok()?;
        let mut canonical = Vec::with_capacity(body.len());
        write_sorted(&value, &mut canonical);
        let mut h = Sha256::new();
        for part in [tenant.as_bytes(), endpoint.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        // A raw answer is in the provider's own format: never the entry of
        // the normalised one.
        h.update([u8::from(raw)]);
        match residency {
            None => h.update(b"*"),
            Some(list) => {
                let mut list = list.to_vec();
                list.sort();
                for j in list {
                    h.update((j.len() as u64).to_le_bytes());
                    h.update(j.as_bytes());
                }
            }
        }
        h.update(&canonical);
        let ttl = ttl
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map_or(DEFAULT_TTL, Duration::from_secs)
            .min(MAX_TTL);
        Some(CacheKey {
            key: h.finalize().into(),
            ttl,
        })
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        let mut hit = self
            .entries
            .get(&key.key)
            .filter(|hit| hit.expires_at > Instant::now());
        if hit.is_none() {
            if let Some(link) = &self.shared {
                hit = self.get_shared(link, key).await;
            }
        }
        self.lookups
            .with_label_values(&[if hit.is_some() { "hit" } else { "miss" }])
            .inc();
        hit
    }

    async fn get_shared(&self, link: &RedisLink, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        let mut conn = link.connection().await.ok()?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(redis_key(&key.key));
        let read = tokio::time::timeout(
            link.timeout(),
            cmd.query_async::<Option<Vec<u8>>>(&mut conn),
        );
        let bytes = read.await.ok()?.ok()??;
        let (stream, frames) = decode(&bytes)?;
        // Redis expires the entry; here it lives at most as long again.
        let answer = Arc::new(CachedAnswer {
            stream,
            frames,
            expires_at: Instant::now() + key.ttl,
        });
        self.entries.insert(key.key, answer.clone());
        Some(answer)
    }

    fn store(&self, key: &CacheKey, answer: CachedAnswer) {
        if let Some(link) = self.shared.clone() {
            let bytes = encode(answer.stream, &answer.frames);
            let (name, ttl_ms) = (redis_key(&key.key), key.ttl.as_millis() as u64);
            // Off the request path; a Redis that is down only costs misses.
            tokio::spawn(async move {
                let Ok(mut conn) = link.connection().await else {
                    return;
                };
                let mut cmd = redis::cmd("SET");
                cmd.arg(name).arg(bytes).arg("PX").arg(ttl_ms.max(1));
                let _ =
                    tokio::time::timeout(link.timeout(), cmd.query_async::<()>(&mut conn)).await;
            });
        }
        self.entries.insert(key.key, Arc::new(answer));
    }

    pub fn register(&self, registry: &prometheus::Registry) {
        // Both series from the start: a hit ratio of 0 is not "no data".
        self.lookups.with_label_values(&["hit"]);
        self.lookups.with_label_values(&["miss"]);
        let _ = registry.register(Box::new(self.lookups.clone()));
    }

    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn redis_key(key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(REDIS_PREFIX.len() + 64);
    s.push_str(REDIS_PREFIX);
    for b in key {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// `[stream flag][frame count u32][len u32, bytes]...`, little-endian.
fn encode(stream: bool, frames: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + frames.iter().map(|f| f.len() + 4).sum::<usize>());
    out.push(u8::from(stream));
    out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

fn decode(bytes: &[u8]) -> Option<(bool, Vec<Bytes>)> {
    let stream = *bytes.first()? == 1;
    let u32_at = |i: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?) as usize)
    };
    let n = u32_at(1)?;
    let mut at = 5;
    let mut frames = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let len = u32_at(at)?;
        let frame = bytes.get(at + 4..at + 4 + len)?;
        frames.push(Bytes::copy_from_slice(frame));
        at += 4 + len;
    }
    (at == bytes.len()).then_some((stream, frames))
}

/// JSON with object keys sorted at every level, so key order in the
/// caller's body does not change the cache key.
fn write_sorted(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_sorted(&map[k.as_str()], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(item, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// Tees answers of requests that missed into the cache.
pub struct CacheTee(pub Arc<ResponseCache>);

impl ResponseObserver for CacheTee {
    fn on_commit(&self, ctx: &RequestCtx, status: u16) {
        if let Some(key) = &ctx.cache_key {
            self.0.pending.lock().insert(
                ctx.request_id.clone(),
                Pending {
                    key: key.clone(),
                    stream: ctx.stream,
                    frames: Vec::new(),
                    bytes: 0,
                    ok: status == 200,
                },
            );
        }
    }

    fn on_body(&self, ctx: &RequestCtx, chunk: &Bytes) {
        if ctx.cache_key.is_none() {
            return;
        }
        let mut pending = self.0.pending.lock();
        if let Some(p) = pending.get_mut(&ctx.request_id) {
            p.bytes += chunk.len();
            if p.bytes > MAX_ENTRY_BYTES {
                p.ok = false;
                p.frames.clear();
            } else if p.ok {
                p.frames.push(chunk.clone());
            }
        }
    }

    fn on_end(&self, ctx: &RequestCtx) {
        if ctx.cache_key.is_none() {
            return;
        }
        let Some(p) = self.0.pending.lock().remove(&ctx.request_id) else {
            return;
        };
        let failed = ctx.client_gone || ctx.stats.as_ref().is_some_and(|s| s.stream_failed());
        if p.ok && !failed && !p.frames.is_empty() {
            self.0.store(
                &p.key,
                CachedAnswer {
                    stream: p.stream,
                    frames: p.frames,
                    expires_at: Instant::now() + p.key.ttl,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_answers_round_trip_and_garbage_is_refused() {
        let frames = vec![Bytes::from_static(b"data: 1\n\n"), Bytes::new()];
        let bytes = encode(true, &frames);
        assert_eq!(decode(&bytes), Some((true, frames)));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode(b""), None);
        assert_eq!(decode(&[0, 255, 255, 255, 255]), None);
    }

    #[test]
    fn keys_ignore_json_key_order_but_not_tenants_or_parameters() {
        let k = |tenant: &str, res: Option<&[String]>, body: &str| {
            ResponseCache::key_for(
                Some("use"),
                None,
                tenant,
                res,
                "chat",
                false,
                body.as_bytes(),
            )
            .unwrap()
            .key
        };
        let a = k(
            "t",
            None,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"x"}]}"#,
        );
        let b = k(
            "t",
            None,
            r#"{"messages":[{"content":"x","role":"user"}],"temperature":0,"model":"m"}"#,
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            k(
                "u",
                None,
                r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"x"}]}"#
            )
        );
        assert_ne!(
            a,
            k(
                "t",
                None,
                r#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"x"}]}"#
            )
        );
        let eu = ["eu".to_string()];
        assert_ne!(
            a,
            k(
                "t",
                Some(&eu),
                r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"x"}]}"#
            )
        );
        let raw = ResponseCache::key_for(Some("use"), None, "t", None, "chat", true, b"{}");
        let normal = ResponseCache::key_for(Some("use"), None, "t", None, "chat", false, b"{}");
        assert_ne!(raw.unwrap().key, normal.unwrap().key);
        assert!(ResponseCache::key_for(None, None, "t", None, "chat", false, b"{}").is_none());
    }
}
