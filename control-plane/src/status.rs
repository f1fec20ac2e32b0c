//! The status page on the control plane's admin listener: `GET /status`
//! (a self-contained HTML page) and `GET /status.json` (what it renders).
//!
//! One look at the fleet: regions and their nodes with the snapshot
//! version each acknowledged or refused, per-target latency and error rate
//! from the telemetry nodes report (the same sliding window as the scores
//! pushed to nodes), targets ejected or demoted by the edges' health
//! boards, the egress nodes' key pools, and the tenants that spent most
//! this month (from the usage ledger).
//!
//! The page carries no external asset (no CDN: the admin network may have
//! no Internet access, and a third-party script would see tenant names).
//! It fetches the JSON every few seconds and builds the tables with DOM
//! text nodes only, never HTML strings, so tenant names, node ids and NACK
//! reasons (user or node input) cannot inject markup. Its content security
//! policy allows exactly its own inline script and style (by hash) and
//! fetches from its own origin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::admin::{AdminPage, PageFuture, PagesFn};
use crate::pb;
use crate::server::{ControlError, ControlPlane};
use crate::store::{now_ms, UsageGroup, UsageRow};
use crate::telemetry::{RttStatus, TargetStatus, MAX_HEALTH_ENTRIES};

/// A node's health report older than this is not shown (the node is gone
/// or no longer reporting; `nodes` says which).
pub const HEALTH_STALE: Duration = Duration::from_secs(60);
/// Node health reports kept at most (one per node id).
const MAX_REPORTING_NODES: usize = 4096;
/// Tenants listed by spend.
const TOP_TENANTS: usize = 10;
/// The month's spend ranking is a sum over the ledger: at most this often.
const SPEND_EVERY: Duration = Duration::from_secs(5);
/// Strings from nodes are cut to this many characters before they are kept.
const MAX_TEXT: usize = 256;

/// The latest health report of each node, kept for the status page.
#[derive(Default)]
pub struct HealthReports {
    nodes: Mutex<HashMap<String, Reported>>,
    spend: Mutex<Option<(Instant, Vec<UsageRow>)>>,
}

struct Reported {
    at: Instant,
    region: String,
    health: pb::NodeHealthMsg,
}

fn cut(s: &mut String) {
    if s.chars().count() > MAX_TEXT {
        *s = s.chars().take(MAX_TEXT).collect();
    }
}

impl HealthReports {
    /// Keeps `health` as `node`'s current state, bounded whatever the node
    /// sends.
    pub fn record(&self, node: &str, region: &str, mut health: pb::NodeHealthMsg) {
        health.targets.truncate(MAX_HEALTH_ENTRIES);
        health.keys.truncate(MAX_HEALTH_ENTRIES);
        for t in &mut health.targets {
            for s in [&mut t.provider, &mut t.model, &mut t.region, &mut t.state] {
                cut(s);
            }
        }
        for k in &mut health.keys {
            for s in [&mut k.provider, &mut k.pool, &mut k.key_id, &mut k.state] {
                cut(s);
            }
        }
        let now = Instant::now();
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if nodes.len() >= MAX_REPORTING_NODES && !nodes.contains_key(node) {
            nodes.retain(|_, r| now.duration_since(r.at) < HEALTH_STALE);
            if nodes.len() >= MAX_REPORTING_NODES {
                return;
            }
        }
        nodes.insert(
            node.to_string(),
            Reported {
                at: now,
                region: region.to_string(),
                health,
            },
        );
    }

