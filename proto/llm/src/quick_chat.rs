//! A chat-completions body read in one pass without building it.
//!
//! The same-protocol path forwards the caller's bytes, so the gateway needs
//! only what it checks and decides on: `model`, `stream`,
//! `stream_options.include_usage`, that every message has a string `role`,
//! and the prompt-size estimate (`Operation::estimated_prompt_tokens`: the
//! text in `messages` and `tools`, a flat count per image). Building the
//! `Value` tree for that cost about half of a long request's instructions,
//! at the edge and again at the egress. serde_json still checks the whole
//! body's syntax here; strings are borrowed from it unless they hold escapes.
//!
//! Only the plain shape is read. Anything else (a missing or mistyped
//! field, an escaped or repeated key at the top level or in a message, more
//! keys than [`MAX_KEYS`]) is refused, and the caller parses the tree, which
//! gives the exact error or the exact reading. One reading differs: a key
//! repeated deeper inside a message (in a content part, say) has each of
//! its values counted in the estimate, where the tree keeps the last. The
//! estimate is rough by design, and the edge and the egress, which both
//! read the same bytes this way, still agree.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

/// What a chat body says, read on the quick path.
pub(crate) struct QuickChat {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// `Operation::estimated_prompt_tokens` of the body.
    pub prompt_estimate: u64,
}

/// Keys an object may have for its repeats to be checked by comparing each
/// with the ones before; a larger object takes the tree.
const MAX_KEYS: usize = 64;

/// Keys whose value counts as one image rather than as text.
const IMAGE_KEYS: [&str; 4] = ["image_url", "source", "inline_data", "inlineData"];

pub(crate) fn read(body: &[u8]) -> Option<QuickChat> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let chat = de.deserialize_map(Top).ok()?;
    de.end().ok()?;
    Some(chat)
}

fn refuse<E: de::Error>() -> E {
    E::custom("not the plain shape")
}

/// Text and images seen, for the estimate.
#[derive(Default)]
struct Tally {
    chars: u64,
    images: u64,
}

struct Top;

impl<'de> Visitor<'de> for Top {
    type Value = QuickChat;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a chat-completions body")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<QuickChat, A::Error> {
        let mut keys: Vec<&'de str> = Vec::new();
        let (mut model, mut stream, mut include_usage) = (None, false, false);
        let (mut tally, mut messages, mut have_messages) = (Tally::default(), 0u64, false);
        while let Some(key) = map.next_key::<&'de str>()? {
            if keys.len() == MAX_KEYS || keys.contains(&key) {
                return Err(refuse());
            }
            keys.push(key);
            match key {
                "model" => {
                    let m = map.next_value::<&'de str>()?;
                    if m.is_empty() {
                        return Err(refuse());
                    }
                    model = Some(m.to_owned());
                }
                "messages" => {
                    let n = map.next_value_seed(Messages(&mut tally))?;
                    if n == 0 {
                        return Err(refuse());
                    }
                    messages += n;
                    have_messages = true;
                }
                "tools" => messages += map.next_value_seed(Walk(&mut tally))?,
                "stream" => stream = map.next_value::<Option<bool>>()?.unwrap_or(false),
                "stream_options" => {
                    // Small, and read as the tree reads it.
                    let options = map.next_value::<Value>()?;
                    include_usage = options
                        .get("include_usage")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match (model, have_messages) {
            (Some(model), true) => Ok(QuickChat {
                model,
                stream,
                include_usage,
                prompt_estimate: tally.chars.div_ceil(4) + 4 * messages + 1000 * tally.images,
            }),
            _ => Err(refuse()),
        }
    }
}

/// `messages`: an array of objects, each with a string `role`; returns how
/// many.
struct Messages<'t>(&'t mut Tally);

impl<'de> DeserializeSeed<'de> for Messages<'_> {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<u64, D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Messages<'_> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut n = 0;
        while seq.next_element_seed(Message(&mut *self.0))?.is_some() {
            n += 1;
        }
        Ok(n)
    }
}

struct Message<'t>(&'t mut Tally);

impl<'de> DeserializeSeed<'de> for Message<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys: Vec<&'de str> = Vec::new();
        let mut has_role = false;
        while let Some(key) = map.next_key::<&'de str>()? {
            if keys.len() == MAX_KEYS || keys.contains(&key) {
                return Err(refuse());
            }
            keys.push(key);
            if key == "role" {
                let role = map.next_value::<&'de str>()?;
                self.0.chars += role.len() as u64;
                has_role = true;
            } else {
                entry(&mut map, key, self.0)?;
            }
        }
        if has_role {
            Ok(())
        } else {
            Err(refuse())
        }
    }
}

/// One member's value: an image key counts as an image, anything else is
/// walked for its text.
fn entry<'de, A: MapAccess<'de>>(
    map: &mut A,
    key: &str,
    tally: &mut Tally,
) -> Result<(), A::Error> {
    if IMAGE_KEYS.contains(&key) {
        tally.images += 1;
        map.next_value::<IgnoredAny>()?;
        Ok(())
    } else {
        map.next_value_seed(Walk(tally)).map(|_| ())
    }
}

/// A key inside the walked values: whether it is an image key, decoded
/// without allocating (an escaped key is compared as serde decodes it).
struct ImageKey;

impl<'de> DeserializeSeed<'de> for ImageKey {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<bool, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for ImageKey {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(IMAGE_KEYS.contains(&v))
    }
}

/// Any value, adding the length of every string in it (keys aside) and
/// one image per image key. Returns what the value counts as in messages
/// when it is a top-level field: its length if an array, else 1 (as the
/// tree counts).
struct Walk<'t>(&'t mut Tally);

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<u64, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut n = 0;
        while seq.next_element_seed(Walk(&mut *self.0))?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        while let Some(image) = map.next_key_seed(ImageKey)? {
            if image {
                self.0.images += 1;
                map.next_value::<IgnoredAny>()?;
            } else {
                map.next_value_seed(Walk(&mut *self.0))?;
            }
        }
        Ok(1)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        self.0.chars += v.len() as u64;
        Ok(1)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        Ok(1)
    }
}
