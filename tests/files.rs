//! File transfer (issue 4, PROTOCOL.md §9) from a user on server A to a user on server B.

mod common;

use common::keys::test_key;
use common::proc::{Line, Raw, ServerProc, TempDir, frame, linked_pair, now_ms};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// bob on B, with downloads in `dl`.
fn bob(b: &ServerProc, dir: &TempDir, dl: &Path) -> Line {
    Line::start_args(
        b,
        "bob",
        "user2",
        &dir.0,
        &["--downloads", &dl.to_string_lossy()],
    )
}

/// alice on A sends `path` to bob and leaves once it is sent; returns her output.
fn alice_sends(a: &ServerProc, dir: &TempDir, path: &Path, extra: &[&str]) -> String {
    alice_sends_exit(a, dir, path, extra, 0)
}

/// [`alice_sends`], asserting the client's exit status (1: the `/file` failed).
fn alice_sends_exit(
    a: &ServerProc,
    dir: &TempDir,
    path: &Path,
    extra: &[&str],
    status: i32,
) -> String {
    let key = test_key("user1");
    let key_file = json!({"user_id": "id-alice", "display_name": "alice",
                          "private_key": key.to_pem()});
    let key_path = dir.0.join("alice.json");
    if !key_path.exists() {
        std::fs::write(&key_path, key_file.to_string()).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_socp"))
        .args(["--server", &a.url(), "--name", "alice", "--data-dir"])
        .arg(&dir.0)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "/file bob {}", path.display())?;
            drop(stdin);
            child.wait_with_output()
        })
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(status),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Deterministic bytes (no RNG crate needed): a simple LCG.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

#[test]
fn files_of_every_edge_size_round_trip_across_servers() {
    let (a, b) = linked_pair(&[]);
    let (adir, bdir) = (TempDir::new("fa"), TempDir::new("fb"));
    let dl = bdir.0.join("dl");
    let mut bob = bob(&b, &bdir, &dl);
    // The edges of the chunking (empty, one byte, one full chunk, one over) and a file of
    // 230 chunks, past the 64-chunk window, so the sender waits for ACKs. Large files (MiB) are
    // moved by the benchmark (`socp-bench --scenario file`), not here.
    for (i, size) in [0usize, 1, 446, 447, 100 * 1024].iter().enumerate() {
        let name = format!("f{i}-{size}.bin");
        let src = adir.0.join(&name);
        let data = bytes(*size, i as u64 + 1);
        std::fs::write(&src, &data).unwrap();
        let out = alice_sends(&a, &adir, &src, &[]);
        assert!(
            out.contains(&format!("* sent {name} ({size} bytes) to bob")),
            "{out}"
        );
        bob.expect(&format!(
            "* received file from alice: {}",
            dl.join(&name).display()
        ));
        assert_eq!(std::fs::read(dl.join(&name)).unwrap(), data, "{name}");
    }
    assert!(!files_in(&dl).iter().any(|f| f.ends_with(".part")));
}

#[test]
fn a_hostile_name_lands_inside_the_downloads_directory_without_overwriting() {
    let (a, b) = linked_pair(&[]);
    let bdir = TempDir::new("fb");
    let dl = bdir.0.join("dl");
    std::fs::create_dir_all(&dl).unwrap();
    std::fs::write(dl.join("passwd"), b"already here").unwrap();
    let mut bob = bob(&b, &bdir, &dl);
    // A raw sender can put any name in the manifest.
    let mut alice = Raw::hello(&a, "alice", &test_key("user1"));
    bob.expect("* alice is online");
    send_raw_file(&mut alice, "../../etc/passwd", b"root:x:0:0", |_, _| {});
    bob.expect("* received file from alice: ");
    assert_eq!(std::fs::read(dl.join("passwd")).unwrap(), b"already here");
    assert_eq!(std::fs::read(dl.join("passwd (1)")).unwrap(), b"root:x:0:0");
    assert!(!bdir.0.join("etc").exists());
}

/// Sends `data` to bob as a raw sender, chunking at 446 bytes; `tamper(index, payload)` may
/// change each chunk's payload before it is sent.
/// A FILE_CHUNK from alice to bob carrying `piece`, encrypted for bob and content-signed by
/// alice; `tamper` may change the payload before it is framed.
fn chunk_frame(
    file_id: &str,
    index: i64,
    piece: &[u8],
    tamper: impl FnOnce(&mut serde_json::Value),
) -> String {
    let ts = now_ms();
    let raw = test_key("user2").public_key().encrypt(piece).unwrap();
    let ct = socp::wire::b64::encode(&raw);
    let sig = socp::crypto::make_content_sig(&test_key("user1"), &raw, "alice", Some("id-bob"), ts);
    let mut payload = json!({"file_id": file_id, "index": index, "ciphertext": ct,
                             "content_sig": sig});
    tamper(&mut payload);
    let signed = socp::wire::SignedPayload::unsigned(&payload).unwrap();
    socp::wire::encode_frame("FILE_CHUNK", "alice", "id-bob", ts, &signed)
}

fn send_raw_file(
    alice: &mut Raw,
    name: &str,
    data: &[u8],
    mut tamper: impl FnMut(i64, &mut serde_json::Value),
) -> String {
    let file_id = socp::wire::ids::new_uuid();
    let sha = socp::crypto::sha256_hex(data);
    let start = json!({"file_id": file_id, "name": name, "size": data.len(), "sha256": sha,
                       "mode": "dm"});
    alice.send_text(&frame("FILE_START", "alice", "id-bob", &start, None));
    for (i, piece) in data.chunks(446).enumerate() {
        alice.send_text(&chunk_frame(&file_id, i as i64, piece, |p| {
            tamper(i as i64, p)
        }));
    }
    alice.send_text(&frame(
        "FILE_END",
        "alice",
        "id-bob",
        &json!({"file_id": file_id}),
        None,
    ));
    file_id
}

