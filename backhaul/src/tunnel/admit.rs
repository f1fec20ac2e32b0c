//! What the egress re-derives or re-checks before it runs a request an edge
//! sent. The edge is authenticated (an edge-scoped certificate), but a
//! compromised or buggy edge must not be able to widen what a tenant may
//! do: residency comes from the egress's own snapshot (the frame may only
//! narrow it), and a raw passthrough may carry only what a client
//! passthrough can (ordinary methods, a path that stays below the
//! provider's base URL, the headers the edge forwards).

use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::Snapshot;

use crate::request::{EgressRequest, Operation, RawRequest};

/// Methods a client passthrough is relayed with; anything else (CONNECT,
/// TRACE, extension methods) has no provider API behind it.
const RAW_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
/// Client headers the edge relays on a raw passthrough (its `RAW_HEADERS`).
const RAW_HEADERS: &[&str] = &[
    "content-type",
    "accept",
    "anthropic-version",
    "anthropic-beta",
];
/// Caller headers the edge relays to a same-protocol provider (its
/// `FORWARDED_HEADERS`).
const FORWARDED_HEADERS: &[&str] = &["anthropic-version", "anthropic-beta"];

/// Replaces the request's residency by what the egress's snapshot allows
/// the tenant, narrowed by what the edge sent; refuses a tenant the egress
/// does not know.
pub fn derive_residency(snap: &Snapshot, req: &mut EgressRequest) -> Result<(), GatewayError> {
    let Some(policy) = snap.tenant(&req.tenant) else {
        // Without the tenant its residency cannot be known; serving it with
        // the edge's word alone would let any edge lift a restriction.
        return Err(GatewayError::new(
            ErrorKind::Forbidden,
            format!(
                "The egress node does not know tenant `{}` (its policy may still be on its way).",
                req.tenant
            ),
        )
        .with_code("unknown_tenant"));
    };
    let claimed = std::mem::take(&mut req.residency);
    req.residency = match (&policy.residency, claimed.is_empty()) {
        (None, _) => claimed,
        (Some(own), true) => own.clone(),
        (Some(own), false) => {
            let narrowed: Vec<String> = claimed.into_iter().filter(|j| own.contains(j)).collect();
            if narrowed.is_empty() {
                // An empty list would read as "unrestricted" downstream.
                return Err(GatewayError::new(
                    ErrorKind::Forbidden,
                    format!(
                        "Residency rule: tenant `{}` may only use jurisdiction(s) {}.",
                        req.tenant,
                        own.join(", ")
                    ),
                )
                .with_code("residency_violation"));
            }
            narrowed
        }
    };
    Ok(())
}

/// Refuses what no edge sends: headers outside the forwarded sets, and raw
/// passthroughs with other methods or a path that could leave the
/// provider's base URL.
pub fn check_request(req: &EgressRequest) -> Result<(), GatewayError> {
    check_headers(&req.forward_headers, FORWARDED_HEADERS)?;
    if let Operation::Raw(raw) = &req.op {
        check_raw(raw)?;
    }
    Ok(())
}

fn check_headers(headers: &[(String, String)], allowed: &[&str]) -> Result<(), GatewayError> {
    match headers
        .iter()
        .find(|(name, _)| !allowed.iter().any(|a| name.eq_ignore_ascii_case(a)))
    {
        Some((name, _)) => Err(GatewayError::invalid(format!(
            "The header `{name}` is not forwarded to providers."
        ))),
        None => Ok(()),
    }
}

fn check_raw(raw: &RawRequest) -> Result<(), GatewayError> {
    if !RAW_METHODS.contains(&raw.method.as_str()) {
        return Err(GatewayError::new(
            ErrorKind::MethodNotAllowed,
            format!("Passthrough does not relay the method `{}`.", raw.method),
        ));
    }
    check_headers(&raw.headers, RAW_HEADERS)?;
    if !raw_path_is_safe(&raw.path) {
        return Err(GatewayError::invalid(
            "The passthrough path must stay below the provider's base URL (no `.` or `..` segments, encoded slashes or backslashes).",
        )
        .with_code("invalid_passthrough_path"));
    }
    Ok(())
}

