//! The client's half of file transfer (PROTOCOL.md §9): `/file`, and saving what arrives.
//!
//! Sending streams the file: it is hashed once, then read one 446-byte piece at a time as the
//! connection takes chunks (at most [`crate::core::transfer::WINDOW`] beyond the server's last
//! `ACK`), so a large file is never held whole in memory.
//!
//! Receiving writes chunks, in order, to a hidden `.part` file in the downloads directory, after
//! checking each chunk's `content_sig` against the sender's directory key. At `FILE_END` the size
//! and SHA-256 must match the manifest; only then is the file published under its sanitised name,
//! never over an existing file. Anything else deletes the partial file and says why.

use crate::client::chunks::{ChunkMaker, InlineMaker, Job, Piece};
use crate::client::{Event, Session, warning};
use crate::core::transfer::WINDOW;
use crate::crypto;
use crate::wire::{Envelope, types};
use aws_lc_rs::digest;
use serde_json::json;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Chunks produced per call of [`Session::pump`], so incoming frames get a turn.
const PUMP_BATCH: usize = 8;
/// Progress is reported at most this often.
const PROGRESS_EVERY_MS: i64 = 1000;
/// A chunk prepared longer ago than this is signed again when sent, with the time then: servers
/// refuse a `ts` more than 5 minutes off (§6), and a chunk may wait for a stalled connection.
const RESIGN_AFTER_MS: i64 = 60_000;

/// A file being sent.
pub(crate) struct Outgoing {
    file_id: String,
    to: String,
    to_name: String,
    name: String,
    size: u64,
    sent: u64,
    next_index: i64,
    acked: i64,
    last_progress_ms: i64,
}

/// A file being received.
pub(crate) struct Incoming {
    from: String,
    from_name: String,
    name: String,
    size: u64,
    sha256: String,
    part: PathBuf,
    file: File,
    hasher: digest::Context,
    written: u64,
    next_index: i64,
    last_progress_ms: i64,
}

/// Files in flight, both ways.
pub(crate) struct Files {
    pub(crate) outgoing: Vec<Outgoing>,
    /// Prepares the chunks of `outgoing` files.
    maker: Box<dyn ChunkMaker>,
    pub(crate) incoming: std::collections::HashMap<(String, String), Incoming>,
    /// Transfers already refused: their remaining frames are dropped without more warnings.
    rejected: std::collections::HashSet<(String, String)>,
}

impl Default for Files {
    fn default() -> Files {
        Files {
            outgoing: Vec::new(),
            maker: Box::new(InlineMaker::default()),
            incoming: Default::default(),
            rejected: Default::default(),
        }
    }
}

/// A safe file name from one a sender chose: its last path component, without control
/// characters or separators, not hidden, at most 128 bytes; `file` when nothing is left.
pub fn sanitize_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut clean: String = base
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|') {
                '_'
            } else {
                c
            }
        })
        .collect();
    clean = clean
        .trim_matches(|c: char| c == '.' || c.is_whitespace())
        .to_string();
    let mut cut = clean.len().min(128);
    while !clean.is_char_boundary(cut) {
        cut -= 1;
    }
    clean.truncate(cut);
    if clean.is_empty() {
        "file".to_string()
    } else {
        clean
    }
}

/// Publishes `part` as `dir/name`, or `name (1)`, `name (2)` … — never over an existing file
/// (a hard link fails when the target exists). Returns the final path.
fn publish(part: &Path, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.to_string(), String::new()),
    };
    for n in 0..1000 {
        let candidate = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{stem} ({n}){ext}"))
        };
        match std::fs::hard_link(part, &candidate) {
            Ok(()) => {
                std::fs::remove_file(part)?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("too many files with that name"))
}

