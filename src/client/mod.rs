//! The line client's protocol logic, without I/O: a [`Session`] turns typed commands into
//! frames and incoming frames into [`Event`]s to print. `src/bin/socp.rs` wires it to a
//! WebSocket and stdin.
//!
//! What it checks (PROTOCOL.md §3.4, §3.5, §5.2): the server's key from `AUTH_CHALLENGE` is
//! pinned per server URL (a change is warned about); every frame from the server must carry a
//! valid `sig` by that key; every message's `content_sig` is checked against the key the
//! directory gave for the sender, and anything that fails is shown as not authentic.
//!
//! Long texts: one RSA-OAEP block carries at most 446 bytes, so a longer `/tell` or `/all` text
//! is split at character boundaries into several messages, each delivered and shown on its own.
//!
//! The client layer owns the user's side of the protocol: this file is the session, [`files`]
//! sends and saves files. It must not do I/O itself (no sockets, no terminal, no clock): the
//! `socp` binary reads and writes, and hands the session what arrived. Reading and writing
//! files on disk (the key file, downloads) is the exception, done where a command asks for it.

pub mod chunks;
pub mod files;

use crate::crypto::{self, PrivateKey, PublicKey};
use crate::wire::{self, Envelope, SignedPayload, types};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The user's identity as kept in the key file: `{user_id, display_name, private_key}`.
pub struct Identity {
    pub user_id: String,
    pub display_name: String,
    pub key: Arc<PrivateKey>,
}

impl Identity {
    /// Loads the key file at `path`, or creates it (new UUID, new RSA-4096 key, mode 0600).
    pub fn load_or_create(path: &Path, display_name: &str) -> Result<Identity, String> {
        let shown = path.display();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let v: Value =
                    serde_json::from_str(&text).map_err(|_| format!("{shown}: not valid JSON"))?;
                let field = |name: &str| {
                    v.get(name)
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("{shown}: missing {name}"))
                };
                let user_id = field("user_id")?.to_string();
                if !crate::wire::ids::is_valid_id(&user_id) {
                    return Err(format!("{shown}: malformed user_id"));
                }
                let key = PrivateKey::from_pem(field("private_key")?)
                    .map_err(|e| format!("{shown}: {e}"))?;
                let display_name = field("display_name").unwrap_or(display_name).to_string();
                Ok(Identity {
                    user_id,
                    display_name,
                    key: Arc::new(key),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Identity {
                    user_id: crate::wire::ids::new_uuid(),
                    display_name: display_name.to_string(),
                    key: Arc::new(PrivateKey::generate().map_err(|e| e.to_string())?),
                };
                identity
                    .save(path)
                    .map_err(|e| format!("cannot write {shown}: {e}"))?;
                Ok(identity)
            }
            Err(e) => Err(format!("{shown}: {e}")),
        }
    }

    /// Writes the key file (mode 0600; the directory is created 0700 if missing).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let body = json!({
            "user_id": self.user_id,
            "display_name": self.display_name,
            "private_key": self.key.to_pem(),
        });
        crate::identity::write_private_json(path, &body)
    }
}

/// Keys pinned on first use, kept in a small JSON file: servers' keys per URL
/// (`server-pins.json`), and users' keys per user id (`user-pins.json` beside it, §7).
#[derive(Debug, Default)]
pub struct Pins {
    path: Option<std::path::PathBuf>,
    pins: BTreeMap<String, String>,
}

impl Pins {
    /// Loads pins from `path` (a missing file is empty).
    pub fn load(path: &Path) -> Pins {
        let pins = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Pins {
            path: Some(path.to_path_buf()),
            pins,
        }
    }

    /// The pins file `name` in the same directory as this one (in memory when this one is).
    pub fn sibling(&self, name: &str) -> Pins {
        match self.path.as_deref().and_then(Path::parent) {
            Some(dir) => Pins::load(&dir.join(name)),
            None => Pins::default(),
        }
    }

    /// The key pinned for `url`, if any.
    pub fn get(&self, url: &str) -> Option<&str> {
        self.pins.get(url).map(String::as_str)
    }

    /// Checks `key` against the pin for `what`; pins it when there is none. Returns the old pin
    /// when it differs (the caller warns; the pin is not replaced silently).
    pub fn check(&mut self, what: &str, key: &str) -> Option<String> {
        match self.pins.get(what) {
            Some(old) if old == key => None,
            Some(old) => Some(old.clone()),
            None => {
                self.replace(what, key);
                None
            }
        }
    }

    /// Pins `key` for `what`, replacing any pin: only on the person's explicit word.
    pub fn replace(&mut self, what: &str, key: &str) {
        self.pins.insert(what.to_string(), key.to_string());
        if let Some(path) = &self.path {
            let text = serde_json::to_string_pretty(&self.pins).unwrap_or_default();
            if let Err(e) = std::fs::write(path, text) {
                log::warn!("cannot save a key pin to {}: {e}", path.display());
            }
        }
    }
}

/// A user in the client's view of the directory.
#[derive(Debug, Clone)]
pub struct Peer {
    pub server_id: String,
    pub name: Option<String>,
    pub key: Arc<PublicKey>,
}

