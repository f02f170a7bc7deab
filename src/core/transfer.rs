//! File transfers through this server (PROTOCOL.md §9), part of the sans-IO core.
//!
//! File frames are routed like DMs (§6). For transfers whose sender is connected here the server
//! enforces the limits of issue 4: the declared size, transfers per user, chunks in order and no
//! more than the size allows, and an idle timeout. The sender is told (`ERROR`) when its transfer
//! is refused, times out, or its recipient leaves.
//!
//! Pacing: every [`ACK_EVERY`]th chunk is acknowledged with
//! `ACK {msg_ref: "<file_id>:<index>"}` once routed, and the client keeps at most [`WINDOW`]
//! chunks beyond the last acknowledgement, so a file moves at the pace the server forwards it
//! instead of piling up in socket buffers. What the server queues toward a recipient that reads
//! slowly is bounded by the per-connection write-buffer cap.
//!
//! [`Transfers`] owns the transfers under way, with private fields; the `impl Server` methods
//! here are glue that calls its methods, sends the errors and arms the sweep.

use crate::core::server::{ConnId, Server, Time, Timer};
use crate::core::signer::Urgency;
use crate::wire::user::{FileFrame, FilePart};
use crate::wire::{ErrorCode, WireError, types};
use log::info;
use serde_json::json;
use std::collections::HashMap;

/// Chunks between acknowledgements.
pub const ACK_EVERY: i64 = 16;
/// Chunks a sender may send beyond the last acknowledged one.
pub const WINDOW: i64 = 64;

/// Limits on transfers (a subset of [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct TransferLimits {
    /// Largest file, in bytes. Default 64 MiB.
    pub max_file_size: i64,
    /// Transfers one user may have under way at once. Default 4.
    pub max_per_user: usize,
    /// A transfer with no frame for this long is aborted. Default 60 000 ms.
    pub idle_ms: u64,
}

impl Default for TransferLimits {
    fn default() -> Self {
        TransferLimits {
            max_file_size: 64 << 20,
            max_per_user: 4,
            idle_ms: 60_000,
        }
    }
}

/// One transfer under way from a local sender.
#[derive(Debug)]
struct Transfer {
    to: String,
    conn: ConnId,
    size: i64,
    next_index: i64,
    last_ms: u64,
}

/// Transfers under way, keyed by (sender, file_id). Private state: the `impl Server` glue
/// below calls its methods and does the sending.
#[derive(Debug, Default)]
pub struct Transfers {
    limits: TransferLimits,
    active: HashMap<(String, String), Transfer>,
    sweep_armed: bool,
}

impl Transfers {
    pub fn new(limits: TransferLimits) -> Self {
        Transfers {
            limits,
            ..Transfers::default()
        }
    }

    /// Checks a file frame from local user `sender` (on `conn`) against its transfer, and
    /// records it. `Ok(Some(at))`: a sweep is to be armed at `at` (monotonic ms).
    fn check(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        sender: &str,
        file: &FileFrame<'_>,
    ) -> Result<Option<u64>, WireError> {
        let key = (sender.to_string(), file.file_id.to_string());
        let limits = &self.limits;
        match file.part {
            FilePart::Start { size, .. } => {
                if size > limits.max_file_size {
                    return Err(WireError::field(
                        "size",
                        &format!(
                            "file larger than this server's limit of {} bytes",
                            limits.max_file_size
                        ),
                    ));
                }
                if self.active.contains_key(&key) {
                    return Err(WireError::field(
                        "file_id",
                        "a transfer with this id is under way",
                    ));
                }
                let mine = self.active.keys().filter(|(s, _)| s == sender).count();
                if mine >= limits.max_per_user {
                    return Err(WireError::new(
                        ErrorCode::BadKey,
                        format!("at most {} transfers at once", limits.max_per_user),
                    ));
                }
                self.active.insert(
                    key,
                    Transfer {
                        to: file.to.to_string(),
                        conn,
                        size,
                        next_index: 0,
                        last_ms: now_ms,
                    },
                );
                if self.sweep_armed {
                    return Ok(None);
                }
                self.sweep_armed = true;
                Ok(Some(now_ms + self.limits.idle_ms / 2))
            }
            FilePart::Chunk { .. } | FilePart::End => {
                let Some(t) = self.active.get_mut(&key) else {
                    return Err(WireError::field("file_id", "no FILE_START for this file"));
                };
                if t.to != file.to {
                    return Err(WireError::new(
                        ErrorCode::BadKey,
                        "file frame to another recipient",
                    ));
                }
                t.last_ms = now_ms;
                let FilePart::Chunk { index, .. } = file.part else {
                    self.active.remove(&key);
                    return Ok(None);
                };
                if index != t.next_index {
                    return Err(WireError::field(
                        "index",
                        &format!("expected chunk {}", t.next_index),
                    ));
                }
                // Every chunk carries at least one byte.
                if index >= t.size.max(1) {
                    return Err(WireError::field(
                        "index",
                        "more chunks than the file's size allows",
                    ));
                }
                t.next_index += 1;
                Ok(None)
            }
        }
    }

