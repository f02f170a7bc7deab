//! RSA-4096 cryptography (PROTOCOL.md §3): keys, RSASSA-PSS signatures, RSA-OAEP encryption,
//! `content_sig` (§3.5), SHA-256, randomness and constant-time comparison.
//!
//! Everything runs on `aws-lc-rs` (§3.6), including the salt-478 PSS verification fallback
//! (`RsaPssSaltLength::Max`), so no other RSA implementation is involved.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{
    self, KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey, PublicEncryptingKey,
};
use aws_lc_rs::signature::{
    KeyPair as _, ParsedPublicKey, RSA_PSS_2048_8192_SHA256, RSA_PSS_SHA256, RsaParameters,
    RsaPssSaltLength,
};
use base64::Engine;

use crate::wire::b64;

/// Most plaintext bytes one RSA-OAEP block carries (§3.1): 512 − 2·32 − 2.
pub const MAX_PLAINTEXT: usize = 446;

/// Modulus size in bytes, hence the size of every ciphertext and signature (§3.1).
const MODULUS_BYTES: usize = 512;

/// Longest key text we try to parse. A 4096-bit key in any accepted form is under 1 KiB.
const MAX_KEY_TEXT: usize = 16 * 1024;

/// PSS verification with the maximum salt length, 478 bytes for RSA-4096 (§3.1 fallback).
static PSS_SALT_MAX: RsaParameters =
    RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);

/// Why a key or a cryptographic operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// Input that is not what it claims to be: bad base64, PEM or DER, or a wrong length.
    Malformed(&'static str),
    /// A well-formed RSA key that §3.1 forbids: any size but 4096 bits, any exponent but 65537.
    WeakKey(String),
    /// The operation itself failed, e.g. OAEP decryption of a ciphertext made for another key.
    Crypto(&'static str),
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptoError::Malformed(what) => write!(f, "malformed: {what}"),
            CryptoError::WeakKey(what) => write!(f, "key not allowed: {what}"),
            CryptoError::Crypto(what) => write!(f, "crypto failure: {what}"),
        }
    }
}

impl std::error::Error for CryptoError {}

/// Our RSA-4096 keypair (§3.1): PSS signing, OAEP decryption, and its public half.
pub struct PrivateKey {
    signing: rsa::KeyPair,
    decrypting: OaepPrivateDecryptingKey,
    public: Arc<PublicKey>,
}

impl PrivateKey {
    /// Generates a fresh RSA-4096 key with exponent 65537 (§3.1). Takes about half a second.
    pub fn generate() -> Result<PrivateKey, CryptoError> {
        let pair = rsa::KeyPair::generate(KeySize::Rsa4096)
            .map_err(|_| CryptoError::Crypto("RSA key generation failed"))?;
        let der = pair
            .as_der()
            .map_err(|_| CryptoError::Crypto("cannot encode generated key"))?;
        PrivateKey::from_pkcs8_der(der.as_ref())
    }