/// Stable codes of local warnings (`Event::Warning`), for scripts: the `detail` is English and
/// may change, the code does not. The first group means a command of yours failed
/// ([`Event::is_failure`]).
pub mod warning {
    /// A command used wrongly (`/tell` without text, …).
    pub const USAGE: &str = "USAGE";
    pub const UNKNOWN_COMMAND: &str = "UNKNOWN_COMMAND";
    /// A line that is not a command (text must go through `/tell` or `/all`).
    pub const NOT_A_COMMAND: &str = "NOT_A_COMMAND";
    /// No online user has that name or id.
    pub const NO_SUCH_USER: &str = "NO_SUCH_USER";
    /// Several online users have that name: use an id.
    pub const AMBIGUOUS_NAME: &str = "AMBIGUOUS_NAME";
    /// `/all` with nobody else online.
    pub const NO_RECIPIENTS: &str = "NO_RECIPIENTS";
    pub const ENCRYPT_FAILED: &str = "ENCRYPT_FAILED";
    /// `/file`: the file cannot be read.
    pub const FILE_UNREADABLE: &str = "FILE_UNREADABLE";
    /// `/file`: larger than `--max-file-size`.
    pub const FILE_TOO_LARGE: &str = "FILE_TOO_LARGE";
    /// `/file`: the file changed while being sent.
    pub const FILE_CHANGED: &str = "FILE_CHANGED";
    /// `/file`: the server ended the transfer.
    pub const FILE_FAILED: &str = "FILE_FAILED";

    /// A file someone sent us was refused (and deleted).
    pub const FILE_REJECTED: &str = "FILE_REJECTED";
    /// A message to us could not be decrypted.
    pub const UNDECRYPTABLE: &str = "UNDECRYPTABLE";
    /// A frame from the server that is malformed or unexpected (ignored).
    pub const BAD_FRAME: &str = "BAD_FRAME";
    /// A frame whose server signature does not verify (ignored).
    pub const BAD_SERVER_SIG: &str = "BAD_SERVER_SIG";
    /// The server's key is unusable.
    pub const BAD_SERVER_KEY: &str = "BAD_SERVER_KEY";
    /// The server's key differs from the one pinned for its URL.
    pub const SERVER_KEY_CHANGED: &str = "SERVER_KEY_CHANGED";
    /// A directory entry with an unusable key (that user is ignored).
    pub const BAD_USER_KEY: &str = "BAD_USER_KEY";
    /// The key file can be read by other users of this machine.
    pub const KEY_FILE_PERMISSIONS: &str = "KEY_FILE_PERMISSIONS";
    /// The data directory cannot be created: server pins are not saved.
    pub const DATA_DIR: &str = "DATA_DIR";
    /// A user's key differs from the one pinned for them (§7): `/trust` after checking it.
    pub const USER_KEY_CHANGED: &str = "USER_KEY_CHANGED";
    /// `/tell`, `/all` or `/file` refused: the recipient's changed key is not trusted yet.
    pub const KEY_NOT_TRUSTED: &str = "KEY_NOT_TRUSTED";
    /// `/login` or `/register` typed before logging in did not work (type it again).
    pub const LOGIN_FAILED: &str = "LOGIN_FAILED";

    /// Whether a warning with `code` means a command failed.
    pub fn is_failure(code: &str) -> bool {
        matches!(
            code,
            USAGE
                | UNKNOWN_COMMAND
                | NOT_A_COMMAND
                | NO_SUCH_USER
                | AMBIGUOUS_NAME
                | NO_RECIPIENTS
                | ENCRYPT_FAILED
                | FILE_UNREADABLE
                | FILE_TOO_LARGE
                | FILE_CHANGED
                | FILE_FAILED
                | KEY_NOT_TRUSTED
        )
    }
}

/// Something to show the person (or the script).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Connected {
        user_id: String,
        name: String,
        server_id: String,
        online: usize,
    },
    Online {
        user_id: String,
        name: String,
        server_id: String,
    },
    Offline {
        user_id: String,
        name: String,
    },
    Message {
        public: bool,
        from: String,
        name: String,
        text: String,
        ts: i64,
        /// `None` when authentic; otherwise why it is not.
        problem: Option<String>,
    },
    List {
        users: Vec<(String, String, String)>, // (user_id, name, server_id)
    },
    ServerError {
        code: String,
        detail: String,
    },
    /// Something the client noticed: a stable code (see [`warning`]) and English detail.
    Warning {
        code: &'static str,
        detail: String,
    },
    /// Something the client did that the person should know about.
    Notice(String),
    /// The answer to `/help`.
    Help(&'static str),
    /// A command's frames were handed to the server: `/tell` and `/file` to one user, `/all`
    /// to every other member online. An `error` may still follow if the server cannot deliver.
    Sent {
        command: &'static str,
        /// (user_id, name) of each recipient.
        to: Vec<(String, String)>,
        /// Messages per recipient (a long text is split); 1 for a file.
        parts: usize,
        /// The file's name and size, for `/file`.
        file: Option<(String, u64)>,
    },
    /// How far a file transfer has come.
    Progress {
        sending: bool,
        name: String,
        done: u64,
        total: u64,
    },
    /// A file arrived whole, its size and SHA-256 checked.
    FileReceived {
        from: String,
        name: String,
        path: String,
        size: u64,
    },
    Closed,
}

