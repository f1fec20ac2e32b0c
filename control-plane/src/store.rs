//! Where policy versions and the node registry live: SQLite (one file,
//! created on first start) or PostgreSQL (several control-plane replicas).
//!
//! One SQL text serves both: `$N` placeholders (SQLite accepts them too),
//! `BIGINT`/`TEXT` columns only, and `INSERT ... RETURNING`. Each method
//! runs the same query on whichever pool is open, so there is no second
//! implementation to drift. Migrations are embedded and run by sqlx's
//! migrator (PostgreSQL takes an advisory lock, so two replicas starting at
//! once do not race).

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Row, SqlSafeStr};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "policy versions and node registry",
        "CREATE TABLE policy_versions (
        version BIGINT PRIMARY KEY,
        yaml TEXT NOT NULL,
        author TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        comment TEXT NOT NULL
    );
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        region TEXT NOT NULL,
        build TEXT NOT NULL,
        acked_version BIGINT NOT NULL DEFAULT 0,
        nacked_version BIGINT NOT NULL DEFAULT 0,
        nack_reason TEXT NOT NULL DEFAULT '',
        last_seen_ms BIGINT NOT NULL,
        connected BIGINT NOT NULL DEFAULT 0,
        replica TEXT NOT NULL DEFAULT ''
    );",
    ),
    (
        2,
        "virtual keys",
        "CREATE TABLE virtual_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        key_sha256 TEXT NOT NULL UNIQUE,
        models TEXT NOT NULL DEFAULT '',
        rpm BIGINT NOT NULL DEFAULT 0,
        tpm BIGINT NOT NULL DEFAULT 0,
        concurrency BIGINT NOT NULL DEFAULT 0,
        daily_micro_usd BIGINT NOT NULL DEFAULT 0,
        monthly_micro_usd BIGINT NOT NULL DEFAULT 0,
        expires_at_ms BIGINT NOT NULL DEFAULT 0,
        created_at_ms BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        revoked_at_ms BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX virtual_keys_tenant ON virtual_keys (tenant);",
    ),
    (
        3,
        "usage ledger",
        "CREATE TABLE usage_records (
        uid TEXT PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        request_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        route TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        region TEXT NOT NULL,
        egress TEXT NOT NULL,
        key_pool TEXT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        reasoning_tokens BIGINT NOT NULL,
        cost_micro_usd BIGINT NOT NULL,
        latency_ms BIGINT NOT NULL,
        ttft_ms BIGINT NOT NULL,
        status BIGINT NOT NULL,
        attempts BIGINT NOT NULL,
        cache_hit BIGINT NOT NULL,
        node TEXT NOT NULL,
        endpoint TEXT NOT NULL
    );
    CREATE INDEX usage_records_tenant_time ON usage_records (tenant, at_ms);
    CREATE INDEX usage_records_time ON usage_records (at_ms);",
    ),
];

/// One issued virtual key as stored: its hash, never the key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VirtualKeyRow {
    pub id: String,
    pub tenant: String,
    pub key_sha256: String,
    /// Empty = the tenant's models.
    pub models: Vec<String>,
    pub rpm: u32,
    pub tpm: u64,
    pub concurrency: u32,
    pub daily_usd: f64,
    pub monthly_usd: f64,
    /// 0 = never.
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
    pub created_by: String,
    /// 0 = not revoked.
    pub revoked_at_ms: i64,
}

/// What `usage` groups records by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Model,
    Provider,
    Key,
    Day,
    Tenant,
    /// The egress node that served each request.
    Egress,
    /// The provider key (`POOL/KEY_ID`) that paid for each request.
    KeyPool,
}

