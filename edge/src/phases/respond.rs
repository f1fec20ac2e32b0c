//! `respond`: commit the answer and write it, observers watching.
//!
//! The answer reaches this phase only once it can be committed (a complete
//! body, or a stream's first event): the status line goes out here, then
//! every frame the moment it exists, never buffered. A client that hangs
//! up is noticed even while the provider is silent.

use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::HeaderName;
use pingora::protocols::http::ServerSession;
use switchyard_proto::Snapshot;

use super::dispatch::{Answer, AnswerBody};
use super::resume::{Resume, Spliced};
use super::Failure;
use crate::app::EdgeApp;
use crate::ctx::RequestCtx;
use crate::respond::{self, Common};

const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-switchyard-attempts");
const X_TARGET: HeaderName = HeaderName::from_static("x-switchyard-target");

pub(crate) async fn respond(
    app: &EdgeApp,
    session: &mut ServerSession,
    ctx: &mut RequestCtx,
    answer: Answer,
    resume: Option<Box<Resume>>,
) {
    ctx.status = answer.status.as_u16();
    ctx.stats = Some(answer.stats.clone());
    let served = ctx.served.clone();
    let common = Common {
        request_id: &ctx.request_id,
        region: served
            .as_ref()
            .and_then(|s| s.region.as_deref())
            .unwrap_or(&app.region),
        jurisdiction: served
            .as_ref()
            .and_then(|s| s.jurisdiction.as_deref())
            .unwrap_or("unspecified"),
    };
    let mut extra = vec![(CONTENT_TYPE, answer.content_type)];
    if let Some(ra) = answer.retry_after {
        extra.push((RETRY_AFTER, ra));
    }
    // Which target served, after how many attempts: failover is invisible
    // to the answer itself, not to whoever wants to know.
    extra.push((X_ATTEMPTS, ctx.attempts.len().to_string()));
    if let Some(s) = served.as_ref().filter(|s| !s.target.model.is_empty()) {
        let target = [s.target.provider.as_str(), "/", &s.target.model].concat();
        extra.push((X_TARGET, target));
    }
    extra.extend(ctx.answer_headers.iter().cloned());
    let observers = &app.hooks.response;
    for o in observers {
        o.on_commit(ctx, ctx.status);
    }
    ctx.committed_at = Some(std::time::Instant::now());
    let gone = match answer.body {
        AnswerBody::Full(body) => {
            for o in observers {
                o.on_body(ctx, &body);
            }
            !respond::full(session, answer.status, body, &common, &extra).await
        }
        AnswerBody::Stream { first, rest } => {
            let mut rest = Spliced::new(first, rest, resume);
            let h = respond::stream_header(session, answer.status, &common, &extra);
            'write: {
                if session.write_response_header(h).await.is_err() {
                    break 'write true;
                }
                loop {
                    // Waiting on the client too means a hang-up is noticed
                    // even while the provider is silent (or a resume runs).
                    let next = tokio::select! {
                        c = rest.next(app, ctx) => c,
                        _ = session.read_body_or_idle(true) => break 'write true,
                    };
                    let Some(chunk) = next else { break };
                    for o in observers {
                        o.on_body(ctx, &chunk);
                    }
                    if session.write_response_body(chunk, false).await.is_err() {
                        break 'write true;
                    }
                }
                session.finish_body().await.is_err()
            }
        }
    };
    ctx.client_gone |= gone;
    for o in observers {
        o.on_end(ctx);
    }
}

/// Answers a failed request in the caller's protocol. Returns whether the
/// connection may serve another request.
pub(crate) async fn failure(
    app: &EdgeApp,
    session: &mut ServerSession,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
    (e, allow): Failure,
) -> bool {
    ctx.status = e.status();
    ctx.error = Some(e.kind.label());
    let jurisdiction = app.jurisdiction(snap);
    let common = app.common(&ctx.request_id, &jurisdiction);
    let mut extra = allow
        .map(|a| vec![(ALLOW, a.to_string())])
        .unwrap_or_default();
    if !ctx.attempts.is_empty() {
        extra.push((X_ATTEMPTS, ctx.attempts.len().to_string()));
    }
    extra.extend(ctx.answer_headers.iter().cloned());
    // An unread request body (413, early errors) makes the connection unusable.
    let reusable = session.is_body_done();
    if !reusable {
        session.set_keepalive(None);
    }
    respond::error(session, &e, ctx.protocol, &common, extra).await;
    reusable
}
