//! Identifiers and display names (PROTOCOL.md §2).

/// Whether `id` is an acceptable server, user or file id: a UUID, or 1–64 characters of
/// `[A-Za-z0-9._-]` (deployed servers use ids like `srv-a` and `alice`). A UUID's characters
/// are a subset of that alphabet, so one check covers both.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(is_id_byte)
}

/// Whether `name` is an acceptable `meta.display_name`: 1–32 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_display_name(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.bytes().all(is_id_byte)
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// A fresh UUID v4, lowercase and hyphenated: the only id form we create.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("the system random source does not fail");
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = |range: std::ops::Range<usize>| -> String {
        b[range].iter().map(|x| format!("{x:02x}")).collect()
    };
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_short_ids() {
        assert!(is_valid_id("3f1c2a4e-8d9b-4c1e-9f2a-0b1c2d3e4f50"));
        assert!(is_valid_id("srv-a"));
        assert!(is_valid_id("alice.b_c"));
        assert!(is_valid_id(&"a".repeat(64)));
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in ["", "has space", "a/b", "é", "x\n", "*", "public:1"] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
        assert!(!is_valid_id(&"a".repeat(65)));
    }

    #[test]
    fn display_names_are_at_most_32() {
        assert!(is_valid_display_name("alice"));
        assert!(!is_valid_display_name(&"a".repeat(33)));
        assert!(!is_valid_display_name(""));
    }

    #[test]
    fn uuids_are_v4_lowercase_hyphenated_and_distinct() {
        let a = new_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!("89ab".contains(&a[19..20]));
        assert!(
            a.chars()
                .all(|c| c == '-' || c.is_ascii_digit() || c.is_ascii_lowercase())
        );
        assert!(is_valid_id(&a));
        assert_ne!(a, new_uuid());
    }
}