impl UsageGroup {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "model" => UsageGroup::Model,
            "provider" => UsageGroup::Provider,
            "key" => UsageGroup::Key,
            "day" => UsageGroup::Day,
            "tenant" => UsageGroup::Tenant,
            "egress" => UsageGroup::Egress,
            "key_pool" => UsageGroup::KeyPool,
            _ => return None,
        })
    }

    /// A fixed column expression: never text from the caller.
    fn column(self) -> &'static str {
        match self {
            UsageGroup::Model => "model",
            UsageGroup::Provider => "provider",
            UsageGroup::Key => "key_id",
            UsageGroup::Day => "CAST(at_ms / 86400000 AS TEXT)",
            UsageGroup::Tenant => "tenant",
            UsageGroup::Egress => "egress",
            UsageGroup::KeyPool => "key_pool",
        }
    }
}

/// One group of usage records.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct UsageRow {
    pub group: String,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub cost_usd: f64,
    pub cache_hits: u64,
    pub reasoning_tokens: u64,
}

/// Spend of a tenant (or `key:<id>`) since the start of the UTC day and
/// month.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpendRow {
    pub scope: String,
    pub day_usd: f64,
    pub month_usd: f64,
}

const MICRO: f64 = 1_000_000.0;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store URL {0:?} (expected sqlite://PATH or postgres://...)")]
    UnsupportedUrl(String),
    #[error("store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    pub version: u64,
    /// Empty in [`Store::history`] listings.
    pub yaml: String,
    pub author: String,
    pub created_at_ms: i64,
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeRecord {
    pub id: String,
    pub role: String,
    pub region: String,
    pub build: String,
    pub acked_version: u64,
    pub nacked_version: u64,
    pub nack_reason: String,
    pub last_seen_ms: i64,
    pub connected: bool,
    pub replica: String,
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A cheap-to-clone handle on the open database.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

macro_rules! on_pool {
    ($self:expr, |$pool:ident| $body:expr) => {
        match &$self.backend {
            Backend::Sqlite($pool) => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The database holds sealed keys and the audit trail: only the owner may
/// read it. SQLite gives the -wal and -shm files the database file's mode,
/// so creating the database 0600 covers them; existing files are narrowed.
fn restrict_database_files(file: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(file)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = file.as_os_str().to_owned();
            name.push(suffix);
            let path = std::path::PathBuf::from(name);
            if path.exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

impl Store {
    /// Opens (creating when needed) the database and runs migrations.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5));
            let file = opts.get_filename().to_path_buf();
            if let Some(dir) = file.parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir)?;
                }
            }
            if file != std::path::Path::new(":memory:") && !url.contains("mode=memory") {
                restrict_database_files(&file)?;
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(opts)
                .await?;
            Backend::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?;
            Backend::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        let migrator = Migrator::with_migrations(
            MIGRATIONS
                .iter()
                .map(|(v, desc, sql)| {
                    Migration::new(
                        *v,
                        (*desc).into(),
                        MigrationType::Simple,
                        sql.into_sql_str(),
                        false,
                    )
                })
                .collect(),
        );
        let store = Store { backend };
        on_pool!(store, |pool| migrator.run(pool).await)?;
        Ok(store)
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The PostgreSQL pool, for LISTEN/NOTIFY.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres(p) => Some(p),
            Backend::Sqlite(_) => None,
        }
    }

    pub async fn latest_version(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = on_pool!(self, |pool| {
            sqlx::query("SELECT MAX(version) AS v FROM policy_versions")
                .fetch_one(pool)
                .await?
                .try_get("v")?
        });
        Ok(v.unwrap_or(0) as u64)
    }

    /// `version = 0` means the latest.
    pub async fn get(&self, version: u64) -> Result<Option<PolicyVersion>, StoreError> {
        let version = if version == 0 {
            self.latest_version().await?
        } else {
            version
        };
        if version == 0 {
            return Ok(None);
        }
        let row = on_pool!(self, |pool| {
            match sqlx::query(
                "SELECT version, yaml, author, created_at_ms, comment FROM policy_versions WHERE version = $1",
            )
            .bind(version as i64)
            .fetch_optional(pool)
            .await?
            {
                None => None,
                Some(r) => Some(PolicyVersion {
                    version: r.try_get::<i64, _>("version")? as u64,
                    yaml: r.try_get("yaml")?,
                    author: r.try_get("author")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                    comment: r.try_get("comment")?,
                }),
            }
        });
        Ok(row)
    }

    /// Every version, newest first, without the YAML.
    pub async fn history(&self, limit: u32) -> Result<Vec<PolicyVersion>, StoreError> {
        let out = on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT version, author, created_at_ms, comment FROM policy_versions ORDER BY version DESC LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(PolicyVersion {
                    version: r.try_get::<i64, _>("version")? as u64,
                    yaml: String::new(),
                    author: r.try_get("author")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                    comment: r.try_get("comment")?,
                });
            }
            out
        });
        Ok(out)
    }

    /// Stores a new version numbered after the latest. Two replicas racing
    /// for the same number: the loser's insert fails on the primary key and
    /// it retries with the next number.
    pub async fn insert_version(
        &self,
        yaml: &str,
        author: &str,
        comment: &str,
    ) -> Result<u64, StoreError> {
        let mut attempt = 0;
        loop {
            let result: Result<i64, sqlx::Error> = on_pool!(self, |pool| {
                sqlx::query(
                    "INSERT INTO policy_versions (version, yaml, author, created_at_ms, comment)
                     SELECT COALESCE(MAX(version), 0) + 1, $1, $2, $3, $4 FROM policy_versions
                     RETURNING version",
                )
                .bind(yaml)
                .bind(author)
                .bind(now_ms())
                .bind(comment)
                .fetch_one(pool)
                .await
                .and_then(|r| r.try_get::<i64, _>("version"))
            });
            match result {
                Ok(v) => {
                    if let Backend::Postgres(pool) = &self.backend {
                        // Wakes the other replicas now instead of at their next poll.
                        let _ = sqlx::query("SELECT pg_notify('switchyard_policy', $1)")
                            .bind(v.to_string())
                            .execute(pool)
                            .await;
                    }
                    return Ok(v as u64);
                }
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < 5 => {
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Records a node's hello (or a heartbeat): identity, liveness, replica.
    pub async fn upsert_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO nodes (id, role, region, build, last_seen_ms, connected, replica)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (id) DO UPDATE SET role = $2, region = $3, build = $4,
                   last_seen_ms = $5, connected = $6, replica = $7",
            )
            .bind(&n.id)
            .bind(&n.role)
            .bind(&n.region)
            .bind(&n.build)
            .bind(n.last_seen_ms)
            .bind(i64::from(n.connected))
            .bind(&n.replica)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn set_connected(
        &self,
        id: &str,
        connected: bool,
        replica: &str,
    ) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            // Only the replica holding the stream may mark it gone: the node
            // may already have reconnected through another one.
            sqlx::query(
                "UPDATE nodes SET connected = $2, last_seen_ms = $3 WHERE id = $1 AND (replica = $4 OR $2 = 1)",
            )
            .bind(id)
            .bind(i64::from(connected))
            .bind(now_ms())
            .bind(replica)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn record_ack(
        &self,
        id: &str,
        version: u64,
        ok: bool,
        reason: &str,
    ) -> Result<(), StoreError> {
        let sql = if ok {
            "UPDATE nodes SET acked_version = $2, last_seen_ms = $4 WHERE id = $1 AND $3 = $3"
        } else {
            "UPDATE nodes SET nacked_version = $2, nack_reason = $3, last_seen_ms = $4 WHERE id = $1"
        };
        on_pool!(self, |pool| {
            sqlx::query(sql)
                .bind(id)
                .bind(version as i64)
                .bind(reason)
                .bind(now_ms())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let out = on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT id, role, region, build, acked_version, nacked_version, nack_reason,
                        last_seen_ms, connected, replica FROM nodes ORDER BY id",
            )
            .fetch_all(pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(NodeRecord {
                    id: r.try_get("id")?,
                    role: r.try_get("role")?,
                    region: r.try_get("region")?,
                    build: r.try_get("build")?,
                    acked_version: r.try_get::<i64, _>("acked_version")? as u64,
                    nacked_version: r.try_get::<i64, _>("nacked_version")? as u64,
                    nack_reason: r.try_get("nack_reason")?,
                    last_seen_ms: r.try_get("last_seen_ms")?,
                    connected: r.try_get::<i64, _>("connected")? != 0,
                    replica: r.try_get("replica")?,
                });
            }
            out
        });
        Ok(out)
    }

    /// Test helper: creates an empty database next to the one `admin_url`
    /// names and returns its URL, so tests sharing a server never collide.
    pub async fn fresh_postgres_database_for_tests(admin_url: &str) -> Result<String, StoreError> {
        fresh_postgres_database(admin_url).await
    }

    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await)
    }
}

