//! The `tenants` section, and the residency check that needs the whole
//! compiled snapshot.

use std::collections::HashSet;

use switchyard_proto::{KeyHash, PlanError, Snapshot, Tenant, Tenants};

use super::{CounterErrorDoc, EdgeResidencyDoc, Errors, PolicyDocument};

pub(super) fn tenants(
    doc: &PolicyDocument,
    jurisdictions: &HashSet<String>,
    errors: &mut Errors,
) -> Tenants {
    let mut err = errors.sink();
    let mut tenants = Tenants::default();
    let mut seen_ids = HashSet::new();
    for (i, t) in doc.tenants.iter().enumerate() {
        let path = format!("tenants[{i}]");
        if !seen_ids.insert(t.id.clone()) {
            err(
                format!("{path}.id"),
                format!("duplicate tenant id {:?}", t.id),
            );
        }
        let key = match &t.key_sha256 {
            None => None,
            Some(hex) => match KeyHash::from_hex(hex) {
                Some(hash) => {
                    if tenants.contains_key(&hash) {
                        err(
                            format!("{path}.key_sha256"),
                            "another tenant has the same key".into(),
                        );
                    }
                    Some(hash)
                }
                None => {
                    err(
                        format!("{path}.key_sha256"),
                        "must be 64 hex characters (SHA-256 of the virtual key)".into(),
                    );
                    None
                }
            },
        };
        for (field, zero) in [
            ("rpm", t.limits.rpm == Some(0)),
            ("tpm", t.limits.tpm == Some(0)),
            ("concurrency", t.limits.concurrency == Some(0)),
        ] {
            if zero {
                err(
                    format!("{path}.limits.{field}"),
                    "must be greater than 0".into(),
                );
            }
        }
        if let Some(b) = &t.budget {
            for (field, v) in [("monthly_usd", b.monthly_usd), ("daily_usd", b.daily_usd)] {
                if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    err(
                        format!("{path}.budget.{field}"),
                        "must be a positive number".into(),
                    );
                }
            }
            if b.monthly_usd.is_none() && b.daily_usd.is_none() {
                err(
                    format!("{path}.budget"),
                    "set monthly_usd, daily_usd or both".into(),
                );
            }
            if b.warn_at.is_some_and(|w| !(w > 0.0 && w < 1.0)) {
                err(
                    format!("{path}.budget.warn_at"),
                    "must be a fraction between 0 and 1 (0.8 warns at 80 %)".into(),
                );
            }
        }
        if let Some(res) = &t.residency {
            if res.is_empty() {
                err(
                    format!("{path}.residency"),
                    "an empty list allows nothing; omit it to allow every jurisdiction".into(),
                );
            }
            for (j, tag) in res.iter().enumerate() {
                if !jurisdictions.contains(tag) {
                    err(
                        format!("{path}.residency[{j}]"),
                        format!("unknown jurisdiction {tag:?} (no region or provider declares it)"),
                    );
                }
            }
        } else if t.edge_residency.is_some() {
            err(
                format!("{path}.edge_residency"),
                "only means something with `residency`".into(),
            );
        }
        if t.hedge_budget_percent.is_some_and(|p| p > 100) {
            err(format!("{path}.hedge_budget_percent"), "at most 100".into());
        }
        let tenant = Tenant {
            id: t.id.clone(),
            allowed_models: t.allowed_models.clone(),
            rpm: t.limits.rpm,
            tpm: t.limits.tpm,
            concurrency: t.limits.concurrency,
            daily_budget_usd: t.budget.as_ref().and_then(|b| b.daily_usd),
            monthly_budget_usd: t.budget.as_ref().and_then(|b| b.monthly_usd),
            budget_warn_ratio: t.budget.as_ref().and_then(|b| b.warn_at),
            fail_closed: t.limits.on_counter_error == Some(CounterErrorDoc::Closed),
            limit_share: None,
            residency: t.residency.clone(),
            edge_residency_relaxed: t.edge_residency == Some(EdgeResidencyDoc::Relaxed),
            hedge_budget_percent: t.hedge_budget_percent,
        };
        match key {
            Some(key) => tenants.insert(key, tenant),
            None => tenants.insert_keyless(tenant),
        }
    }
    tenants
}

/// A tenant restricted to some jurisdictions must have, for every model it
/// is allowed, at least one target inside them.
pub(super) fn check_residency(doc: &PolicyDocument, snapshot: &Snapshot, errors: &mut Errors) {
    let mut err = errors.sink();
    for (i, t) in doc.tenants.iter().enumerate() {
        let (Some(res), Some(allowed)) = (&t.residency, &t.allowed_models) else {
            continue;
        };
        if res.is_empty() {
            continue;
        }
        for (k, model) in allowed.iter().enumerate() {
            let path = format!("tenants[{i}].allowed_models[{k}]");
            if model == "*" {
                continue;
            }
            if let Some(provider) = model.strip_suffix("/*") {
                let j = snapshot
                    .providers()
                    .get(provider)
                    .and_then(|p| p.jurisdiction.clone());
                if snapshot.providers().contains_key(provider)
                    && !j.as_ref().is_some_and(|j| res.contains(j))
                {
                    err(
                        path,
                        format!(
                            "provider {provider:?} is in jurisdiction {}, outside the tenant's residency ({})",
                            j.as_deref().unwrap_or("unknown"),
                            res.join(", ")
                        ),
                    );
                }
                continue;
            }
            if let Err(PlanError::Residency { blocked, .. }) = snapshot.plan(model, Some(res)) {
                let outside: Vec<String> = blocked
                    .iter()
                    .map(|b| {
                        format!(
                            "{}/{} ({})",
                            b.target.provider,
                            b.target.model,
                            b.jurisdiction.as_deref().unwrap_or("unknown jurisdiction")
                        )
                    })
                    .collect();
                err(
                    path,
                    format!(
                        "every route to {model:?} leaves the tenant's residency ({}): {}",
                        res.join(", "),
                        outside.join(", ")
                    ),
                );
            }
        }
    }
}
