//! Scenario f, one file across servers (PROTOCOL.md §9): a sender on server 1 sends a file of
//! `--file-size` bytes to a receiver on server 2, paced by the server's `ACK`s like the real
//! client (at most [`WINDOW`] chunks beyond the last acknowledged one).
//!
//! Every chunk is encrypted (RSA-OAEP under the receiver's key) and given its `content_sig`
//! **before** the clock starts, on all CPUs, as the DM scenario does: the timed window holds the
//! servers' work (verify, re-sign or forward, route, acknowledge) and the clients' socket I/O,
//! not the sender's own encryption and signature nor the receiver's decryption. A transfer is
//! closed-loop by protocol (the window), so there is no schedule to lag behind: the figure is a
//! throughput, from the `FILE_START` written to the `FILE_END` read.
//!
//! After the clock stops, **every** chunk is checked, on all CPUs: the delivering server's
//! `sig`, decryption with the receiver's key, the sender's `content_sig`, the indices in order,
//! and the SHA-256 of the reassembled file against the manifest's.

use crate::common::{Mesh, Meter, Outcome, Trouble, all_ready};
use crate::fleet::{Note, wall_ms};
use crate::stats::round3;
use serde_json::{Value, json};
use socp::core::transfer::WINDOW;
use socp::crypto;
use socp::wire::{self, Envelope, SignedPayload, types};
use std::time::{Duration, Instant};
use tungstenite::Utf8Bytes;

/// Largest plaintext per chunk (§9).
const CHUNK: usize = 446;

/// `size` deterministic pseudo-random bytes.
fn data(size: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..size)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// Runs `f` over `0..n` on every CPU, results in order.
fn parallel<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| {
                let f = &f;
                scope.spawn(move || (start..(start + per).min(n)).map(f).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a worker thread"))
            .collect()
    })
}