fn sha256_of_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((size, hex(ctx.finish().as_ref())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Session {
    /// `/file <name|id> <path>`: the manifest now, the chunks as [`Session::pump`] is called.
    pub(crate) fn start_file(&mut self, who: &str, path: &str, now_ms: i64) {
        let Some(to) = self.resolve_or_warn(who) else {
            return;
        };
        let Some(peer) = self.directory.get(&to).cloned() else {
            return self.warn(warning::NO_SUCH_USER, &format!("no user {who} is online"));
        };
        if let Some(problem) = self.key_problem(&to) {
            return self.warn(
                warning::KEY_NOT_TRUSTED,
                &format!("file not sent: {problem}"),
            );
        }
        let path = Path::new(path);
        let (size, sha256) = match sha256_of_file(path) {
            Ok(v) => v,
            Err(e) => {
                return self.warn(
                    warning::FILE_UNREADABLE,
                    &format!("cannot read {}: {e}", path.display()),
                );
            }
        };
        if size > self.max_file_size {
            return self.warn(
                warning::FILE_TOO_LARGE,
                &format!(
                    "{} is {size} bytes; the limit is {} bytes",
                    path.display(),
                    self.max_file_size
                ),
            );
        }
        let reader = match File::open(path) {
            Ok(f) => BufReader::with_capacity(64 * 1024, f),
            Err(e) => {
                return self.warn(
                    warning::FILE_UNREADABLE,
                    &format!("cannot read {}: {e}", path.display()),
                );
            }
        };
        let name = sanitize_name(&path.file_name().unwrap_or_default().to_string_lossy());
        let file_id = crate::wire::ids::new_uuid();
        let manifest = json!({"file_id": file_id, "name": name, "size": size,
                              "sha256": sha256, "mode": "dm"});
        self.push_frame(types::FILE_START, &to, now_ms, &manifest, false);
        let to_name = peer.name.clone().unwrap_or_else(|| to.clone());
        self.events.push(Event::Notice(format!(
            "sending {name} ({size} bytes) to {to_name}"
        )));
        self.files.maker.start(Job {
            file_id: file_id.clone(),
            reader: Box::new(reader),
            size,
            from: self.me.user_id.clone(),
            to: to.clone(),
            recipient: peer.key,
            signer: Arc::clone(&self.me.key),
        });
        self.files.maker.allow(&file_id, WINDOW, now_ms);
        self.files.outgoing.push(Outgoing {
            file_id,
            to,
            to_name,
            name,
            size,
            sent: 0,
            next_index: 0,
            acked: 0,
            last_progress_ms: now_ms,
        });
    }

    /// Whether [`Session::pump`] would produce a frame now: a window is open and its next
    /// chunk is prepared.
    pub fn can_pump(&self) -> bool {
        self.files.outgoing.iter().any(|o| {
            o.next_index - o.acked < WINDOW && self.files.maker.ready(&o.file_id, o.next_index)
        })
    }

    /// Whether files are still being sent (the client waits for them before leaving).
    pub fn sending_files(&self) -> bool {
        !self.files.outgoing.is_empty()
    }

    /// Produces the next few chunks of outgoing files, as far as their windows allow and the
    /// chunk maker has them ready, strictly in index order. Call it when the connection has
    /// taken everything written so far. Returns whether it produced any.
    pub fn pump(&mut self, now_ms: i64) -> bool {
        let mut produced = 0;
        let mut i = 0;
        while i < self.files.outgoing.len() && produced < PUMP_BATCH {
            let o = &self.files.outgoing[i];
            if o.next_index - o.acked >= WINDOW {
                i += 1;
                continue;
            }
            let (file_id, index, until) = (o.file_id.clone(), o.next_index, o.acked + WINDOW);
            self.files.maker.allow(&file_id, until, now_ms);
            let Some(piece) = self.files.maker.take(&file_id, index) else {
                i += 1; // not prepared yet: the maker's waker calls us back
                continue;
            };
            let (ct, content_sig, ts, n) = match piece {
                Piece::Chunk {
                    ciphertext,
                    content_sig,
                    ts,
                    len,
                } => (ciphertext, content_sig, ts, len),
                Piece::Unreadable(e) => {
                    let o = self.stop_outgoing(i);
                    self.warn(
                        warning::FILE_UNREADABLE,
                        &format!("file {} to {}: read failed: {e}", o.name, o.to_name),
                    );
                    continue;
                }
                Piece::EncryptFailed(e) => {
                    let o = self.stop_outgoing(i);
                    self.warn(warning::ENCRYPT_FAILED, &format!("file {}: {e}", o.name));
                    continue;
                }
                Piece::End => {
                    let o = self.stop_outgoing(i);
                    let (file_id, to) = (o.file_id.clone(), o.to.clone());
                    self.push_frame(
                        types::FILE_END,
                        &to,
                        now_ms,
                        &json!({"file_id": file_id}),
                        false,
                    );
                    let event = if o.sent == o.size {
                        Event::Sent {
                            command: "file",
                            to: vec![(o.to.clone(), o.to_name.clone())],
                            parts: 1,
                            file: Some((o.name.clone(), o.size)),
                        }
                    } else {
                        Event::Warning {
                            code: warning::FILE_CHANGED,
                            detail: format!(
                                "file {} changed while being sent; {} will reject it",
                                o.name, o.to_name
                            ),
                        }
                    };
                    self.events.push(event);
                    produced += 1;
                    continue;
                }
            };
            let o = &mut self.files.outgoing[i];
            // §3.5: the frame's `ts` is the one the signature covers. A chunk that waited so
            // long that servers would find its `ts` stale is signed again, now.
            let (ts, content_sig) = if now_ms - ts > RESIGN_AFTER_MS {
                let sig = crypto::make_content_sig(
                    &self.me.key,
                    &ct,
                    &self.me.user_id,
                    Some(&o.to),
                    now_ms,
                );
                (now_ms, sig)
            } else {
                (ts, content_sig)
            };
            let payload = json!({"file_id": o.file_id, "index": o.next_index,
                                 "ciphertext": crate::wire::b64::encode(&ct),
                                 "content_sig": content_sig});
            o.next_index += 1;
            o.sent += n as u64;
            let progress = (now_ms - o.last_progress_ms >= PROGRESS_EVERY_MS).then(|| {
                o.last_progress_ms = now_ms;
                Event::Progress {
                    sending: true,
                    name: o.name.clone(),
                    done: o.sent,
                    total: o.size,
                }
            });
            let to = o.to.clone();
            self.push_frame(types::FILE_CHUNK, &to, ts, &payload, false);
            self.events.extend(progress);
            produced += 1;
        }
        produced > 0
    }

    /// Ends outgoing transfer `i` (the chunk maker forgets it).
    fn stop_outgoing(&mut self, i: usize) -> Outgoing {
        let o = self.files.outgoing.remove(i);
        self.files.maker.stop(&o.file_id);
        o
    }

    /// Installs the chunk maker for files sent from now on (`socp` installs a
    /// [`ThreadedMaker`](crate::client::chunks::ThreadedMaker); the default prepares each chunk
    /// when it is sent). Files already being sent are ended with a warning.
    pub fn set_chunk_maker(&mut self, maker: Box<dyn ChunkMaker>) {
        while !self.files.outgoing.is_empty() {
            let o = self.stop_outgoing(0);
            self.warn(
                warning::FILE_FAILED,
                &format!(
                    "file {} to {} stopped: the chunk maker changed",
                    o.name, o.to_name
                ),
            );
        }
        self.files.maker = maker;
    }

    /// `ACK {msg_ref: "<file_id>:<index>"}` opens the sender's window (and the chunk maker may
    /// prepare that much further).
    pub(crate) fn on_file_ack(&mut self, msg_ref: &str, now_ms: i64) {
        let Some((file_id, index)) = msg_ref.rsplit_once(':') else {
            return;
        };
        let Ok(index) = index.parse::<i64>() else {
            return;
        };
        if let Some(o) = self
            .files
            .outgoing
            .iter_mut()
            .find(|o| o.file_id == file_id)
        {
            o.acked = o.acked.max(index + 1);
            self.files.maker.allow(&o.file_id, o.acked + WINDOW, now_ms);
        }
    }

    /// A server error naming one of our outgoing files ends that transfer.
    pub(crate) fn on_file_error(&mut self, detail: &str) {
        if let Some(i) = self
            .files
            .outgoing
            .iter()
            .position(|o| detail.contains(&o.file_id))
        {
            let o = self.stop_outgoing(i);
            self.warn(
                warning::FILE_FAILED,
                &format!("file {} to {} failed: {detail}", o.name, o.to_name),
            );
        }
    }

    /// `FILE_START` / `FILE_CHUNK` / `FILE_END` from the server (already signature-checked).
    pub(crate) fn on_file_frame(&mut self, env: &Envelope, now_ms: i64) {
        let f = env.fields();
        let (Ok(file_id), Ok(sender)) = (f.str("file_id"), f.str("sender")) else {
            return self.warn(
                warning::BAD_FRAME,
                &format!("malformed {} from the server", env.kind),
            );
        };
        let key = (sender.to_string(), file_id.to_string());
        if self.files.rejected.contains(&key) {
            if env.kind == types::FILE_END {
                self.files.rejected.remove(&key);
            }
            return;
        }
        // §7: nothing from a user whose changed key is not trusted, mid-transfer included.
        let result = match self.key_problem(&key.0) {
            Some(problem) => Err(problem),
            None => match env.kind.as_str() {
                types::FILE_START => self.file_start(env, key.clone(), now_ms),
                types::FILE_CHUNK => self.file_chunk(env, &key, now_ms),
                _ => self.file_end(&key),
            },
        };
        if let Err(why) = result {
            let name = match self.files.incoming.remove(&key) {
                Some(inc) => {
                    let _ = std::fs::remove_file(&inc.part);
                    format!("{} from {}", inc.name, inc.from_name)
                }
                None => format!("{file_id} from {}", self.name_of(sender)),
            };
            if env.kind != types::FILE_END && self.files.rejected.len() < 1024 {
                self.files.rejected.insert(key);
            }
            self.warn(
                warning::FILE_REJECTED,
                &format!("file {name} rejected: {why}"),
            );
        }
    }

    fn file_start(
        &mut self,
        env: &Envelope,
        key: (String, String),
        now_ms: i64,
    ) -> Result<(), String> {
        let f = env.fields();
        let size = f.i64("size").map_err(|e| e.to_string())?;
        let sha256 = f
            .str("sha256")
            .map_err(|e| e.to_string())?
            .to_ascii_lowercase();
        let name = sanitize_name(f.str("name").map_err(|e| e.to_string())?);
        if size < 0 || size as u64 > self.max_file_size {
            return Err(format!(
                "{size} bytes is over the limit of {}",
                self.max_file_size
            ));
        }
        if self.files.incoming.contains_key(&key) {
            return Err("a second FILE_START for the same file".into());
        }
        std::fs::create_dir_all(&self.downloads)
            .map_err(|e| format!("cannot create {}: {e}", self.downloads.display()))?;
        let part = self
            .downloads
            .join(format!(".{}.part", sanitize_name(&key.1)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part)
            .map_err(|e| format!("cannot create {}: {e}", part.display()))?;
        let from_name = self.name_of(&key.0);
        self.events.push(Event::Notice(format!(
            "receiving {name} ({size} bytes) from {from_name}"
        )));
        self.files.incoming.insert(
            key.clone(),
            Incoming {
                from: key.0,
                from_name,
                name,
                size: size as u64,
                sha256,
                part,
                file,
                hasher: digest::Context::new(&digest::SHA256),
                written: 0,
                next_index: 0,
                last_progress_ms: now_ms,
            },
        );
        Ok(())
    }

    fn file_chunk(
        &mut self,
        env: &Envelope,
        key: &(String, String),
        now_ms: i64,
    ) -> Result<(), String> {
        let f = env.fields();
        let index = f.i64("index").map_err(|e| e.to_string())?;
        let ciphertext = f.str("ciphertext").map_err(|e| e.to_string())?;
        let content_sig = f.str("content_sig").map_err(|e| e.to_string())?;
        let ts = f.i64("ts").map_err(|e| e.to_string())?;
        let sender_key = self
            .directory
            .get(&key.0)
            .map(|p| Arc::clone(&p.key))
            .ok_or("the sender is not in the directory")?;
        let me = self.me.user_id.clone();
        let plain = {
            let ct = crate::wire::b64::decode(ciphertext).ok_or("chunk is not base64")?;
            self.me
                .key
                .decrypt(&ct)
                .map_err(|_| format!("chunk {index} does not decrypt"))?
        };
        let Some(inc) = self.files.incoming.get_mut(key) else {
            return Err("chunk without FILE_START".into());
        };
        if index != inc.next_index {
            return Err(format!("chunk {} is missing (got {index})", inc.next_index));
        }
        if !crypto::verify_content_sig(
            &sender_key,
            content_sig,
            ciphertext,
            &inc.from,
            Some(&me),
            ts,
        ) {
            return Err(format!("chunk {index} has a bad signature"));
        }
        if inc.written + plain.len() as u64 > inc.size {
            return Err("more data than the manifest's size".into());
        }
        inc.file
            .write_all(&plain)
            .map_err(|e| format!("cannot write {}: {e}", inc.part.display()))?;
        inc.hasher.update(&plain);
        inc.written += plain.len() as u64;
        inc.next_index += 1;
        if now_ms - inc.last_progress_ms >= PROGRESS_EVERY_MS {
            inc.last_progress_ms = now_ms;
            let event = Event::Progress {
                sending: false,
                name: inc.name.clone(),
                done: inc.written,
                total: inc.size,
            };
            self.events.push(event);
        }
        Ok(())
    }

    fn file_end(&mut self, key: &(String, String)) -> Result<(), String> {
        // Checked in place: on failure the caller removes the record and its partial file.
        let Some(inc) = self.files.incoming.get_mut(key) else {
            return Err("FILE_END without FILE_START".into());
        };
        if inc.written != inc.size {
            return Err(format!("got {} of {} bytes", inc.written, inc.size));
        }
        let digest = hex(inc.hasher.clone().finish().as_ref());
        if digest != inc.sha256 {
            return Err("SHA-256 does not match the manifest".into());
        }
        inc.file
            .sync_all()
            .map_err(|e| format!("cannot save: {e}"))?;
        let path = publish(&inc.part, &self.downloads, &inc.name)
            .map_err(|e| format!("cannot save: {e}"))?;
        let inc = self.files.incoming.remove(key).expect("present above");
        self.events.push(Event::FileReceived {
            from: inc.from,
            name: inc.from_name,
            path: path.display().to_string(),
            size: inc.size,
        });
        Ok(())
    }

    /// Deletes partial files and stops preparing chunks (at exit): nothing incomplete is left
    /// looking complete.
    pub fn abandon_files(&mut self) {
        while !self.files.outgoing.is_empty() {
            self.stop_outgoing(0);
        }
        for (_, inc) in self.files.incoming.drain() {
            let _ = std::fs::remove_file(&inc.part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(sanitize_name(".."), "file");
        assert_eq!(sanitize_name(".bashrc"), "bashrc");
        assert_eq!(sanitize_name("a\nb\u{7}c"), "a_b_c");
        assert_eq!(sanitize_name("report: final?.pdf"), "report_ final_.pdf");
        assert_eq!(sanitize_name(""), "file");
        assert!(sanitize_name(&"é".repeat(200)).len() <= 128);
    }

    #[test]
    fn publishing_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("socp-publish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.txt"), b"old").unwrap();
        let part = dir.join(".x.part");
        std::fs::write(&part, b"new").unwrap();
        let out = publish(&part, &dir, "a.txt").unwrap();
        assert_eq!(out, dir.join("a (1).txt"));
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"old");
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert!(!part.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
