//! What `GET /metrics` and `GET /healthz` report (README "Health and metrics").
//!
//! The core counts what only it sees — frames by type, signatures, errors by code, dedup drops,
//! rate-limited logins — in a [`Metrics`] of plain integers, bumped at its choke points (frame
//! dispatch, `Server::sign`, `Server::error`, the dedup check) and read through
//! [`Server::metrics`]. Nothing is allocated per frame, and no decision depends on a counter.
//! The net layer adds what only it sees ([`NetStats`]: connections by stage, bytes waiting for
//! slow readers) and renders both with [`render_prometheus`] or [`render_health`].
//!
//! Label sets are bounded: frame types are the protocol's ([`FRAME_TYPES`]) plus `other` (an
//! unknown type, a frame that does not parse, a binary message); error codes are the six of §10.

use crate::core::dedup::Stale;
use crate::core::server::{Action, Server};
use crate::core::signer::SignStats;
use crate::wire::{ErrorCode, types};
use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;

/// Every frame type of the protocol: the `type` label's values, with `other` for the rest.
pub const FRAME_TYPES: [&str; 30] = [
    types::USER_HELLO,
    types::AUTH_CHALLENGE,
    types::AUTH_RESPONSE,
    types::USER_HELLO_ACK,
    types::USER_REGISTER,
    types::USER_REGISTERED,
    types::USER_LOGIN,
    types::USER_LOGGED_IN,
    types::MSG_DIRECT,
    types::USER_DELIVER,
    types::MSG_PUBLIC_CHANNEL,
    types::FILE_START,
    types::FILE_CHUNK,
    types::FILE_END,
    types::LIST_REQUEST,
    types::LIST_RESPONSE,
    types::PUBLIC_CHANNEL_SNAPSHOT,
    types::PUBLIC_CHANNEL_ADD,
    types::PUBLIC_CHANNEL_UPDATED,
    types::USER_ADVERTISE,
    types::USER_REMOVE,
    types::SERVER_HELLO_JOIN,
    types::SERVER_WELCOME,
    types::SERVER_HELLO_LINK,
    types::SERVER_ANNOUNCE,
    types::SERVER_DELIVER,
    types::HEARTBEAT,
    types::ACK,
    types::ERROR,
    types::CTRL_CLOSE,
];

/// The `type` label of frames whose type is not in [`FRAME_TYPES`].
const OTHER: usize = FRAME_TYPES.len();

/// The error codes of §10, in the order they are rendered.
const ERROR_CODES: [ErrorCode; 6] = [
    ErrorCode::UserNotFound,
    ErrorCode::InvalidSig,
    ErrorCode::BadKey,
    ErrorCode::Timeout,
    ErrorCode::UnknownType,
    ErrorCode::NameInUse,
];

/// Index of `kind` in [`FRAME_TYPES`], or [`OTHER`].
fn type_index(kind: &str) -> usize {
    FRAME_TYPES.iter().position(|t| *t == kind).unwrap_or(OTHER)
}

fn code_index(code: ErrorCode) -> usize {
    match code {
        ErrorCode::UserNotFound => 0,
        ErrorCode::InvalidSig => 1,
        ErrorCode::BadKey => 2,
        ErrorCode::Timeout => 3,
        ErrorCode::UnknownType => 4,
        ErrorCode::NameInUse => 5,
    }
}

/// The type of a frame the server sends, read from its text without parsing all of it. Our
/// own frames begin with `{"type":"…"` ([`crate::wire::encode_frame`]); frames relayed
/// unchanged are as their origin wrote them, so anything else is read with a parser that
/// skips every other field without allocating.
fn sent_type(text: &str) -> usize {
    let rest = text.trim_start();
    if let Some(rest) = rest.strip_prefix('{')
        && let Some(rest) = rest.trim_start().strip_prefix("\"type\"")
        && let Some(rest) = rest.trim_start().strip_prefix(':')
        && let Some(rest) = rest.trim_start().strip_prefix('"')
    {
        // Known types are short and have no escapes: look no further than the longest.
        let window = &rest.as_bytes()[..rest.len().min(32)];
        if let Some(end) = window.iter().position(|&b| b == b'"' || b == b'\\')
            && window[end] == b'"'
        {
            return type_index(&rest[..end]);
        }
    }
    #[derive(serde::Deserialize)]
    struct TypeOnly<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
    }
    match serde_json::from_str::<TypeOnly>(text) {
        Ok(t) => type_index(&t.kind),
        Err(_) => OTHER,
    }
}

