//! Preparing the chunks of outgoing files (PROTOCOL.md §9): read a piece, RSA-OAEP encrypt it
//! under the recipient's key, make its `content_sig` (§3.5) — the RSA-4096 signature that bounds
//! a file's throughput when made on the client's own thread (issue "signatures off the loop").
//!
//! [`crate::client::Session`] asks a [`ChunkMaker`] for chunks in index order and never spawns a
//! thread itself. [`InlineMaker`] (the default, and what unit tests use) prepares each chunk when
//! it is taken, exactly as the session used to. [`ThreadedMaker`] (what `socp` installs) prepares
//! them ahead on worker threads, but never beyond what the session has allowed
//! ([`ChunkMaker::allow`]): the flow-control window, so at most
//! [`crate::core::transfer::WINDOW`] prepared-but-unsent chunks per file are held.
//!
//! A chunk's `content_sig` binds (ciphertext, from, to, ts); the `ts` is the one the session gave
//! with the allowance, returned with the chunk ([`Piece::Chunk`]) so the frame carries the same
//! `ts` the signature covers.

use crate::crypto::{self, MAX_PLAINTEXT, PrivateKey, PublicKey};
use crate::net::signpool::Wake;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// One outgoing file, handed to the maker when its transfer starts.
pub struct Job {
    pub file_id: String,
    /// The file, positioned at its start.
    pub reader: Box<dyn Read + Send>,
    /// The size announced in the manifest: reading past it ends the file (it changed).
    pub size: u64,
    /// Our user id and the recipient's (bound by `content_sig`).
    pub from: String,
    pub to: String,
    /// The recipient's key (encryption) and ours (signing).
    pub recipient: Arc<PublicKey>,
    pub signer: Arc<PrivateKey>,
}

/// What the next index of a file turned out to be.
#[derive(Debug)]
pub enum Piece {
    /// A chunk: `len` plaintext bytes encrypted, signed with `ts`.
    Chunk {
        ciphertext: Vec<u8>,
        content_sig: String,
        ts: i64,
        len: usize,
    },
    /// No more data (the end of the file, or data beyond the announced size).
    End,
    /// Reading failed.
    Unreadable(String),
    /// Encryption failed.
    EncryptFailed(String),
}

impl Piece {
    /// Nothing comes after this piece.
    fn is_last(&self) -> bool {
        !matches!(self, Piece::Chunk { .. })
    }
}

/// Prepares the chunks of outgoing files; the session takes them strictly in index order.
pub trait ChunkMaker: Send {
    /// A new file: chunks from index 0.
    fn start(&mut self, job: Job);
    /// Chunks of `file_id` below index `until` may be prepared now; those not yet begun are
    /// signed with `ts`. `until` never decreases.
    fn allow(&mut self, file_id: &str, until: i64, ts: i64);
    /// Whether [`ChunkMaker::take`] of `index` would return a piece now.
    fn ready(&self, file_id: &str, index: i64) -> bool;
    /// Piece `index` of `file_id` (the lowest not yet taken, below the allowance), if prepared.
    fn take(&mut self, file_id: &str, index: i64) -> Option<Piece>;
    /// Forgets `file_id` (finished, failed or abandoned): nothing more is read or prepared.
    fn stop(&mut self, file_id: &str);
}

/// The immutable part of a [`Job`].
struct Sealer {
    from: String,
    to: String,
    recipient: Arc<PublicKey>,
    signer: Arc<PrivateKey>,
}

impl Sealer {
    fn seal(&self, plain: &[u8], ts: i64) -> Piece {
        match self.recipient.encrypt(plain) {
            Ok(ct) => {
                let content_sig =
                    crypto::make_content_sig(&self.signer, &ct, &self.from, Some(&self.to), ts);
                Piece::Chunk {
                    ciphertext: ct,
                    content_sig,
                    ts,
                    len: plain.len(),
                }
            }
            Err(e) => Piece::EncryptFailed(e.to_string()),
        }
    }
}

/// Reads a file one piece at a time, in order.
struct Pieces {
    reader: Box<dyn Read + Send>,
    size: u64,
    read: u64,
    done: bool,
}

