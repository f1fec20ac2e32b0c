//! Provider keys stored in the policy encrypted at rest (AES-256-GCM).
//!
//! The master key comes from `SWITCHYARD_MASTER_KEY` (64 hex characters) on
//! the control plane; it never enters the store. A blob is
//! `v1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`, where the key id (the
//! first 4 bytes of the master key's SHA-256) tells which master key sealed
//! it, so `ctl keys rotate` can re-seal blobs made under
//! `SWITCHYARD_MASTER_KEY_PREVIOUS`.

use std::fmt;

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use switchyard_proto::Secret;

pub const MASTER_KEY_ENV: &str = "SWITCHYARD_MASTER_KEY";
pub const PREVIOUS_MASTER_KEY_ENV: &str = "SWITCHYARD_MASTER_KEY_PREVIOUS";
const AAD: &[u8] = b"switchyard-secret-v1";
const MIN_DISTINCT_KEY_BYTES: usize = 12;

/// One AES-256-GCM key. `Debug` shows only its id.
pub struct MasterKey {
    key: LessSafeKey,
    id: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(id {})", self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("${0} must be 64 hex characters (32 bytes)")]
    InvalidMasterKey(&'static str),
    #[error("${0} is not a random key (too few distinct bytes); generate one with `openssl rand -hex 32`")]
    DegenerateMasterKey(&'static str),
    #[error("${MASTER_KEY_ENV} is not set on the control plane")]
    NoMasterKey,
    #[error("not a v1 encrypted secret")]
    Malformed,
    #[error("sealed with master key {0}, which is not configured")]
    UnknownKey(String),
    #[error("cannot decrypt (wrong master key or tampered data)")]
    Decrypt,
    #[error("no system randomness")]
    Random,
}

impl MasterKey {
    pub fn from_hex(text: &str, var: &'static str) -> Result<Self, SecretError> {
        let bytes = hex::decode(text.trim()).map_err(|_| SecretError::InvalidMasterKey(var))?;
        if bytes.len() != 32 {
            return Err(SecretError::InvalidMasterKey(var));
        }
        // 32 random bytes have about 30 distinct values; fewer than 12 means
        // a placeholder (all zeros, a repeated pattern), not a key.
        let distinct = bytes.iter().collect::<std::collections::HashSet<_>>().len();
        if distinct < MIN_DISTINCT_KEY_BYTES {
            return Err(SecretError::DegenerateMasterKey(var));
        }
        let id = hex::encode(&ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref()[..4]);
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| SecretError::InvalidMasterKey(var))?;
        Ok(MasterKey {
            key: LessSafeKey::new(key),
            id,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn seal(&self, plaintext: &str) -> Result<String, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretError::Random)?;
        let mut data = plaintext.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut data,
            )
            .map_err(|_| SecretError::Decrypt)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!(
            "v1:{}:{}",
            self.id,
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    fn open(&self, payload: &[u8]) -> Result<Secret, SecretError> {
        if payload.len() < NONCE_LEN {
            return Err(SecretError::Malformed);
        }
        let (nonce, rest) = payload.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Malformed)?;
        let mut data = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(AAD), &mut data)
            .map_err(|_| SecretError::Decrypt)?;
        let text = std::str::from_utf8(plain).map_err(|_| SecretError::Decrypt)?;
        Ok(Secret::new(text))
    }
}

/// The current master key and, during a rotation, the previous one.
#[derive(Debug, Default)]
pub struct MasterKeys {
    pub current: Option<MasterKey>,
    pub previous: Option<MasterKey>,
}

impl MasterKeys {
    /// Reads both variables; unset ones are `None`, malformed ones an error.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Self, SecretError> {
        let read = |var: &'static str| -> Result<Option<MasterKey>, SecretError> {
            match env(var).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => MasterKey::from_hex(&v, var).map(Some),
            }
        };
        Ok(MasterKeys {
            current: read(MASTER_KEY_ENV)?,
            previous: read(PREVIOUS_MASTER_KEY_ENV)?,
        })
    }

    pub fn seal(&self, plaintext: &str) -> Result<String, SecretError> {
        self.current
            .as_ref()
            .ok_or(SecretError::NoMasterKey)?
            .seal(plaintext)
    }

    pub fn open(&self, blob: &str) -> Result<Secret, SecretError> {
        let (id, payload) = parse_blob(blob)?;
        let key = [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)
            .ok_or_else(|| {
                if self.current.is_none() {
                    SecretError::NoMasterKey
                } else {
                    SecretError::UnknownKey(id.to_string())
                }
            })?;
        key.open(&payload)
    }

    /// True when `blob` was sealed by another key than the current one.
    pub fn needs_reseal(&self, blob: &str) -> bool {
        match (parse_blob(blob), &self.current) {
            (Ok((id, _)), Some(cur)) => id != cur.id,
            _ => false,
        }
    }
}

