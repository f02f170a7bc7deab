//! Accounts (PROTOCOL.md §5.3): what a password becomes on the client, and what the server keeps.
//!
//! The password never leaves the client. The client sends `auth`, a PBKDF2 hash salted with the
//! display name, and `privkey_store`, its private key sealed with AES-256-GCM under a second
//! PBKDF2 key (random salt) that only the password opens. The server keeps `pake_password`, a
//! salted SHA-256 of `auth`, so a stolen database holds nothing that opens a private key or logs
//! in.

use crate::crypto::{self, PrivateKey};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::pbkdf2;
use serde_json::{Value, json};
use std::num::NonZeroU32;

/// PBKDF2 rounds for both derivations (§5.3).
pub const ROUNDS: u32 = 600_000;

/// Why an account secret could not be opened or checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountError {
    /// The sealed key is not in the §5.3 format.
    Malformed(&'static str),
    /// Decryption failed: the password is wrong (or the store was tampered with).
    WrongPassword,
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::Malformed(what) => write!(f, "malformed privkey_store: {what}"),
            AccountError::WrongPassword => f.write_str("wrong password"),
        }
    }
}

impl std::error::Error for AccountError {}

fn pbkdf2_sha256(password: &str, salt: &[u8], rounds: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    let rounds = NonZeroU32::new(rounds.max(1)).expect("at least 1");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        salt,
        password.as_bytes(),
        &mut out,
    );
    out
}

/// `auth` = PBKDF2-HMAC-SHA256(password, "socp-auth:" ‖ display_name, 600 000, 32 bytes), as
/// base64url.
pub fn auth_token(password: &str, display_name: &str) -> String {
    let salt = format!("socp-auth:{display_name}");
    crate::wire::b64::encode(&pbkdf2_sha256(password, salt.as_bytes(), ROUNDS))
}

/// Seals `key` under `password`: base64url of `{v:1, kdf:"pbkdf2-sha256", rounds, salt, nonce,
/// ct}` with `ct` = AES-256-GCM of the PKCS#8 DER key.
pub fn seal_private_key(key: &PrivateKey, password: &str) -> String {
    seal_with_rounds(key, password, ROUNDS)
}

fn seal_with_rounds(key: &PrivateKey, password: &str, rounds: u32) -> String {
    let salt = crypto::random_bytes::<16>();
    let nonce = crypto::random_bytes::<12>();
    let aes = aes_key(&pbkdf2_sha256(password, &salt, rounds));
    let mut ct = key.to_pkcs8_der();
    aes.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut ct)
        .expect("AES-GCM sealing a key-sized buffer does not fail");
    let b = crate::wire::b64::encode;
    let doc = json!({"v": 1, "kdf": "pbkdf2-sha256", "rounds": rounds, "salt": b(&salt),
                     "nonce": b(&nonce), "ct": b(&ct)});
    b(doc.to_string().as_bytes())
}

/// Opens a `privkey_store` with `password`.
pub fn open_private_key(store: &str, password: &str) -> Result<PrivateKey, AccountError> {
    let json = crate::wire::b64::decode(store).ok_or(AccountError::Malformed("not base64"))?;
    let doc: Value =
        serde_json::from_slice(&json).map_err(|_| AccountError::Malformed("not JSON"))?;
    if doc.get("v").and_then(Value::as_i64) != Some(1)
        || doc.get("kdf").and_then(Value::as_str) != Some("pbkdf2-sha256")
    {
        return Err(AccountError::Malformed("unknown version or kdf"));
    }
    let rounds = doc
        .get("rounds")
        .and_then(Value::as_u64)
        .filter(|r| (1..=10_000_000).contains(r))
        .ok_or(AccountError::Malformed("rounds"))? as u32;
    let field = |name: &'static str| {
        doc.get(name)
            .and_then(Value::as_str)
            .and_then(crate::wire::b64::decode)
            .ok_or(AccountError::Malformed(name))
    };
    let (salt, nonce, mut ct) = (field("salt")?, field("nonce")?, field("ct")?);
    let nonce =
        Nonce::try_assume_unique_for_key(&nonce).map_err(|_| AccountError::Malformed("nonce"))?;
    let aes = aes_key(&pbkdf2_sha256(password, &salt, rounds));
    let der = aes
        .open_in_place(nonce, Aad::empty(), &mut ct)
        .map_err(|_| AccountError::WrongPassword)?;
    PrivateKey::from_pkcs8_der(der).map_err(|_| AccountError::Malformed("sealed key"))
}