/// The core's counters (see the module documentation). Monotonic for the life of the process.
#[derive(Debug)]
pub struct Metrics {
    frames_received: [u64; OTHER + 1],
    frames_sent: [u64; OTHER + 1],
    /// Counted by whoever makes the signatures (the signer, maybe on other threads).
    sign_stats: Arc<SignStats>,
    errors_sent: [u64; ERROR_CODES.len()],
    errors_unsent: u64,
    dedup_duplicates: u64,
    dedup_out_of_window: u64,
    logins_rate_limited: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            frames_received: [0; OTHER + 1],
            frames_sent: [0; OTHER + 1],
            sign_stats: Arc::default(),
            errors_sent: [0; ERROR_CODES.len()],
            errors_unsent: 0,
            dedup_duplicates: 0,
            dedup_out_of_window: 0,
            logins_rate_limited: 0,
        }
    }
}

impl Metrics {
    // ------------------------------------------------------------ counting (the core)

    /// A text frame of type `kind` was dispatched; `None`: it did not parse.
    pub(crate) fn frame_received(&mut self, kind: Option<&str>) {
        self.frames_received[kind.map_or(OTHER, type_index)] += 1;
    }

    /// Counts `action` if it is a frame leaving the core (one per recipient).
    pub(crate) fn frame_leaving(&mut self, action: &Action) {
        if let Action::Send { text, .. } | Action::Route { text, .. } = action {
            self.frames_sent[sent_type(text.head())] += 1;
        }
    }

    /// Where the signature counts come from (the signer in use).
    pub(crate) fn set_sign_stats(&mut self, stats: Arc<SignStats>) {
        self.sign_stats = stats;
    }

    pub(crate) fn error_sent(&mut self, code: ErrorCode) {
        self.errors_sent[code_index(code)] += 1;
    }

    /// An error not sent: the connection's error budget was spent (§10).
    pub(crate) fn error_unsent(&mut self) {
        self.errors_unsent += 1;
    }

    /// A frame from a peer dropped by the seen-cache (§6 *Dedup*).
    pub(crate) fn dedup_drop(&mut self, why: Stale) {
        match why {
            Stale::Duplicate => self.dedup_duplicates += 1,
            Stale::OutOfWindow => self.dedup_out_of_window += 1,
        }
    }

    /// A login attempt refused by a login budget (§5.3).
    pub(crate) fn login_rate_limited(&mut self) {
        self.logins_rate_limited += 1;
    }

    // ------------------------------------------------------------ reading

    /// Text frames received of type `kind` (any unknown type reads the `other` count).
    pub fn frames_received(&self, kind: &str) -> u64 {
        self.frames_received[type_index(kind)]
    }

    /// Frames sent of type `kind`, one per recipient.
    pub fn frames_sent(&self, kind: &str) -> u64 {
        self.frames_sent[type_index(kind)]
    }

    /// Signatures made with the server's key.
    pub fn signatures(&self) -> u64 {
        self.sign_stats.signatures()
    }

    /// Time spent making them.
    pub fn signing_seconds(&self) -> f64 {
        self.sign_stats.seconds()
    }

    pub fn errors_sent(&self, code: ErrorCode) -> u64 {
        self.errors_sent[code_index(code)]
    }

    pub fn errors_unsent(&self) -> u64 {
        self.errors_unsent
    }

    pub fn dedup_drops(&self, why: Stale) -> u64 {
        match why {
            Stale::Duplicate => self.dedup_duplicates,
            Stale::OutOfWindow => self.dedup_out_of_window,
        }
    }

    pub fn logins_rate_limited(&self) -> u64 {
        self.logins_rate_limited
    }
}

/// What the core knows about who is here, read when a report is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census<'a> {
    pub server_id: &'a str,
    /// Servers we have a live link to, sorted.
    pub links: Vec<&'a str>,
    /// Users logged in here.
    pub users_local: usize,
    /// Users online anywhere in the mesh, ours included.
    pub users_mesh: usize,
    /// Open WebSockets that are not yet a user or a link (hello under way, a dial waiting for
    /// its welcome).
    pub conns_pending: usize,
    pub conns_user: usize,
    pub conns_peer: usize,
}

