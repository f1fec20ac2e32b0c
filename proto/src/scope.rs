//! Node certificate scopes: which role and region a node certificate may act
//! as.
//!
//! A scoped certificate carries the DNS name `<role>.<region>.node.switchyard`
//! (`switchyard gen-certs --role R --region G` writes it). Every check of a
//! node's identity goes through here: the control plane (which region's keys
//! a node may receive) and the QUIC backhaul (an egress accepts only edges,
//! an edge only egress nodes of the region it dials). Without the scope any
//! certificate of the fleet CA could act as any node.

use rustls::pki_types::{CertificateDer, ServerName};

/// Role name of an edge node in a scope.
pub const EDGE: &str = "edge";
/// Role name of an egress node in a scope.
pub const EGRESS: &str = "egress";

/// The DNS name a certificate scoped to `role` in `region` carries.
pub fn node_scope_name(role: &str, region: &str) -> String {
    format!("{role}.{region}.node.switchyard")
}

/// Whether the leaf certificate is scoped to `role` in `region`. A region
/// that does not make a valid DNS name never matches.
pub fn certificate_has_scope(leaf: &CertificateDer<'_>, role: &str, region: &str) -> bool {
    let Ok(name) = ServerName::try_from(node_scope_name(role, region)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(names: &[&str]) -> CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        rcgen::generate_simple_self_signed(names)
            .unwrap()
            .cert
            .der()
            .clone()
    }

    #[test]
    fn scopes_match_role_and_region_exactly() {
        let cert = cert_with(&["localhost", &node_scope_name(EGRESS, "eu")]);
        assert!(certificate_has_scope(&cert, EGRESS, "eu"));
        assert!(!certificate_has_scope(&cert, EGRESS, "us"));
        assert!(!certificate_has_scope(&cert, EDGE, "eu"));
        assert!(!certificate_has_scope(&cert, EGRESS, ""));
        assert!(!certificate_has_scope(&cert, EGRESS, "e u"));
        assert!(!certificate_has_scope(
            &cert_with(&["localhost"]),
            EGRESS,
            "eu"
        ));
    }
}
