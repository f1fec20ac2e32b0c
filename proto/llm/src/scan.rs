//! Reading a few members of a JSON object without parsing the rest.
//!
//! Answers and stream chunks pass through as bytes; the gateway reads only
//! their `usage` and `choices`. serde_json skips an unwanted member token
//! by token, which cost more than the rest of a chat request's accounting;
//! this splits the object by walking strings with `memchr` and counting
//! brackets. Each value handed out is still parsed by serde_json where it is
//! read, so its own syntax is checked there. When the object cannot be split
//! (not an object, a key written with an escape, unbalanced brackets), the
//! functions say so and the caller parses the whole body as before.

/// Calls `visit` with each top-level member of the JSON object `body`: the
/// key as written between its quotes, and the value's raw bytes. Returns
/// false, having stopped, when `body` is not an object it could split. A key
/// that contains an escape counts as such, so no key is ever compared in its
/// escaped form.
pub fn for_each_member<'a>(body: &'a [u8], mut visit: impl FnMut(&'a [u8], &'a [u8])) -> bool {
    whole(body, |start| {
        walk_object(body, start, |key, at| {
            let end = value_end(body, at)?;
            visit(key, &body[at..end]);
            Some(end)
        })
    })
}

/// True when `walk`, given where the first non-blank byte of `b` is, reads
/// a value that only whitespace follows.
pub fn whole(b: &[u8], walk: impl FnOnce(usize) -> Option<usize>) -> bool {
    walk(skip_ws(b, 0)).is_some_and(|end| skip_ws(b, end) == b.len())
}

/// Walks the object that opens at `b[start]` in one pass: `member` gets each
/// key (as written between its quotes) and where its value starts, reads
/// the value however it likes (for a value of interest, walking into it;
/// otherwise [`value_end`]) and returns the index just past it. Returns the
/// index just past the closing brace; None when the object cannot be split
/// or `member` said None. A key that contains an escape stops the walk, so
/// no key is ever compared in its escaped form.
pub fn walk_object<'a>(
    b: &'a [u8],
    start: usize,
    mut member: impl FnMut(&'a [u8], usize) -> Option<usize>,
) -> Option<usize> {
    walk_items(b, start, b'{', b'}', |i| {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, i)?;
        let key = &b[i + 1..key_end - 1];
        if key.contains(&b'\\') {
            return None;
        }
        let colon = skip_ws(b, key_end);
        if b.get(colon) != Some(&b':') {
            return None;
        }
        member(key, skip_ws(b, colon + 1))
    })
}

/// Walks the array that opens at `b[start]`, as [`walk_object`] walks an
/// object: `element` gets where each element starts and returns the index
/// just past it.
pub fn walk_array(
    b: &[u8],
    start: usize,
    element: impl FnMut(usize) -> Option<usize>,
) -> Option<usize> {
    walk_items(b, start, b'[', b']', element)
}

/// The items of the container that opens with `open` at `b[start]` and
/// closes with `close`, each read by `item` from its first byte to just past
/// its end (None when it cannot be read). The index just past the container.
fn walk_items(
    b: &[u8],
    start: usize,
    open: u8,
    close: u8,
    mut item: impl FnMut(usize) -> Option<usize>,
) -> Option<usize> {
    if b.get(start) != Some(&open) {
        return None;
    }
    let mut i = skip_ws(b, start + 1);
    if b.get(i) == Some(&close) {
        return Some(i + 1);
    }
    loop {
        i = skip_ws(b, item(i)?);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(&c) if c == close => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The value of the top-level member `key` of the JSON object `body`, found
/// from the end: the last place `key` appears in quotes, confirmed by
/// reading on from there to the end of the object (its value, then only
/// whole members and the closing brace). For a member near the end of a
/// long object, such as OpenAI's `usage`, this reads only the tail. None
/// when the last appearance is not such a member (nested, inside a string,
/// after an escaped quote): then [`for_each_member`] finds it, if anything
/// does. Two such members: the last one, as a JSON parser keeps.
pub fn trailing_member<'a>(body: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let at = memchr::memmem::rfind(body, key.as_bytes())?;
    let quote = at.checked_sub(1)?;
    let after = at + key.len();
    if body[quote] != b'"' || body.get(after) != Some(&b'"') {
        return None;
    }
    // After an odd run of backslashes the quote is part of a longer key.
    let backslashes = body[..quote]
        .iter()
        .rev()
        .take_while(|&&c| c == b'\\')
        .count();
    if backslashes % 2 == 1 {
        return None;
    }
    let mut i = skip_ws(body, after + 1);
    if body.get(i) != Some(&b':') {
        return None;
    }
    i = skip_ws(body, i + 1);
    let end = value_end(body, i)?;
    let value = &body[i..end];
    let mut j = skip_ws(body, end);
    loop {
        match body.get(j)? {
            b'}' => return (skip_ws(body, j + 1) == body.len()).then_some(value),
            b',' => {
                j = skip_ws(body, j + 1);
                if body.get(j) != Some(&b'"') {
                    return None;
                }
                j = skip_ws(body, string_end(body, j)?);
                if body.get(j) != Some(&b':') {
                    return None;
                }
                j = skip_ws(body, value_end(body, skip_ws(body, j + 1))?);
            }
            _ => return None,
        }
    }
}

pub(crate) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// What a byte means to the skipping loops: one table load a byte, where
/// comparing against each structural byte in turn cost several.
const QUOTE: u8 = 1;
const ESCAPE: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const DELIMITER: u8 = 5;
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b'"' as usize] = QUOTE;
    t[b'\\' as usize] = ESCAPE;
    t[b'{' as usize] = OPEN;
    t[b'[' as usize] = OPEN;
    t[b'}' as usize] = CLOSE;
    t[b']' as usize] = CLOSE;
    t[b',' as usize] = DELIMITER;
    t[b' ' as usize] = DELIMITER;
    t[b'\t' as usize] = DELIMITER;
    t[b'\n' as usize] = DELIMITER;
    t[b'\r' as usize] = DELIMITER;
    t
};