impl Event {
    /// One human-readable line.
    pub fn human(&self, me: &str) -> String {
        match self {
            Event::Connected {
                user_id,
                name,
                server_id,
                online,
            } => {
                format!("* connected as {name} ({user_id}) to server {server_id}; {online} online")
            }
            Event::Online {
                user_id,
                name,
                server_id,
            } => format!("* {name} is online ({user_id} on {server_id})"),
            Event::Offline { user_id, name } => format!("* {name} went offline ({user_id})"),
            Event::Message {
                public,
                name,
                text,
                problem,
                ..
            } => {
                let tag = if *public { "all" } else { "dm" };
                match problem {
                    None => format!("[{tag}] {name}: {text}"),
                    Some(why) => format!("[{tag}] {name} (NOT AUTHENTIC: {why}): {text}"),
                }
            }
            Event::List { users } => {
                let mut out = format!("* {} online:", users.len());
                for (id, name, server) in users {
                    let you = if id == me { " (you)" } else { "" };
                    out.push_str(&format!("\n  {name} {id} on {server}{you}"));
                }
                out
            }
            Event::ServerError { code, detail } => format!("! {code}: {detail}"),
            Event::Warning { detail, .. } => format!("! warning: {detail}"),
            Event::Notice(n) => format!("* {n}"),
            Event::Help(text) => text.to_string(),
            Event::Sent {
                command,
                to,
                parts,
                file,
            } => {
                let names: Vec<&str> = to.iter().map(|(_, name)| name.as_str()).collect();
                match (command, file) {
                    (_, Some((file, size))) => {
                        format!("* sent {file} ({size} bytes) to {}", names.join(", "))
                    }
                    (&"all", _) => {
                        let each = if *parts > 1 {
                            format!(" ({parts} parts each)")
                        } else {
                            String::new()
                        };
                        format!("* sent to {} users: {}{each}", to.len(), names.join(", "))
                    }
                    _ if *parts > 1 => format!("* sent to {} in {parts} parts", names.join(", ")),
                    _ => format!("* sent to {}", names.join(", ")),
                }
            }
            Event::Progress {
                sending,
                name,
                done,
                total,
            } => {
                let verb = if *sending { "sending" } else { "receiving" };
                let pct = (*done * 100).checked_div(*total).unwrap_or(100);
                format!("{verb} {name}: {done}/{total} bytes ({pct}%)")
            }
            Event::FileReceived {
                name, path, size, ..
            } => format!("* received file from {name}: {path} ({size} bytes, SHA-256 checked)"),
            Event::Closed => "* disconnected".to_string(),
        }
    }

    /// One JSON object (for `--json`).
    pub fn json(&self) -> Value {
        match self {
            Event::Connected {
                user_id,
                name,
                server_id,
                online,
            } => json!({"event": "connected", "user_id": user_id, "name": name,
                        "server_id": server_id, "online": online}),
            Event::Online {
                user_id,
                name,
                server_id,
            } => {
                json!({"event": "online", "user_id": user_id, "name": name, "server_id": server_id})
            }
            Event::Offline { user_id, name } => {
                json!({"event": "offline", "user_id": user_id, "name": name})
            }
            Event::Message {
                public,
                from,
                name,
                text,
                ts,
                problem,
            } => json!({"event": if *public {"all"} else {"dm"}, "from": from, "name": name,
                        "text": text, "ts": ts, "authentic": problem.is_none(),
                        "problem": problem}),
            Event::List { users } => json!({"event": "list", "users": users.iter()
                .map(|(id, name, server)| json!({"user_id": id, "name": name, "server_id": server}))
                .collect::<Vec<_>>()}),
            Event::ServerError { code, detail } => {
                json!({"event": "error", "code": code, "detail": detail})
            }
            Event::Warning { code, detail } => {
                json!({"event": "warning", "code": code, "detail": detail})
            }
            Event::Notice(n) => json!({"event": "notice", "detail": n}),
            Event::Help(text) => json!({"event": "help", "text": text}),
            Event::Sent {
                command,
                to,
                parts,
                file,
            } => {
                let mut v = json!({"event": "sent", "command": command,
                    "to": to.iter().map(|(id, _)| id).collect::<Vec<_>>(),
                    "names": to.iter().map(|(_, name)| name).collect::<Vec<_>>(),
                    "copies": to.len(), "parts": parts});
                if let Some((name, size)) = file {
                    v["file"] = json!(name);
                    v["size"] = json!(size);
                }
                v
            }
            Event::Progress {
                sending,
                name,
                done,
                total,
            } => json!({"event": "progress", "direction": if *sending {"send"} else {"receive"},
                        "name": name, "done": done, "total": total}),
            Event::FileReceived {
                from,
                name,
                path,
                size,
            } => json!({"event": "file", "from": from, "name": name, "path": path, "size": size}),
            Event::Closed => json!({"event": "closed"}),
        }
    }

    /// Whether this says a command of ours failed: an `ERROR` from the server (it answers
    /// something we sent) or a local warning of the failure kind ([`warning::is_failure`]).
    pub fn is_failure(&self) -> bool {
        match self {
            Event::ServerError { .. } => true,
            Event::Warning { code, .. } => warning::is_failure(code),
            _ => false,
        }
    }
}

/// What a typed line asks for.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Frames to send (possibly none) and events to show.
    Continue,
    Quit,
}

