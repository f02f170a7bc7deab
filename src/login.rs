//! Accounts on the server (PROTOCOL.md §5.3): `USER_REGISTER` and `USER_LOGIN`, part of the
//! sans-IO core.
//!
//! The server stores a salted hash of the client's `auth` and the client's sealed key, never
//! anything that opens it. An unknown name and a wrong password get the same answer after the
//! same work (a dummy verifier is checked for unknown names), compared in constant time. Login
//! attempts are limited per connection and per name with token buckets: a limited attempt is
//! refused at once, so nobody else waits (the event loop never sleeps).

use crate::account;
use crate::server::{Bucket, ConnId, Server, Time, store_error};
use crate::store::{StoreError, UserRecord};
use crate::wire::{self, Envelope, ErrorCode, WireError, types};
use log::info;
use serde_json::json;

/// Login attempts a connection may make at once, then one more every [`CONN_REFILL_MS`].
pub const CONN_BURST: u32 = 5;
pub const CONN_REFILL_MS: u64 = 12_000;
/// Login attempts per display name (from anywhere), then one more every [`NAME_REFILL_MS`].
pub const NAME_BURST: u32 = 10;
pub const NAME_REFILL_MS: u64 = 6_000;
/// Names tracked by the per-name limiter before full buckets are forgotten.
const MAX_TRACKED_NAMES: usize = 10_000;
/// Largest sealed key accepted (the §5.3 document for an RSA-4096 key is about 3.4 KiB).
const MAX_PRIVKEY_STORE: usize = 16 * 1024;

fn invalid_credentials() -> WireError {
    WireError::new(ErrorCode::BadKey, "invalid credentials")
}

impl Server {
    /// `USER_REGISTER {user_id, pubkey, privkey_store, auth, meta:{display_name}}`, signed by the
    /// new key. Durable before `USER_REGISTERED` is sent.
    pub(crate) fn on_register(
        &mut self,
        now: Time,
        conn: ConnId,
        env: &Envelope,
    ) -> Result<(), WireError> {
        let f = env.fields();
        let user_id = f.id("user_id")?;
        if !env.from.is_empty() && env.from != user_id {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "envelope from differs from payload.user_id",
            ));
        }
        let pubkey = self.parse_key("pubkey", f.str("pubkey")?)?;
        let privkey_store = f.str("privkey_store")?;
        if privkey_store.len() > MAX_PRIVKEY_STORE || crate::b64::decode(privkey_store).is_none() {
            return Err(WireError::field(
                "privkey_store",
                "must be base64, at most 16 KiB",
            ));
        }
        let auth = auth_bytes(f.str("auth")?)
            .ok_or_else(|| WireError::field("auth", "must be 32 bytes of base64"))?;
        let display_name = f
            .obj("meta")?
            .str("display_name")
            .map_err(|_| WireError::field("meta.display_name", "missing"))?;
        if !crate::ids::is_valid_display_name(display_name) {
            return Err(WireError::field(
                "meta.display_name",
                "must be 1-32 characters of [A-Za-z0-9._-]",
            ));
        }
        if !wire::verify_payload_sig(&pubkey, &env.payload, &env.sig)? {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "USER_REGISTER must be signed by the key it registers",
            ));
        }
        let record = UserRecord {
            user_id: user_id.to_string(),
            pubkey: pubkey.encoded().to_string(),
            privkey_store: privkey_store.to_string(),
            pake_password: account::password_verifier(&auth),
            meta: json!({"display_name": display_name}),
            version: 1,
        };
        match self.store.register_account(&record) {
            Ok(()) => {}
            Err(StoreError::Conflict(what)) if what.ends_with("taken") => {
                return Err(WireError::new(ErrorCode::NameInUse, what));
            }
            Err(e) => return Err(store_error(&e)),
        }
        info!("account {display_name} registered as user {user_id} (conn {conn})");
        let payload = json!({"user_id": user_id});
        self.send_signed(now, conn, types::USER_REGISTERED, user_id, &payload);
        Ok(())
    }

    /// `USER_LOGIN {display_name, auth}` → `USER_LOGGED_IN {user_id, privkey_store}`.
    pub(crate) fn on_login(
        &mut self,
        now: Time,
        conn: ConnId,
        env: &Envelope,
    ) -> Result<(), WireError> {
        let f = env.fields();
        let name = f.str("display_name")?;
        let auth = f.str("auth")?;
        if !self.login_allowed(now, conn, name) {
            info!("conn {conn}: login attempts for {name:?} rate-limited");
            return Err(WireError::new(
                ErrorCode::BadKey,
                "too many login attempts; wait and try again",
            ));
        }
        let record = self
            .store
            .user_by_display_name(name)
            .map_err(|e| store_error(&e))?;
        let verifier = record
            .as_ref()
            .map_or(account::DUMMY_VERIFIER, |r| r.pake_password.as_str());
        // Malformed auth is checked like a wrong one: same work, same answer.
        let auth = auth_bytes(auth).unwrap_or_default();
        let matches = account::check_password(verifier, &auth);
        let Some(record) = record.filter(|_| matches) else {
            info!("conn {conn}: failed login for {name:?}");
            return Err(invalid_credentials());
        };
        info!("conn {conn}: {name} logged in as user {}", record.user_id);
        let payload = json!({"user_id": record.user_id, "privkey_store": record.privkey_store});
        self.send_signed(now, conn, types::USER_LOGGED_IN, &record.user_id, &payload);
        Ok(())
    }

    /// One login attempt against the per-connection and per-name budgets.
    fn login_allowed(&mut self, now: Time, conn: ConnId, name: &str) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        if !c.logins.take(now.mono_ms, CONN_BURST, CONN_REFILL_MS) {
            return false;
        }
        if self.login_names.len() >= MAX_TRACKED_NAMES && !self.login_names.contains_key(name) {
            // Forget names whose bucket has refilled completely: they hold no information.
            self.login_names
                .retain(|_, b| !b.is_full_at(now.mono_ms, NAME_BURST, NAME_REFILL_MS));
            if self.login_names.len() >= MAX_TRACKED_NAMES {
                return false; // under a name-spraying attack: refuse rather than grow
            }
        }
        self.login_names
            .entry(name.to_string())
            .or_insert_with(|| Bucket::new(NAME_BURST, now.mono_ms))
            .take(now.mono_ms, NAME_BURST, NAME_REFILL_MS)
    }
}

/// `auth` as raw bytes: base64 of exactly 32 bytes.
fn auth_bytes(auth: &str) -> Option<Vec<u8>> {
    crate::b64::decode(auth).filter(|b| b.len() == 32)
}