    /// Forgets transfer `file_id` of `sender`.
    fn abort(&mut self, sender: &str, file_id: &str) {
        self.active
            .remove(&(sender.to_string(), file_id.to_string()));
    }

    /// `user_id` left: its own transfers end, and so do those to it; returns the senders of
    /// the latter (connection, file id), to be told.
    fn user_gone(&mut self, user_id: &str) -> Vec<(ConnId, String)> {
        let mut notify = Vec::new();
        self.active.retain(|(sender, file_id), t| {
            if sender == user_id {
                return false;
            }
            if t.to == user_id {
                notify.push((t.conn, file_id.clone()));
                return false;
            }
            true
        });
        notify
    }

    /// Aborts the transfers idle for `idle_ms` or more: returns their senders (connection,
    /// file id), and when the next sweep is due, if any transfer is left.
    fn sweep(&mut self, now_ms: u64) -> (Vec<(ConnId, String)>, Option<u64>) {
        let idle = self.limits.idle_ms;
        let mut expired = Vec::new();
        self.active.retain(|(_, file_id), t| {
            if now_ms.saturating_sub(t.last_ms) >= idle {
                expired.push((t.conn, file_id.clone()));
                false
            } else {
                true
            }
        });
        self.sweep_armed = !self.active.is_empty();
        (expired, self.sweep_armed.then_some(now_ms + idle / 2))
    }

    /// How long a transfer may stay idle.
    fn idle_ms(&self) -> u64 {
        self.limits.idle_ms
    }
}

impl Server {
    /// Checks a file frame from local user `sender` against its transfer; called before routing.
    pub(crate) fn transfer_check(
        &mut self,
        now: Time,
        conn: ConnId,
        sender: &str,
        file: &FileFrame<'_>,
    ) -> Result<(), WireError> {
        if let Some(at) = self.transfers.check(now.mono_ms, conn, sender, file)? {
            self.out.arm(at, Timer::Transfers);
        }
        Ok(())
    }

    /// After a chunk was routed: acknowledge every [`ACK_EVERY`]th one.
    pub(crate) fn transfer_routed(
        &mut self,
        now: Time,
        conn: ConnId,
        sender: &str,
        file: &FileFrame<'_>,
    ) {
        let FilePart::Chunk { index, .. } = file.part else {
            return;
        };
        let file_id = file.file_id;
        if (index + 1) % ACK_EVERY == 0 {
            let payload = json!({"msg_ref": format!("{file_id}:{index}")});
            self.send_signed(
                now,
                conn,
                types::ACK,
                sender,
                &payload,
                Urgency::Conversation,
            );
        }
    }

    /// A routing failure aborts the transfer the frame belonged to.
    pub(crate) fn transfer_failed(&mut self, sender: &str, file: &FileFrame<'_>) {
        self.transfers.abort(sender, file.file_id);
    }

    /// `user_id` left: its own transfers end, and senders to it are told theirs failed.
    pub(crate) fn transfers_user_gone(&mut self, now: Time, user_id: &str) {
        for (conn, file_id) in self.transfers.user_gone(user_id) {
            info!("transfer {file_id}: recipient {user_id} left");
            let err = WireError::new(
                ErrorCode::UserNotFound,
                format!("recipient {user_id} left; file {file_id} not delivered"),
            );
            self.error(now, conn, &err);
        }
    }

    /// The periodic sweep: transfers idle too long are aborted and their senders told.
    pub(crate) fn on_transfer_sweep(&mut self, now: Time) {
        let idle = self.transfers.idle_ms();
        let (expired, next) = self.transfers.sweep(now.mono_ms);
        for (conn, file_id) in expired {
            info!("transfer {file_id}: idle for {idle} ms, aborted");
            let err = WireError::new(
                ErrorCode::Timeout,
                format!(
                    "file {file_id}: no data for {} s; transfer aborted",
                    idle / 1000
                ),
            );
            self.error(now, conn, &err);
        }
        if let Some(at) = next {
            self.out.arm(at, Timer::Transfers);
        }
    }
}
