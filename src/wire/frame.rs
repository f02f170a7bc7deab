//! Frames the server sends, whose signature may still be in the making (issue "signatures off
//! the loop").
//!
//! The core decides *what* goes *where* and in which order as it handles an input; the
//! RSA-4096 signature over a payload (1.5 ms or more) may be made later, by a signer thread.
//! So the core hands out a [`Frame`] at once — its place in each connection's order is fixed
//! then — and the frame's text is completed when its [`Signed`] payload is signed:
//!
//! - [`Signed`]: one payload, its canonical text and its signature (made now, or pending).
//!   One per distinct payload however many frames carry it (§3.4).
//! - [`Frame`]: the text of one frame, ready, or [`Slot`] that the signer fills in (the
//!   envelope around the payload is written when the frame is made; only the payload and `sig`
//!   wait). A broadcast is one `Frame` shared by every recipient.
//!
//! Whoever completes a signature ([`Signed::complete`]) writes every frame waiting for it, then
//! the net layer, woken, sends them in each connection's order: a frame still waiting holds back
//! only the frames behind it on the same connection.

use super::{Text, canon};
use std::sync::{Arc, Mutex, OnceLock};

/// The text of a frame to send, and which [`Lane`] it travels in.
#[derive(Clone)]
pub struct Frame {
    body: Body,
    lane: Lane,
}

#[derive(Clone)]
enum Body {
    Ready(Text),
    /// Waiting for a signature; shared by every connection it goes to.
    Pending(Arc<Slot>),
}

/// How a frame may move in a connection's queue (issue "signatures off the loop":
/// conversations under way come first). Frames to one connection leave in the order the core
/// made them, with one exception: a frame carried for user X ([`Lane::From`]) may pass
/// presence about *another* user ([`Lane::Presence`]) not written yet: still being signed, or
/// signed and waiting for the socket (a storm's presence is a frame to every user for every
/// login or leave, more than the loop can write at once). Presence is about one user and
/// idempotent, so what a user sees in the end is the same; X's own presence is never passed,
/// so a message never arrives from a user not yet announced. Presence frames never pass each
/// other. An advert signed afresh only to stay fresh ([`Lane::Refresh`]) carries no news:
/// every frame may pass it but presence about the same user. (A frame partly written is never
/// passed: see the net layer's outbox.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lane {
    #[default]
    Ordered,
    /// `USER_ADVERTISE` / `USER_REMOVE` about the user whose id hashes to this.
    Presence(u64),
    /// A frame routed for the user whose id hashes to this (a delivery, a channel copy).
    From(u64),
    /// The advert of the user whose id hashes to this, announced before and signed afresh to
    /// stay inside the peers' freshness window (§6): nothing in it is news.
    Refresh(u64),
}

impl Lane {
    /// Presence about `user_id`.
    pub fn presence(user_id: &str) -> Lane {
        Lane::Presence(user_hash(user_id))
    }

    /// `user_id`'s advert signed afresh (see [`Lane::Refresh`]).
    pub fn refresh(user_id: &str) -> Lane {
        Lane::Refresh(user_hash(user_id))
    }

    /// Carried for `user_id`.
    pub fn from_user(user_id: &str) -> Lane {
        Lane::From(user_hash(user_id))
    }

    /// The lane of a frame routed for its payload's `sender`, if it names one.
    pub fn for_sender(sender: Option<&str>) -> Lane {
        sender.map_or(Lane::Ordered, Lane::from_user)
    }
}

