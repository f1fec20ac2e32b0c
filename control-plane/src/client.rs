//! The operator's client (behind `switchyard ctl`): one connection to the
//! `Operator` service with the admin token attached to every call.

use std::time::Duration;

use switchyard_proto::Secret;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::pb;
use crate::pb::operator_client::OperatorClient;

/// TLS for `https://` servers: the CA to trust and, optionally, an operator
/// client certificate.
#[derive(Clone, Default)]
pub struct ClientTls {
    pub ca: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Secret)>,
    pub domain: Option<String>,
}

#[derive(Clone)]
pub struct TokenInterceptor(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Operator = OperatorClient<InterceptedService<Channel, TokenInterceptor>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("the token contains characters not allowed in a header")]
    BadToken,
}

pub async fn connect(
    url: &str,
    token: Option<&Secret>,
    tls: Option<ClientTls>,
) -> Result<Operator, ClientError> {
    let err = |source| ClientError::Connect {
        url: url.to_string(),
        source,
    };
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(err)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60));
    if let Some(tls) = tls {
        let mut t = ClientTlsConfig::new();
        if let Some(ca) = &tls.ca {
            t = t.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(cert, key.expose()));
        }
        if let Some(d) = &tls.domain {
            t = t.domain_name(d.clone());
        }
        ep = ep.tls_config(t).map_err(err)?;
    }
    let channel = ep.connect().await.map_err(err)?;
    let header = match token {
        Some(t) => Some(
            format!("Bearer {}", t.expose())
                .parse()
                .map_err(|_| ClientError::BadToken)?,
        ),
        None => None,
    };
    Ok(OperatorClient::with_interceptor(
        channel,
        TokenInterceptor(header),
    ))
}

/// Renders an apply answer for a terminal: errors first, then the diff.
pub fn render_outcome(r: &pb::ApplyPolicyResponse, dry_run: bool) -> String {
    let mut out = String::new();
    for e in &r.errors {
        if e.path.is_empty() {
            out.push_str(&format!("error: {}\n", e.message));
        } else {
            out.push_str(&format!("error: {}: {}\n", e.path, e.message));
        }
    }
    if !r.diff.is_empty() {
        out.push_str(&r.diff);
    }
    if r.errors.is_empty() {
        if dry_run {
            out.push_str(&format!(
                "dry run: valid; current version stays {}\n",
                r.version
            ));
        } else if r.applied {
            out.push_str(&format!("applied: version {}\n", r.version));
        } else {
            out.push_str(&format!("unchanged: version {}\n", r.version));
        }
    }
    out
}
