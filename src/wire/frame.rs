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

/// The text of a frame to send.
#[derive(Clone)]
pub enum Frame {
    Ready(Text),
    /// Waiting for a signature; shared by every connection it goes to.
    Pending(Arc<Slot>),
}

/// A frame whose payload and signature are still to come.
pub struct Slot {
    /// The envelope up to and including `"payload":`.
    head: String,
    /// The length of the rest, when known (payload and `sig`): what the frame will weigh in
    /// a connection's queue before it is complete.
    rest: usize,
    text: OnceLock<Text>,
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
    }
}

impl Frame {
    /// The text, if it is complete.
    pub fn ready(&self) -> Option<&Text> {
        match self {
            Frame::Ready(text) => Some(text),
            Frame::Pending(slot) => slot.text.get(),
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
        match self {
            Frame::Ready(text) => text.as_str(),
            Frame::Pending(slot) => &slot.head,
        }
    }

    /// Its length: exact once complete, else as expected (the payload may not be known yet).
    pub fn len(&self) -> usize {
        match (self, self.ready()) {
            (_, Some(text)) => text.len(),
            (Frame::Pending(slot), None) => slot.head.len() + slot.rest,
            (Frame::Ready(text), None) => text.len(),
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
            _ => match (self, other) {
                (Frame::Pending(a), Frame::Pending(b)) => Arc::ptr_eq(a, b),
                _ => false,
            },
        }
    }
}

impl From<Text> for Frame {
    fn from(text: Text) -> Frame {
        Frame::Ready(text)
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::Ready(text.into())
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
            Some(text) => Frame::Ready(text.clone()),
            None => Frame::Pending(slot),
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

/// A poisoned lock only means a thread panicked while holding it; the list is still sound.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
        let frame = Frame::Pending(Arc::clone(&slot));
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