impl Pieces {
    /// The next piece's plaintext, or the piece that ends the file.
    fn next(&mut self) -> Result<Vec<u8>, Piece> {
        if self.done {
            return Err(Piece::End);
        }
        let mut buf = vec![0u8; MAX_PLAINTEXT];
        match read_full(&mut self.reader, &mut buf) {
            Err(e) => {
                self.done = true;
                Err(Piece::Unreadable(e.to_string()))
            }
            Ok(n) if n == 0 || self.read + n as u64 > self.size => {
                self.done = true;
                Err(Piece::End)
            }
            Ok(n) => {
                self.read += n as u64;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }
}

/// Reads until `buf` is full or the end of the file.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn split(job: Job) -> (Sealer, Pieces) {
    (
        Sealer {
            from: job.from,
            to: job.to,
            recipient: job.recipient,
            signer: job.signer,
        },
        Pieces {
            reader: job.reader,
            size: job.size,
            read: 0,
            done: false,
        },
    )
}

/// Prepares each chunk when it is taken, on the caller's thread (deterministic; the default).
#[derive(Default)]
pub struct InlineMaker {
    files: HashMap<String, (Sealer, Pieces, i64)>,
}

impl ChunkMaker for InlineMaker {
    fn start(&mut self, job: Job) {
        let file_id = job.file_id.clone();
        let (sealer, pieces) = split(job);
        self.files.insert(file_id, (sealer, pieces, 0));
    }

    fn allow(&mut self, file_id: &str, _until: i64, ts: i64) {
        if let Some(f) = self.files.get_mut(file_id) {
            f.2 = ts;
        }
    }

    fn ready(&self, file_id: &str, _index: i64) -> bool {
        self.files.contains_key(file_id)
    }

    fn take(&mut self, file_id: &str, _index: i64) -> Option<Piece> {
        let (sealer, pieces, ts) = self.files.get_mut(file_id)?;
        Some(match pieces.next() {
            Ok(plain) => sealer.seal(&plain, *ts),
            Err(last) => last,
        })
    }

    fn stop(&mut self, file_id: &str) {
        self.files.remove(file_id);
    }
}

/// Prepares chunks ahead on worker threads, within each file's allowance. Dropping it stops
/// and joins the workers (each finishes at most the chunk it is signing).
pub struct ThreadedMaker {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    waker: Option<Box<dyn Wake>>,
    /// Workers running (test and diagnostics).
    alive: AtomicUsize,
    /// Test only: each chunk sleeps up to this many microseconds before it is sealed, so chunks
    /// complete out of order.
    jitter_us: u64,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Slot>,
    stop: bool,
    /// The most chunks any file has had prepared or being prepared, not yet taken.
    high_water: usize,
    /// Chunks completed while a lower index of the same file was still being prepared.
    out_of_order: u64,
}

struct Slot {
    sealer: Arc<Sealer>,
    /// Locked while the global state is still held, so pieces are read in claim order.
    pieces: Arc<Mutex<Pieces>>,
    /// The next index to claim, the allowance, and the `ts` for chunks claimed now.
    next: i64,
    until: i64,
    ts: i64,
    /// Indices claimed and not yet stored.
    busy: BTreeSet<i64>,
    ready: BTreeMap<i64, Piece>,
    /// A last piece was prepared: nothing more to claim.
    finished: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker panicking mid-chunk leaves no state half-changed that matters here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ThreadedMaker {
    /// `threads` workers (at least one); `waker` is called whenever a chunk is ready.
    pub fn start(threads: usize, waker: Option<Box<dyn Wake>>) -> std::io::Result<ThreadedMaker> {
        Self::start_with_jitter(threads, waker, 0)
    }

    /// The number of workers for this machine: its cores but one (the client's own), at least 1.
    pub fn spare_cores() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1))
            .unwrap_or(1)
            .max(1)
    }

    /// [`ThreadedMaker::start`] whose workers sleep a random 0..`jitter_us` µs before sealing
    /// each chunk, so chunks complete out of order (tests).
    #[doc(hidden)]
    pub fn start_with_jitter(
        threads: usize,
        waker: Option<Box<dyn Wake>>,
        jitter_us: u64,
    ) -> std::io::Result<ThreadedMaker> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            waker,
            alive: AtomicUsize::new(0),
            jitter_us,
        });
        let mut maker = ThreadedMaker {
            shared,
            workers: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&maker.shared);
            shared.alive.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("chunks-{i}"))
                .spawn(move || shared.run(i as u64));
            match spawned {
                Ok(worker) => maker.workers.push(worker),
                Err(e) => {
                    maker.shared.alive.fetch_sub(1, Ordering::SeqCst);
                    return Err(e); // dropping `maker` stops those already started
                }
            }
        }
        Ok(maker)
    }

    /// A view of the maker's state that stays usable once the maker is installed in a
    /// session, and after it is dropped (tests, diagnostics).
    pub fn probe(&self) -> MakerProbe {
        MakerProbe(Arc::clone(&self.shared))
    }
}

