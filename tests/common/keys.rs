//! Fixed TEST-ONLY RSA-4096 keys from `tests/fixtures/keys` (see tests/fixtures/README.md).

use socp::crypto::PrivateKey;

/// Loads `tests/fixtures/keys/<name>.pem`, e.g. `test_key("user1")` or `test_key("server2")`.
///
/// Panics if the fixture is missing or invalid: a broken fixture is a broken test setup.
pub fn test_key(name: &str) -> PrivateKey {
    let path = format!(
        "{}/tests/fixtures/keys/{name}.pem",
        env!("CARGO_MANIFEST_DIR")
    );
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    PrivateKey::from_pem(&pem).unwrap_or_else(|e| panic!("parsing {path}: {e}"))
}