/// FNV-1a of a user id. A collision only keeps two frames in order.
fn user_hash(user_id: &str) -> u64 {
    user_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A frame whose payload and signature are still to come.
pub struct Slot {
    /// The envelope up to and including `"payload":`.
    head: String,
    /// The length of the rest, when known (payload and `sig`): what the frame will weigh in
    /// a connection's queue before it is complete.
    rest: usize,
    text: OnceLock<Text>,
    /// Who to tell when it is complete (see [`Frame::watch`]).
    watch: Mutex<Watch>,
}

/// A list of tokens (the net layer's connection slots) whose frames were completed since it
/// last looked: shared by the loop and the threads that complete frames.
pub type Completions = Arc<Mutex<Vec<usize>>>;

#[derive(Default)]
struct Watch {
    completions: Option<Completions>,
    tokens: Vec<usize>,
}

/// A `sig` field: 512 signature bytes in base64url, quoted, and the closing brace.
const SIG_FIELD: usize = ",\"sig\":\"\"}".len() + 683;

impl Slot {
    /// A frame of type `kind` whose payload is not known yet (see [`Signed::attach`]).
    pub fn new(kind: &str, from: &str, to: &str, ts: i64) -> Arc<Slot> {
        Self::with_payload_len(kind, from, to, ts, 0)
    }

    /// A frame whose payload will be `payload_len` bytes.
    fn with_payload_len(
        kind: &str,
        from: &str,
        to: &str,
        ts: i64,
        payload_len: usize,
    ) -> Arc<Slot> {
        let mut head = String::with_capacity(96 + kind.len() + from.len() + to.len());
        head.push_str("{\"type\":");
        canon::write_string(kind, &mut head);
        head.push_str(",\"from\":");
        canon::write_string(from, &mut head);
        head.push_str(",\"to\":");
        canon::write_string(to, &mut head);
        head.push_str(",\"ts\":");
        head.push_str(&ts.to_string());
        head.push_str(",\"payload\":");
        Arc::new(Slot {
            head,
            rest: payload_len + SIG_FIELD,
            text: OnceLock::new(),
            watch: Mutex::default(),
        })
    }

    fn fill(&self, canonical: &str, sig: &str) {
        let mut out = String::with_capacity(self.head.len() + canonical.len() + sig.len() + 10);
        out.push_str(&self.head);
        out.push_str(canonical);
        out.push_str(",\"sig\":");
        canon::write_string(sig, &mut out);
        out.push('}');
        let _ = self.text.set(out.into());
        let mut watch = lock(&self.watch);
        if let Some(completions) = watch.completions.take() {
            lock(&completions).append(&mut watch.tokens);
        }
    }
}

impl Frame {
    /// A complete frame.
    pub fn ready_text(text: Text) -> Frame {
        Frame {
            body: Body::Ready(text),
            lane: Lane::Ordered,
        }
    }

    /// A frame completed when `slot` is (see [`Signed::attach`]).
    pub fn pending(slot: Arc<Slot>) -> Frame {
        Frame {
            body: Body::Pending(slot),
            lane: Lane::Ordered,
        }
    }

    /// The same frame in `lane`.
    pub fn in_lane(mut self, lane: Lane) -> Frame {
        self.lane = lane;
        self
    }

    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Whether `other`, queued after this frame for the same connection, may leave before it
    /// (see [`Lane`]).
    pub fn may_be_passed_by(&self, other: &Frame) -> bool {
        match (self.lane, other.lane) {
            (Lane::Presence(about), Lane::From(sender)) => about != sender,
            (Lane::Refresh(about), Lane::Presence(other)) => about != other,
            (Lane::Refresh(_), _) => true,
            _ => false,
        }
    }

    /// Asks for `token` to be added to `completions` when this frame is complete; returns
    /// true, and asks nothing, if it is complete already. Whoever completes it (a signer thread,
    /// or the loop itself) adds the token: the loop then looks only at the connections whose
    /// frames are ready, not at every one that waits.
    pub fn watch(&self, token: usize, completions: &Completions) -> bool {
        let Body::Pending(slot) = &self.body else {
            return true;
        };
        let mut watch = lock(&slot.watch);
        if slot.text.get().is_some() {
            return true;
        }
        watch
            .completions
            .get_or_insert_with(|| Arc::clone(completions));
        watch.tokens.push(token);
        false
    }

    /// The text, if it is complete.
    pub fn ready(&self) -> Option<&Text> {
        match &self.body {
            Body::Ready(text) => Some(text),
            Body::Pending(slot) => slot.text.get(),
        }
    }

    /// The text. Only for a frame known to be complete (with an in-line signer every frame is,
    /// once the core's deferred work has run): panics on one still waiting, which is a bug in
    /// the caller, never something the network can cause.
    pub fn as_str(&self) -> &str {
        match self.ready() {
            Some(text) => text.as_str(),
            None => panic!("frame not signed yet: {}…", self.head()),
        }
    }

    /// The start of the frame, complete or not: its type, from, to and ts are always there.
    pub fn head(&self) -> &str {
        match &self.body {
            Body::Ready(text) => text.as_str(),
            Body::Pending(slot) => &slot.head,
        }
    }

    /// Its length: exact once complete, else as expected (the payload may not be known yet).
    pub fn len(&self) -> usize {
        match (&self.body, self.ready()) {
            (_, Some(text)) => text.len(),
            (Body::Pending(slot), None) => slot.head.len() + slot.rest,
            (Body::Ready(text), None) => text.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ready() {
            Some(text) => write!(f, "{:?}", text.as_str()),
            None => write!(f, "Pending({:?}…)", self.head()),
        }
    }
}

/// Complete frames compare by text; a pending one equals only itself.
impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        match (self.ready(), other.ready()) {
            (Some(a), Some(b)) => a == b,
            _ => match (&self.body, &other.body) {
                (Body::Pending(a), Body::Pending(b)) => Arc::ptr_eq(a, b),
                _ => false,
            },
        }
    }
}