/// See [`ThreadedMaker::probe`].
pub struct MakerProbe(Arc<Shared>);

impl MakerProbe {
    /// Workers still running.
    pub fn alive(&self) -> usize {
        self.0.alive.load(Ordering::SeqCst)
    }

    /// The most chunks of one file prepared (or being prepared) and not yet taken, so far.
    pub fn high_water(&self) -> usize {
        lock(&self.0.state).high_water
    }

    /// Chunks completed before a lower index of the same file.
    pub fn out_of_order(&self) -> u64 {
        lock(&self.0.state).out_of_order
    }

    /// Chunks of `file_id` prepared or being prepared, not yet taken.
    pub fn ahead(&self, file_id: &str) -> usize {
        lock(&self.0.state)
            .files
            .get(file_id)
            .map_or(0, |s| s.ready.len() + s.busy.len())
    }

    /// Whether the maker holds `file_id` at all.
    pub fn holds(&self, file_id: &str) -> bool {
        lock(&self.0.state).files.contains_key(file_id)
    }
}

impl Shared {
    fn run(&self, seed: u64) {
        /// Counts the worker out however it leaves.
        struct Out<'a>(&'a AtomicUsize);
        impl Drop for Out<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _out = Out(&self.alive);
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut state = lock(&self.state);
        loop {
            if state.stop {
                return;
            }
            let claim = state
                .files
                .iter_mut()
                .find(|(_, s)| !s.finished && s.next < s.until)
                .map(|(id, s)| {
                    let index = s.next;
                    s.next += 1;
                    s.busy.insert(index);
                    (
                        s.ready.len() + s.busy.len(),
                        id.clone(),
                        index,
                        s.ts,
                        Arc::clone(&s.sealer),
                        Arc::clone(&s.pieces),
                    )
                });
            let Some((ahead, file_id, index, ts, sealer, pieces)) = claim else {
                state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            state.high_water = state.high_water.max(ahead);
            // Taken before the state is released: the next claim of this file reads after us.
            let mut reader = lock(&pieces);
            drop(state);
            let next = reader.next();
            drop(reader);
            if self.jitter_us > 0 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                std::thread::sleep(std::time::Duration::from_micros(rng % self.jitter_us));
            }
            let piece = match next {
                Ok(plain) => sealer.seal(&plain, ts),
                Err(last) => last,
            };
            state = lock(&self.state);
            if let Some(slot) = state.files.get_mut(&file_id) {
                slot.busy.remove(&index);
                let overtook = slot.busy.first().is_some_and(|&lower| lower < index);
                slot.finished |= piece.is_last();
                slot.ready.insert(index, piece);
                state.out_of_order += u64::from(overtook);
            }
            if let Some(waker) = &self.waker {
                waker.wake();
            }
        }
    }
}

impl ChunkMaker for ThreadedMaker {
    fn start(&mut self, job: Job) {
        let file_id = job.file_id.clone();
        let (sealer, pieces) = split(job);
        let slot = Slot {
            sealer: Arc::new(sealer),
            pieces: Arc::new(Mutex::new(pieces)),
            next: 0,
            until: 0,
            ts: 0,
            busy: BTreeSet::new(),
            ready: BTreeMap::new(),
            finished: false,
        };
        lock(&self.shared.state).files.insert(file_id, slot);
    }