    fn fresh(&self, now: Instant) -> Vec<(String, String, pb::NodeHealthMsg)> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = nodes
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.at) < HEALTH_STALE)
            .map(|(id, r)| (id.clone(), r.region.clone(), r.health.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub generated_at_ms: i64,
    pub replica: String,
    pub policy_version: u64,
    pub regions: Vec<RegionStatus>,
    pub nodes: Vec<NodeStatus>,
    pub targets: Vec<TargetStatus>,
    pub backhaul: Vec<RttStatus>,
    pub ejections: Vec<Ejection>,
    pub keys: Vec<KeyStatus>,
    pub top_tenants: Vec<TenantSpend>,
}

#[derive(Debug, Serialize)]
pub struct RegionStatus {
    pub name: String,
    pub jurisdiction: String,
    pub hostname: String,
    pub egress: Vec<String>,
    /// Nodes of the region by state (`ok`, `behind`, `rejected`, `disconnected`).
    pub nodes: HashMap<String, u32>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub id: String,
    pub role: String,
    pub region: String,
    pub build: String,
    pub state: String,
    pub acked_version: u64,
    pub nacked_version: u64,
    pub nack_reason: String,
    pub last_seen_ms: i64,
    pub replica: String,
}

#[derive(Debug, Serialize)]
pub struct Ejection {
    pub node: String,
    pub provider: String,
    pub model: String,
    pub region: String,
    pub state: String,
    pub error_rate: f64,
}

#[derive(Debug, Serialize)]
pub struct KeyStatus {
    pub node: String,
    pub region: String,
    pub provider: String,
    pub pool: String,
    pub key_id: String,
    pub state: String,
    pub headroom: f64,
    pub in_flight: u32,
}

#[derive(Debug, Serialize)]
pub struct TenantSpend {
    pub tenant: String,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// The tenant's monthly budget in the current policy, if it has one.
    pub monthly_budget_usd: Option<f64>,
}

/// Everything the page shows, read now.
pub async fn report(cp: &ControlPlane) -> Result<StatusReport, ControlError> {
    let listed = cp.list_nodes().await?;
    let current = cp.current();
    let now = Instant::now();
    let (targets, backhaul) = cp.board_status(now);

    let nodes: Vec<NodeStatus> = listed
        .nodes
        .into_iter()
        .map(|n| NodeStatus {
            id: n.id,
            role: n.role,
            region: n.region,
            build: n.build,
            state: n.health,
            acked_version: n.acked_version,
            nacked_version: n.nacked_version,
            nack_reason: n.nack_reason,
            last_seen_ms: n.last_seen_ms,
            replica: n.replica,
        })
        .collect();

    let mut regions: Vec<RegionStatus> = current
        .as_ref()
        .map(|p| {
            p.snapshot
                .regions()
                .values()
                .map(|r| RegionStatus {
                    name: r.name.clone(),
                    jurisdiction: r.jurisdiction.clone().unwrap_or_default(),
                    hostname: r.hostname.clone().unwrap_or_default(),
                    egress: r.egress.clone(),
                    nodes: HashMap::new(),
                })
                .collect()
        })
        .unwrap_or_default();
    for n in &nodes {
        let i = match regions.iter().position(|r| r.name == n.region) {
            Some(i) => i,
            None => {
                // A node whose region the policy does not name (yet).
                regions.push(RegionStatus {
                    name: n.region.clone(),
                    jurisdiction: String::new(),
                    hostname: String::new(),
                    egress: Vec::new(),
                    nodes: HashMap::new(),
                });
                regions.len() - 1
            }
        };
        *regions[i].nodes.entry(n.state.clone()).or_default() += 1;
    }
    regions.sort_by(|a, b| a.name.cmp(&b.name));

    let mut ejections = Vec::new();
    let mut keys = Vec::new();
    for (node, region, health) in cp.health_reports().fresh(now) {
        for t in health.targets {
            ejections.push(Ejection {
                node: node.clone(),
                provider: t.provider,
                model: t.model,
                region: t.region,
                state: t.state,
                error_rate: t.error_rate,
            });
        }
        for k in health.keys {
            keys.push(KeyStatus {
                node: node.clone(),
                region: region.clone(),
                provider: k.provider,
                pool: k.pool,
                key_id: k.key_id,
                state: k.state,
                headroom: k.headroom,
                in_flight: k.in_flight,
            });
        }
    }

    let top = top_tenants(cp).await?;
    let top_tenants = top
        .into_iter()
        .map(|u| TenantSpend {
            monthly_budget_usd: current.as_ref().and_then(|p| {
                p.snapshot
                    .tenants()
                    .by_id(&u.group)
                    .and_then(|t| t.monthly_budget_usd)
            }),
            tenant: u.group,
            requests: u.requests,
            errors: u.errors,
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cost_usd: u.cost_usd,
        })
        .collect();

    Ok(StatusReport {
        generated_at_ms: now_ms(),
        replica: cp.replica_id().to_string(),
        policy_version: listed.current_version,
        regions,
        nodes,
        targets,
        backhaul,
        ejections,
        keys,
        top_tenants,
    })
}

/// The month's biggest spenders, summed at most every [`SPEND_EVERY`].
async fn top_tenants(cp: &ControlPlane) -> Result<Vec<UsageRow>, ControlError> {
    let reports = cp.health_reports();
    if let Some((at, rows)) = reports
        .spend
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        if at.elapsed() < SPEND_EVERY {
            return Ok(rows.clone());
        }
    }
    let day = now_ms().div_euclid(crate::tenancy::DAY_MS);
    let (_, month_start) = crate::tenancy::month_of(day);
    let mut rows = cp
        .store()
        .usage(
            None,
            month_start * crate::tenancy::DAY_MS,
            UsageGroup::Tenant,
        )
        .await?;
    rows.retain(|r| !r.group.is_empty());
    rows.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then(b.requests.cmp(&a.requests))
            .then(a.group.cmp(&b.group))
    });
    rows.truncate(TOP_TENANTS);
    *reports.spend.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), rows.clone()));
    Ok(rows)
}