/// The index just past the string whose opening quote is at `start`.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    // Only quotes are searched for: escapes such as `\n` or `\u00e9` do not
    // stop the search, and a quote ends the string unless an odd run of
    // backslashes comes before it (the run cannot reach past the opening
    // quote).
    let mut i = start + 1;
    loop {
        let quote = i + find_quote(b.get(i..)?)?;
        let backslashes = b[i..quote]
            .iter()
            .rev()
            .take_while(|&&c| c == b'\\')
            .count();
        if backslashes % 2 == 0 {
            return Some(quote + 1);
        }
        i = quote + 1;
    }
}

/// The first `"` in `h`. Most strings in these bodies are keys and short
/// values, for which memchr's set-up cost more than the search: their
/// first 32 bytes are read a word at a time, and memchr takes the rest.
fn find_quote(h: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_ne_bytes([b'"'; 8]);
    let short = h.len().min(32);
    let mut i = 0;
    while i + 8 <= short {
        let word = u64::from_le_bytes(h[i..i + 8].try_into().expect("eight bytes"));
        // A zero byte of `word ^ QUOTES` is a quote; the lowest flagged
        // byte is always a true one (only bytes above it can be misflagged).
        let x = word ^ QUOTES;
        let found = x.wrapping_sub(ONES) & !x & HIGHS;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    memchr::memchr(b'"', &h[i..]).map(|at| i + at)
}

/// The index just past the value that starts at `start`.
pub fn value_end(b: &[u8], start: usize) -> Option<usize> {
    match CLASS[*b.get(start)? as usize] {
        QUOTE => string_end(b, start),
        OPEN => {
            let mut depth = 0usize;
            let mut i = start;
            while let Some(&c) = b.get(i) {
                match CLASS[c as usize] {
                    QUOTE => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    OPEN => depth += 1,
                    CLOSE => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        // A number, `true`, `false` or `null`: up to the next delimiter.
        _ => {
            let mut i = start;
            while let Some(&c) = b.get(i) {
                if matches!(CLASS[c as usize], DELIMITER | CLOSE) {
                    break;
                }
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    fn members(body: &str) -> Option<Vec<(String, Value)>> {
        let mut raw = Vec::new();
        let ok = for_each_member(body.as_bytes(), |k, v| raw.push((k, v)));
        ok.then(|| {
            raw.into_iter()
                .map(|(k, v)| {
                    let key = String::from_utf8(k.to_vec()).unwrap();
                    (key, serde_json::from_slice(v).unwrap())
                })
                .collect()
        })
    }

    /// Every member the scanner hands out is the one serde_json reads, for
    /// nesting, strings full of brackets and quotes, and every scalar.
    #[test]
    fn members_agree_with_serde() {
        for body in [
            r#"{}"#,
            r#" { } "#,
            r#"{"a":1}"#,
            r#"{"id":"x","choices":[{"index":0,"delta":{"content":"} ] { [ \" \\"},"finish_reason":null}],"usage":null}"#,
            r#"{ "n" : -1.5e3 , "t":true,"f":false,"z":null,"s":"\u00e9\"","o":{"a":[1,[2,{"b":"]"}]]},"e":[] }"#,
            "{\n  \"usage\": {\"prompt_tokens\": 3},\n  \"x\": \"é\"\n}\n",
            // Strings longer than the plain loop's reach, escapes on both sides of it.
            r#"{"long":"0123456789012345678901234567890123456789 \" } ] \\","k":[{"t":"0123456789012345678901234567890123456789"}],"z":1}"#,
            r#"{"a":"0123456789012345678901234567890\"","b":"01234567890123456789012345678901\\"}"#,
        ] {
            let got = members(body).unwrap_or_else(|| panic!("not split: {body}"));
            let want: Map<String, Value> = serde_json::from_str(body).unwrap();
            assert_eq!(got.len(), want.len(), "{body}");
            for (k, v) in got {
                assert_eq!(want.get(&k), Some(&v), "{body}: {k}");
            }
        }
    }

    /// The word-at-a-time search finds the first quote wherever it falls
    /// against the word and memchr boundaries, with any bytes around it.
    #[test]
    fn quotes_are_found_at_every_position() {
        for len in 0..80 {
            for at in 0..=len {
                for filler in [b'a', 0xff, 0x00, b'"' ^ 0x80, 0x21, 0x23] {
                    let mut h = vec![filler; len];
                    if at < len {
                        h[at] = b'"';
                        if at + 1 < len {
                            h[at + 1] = b'"';
                        }
                    }
                    assert_eq!(
                        find_quote(&h),
                        memchr::memchr(b'"', &h),
                        "{len} {at} {filler}"
                    );
                }
            }
        }
    }

    #[test]
    fn what_it_cannot_split_is_refused() {
        for body in [
            "",
            "[]",
            "null",
            r#"{"a":1"#,
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":[1,2}"#,
            r#"{"a":}"#,
            r#"{"a":1} x"#,
            r#"{a:1}"#,
            // An escaped key would be compared in its escaped form.
            r#"{"usag\u0065":{"prompt_tokens":1}}"#,
            r#"{"a":"\"#,
            r#"{"a":"0123456789012345678901234567890123456789\"}"#,
        ] {
            assert!(members(body).is_none(), "split: {body:?}");
        }
    }

    /// Found from the end only where it is a top-level member; every other
    /// last appearance of the name is left to the forward split.
    #[test]
    fn trailing_members() {
        let found = |body: &str| trailing_member(body.as_bytes(), "usage").map(|v| v.to_vec());
        for (body, want) in [
            (
                r#"{"a":1,"usage":{"p":1},"b":"x","c":[1,{"d":2}]}"#,
                Some(r#"{"p":1}"#),
            ),
            ("{\n \"usage\" : null ,\n \"b\": 2\n}\n", Some("null")),
            (r#"{"usage":1,"usage":2}"#, Some("2")),
            (r#"{"x":"\\","usage":3}"#, Some("3")),
            // Nested, in a string, after an escaped quote, not a key, no end.
            (r#"{"usage":1,"b":{"usage":2}}"#, None),
            (r#"{"usage":1,"b":[{"usage":2}]}"#, None),
            (r#"{"usage":1,"b":"the usage"}"#, None),
            (r#"{"usage":1,"b":"\"usage\": 2"}"#, None),
            (r#"{"x\"usage":4}"#, None),
            (r#"{"b":["usage"]}"#, None),
            (r#"{"usage":1,"b":2"#, None),
            (r#"{"usage":1}}"#, None),
            (r#"{"a":1}"#, None),
        ] {
            assert_eq!(found(body), want.map(|w| w.as_bytes().to_vec()), "{body}");
        }
    }

    /// Each element of `array` as raw bytes, as a caller walks them; false
    /// when `array` is not an array that could be split.
    fn for_each_element<'a>(array: &'a [u8], mut visit: impl FnMut(&'a [u8])) -> bool {
        whole(array, |start| {
            walk_array(array, start, |at| {
                let end = value_end(array, at)?;
                visit(&array[at..end]);
                Some(end)
            })
        })
    }

    #[test]
    fn elements_agree_with_serde() {
        for array in [r#"[]"#, r#"[ 1 , "]" , {"a":[2]} , null ]"#, r#"[[],[[]]]"#] {
            let mut got = Vec::new();
            assert!(for_each_element(array.as_bytes(), |e| got
                .push(serde_json::from_slice::<Value>(e).unwrap())));
            let want: Vec<Value> = serde_json::from_str(array).unwrap();
            assert_eq!(got, want, "{array}");
        }
        for array in ["", "{}", "[1,", "[1 2]", "[1,]"] {
            assert!(!for_each_element(array.as_bytes(), |_| {}), "{array:?}");
        }
    }
}
