//! The `tenants` section, and the residency check that needs the whole
//! compiled snapshot.

use std::collections::HashSet;

use switchyard_proto::{KeyHash, PlanError, Snapshot, Tenant, Tenants};

use super::{Errors, PolicyDocument};

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
        let key = KeyHash::from_hex(&t.key_sha256);
        match &key {
            Some(hash) => {
                if tenants.contains_key(hash) {
                    err(
                        format!("{path}.key_sha256"),
                        "another tenant has the same key".into(),
                    );
                }
            }
            None => err(
                format!("{path}.key_sha256"),
                "must be 64 hex characters (SHA-256 of the virtual key)".into(),
            ),
        }
        if t.limits.rpm == Some(0) {
            err(
                format!("{path}.limits.rpm"),
                "must be greater than 0".into(),
            );
        }
        if t.limits.tpm == Some(0) {
            err(
                format!("{path}.limits.tpm"),
                "must be greater than 0".into(),
            );
        }
        if let Some(b) = &t.budget {
            if !(b.monthly_usd.is_finite() && b.monthly_usd > 0.0) {
                err(
                    format!("{path}.budget.monthly_usd"),
                    "must be a positive number".into(),
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
        }
        // Without a valid key the document is refused anyway.
        if let Some(key) = key {
            tenants.insert(
                key,
                Tenant {
                    id: t.id.clone(),
                    allowed_models: t.allowed_models.clone(),
                    rpm: t.limits.rpm,
                    tpm: t.limits.tpm,
                    monthly_budget_usd: t.budget.as_ref().map(|b| b.monthly_usd),
                    residency: t.residency.clone(),
                },
            );
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