/// The client's protocol state. Feed it lines and frames; collect frames to send and events.
pub struct Session {
    pub me: Identity,
    url: String,
    pins: Pins,
    /// Users' keys, pinned on first sight (§7).
    user_pins: Pins,
    /// Other servers' keys, as our server vouches for them in `LIST_RESPONSE.servers` (§5.6).
    vouched: BTreeMap<String, Arc<PublicKey>>,
    /// Users whose key differs from their pin: user id → the new key (encoded). Nothing is
    /// sent to them, and nothing from them is authentic, until the person says `/trust`.
    changed_keys: BTreeMap<String, String>,
    server: Option<(String, Arc<PublicKey>)>,
    authenticated: bool,
    /// The directory snapshot that follows the hello has arrived: names can be resolved.
    ready: bool,
    pub(crate) directory: BTreeMap<String, Peer>,
    lists_requested: u32,
    /// Frames to send, in order.
    pub outbox: Vec<String>,
    /// Events to show, in order.
    pub events: Vec<Event>,
    /// Files in flight (`files`).
    pub(crate) files: files::Files,
    /// Where received files are saved.
    pub downloads: std::path::PathBuf,
    /// Largest file sent or accepted, in bytes.
    pub max_file_size: u64,
}

const HELP: &str = "\
commands:
  /list                  who is online, and where
  /tell <name|id> <text> a private message
  /all <text>            a message to everyone online
  /file <name|id> <path> send a file
  /trust <name|id>       accept a user's changed key (after checking it with them)
  /help                  this help
  /quit                  leave";

impl Session {
    pub fn new(me: Identity, url: &str, pins: Pins) -> Session {
        Session {
            me,
            url: url.to_string(),
            user_pins: pins.sibling("user-pins.json"),
            pins,
            changed_keys: BTreeMap::new(),
            vouched: BTreeMap::new(),
            server: None,
            authenticated: false,
            ready: false,
            directory: BTreeMap::new(),
            lists_requested: 0,
            outbox: Vec::new(),
            events: Vec::new(),
            files: Default::default(),
            downloads: std::path::PathBuf::from("downloads"),
            max_file_size: 64 << 20,
        }
    }

    /// Where the server's key is pinned (PROTOCOL.md §5.2): its URL, with `wss://` written
    /// `ws://`, so that a server moving to TLS on the same host and port keeps its pin. TLS
    /// checks the certificate in addition to the pin, never instead of it.
    fn pin_key(&self) -> String {
        match self.url.strip_prefix("wss://") {
            Some(rest) => format!("ws://{rest}"),
            None => self.url.clone(),
        }
    }

    /// Whether a request is still waiting for its answer (`/list`): at the end of piped input
    /// the client waits for these before leaving, so `echo /list | socp …` prints the list.
    pub fn awaiting_replies(&self) -> bool {
        self.lists_requested > 0 || self.sending_files()
    }

    /// The hello is complete and the directory snapshot has arrived (§7): commands typed
    /// before this should wait.
    pub fn ready(&self) -> bool {
        self.ready
    }