    /// Loads an unencrypted PKCS#8 DER RSA private key; it must be 4096 bits with e = 65537 (§3.1).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<PrivateKey, CryptoError> {
        let signing = rsa::KeyPair::from_pkcs8(der)
            .map_err(|_| CryptoError::Malformed("not an RSA PKCS#8 private key"))?;
        let public = Arc::new(PublicKey::from_der(signing.public_key().as_ref())?);
        let decrypting = PrivateDecryptingKey::from_pkcs8(der)
            .map_err(|_| CryptoError::Malformed("not an RSA PKCS#8 private key"))?;
        let decrypting = OaepPrivateDecryptingKey::new(decrypting)
            .map_err(|_| CryptoError::Crypto("cannot set up OAEP decryption"))?;
        Ok(PrivateKey {
            signing,
            decrypting,
            public,
        })
    }

    /// Loads a `-----BEGIN PRIVATE KEY-----` (unencrypted PKCS#8) PEM private key.
    pub fn from_pem(text: &str) -> Result<PrivateKey, CryptoError> {
        match pem_decode(text) {
            Some(("PRIVATE KEY", der)) => PrivateKey::from_pkcs8_der(&der),
            Some(_) => Err(CryptoError::Malformed(
                "expected an unencrypted PKCS#8 \"PRIVATE KEY\" PEM block",
            )),
            None => Err(CryptoError::Malformed("not PEM text")),
        }
    }

    /// The key as unencrypted PKCS#8 DER.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        self.signing
            .as_der()
            .expect("re-encoding a key aws-lc has already parsed fails only if allocation fails")
            .as_ref()
            .to_vec()
    }

    /// An independent copy of this key: its own aws-lc key objects. Threads that sign at the
    /// same time with one key object share the lock aws-lc keeps per RSA key (its blinding
    /// cache); with a copy each, none waits for another.
    pub fn duplicate(&self) -> Result<PrivateKey, CryptoError> {
        PrivateKey::from_pkcs8_der(&self.to_pkcs8_der())
    }

    /// The key as `-----BEGIN PRIVATE KEY-----` PKCS#8 PEM with 64-character lines.
    pub fn to_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.to_pkcs8_der())
    }

    /// The public half, shared so callers can keep it without copying.
    pub fn public_key(&self) -> &Arc<PublicKey> {
        &self.public
    }

    /// RSASSA-PSS, SHA-256, MGF1-SHA-256, salt length 32 (§3.1): a 512-byte signature.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; self.signing.public_modulus_len()];
        self.signing
            .sign(&RSA_PSS_SHA256, &SystemRandom::new(), msg, &mut sig)
            .expect("PSS signing with a validated RSA-4096 key fails only if allocation fails");
        sig
    }

    /// [`sign`](Self::sign), encoded as base64url without padding (§3.2): a `sig` or `content_sig`.
    pub fn sign_b64(&self, msg: &[u8]) -> String {
        b64::encode(&self.sign(msg))
    }

    /// RSA-OAEP decryption, SHA-256, MGF1-SHA-256, empty label (§3.1) of one 512-byte block.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if ciphertext.len() != MODULUS_BYTES {
            return Err(CryptoError::Malformed("ciphertext is not 512 bytes"));
        }
        let mut out = vec![0; MODULUS_BYTES];
        let len = self
            .decrypting
            .decrypt(&OAEP_SHA256_MGF1SHA256, ciphertext, &mut out, None)
            .map_err(|_| CryptoError::Crypto("OAEP decryption failed"))?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

/// Shows only the public key's fingerprint, never private key material.
impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// A peer's RSA-4096 public key (§3.1, §3.2), parsed and checked once, ready to verify and encrypt.
pub struct PublicKey {
    encoded: String,
    spki: Vec<u8>,
    /// PSS with salt length 32, the form we emit and try first (§3.1).
    pss: ParsedPublicKey,
    /// PSS with salt length 478, built on first use (only peers that sign that way need it).
    pss_max: OnceLock<Option<ParsedPublicKey>>,
    oaep: OaepPublicEncryptingKey,
}

impl PublicKey {
    /// Parses a public key in any form §3.2 accepts: base64url or standard base64 (padding
    /// optional, line breaks ignored) of DER SubjectPublicKeyInfo or DER PKCS#1 `RSAPublicKey`;
    /// PEM text of either (`PUBLIC KEY` / `RSA PUBLIC KEY`); or base64 of such PEM text.
    /// Surrounding whitespace is ignored. The key must then pass §3.1 (4096 bits, e = 65537),
    /// else [`CryptoError::WeakKey`]; anything unparseable is [`CryptoError::Malformed`].
    pub fn parse(text: &str) -> Result<PublicKey, CryptoError> {
        if text.len() > MAX_KEY_TEXT {
            return Err(CryptoError::Malformed("public key text too long"));
        }
        let text = text.trim();
        if text.starts_with("-----BEGIN") {
            return PublicKey::from_pem(text);
        }
        let compact = if text.bytes().any(|b| b.is_ascii_whitespace()) {
            Cow::Owned(text.split_ascii_whitespace().collect::<String>())
        } else {
            Cow::Borrowed(text)
        };
        let bytes = b64::decode(&compact).ok_or(CryptoError::Malformed(
            "public key is neither base64 nor PEM",
        ))?;
        if bytes.starts_with(b"-----BEGIN") {
            let pem = std::str::from_utf8(&bytes)
                .map_err(|_| CryptoError::Malformed("base64-wrapped PEM is not UTF-8"))?;
            return PublicKey::from_pem(pem);
        }
        PublicKey::from_der(&bytes)
    }