impl Server {
    /// The core's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Who is here now. Walks the connection table: for reports, not for the hot path.
    pub fn census(&self) -> Census<'_> {
        let counts = self.conn_counts();
        Census {
            server_id: &self.id,
            links: self.fed.linked(),
            users_local: self.dir.local_conns().count(),
            users_mesh: self.dir.len(),
            conns_pending: counts.pending,
            conns_user: counts.user,
            conns_peer: counts.peer,
        }
    }
}

/// What the net layer knows, read when a report is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    pub uptime_ms: u64,
    /// Sockets before their WebSocket is up: accepted (request head not read yet), in the
    /// server handshake, or dialled (connecting, client handshake).
    pub handshaking: usize,
    /// Sockets answering a plain HTTP request.
    pub http: usize,
    /// Sockets whose close frame is sent, lingering for the peer's reply.
    pub closing: usize,
    /// Bytes waiting in outboxes for sockets that did not take them.
    pub outbox_bytes: usize,
    /// Connections whose socket refused data (slow readers).
    pub blocked: usize,
}

/// `GET /healthz`: a small JSON object for scripts and load balancers.
pub fn render_health(census: &Census, net: &NetStats) -> String {
    serde_json::json!({
        "status": "ok",
        "server_id": census.server_id,
        "uptime_s": net.uptime_ms / 1000,
        "links_up": census.links.len(),
        "links": census.links,
        "users_local": census.users_local,
        "users_mesh": census.users_mesh,
    })
    .to_string()
}