const PAGE_STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:30em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#c62828;font-weight:600}.warn{color:#b26a00}
#meta{color:#666}.empty{color:#888;font-style:italic}
"#;

const PAGE_SCRIPT: &str = r#"
"use strict";
const REFRESH_MS = 5000;
const GOOD = ["ok", "closed"];
const WARN = ["behind", "degraded", "half_open", "cooling", "quota_exhausted"];
function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
}
function stateClass(s) {
  if (GOOD.includes(s)) return "ok";
  if (WARN.includes(s)) return "warn";
  return "bad";
}
function ms(v) { return v ? v.toFixed(0) + " ms" : ""; }
function pct(v) { return (100 * v).toFixed(1) + " %"; }
function usd(v) { return "$" + v.toFixed(4); }
function table(id, headers, rows, fill) {
  const old = document.getElementById(id);
  const t = document.createElement("table");
  t.id = id;
  const head = t.insertRow();
  for (const h of headers) {
    const th = document.createElement("th");
    th.textContent = h;
    head.appendChild(th);
  }
  if (rows.length === 0) {
    const r = t.insertRow();
    cell(r, "none", "empty");
    r.firstChild.colSpan = headers.length;
  }
  for (const item of rows) fill(t.insertRow(), item);
  old.replaceWith(t);
}
function render(s) {
  document.getElementById("meta").textContent =
    "policy version " + s.policy_version + " \u00b7 replica " + s.replica +
    " \u00b7 updated " + new Date(s.generated_at_ms).toISOString();
  table("regions", ["region", "jurisdiction", "hostname", "egress nodes", "nodes by state"], s.regions, (r, x) => {
    cell(r, x.name); cell(r, x.jurisdiction); cell(r, x.hostname); cell(r, x.egress.join(", "));
    cell(r, Object.entries(x.nodes).map(([k, v]) => k + ": " + v).join(", "));
  });
  table("nodes", ["node", "role", "region", "state", "acked", "nacked", "reason", "build", "last seen"], s.nodes, (r, x) => {
    cell(r, x.id); cell(r, x.role); cell(r, x.region); cell(r, x.state, stateClass(x.state));
    cell(r, x.acked_version, "n"); cell(r, x.nacked_version || "", "n"); cell(r, x.nack_reason);
    cell(r, x.build); cell(r, new Date(x.last_seen_ms).toISOString());
  });
  table("targets", ["provider", "model", "region", "requests", "errors", "error rate", "TTFT p50", "TTFT p95", "latency p50", "latency p95"], s.targets, (r, x) => {
    cell(r, x.provider); cell(r, x.model); cell(r, x.region); cell(r, x.requests, "n"); cell(r, x.errors, "n");
    cell(r, pct(x.error_rate), "n " + (x.error_rate > 0.05 ? "bad" : "ok"));
    cell(r, ms(x.ttft_p50_ms), "n"); cell(r, ms(x.ttft_p95_ms), "n");
    cell(r, ms(x.latency_p50_ms), "n"); cell(r, ms(x.latency_p95_ms), "n");
  });
  table("backhaul", ["edge region", "egress region", "RTT p50", "RTT p95"], s.backhaul, (r, x) => {
    cell(r, x.edge_region); cell(r, x.egress_region); cell(r, ms(x.p50_ms), "n"); cell(r, ms(x.p95_ms), "n");
  });
  table("ejections", ["node", "provider", "model", "region", "state", "error rate"], s.ejections, (r, x) => {
    cell(r, x.node); cell(r, x.provider); cell(r, x.model); cell(r, x.region);
    cell(r, x.state, stateClass(x.state)); cell(r, pct(x.error_rate), "n");
  });
  table("keys", ["egress", "region", "provider", "pool", "key id", "state", "quota left", "in flight"], s.keys, (r, x) => {
    cell(r, x.node); cell(r, x.region); cell(r, x.provider); cell(r, x.pool); cell(r, x.key_id);
    cell(r, x.state, stateClass(x.state)); cell(r, pct(x.headroom), "n"); cell(r, x.in_flight, "n");
  });
  table("tenants", ["tenant", "requests", "errors", "tokens in", "tokens out", "spend this month", "monthly budget"], s.top_tenants, (r, x) => {
    cell(r, x.tenant); cell(r, x.requests, "n"); cell(r, x.errors, "n"); cell(r, x.input_tokens, "n");
    cell(r, x.output_tokens, "n"); cell(r, usd(x.cost_usd), "n");
    const over = x.monthly_budget_usd && x.cost_usd >= 0.9 * x.monthly_budget_usd;
    cell(r, x.monthly_budget_usd ? usd(x.monthly_budget_usd) : "", "n" + (over ? " bad" : ""));
  });
}
async function refresh() {
  try {
    const r = await fetch("status.json", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "cannot refresh: " + e.message;
  }
  setTimeout(refresh, REFRESH_MS);
}
refresh();
"#;

fn page() -> &'static (String, String) {
    static PAGE: OnceLock<(String, String)> = OnceLock::new();
    PAGE.get_or_init(|| {
        let hash = |text: &str| {
            use base64::Engine;
            let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(d.as_ref())
            )
        };
        let csp = format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash(PAGE_SCRIPT),
            hash(PAGE_STYLE)
        );
        let section = |id: &str, title: &str| {
            format!("<h2>{title}</h2>\n<table id=\"{id}\"><tr><td class=\"empty\">loading</td></tr></table>\n")
        };
        let html = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>Switchyard status</title><style>{PAGE_STYLE}</style></head><body>\n\
             <h1>Switchyard status</h1><div id=\"meta\">loading</div><div id=\"error\" class=\"bad\"></div>\n\
             {}{}{}{}{}{}{}\
             <script>{PAGE_SCRIPT}</script></body></html>\n",
            section("regions", "Regions"),
            section("nodes", "Nodes and snapshot versions"),
            section("targets", "Targets (telemetry window)"),
            section("backhaul", "Backhaul round trips"),
            section("ejections", "Ejected and demoted targets"),
            section("keys", "Key pools"),
            section("tenants", "Top tenants by spend this month"),
        );
        (html, csp)
    })
}