    fn from_pem(text: &str) -> Result<PublicKey, CryptoError> {
        match pem_decode(text) {
            Some(("PUBLIC KEY" | "RSA PUBLIC KEY", der)) => PublicKey::from_der(&der),
            Some(_) => Err(CryptoError::Malformed("PEM block is not a public key")),
            None => Err(CryptoError::Malformed("bad PEM text")),
        }
    }

    /// Parses DER SubjectPublicKeyInfo or DER PKCS#1 `RSAPublicKey`, with the checks of
    /// [`parse`](Self::parse).
    pub fn from_der(der: &[u8]) -> Result<PublicKey, CryptoError> {
        let key = rsa::PublicKey::from_der(der)
            .map_err(|_| CryptoError::Malformed("not a DER RSA public key"))?;
        check_strength(
            key.modulus().big_endian_without_leading_zero(),
            key.exponent().big_endian_without_leading_zero(),
        )?;
        // Re-encoded from the PKCS#1 form, so the SPKI always carries the rsaEncryption OID.
        let spki = key
            .as_der()
            .map_err(|_| CryptoError::Crypto("cannot encode public key"))?
            .as_ref()
            .to_vec();
        let pss = ParsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, &spki)
            .map_err(|_| CryptoError::Malformed("public key unusable for PSS"))?;
        let oaep = PublicEncryptingKey::from_der(&spki)
            .map_err(|_| CryptoError::Malformed("public key unusable for OAEP"))
            .and_then(|key| {
                OaepPublicEncryptingKey::new(key)
                    .map_err(|_| CryptoError::Crypto("cannot set up OAEP encryption"))
            })?;
        Ok(PublicKey {
            encoded: b64::encode(&spki),
            spki,
            pss,
            pss_max: OnceLock::new(),
            oaep,
        })
    }

    /// The form we emit (§3.2): base64url(DER SPKI), 734 characters starting `MIICIjAN`.
    pub fn encoded(&self) -> &str {
        &self.encoded
    }

    /// DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// Checks an RSASSA-PSS SHA-256 signature (§3.1): salt length 32 first, then 478.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        if sig.len() != MODULUS_BYTES {
            return false;
        }
        if self.pss.verify_sig(msg, sig).is_ok() {
            return true;
        }
        self.pss_max
            .get_or_init(|| ParsedPublicKey::new(&PSS_SALT_MAX, &self.spki).ok())
            .as_ref()
            .is_some_and(|key| key.verify_sig(msg, sig).is_ok())
    }

    /// [`verify`](Self::verify) of a signature in any base64 form (§3.2); false if not base64.
    pub fn verify_b64(&self, msg: &[u8], sig_b64: &str) -> bool {
        b64::decode(sig_b64).is_some_and(|sig| self.verify(msg, &sig))
    }

    /// RSA-OAEP encryption, SHA-256, MGF1-SHA-256, empty label (§3.1): at most
    /// [`MAX_PLAINTEXT`] bytes in, 512 bytes out.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(CryptoError::Malformed("plaintext longer than 446 bytes"));
        }
        let mut out = vec![0; MODULUS_BYTES];
        let len = self
            .oaep
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
            .map_err(|_| CryptoError::Crypto("OAEP encryption failed"))?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

/// Two keys are equal when their DER SPKI is, however each was encoded when received.
impl PartialEq for PublicKey {
    fn eq(&self, other: &PublicKey) -> bool {
        self.spki == other.spki
    }
}

impl Eq for PublicKey {}

/// A short fingerprint: the first 16 hex digits of SHA-256(SPKI). (The first characters of
/// [`encoded`](PublicKey::encoded) are the same DER header for every RSA-4096 key.)
impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(sha256:{})", &sha256_hex(&self.spki)[..16])
    }
}

