//! A connection's outbox: the messages its socket has not taken yet, in the order they leave
//! (frames waiting for their signatures among them), and the fragmented writes that hand them
//! to tungstenite.

use crate::net::Stream;
use crate::wire::frame::{Frame, Lane};
use std::collections::VecDeque;
use std::io::ErrorKind;
use tungstenite::{Error as WsError, Message, WebSocket};

/// Largest WebSocket frame we send: bigger messages go as a fragmented message (RFC 6455 §5.4).
/// tungstenite reserves its write buffer per frame and never shrinks it, so without this every
/// connection would keep a buffer as large as the largest frame it was ever sent — a directory
/// snapshot is ~0.8 KiB per online user, which made idle memory grow with users × connections.
const FRAGMENT: usize = 4096;

/// Messages for one connection that its socket has not taken yet. While a socket refuses
/// data, what follows waits here as the shared [`Text`](crate::wire::Text) it was sent as (a
/// broadcast is one allocation for all its recipients), not copied into tungstenite's write
/// buffer, which would keep that size for as long as the connection lives. tungstenite holds
/// at most the one frame that met `WouldBlock`.
///
/// A frame whose signature is still being made waits here too, holding back only the frames
/// behind it on this connection (issue "signatures off the loop").
#[derive(Default)]
pub(super) struct Outbox {
    /// Messages in order.
    queue: VecDeque<Waiting>,
    /// Bytes waiting in `queue` (of a frame not complete yet, the part known).
    bytes: usize,
    /// Frames in `queue` not complete when queued (some may be by now).
    pending: usize,
}

/// One message in an [`Outbox`].
struct Waiting {
    frame: Frame,
    /// How many of its bytes tungstenite already has.
    offset: usize,
    /// What it adds to [`Outbox::bytes`].
    charged: usize,
    /// It was not complete when queued (counted in [`Outbox::pending`]).
    pending: bool,
}

/// What handing queued messages to tungstenite came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pumped {
    /// Everything is written.
    Drained,
    /// The socket refused data.
    Blocked,
    /// The next message's signature is not made yet.
    Signing,
}

/// What writing a message (from byte `offset`) to tungstenite came to.
pub(super) enum Wrote {
    /// All of it is written.
    All,
    /// The socket refused data: tungstenite holds the frame that met `WouldBlock`; the
    /// message's bytes from this offset on still have to be written.
    Blocked(usize),
}

/// Writes `text` from byte `offset` as one message, in frames of at most [`FRAGMENT`] bytes
/// (zero-copy slices of the shared text; the first frame of a fragmented message says `Text`,
/// the others `Continue`). Stops at the first frame that meets `WouldBlock`.
pub(super) fn write_from(
    ws: &mut WebSocket<Stream>,
    text: &crate::wire::Text,
    offset: usize,
) -> Result<Wrote, WsError> {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let blocked = |e: &WsError| matches!(e, WsError::Io(e) if e.kind() == ErrorKind::WouldBlock);
    if offset == 0 && text.len() <= FRAGMENT {
        return match ws.write(Message::Text(text.clone())) {
            Ok(()) => Ok(Wrote::All),
            Err(e) if blocked(&e) => Ok(Wrote::Blocked(text.len())),
            Err(e) => Err(e),
        };
    }
    let bytes: &tungstenite::Bytes = text.as_ref();
    let mut start = offset;
    while start < bytes.len() {
        let end = (start + FRAGMENT).min(bytes.len());
        let opcode = if start == 0 {
            Data::Text
        } else {
            Data::Continue
        };
        let frame = Frame::message(
            bytes.slice(start..end),
            OpCode::Data(opcode),
            end == bytes.len(),
        );
        match ws.write(Message::Frame(frame)) {
            Ok(()) => {}
            Err(e) if blocked(&e) => return Ok(Wrote::Blocked(end)),
            Err(e) => return Err(e),
        }
        start = end;
    }
    Ok(Wrote::All)
}