/// `/status` and `/status.json` for the admin listener.
pub fn pages(cp: Arc<ControlPlane>) -> PagesFn {
    Arc::new(move |path: &str| -> Option<PageFuture> {
        let cp = cp.clone();
        match path {
            "/status" => Some(Box::pin(async move {
                let (html, csp) = page();
                AdminPage {
                    status: 200,
                    content_type: "text/html; charset=utf-8",
                    headers: vec![
                        ("content-security-policy", csp.clone()),
                        ("x-content-type-options", "nosniff".into()),
                        ("referrer-policy", "no-referrer".into()),
                        ("cache-control", "no-store".into()),
                    ],
                    body: html.clone().into_bytes(),
                }
            })),
            "/status.json" => Some(Box::pin(async move {
                let headers = vec![
                    ("x-content-type-options", "nosniff".into()),
                    ("cache-control", "no-store".into()),
                ];
                match report(&cp).await {
                    Ok(r) => AdminPage {
                        status: 200,
                        content_type: "application/json",
                        headers,
                        body: serde_json::to_vec(&r).unwrap_or_default(),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "status page: cannot read the store");
                        AdminPage {
                            status: 503,
                            content_type: "application/json",
                            headers,
                            body: serde_json::to_vec(&serde_json::json!({
                                "error": {"message": e.to_string(), "type": "store_unavailable"}
                            }))
                            .unwrap_or_default(),
                        }
                    }
                }
            })),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_its_own_script_and_style_and_no_external_asset() {
        let (html, csp) = page();
        assert!(html.contains("<script>") && html.contains("<style>"));
        for external in ["src=\"http", "href=\"http", "src=\"//", "@import", "<link"] {
            assert!(!html.contains(external), "{external}");
        }
        assert!(
            !PAGE_SCRIPT.contains("innerHTML"),
            "data goes in as text only"
        );
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'sha256-"));
    }

    #[test]
    fn node_reports_are_bounded() {
        let r = HealthReports::default();
        let long = "x".repeat(10_000);
        let health = pb::NodeHealthMsg {
            targets: (0..2 * MAX_HEALTH_ENTRIES)
                .map(|_| pb::TargetHealthMsg {
                    provider: long.clone(),
                    ..Default::default()
                })
                .collect(),
            keys: Vec::new(),
        };
        r.record("edge-1", "eu", health);
        let fresh = r.fresh(Instant::now());
        assert_eq!(fresh[0].2.targets.len(), MAX_HEALTH_ENTRIES);
        assert_eq!(fresh[0].2.targets[0].provider.len(), MAX_TEXT);
    }
}