async fn fresh_postgres_database(admin_url: &str) -> Result<String, StoreError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "sy_test_{}_{}_{}",
        std::process::id(),
        now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await?;
    pool.close().await;
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (admin_url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    Ok(format!("{base}/{name}{query}"))
}

impl Store {
    pub async fn insert_virtual_key(&self, k: &VirtualKeyRow) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO virtual_keys (id, tenant, key_sha256, models, rpm, tpm, concurrency,
                   daily_micro_usd, monthly_micro_usd, expires_at_ms, created_at_ms, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&k.id)
            .bind(&k.tenant)
            .bind(&k.key_sha256)
            .bind(k.models.join(","))
            .bind(i64::from(k.rpm))
            .bind(k.tpm as i64)
            .bind(i64::from(k.concurrency))
            .bind((k.daily_usd * MICRO).round() as i64)
            .bind((k.monthly_usd * MICRO).round() as i64)
            .bind(k.expires_at_ms)
            .bind(k.created_at_ms)
            .bind(&k.created_by)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Every key (of one tenant), revoked ones included, oldest first.
    pub async fn virtual_keys(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<VirtualKeyRow>, StoreError> {
        let out = on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT id, tenant, key_sha256, models, rpm, tpm, concurrency, daily_micro_usd,
                   monthly_micro_usd, expires_at_ms, created_at_ms, created_by, revoked_at_ms
                 FROM virtual_keys WHERE ($1 = '' OR tenant = $1) ORDER BY created_at_ms, id",
            )
            .bind(tenant.unwrap_or(""))
            .fetch_all(pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let models: String = r.try_get("models")?;
                out.push(VirtualKeyRow {
                    id: r.try_get("id")?,
                    tenant: r.try_get("tenant")?,
                    key_sha256: r.try_get("key_sha256")?,
                    models: models
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect(),
                    rpm: r.try_get::<i64, _>("rpm")? as u32,
                    tpm: r.try_get::<i64, _>("tpm")? as u64,
                    concurrency: r.try_get::<i64, _>("concurrency")? as u32,
                    daily_usd: r.try_get::<i64, _>("daily_micro_usd")? as f64 / MICRO,
                    monthly_usd: r.try_get::<i64, _>("monthly_micro_usd")? as f64 / MICRO,
                    expires_at_ms: r.try_get("expires_at_ms")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                    created_by: r.try_get("created_by")?,
                    revoked_at_ms: r.try_get("revoked_at_ms")?,
                });
            }
            out
        });
        Ok(out)
    }

    /// Marks a key revoked; false when there is no such (unrevoked) key.
    pub async fn revoke_virtual_key(&self, id: &str) -> Result<bool, StoreError> {
        let n = on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE virtual_keys SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms = 0",
            )
            .bind(now_ms())
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n > 0)
    }

    /// Stores ledger records; a record already stored (same uid, a batch
    /// sent again after a lost answer) is skipped. Returns how many are new.
    pub async fn insert_usage(
        &self,
        node: &str,
        records: &[switchyard_proto::control::UsageRecordMsg],
    ) -> Result<u64, StoreError> {
        let mut stored = 0;
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            for r in records {
                stored += sqlx::query(
                    "INSERT INTO usage_records (uid, at_ms, request_id, tenant, key_id, route, model,
                       provider, region, egress, key_pool, input_tokens, output_tokens, cached_tokens,
                       reasoning_tokens, cost_micro_usd, latency_ms, ttft_ms, status, attempts,
                       cache_hit, node, endpoint)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                       $17, $18, $19, $20, $21, $22, $23)
                     ON CONFLICT (uid) DO NOTHING",
                )
                .bind(&r.uid)
                .bind(r.at_ms)
                .bind(&r.request_id)
                .bind(&r.tenant)
                .bind(&r.key_id)
                .bind(&r.route)
                .bind(&r.model)
                .bind(&r.provider)
                .bind(&r.region)
                .bind(&r.egress)
                .bind(&r.key_pool)
                .bind(r.input_tokens as i64)
                .bind(r.output_tokens as i64)
                .bind(r.cached_tokens as i64)
                .bind(r.reasoning_tokens as i64)
                .bind(if r.cost_usd.is_finite() { (r.cost_usd * MICRO).round() as i64 } else { 0 })
                .bind(r.latency_ms as i64)
                .bind(r.ttft_ms as i64)
                .bind(i64::from(r.status))
                .bind(i64::from(r.attempts))
                .bind(i64::from(r.cache_hit))
                .bind(node)
                .bind(&r.endpoint)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
        });
        Ok(stored)
    }

    /// Usage since `since_ms`, of one tenant or all, grouped.
    pub async fn usage(
        &self,
        tenant: Option<&str>,
        since_ms: i64,
        group: UsageGroup,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let sql = format!(
            "SELECT {col} AS grp, COUNT(*) AS requests,
               CAST(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS BIGINT) AS errors,
               CAST(SUM(input_tokens) AS BIGINT) AS input_tokens,
               CAST(SUM(output_tokens) AS BIGINT) AS output_tokens,
               CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens,
               CAST(SUM(cost_micro_usd) AS BIGINT) AS cost,
               CAST(SUM(cache_hit) AS BIGINT) AS cache_hits,
               CAST(SUM(reasoning_tokens) AS BIGINT) AS reasoning_tokens
             FROM usage_records WHERE at_ms >= $1 AND ($2 = '' OR tenant = $2)
             GROUP BY {col} ORDER BY {col}",
            col = group.column()
        );
        let out = on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(since_ms)
                .bind(tenant.unwrap_or(""))
                .fetch_all(pool)
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let n = |c: &str| r.try_get::<Option<i64>, _>(c).map(|v| v.unwrap_or(0));
                let mut group_name: String =
                    r.try_get::<Option<String>, _>("grp")?.unwrap_or_default();
                if group == UsageGroup::Day {
                    group_name = group_name
                        .parse::<i64>()
                        .map(day_name)
                        .unwrap_or(group_name);
                }
                out.push(UsageRow {
                    group: group_name,
                    requests: n("requests")? as u64,
                    errors: n("errors")? as u64,
                    input_tokens: n("input_tokens")? as u64,
                    output_tokens: n("output_tokens")? as u64,
                    cached_tokens: n("cached_tokens")? as u64,
                    cost_usd: n("cost")? as f64 / MICRO,
                    cache_hits: n("cache_hits")? as u64,
                    reasoning_tokens: n("reasoning_tokens")? as u64,
                });
            }
            out
        });
        Ok(out)
    }

    /// Every tenant's and every virtual key's spend since the two starts.
    pub async fn spend(
        &self,
        day_start_ms: i64,
        month_start_ms: i64,
    ) -> Result<Vec<SpendRow>, StoreError> {
        let mut out = Vec::new();
        for (col, prefix) in [("tenant", ""), ("key_id", "key:")] {
            let sql = format!(
                "SELECT {col} AS scope,
                   CAST(SUM(CASE WHEN at_ms >= $1 THEN cost_micro_usd ELSE 0 END) AS BIGINT) AS day,
                   CAST(SUM(cost_micro_usd) AS BIGINT) AS month
                 FROM usage_records WHERE at_ms >= $2 AND {col} <> '' GROUP BY {col}"
            );
            on_pool!(self, |pool| {
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(day_start_ms)
                    .bind(month_start_ms.min(day_start_ms))
                    .fetch_all(pool)
                    .await?;
                for r in rows {
                    let scope: String = r.try_get("scope")?;
                    out.push(SpendRow {
                        scope: format!("{prefix}{scope}"),
                        day_usd: r.try_get::<Option<i64>, _>("day")?.unwrap_or(0) as f64 / MICRO,
                        month_usd: r.try_get::<Option<i64>, _>("month")?.unwrap_or(0) as f64
                            / MICRO,
                    });
                }
            });
        }
        Ok(out)
    }
}