impl Outbox {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether a queued frame still waits for its signature.
    pub(super) fn has_pending(&mut self) -> bool {
        self.unsigned() > 0
    }

    /// The first queued frame still waiting for its signature.
    pub(super) fn first_unsigned(&self) -> Option<&Frame> {
        self.first_unsigned_at().map(|at| &self.queue[at].frame)
    }

    /// Where the first queued frame still waiting for its signature is.
    pub(super) fn first_unsigned_at(&self) -> Option<usize> {
        self.queue
            .iter()
            .position(|w| w.pending && w.frame.ready().is_none())
    }

    /// How many messages wait.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Bytes waiting (of a frame not complete yet, the part known).
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many queued frames still wait for their signatures.
    pub(super) fn unsigned(&mut self) -> usize {
        if self.pending > 0 {
            for w in &mut self.queue {
                if w.pending && w.frame.ready().is_some() {
                    w.pending = false;
                    self.pending -= 1;
                }
            }
        }
        self.pending
    }

    /// Frames here that still wait for their signatures, presence apart: what a sender feeding
    /// this connection is paused for ([`SIGN_BACKLOG`](crate::net::conn::SIGN_BACKLOG)).
    /// Presence (and refreshed adverts) is not counted: it is not what a sender sends, and
    /// routed frames pass it.
    pub(super) fn signing_backlog(&mut self) -> usize {
        if self.unsigned() == 0 {
            return 0;
        }
        self.queue
            .iter()
            .filter(|w| {
                w.pending && !matches!(w.frame.lane(), Lane::Presence(_) | Lane::Refresh(_))
            })
            .count()
    }

    /// Where `frame` goes: at the back, or before the presence it may pass (see
    /// [`crate::wire::frame::Lane`]: a frame carried for one user passes presence of others
    /// not written yet). Never before a message partly written: its remaining fragments must
    /// follow the ones tungstenite has.
    pub(super) fn place_for(&self, frame: &Frame) -> usize {
        let mut at = self.queue.len();
        while at > 0 {
            let before = &self.queue[at - 1];
            if before.offset > 0 || !before.frame.may_be_passed_by(frame) {
                break;
            }
            at -= 1;
        }
        at
    }

    #[cfg(test)]
    fn push(&mut self, frame: Frame, offset: usize) {
        self.insert(self.queue.len(), frame, offset);
    }

    pub(super) fn insert(&mut self, at: usize, frame: Frame, offset: usize) {
        let len = frame.len();
        // (An empty message at offset 0 is still a message to send.)
        if offset < len || offset == 0 {
            let charged = len - offset;
            let pending = frame.ready().is_none();
            self.bytes += charged;
            self.pending += usize::from(pending);
            self.queue.insert(
                at,
                Waiting {
                    frame,
                    offset,
                    charged,
                    pending,
                },
            );
        }
    }

    fn pop(&mut self) {
        if let Some(w) = self.queue.pop_front() {
            self.bytes -= w.charged;
            self.pending -= usize::from(w.pending);
        }
    }

    /// Hands queued messages to tungstenite until one meets `WouldBlock`, one is not signed
    /// yet, or the queue is empty. Call only when tungstenite's own buffer is flushed.
    pub(super) fn pump(&mut self, ws: &mut WebSocket<Stream>) -> Result<Pumped, WsError> {
        while let Some(w) = self.queue.front_mut() {
            let Some(text) = w.frame.ready() else {
                return Ok(Pumped::Signing);
            };
            match write_from(ws, text, w.offset)? {
                Wrote::All => self.pop(),
                Wrote::Blocked(next) => {
                    let left = text.len() - next;
                    self.bytes = self.bytes - w.charged + left;
                    w.charged = left;
                    w.offset = next;
                    if next == text.len() {
                        self.pop();
                    }
                    return Ok(Pumped::Blocked);
                }
            }
        }
        self.release();
        Ok(Pumped::Drained)
    }

    /// Gives back the queue's memory once it is empty. Frames wait here for their signatures
    /// on every connection now, not only on a full socket, so without this every connection
    /// would keep the largest queue it ever had (a login burst: one slot per newcomer's
    /// advert), and idle memory would grow by kilobytes per connection.
    fn release(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
    }

