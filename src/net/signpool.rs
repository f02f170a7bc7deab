//! The signer pool: worker threads that make the server's RSA signatures off the event loop
//! (`--sign-threads N`; issue "signatures off the loop").
//!
//! The loop stays the only owner of state. It hands a worker nothing but a [`Signed`] payload
//! (its canonical text and the frames waiting for it); the worker signs it with the server's
//! key, writes those frames ([`Signed::complete`]) and wakes the loop through a
//! [`mio::Waker`], which then sends each connection's frames in order
//! ([`crate::net`]).
//!
//! Three queues, served in priority order: [`Urgency::Conversation`] (frames of users and
//! servers already connected) before [`Urgency::Bulk`] (logins and leaves) before
//! [`Urgency::Background`] (adverts kept fresh). A worker takes a bulk job at least once per
//! [`BULK_SHARE`] jobs while both wait, so a steady stream of conversations slows a login storm
//! down but cannot stop it; background jobs wait until nothing else does.
//!
//! The `N` workers run at a lower priority (`WORKER_NICE`), so the loop gets a core the
//! moment it needs one. One more worker, the *express* one, runs at the loop's own priority
//! and signs conversations only: a conversation waits neither for a worker to finish the
//! login storm's signature it has started, nor behind whatever else competes for the CPUs at
//! normal priority (at nice 10 a thread gets about a tenth of a core shared with one at nice
//! 0). The low-priority workers take conversations too, when more wait than the express worker
//! is free to take.

use crate::core::signer::{SignStats, Signer, Urgency};
use crate::crypto::PrivateKey;
use crate::wire::frame::Signed;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// While both queues wait, one job in this many is a bulk one.
pub const BULK_SHARE: u32 = 4;

/// A background job that has waited this long is served as the next bulk one: while logins
/// or leaves keep the workers busy, a refreshed advert must not wait for ever, since the
/// same user's later presence on a link waits behind it (see [`crate::wire::frame::Lane`]).
pub const BACKGROUND_WAIT: Duration = Duration::from_secs(2);

/// The workers' nice value. The event loop must get a core the moment it has something to
/// do (a frame to read, a signed frame to send): with as many busy signers as cores, at equal
/// priority it would wait its turn behind them for tens of milliseconds. At nice 10 a worker
/// yields to the loop at once and still has every cycle the loop leaves.
const WORKER_NICE: i32 = 10;

/// Lowers the calling thread's priority (Linux: nice is per thread). Best effort.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; a failure only leaves the priority.
    unsafe {
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, WORKER_NICE) != 0 {
            log::debug!("signer thread: could not lower its priority");
        }
    }
}

/// Signs on worker threads. Dropping it stops them (jobs still queued are abandoned: only
/// when the server is going away).
pub struct SignPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    stats: Arc<SignStats>,
}

/// Tells the event loop that frames were completed.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

impl<W: Wake + ?Sized> Wake for Arc<W> {
    fn wake(&self) {
        (**self).wake()
    }
}

impl Wake for mio::Waker {
    fn wake(&self) {
        if let Err(e) = mio::Waker::wake(self) {
            log::error!("cannot wake the event loop: {e}");
        }
    }
}

struct Shared {
    queues: Mutex<Queues>,
    /// Wakes the low-priority workers.
    work: Condvar,
    /// Wakes the express worker.
    express: Condvar,
    stats: Arc<SignStats>,
    waker: Box<dyn Wake>,
    /// Set by a worker that completed a job since the loop last looked (see [`SignPool::woken`]):
    /// one wake-up per loop turn, however many jobs complete.
    woken: Arc<AtomicBool>,
    /// Test only: each job sleeps up to this many microseconds first (out-of-order completion).
    jitter_us: u64,
}

#[derive(Default)]
struct Queues {
    conversation: VecDeque<Signed>,
    bulk: VecDeque<Signed>,
    /// With the time each was queued (see [`BACKGROUND_WAIT`]).
    background: VecDeque<(Instant, Signed)>,
    /// Conversation jobs taken in a row while bulk ones waited.
    streak: u32,
    /// The express worker is waiting for a conversation (it takes the next one).
    express_idle: bool,
    /// Low-priority workers waiting for a job.
    idle: usize,
    stop: bool,
}

impl Queues {
    /// The next job for a low-priority worker: conversations first (those the idle express
    /// worker is about to take excepted), with bulk's share; background jobs when nothing
    /// else waits, or as bulk once they have waited [`BACKGROUND_WAIT`].
    fn next(&mut self) -> Option<Signed> {
        let spare = self
            .conversation
            .len()
            .saturating_sub(usize::from(self.express_idle));
        let bulk_turn = self.streak + 1 >= BULK_SHARE;
        let overdue = self
            .background
            .front()
            .is_some_and(|(queued, _)| queued.elapsed() >= BACKGROUND_WAIT);
        if (overdue || !self.bulk.is_empty()) && (spare == 0 || bulk_turn) {
            self.streak = 0;
            return if overdue {
                self.background.pop_front().map(|(_, job)| job)
            } else {
                self.bulk.pop_front()
            };
        }
        if spare == 0 {
            return self.background.pop_front().map(|(_, job)| job);
        }
        let job = self.conversation.pop_front()?;
        self.streak = if self.bulk.is_empty() {
            0
        } else {
            self.streak + 1
        };
        Some(job)
    }

