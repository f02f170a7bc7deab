//! Canonical JSON: the exact bytes every signature covers (PROTOCOL.md §3.3).
//!
//! - objects: keys sorted by their UTF-8 bytes, recursively;
//! - separators `,` and `:` without whitespace;
//! - strings: UTF-8 as-is, escaping only `"`, `\` and control characters;
//! - numbers: integers only — anything else is refused, so a signature never depends on how a
//!   float happens to print.
//!
//! [`canonical_ascii`] is the verification fallback: the same form with every non-ASCII
//! character written as `\uXXXX` — what Python's default `json.dumps(sort_keys=True,
//! separators=(",", ":"))` produces. We never emit it.

use serde_json::{Map, Value};
use std::fmt::Write;

/// Why a value has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotCanonical;

impl std::fmt::Display for NotCanonical {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("payload contains a non-integer number")
    }
}

impl std::error::Error for NotCanonical {}

/// The canonical form of `value` (the form we sign and emit).
pub fn canonical(value: &Value) -> Result<String, NotCanonical> {
    let mut out = String::with_capacity(256);
    write_value(value, false, &mut out)?;
    Ok(out)
}

/// The ASCII-escaped variant, for verifying signatures made by Python-style peers.
pub fn canonical_ascii(value: &Value) -> Result<String, NotCanonical> {
    let mut out = String::with_capacity(256);
    write_value(value, true, &mut out)?;
    Ok(out)
}

/// The canonical form of a JSON object, without copying it into a [`Value`] first.
pub fn canonical_object(map: &Map<String, Value>) -> Result<String, NotCanonical> {
    let mut out = String::with_capacity(256);
    write_object(map, false, &mut out)?;
    Ok(out)
}

/// The ASCII-escaped variant of [`canonical_object`].
pub fn canonical_object_ascii(map: &Map<String, Value>) -> Result<String, NotCanonical> {
    let mut out = String::with_capacity(256);
    write_object(map, true, &mut out)?;
    Ok(out)
}

/// Whether every number in `value` is an integer, so that it has a canonical form (§3.3).
pub fn integers_only(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::Array(items) => items.iter().all(integers_only),
        Value::Object(map) => map.values().all(integers_only),
        _ => true,
    }
}

/// Writes `s` as a canonical JSON string literal (quotes included).
pub fn write_string(s: &str, out: &mut String) {
    write_str(s, false, out);
}

fn write_value(value: &Value, ascii: bool, out: &mut String) -> Result<(), NotCanonical> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                write!(out, "{i}").expect("writing to a String cannot fail");
            } else if let Some(u) = n.as_u64() {
                write!(out, "{u}").expect("writing to a String cannot fail");
            } else {
                return Err(NotCanonical);
            }
        }
        Value::String(s) => write_str(s, ascii, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, ascii, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => write_object(map, ascii, out)?,
    }
    Ok(())
}

/// Appends the canonical form of a JSON object to `out`.
pub fn write_canonical_object(
    map: &Map<String, Value>,
    out: &mut String,
) -> Result<(), NotCanonical> {
    write_object(map, false, out)
}

fn write_object(
    map: &Map<String, Value>,
    ascii: bool,
    out: &mut String,
) -> Result<(), NotCanonical> {
    // serde_json's default Map is a BTreeMap<String, _>: iteration is already ordered by
    // `str`'s `Ord`, which is byte order of the UTF-8 encoding — what §3.3 asks for.
    out.push('{');
    for (i, (key, item)) in map.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(key, ascii, out);
        out.push(':');
        write_value(item, ascii, out)?;
    }
    out.push('}');
    Ok(())
}

fn write_str(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    let mut rest = s;
    loop {
        // Most text needs no escape at all: copy it in runs, not a char at a time.
        let plain = rest
            .bytes()
            .position(|b| b == b'"' || b == b'\\' || b < 0x20 || (ascii && b >= 0x7f))
            .unwrap_or(rest.len());
        out.push_str(&rest[..plain]);
        rest = &rest[plain..];
        // `plain` stopped at an ASCII byte or at the first byte of a character: a boundary.
        let Some(c) = rest.chars().next() else {
            break;
        };
        rest = &rest[c.len_utf8()..];
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                write!(out, "\\u{:04x}", c as u32).expect("writing to a String cannot fail")
            }
            // Python's ensure_ascii escapes everything outside printable ASCII, DEL included.
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(out, "\\u{unit:04x}").expect("writing to a String cannot fail");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_recursively_without_whitespace() {
        let v = json!({"b": 1, "a": {"z": [1, {"y": 2, "x": 3}], "c": true}, "A": null});
        assert_eq!(
            canonical(&v).unwrap(),
            r#"{"A":null,"a":{"c":true,"z":[1,{"x":3,"y":2}]},"b":1}"#
        );
    }

    #[test]
    fn sorts_by_utf8_bytes() {
        // 'é' (C3 A9) sorts after 'z' (7A); '\u{10000}' (F0 ...) after '\u{ffff}' (EF ...).
        let v = json!({"é": 1, "z": 2, "\u{10000}": 3, "\u{ffff}": 4});
        assert_eq!(
            canonical(&v).unwrap(),
            "{\"z\":2,\"é\":1,\"\u{ffff}\":4,\"\u{10000}\":3}"
        );
    }

    #[test]
    fn escapes_only_quote_backslash_and_controls() {
        let v = json!({"s": "a\"b\\c/d\u{8}\u{c}\n\r\t\u{1}\u{1f}\u{7f}é"});
        assert_eq!(
            canonical(&v).unwrap(),
            "{\"s\":\"a\\\"b\\\\c/d\\b\\f\\n\\r\\t\\u0001\\u001f\u{7f}é\"}"
        );
    }

    #[test]
    fn ascii_variant_matches_python_json_dumps() {
        // python3 -c 'import json; print(json.dumps({"k":"é😀\x7f/","é":1},
        //             sort_keys=True, separators=(",",":")))'
        let v = json!({"k": "é😀\u{7f}/", "é": 1});
        assert_eq!(
            canonical_ascii(&v).unwrap(),
            r#"{"k":"\u00e9\ud83d\ude00\u007f/","\u00e9":1}"#
        );
        assert_eq!(canonical(&v).unwrap(), "{\"k\":\"é😀\u{7f}/\",\"é\":1}");
    }

    #[test]
    fn escapes_at_the_edges_and_empty_strings() {
        let v = json!({"": "", "e": "\"x\n", "f": "\u{1}", "g": "😀"});
        assert_eq!(
            canonical(&v).unwrap(),
            "{\"\":\"\",\"e\":\"\\\"x\\n\",\"f\":\"\\u0001\",\"g\":\"😀\"}"
        );
        assert_eq!(
            canonical_ascii(&v).unwrap(),
            r#"{"":"","e":"\"x\n","f":"\u0001","g":"\ud83d\ude00"}"#
        );
    }

    #[test]
    fn integers_only() {
        assert_eq!(
            canonical(&json!({"n": -5, "m": u64::MAX})).unwrap(),
            r#"{"m":18446744073709551615,"n":-5}"#
        );
        assert_eq!(canonical(&json!({"n": 1.5})), Err(NotCanonical));
        assert_eq!(canonical(&json!([[1.0]])), Err(NotCanonical));
    }
}