/// Writes one metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn label_value(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(v);
    }
    Cow::Owned(
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

/// `GET /metrics`: the Prometheus text exposition format, version 0.0.4.
pub fn render_prometheus(m: &Metrics, census: &Census, net: &NetStats) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let o = &mut out;
    family(
        o,
        "socp_server_info",
        "gauge",
        "This server's id, as a label.",
    );
    let id = label_value(census.server_id);
    let _ = writeln!(o, "socp_server_info{{server_id=\"{id}\"}} 1");
    family(
        o,
        "socp_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
    );
    let _ = writeln!(o, "socp_uptime_seconds {}", net.uptime_ms / 1000);

    family(
        o,
        "socp_connections",
        "gauge",
        "Open connections by stage: handshake (before the WebSocket is up), http (a plain \
         HTTP request), pending (hello under way), user, peer, closing.",
    );
    for (kind, n) in [
        ("handshake", net.handshaking),
        ("http", net.http),
        ("pending", census.conns_pending),
        ("user", census.conns_user),
        ("peer", census.conns_peer),
        ("closing", net.closing),
    ] {
        let _ = writeln!(o, "socp_connections{{kind=\"{kind}\"}} {n}");
    }
    family(
        o,
        "socp_users_online",
        "gauge",
        "Users online: logged in here (local), anywhere in the mesh (mesh).",
    );
    let _ = writeln!(
        o,
        "socp_users_online{{scope=\"local\"}} {}",
        census.users_local
    );
    let _ = writeln!(
        o,
        "socp_users_online{{scope=\"mesh\"}} {}",
        census.users_mesh
    );
    family(o, "socp_links_up", "gauge", "Live links to other servers.");
    let _ = writeln!(o, "socp_links_up {}", census.links.len());

    family(
        o,
        "socp_frames_received_total",
        "counter",
        "Text frames received, by type (other: unknown, unparsable or binary).",
    );
    let types = FRAME_TYPES.iter().chain(std::iter::once(&"other"));
    for (t, n) in types.clone().zip(&m.frames_received) {
        let _ = writeln!(o, "socp_frames_received_total{{type=\"{t}\"}} {n}");
    }
    family(
        o,
        "socp_frames_sent_total",
        "counter",
        "Frames sent, by type, one per recipient.",
    );
    for (t, n) in types.zip(&m.frames_sent) {
        let _ = writeln!(o, "socp_frames_sent_total{{type=\"{t}\"}} {n}");
    }
    family(
        o,
        "socp_errors_sent_total",
        "counter",
        "ERROR frames sent, by code.",
    );
    for (code, n) in ERROR_CODES.iter().zip(&m.errors_sent) {
        let _ = writeln!(
            o,
            "socp_errors_sent_total{{code=\"{}\"}} {n}",
            code.as_str()
        );
    }
    family(
        o,
        "socp_errors_suppressed_total",
        "counter",
        "Errors not sent because the connection's error budget was spent.",
    );
    let _ = writeln!(o, "socp_errors_suppressed_total {}", m.errors_unsent);

    family(
        o,
        "socp_signatures_total",
        "counter",
        "Signatures made with the server's key.",
    );
    let _ = writeln!(o, "socp_signatures_total {}", m.signatures());
    family(
        o,
        "socp_signing_seconds_total",
        "counter",
        "Seconds spent making them.",
    );
    let _ = writeln!(o, "socp_signing_seconds_total {}", m.signing_seconds());

    family(
        o,
        "socp_dedup_drops_total",
        "counter",
        "Frames from other servers dropped by the seen-cache: seen before (duplicate), or \
         a timestamp outside the window (out_of_window).",
    );
    let _ = writeln!(
        o,
        "socp_dedup_drops_total{{reason=\"duplicate\"}} {}",
        m.dedup_duplicates
    );
    let _ = writeln!(
        o,
        "socp_dedup_drops_total{{reason=\"out_of_window\"}} {}",
        m.dedup_out_of_window
    );
    family(
        o,
        "socp_logins_rate_limited_total",
        "counter",
        "Password logins refused by a login budget.",
    );
    let _ = writeln!(
        o,
        "socp_logins_rate_limited_total {}",
        m.logins_rate_limited
    );

    family(
        o,
        "socp_outbox_bytes",
        "gauge",
        "Bytes waiting for connections whose socket did not take them (slow readers).",
    );
    let _ = writeln!(o, "socp_outbox_bytes {}", net.outbox_bytes);
    family(
        o,
        "socp_blocked_connections",
        "gauge",
        "Connections whose socket currently refuses data.",
    );
    let _ = writeln!(o, "socp_blocked_connections {}", net.blocked);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{SignedPayload, encode_frame};
    use serde_json::json;

    #[test]
    fn sent_frames_are_typed_from_their_text() {
        let signed = SignedPayload::unsigned(&json!({"a": 1})).unwrap();
        let ours = encode_frame(types::USER_DELIVER, "s", "u", 1, &signed);
        assert_eq!(FRAME_TYPES[sent_type(&ours)], types::USER_DELIVER);
        // As other servers write them: spaces, `type` later, escapes.
        let spaced = r#"{ "type" : "HEARTBEAT", "from": "x"}"#;
        assert_eq!(FRAME_TYPES[sent_type(spaced)], types::HEARTBEAT);
        let later = r#"{"from":"x","payload":{"type":"ERROR"},"type":"USER_ADVERTISE"}"#;
        assert_eq!(FRAME_TYPES[sent_type(later)], types::USER_ADVERTISE);
        let escaped = r#"{"type":"ACK","from":"x"}"#;
        assert_eq!(FRAME_TYPES[sent_type(escaped)], types::ACK);
        assert_eq!(FRAME_TYPES[sent_type(r#"{"type":"\u0041CK"}"#)], types::ACK);
        assert_eq!(sent_type(r#"{"type":"FROBNICATE"}"#), OTHER);
        assert_eq!(
            sent_type(r#"{"type":"VERY_LONG_TYPE_NAME_THAT_GOES_ON_AND_ON"}"#),
            OTHER
        );
        assert_eq!(sent_type("not json"), OTHER);
        assert_eq!(sent_type(r#"{"from":"x"}"#), OTHER);
    }

    #[test]
    fn received_and_sent_frames_are_counted_by_type_with_other_for_the_rest() {
        let mut m = Metrics::default();
        m.frame_received(Some(types::MSG_DIRECT));
        m.frame_received(Some("FROBNICATE"));
        m.frame_received(None);
        assert_eq!(m.frames_received(types::MSG_DIRECT), 1);
        assert_eq!(m.frames_received("other"), 2);
        assert_eq!(m.frames_received(types::ACK), 0);
        let signed = SignedPayload::unsigned(&json!({})).unwrap();
        let text =
            crate::wire::frame::Frame::from(encode_frame(types::ERROR, "s", "u", 1, &signed));
        // One still waiting for its signature counts by its type all the same.
        let pending =
            crate::wire::frame::Signed::pending("{}".into()).frame(types::ERROR, "s", "u", 1);
        let conn = crate::core::server::ConnId(1);
        for action in [
            Action::Send { conn, text },
            Action::Route {
                conn,
                text: pending,
            },
            Action::Close {
                conn,
                code: crate::core::server::CloseCode::Normal,
                reason: "",
            },
        ] {
            m.frame_leaving(&action);
        }
        assert_eq!(m.frames_sent(types::ERROR), 2);
    }

    fn census() -> Census<'static> {
        Census {
            server_id: "srv-\"a\"",
            links: vec!["srv-b", "srv-c"],
            users_local: 2,
            users_mesh: 5,
            conns_pending: 1,
            conns_user: 2,
            conns_peer: 2,
        }
    }

    #[test]
    fn the_exposition_has_help_and_type_for_every_family_and_one_sample_per_series() {
        let mut m = Metrics::default();
        m.frame_received(Some(types::MSG_DIRECT));
        m.error_sent(ErrorCode::UserNotFound);
        m.dedup_drop(Stale::OutOfWindow);
        m.login_rate_limited();
        let net = NetStats {
            uptime_ms: 61_500,
            handshaking: 3,
            http: 1,
            closing: 0,
            outbox_bytes: 4096,
            blocked: 1,
        };
        let text = render_prometheus(&m, &census(), &net);
        assert!(text.ends_with('\n'));
        let mut typed = Vec::new();
        let mut series = std::collections::HashSet::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                let next = lines.next().unwrap();
                assert!(next.starts_with(&format!("# TYPE {name} ")), "{next}");
                typed.push(name.to_string());
                continue;
            }
            let (s, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
            let name = s.split('{').next().unwrap();
            assert_eq!(typed.last().map(String::as_str), Some(name), "{line}");
            assert!(series.insert(s.to_string()), "{line}");
        }
        for expected in [
            r#"socp_server_info{server_id="srv-\"a\""} 1"#,
            "socp_uptime_seconds 61",
            r#"socp_connections{kind="handshake"} 3"#,
            r#"socp_connections{kind="http"} 1"#,
            r#"socp_connections{kind="pending"} 1"#,
            r#"socp_connections{kind="user"} 2"#,
            r#"socp_connections{kind="peer"} 2"#,
            r#"socp_users_online{scope="local"} 2"#,
            r#"socp_users_online{scope="mesh"} 5"#,
            "socp_links_up 2",
            r#"socp_frames_received_total{type="MSG_DIRECT"} 1"#,
            r#"socp_frames_received_total{type="other"} 0"#,
            r#"socp_frames_sent_total{type="CTRL_CLOSE"} 0"#,
            r#"socp_errors_sent_total{code="USER_NOT_FOUND"} 1"#,
            r#"socp_errors_sent_total{code="NAME_IN_USE"} 0"#,
            r#"socp_dedup_drops_total{reason="duplicate"} 0"#,
            r#"socp_dedup_drops_total{reason="out_of_window"} 1"#,
            "socp_logins_rate_limited_total 1",
            "socp_signatures_total 0",
            "socp_signing_seconds_total 0",
            "socp_outbox_bytes 4096",
            "socp_blocked_connections 1",
        ] {
            assert!(text.lines().any(|l| l == expected), "{expected}\n{text}");
        }
        // Bounded: one series per known type and `other`, in and out.
        let frames = text
            .lines()
            .filter(|l| l.starts_with("socp_frames_"))
            .count();
        assert_eq!(frames, 2 * (FRAME_TYPES.len() + 1));
    }

    #[test]
    fn health_is_a_small_json_object() {
        let net = NetStats {
            uptime_ms: 12_345,
            ..NetStats::default()
        };
        let v: serde_json::Value = serde_json::from_str(&render_health(&census(), &net)).unwrap();
        assert_eq!(
            v,
            json!({"status": "ok", "server_id": "srv-\"a\"", "uptime_s": 12, "links_up": 2,
                   "links": ["srv-b", "srv-c"], "users_local": 2, "users_mesh": 5})
        );
    }

    #[test]
    fn every_frame_type_is_listed_once() {
        let set: std::collections::HashSet<_> = FRAME_TYPES.iter().collect();
        assert_eq!(set.len(), FRAME_TYPES.len());
        assert!(!FRAME_TYPES.contains(&"other"));
    }
}