    /// Hands everything to tungstenite, whatever the socket takes (before a close frame,
    /// which must come last). Gives up at the first error other than `WouldBlock`: after the
    /// peer's close tungstenite refuses every write, and everything queued is dropped. A frame
    /// still waiting for its signature is dropped too (only after the peer's close: a close we
    /// start waits for them).
    pub(super) fn spill(&mut self, ws: &mut WebSocket<Stream>) {
        while let Some(w) = self.queue.pop_front() {
            let Some(text) = w.frame.ready() else {
                continue; // the peer closed: nothing more can be sent
            };
            let mut offset = w.offset;
            while offset < text.len() {
                match write_from(ws, text, offset) {
                    Ok(Wrote::All) => break,
                    Ok(Wrote::Blocked(next)) => offset = next,
                    Err(_) => {
                        self.queue.clear();
                        break;
                    }
                }
            }
        }
        self.bytes = 0;
        self.pending = 0;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::net::signpool;
    use crate::net::tls::{MaybeTls, TlsStream};
    use crate::wire::Text;
    use mio::net::TcpStream;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    use tungstenite::protocol::Role;
    use tungstenite::protocol::WebSocketConfig;

    /// Reads `n` messages, each a text message, as a client does.
    pub(in crate::net) fn read_texts<S: Read + Write>(
        ws: &mut WebSocket<S>,
        n: usize,
    ) -> Vec<String> {
        (0..n)
            .map(|_| match ws.read().expect("read") {
                Message::Text(t) => t.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// A frame carried for a user passes presence of other users not written yet, never the
    /// sender's own presence, another routed frame, or a message partly written.
    #[test]
    fn a_routed_frame_passes_presence_of_others_only_never_a_message_partly_written() {
        use crate::wire::frame::{Lane, Signed};
        let presence = |who: &str| {
            Signed::pending("{}".into())
                .frame("USER_ADVERTISE", "s", "*", 1)
                .in_lane(Lane::presence(who))
        };
        let dm = |from: &str, n: u32| Frame::from(format!("dm {n}")).in_lane(Lane::from_user(from));
        let mut out = Outbox::default();
        out.push(dm("alice", 0), 0);
        out.push(presence("bob"), 0);
        out.push(presence("alice"), 0);
        out.push(presence("carol"), 0);
        // Passes carol's, stops behind alice's own.
        assert_eq!(out.place_for(&dm("alice", 1)), 3);
        // bob's frame passes carol's and alice's, stops behind bob's.
        assert_eq!(out.place_for(&dm("bob", 1)), 2);
        // dave's passes all three, stops behind alice's DM (routed frames keep their order).
        let at = out.place_for(&dm("dave", 1));
        assert_eq!(at, 1);
        out.insert(at, dm("dave", 1), 0);
        assert_eq!(out.place_for(&dm("dave", 2)), 2);
        // An ordered frame (a snapshot, an error) is never put ahead of anything.
        assert_eq!(
            out.place_for(&Frame::from("x".to_string())),
            out.queue.len()
        );
        // Backlog counts routed frames only.
        assert_eq!(out.signing_backlog(), 0);
        assert_eq!(out.unsigned(), 3);

        // Signed presence waiting for the socket is passed too; the rest of a message partly
        // written never is.
        let signed = |who: &str| {
            Signed::ready("{}".into(), "S".into())
                .frame("USER_REMOVE", "s", "*", 1)
                .in_lane(Lane::presence(who))
        };
        let mut out = Outbox::default();
        out.push(signed("bob"), 7);
        out.push(signed("carol"), 0);
        assert_eq!(out.place_for(&dm("alice", 1)), 1);
        let mut out = Outbox::default();
        out.push(signed("bob"), 0);
        out.push(signed("carol"), 0);
        assert_eq!(out.place_for(&dm("alice", 1)), 0);

        // A refreshed advert is passed by every frame (its user's own messages, an ordered
        // heartbeat, presence of others) but presence of its user; it is not a backlog.
        let refresh = Signed::pending("{}".into())
            .frame("USER_ADVERTISE", "s", "*", 1)
            .in_lane(Lane::refresh("alice"));
        let mut out = Outbox::default();
        out.push(dm("alice", 0), 0);
        out.push(refresh, 0);
        assert_eq!(out.place_for(&dm("alice", 1)), 1);
        assert_eq!(out.place_for(&dm("bob", 1)), 1);
        assert_eq!(out.place_for(&Frame::from("heartbeat".to_string())), 1);
        assert_eq!(out.place_for(&presence("bob")), 1);
        assert_eq!(out.place_for(&presence("alice")), 2);
        assert_eq!(out.signing_backlog(), 0);
    }

    /// Frames whose signatures complete out of order (a pool of four signers, each sleeping a
    /// random time before each job), mixed with frames complete from the start, leave one
    /// connection in the order they were queued, each with a valid signature.
    #[test]
    fn frames_leave_in_order_when_signatures_complete_out_of_order() {
        use crate::core::signer::{Signer, Urgency};
        use crate::wire::frame::Signed;
        use std::sync::{Condvar, Mutex};

        #[derive(Default)]
        struct Bell(Mutex<bool>, Condvar);
        impl signpool::Wake for Arc<Bell> {
            fn wake(&self) {
                *self.0.lock().unwrap() = true;
                self.1.notify_all();
            }
        }
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/keys/server1.pem"
        ))
        .expect("test key");
        let key = Arc::new(crate::crypto::PrivateKey::from_pem(&pem).expect("key"));
        let public = key.public_key().clone();
        let bell = Arc::new(Bell::default());
        let pool = signpool::SignPool::start_with_jitter(key, 4, Box::new(Arc::clone(&bell)), 4000)
            .expect("pool");
        let woken = pool.woken();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        const N: usize = 120;
        let reader = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut ws = WebSocket::from_raw_socket(MaybeTls::Plain(stream), Role::Client, None);
            read_texts(&mut ws, N)
        });
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_nonblocking(true).expect("non-blocking");
        let config = WebSocketConfig::default().write_buffer_size(0);
        let mut ws = WebSocket::from_raw_socket(
            MaybeTls::Plain(TcpStream::from_std(stream)),
            Role::Server,
            Some(config),
        );

        let mut out = Outbox::default();
        for i in 0..N {
            if i % 3 == 0 {
                out.push(Frame::from(format!("ready {i}")), 0);
                continue;
            }
            let signed = Signed::pending(format!("{{\"i\":{i}}}"));
            let urgency = if i % 2 == 0 {
                Urgency::Bulk
            } else {
                Urgency::Conversation
            };
            pool.submit(&signed, urgency);
            out.push(signed.frame("X", "s", "u", i as i64), 0);
        }
        assert!(out.has_pending());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "the outbox never drained");
            woken.store(false, Ordering::SeqCst);
            let pumped = match ws.flush() {
                Ok(()) => out.pump(&mut ws).expect("pump"),
                Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => Pumped::Blocked,
                Err(e) => panic!("flush: {e}"),
            };
            match pumped {
                Pumped::Drained if ws.flush().is_ok() => break,
                Pumped::Signing => {
                    let mut rung = bell.0.lock().unwrap();
                    while !*rung && !woken.load(Ordering::SeqCst) {
                        rung = bell
                            .1
                            .wait_timeout(rung, Duration::from_millis(50))
                            .unwrap()
                            .0;
                    }
                    *rung = false;
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        assert!(!out.has_pending());
        assert_eq!(out.bytes, 0);
        let got = reader.join().expect("reader");
        for (i, text) in got.iter().enumerate() {
            if i % 3 == 0 {
                assert_eq!(text, &format!("ready {i}"));
                continue;
            }
            let env = crate::wire::Envelope::parse(text).expect("a frame");
            assert_eq!(env.ts, i as i64, "frame {i} out of order: {text}");
            assert!(crate::wire::verify_payload_sig(&public, &env.payload, &env.sig).unwrap());
        }
    }

    /// Three messages, the middle one far larger than the socket buffers, written the way
    /// `Conn::send` and `Conn::flush` do while the peer is not reading yet: each arrives
    /// whole and in order, and what the socket cannot take waits in the outbox.
    #[test]
    fn the_outbox_keeps_messages_whole_and_in_order_across_a_full_socket() {
        outbox_across_a_full_socket(false);
    }

    /// The same over TLS: rustls's own buffer fills too, and a write it cannot take is
    /// `WouldBlock`, so the outbox takes over just as on plain TCP.
    #[test]
    fn the_outbox_keeps_messages_whole_and_in_order_across_a_full_tls_socket() {
        outbox_across_a_full_socket(true);
    }

    fn outbox_across_a_full_socket(tls: bool) {
        let fixture = |name: &str| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tls")
                .join(name)
        };
        let (server_tls, client_tls) = if tls {
            let server =
                crate::net::tls::server_config(&fixture("server.pem"), &fixture("server.key"))
                    .expect("server TLS");
            let client =
                crate::net::tls::client_config(Some(&fixture("ca.pem"))).expect("client TLS");
            (Some(server), Some(client))
        } else {
            (None, None)
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let reader = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let stream = match client_tls {
                Some(config) => {
                    let name = crate::net::tls::server_name("localhost").expect("name");
                    let mut tls = TlsStream::client(&config, name, stream).expect("TLS client");
                    tls.handshake().expect("TLS handshake");
                    MaybeTls::Tls(Box::new(tls))
                }
                None => MaybeTls::Plain(stream),
            };
            let mut ws = WebSocket::from_raw_socket(stream, Role::Client, None);
            std::thread::sleep(Duration::from_millis(300)); // let the writer's socket fill
            read_texts(&mut ws, 3)
        });
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_nonblocking(true).expect("non-blocking");
        let stream = TcpStream::from_std(stream);
        let mut stream = match server_tls {
            Some(config) => {
                let conn = rustls::ServerConnection::new(config).expect("TLS server");
                MaybeTls::Tls(Box::new(TlsStream::new(conn.into(), stream)))
            }
            None => MaybeTls::Plain(stream),
        };
        // The TLS handshake runs as the stream is read (in the server, inside tungstenite's).
        let deadline = Instant::now() + Duration::from_secs(10);
        while let MaybeTls::Tls(t) = &mut stream
            && t.is_handshaking()
        {
            assert!(Instant::now() < deadline, "TLS handshake");
            match t.read(&mut [0u8; 1]) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                other => panic!("read during the handshake: {other:?}"),
            }
        }
        let config = WebSocketConfig::default().write_buffer_size(0);
        let mut ws = WebSocket::from_raw_socket(stream, Role::Server, Some(config));

        let big: String = (0..32 << 20)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let texts = ["first".to_string(), big, "last".to_string()];
        let mut out = Outbox::default();
        let mut blocked = false;
        for t in &texts {
            let text = Text::from(t.clone());
            if blocked || !out.is_empty() {
                out.push(Frame::ready_text(text), 0);
                continue;
            }
            match write_from(&mut ws, &text, 0).expect("write") {
                Wrote::All => {}
                Wrote::Blocked(next) => {
                    blocked = true;
                    out.push(Frame::ready_text(text), next);
                }
            }
        }
        assert!(blocked && !out.is_empty(), "32 MiB did not fill the socket");
        assert!(
            out.bytes > 16 << 20,
            "the rest waits in the outbox: {}",
            out.bytes
        );

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "the outbox never drained");
            let flushed = match ws.flush() {
                Ok(()) => out.pump(&mut ws).expect("pump") == Pumped::Drained,
                Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => false,
                Err(e) => panic!("flush: {e}"),
            };
            if flushed && ws.flush().is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.bytes, 0);
        assert_eq!(reader.join().expect("reader"), texts);
    }
}