/// `2026-11-29` for a day number since the epoch.
pub fn day_name(day: i64) -> String {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exercise(store: &Store) {
        assert_eq!(store.latest_version().await.unwrap(), 0);
        assert!(store.get(0).await.unwrap().is_none());
        let v1 = store
            .insert_version("a: 1", "alice", "first")
            .await
            .unwrap();
        let v2 = store.insert_version("a: 2", "bob", "").await.unwrap();
        assert_eq!((v1, v2), (1, 2));
        assert_eq!(store.get(0).await.unwrap().unwrap().yaml, "a: 2");
        assert_eq!(store.get(1).await.unwrap().unwrap().author, "alice");
        let h = store.history(10).await.unwrap();
        assert_eq!(h.iter().map(|v| v.version).collect::<Vec<_>>(), [2, 1]);
        let mut n = NodeRecord {
            id: "edge-1".into(),
            role: "edge".into(),
            region: "eu-west".into(),
            build: "t".into(),
            last_seen_ms: now_ms(),
            connected: true,
            replica: "r1".into(),
            ..NodeRecord::default()
        };
        store.upsert_node(&n).await.unwrap();
        n.build = "t2".into();
        store.upsert_node(&n).await.unwrap();
        store.record_ack("edge-1", 2, true, "").await.unwrap();
        store.record_ack("edge-1", 3, false, "bad").await.unwrap();
        store.set_connected("edge-1", false, "r2").await.unwrap();
        let nodes = store.nodes().await.unwrap();
        assert_eq!(nodes.len(), 1);
        let got = &nodes[0];
        assert_eq!((got.acked_version, got.nacked_version), (2, 3));
        assert_eq!(
            (got.build.as_str(), got.nack_reason.as_str()),
            ("t2", "bad")
        );
        assert!(got.connected, "another replica cannot disconnect it");
        store.set_connected("edge-1", false, "r1").await.unwrap();
        assert!(!store.nodes().await.unwrap()[0].connected);
        exercise_tenancy(store).await;
    }

    /// Virtual keys and the usage ledger, the same on both backends.
    async fn exercise_tenancy(store: &Store) {
        let key = VirtualKeyRow {
            id: "k1".into(),
            tenant: "acme".into(),
            key_sha256: "ab".repeat(32),
            models: vec!["a/b".into(), "c/*".into()],
            rpm: 5,
            daily_usd: 1.5,
            created_at_ms: 1,
            created_by: "test".into(),
            ..VirtualKeyRow::default()
        };
        store.insert_virtual_key(&key).await.unwrap();
        assert!(
            store.insert_virtual_key(&key).await.is_err(),
            "ids are unique"
        );
        let listed = store.virtual_keys(Some("acme")).await.unwrap();
        assert_eq!(listed, std::slice::from_ref(&key));
        assert!(store.virtual_keys(Some("other")).await.unwrap().is_empty());
        assert!(store.revoke_virtual_key("k1").await.unwrap());
        assert!(!store.revoke_virtual_key("k1").await.unwrap(), "once");
        assert!(store.virtual_keys(None).await.unwrap()[0].revoked_at_ms > 0);

        let day = 20_786i64;
        let record = |uid: &str, model: &str, key: &str, at: i64, cost: f64, status: u32| {
            switchyard_proto::control::UsageRecordMsg {
                uid: uid.into(),
                at_ms: at,
                tenant: "acme".into(),
                key_id: key.into(),
                model: model.into(),
                provider: "p".into(),
                input_tokens: 10,
                output_tokens: 5,
                cached_tokens: 2,
                cost_usd: cost,
                status,
                ..Default::default()
            }
        };
        let batch = [
            record("u1", "m1", "k1", day * 86_400_000 + 5, 0.25, 200),
            record("u2", "m1", "", day * 86_400_000 + 6, 0.5, 200),
            record("u3", "m2", "k1", (day - 1) * 86_400_000, 1.0, 429),
        ];
        assert_eq!(store.insert_usage("edge-1", &batch).await.unwrap(), 3);
        // The same batch again (an answer that was lost): stored once.
        assert_eq!(store.insert_usage("edge-1", &batch).await.unwrap(), 0);
        let by_model = store
            .usage(Some("acme"), 0, UsageGroup::Model)
            .await
            .unwrap();
        assert_eq!(by_model.len(), 2);
        assert_eq!(
            (by_model[0].group.as_str(), by_model[0].requests),
            ("m1", 2)
        );
        assert_eq!(by_model[0].input_tokens, 20);
        assert!((by_model[0].cost_usd - 0.75).abs() < 1e-9);
        assert_eq!((by_model[1].errors, by_model[1].cached_tokens), (1, 2));
        let by_day = store.usage(None, 0, UsageGroup::Day).await.unwrap();
        assert_eq!(by_day[1].group, "2026-11-29");
        let since = store
            .usage(Some("acme"), day * 86_400_000, UsageGroup::Key)
            .await
            .unwrap();
        assert_eq!(since.iter().map(|r| r.requests).sum::<u64>(), 2);
        let spend = store
            .spend(day * 86_400_000, (day - 28) * 86_400_000)
            .await
            .unwrap();
        let acme = spend.iter().find(|s| s.scope == "acme").unwrap();
        assert!((acme.day_usd - 0.75).abs() < 1e-9 && (acme.month_usd - 1.75).abs() < 1e-9);
        let k1 = spend.iter().find(|s| s.scope == "key:k1").unwrap();
        assert!((k1.day_usd - 0.25).abs() < 1e-9 && (k1.month_usd - 1.25).abs() < 1e-9);
    }

    #[tokio::test]
    async fn sqlite_store_round_trip() {
        let dir = std::env::temp_dir().join(format!("sy-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("sqlite://{}/sub/cp.db", dir.display());
        let store = Store::open(&url).await.unwrap();
        exercise(&store).await;
        store.close().await;
        // Reopening runs migrations again without harm and keeps the data.
        let again = Store::open(&url).await.unwrap();
        assert_eq!(again.latest_version().await.unwrap(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn postgres_store_round_trip() {
        let Ok(url) = std::env::var("SWITCHYARD_TEST_PG_URL") else {
            eprintln!("skipped: SWITCHYARD_TEST_PG_URL is not set (run tests/pg.sh)");
            return;
        };
        let url = fresh_postgres_database(&url).await.unwrap();
        let store = Store::open(&url).await.unwrap();
        exercise(&store).await;
    }

    #[tokio::test]
    async fn rejects_unknown_urls() {
        assert!(matches!(
            Store::open("mysql://x").await,
            Err(StoreError::UnsupportedUrl(_))
        ));
    }
}