/// Enforces §3.1 on a parsed key: a modulus of exactly 4096 bits and exponent 65537.
fn check_strength(modulus: &[u8], exponent: &[u8]) -> Result<(), CryptoError> {
    let bits = match modulus.first() {
        Some(top) => modulus.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    };
    if bits != 4096 {
        return Err(CryptoError::WeakKey(format!(
            "RSA modulus is {bits} bits, need 4096 bits"
        )));
    }
    if exponent != [1, 0, 1] {
        let shown = if exponent.len() <= 8 {
            exponent
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
                .to_string()
        } else {
            format!("of {} bytes", exponent.len())
        };
        return Err(CryptoError::WeakKey(format!(
            "RSA public exponent {shown}, need exponent 65537"
        )));
    }
    Ok(())
}

/// Splits PEM text into its label and decoded body. Tolerates CRLF and surrounding whitespace;
/// refuses RFC 1421 headers (an encrypted key) and text after the END line.
fn pem_decode(text: &str) -> Option<(&str, Vec<u8>)> {
    let rest = text.trim().strip_prefix("-----BEGIN ")?;
    let (label, rest) = rest.split_once("-----")?;
    let (body, tail) = rest.split_once(format!("-----END {label}-----").as_str())?;
    if !tail.trim().is_empty() || body.contains(':') {
        return None;
    }
    let body: String = body.split_ascii_whitespace().collect();
    Some((label, b64::decode(&body)?))
}

/// PEM with standard padded base64 in 64-character lines (RFC 7468).
fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(body.len() + body.len() / 64 + 2 * label.len() + 40);
    out.push_str(&format!("-----BEGIN {label}-----\n"));
    for (i, c) in body.chars().enumerate() {
        if i > 0 && i % 64 == 0 {
            out.push('\n');
        }
        out.push(c);
    }
    out.push_str(&format!("\n-----END {label}-----\n"));
    out
}

/// Parsed public keys by the exact string received (§3.2: parse each distinct key string once),
/// failures included, so a peer repeating a bad key costs a lookup, not a parse.
///
/// Bounded by two generations: new entries go into `recent`; when `recent` holds half the
/// capacity it becomes `older` and the previous `older` is dropped. A hit in `older` moves back to
/// `recent`. Every operation is O(1) amortised and `len()` never exceeds the capacity.
pub struct KeyCache {
    half: usize,
    recent: HashMap<String, Result<Arc<PublicKey>, CryptoError>>,
    older: HashMap<String, Result<Arc<PublicKey>, CryptoError>>,
}

impl KeyCache {
    /// A cache holding at most `capacity` key strings; a capacity below 2 counts as 2.
    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            half: (capacity / 2).max(1),
            recent: HashMap::new(),
            older: HashMap::new(),
        }
    }

    /// The parsed key for `text`, from the cache or by [`PublicKey::parse`] (result cached).
    pub fn get(&mut self, text: &str) -> Result<Arc<PublicKey>, CryptoError> {
        if text.len() > MAX_KEY_TEXT {
            // Refused by `parse` at once; storing it would only bloat the cache.
            return PublicKey::parse(text).map(Arc::new);
        }
        if let Some(hit) = self.recent.get(text) {
            return hit.clone();
        }
        let entry = match self.older.remove(text) {
            Some(hit) => hit,
            None => PublicKey::parse(text).map(Arc::new),
        };
        if self.recent.len() >= self.half {
            self.older = std::mem::take(&mut self.recent);
        }
        self.recent.insert(text.to_owned(), entry.clone());
        entry
    }

    /// Number of cached key strings.
    pub fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bytes a `content_sig` covers (§3.5), in the form we emit: the **decoded ciphertext
/// bytes** ‖ `from` ‖ `to` ‖ decimal `ts` for a direct message or file chunk; without `to`
/// (`None`) for the public channel. UTF-8, no separators. This is the form the deployed
/// Python clients sign and the only one they verify.
pub fn content_sig_message(ciphertext: &[u8], from: &str, to: Option<&str>, ts: i64) -> Vec<u8> {
    joined(ciphertext, from, to, ts, b"")
}

/// `ciphertext` ‖ `from` [‖ `to`] ‖ decimal `ts`, with `sep` between every two fields.
fn joined(ciphertext: &[u8], from: &str, to: Option<&str>, ts: i64, sep: &[u8]) -> Vec<u8> {
    let ts = ts.to_string();
    let fields = [ciphertext, from.as_bytes()]
        .into_iter()
        .chain(to.map(str::as_bytes));
    let mut msg = Vec::with_capacity(ciphertext.len() + 128);
    for field in fields {
        msg.extend_from_slice(field);
        msg.extend_from_slice(sep);
    }
    msg.extend_from_slice(ts.as_bytes());
    msg
}

