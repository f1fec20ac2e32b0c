//! Google Gemini (`generativelanguage.googleapis.com`) providers.

use async_trait::async_trait;
use serde_json::Value;
use switchyard_llm::gemini;
use switchyard_llm::gemini_native::{usage_from_metadata, GeminiPassthrough};
use switchyard_llm::GatewayError;

use super::{
    byte_stream, endpoint_url, full_body, post_json, unsupported, CallContext, Provider,
    ProviderReply,
};
use crate::request::{check_path_model, Operation};

static X_GOOG_API_KEY: http::HeaderName = http::HeaderName::from_static("x-goog-api-key");
pub struct GeminiAdapter;

/// Rough token estimate for embeddings, which Gemini does not count for us.
fn estimate_tokens(texts: &[String]) -> u64 {
    texts
        .iter()
        .map(|t| (t.chars().count() as u64).div_ceil(4))
        .sum()
}

#[async_trait]
impl Provider for GeminiAdapter {
    async fn call(&self, ctx: CallContext<'_>) -> Result<ProviderReply, GatewayError> {
        let model = &ctx.request.target.model;
        let provider = ctx.provider.name.as_str();
        // The model goes into the URL path: it must stay one segment.
        check_path_model(model)?;
        let url = |method: &str, query: Option<&str>| {
            let segment = format!("{model}:{method}");
            endpoint_url(ctx.provider, &["v1beta", "models", &segment], query)
        };
        let headers: Vec<(http::HeaderName, &str)> = ctx
            .key
            .map(|k| (X_GOOG_API_KEY.clone(), k.expose()))
            .into_iter()
            .collect();
        match &ctx.request.op {
            Operation::Chat(chat) => {
                let body = gemini::chat_request(chat, model)?;
                let url = if chat.stream {
                    url("streamGenerateContent", Some("alt=sse"))?
                } else {
                    url("generateContent", None)?
                };
                let resp = post_json(
                    &ctx,
                    url,
                    &body,
                    &headers,
                    chat.stream,
                    gemini::error_from_upstream,
                )
                .await?;
                if chat.stream {
                    return Ok(ProviderReply::Stream {
                        upstream: byte_stream(resp, provider),
                        translator: Box::new(gemini::ChatStream::new(model, chat.include_usage)),
                    });
                }
                let (_, v) = full_body(resp, provider).await?;
                let (openai, usage) = gemini::chat_response(&v, model)?;
                Ok(ProviderReply::Json {
                    body: bytes::Bytes::from(openai.to_string()),
                    usage: Some(usage),
                })
            }
            Operation::Embeddings(e) => {
                let body: Value = gemini::embed_request(e, model);
                let url = url("batchEmbedContents", None)?;
                let resp = post_json(
                    &ctx,
                    url,
                    &body,
                    &headers,
                    false,
                    gemini::error_from_upstream,
                )
                .await?;
                let (_, v) = full_body(resp, provider).await?;
                let prompt_tokens = estimate_tokens(&e.inputs());
                let openai = gemini::embed_response(&v, model, prompt_tokens)?;
                Ok(ProviderReply::Json {
                    body: bytes::Bytes::from(openai.to_string()),
                    usage: Some(switchyard_llm::openai::Usage {
                        prompt_tokens,
                        ..Default::default()
                    }),
                })
            }
            Operation::Generate(g) => {
                // Same protocol: the caller's body as sent, the model in the URL.
                let url = if g.stream {
                    url("streamGenerateContent", Some("alt=sse"))?
                } else {
                    url("generateContent", None)?
                };
                let resp = post_json(
                    &ctx,
                    url,
                    &g.body,
                    &headers,
                    g.stream,
                    gemini::error_from_upstream,
                )
                .await?;
                if g.stream {
                    return Ok(ProviderReply::Stream {
                        upstream: byte_stream(resp, provider),
                        translator: Box::new(GeminiPassthrough::new()),
                    });
                }
                let (raw, v) = full_body(resp, provider).await?;
                let usage = v.get("usageMetadata").and_then(usage_from_metadata);
                Ok(ProviderReply::Json { body: raw, usage })
            }
            Operation::GeminiEmbed(e) => {
                let method = if e.batch {
                    "batchEmbedContents"
                } else {
                    "embedContent"
                };
                let resp = post_json(
                    &ctx,
                    url(method, None)?,
                    &e.upstream_body(model),
                    &headers,
                    false,
                    gemini::error_from_upstream,
                )
                .await?;
                let (raw, _) = full_body(resp, provider).await?;
                Ok(ProviderReply::Json {
                    body: raw,
                    usage: Some(switchyard_llm::openai::Usage {
                        prompt_tokens: estimate_tokens(&e.texts),
                        ..Default::default()
                    }),
                })
            }
            Operation::GeminiCountTokens { body, .. } => {
                let url = url("countTokens", None)?;
                let resp = post_json(
                    &ctx,
                    url,
                    body,
                    &headers,
                    false,
                    gemini::error_from_upstream,
                )
                .await?;
                let (raw, _) = full_body(resp, provider).await?;
                Ok(ProviderReply::Json {
                    body: raw,
                    usage: None,
                })
            }
            _ => Err(unsupported(ctx.provider, "this endpoint")),
        }
    }
}
