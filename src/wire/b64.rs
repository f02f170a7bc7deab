//! Base64 as the wire uses it (PROTOCOL.md §3.2).
//!
//! We always *emit* base64url without padding. We *accept* base64url or standard base64, with
//! or without `=` padding, because deployed peers send all four.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// Lenient decoder: URL-safe alphabet, padding optional. Standard-alphabet input is mapped onto
/// it first (`+` → `-`, `/` → `_`), so one engine covers every accepted variant.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Encodes `bytes` as base64url without padding: the only form we emit.
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes any accepted base64 variant. Returns `None` for anything that is not base64.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    if text.bytes().any(|b| b == b'+' || b == b'/') {
        let mapped: String = text
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        LENIENT.decode(mapped).ok()
    } else {
        LENIENT.decode(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_url_safe_without_padding() {
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(encode(b"a"), "YQ");
    }

    #[test]
    fn accepts_every_variant() {
        let bytes = [0xfbu8, 0xff, 0x00, 0x10];
        for text in ["-_8AEA", "-_8AEA==", "+/8AEA", "+/8AEA=="] {
            assert_eq!(decode(text).as_deref(), Some(&bytes[..]), "{text}");
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode("not base64!"), None);
        assert_eq!(decode("a"), None);
    }
}
