//! Anthropic Messages API providers.
//!
//! OpenAI-shaped calls are translated (see `switchyard_llm::anthropic`);
//! Anthropic-shaped calls from the gateway's own `/v1/messages` pass through
//! untouched except for the model name.

use async_trait::async_trait;
use serde_json::Value;
use switchyard_llm::anthropic;
use switchyard_llm::passthrough::AnthropicPassthrough;
use switchyard_llm::GatewayError;

use super::{byte_stream, full_body, post_json, unsupported, CallContext, Provider, ProviderReply};
use crate::request::Operation;

static ANTHROPIC_VERSION: http::HeaderName = http::HeaderName::from_static("anthropic-version");
static ANTHROPIC_BETA: http::HeaderName = http::HeaderName::from_static("anthropic-beta");
static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

pub struct AnthropicAdapter;

#[async_trait]
impl Provider for AnthropicAdapter {
    async fn call(&self, ctx: CallContext<'_>) -> Result<ProviderReply, GatewayError> {
        let model = &ctx.request.target.model;
        let provider = ctx.provider.name.as_str();
        let (path, body, stream) = match &ctx.request.op {
            Operation::Chat(chat) => (
                "v1/messages",
                anthropic::chat_request(chat, model)?,
                chat.stream,
            ),
            Operation::Messages { body, chat } => {
                let mut body = body.clone();
                body.insert("model".into(), Value::String(model.clone()));
                ("v1/messages", Value::Object(body), chat.stream)
            }
            Operation::CountTokens { body } => {
                let mut body = body.clone();
                body.insert("model".into(), Value::String(model.clone()));
                ("v1/messages/count_tokens", Value::Object(body), false)
            }
            Operation::Embeddings(_) => return Err(unsupported(ctx.provider, "embeddings")),
            _ => return Err(unsupported(ctx.provider, "this endpoint")),
        };
        let version = ctx
            .request
            .forward_headers
            .iter()
            .find(|(k, _)| k == "anthropic-version")
            .map(|(_, v)| v.as_str())
            .unwrap_or(anthropic::DEFAULT_VERSION);
        let mut headers = vec![(ANTHROPIC_VERSION.clone(), version)];
        if let Some((_, beta)) = ctx
            .request
            .forward_headers
            .iter()
            .find(|(k, _)| k == "anthropic-beta")
        {
            headers.push((ANTHROPIC_BETA.clone(), beta.as_str()));
        }
        if let Some(key) = ctx.key {
            headers.push((X_API_KEY.clone(), key.expose()));
        }
        let url = super::provider_url(ctx.provider, path)?;
        let resp = post_json(
            &ctx,
            url,
            &body,
            &headers,
            stream,
            anthropic::error_from_upstream,
        )
        .await?;
        let native = !matches!(ctx.request.op, Operation::Chat(_));
        if stream {
            let translator: Box<dyn switchyard_llm::translate::StreamTranslator> =
                match &ctx.request.op {
                    Operation::Chat(chat) => {
                        Box::new(anthropic::ChatStream::new(model, chat.include_usage))
                    }
                    _ => Box::new(AnthropicPassthrough::new()),
                };
            return Ok(ProviderReply::Stream {
                upstream: byte_stream(resp, provider),
                translator,
            });
        }
        let (raw, v) = full_body(resp, provider).await?;
        if native {
            let usage = v.get("usage").map(native_usage);
            return Ok(ProviderReply::Json { body: raw, usage });
        }
        let (openai, usage) = anthropic::chat_response(&v, model)?;
        Ok(ProviderReply::Json {
            body: bytes::Bytes::from(openai.to_string()),
            usage: Some(usage),
        })
    }
}

fn native_usage(u: &Value) -> switchyard_llm::openai::Usage {
    let get = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    switchyard_llm::openai::Usage {
        prompt_tokens: get("input_tokens")
            + get("cache_read_input_tokens")
            + get("cache_creation_input_tokens"),
        completion_tokens: get("output_tokens"),
        cached_tokens: get("cache_read_input_tokens"),
        reasoning_tokens: 0,
    }
}
