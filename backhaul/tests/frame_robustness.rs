//! A bounded, deterministic fuzz run of backhaul frame decoding that is part
//! of the normal test suite: valid frame streams of both directions, mutated
//! at random (bytes flipped, cut, duplicated, inserted, length prefixes
//! rewritten), go through the decoder and the conversions each end applies.
//! Nothing may panic and no frame over its limit may be accepted. The
//! open-ended version lives in `backhaul/fuzz` (cargo-fuzz).

use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_backhaul::tunnel::frame::{
    self, encode, encode_message, error_to_wire, FrameError, FrameKind, InspectError,
};
use switchyard_backhaul::{EgressRequest, Operation, Protocol, RawRequest};
use switchyard_llm::openai::{parse_json_object, ChatRequest};
use switchyard_llm::{ErrorKind, GatewayError, Retry, Source};
use switchyard_proto::backhaul as wire;
use switchyard_proto::RouteTarget;

/// xorshift64*: a seeded generator, so a failure reproduces exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn request(op: Operation, inbound: Protocol) -> EgressRequest {
    EgressRequest {
        request_id: "req_fuzz".into(),
        tenant: "t".into(),
        target: RouteTarget {
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
        },
        op,
        simulate: Some("ttft_ms=1".into()),
        received_at: Instant::now(),
        inbound,
        forward_headers: vec![("anthropic-version".into(), "2023-06-01".into())],
        residency: vec!["eu".into()],
        trace: None,
    }
}

fn upstream(req: &EgressRequest) -> Vec<u8> {
    let (header, body) = frame::request_to_wire(req, Duration::from_millis(1234));
    let mut out = encode_message(FrameKind::RequestHeader, &header).to_vec();
    out.extend_from_slice(&body);
    out
}

fn corpus() -> Vec<Vec<u8>> {
    let chat = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{}}}]}"#;
    let messages = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
    let mut out = vec![
        upstream(&request(
            Operation::Chat(ChatRequest::parse(chat).unwrap()),
            Protocol::OpenAi,
        )),
        upstream(&request(
            Operation::CountTokens {
                body: parse_json_object(messages).unwrap(),
            },
            Protocol::Anthropic,
        )),
        upstream(&request(
            Operation::Raw(RawRequest {
                method: "POST".into(),
                path: "v1/chat/completions?x=1".into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: Bytes::from_static(chat),
            }),
            Protocol::OpenAi,
        )),
    ];
    let error = GatewayError::new(ErrorKind::Overloaded, "busy")
        .with_code("egress_overloaded")
        .with_param("p")
        .with_retry_after(Some("2".into()))
        .with_source(Source::Egress)
        .with_retry(Retry::AnotherEgress);
    let mut refused = frame::ACCEPTED.to_vec();
    refused.extend_from_slice(&encode_message(
        FrameKind::ResponseHeader,
        &wire::ResponseHeader {
            error: Some(error_to_wire(&error)),
            ..Default::default()
        },
    ));
    out.push(refused);
    let mut streamed = frame::ACCEPTED.to_vec();
    streamed.extend_from_slice(&encode_message(
        FrameKind::ResponseHeader,
        &wire::ResponseHeader {
            status: 200,
            content_type: "text/event-stream".into(),
            retry_after: Some("1".into()),
            streaming: true,
            error: None,
        },
    ));
    for i in 0..3 {
        streamed.extend_from_slice(&encode(
            FrameKind::Data,
            format!("data: {{\"i\":{i}}}\n\n").as_bytes(),
        ));
    }
    streamed.extend_from_slice(&encode_message(
        FrameKind::Trailer,
        &wire::Trailer {
            has_usage: true,
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 1,
            ttft_us: 900,
            stream_failed: false,
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            egress_region: "eu".into(),
            egress_node: "egress-eu-1".into(),
            key_pool: "main".into(),
            key_id: "k1".into(),
            reasoning_tokens: 2,
            upstream_us: 800,
        },
    ));
    out.push(streamed);
    out
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            break;
        }
        let i = rng.below(data.len());
        match rng.below(7) {
            0 => data[i] = rng.next() as u8,
            1 => data.truncate(i),
            2 => {
                let end = (i + rng.below(64)).min(data.len());
                let copy = data[i..end].to_vec();
                data.splice(i..i, copy);
            }
            3 => {
                let special = [0u8, 1, 2, 3, 4, 5, 6, 0x08, 0x0a, 0x12, 0x7f, 0x80, 0xff];
                data.insert(i, special[rng.below(special.len())]);
            }
            4 => {
                let end = (i + rng.below(32)).min(data.len());
                data.drain(i..end);
            }
            // A length prefix that lies: huge, zero, or off by a little.
            5 => {
                if let Some(len) = data.get_mut(1..5) {
                    let v = match rng.below(3) {
                        0 => u32::MAX - rng.below(16) as u32,
                        1 => 0,
                        _ => u32::from_be_bytes([len[0], len[1], len[2], len[3]])
                            .wrapping_add(rng.below(9) as u32)
                            .wrapping_sub(4),
                    };
                    len.copy_from_slice(&v.to_be_bytes());
                }
            }
            // Another frame's bytes appended or prepended.
            _ => {
                let frame = encode(FrameKind::Accepted, &[]);
                if rng.below(2) == 0 {
                    data.extend_from_slice(&frame);
                } else {
                    data.splice(0..0, frame.iter().copied());
                }
            }
        }
    }
    data
}

#[test]
fn the_corpus_decodes() {
    for input in corpus() {
        let kinds = frame::inspect(&input).unwrap();
        assert!(!kinds.is_empty());
    }
}

#[test]
fn mutated_frames_never_panic_nor_pass_a_limit() {
    let corpus = corpus();
    let mut rng = Rng(0x5eed_ba5e_f4a3_0002);
    let (mut ok, mut refused) = (0usize, 0usize);
    for _ in 0..20_000 {
        let pick = rng.below(corpus.len());
        let input = mutate(&mut rng, &corpus[pick]);
        match frame::inspect(&input) {
            Ok(kinds) => {
                // Every frame has at least its prefix in the input.
                assert!(kinds.len() * 5 <= input.len());
                ok += 1;
            }
            Err(InspectError::Frame(FrameError::TooLarge { len, limit, .. })) => {
                assert!(len > limit);
                refused += 1;
            }
            Err(_) => refused += 1,
        }
    }
    // Both outcomes were exercised, not just one.
    assert!(ok > 100 && refused > 100, "ok {ok}, refused {refused}");
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x0dd_b17e_5eed_0003);
    for _ in 0..20_000 {
        let len = rng.below(64);
        let mut input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Mostly valid kinds, so decoding goes past the first byte.
        if let Some(k) = input.first_mut() {
            *k = 1 + (*k % 6);
        }
        let _ = frame::inspect(&input);
    }
}
