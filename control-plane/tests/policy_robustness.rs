//! A bounded, deterministic fuzz run that is part of the normal test suite:
//! the policies shipped in `deploy/` and a few hostile shapes, mutated at
//! random (bytes flipped, cut, duplicated, YAML indicators inserted), go
//! through the anchor scan, the strict parser, the sealer and the compiler.
//! Nothing may panic, and the sealer never leaves a plain `value:` key.
//! The open-ended version is `fuzz/` (cargo-fuzz, target `policy_parser`).

use std::path::PathBuf;

use switchyard_control::secrets::{seal_document, MasterKey, MasterKeys, MASTER_KEY_ENV};
use switchyard_control::{compile_policy, parse_policy, PolicyOptions};

const KEY: &str = "3c1f9a0e7b52d4686e0b9c27f1a3d5e4902b7c6a18f4e3d25c9b0a7e6f1d2c38";

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

fn corpus() -> Vec<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut out: Vec<String> = ["dev/switchyard.yaml", "examples/multi-region.yaml"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(root.join(f)).ok())
        .collect();
    out.push(
        "providers:\n  p:\n    kind: openai\n    region: us\n    key_pools:\n      - keys: [ { value: 12345678901234 }, { value: !x tagged }, { value: \"sk-1\" } ]\nregions:\n  us: { jurisdiction: us }\n"
            .into(),
    );
    out.push("aliases:\n  a: &x \"big\"\n  b: *x\n  c: [*x, *x]\n".into());
    out
}

fn mutate(rng: &mut Rng, input: &str) -> Vec<u8> {
    let mut data = input.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            break;
        }
        let i = rng.below(data.len());
        match rng.below(5) {
            0 => data[i] = rng.next() as u8,
            1 => data.truncate(i),
            2 => {
                let end = (i + rng.below(64)).min(data.len());
                let copy = data[i..end].to_vec();
                data.splice(i..i, copy);
            }
            3 => {
                let special = [
                    b'&', b'*', b'!', b'{', b'}', b'[', b']', b':', b'\n', b' ', b'-', b'"', b'|',
                ];
                data.insert(i, special[rng.below(special.len())]);
            }
            _ => {
                let end = (i + rng.below(32)).min(data.len());
                data.drain(i..end);
            }
        }
    }
    data
}

#[test]
fn mutated_policies_never_panic_and_never_store_plain_keys() {
    let keys = MasterKeys {
        current: Some(MasterKey::from_hex(KEY, MASTER_KEY_ENV).unwrap()),
        previous: None,
    };
    let no_env = |_: &str| None;
    let corpus = corpus();
    assert!(corpus.len() >= 3, "the deploy/ policies were not found");
    let mut rng = Rng(0x5eed_c0de_1234_5678);
    for round in 0..3000 {
        let base = &corpus[rng.below(corpus.len())];
        let data = mutate(&mut rng, base);
        let Ok(yaml) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(sealed) = seal_document(yaml, &keys, true) {
            if let Some(text) = &sealed.yaml {
                let doc = parse_policy(text)
                    .unwrap_or_else(|e| panic!("round {round}: sealed text unparsable: {e}"));
                assert!(
                    doc.providers
                        .values()
                        .flat_map(|p| &p.key_pools)
                        .flat_map(|pool| &pool.keys)
                        .all(|k| k.value.is_none()),
                    "round {round}: a plain key survived sealing"
                );
            }
        }
        if let Ok(doc) = parse_policy(yaml) {
            let _ = compile_policy(
                &doc,
                &PolicyOptions {
                    env: &no_env,
                    include_simulated: false,
                    env_providers: false,
                    version: 1,
                    master_keys: Some(&keys),
                },
            );
        }
    }
}
