//! A semantic diff between two compiled policies, for `ctl apply --dry-run`
//! and apply answers. It describes compiled snapshots rather than YAML text
//! so reordering or reformatting shows no change, and key pools appear only
//! as reference kinds and counts: never key material.

use std::collections::BTreeMap;

use switchyard_proto::{KeySource, PoolKey, Snapshot};

/// One line per entity: `path` → description.
pub fn describe(s: &Snapshot) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for r in s.regions().values() {
        out.insert(
            format!("regions.{}", r.name),
            format!(
                "jurisdiction={} egress=[{}]",
                r.jurisdiction.as_deref().unwrap_or("-"),
                r.egress.join(", ")
            ),
        );
    }
    for p in s.providers().values() {
        let mut pricing: Vec<_> = p
            .pricing
            .iter()
            .map(|(m, pr)| format!("{m}:{}/{}", pr.input_per_million, pr.output_per_million))
            .collect();
        pricing.sort();
        out.insert(
            format!("providers.{}", p.name),
            format!(
                "kind={} url={} region={} jurisdiction={} models=[{}] pricing=[{}]",
                p.kind.as_str(),
                p.base_url,
                p.region.as_deref().unwrap_or("-"),
                p.jurisdiction.as_deref().unwrap_or("-"),
                p.models.join(", "),
                pricing.join(", ")
            ),
        );
        for pool in &p.key_pools {
            let refs: Vec<String> = pool
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let source = match &k.source {
                        KeySource::Env(v) => format!("env:{v}"),
                        KeySource::File(f) => format!("file:{f}"),
                        KeySource::Inline(_) => "encrypted".into(),
                    };
                    // Identity and limits only when set, so a pool written
                    // without them diffs as before.
                    if *k
                        == (PoolKey {
                            source: k.source.clone(),
                            ..PoolKey::new(i, KeySource::Env(String::new()))
                        })
                    {
                        return source;
                    }
                    format!(
                        "{source} (id={} weight={} rpm={} tpm={})",
                        k.id,
                        k.weight,
                        k.rpm.map_or("-".into(), |r| r.to_string()),
                        k.tpm.map_or("-".into(), |t| t.to_string())
                    )
                })
                .collect();
            out.insert(
                format!("providers.{}.key_pools.{}", p.name, pool.name),
                format!(
                    "region={} jurisdictions=[{}] keys=[{}]",
                    pool.region.as_deref().unwrap_or("any"),
                    pool.jurisdictions.join(", "),
                    refs.join(", ")
                ),
            );
        }
    }
    for (a, t) in s.aliases() {
        out.insert(
            format!("aliases.{a}"),
            format!("{}/{}", t.provider, t.model),
        );
    }
    for r in s.routes().values() {
        let targets: Vec<String> = r
            .targets
            .iter()
            .map(|t| format!("{}/{}*{}", t.provider, t.model, t.weight))
            .collect();
        out.insert(
            format!("routes.{}", r.name),
            format!(
                "strategy={:?} targets=[{}] fallbacks=[{}]",
                r.strategy,
                targets.join(", "),
                r.fallbacks.join(", ")
            ),
        );
    }
    for (hash, t) in s.tenants().keys() {
        out.insert(
            format!("tenants.{}", t.id),
            format!(
                "key={:?} models={} rpm={} tpm={} budget={} residency={}",
                hash,
                t.allowed_models
                    .as_ref()
                    .map(|m| format!("[{}]", m.join(", ")))
                    .unwrap_or_else(|| "*".into()),
                t.rpm.map_or("-".into(), |v| v.to_string()),
                t.tpm.map_or("-".into(), |v| v.to_string()),
                t.monthly_budget_usd.map_or("-".into(), |v| v.to_string()),
                t.residency.as_ref().map_or("*".into(), |r| r.join(", ")),
            ),
        );
    }
    out.insert(
        "limits".into(),
        format!(
            "max_body_bytes={} upstream_timeout={:?} stream_idle_timeout={:?}",
            s.limits().max_body_bytes,
            s.limits().upstream_timeout,
            s.limits().stream_idle_timeout
        ),
    );
    out
}

/// `+ added`, `- removed`, `~ changed` lines; empty when equal.
pub fn diff(old: Option<&Snapshot>, new: &Snapshot) -> String {
    let before = old.map(describe).unwrap_or_default();
    let after = describe(new);
    let mut out = String::new();
    for (k, v) in &after {
        match before.get(k) {
            None => out.push_str(&format!("+ {k}: {v}\n")),
            Some(old) if old != v => out.push_str(&format!("~ {k}: {old}\n    → {v}\n")),
            _ => {}
        }
    }
    for (k, v) in &before {
        if !after.contains_key(k) {
            out.push_str(&format!("- {k}: {v}\n"));
        }
    }
    out
}