/// What [`seal_document`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sealed {
    /// The document to store, or `None` when it needed no change (then the
    /// operator's text, comments included, is stored as written).
    pub yaml: Option<String>,
    pub sealed: usize,
    pub resealed: usize,
}

/// Replaces every `value:` key of `providers.*.key_pools[*].keys[*]` by an
/// `encrypted:` blob under the current master key, and (with `reseal`)
/// re-seals blobs made under another key. Errors name the key's path.
///
/// The plaintext is taken from the typed document, not from the YAML value:
/// a key written as a number or with a tag (`value: 12345`, `value: !x k`)
/// is still a key, and the result is checked to hold no `value:` at all.
pub fn seal_document(
    yaml: &str,
    keys: &MasterKeys,
    reseal: bool,
) -> Result<Sealed, Vec<crate::PolicyError>> {
    use serde_norway::Value;
    crate::policy::check_document(yaml).map_err(|e| vec![e])?;
    // Syntax and type errors are reported by the strict parser with their path.
    let Ok(typed) = crate::parse_policy(yaml) else {
        return Ok(Sealed::default());
    };
    let Ok(mut doc) = serde_norway::from_str::<Value>(yaml) else {
        return Ok(Sealed::default());
    };
    let mut out = Sealed::default();
    let mut errors = Vec::new();
    if let Some(Value::Mapping(providers)) = doc.get_mut("providers") {
        for (pname, provider) in providers.iter_mut() {
            let pname = scalar_text(pname);
            let Some(Value::Sequence(pools)) = provider.get_mut("key_pools") else {
                continue;
            };
            for (i, pool) in pools.iter_mut().enumerate() {
                let Some(Value::Sequence(pool_keys)) = pool.get_mut("keys") else {
                    continue;
                };
                for (k, key) in pool_keys.iter_mut().enumerate() {
                    let Value::Mapping(m) = key else { continue };
                    let name = pname.as_deref().unwrap_or("?");
                    let path = format!("providers.{name}.key_pools[{i}].keys[{k}]");
                    if m.get("value").is_some_and(|v| !v.is_null()) {
                        let plain = pname
                            .as_ref()
                            .and_then(|p| typed.providers.get(p))
                            .and_then(|p| p.key_pools.get(i))
                            .and_then(|pool| pool.keys.get(k))
                            .and_then(|key| key.value.as_ref());
                        let Some(plain) = plain else {
                            errors.push(crate::PolicyError {
                                path: format!("{path}.value"),
                                message:
                                    "cannot store this key encrypted: write it as a quoted string"
                                        .into(),
                            });
                            continue;
                        };
                        match keys.seal(plain.expose()) {
                            Ok(blob) => {
                                m.remove("value");
                                m.insert("encrypted".into(), Value::String(blob));
                                out.sealed += 1;
                            }
                            Err(e) => errors.push(crate::PolicyError {
                                path: format!("{path}.value"),
                                message: format!("cannot store this key encrypted: {e}"),
                            }),
                        }
                    } else if let Some(Value::String(blob)) = m.get("encrypted") {
                        if !(reseal && keys.needs_reseal(blob)) {
                            continue;
                        }
                        match keys.open(blob).and_then(|s| keys.seal(s.expose())) {
                            Ok(new_blob) => {
                                m.insert("encrypted".into(), Value::String(new_blob));
                                out.resealed += 1;
                            }
                            Err(e) => errors.push(crate::PolicyError {
                                path: format!("{path}.encrypted"),
                                message: e.to_string(),
                            }),
                        }
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if out.sealed + out.resealed > 0 {
        let text = serde_norway::to_string(&doc).map_err(|e| {
            vec![crate::PolicyError {
                path: String::new(),
                message: format!("cannot re-serialise the policy: {e}"),
            }]
        })?;
        out.yaml = Some(format!(
            "# Keys given as `value:` were sealed by the control plane; comments are not kept.\n{text}"
        ));
    }
    // Whatever shape the document had, nothing plain may be stored.
    let stored = match &out.yaml {
        Some(text) => crate::parse_policy(text).map_err(|e| vec![e])?,
        None => typed,
    };
    let left: Vec<crate::PolicyError> = stored
        .providers
        .iter()
        .flat_map(|(p, prov)| {
            prov.key_pools
                .iter()
                .enumerate()
                .flat_map(move |(i, pool)| {
                    pool.keys
                        .iter()
                        .enumerate()
                        .filter(|(_, key)| key.value.is_some())
                        .map(move |(k, _)| crate::PolicyError {
                            path: format!("providers.{p}.key_pools[{i}].keys[{k}].value"),
                            message: "this key could not be sealed; write it as a quoted string"
                                .into(),
                        })
                })
        })
        .collect();
    if !left.is_empty() {
        return Err(left);
    }
    Ok(out)
}

/// A mapping key as the typed parser reads it (`123:` is the name "123").
fn scalar_text(v: &serde_norway::Value) -> Option<String> {
    use serde_norway::Value;
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn parse_blob(blob: &str) -> Result<(&str, Vec<u8>), SecretError> {
    let rest = blob
        .trim()
        .strip_prefix("v1:")
        .ok_or(SecretError::Malformed)?;
    let (id, b64) = rest.split_once(':').ok_or(SecretError::Malformed)?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| SecretError::Malformed)?;
    Ok((id, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    #[test]
    fn seal_open_and_rotate() {
        let old = MasterKeys {
            current: Some(MasterKey::from_hex(K1, MASTER_KEY_ENV).unwrap()),
            previous: None,
        };
        let blob = old.seal("sk-live-1").unwrap();
        assert!(!blob.contains("sk-live"));
        assert_eq!(old.open(&blob).unwrap().expose(), "sk-live-1");
        assert!(!old.needs_reseal(&blob));

        let rotated = MasterKeys {
            current: Some(MasterKey::from_hex(K2, MASTER_KEY_ENV).unwrap()),
            previous: Some(MasterKey::from_hex(K1, PREVIOUS_MASTER_KEY_ENV).unwrap()),
        };
        assert!(rotated.needs_reseal(&blob));
        assert_eq!(rotated.open(&blob).unwrap().expose(), "sk-live-1");
        let only_new = MasterKeys {
            current: Some(MasterKey::from_hex(K2, MASTER_KEY_ENV).unwrap()),
            previous: None,
        };
        assert!(matches!(
            only_new.open(&blob),
            Err(SecretError::UnknownKey(_))
        ));
        let mut tampered = blob.clone();
        tampered.pop();
        tampered.push(if blob.ends_with('A') { 'B' } else { 'A' });
        assert!(old.open(&tampered).is_err());
        assert!(format!("{:?}", old).contains("id"));
        assert!(MasterKey::from_hex("abcd", MASTER_KEY_ENV).is_err());
    }

    #[test]
    fn documents_are_sealed_and_resealed() {
        let k1 = MasterKeys {
            current: Some(MasterKey::from_hex(K1, MASTER_KEY_ENV).unwrap()),
            previous: None,
        };
        let yaml = "providers:\n  p:\n    kind: openai\n    key_pools:\n      - keys:\n          - value: sk-plain-1\n          - env: X\n";
        let sealed = seal_document(yaml, &k1, false).unwrap();
        assert_eq!(sealed.sealed, 1);
        let text = sealed.yaml.unwrap();
        assert!(!text.contains("sk-plain-1") && text.contains("encrypted: v1:"));
        assert_eq!(seal_document(&text, &k1, true).unwrap(), Sealed::default());

        let none = MasterKeys::default();
        let e = seal_document(yaml, &none, false).unwrap_err();
        assert_eq!(e[0].path, "providers.p.key_pools[0].keys[0].value");
        assert!(!e[0].to_string().contains("sk-plain"));

        let k2 = MasterKeys {
            current: Some(MasterKey::from_hex(K2, MASTER_KEY_ENV).unwrap()),
            previous: Some(MasterKey::from_hex(K1, PREVIOUS_MASTER_KEY_ENV).unwrap()),
        };
        let rotated = seal_document(&text, &k2, true).unwrap();
        assert_eq!(rotated.resealed, 1);
        let doc = crate::parse_policy(rotated.yaml.as_deref().unwrap()).unwrap();
        let blob = doc.providers["p"].key_pools[0].keys[0]
            .encrypted
            .clone()
            .unwrap();
        assert_eq!(k2.open(&blob).unwrap().expose(), "sk-plain-1");
    }

    #[test]
    fn keys_that_are_not_plain_strings_are_sealed_too() {
        let k1 = MasterKeys {
            current: Some(MasterKey::from_hex(K1, MASTER_KEY_ENV).unwrap()),
            previous: None,
        };
        for value in [
            "12345678901234",
            "!!str 98765432109876",
            "!custom sk-tagged-555",
        ] {
            let yaml = format!(
                "providers:\n  p:\n    kind: openai\n    key_pools:\n      - keys:\n          - value: {value}\n"
            );
            match seal_document(&yaml, &k1, false) {
                Ok(sealed) => {
                    let text = sealed.yaml.expect("sealed");
                    let digits = value.rsplit(' ').next().unwrap();
                    assert!(!text.contains(digits), "{value} left in {text}");
                    assert!(text.contains("encrypted: v1:"));
                }
                // Refusing is fine too: what matters is that nothing plain is stored.
                Err(e) => assert!(e[0].path.ends_with(".value"), "{e:?}"),
            }
        }
    }

    #[test]
    fn degenerate_master_keys_are_refused() {
        for bad in [
            "00".repeat(32),
            "5a".repeat(32),
            "0001".repeat(16),
            "deadbeef".repeat(8),
        ] {
            assert_eq!(
                MasterKey::from_hex(&bad, MASTER_KEY_ENV).unwrap_err(),
                SecretError::DegenerateMasterKey(MASTER_KEY_ENV),
                "{bad}"
            );
        }
        assert!(MasterKey::from_hex(K1, MASTER_KEY_ENV).is_ok());
    }
}