/// Signs [`content_sig_message`] with the sender's key (§3.5); base64url.
pub fn make_content_sig(
    key: &PrivateKey,
    ciphertext: &[u8],
    from: &str,
    to: Option<&str>,
    ts: i64,
) -> String {
    key.sign_b64(&content_sig_message(ciphertext, from, to, ts))
}

/// Checks a `content_sig` (§3.5) over the ciphertext as it arrived (base64url text). The form
/// we emit is tried first (decoded bytes), then the *Accept* fallbacks, each binding the same
/// fields: the base64url string in place of the bytes; that string form with `|` between the
/// fields; the canonical JSON of `{ciphertext, from, to, ts}` (`to` absent for the channel).
pub fn verify_content_sig(
    key: &PublicKey,
    sig_b64: &str,
    ciphertext_b64: &str,
    from: &str,
    to: Option<&str>,
    ts: i64,
) -> bool {
    let Some(sig) = b64::decode(sig_b64) else {
        return false;
    };
    let text = ciphertext_b64.as_bytes();
    b64::decode(ciphertext_b64)
        .is_some_and(|ct| key.verify(&content_sig_message(&ct, from, to, ts), &sig))
        || key.verify(&joined(text, from, to, ts, b""), &sig)
        || key.verify(&joined(text, from, to, ts, b"|"), &sig)
        || content_sig_json(ciphertext_b64, from, to, ts)
            .is_some_and(|json| key.verify(json.as_bytes(), &sig))
}

/// The canonical JSON (§3.3) form of the fields a `content_sig` binds.
fn content_sig_json(ciphertext_b64: &str, from: &str, to: Option<&str>, ts: i64) -> Option<String> {
    let mut fields = serde_json::Map::new();
    fields.insert("ciphertext".into(), ciphertext_b64.into());
    fields.insert("from".into(), from.into());
    if let Some(to) = to {
        fields.insert("to".into(), to.into());
    }
    fields.insert("ts".into(), ts.into());
    crate::wire::canon::canonical_object(&fields).ok()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// SHA-256 of `data` as 64 lowercase hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in sha256(data) {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// `N` bytes from the system CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0; N];
    fill_random(&mut out);
    out
}

/// Fills `buf` from the system CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    SystemRandom::new()
        .fill(buf)
        .expect("the system CSPRNG does not fail once seeded; there is no safe fallback");
}