pub fn run(m: &mut Mesh) -> Result<Outcome, String> {
    all_ready(&m.fleet, &m.steady)?;
    let fleet = &m.fleet;
    let sender = m.steady[0];
    let receiver = m
        .steady
        .iter()
        .copied()
        .find(|&c| fleet.clients[c].server != fleet.clients[sender].server)
        .ok_or("the file scenario needs clients on two servers (--servers 2 or more)")?;
    let size = m.opts.file_size;
    let bytes = data(size);
    let sha256 = crypto::sha256_hex(&bytes);
    let (sid, rid) = (
        fleet.clients[sender].user_id.clone(),
        fleet.clients[receiver].user_id.clone(),
    );
    let skey = std::sync::Arc::clone(fleet.key_of(sender));
    let rpub = std::sync::Arc::clone(fleet.key_of(receiver).public_key());
    let file_id = wire::ids::new_uuid();
    let ts = wall_ms();
    let frame = |kind: &str, payload: &Value| {
        let signed = SignedPayload::unsigned(payload).expect("strings and numbers");
        wire::encode_frame(kind, &sid, &rid, ts, &signed)
    };
    let n_chunks = size.div_ceil(CHUNK);

    let pre_started = Instant::now();
    let mut chunks: Vec<String> = parallel(n_chunks, |i| {
        let piece = &bytes[i * CHUNK..((i + 1) * CHUNK).min(size)];
        let ct = rpub.encrypt(piece).expect("OAEP of at most 446 bytes");
        let content_sig = crypto::make_content_sig(&skey, &ct, &sid, Some(&rid), ts);
        frame(
            types::FILE_CHUNK,
            &json!({"file_id": file_id, "index": i, "ciphertext": wire::b64::encode(&ct),
                    "content_sig": content_sig}),
        )
    });
    let precompute_s = pre_started.elapsed().as_secs_f64();
    let start = frame(
        types::FILE_START,
        &json!({"file_id": file_id, "name": "socp-bench.bin", "size": size,
                "sha256": sha256, "mode": "dm"}),
    );
    let end = frame(types::FILE_END, &json!({"file_id": file_id}));

    let timeout = m.timeout();
    let mut trouble = Trouble::default();
    let mut received: Vec<Utf8Bytes> = Vec::with_capacity(n_chunks);
    let (mut started_seen, mut ended) = (false, false);
    let (mut next, mut acked, mut acks) = (0usize, 0usize, 0u64);
    let mut end_sent = false;
    let mut last_progress = Instant::now();
    let meter = Meter::start(&m.pids);
    let t0 = Instant::now();
    let mut t_end = None;
    m.fleet.send(sender, start);
    loop {
        let mut wrote = false;
        while next < n_chunks && next - acked < WINDOW as usize {
            m.fleet.send(sender, std::mem::take(&mut chunks[next]));
            next += 1;
            wrote = true;
        }
        if next == n_chunks && !end_sent {
            m.fleet.send(sender, end.clone());
            end_sent = true;
            wrote = true;
        }
        if wrote {
            m.fleet.flush_dirty();
        }
        if ended || !trouble.is_clean() || last_progress.elapsed() > timeout {
            break;
        }
        if let Err(e) = m.fleet.turn(Some(Duration::from_millis(50))) {
            trouble.examples.push(format!("poll: {e}"));
            break;
        }
        for note in std::mem::take(&mut m.fleet.notes) {
            match note {
                Note::File {
                    client,
                    kind,
                    at,
                    text,
                } => {
                    last_progress = at;
                    match kind {
                        types::ACK if client == sender => {
                            let env = Envelope::parse(&text).map_err(|e| e.to_string())?;
                            let r = env.fields().str("msg_ref").unwrap_or("").to_string();
                            if let Some((id, i)) = r.rsplit_once(':')
                                && id == file_id
                                && let Ok(i) = i.parse::<usize>()
                            {
                                acked = acked.max(i + 1);
                                acks += 1;
                            }
                        }
                        types::FILE_START if client == receiver => started_seen = true,
                        types::FILE_CHUNK if client == receiver => received.push(text),
                        types::FILE_END if client == receiver => {
                            ended = true;
                            t_end = Some(at);
                        }
                        _ => {}
                    }
                }
                other => {
                    trouble.note(&m.fleet, &other);
                }
            }
        }
    }
    let meter = meter.stop();
    let secs = t_end.map(|t| t.duration_since(t0).as_secs_f64());
    if !ended {
        trouble.examples.push(format!(
            "the transfer stalled: {} of {n_chunks} chunks sent, {} acknowledged, {} received",
            next,
            acked,
            received.len()
        ));
    }

    // Every chunk, after the clock: server sig, decryption, content_sig, order, SHA-256.
    let verify_started = Instant::now();
    let rkey = m.fleet.key_of(receiver);
    let spub = skey.public_key();
    let fleet = &m.fleet;
    let checked: Vec<Result<(i64, Vec<u8>), String>> = parallel(received.len(), |k| {
        let env = Envelope::parse(&received[k]).map_err(|e| e.to_string())?;
        let server_key = fleet
            .servers
            .iter()
            .find(|e| e.server_id.as_deref() == Some(env.from.as_str()))
            .unwrap_or(&fleet.servers[fleet.clients[receiver].server])
            .key
            .as_ref()
            .ok_or("server key unknown")?;
        if !matches!(
            wire::verify_payload_sig(server_key, &env.payload, &env.sig),
            Ok(true)
        ) {
            return Err("the server's sig does not verify".into());
        }
        let f = env.fields();
        let index = f.i64("index").map_err(|e| e.to_string())?;
        let ct = f.str("ciphertext").map_err(|e| e.to_string())?;
        let sig = f.str("content_sig").map_err(|e| e.to_string())?;
        let ts = f.i64("ts").map_err(|e| e.to_string())?;
        if !crypto::verify_content_sig(spub, sig, ct, &sid, Some(&rid), ts) {
            return Err(format!("chunk {index}: content_sig does not verify"));
        }
        let raw = wire::b64::decode(ct).ok_or("ciphertext is not base64")?;
        let plain = rkey
            .decrypt(&raw)
            .map_err(|_| format!("chunk {index} does not decrypt"))?;
        Ok((index, plain))
    });
    let mut problems: Vec<String> = Vec::new();
    let mut file = Vec::with_capacity(size);
    for (k, c) in checked.into_iter().enumerate() {
        match c {
            Ok((index, plain)) if index == k as i64 => file.extend_from_slice(&plain),
            Ok((index, _)) => problems.push(format!("chunk {index} arrived as number {k}")),
            Err(e) => problems.push(e),
        }
    }
    let sha_ok = crypto::sha256_hex(&file) == sha256 && received.len() == n_chunks;
    if !sha_ok {
        problems.push(format!(
            "reassembled {} bytes from {} chunks: SHA-256 does not match the manifest",
            file.len(),
            received.len()
        ));
    }
    if !started_seen {
        problems.push("FILE_START never reached the receiver".into());
    }
    let verify_s = verify_started.elapsed().as_secs_f64();
    problems.truncate(5);

    // What signing allows: cores / (signatures per chunk x one signature's cost).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sigs_path = if m.opts.peer_sig { 2.0 } else { 3.0 };
    let limit = |sigs: f64| cpus as f64 * 1000.0 / (sigs * m.sign_ms);
    let chunks_per_s = secs.map(|s| n_chunks as f64 / s.max(1e-9));
    let mb_per_s = secs.map(|s| size as f64 / 1e6 / s.max(1e-9));
    let ok = ended && problems.is_empty() && trouble.is_clean();
    let json = json!({
        "status": if ok { "ok" } else { "failed" },
        "file_bytes": size,
        "chunks": n_chunks,
        "transfer_s": secs.map(round3),
        "payload_mb_per_s": mb_per_s.map(round3),
        "chunks_per_s": chunks_per_s.map(round3),
        "acks": acks,
        "precompute_s": round3(precompute_s),
        "verify_s": round3(verify_s),
        "cpu": meter.json(),
        "signatures_per_chunk": sigs_path,
        "signing_limit_chunks_per_s": round3(limit(sigs_path)),
        "fraction_of_signing_limit": chunks_per_s.map(|c| round3(c / limit(sigs_path))),
        "servers_signing_limit_chunks_per_s": round3(limit(sigs_path - 1.0)),
        "fraction_of_servers_signing_limit":
            chunks_per_s.map(|c| round3(c / limit(sigs_path - 1.0))),
        // Each server is one thread, and the sender's server signs every chunk in both modes.
        "one_server_thread_limit_chunks_per_s": round3(1000.0 / m.sign_ms),
        "fraction_of_one_server_thread_limit": chunks_per_s.map(|c| round3(c * m.sign_ms / 1000.0)),
        "verified": {"chunks": received.len(), "sha256_ok": sha_ok, "problems": problems},
        "trouble": trouble.json(),
    });
    let mut lines = vec![format!(
        "{size} bytes ({n_chunks} chunks of <= {CHUNK} B) from {sid} (server 1) to {rid} \
         (server 2){}: {}",
        if m.opts.peer_sig { ", peer-sig" } else { "" },
        match (secs, mb_per_s, chunks_per_s) {
            (Some(s), Some(mb), Some(c)) =>
                format!("{s:.2} s, {mb:.3} MB/s of file payload, {c:.0} chunks/s, {acks} ACKs"),
            _ => "did not complete".into(),
        }
    )];
    lines.push(meter.line());
    if let Some(c) = chunks_per_s {
        lines.push(format!(
            "signing allows {:.0} chunks/s ({cpus} CPUs / ({sigs_path} signatures x {:.2} ms, \
             the floor's mean)): measured {:.2} of it; the sender's content_sig was made \
             beforehand, so the timed path signs {} per chunk: {:.0} chunks/s, measured {:.2} \
             of that",
            limit(sigs_path),
            m.sign_ms,
            c / limit(sigs_path),
            sigs_path - 1.0,
            limit(sigs_path - 1.0),
            c / limit(sigs_path - 1.0),
        ));
        lines.push(format!(
            "the sender's server signs every chunk: signing on one thread (--sign-threads 0, or \
             a build before the signer pool) it allows at most {:.0} chunks/s; measured {:.2} \
             of that",
            1000.0 / m.sign_ms,
            c * m.sign_ms / 1000.0
        ));
    }
    lines.push(format!(
        "encrypted and signed beforehand in {precompute_s:.1} s; afterwards every chunk \
         checked (server sig, decryption, content_sig, order) and the SHA-256 {} ({verify_s:.1} s)",
        if sha_ok { "matches" } else { "DOES NOT match" }
    ));
    if let Some(t) = trouble.line() {
        lines.push(t);
    }
    for p in json["verified"]["problems"]
        .as_array()
        .into_iter()
        .flatten()
    {
        lines.push(format!("PROBLEM: {}", p.as_str().unwrap_or("")));
    }
    Ok(Outcome {
        name: "file",
        json,
        rows: Vec::new(),
        lines,
    })
}