#[test]
fn corrupted_chunks_bad_hashes_and_short_files_are_refused_and_nothing_is_left() {
    let (a, b) = linked_pair(&[]);
    let bdir = TempDir::new("fb");
    let dl = bdir.0.join("dl");
    let mut bob = bob(&b, &bdir, &dl);
    let mut alice = Raw::hello(&a, "alice", &test_key("user1"));
    bob.expect("* alice is online");
    let data = bytes(2000, 7);

    // A chunk whose content_sig was made for other bytes.
    send_raw_file(&mut alice, "corrupt.bin", &data, |i, p| {
        if i == 2 {
            p["content_sig"] = p["content_sig"]
                .as_str()
                .unwrap()
                .replacen('A', "B", 1)
                .into();
            if p["content_sig"].as_str().unwrap().starts_with('B') {
                p["content_sig"] = format!("C{}", &p["content_sig"].as_str().unwrap()[1..]).into();
            }
        }
    });
    bob.expect("file corrupt.bin from alice rejected: chunk 2 has a bad signature");

    // A manifest whose hash is wrong: all chunks arrive, the SHA-256 does not match.
    let file_id = socp::wire::ids::new_uuid();
    let start = json!({"file_id": file_id, "name": "badhash.bin", "size": 3,
                       "sha256": "0".repeat(64), "mode": "dm"});
    alice.send_text(&frame("FILE_START", "alice", "id-bob", &start, None));
    alice.send_text(&chunk_frame(&file_id, 0, b"abc", |_| {}));
    alice.send_text(&frame(
        "FILE_END",
        "alice",
        "id-bob",
        &json!({"file_id": file_id}),
        None,
    ));
    bob.expect("file badhash.bin from alice rejected: SHA-256 does not match the manifest");

    // A missing chunk: the sender's server refuses the gap, the file ends short.
    let file_id = socp::wire::ids::new_uuid();
    let start = json!({"file_id": file_id, "name": "short.bin", "size": 900,
                       "sha256": socp::crypto::sha256_hex(&[0u8; 900]), "mode": "dm"});
    alice.send_text(&frame("FILE_START", "alice", "id-bob", &start, None));
    alice.send_text(&chunk_frame(&file_id, 1, &[0u8; 446], |_| {}));
    let err = alice.recv_kind("ERROR");
    assert!(
        err.payload["detail"]
            .as_str()
            .unwrap()
            .contains("expected chunk 0"),
        "{:?}",
        err.payload
    );
    alice.send_text(&frame(
        "FILE_END",
        "alice",
        "id-bob",
        &json!({"file_id": file_id}),
        None,
    ));
    bob.expect("file short.bin from alice rejected: got 0 of 900 bytes");

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        files_in(&dl),
        Vec::<String>::new(),
        "nothing partial or bad is kept"
    );
}

#[test]
fn a_file_over_the_limit_is_refused_with_a_clear_message() {
    let (a, b) = linked_pair(&["--max-file-size", "1000"]);
    let (adir, bdir) = (TempDir::new("fa"), TempDir::new("fb"));
    let dl = bdir.0.join("dl");
    let mut bob = bob(&b, &bdir, &dl);
    let src = adir.0.join("big.bin");
    std::fs::write(&src, bytes(5000, 3)).unwrap();
    // A refused file is a failed command: exit status 1.
    let out = alice_sends_exit(&a, &adir, &src, &[], 1);
    assert!(
        out.contains("file larger than this server's limit of 1000 bytes"),
        "{out}"
    );
    // The client's own limit refuses before anything is sent.
    let out = alice_sends_exit(&a, &adir, &src, &["--max-file-size", "100"], 1);
    assert!(
        out.contains("is 5000 bytes; the limit is 100 bytes"),
        "{out}"
    );
    let seen = bob.drain_for(Duration::from_millis(300));
    assert!(
        !seen.iter().any(|l| l.contains("received file")),
        "{seen:?}"
    );
    assert_eq!(files_in(&dl), Vec::<String>::new());
}

#[test]
fn a_sender_is_told_when_the_recipient_leaves_mid_transfer() {
    let (a, b) = linked_pair(&[]);
    let bdir = TempDir::new("fb");
    let dl = bdir.0.join("dl");
    let mut bob = bob(&b, &bdir, &dl);
    let mut alice = Raw::hello(&a, "alice", &test_key("user1"));
    bob.expect("* alice is online");
    let file_id = socp::wire::ids::new_uuid();
    let start = json!({"file_id": file_id, "name": "x.bin", "size": 10_000,
                       "sha256": "0".repeat(64), "mode": "dm"});
    alice.send_text(&frame("FILE_START", "alice", "id-bob", &start, None));
    bob.expect("* receiving x.bin (10000 bytes) from alice");
    drop(bob); // killed mid-transfer
    let err = alice.recv_kind("ERROR");
    let detail = err.payload["detail"].as_str().unwrap();
    assert_eq!(err.payload["code"], "USER_NOT_FOUND");
    assert!(
        detail.contains(&file_id) && detail.contains("left"),
        "{detail}"
    );
}