/// Compares two byte strings in time independent of their contents (length may leak).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture(path: &str) -> String {
        let path = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    fn key(name: &str) -> PrivateKey {
        PrivateKey::from_pem(&fixture(&format!("keys/{name}.pem"))).expect("fixture key")
    }

    fn interop() -> Value {
        serde_json::from_str(&fixture("interop.json")).expect("interop.json")
    }

    fn s<'a>(v: &'a Value, field: &str) -> &'a str {
        v[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} missing"))
    }

    #[test]
    fn sign_verify_round_trip() {
        let k = key("user1");
        let sig = k.sign(b"hello");
        assert_eq!(sig.len(), 512);
        assert!(k.public_key().verify(b"hello", &sig));
        assert!(k.public_key().verify_b64(b"hello", &k.sign_b64(b"hello")));
        assert!(!key("user2").public_key().verify(b"hello", &sig));
    }

    #[test]
    fn tampered_message_or_signature_fails() {
        let k = key("user1");
        let mut sig = k.sign(b"hello");
        assert!(!k.public_key().verify(b"hellp", &sig));
        sig[100] ^= 1;
        assert!(!k.public_key().verify(b"hello", &sig));
        assert!(!k.public_key().verify(b"hello", &sig[..511]));
        assert!(!k.public_key().verify_b64(b"hello", "not base64!"));
    }

    #[test]
    fn python_signatures_verify() {
        let v = interop();
        let pk = key(s(&v, "key")).public_key().clone();
        let msg = s(&v, "message_utf8").as_bytes();
        assert!(pk.verify_b64(msg, s(&v, "sig_pss_salt478")));
        assert!(pk.verify_b64(msg, s(&v, "sig_pss_salt32")));
        assert!(!pk.verify_b64(b"other", s(&v, "sig_pss_salt478")));
        // The fallback is really needed: salt 32 alone rejects the salt-478 signature.
        let sig478 = b64::decode(s(&v, "sig_pss_salt478")).expect("base64");
        assert!(pk.pss.verify_sig(msg, &sig478).is_err());
    }

    #[test]
    fn every_key_encoding_parses_to_the_same_key() {
        let v = interop();
        let ours = key(s(&v, "key")).public_key().clone();
        assert_eq!(ours.encoded(), s(&v, "pub_spki_b64url"));
        assert_eq!(ours.encoded().len(), 734);
        assert!(ours.encoded().starts_with("MIICIjAN"));
        for field in [
            "pub_spki_b64url",
            "pub_spki_b64_padded",
            "pub_pkcs1_b64",
            "pub_pkcs1_b64url",
            "pub_spki_pem",
            "pub_pkcs1_pem",
            "pub_spki_pem_b64",
        ] {
            let text = format!("\n  {}  \r\n", s(&v, field));
            let parsed = PublicKey::parse(&text).unwrap_or_else(|e| panic!("{field}: {e}"));
            assert_eq!(parsed, *ours, "{field}");
            assert_eq!(parsed.encoded(), ours.encoded(), "{field}");
        }
        let der = b64::decode(s(&v, "pub_pkcs1_b64")).expect("base64");
        assert_eq!(PublicKey::from_der(&der).expect("PKCS#1 DER"), *ours);
        assert_eq!(PublicKey::from_der(ours.spki_der()).expect("SPKI"), *ours);
    }

    #[test]
    fn weak_keys_are_rejected() {
        for (file, needle) in [("weak2048", "2048 bits"), ("e3", "exponent 3")] {
            match PublicKey::parse(&fixture(&format!("keys/{file}.pub.pem"))) {
                Err(CryptoError::WeakKey(why)) => assert!(why.contains(needle), "{file}: {why}"),
                other => panic!("{file}: {other:?}"),
            }
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let spki = key("user1").public_key().encoded().to_owned();
        let pem_private = fixture("keys/user1.pem");
        for text in [
            "",
            "not base64!",
            "AAAA",
            &spki[..700],
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n",
            &pem_private,
        ] {
            assert!(
                matches!(PublicKey::parse(text), Err(CryptoError::Malformed(_))),
                "{text:?}"
            );
        }
        assert!(matches!(
            PublicKey::parse(&"A".repeat(MAX_KEY_TEXT + 4)),
            Err(CryptoError::Malformed(_))
        ));
        assert!(matches!(
            PrivateKey::from_pem(&fixture("keys/weak2048.pub.pem")),
            Err(CryptoError::Malformed(_))
        ));
        assert!(matches!(
            PrivateKey::from_pkcs8_der(b"junk"),
            Err(CryptoError::Malformed(_))
        ));
    }

    #[test]
    fn private_key_round_trips_through_pem_and_der() {
        let k = key("server1");
        let again = PrivateKey::from_pem(&k.to_pem()).expect("own PEM");
        assert_eq!(again.public_key(), k.public_key());
        let der = PrivateKey::from_pkcs8_der(&k.to_pkcs8_der()).expect("own DER");
        assert_eq!(der.public_key(), k.public_key());
        let pem = k.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(pem.ends_with("\n-----END PRIVATE KEY-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn oaep_round_trip() {
        let k = key("user3");
        let ct = k.public_key().encrypt(b"attack at dawn").expect("encrypt");
        assert_eq!(ct.len(), 512);
        assert_eq!(b64::encode(&ct).len(), 683);
        assert_eq!(k.decrypt(&ct).expect("decrypt"), b"attack at dawn");
        assert!(matches!(
            key("user4").decrypt(&ct),
            Err(CryptoError::Crypto(_))
        ));
        assert!(matches!(
            k.decrypt(&ct[1..]),
            Err(CryptoError::Malformed(_))
        ));
        let mut bad = ct.clone();
        bad[7] ^= 0x40;
        assert!(k.decrypt(&bad).is_err());
    }

    #[test]
    fn python_ciphertext_decrypts() {
        let v = interop();
        let ct = b64::decode(s(&v, "oaep_ciphertext")).expect("base64");
        let plain = key(s(&v, "key")).decrypt(&ct).expect("decrypt");
        assert_eq!(plain, s(&v, "oaep_plaintext_utf8").as_bytes());
    }

    #[test]
    fn plaintext_limit_is_446_bytes() {
        let k = key("user2");
        let max = [0xa5; MAX_PLAINTEXT];
        let ct = k.public_key().encrypt(&max).expect("446 bytes fit");
        assert_eq!(k.decrypt(&ct).expect("decrypt"), max);
        assert_eq!(
            k.public_key().encrypt(&[0; MAX_PLAINTEXT + 1]),
            Err(CryptoError::Malformed("plaintext longer than 446 bytes"))
        );
    }

    #[test]
    fn content_sig_emits_the_bytes_form_and_accepts_every_listed_form() {
        let k = key("user1");
        let pk = k.public_key();
        let raw = b"ciphertext bytes";
        let ct = b64::encode(raw);
        assert_eq!(
            content_sig_message(raw, "alice", Some("bob"), 1234),
            [&raw[..], b"alicebob1234"].concat()
        );
        assert_eq!(
            content_sig_message(raw, "alice", None, -5),
            [&raw[..], b"alice-5"].concat()
        );

        // Our form: the decoded bytes (§3.5), bound to every field.
        let sig = make_content_sig(&k, raw, "alice", Some("bob"), 1234);
        assert!(verify_content_sig(
            pk,
            &sig,
            &ct,
            "alice",
            Some("bob"),
            1234
        ));
        // Padded or standard-alphabet ciphertext text decodes to the same bytes.
        let padded = base64::engine::general_purpose::STANDARD.encode(raw);
        assert!(verify_content_sig(
            pk,
            &sig,
            &padded,
            "alice",
            Some("bob"),
            1234
        ));
        for (from, to, ts) in [
            ("alice", Some("eve"), 1234),
            ("alice", Some("bob"), 1235),
            ("alice", None, 1234),
            ("mallory", Some("bob"), 1234),
        ] {
            assert!(!verify_content_sig(pk, &sig, &ct, from, to, ts));
        }
        assert!(!verify_content_sig(
            pk,
            "***",
            &ct,
            "alice",
            Some("bob"),
            1234
        ));
        let other_ct = b64::encode(b"other bytes");
        assert!(!verify_content_sig(
            pk,
            &sig,
            &other_ct,
            "alice",
            Some("bob"),
            1234
        ));

        // Accepted fallbacks, each binding the same fields.
        let text_form = k.sign_b64(format!("{ct}alicebob77").as_bytes());
        assert!(verify_content_sig(
            pk,
            &text_form,
            &ct,
            "alice",
            Some("bob"),
            77
        ));
        assert!(!verify_content_sig(
            pk,
            &text_form,
            &ct,
            "alice",
            Some("bob"),
            78
        ));
        let piped = k.sign_b64(format!("{ct}|alice|bob|77").as_bytes());
        assert!(verify_content_sig(
            pk,
            &piped,
            &ct,
            "alice",
            Some("bob"),
            77
        ));
        assert!(!verify_content_sig(
            pk,
            &piped,
            &ct,
            "alice",
            Some("bo"),
            77
        ));
        let piped_public = k.sign_b64(format!("{ct}|alice|77").as_bytes());
        assert!(verify_content_sig(
            pk,
            &piped_public,
            &ct,
            "alice",
            None,
            77
        ));
        let json_form = format!(r#"{{"ciphertext":"{ct}","from":"alice","to":"bob","ts":77}}"#);
        let json_sig = k.sign_b64(json_form.as_bytes());
        assert!(verify_content_sig(
            pk,
            &json_sig,
            &ct,
            "alice",
            Some("bob"),
            77
        ));
        assert!(!verify_content_sig(pk, &json_sig, &ct, "alice", None, 77));
        let json_public = format!(r#"{{"ciphertext":"{ct}","from":"alice","ts":77}}"#);
        let json_sig = k.sign_b64(json_public.as_bytes());
        assert!(verify_content_sig(pk, &json_sig, &ct, "alice", None, 77));

        // Python's vectors: DM in the fallback form (salt 478), public in the string form.
        let v = interop();
        let dm = &v["content_sig_dm_decoded_form"];
        let ts = dm["ts"].as_i64().expect("ts");
        let (c, from, to, sig) = (
            s(dm, "ciphertext"),
            s(dm, "from"),
            s(dm, "to"),
            s(dm, "content_sig"),
        );
        assert!(verify_content_sig(pk, sig, c, from, Some(to), ts));
        assert!(!verify_content_sig(pk, sig, c, from, Some(from), ts));
        assert!(!verify_content_sig(pk, sig, c, from, Some(to), ts + 1));
        let public = &v["content_sig_public_string_form"];
        let ts = public["ts"].as_i64().expect("ts");
        let (c, from, sig) = (
            s(public, "ciphertext"),
            s(public, "from"),
            s(public, "content_sig"),
        );
        assert!(verify_content_sig(pk, sig, c, from, None, ts));
        assert!(!verify_content_sig(pk, sig, c, from, Some("bob"), ts));
        assert!(!verify_content_sig(pk, sig, c, from, None, ts - 1));
    }

    #[test]
    fn key_cache_shares_caches_failures_and_stays_bounded() {
        let keys: Vec<String> = ["user1", "user2", "user3", "user4", "user5"]
            .iter()
            .map(|n| key(n).public_key().encoded().to_owned())
            .collect();
        let mut cache = KeyCache::new(4);
        assert!(cache.is_empty());
        let a = cache.get(&keys[0]).expect("valid");
        let b = cache.get(&keys[0]).expect("valid");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.len(), 1);

        let weak = fixture("keys/weak2048.pub.pem");
        assert!(matches!(cache.get(&weak), Err(CryptoError::WeakKey(_))));
        assert!(matches!(cache.get(&weak), Err(CryptoError::WeakKey(_))));
        assert_eq!(cache.len(), 2);
        assert!(matches!(
            cache.get("garbage!"),
            Err(CryptoError::Malformed(_))
        ));

        for round in 0..3 {
            for k in &keys {
                let parsed = cache.get(k).expect("valid");
                assert_eq!(parsed.encoded(), k);
                assert!(cache.len() <= 4, "round {round}: {}", cache.len());
            }
        }
        // A string seen a moment ago is still cached: same Arc.
        let c = cache.get(&keys[4]).expect("valid");
        assert!(Arc::ptr_eq(&c, &cache.get(&keys[4]).expect("valid")));
        assert!(cache.len() <= 4);
        // Oversized text is refused and not stored.
        let before = cache.len();
        assert!(cache.get(&"A".repeat(MAX_KEY_TEXT + 1)).is_err());
        assert_eq!(cache.len(), before);
    }

    #[test]
    fn private_key_debug_hides_key_material() {
        let k = key("user1");
        let shown = format!("{k:?}");
        assert!(shown.starts_with("PrivateKey"), "{shown}");
        let der = k.to_pkcs8_der();
        let pem = k.to_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        for window in body.as_bytes().chunks(16) {
            let window = std::str::from_utf8(window).expect("ASCII");
            assert!(!shown.contains(window), "{shown}");
        }
        let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
        for window in hex.as_bytes().chunks(16) {
            let window = std::str::from_utf8(window).expect("ASCII");
            assert!(!shown.contains(window), "{shown}");
        }
        assert!(shown.len() < 120, "{shown}");
    }

    #[test]
    fn generated_keys_are_rsa_4096() {
        let k = PrivateKey::generate().expect("generate");
        assert_eq!(k.public_key().encoded().len(), 734);
        assert!(k.public_key().verify(b"x", &k.sign(b"x")));
    }

    #[test]
    fn keys_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PrivateKey>();
        assert_send_sync::<PublicKey>();
        assert_send_sync::<KeyCache>();
    }

    #[test]
    fn hashes_random_and_comparison() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256(b"abc")[..2], [0xba, 0x78]);
        let a: [u8; 32] = random_bytes();
        let b: [u8; 32] = random_bytes();
        assert_ne!(a, b);
        assert!(constant_time_eq(b"same", b"same"));
        assert!(!constant_time_eq(b"same", b"sama"));
        assert!(!constant_time_eq(b"same", b"same!"));
    }
}