    /// A low-priority worker is idle and nothing waits but the conversation the idle express
    /// worker is about to take: a new job starts at once.
    fn spare(&self) -> bool {
        self.idle > 0
            && self.bulk.is_empty()
            && self.background.is_empty()
            && self.conversation.len() <= usize::from(self.express_idle)
    }

    /// The next job for the express worker: a conversation, or none (it is then idle).
    fn next_express(&mut self) -> Option<Signed> {
        let job = self.conversation.pop_front();
        self.express_idle = job.is_none();
        job
    }
}

impl SignPool {
    /// Starts `threads` workers signing with `key`; each completed batch calls `waker`.
    pub fn start(
        key: Arc<PrivateKey>,
        threads: usize,
        waker: Box<dyn Wake>,
    ) -> std::io::Result<SignPool> {
        Self::start_with_jitter(key, threads, waker, 0)
    }

    /// [`SignPool::start`] whose workers sleep a random 0..`jitter_us` µs before each job, so
    /// jobs complete out of order (tests of per-connection order).
    #[doc(hidden)]
    pub fn start_with_jitter(
        key: Arc<PrivateKey>,
        threads: usize,
        waker: Box<dyn Wake>,
        jitter_us: u64,
    ) -> std::io::Result<SignPool> {
        let stats = Arc::new(SignStats::default());
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            work: Condvar::new(),
            express: Condvar::new(),
            stats: Arc::clone(&stats),
            waker,
            woken: Arc::new(AtomicBool::new(false)),
            jitter_us,
        });
        let mut pool = SignPool {
            shared,
            workers: Vec::new(),
            stats,
        };
        // Each worker signs with a copy of the key of its own: with one shared key object, a
        // worker preempted inside aws-lc's per-key lock (likeliest at nice 10, during a storm)
        // held up every other signature, the express worker's too.
        let threads = threads.max(1);
        for i in 0..=threads {
            let express = i == threads;
            let key = key.duplicate().map_err(std::io::Error::other)?;
            let shared = Arc::clone(&pool.shared);
            let name = if express {
                "signer-express".into()
            } else {
                format!("signer-{i}")
            };
            let worker = std::thread::Builder::new()
                .name(name)
                .spawn(move || shared.run(express, &key))?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    /// The flag workers set when they complete a job; the loop clears it before looking at
    /// the frames waiting (so a completion after the look wakes it again).
    pub fn woken(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.shared.woken)
    }
}

impl Signer for SignPool {
    fn submit(&self, signed: &Signed, urgency: Urgency) {
        let mut q = self.shared.lock();
        match urgency {
            Urgency::Conversation => q.conversation.push_back(signed.clone()),
            Urgency::Bulk => q.bulk.push_back(signed.clone()),
            Urgency::Background => q.background.push_back((Instant::now(), signed.clone())),
        }
        // The express worker takes a conversation if it is free; a low-priority worker takes
        // any job it leaves.
        let express = urgency == Urgency::Conversation && q.express_idle;
        let worker =
            urgency != Urgency::Conversation || q.conversation.len() > usize::from(q.express_idle);
        drop(q);
        if express {
            self.shared.express.notify_one();
        }
        if worker {
            self.shared.work.notify_one();
        }
    }

    fn spare(&self) -> bool {
        self.shared.lock().spare()
    }

    fn stats(&self) -> &Arc<SignStats> {
        &self.stats
    }
}