fn aes_key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte AES-256 key"))
}

/// What the server stores for `auth` (§5.3 `pake_password`): `v1$<salt>$<SHA-256(salt ‖ auth)>`
/// with a fresh 16-byte salt per user.
pub fn password_verifier(auth: &[u8]) -> String {
    password_verifier_with_salt(&crypto::random_bytes::<16>(), auth)
}

/// [`password_verifier`] with the caller's `salt`, which must be fresh random bytes (the core
/// draws it from the random source it was given).
pub fn password_verifier_with_salt(salt: &[u8; 16], auth: &[u8]) -> String {
    format!(
        "v1${}${}",
        crate::wire::b64::encode(salt),
        crate::wire::b64::encode(&salted_hash(salt, auth))
    )
}

fn salted_hash(salt: &[u8], auth: &[u8]) -> [u8; 32] {
    let mut buf = Vec::with_capacity(salt.len() + auth.len());
    buf.extend_from_slice(salt);
    buf.extend_from_slice(auth);
    crypto::sha256(&buf)
}

/// A verifier that matches nothing, checked when the name is unknown so that an unknown name
/// costs the same work as a wrong password (§5.3).
pub const DUMMY_VERIFIER: &str =
    "v1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// Checks `auth` against a stored verifier, comparing in constant time.
pub fn check_password(verifier: &str, auth: &[u8]) -> bool {
    let mut parts = verifier.split('$');
    let (Some("v1"), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Some(salt), Some(hash)) = (
        crate::wire::b64::decode(salt),
        crate::wire::b64::decode(hash),
    ) else {
        return false;
    };
    crypto::constant_time_eq(&salted_hash(&salt, auth), &hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PrivateKey {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/user1.pem");
        PrivateKey::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn auth_is_salted_with_the_display_name() {
        let a = auth_token("pw", "alice");
        assert_eq!(crate::wire::b64::decode(&a).unwrap().len(), 32);
        assert_eq!(a, auth_token("pw", "alice"));
        assert_ne!(a, auth_token("pw", "bob"));
        assert_ne!(a, auth_token("pw2", "alice"));
    }

    #[test]
    fn sealed_key_opens_only_with_the_password() {
        let k = key();
        let store = seal_with_rounds(&k, "correct horse", 1000);
        let opened = open_private_key(&store, "correct horse").unwrap();
        assert_eq!(opened.public_key(), k.public_key());
        assert_eq!(
            open_private_key(&store, "wrong").unwrap_err(),
            AccountError::WrongPassword
        );
        // The store is the §5.3 document.
        let doc: Value =
            serde_json::from_slice(&crate::wire::b64::decode(&store).unwrap()).unwrap();
        assert_eq!(doc["v"], 1);
        assert_eq!(doc["kdf"], "pbkdf2-sha256");
        assert_eq!(doc["rounds"], 1000);
        assert!(open_private_key("bm90IGpzb24", "x").is_err());
    }

    #[test]
    fn the_real_round_count_is_600k() {
        let store = seal_private_key(&key(), "pw");
        let doc: Value =
            serde_json::from_slice(&crate::wire::b64::decode(&store).unwrap()).unwrap();
        assert_eq!(doc["rounds"], 600_000);
    }

    #[test]
    fn verifier_checks_auth_and_is_salted_per_user() {
        let auth = b"0123456789abcdef0123456789abcdef";
        let v1 = password_verifier(auth);
        let v2 = password_verifier(auth);
        assert_ne!(v1, v2, "fresh salt per user");
        assert!(check_password(&v1, auth));
        assert!(!check_password(&v1, b"0123456789abcdef0123456789abcdeX"));
        assert!(!check_password(DUMMY_VERIFIER, auth));
        assert!(!check_password("garbage", auth));
    }
}