    pub fn help() -> &'static str {
        HELP
    }

    /// The opening frame (§5.2 step 1).
    pub fn hello(&mut self, now_ms: i64) {
        let pubkey = self.me.key.public_key().encoded().to_string();
        let payload = json!({
            "client": concat!("socp/", env!("CARGO_PKG_VERSION")),
            "pubkey": pubkey,
            "enc_pubkey": pubkey,
            "meta": {"display_name": self.me.display_name},
            // §5.6: frames other servers signed may reach us unchanged.
            "caps": [wire::CAP_PEER_SIG],
        });
        self.push_frame(types::USER_HELLO, "", now_ms, &payload, false);
    }

    pub(crate) fn push_frame(
        &mut self,
        kind: &str,
        to: &str,
        ts: i64,
        payload: &Value,
        sign: bool,
    ) {
        let signed = if sign {
            SignedPayload::sign(payload, &self.me.key)
        } else {
            SignedPayload::unsigned(payload)
        }
        .expect("client payloads hold no floats");
        let from = self.me.user_id.clone();
        self.outbox
            .push(wire::encode_frame(kind, &from, to, ts, &signed));
    }

    /// Handles one typed line. Lines before the hello completes must be queued by the caller.
    pub fn command(&mut self, line: &str, now_ms: i64) -> Outcome {
        let line = line.trim_end_matches(['\r', '\n']);
        let (cmd, rest) = match line.split_once(' ') {
            Some((c, r)) => (c, r.trim_start()),
            None => (line, ""),
        };
        match cmd {
            "" => {}
            "/quit" => {
                let server = self.server_id();
                self.push_frame(types::CTRL_CLOSE, &server, now_ms, &json!({}), false);
                return Outcome::Quit;
            }
            "/help" => self.events.push(Event::Help(HELP)),
            "/list" => {
                self.lists_requested += 1;
                let server = self.server_id();
                self.push_frame(types::LIST_REQUEST, &server, now_ms, &json!({}), false);
            }
            "/tell" => match rest.split_once(' ') {
                Some((who, text)) if !text.is_empty() => {
                    if let Some(id) = self.resolve_or_warn(who) {
                        self.send_texts("tell", &[id], text, now_ms);
                    }
                }
                _ => self.warn(warning::USAGE, "usage: /tell <name|id> <text>"),
            },
            "/trust" => {
                if let Some(id) = self.resolve_or_warn(rest.trim()) {
                    self.trust(&id);
                }
            }
            "/file" => match rest.split_once(' ') {
                Some((who, path)) if !path.trim().is_empty() => {
                    self.start_file(who, path.trim(), now_ms)
                }
                _ => self.warn(warning::USAGE, "usage: /file <name|id> <path>"),
            },
            "/all" => {
                if rest.is_empty() {
                    self.warn(warning::USAGE, "usage: /all <text>");
                } else {
                    let members: Vec<String> = self
                        .directory
                        .keys()
                        .filter(|id| **id != self.me.user_id)
                        .cloned()
                        .collect();
                    if members.is_empty() {
                        self.warn(
                            warning::NO_RECIPIENTS,
                            "no other member of the public channel is online",
                        );
                    } else {
                        self.send_texts("all", &members, rest, now_ms);
                    }
                }
            }
            other if other.starts_with('/') => self.warn(
                warning::UNKNOWN_COMMAND,
                &format!("unknown command {other}; try /help"),
            ),
            _ => self.warn(
                warning::NOT_A_COMMAND,
                "to send a message, use /tell <name> <text> or /all <text>",
            ),
        }
        Outcome::Continue
    }

    /// `/trust`: pins the key the directory now has for `user_id` in place of the old pin.
    fn trust(&mut self, user_id: &str) {
        let name = self.name_of(user_id);
        match self.changed_keys.remove(user_id) {
            Some(key) => {
                self.user_pins.replace(user_id, &key);
                self.events.push(Event::Notice(format!(
                    "the new key of {name} ({user_id}) is now trusted"
                )));
            }
            None => self.events.push(Event::Notice(format!(
                "the key of {name} ({user_id}) has not changed; nothing to trust"
            ))),
        }
    }

    /// Why nothing may be sent to or accepted from `user_id`: its key differs from the one
    /// pinned for it and the person has not accepted the new one (§7).
    pub(crate) fn key_problem(&self, user_id: &str) -> Option<String> {
        self.changed_keys.contains_key(user_id).then(|| {
            let name = self.name_of(user_id);
            format!("the key of {name} changed and is not trusted; check it, then /trust {name}")
        })
    }

    pub(crate) fn warn(&mut self, code: &'static str, text: &str) {
        self.events.push(Event::Warning {
            code,
            detail: text.to_string(),
        });
    }

    /// [`Session::resolve`], or a warning saying why not (`NO_SUCH_USER`, `AMBIGUOUS_NAME`).
    pub(crate) fn resolve_or_warn(&mut self, who: &str) -> Option<String> {
        match self.resolve(who) {
            Ok(id) => Some(id),
            Err(e) => {
                let code = if self
                    .directory
                    .values()
                    .any(|p| p.name.as_deref() == Some(who))
                {
                    warning::AMBIGUOUS_NAME
                } else {
                    warning::NO_SUCH_USER
                };
                self.warn(code, &e);
                None
            }
        }
    }

    /// `text` to each of `to` ([`Session::send_text`]), then one `Sent` event naming those it
    /// went to.
    fn send_texts(&mut self, command: &'static str, to: &[String], text: &str, now_ms: i64) {
        let parts = split_utf8(text, crypto::MAX_PLAINTEXT).len();
        let mut sent = Vec::new();
        for id in to {
            let before = self.outbox.len();
            self.send_text(id, text, now_ms, command == "all");
            // send_text queues one frame per part, or warns and stops: a recipient counts as
            // sent to only when every part was queued.
            if self.outbox.len() - before == parts {
                sent.push((id.clone(), self.name_of(id)));
            }
        }
        if !sent.is_empty() {
            self.events.push(Event::Sent {
                command,
                to: sent,
                parts,
                file: None,
            });
        }
    }

    fn server_id(&self) -> String {
        self.server
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_default()
    }

    /// A name or id to a user id (§2: refuse an ambiguous name, listing the candidates).
    pub fn resolve(&self, who: &str) -> Result<String, String> {
        if self.directory.contains_key(who) {
            return Ok(who.to_string());
        }
        let matches: Vec<&String> = self
            .directory
            .iter()
            .filter(|(_, p)| p.name.as_deref() == Some(who))
            .map(|(id, _)| id)
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!("no user {who} is online")),
            many => Err(format!(
                "{who} is ambiguous; use one of the ids: {}",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Encrypts `text` for `to` (split into 446-byte pieces) and queues the frames.
    fn send_text(&mut self, to: &str, text: &str, now_ms: i64, public: bool) {
        let Some(peer) = self.directory.get(to).cloned() else {
            return self.warn(warning::NO_SUCH_USER, &format!("no user {to} is online"));
        };
        if let Some(problem) = self.key_problem(to) {
            return self.warn(warning::KEY_NOT_TRUSTED, &format!("not sent: {problem}"));
        }
        for (i, piece) in split_utf8(text, crypto::MAX_PLAINTEXT)
            .into_iter()
            .enumerate()
        {
            // Distinct ts per piece keeps each frame distinct for duplicate suppression (§6).
            let ts = now_ms + i as i64;
            let ct = match peer.key.encrypt(piece.as_bytes()) {
                Ok(ct) => ct,
                Err(e) => {
                    return self.warn(
                        warning::ENCRYPT_FAILED,
                        &format!("cannot encrypt for {to}: {e}"),
                    );
                }
            };
            let ciphertext = crate::wire::b64::encode(&ct);
            let sig_to = if public { None } else { Some(to) };
            let content_sig =
                crypto::make_content_sig(&self.me.key, &ct, &self.me.user_id, sig_to, ts);
            let payload = json!({
                "ciphertext": ciphertext,
                "sender_pub": self.me.key.public_key().encoded(),
                "content_sig": content_sig,
            });
            let kind = if public {
                types::MSG_PUBLIC_CHANNEL
            } else {
                types::MSG_DIRECT
            };
            self.push_frame(kind, to, ts, &payload, false);
        }
    }

    /// Handles one frame from the server.
    pub fn on_frame(&mut self, text: &str, now_ms: i64) {
        let env = match Envelope::parse(text) {
            Ok(env) => env,
            Err(e) => {
                return self.warn(
                    warning::BAD_FRAME,
                    &format!("unreadable frame from the server: {e}"),
                );
            }
        };
        if env.kind == types::AUTH_CHALLENGE {
            return self.on_challenge(&env, now_ms);
        }
        let Some((_, server_key)) = &self.server else {
            if env.kind == types::ERROR {
                // The server refused our hello before showing its key: the pin, if any, checks
                // it; otherwise it is shown as unverified (it can only end this session).
                let verified = self.pins.get(&self.pin_key()).is_some_and(|pin| {
                    PublicKey::parse(pin).is_ok_and(|key| {
                        matches!(
                            wire::verify_payload_sig(&key, &env.payload, &env.sig),
                            Ok(true)
                        )
                    })
                });
                let f = env.fields();
                let detail = f.str("detail").unwrap_or("");
                return self.events.push(Event::ServerError {
                    code: f.str("code").unwrap_or("ERROR").to_string(),
                    detail: if verified {
                        detail.to_string()
                    } else {
                        format!("{detail} (unverified: sent before the server's key)")
                    },
                });
            }
            return self.warn(
                warning::BAD_FRAME,
                &format!("{} before AUTH_CHALLENGE; ignored", env.kind),
            );
        };
        // §5.6: a frame our server forwarded unchanged is signed by the server it names, whose
        // key our server vouched for; only the kinds a server forwards may come that way.
        let (server_id, server_key) = (&self.server.as_ref().expect("checked above").0, server_key);
        let key = if env.from == *server_id {
            Some(server_key)
        } else if FORWARDED_UNCHANGED.contains(&env.kind.as_str()) {
            self.vouched.get(&env.from)
        } else {
            None
        };
        let Some(key) = key else {
            return self.warn(
                warning::BAD_SERVER_SIG,
                &format!(
                    "{} signed by server {}, which your server did not vouch for; refused",
                    env.kind, env.from
                ),
            );
        };
        match wire::verify_payload_sig(key, &env.payload, &env.sig) {
            Ok(true) => {}
            _ => {
                return self.warn(
                    warning::BAD_SERVER_SIG,
                    &format!(
                        "{} from {} has a bad server signature; ignored",
                        env.kind, env.from
                    ),
                );
            }
        }
        if env.from != self.server_id()
            && let Err(why) = self.forwarded_claims(&env)
        {
            return self.warn(
                warning::BAD_FRAME,
                &format!("{} signed by server {}: {why}; refused", env.kind, env.from),
            );
        }
        match env.kind.as_str() {
            types::USER_HELLO_ACK => {
                self.authenticated = true;
            }
            types::LIST_RESPONSE => self.on_list(&env),
            types::PUBLIC_CHANNEL_SNAPSHOT => {}
            types::USER_ADVERTISE => self.on_advertise(&env.payload),
            types::USER_REMOVE => {
                let f = env.fields();
                if let (Ok(id), Ok(server)) = (f.str("user_id"), f.str("server_id"))
                    && self
                        .directory
                        .get(id)
                        .is_some_and(|p| p.server_id == server)
                {
                    let peer = self.directory.remove(id).expect("checked");
                    self.events.push(Event::Offline {
                        user_id: id.to_string(),
                        name: peer.name.unwrap_or_else(|| id.to_string()),
                    });
                }
            }
            types::USER_DELIVER => self.on_message(&env, false, now_ms),
            types::MSG_PUBLIC_CHANNEL => self.on_message(&env, true, now_ms),
            types::ERROR => {
                let f = env.fields();
                let detail = f.str("detail").unwrap_or("").to_string();
                self.events.push(Event::ServerError {
                    code: f.str("code").unwrap_or("ERROR").to_string(),
                    detail: detail.clone(),
                });
                self.on_file_error(&detail);
            }
            types::FILE_START | types::FILE_CHUNK | types::FILE_END => {
                self.on_file_frame(&env, now_ms)
            }
            types::ACK => {
                if let Ok(msg_ref) = env.fields().str("msg_ref") {
                    self.on_file_ack(msg_ref, now_ms);
                }
            }
            types::HEARTBEAT => {}
            other => self.warn(
                warning::BAD_FRAME,
                &format!("ignoring unexpected {other} from the server"),
            ),
        }
    }

    fn on_challenge(&mut self, env: &Envelope, now_ms: i64) {
        let f = env.fields();
        let (Ok(nonce), Ok(server_id), Ok(server_pub)) =
            (f.str("nonce"), f.str("server_id"), f.str("server_pubkey"))
        else {
            return self.warn(warning::BAD_FRAME, "malformed AUTH_CHALLENGE");
        };
        let key = match PublicKey::parse(server_pub) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                return self.warn(
                    warning::BAD_SERVER_KEY,
                    &format!("server key rejected: {e}"),
                );
            }
        };
        if !matches!(
            wire::verify_payload_sig(&key, &env.payload, &env.sig),
            Ok(true)
        ) {
            return self.warn(
                warning::BAD_SERVER_SIG,
                "AUTH_CHALLENGE signature does not verify; not answering",
            );
        }
        if let Some(old) = self.pins.check(&self.pin_key(), key.encoded()) {
            self.warn(
                warning::SERVER_KEY_CHANGED,
                &format!(
                    "the key of server {} CHANGED since last time (was {}..., now {}...). \
                 If the operator did not rotate it, someone may be impersonating the server. \
                 To accept the new key, remove its entry from the pins file.",
                    self.url,
                    &old.chars().take(24).collect::<String>(),
                    &key.encoded()[..24]
                ),
            );
        }
        let server_id = server_id.to_string();
        let payload = json!({"nonce": nonce, "server_id": server_id, "user_id": self.me.user_id});
        self.server = Some((server_id.clone(), key));
        self.push_frame(types::AUTH_RESPONSE, &server_id, now_ms, &payload, true);
    }

    fn on_list(&mut self, env: &Envelope) {
        let Some(Value::Array(users)) = env.payload.get("users") else {
            return self.warn(warning::BAD_FRAME, "LIST_RESPONSE without users");
        };
        // §5.6: the servers whose signatures our server vouches for (the list replaces the
        // last one; a key already known is not parsed again).
        if let Some(Value::Array(servers)) = env.payload.get("servers") {
            let mut vouched = BTreeMap::new();
            for s in servers.iter().filter_map(Value::as_object) {
                let f = wire::Fields(s);
                let (Ok(id), Ok(key)) = (f.id("server_id"), f.str("pubkey")) else {
                    continue;
                };
                let parsed = match self.vouched.get(id).filter(|k| k.encoded() == key) {
                    Some(known) => Ok(Arc::clone(known)),
                    None => PublicKey::parse(key).map(Arc::new),
                };
                match parsed {
                    Ok(k) => {
                        vouched.insert(id.to_string(), k);
                    }
                    Err(e) => self.warn(
                        warning::BAD_SERVER_KEY,
                        &format!("the key of server {id} is unusable: {e}"),
                    ),
                }
            }
            self.vouched = vouched;
        }
        self.directory.clear();
        for user in users {
            if let Some(map) = user.as_object() {
                self.learn(map);
            }
        }
        if self.lists_requested > 0 {
            self.lists_requested -= 1;
            let users = self
                .directory
                .iter()
                .map(|(id, p)| (id.clone(), self.name_of(id), p.server_id.clone()))
                .collect();
            self.events.push(Event::List { users });
        } else if self.authenticated && !self.ready {
            // The snapshot that follows the hello (§7).
            self.ready = true;
            self.events.push(Event::Connected {
                user_id: self.me.user_id.clone(),
                name: self.me.display_name.clone(),
                server_id: self.server_id(),
                online: self.directory.len(),
            });
        }
    }

    fn on_advertise(&mut self, payload: &Map<String, Value>) {
        if let Some(id) = self.learn(payload)
            && id != self.me.user_id
        {
            let server_id = self.directory[&id].server_id.clone();
            self.events.push(Event::Online {
                name: self.name_of(&id),
                user_id: id,
                server_id,
            });
        }
    }

    /// Records a directory entry `{user_id, server_id, pubkey, meta}`; `pubkey` may also sit in
    /// `meta` (§7 *Accept*). Returns the user id when the entry was valid.
    fn learn(&mut self, entry: &Map<String, Value>) -> Option<String> {
        let f = wire::Fields(entry);
        let id = f.id("user_id").ok()?;
        let server_id = f.str("server_id").ok()?;
        let meta = entry.get("meta").and_then(Value::as_object);
        let key_text = f
            .str("pubkey")
            .ok()
            .or_else(|| meta.and_then(|m| m.get("pubkey")).and_then(Value::as_str))?;
        // Usually the key we already hold, in the same (canonical) encoding: skip the parse.
        let known = self
            .directory
            .get(id)
            .filter(|p| p.key.encoded() == key_text)
            .map(|p| Arc::clone(&p.key));
        let key = match known
            .map(Ok)
            .unwrap_or_else(|| PublicKey::parse(key_text).map(Arc::new))
        {
            Ok(k) => k,
            Err(e) => {
                self.warn(warning::BAD_USER_KEY, &format!("ignoring user {id}: {e}"));
                return None;
            }
        };
        let name = meta
            .and_then(|m| m.get("display_name"))
            .and_then(Value::as_str)
            .filter(|n| crate::wire::ids::is_valid_display_name(n))
            .map(str::to_string);
        // §7: a user's key is pinned on first sight and never replaced silently.
        let changed = if id == self.me.user_id {
            None
        } else {
            self.user_pins.check(id, key.encoded())
        };
        if changed.is_none() {
            self.changed_keys.remove(id); // back to the pinned key
        }
        if let Some(old) = changed
            && self.changed_keys.get(id).map(String::as_str) != Some(key.encoded())
        {
            self.changed_keys
                .insert(id.to_string(), key.encoded().to_string());
            let shown = name.clone().unwrap_or_else(|| id.to_string());
            self.warn(
                warning::USER_KEY_CHANGED,
                &format!(
                    "THE KEY OF {shown} ({id}) HAS CHANGED (was {}..., now {}...). Someone may be \
                 impersonating {shown}. Nothing will be sent to {shown}, and nothing from \
                 {shown} shown as authentic, until you check the new key with them and type \
                 /trust {shown}",
                    old.chars().take(24).collect::<String>(),
                    key.encoded().chars().take(24).collect::<String>(),
                ),
            );
        }
        self.directory.insert(
            id.to_string(),
            Peer {
                server_id: server_id.to_string(),
                name,
                key,
            },
        );
        Some(id.to_string())
    }

    pub(crate) fn name_of(&self, id: &str) -> String {
        self.directory
            .get(id)
            .and_then(|p| p.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    /// §5.6: a frame another server signed claims only what that server may (§6): presence for
    /// users it hosts, deliveries from users it hosts and for us. (Our own server checked the
    /// same before forwarding it; this holds even if a frame it never forwarded is injected.)
    fn forwarded_claims(&self, env: &Envelope) -> Result<(), &'static str> {
        let f = env.fields();
        match env.kind.as_str() {
            types::USER_ADVERTISE | types::USER_REMOVE => {
                if f.str("server_id").ok() != Some(env.from.as_str()) {
                    return Err("presence for a user another server hosts");
                }
            }
            _ => {
                if f.str("user_id").ok() != Some(self.me.user_id.as_str()) {
                    return Err("addressed to another user");
                }
                let host = f
                    .str("sender")
                    .ok()
                    .and_then(|s| self.directory.get(s))
                    .map(|p| p.server_id.as_str());
                if host != Some(env.from.as_str()) {
                    return Err("from a sender that server does not host");
                }
            }
        }
        Ok(())
    }

    fn on_message(&mut self, env: &Envelope, public: bool, now_ms: i64) {
        let f = env.fields();
        let (Ok(ciphertext), Ok(sender), Ok(content_sig), Ok(ts)) = (
            f.str("ciphertext"),
            f.str("sender"),
            f.str("content_sig"),
            f.i64("ts"),
        ) else {
            return self.warn(
                warning::BAD_FRAME,
                &format!("malformed {} from the server", env.kind),
            );
        };
        let text = match crate::wire::b64::decode(ciphertext).map(|ct| self.me.key.decrypt(&ct)) {
            Some(Ok(plain)) => String::from_utf8_lossy(&plain).into_owned(),
            _ => {
                return self.warn(
                    warning::UNDECRYPTABLE,
                    &format!("a message from {sender} could not be decrypted"),
                );
            }
        };
        let problem = match self.directory.get(sender) {
            None => Some("sender is not in the directory".to_string()),
            Some(peer) => {
                let to = if public {
                    None
                } else {
                    Some(self.me.user_id.as_str())
                };
                let sender_pub_matches = f.str("sender_pub").is_ok_and(|k| {
                    k == peer.key.encoded() || PublicKey::parse(k).is_ok_and(|k| k == *peer.key)
                });
                if let Some(problem) = self.key_problem(sender) {
                    Some(problem)
                } else if ts.abs_diff(now_ms) > MAX_MESSAGE_AGE_MS {
                    // Messages are delivered live; a ts this far off could also be a field
                    // shifted between `to` and `ts` in the separator-less content_sig forms.
                    Some("its time is more than a day away from this clock".to_string())
                } else if !crypto::verify_content_sig(
                    &peer.key,
                    content_sig,
                    ciphertext,
                    sender,
                    to,
                    ts,
                ) {
                    Some("content signature does not verify".to_string())
                } else if !sender_pub_matches {
                    Some("sender_pub differs from the directory's key".to_string())
                } else {
                    None
                }
            }
        };
        self.events.push(Event::Message {
            public,
            from: sender.to_string(),
            name: self.name_of(sender),
            text,
            ts,
            problem,
        });
    }
}

/// How far a message's `ts` may be from our clock and still be authentic (ms).
const MAX_MESSAGE_AGE_MS: u64 = 24 * 3600 * 1000;

/// The frames a server forwards to us unchanged, signed by the server they came from (§5.6).
const FORWARDED_UNCHANGED: &[&str] = &[
    types::USER_DELIVER,
    types::MSG_PUBLIC_CHANNEL,
    types::FILE_START,
    types::FILE_CHUNK,
    types::FILE_END,
    types::USER_ADVERTISE,
    types::USER_REMOVE,
];

/// Splits `text` into pieces of at most `max` bytes, at character boundaries.
pub fn split_utf8(text: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    pieces.push(rest);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_char_boundaries() {
        assert_eq!(split_utf8("abc", 446), vec!["abc"]);
        let long = "é".repeat(300); // 600 bytes
        let parts = split_utf8(&long, 446);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 446);
        assert_eq!(parts.concat(), long);
        let ascii = "a".repeat(447);
        assert_eq!(
            split_utf8(&ascii, 446)
                .iter()
                .map(|p| p.len())
                .collect::<Vec<_>>(),
            vec![446, 1]
        );
    }
}
