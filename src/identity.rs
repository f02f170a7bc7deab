//! The server's identity (PROTOCOL.md §4.1): its `server_id` and RSA-4096 key pair, created on
//! first start and kept in the key file (mode 0600) so both survive restarts.
//!
//! The key file is JSON: `{"server_id": "...", "private_key": "<PKCS#8 PEM>"}`. A bare PKCS#8
//! PEM file (as other deployments keep) is accepted too; its id then comes from `--server-id`
//! or is created and saved in the database.

use crate::crypto::PrivateKey;
use crate::store::Store;
use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Loads the identity from `path`, creating it when the file does not exist. `id_override`
/// (from `--server-id`) wins over the stored id.
pub fn load_or_create(
    path: &Path,
    id_override: Option<&str>,
    store: &Store,
) -> Result<(String, PrivateKey), String> {
    let (file_id, key) = load_or_create_key(path, id_override)?;
    let id = match (id_override, file_id) {
        (Some(id), _) => id.to_string(),
        (None, Some(id)) => id,
        (None, None) => match store.meta_get("server_id").map_err(|e| e.to_string())? {
            Some(id) => id,
            None => {
                let id = crate::wire::ids::new_uuid();
                store
                    .meta_set("server_id", &id)
                    .map_err(|e| e.to_string())?;
                id
            }
        },
    };
    Ok((id, key))
}

/// The key file alone: loaded, or created (with `id_override` or a new id) when missing.
/// Returns the id it holds (none for a bare PEM file) and the key. Touches no database, so
/// `--print-pubkey` creates nothing but the key file.
pub fn load_or_create_key(
    path: &Path,
    id_override: Option<&str>,
) -> Result<(Option<String>, PrivateKey), String> {
    let shown = path.display();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            warn_if_readable_by_others(path);
            parse_key_file(&text).map_err(|e| format!("key file {shown}: {e}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::info!("creating a new RSA-4096 server key in {shown}");
            let key = PrivateKey::generate().map_err(|e| format!("key generation: {e}"))?;
            let id = id_override
                .map(str::to_string)
                .unwrap_or_else(crate::wire::ids::new_uuid);
            write_key_file(path, &id, &key).map_err(|e| format!("key file {shown}: {e}"))?;
            Ok((Some(id), key))
        }
        Err(e) => Err(format!("key file {shown}: {e}")),
    }
}

fn parse_key_file(text: &str) -> Result<(Option<String>, PrivateKey), String> {
    if !text.trim_start().starts_with('{') {
        let key = PrivateKey::from_pem(text).map_err(|e| e.to_string())?;
        return Ok((None, key));
    }
    let value: Value = serde_json::from_str(text).map_err(|_| "not valid JSON".to_string())?;
    let id = value
        .get("server_id")
        .and_then(Value::as_str)
        .filter(|id| crate::wire::ids::is_valid_id(id))
        .ok_or("missing or malformed server_id")?;
    let pem = value
        .get("private_key")
        .and_then(Value::as_str)
        .ok_or("missing private_key")?;
    let key = PrivateKey::from_pem(pem).map_err(|e| e.to_string())?;
    Ok((Some(id.to_string()), key))
}

fn write_key_file(path: &Path, id: &str, key: &PrivateKey) -> std::io::Result<()> {
    write_private_json(path, &json!({"server_id": id, "private_key": key.to_pem()}))
}

/// Writes a new secret file (key material): JSON, mode 0600, never overwriting; its directory is
/// created 0700 when missing. Synced before returning.
pub fn write_private_json(path: &Path, body: &Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("{body:#}\n").as_bytes())?;
    file.sync_all()
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        log::warn!(
            "key file {} is readable by other users; run: chmod 600 {}",
            path.display(),
            path.display()
        );
    }
}