/// A path (and query) that, appended to the base URL, stays below it and
/// means the same to every URL parser on the way.
fn raw_path_is_safe(path_and_query: &str) -> bool {
    if path_and_query
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'#' || b == b'\\' || b >= 0x80)
    {
        return false;
    }
    let path = path_and_query
        .split_once('?')
        .map_or(path_and_query, |(p, _)| p);
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return false;
    }
    !path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;
    use switchyard_proto::{KeyHash, RouteTarget, Tenant};

    use super::*;
    use crate::request::Protocol;

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::builder();
        for (id, residency) in [
            ("eu-tenant", Some(vec!["eu".to_string()])),
            ("global", None),
        ] {
            s.tenants.insert(
                KeyHash::of(id),
                Tenant {
                    id: id.into(),
                    residency,
                    ..Tenant::default()
                },
            );
        }
        s.build()
    }

    fn request(tenant: &str, residency: &[&str], op: Operation) -> EgressRequest {
        EgressRequest {
            request_id: "r".into(),
            tenant: tenant.into(),
            target: RouteTarget {
                provider: "p".into(),
                model: "m".into(),
            },
            op,
            simulate: None,
            received_at: Instant::now(),
            inbound: Protocol::OpenAi,
            forward_headers: Vec::new(),
            residency: residency.iter().map(|j| j.to_string()).collect(),
            trace: None,
        }
    }

    fn raw(method: &str, path: &str) -> Operation {
        Operation::Raw(RawRequest {
            method: method.into(),
            path: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::new(),
        })
    }

    fn residency_of(tenant: &str, claimed: &[&str]) -> Result<Vec<String>, GatewayError> {
        let mut req = request(tenant, claimed, raw("POST", "x"));
        derive_residency(&snapshot(), &mut req).map(|()| req.residency)
    }

    #[test]
    fn the_frame_narrows_residency_but_never_widens_it() {
        // Omitting residency does not lift the tenant's own.
        assert_eq!(residency_of("eu-tenant", &[]).unwrap(), ["eu"]);
        assert_eq!(residency_of("eu-tenant", &["eu", "us"]).unwrap(), ["eu"]);
        let e = residency_of("eu-tenant", &["us"]).unwrap_err();
        assert_eq!(e.code, Some("residency_violation"));
        // An unrestricted tenant keeps what the edge narrowed it to.
        assert_eq!(residency_of("global", &["us"]).unwrap(), ["us"]);
        assert!(residency_of("global", &[]).unwrap().is_empty());
        let e = residency_of("made-up", &[]).unwrap_err();
        assert_eq!(e.code, Some("unknown_tenant"));
    }

    #[test]
    fn raw_passthrough_is_held_to_what_a_client_may_send() {
        let ok = |m: &str, p: &str| check_request(&request("global", &[], raw(m, p))).is_ok();
        assert!(ok("POST", "v1/chat/completions"));
        assert!(ok("GET", "v1beta/models?pageSize=5&x=a/b"));
        assert!(ok("DELETE", "v1/files/file-abc"));
        for path in [
            "../admin",
            "v1/../../admin/x",
            "v1/%2e%2E/admin",
            "v1/.%2e/admin",
            "v1/./x",
            "v1%2fadmin",
            "v1%5Cadmin",
            "v1\\..\\admin",
            "v1/x#frag",
            "v1/x y",
            "v1/\r\nx",
        ] {
            assert!(!ok("POST", path), "{path:?} was accepted");
        }
        for method in ["CONNECT", "TRACE", "FOO", "get"] {
            assert!(!ok(method, "v1/x"), "{method} was accepted");
        }
        let mut req = request("global", &[], raw("POST", "v1/x"));
        if let Operation::Raw(r) = &mut req.op {
            r.headers
                .push(("authorization".into(), "Bearer other".into()));
        }
        assert!(check_request(&req).is_err());
        let mut req = request("global", &[], raw("POST", "v1/x"));
        req.forward_headers
            .push(("host".into(), "evil.example".into()));
        assert!(check_request(&req).is_err());
    }
}