impl From<Text> for Frame {
    fn from(text: Text) -> Frame {
        Frame::ready_text(text)
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::ready_text(text.into())
    }
}

/// One payload we sign: its canonical text and its signature, made now or later. Cheap to
/// clone (shared); every frame made from it carries the same signature (§3.4).
#[derive(Clone)]
pub struct Signed(Arc<SignedInner>);

struct SignedInner {
    canonical: String,
    sig: OnceLock<String>,
    /// Frames made before the signature was: filled in by [`Signed::complete`].
    waiting: Mutex<Vec<Arc<Slot>>>,
}

impl Signed {
    /// A payload (in canonical form) whose signature is to come: hand it to a signer.
    pub fn pending(canonical: String) -> Signed {
        Signed(Arc::new(SignedInner {
            canonical,
            sig: OnceLock::new(),
            waiting: Mutex::new(Vec::new()),
        }))
    }

    /// A payload signed already (a frame relayed unchanged keeps its sender's `sig`).
    pub fn ready(canonical: String, sig: String) -> Signed {
        let signed = Signed::pending(canonical);
        signed.complete(sig);
        signed
    }

    pub fn canonical(&self) -> &str {
        &self.0.canonical
    }

    /// The signature, once made.
    pub fn sig(&self) -> Option<&str> {
        self.0.sig.get().map(String::as_str)
    }

    /// Records the signature and writes every frame waiting for it. The first call wins.
    pub fn complete(&self, sig: String) {
        let waiting = {
            let mut waiting = lock(&self.0.waiting);
            if self.0.sig.set(sig).is_err() {
                return;
            }
            std::mem::take(&mut *waiting)
        };
        let sig = self.0.sig.get().map_or("", String::as_str);
        for slot in waiting {
            slot.fill(&self.0.canonical, sig);
        }
    }

    /// Makes `slot` carry this payload: written now if the signature is made, else when it is.
    pub fn attach(&self, slot: Arc<Slot>) {
        if let Some(sig) = self.0.sig.get() {
            return slot.fill(&self.0.canonical, sig);
        }
        let mut waiting = lock(&self.0.waiting);
        match self.0.sig.get() {
            // Completed between the two looks: `complete` has taken the list already.
            Some(sig) => {
                drop(waiting);
                slot.fill(&self.0.canonical, sig);
            }
            None => waiting.push(slot),
        }
    }

    /// One frame carrying this payload: the six envelope fields (§1), the payload as its
    /// canonical text, `sig` (now or when it is made).
    pub fn frame(&self, kind: &str, from: &str, to: &str, ts: i64) -> Frame {
        let slot = Slot::with_payload_len(kind, from, to, ts, self.0.canonical.len());
        self.attach(Arc::clone(&slot));
        match slot.text.get() {
            Some(text) => Frame::ready_text(text.clone()),
            None => Frame::pending(slot),
        }
    }
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("canonical", &self.0.canonical)
            .field("signed", &self.0.sig.get().is_some())
            .finish()
    }
}