    fn allow(&mut self, file_id: &str, until: i64, ts: i64) {
        let mut state = lock(&self.shared.state);
        let Some(slot) = state.files.get_mut(file_id) else {
            return;
        };
        slot.ts = ts;
        if until <= slot.until {
            return;
        }
        slot.until = until;
        drop(state);
        self.shared.work.notify_all();
    }

    fn ready(&self, file_id: &str, index: i64) -> bool {
        lock(&self.shared.state)
            .files
            .get(file_id)
            .is_some_and(|s| s.ready.contains_key(&index))
    }

    fn take(&mut self, file_id: &str, index: i64) -> Option<Piece> {
        lock(&self.shared.state)
            .files
            .get_mut(file_id)?
            .ready
            .remove(&index)
    }

    fn stop(&mut self, file_id: &str) {
        lock(&self.shared.state).files.remove(file_id);
    }
}

impl Drop for ThreadedMaker {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.work.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Arc<PrivateKey> {
        let path = format!(
            "{}/tests/fixtures/keys/{name}.pem",
            env!("CARGO_MANIFEST_DIR")
        );
        let pem = std::fs::read_to_string(path).expect("fixture key");
        Arc::new(PrivateKey::from_pem(&pem).expect("fixture key parses"))
    }

    /// Gives `left` bytes, then fails.
    struct Failing {
        left: usize,
    }

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(std::io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.left);
            buf[..n].fill(7);
            self.left -= n;
            Ok(n)
        }
    }

    fn job(reader: Box<dyn Read + Send>, size: u64) -> Job {
        Job {
            file_id: "f".into(),
            reader,
            size,
            from: "alice".into(),
            to: "bob".into(),
            recipient: Arc::clone(key("user2").public_key()),
            signer: key("user1"),
        }
    }

    /// Takes pieces 0, 1, … until a last one, waiting for each (at most 20 s in all).
    fn all(maker: &mut dyn ChunkMaker) -> Vec<Piece> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut pieces = Vec::new();
        loop {
            let index = pieces.len() as i64;
            maker.allow("f", index + 4, 1000);
            match maker.take("f", index) {
                Some(p) => {
                    let last = p.is_last();
                    pieces.push(p);
                    if last {
                        return pieces;
                    }
                }
                None => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "piece {index} never came"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    #[test]
    fn a_read_error_or_data_past_the_size_ends_the_file_on_both_makers() {
        let threaded = ThreadedMaker::start(2, None).expect("threads");
        let makers: [Box<dyn ChunkMaker>; 2] =
            [Box::new(InlineMaker::default()), Box::new(threaded)];
        for mut maker in makers {
            // One full piece, then an error: a chunk, then Unreadable.
            maker.start(job(
                Box::new(Failing {
                    left: MAX_PLAINTEXT,
                }),
                10_000,
            ));
            let pieces = all(maker.as_mut());
            assert_eq!(pieces.len(), 2, "{pieces:?}");
            let Piece::Chunk {
                ciphertext,
                content_sig,
                ts,
                len,
            } = &pieces[0]
            else {
                panic!("{pieces:?}");
            };
            assert_eq!((*ts, *len), (1000, MAX_PLAINTEXT));
            assert!(crypto::verify_content_sig(
                key("user1").public_key(),
                content_sig,
                &crate::wire::b64::encode(ciphertext),
                "alice",
                Some("bob"),
                1000
            ));
            assert!(matches!(&pieces[1], Piece::Unreadable(e) if e.contains("disk on fire")));
            maker.stop("f");
            // A file that grew past its announced size: the piece that would pass it ends it.
            let data = vec![1u8; MAX_PLAINTEXT * 2 + 10];
            maker.start(job(
                Box::new(std::io::Cursor::new(data)),
                MAX_PLAINTEXT as u64 + 5,
            ));
            let pieces = all(maker.as_mut());
            assert_eq!(pieces.len(), 2, "{pieces:?}");
            assert!(matches!(pieces[1], Piece::End));
            maker.stop("f");
            assert!(!maker.ready("f", 0));
        }
    }
}