impl Drop for SignPool {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        self.shared.express.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        crate::wire::frame::lock(&self.queues)
    }

    /// A worker's life: take the next job it may take, sign it, tell the loop. The express
    /// worker (conversations only) keeps the loop's priority.
    fn run(&self, express: bool, key: &PrivateKey) {
        if !express {
            lower_priority();
        }
        let bell = if express { &self.express } else { &self.work };
        loop {
            let job = {
                let mut q = self.lock();
                loop {
                    if q.stop {
                        return;
                    }
                    let job = if express { q.next_express() } else { q.next() };
                    if let Some(job) = job {
                        break job;
                    }
                    q.idle += usize::from(!express);
                    q = bell.wait(q).unwrap_or_else(|e| e.into_inner());
                    q.idle -= usize::from(!express);
                }
            };
            self.sign(key, &job);
        }
    }

    fn sign(&self, key: &PrivateKey, job: &Signed) {
        if self.jitter_us > 0 {
            let us = u64::from_le_bytes(crate::crypto::random_bytes::<8>()) % self.jitter_us;
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
        self.stats.sign_now(key, job);
        if !self.woken.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(n: usize) -> Signed {
        Signed::pending(format!("{{\"n\":{n}}}"))
    }

    #[test]
    fn conversations_go_first_and_bulk_still_gets_a_share() {
        let mut q = Queues::default();
        for i in 0..8 {
            q.bulk.push_back(signed(100 + i));
        }
        for i in 0..8 {
            q.conversation.push_back(signed(i));
        }
        let order: Vec<bool> = std::iter::from_fn(|| q.next())
            .map(|s| s.canonical().len() > 8) // {"n":1xx}: a bulk job
            .collect();
        // true = bulk. Three conversations, then one bulk, while both wait.
        assert_eq!(
            &order[..8],
            &[false, false, false, true, false, false, false, true]
        );
        assert_eq!(order.len(), 16);
        assert_eq!(order.iter().filter(|b| **b).count(), 8);
    }

    #[test]
    fn a_conversation_is_left_to_the_idle_express_worker_and_the_rest_spill_over() {
        let mut q = Queues {
            express_idle: true,
            ..Queues::default()
        };
        q.conversation.push_back(signed(1));
        assert!(q.next().is_none(), "the express worker takes the only one");
        q.bulk.push_back(signed(100));
        assert_eq!(
            q.next().map(|s| s.canonical().len()),
            Some(9),
            "bulk meanwhile"
        );
        q.conversation.push_back(signed(2));
        assert_eq!(
            q.next().map(|s| s.canonical().to_string()).as_deref(),
            Some("{\"n\":1}")
        );
        assert!(q.next().is_none());
        q.express_idle = false;
        assert!(
            q.next().is_some(),
            "a busy express worker leaves it to the others"
        );
    }

    /// Counts wake-ups.
    struct Bell(std::sync::atomic::AtomicUsize);

    impl Wake for Bell {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_job_is_signed_whichever_worker_takes_it() {
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/keys/server1.pem"
        ))
        .expect("test key");
        let key = Arc::new(PrivateKey::from_pem(&pem).expect("key"));
        let bell = Arc::new(Bell(Default::default()));
        let pool =
            SignPool::start_with_jitter(Arc::clone(&key), 1, Box::new(Arc::clone(&bell)), 500)
                .expect("pool");
        let jobs: Vec<(Signed, Urgency)> = (0..24)
            .map(|n| {
                let urgency = if n % 3 == 0 {
                    Urgency::Bulk
                } else {
                    Urgency::Conversation
                };
                (signed(n), urgency)
            })
            .collect();
        for (job, urgency) in &jobs {
            pool.submit(job, *urgency);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while jobs.iter().any(|(j, _)| j.sig().is_none()) {
            assert!(std::time::Instant::now() < deadline, "jobs left unsigned");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(bell.0.load(Ordering::SeqCst) > 0);
        for (job, _) in &jobs {
            let sig = job.sig().expect("signed");
            assert!(
                key.public_key().verify_b64(job.canonical().as_bytes(), sig),
                "{}",
                job.canonical()
            );
        }
    }

    #[test]
    fn spare_only_while_a_worker_is_idle_and_nothing_waits() {
        let mut q = Queues::default();
        assert!(!q.spare(), "every worker busy");
        q.idle = 1;
        assert!(q.spare());
        q.bulk.push_back(signed(1));
        assert!(!q.spare(), "a bulk job waits");
        q.next();
        assert!(q.spare());
        q.express_idle = true;
        q.conversation.push_back(signed(2));
        assert!(q.spare(), "the idle express worker takes it");
        q.conversation.push_back(signed(3));
        assert!(!q.spare(), "one waits for the next worker");
        q.express_idle = false;
        q.conversation.pop_front();
        assert!(!q.spare(), "the busy express worker leaves it waiting");
    }

    #[test]
    fn background_jobs_wait_until_nothing_else_does() {
        let mut q = Queues {
            express_idle: true,
            ..Queues::default()
        };
        q.background.push_back((Instant::now(), signed(200)));
        q.bulk.push_back(signed(100));
        q.conversation.push_back(signed(1));
        q.conversation.push_back(signed(2)); // one is left to the idle express worker
        let order: Vec<String> = std::iter::from_fn(|| q.next())
            .map(|s| s.canonical().to_string())
            .collect();
        assert_eq!(order, ["{\"n\":1}", "{\"n\":100}", "{\"n\":200}"]);
        assert_eq!(q.conversation.len(), 1, "left to the express worker");
        assert!(q.next_express().is_some());
        assert!(q.next_express().is_none(), "never a background job");
    }

    #[test]
    fn a_background_job_waits_no_longer_than_its_bound() {
        let long_ago = Instant::now()
            .checked_sub(BACKGROUND_WAIT)
            .expect("a monotonic clock this far from its start");
        let mut q = Queues::default();
        q.background.push_back((long_ago, signed(200)));
        q.background.push_back((Instant::now(), signed(201)));
        q.bulk.push_back(signed(100));
        let order: Vec<String> = std::iter::from_fn(|| q.next())
            .map(|s| s.canonical().to_string())
            .collect();
        assert_eq!(
            order,
            ["{\"n\":200}", "{\"n\":100}", "{\"n\":201}"],
            "the overdue one as the next bulk job, the other after the bulk"
        );
    }

    #[test]
    fn only_bulk_waiting_is_served_at_once() {
        let mut q = Queues::default();
        q.bulk.push_back(signed(1));
        assert!(q.next().is_some());
        assert!(q.next().is_none());
    }
}