/// A poisoned lock only means a thread panicked while holding it; the lists it guards (of
/// frames and tokens) are still sound.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_made_before_its_signature_is_written_when_it_comes() {
        let signed = Signed::pending("{\"a\":1}".into());
        let frame = signed.frame("X", "s", "u", 7);
        assert!(frame.ready().is_none());
        assert_eq!(
            frame.head(),
            "{\"type\":\"X\",\"from\":\"s\",\"to\":\"u\",\"ts\":7,\"payload\":"
        );
        signed.complete("SIG".into());
        assert_eq!(
            frame.as_str(),
            "{\"type\":\"X\",\"from\":\"s\",\"to\":\"u\",\"ts\":7,\"payload\":{\"a\":1},\"sig\":\"SIG\"}"
        );
        // Made afterwards: complete at once, the same signature.
        let later = signed.frame("X", "s", "v", 8);
        assert!(later.as_str().ends_with(",\"sig\":\"SIG\"}"));
        // A second completion changes nothing.
        signed.complete("OTHER".into());
        assert_eq!(signed.sig(), Some("SIG"));
    }

    #[test]
    fn a_slot_attached_late_gets_the_payload_decided_late() {
        let slot = Slot::new("LIST_RESPONSE", "s", "u", 1);
        let frame = Frame::pending(Arc::clone(&slot));
        let signed = Signed::pending("{\"users\":[]}".into());
        signed.attach(slot);
        assert!(frame.ready().is_none());
        signed.complete("S".into());
        assert!(
            frame
                .as_str()
                .contains("\"payload\":{\"users\":[]},\"sig\":\"S\"}")
        );
    }

    #[test]
    fn a_frame_for_one_user_passes_presence_of_others_only() {
        let presence = |who: &str| {
            Signed::pending("{}".into())
                .frame("USER_ADVERTISE", "s", "*", 1)
                .in_lane(Lane::presence(who))
        };
        let dm_from = |who: &str| Frame::from("dm".to_string()).in_lane(Lane::from_user(who));
        assert!(presence("bob").may_be_passed_by(&dm_from("alice")));
        // Never the sender's own presence: no message from a user not yet announced.
        assert!(!presence("alice").may_be_passed_by(&dm_from("alice")));
        // Presence never passes presence, and ordered frames are never passed.
        assert!(!presence("bob").may_be_passed_by(&presence("carol")));
        assert!(
            !Signed::pending("{}".into())
                .frame("X", "s", "u", 1)
                .may_be_passed_by(&dm_from("alice"))
        );
        // Signed or not: presence waiting for the socket is passed too (the outbox keeps a
        // frame partly written in its place).
        let signed = Signed::pending("{}".into());
        let done = signed
            .frame("USER_REMOVE", "s", "*", 1)
            .in_lane(Lane::presence("bob"));
        signed.complete("S".into());
        assert!(done.may_be_passed_by(&dm_from("alice")));
        assert!(!done.may_be_passed_by(&dm_from("bob")));
    }

    #[test]
    fn a_watched_frame_reports_its_token_once_complete() {
        let completions = Completions::default();
        let signed = Signed::pending("{}".into());
        let frame = signed.frame("X", "s", "u", 1);
        assert!(!frame.watch(7, &completions));
        assert!(!frame.watch(9, &completions));
        assert!(lock(&completions).is_empty());
        signed.complete("S".into());
        assert_eq!(*lock(&completions), [7, 9]);
        // Complete already: nothing to wait for, nothing recorded.
        assert!(frame.watch(11, &completions));
        assert_eq!(lock(&completions).len(), 2);
    }

    #[test]
    fn completion_races_with_attachment_and_loses_no_frame() {
        for _ in 0..200 {
            let signed = Signed::pending("{}".into());
            let frames: Vec<Frame> = (0..8).map(|i| signed.frame("X", "s", "u", i)).collect();
            let other = signed.clone();
            let t = std::thread::spawn(move || other.complete("S".into()));
            let more: Vec<Frame> = (0..8).map(|i| signed.frame("X", "s", "u", i)).collect();
            t.join().unwrap();
            for f in frames.iter().chain(&more) {
                assert!(f.ready().is_some(), "a frame was left waiting");
            }
        }
    }
}
