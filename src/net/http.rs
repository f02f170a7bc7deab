//! Plain HTTP on the WebSocket port: `GET /healthz` and `GET /metrics` (README "Health and
//! metrics"). Sans-IO: the net layer peeks at an accepted connection's request head and asks
//! [`classify`] what it is; a WebSocket upgrade goes on to tungstenite's handshake unchanged,
//! anything else is answered with one bounded response and the connection is closed.
//!
//! Not an HTTP server: one request per connection, no bodies read, no keep-alive.

use crate::core::metrics::{self, NetStats};
use crate::core::server::Server;

/// Most bytes of a request head looked at. A head still incomplete at this size goes to
/// tungstenite's handshake, which accepts up to 64 KiB, so no WebSocket client that worked
/// before is refused; a plain request that large is not ours to answer.
pub const MAX_HEAD: usize = 8 * 1024;

/// Headers parsed at most: as many as tungstenite's handshake allows.
const MAX_HEADERS: usize = 124;

pub const JSON: &str = "application/json";
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a plain request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
}

/// What an accepted connection's first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The head is not complete: wait for more bytes (the handshake deadline bounds the wait).
    Incomplete,
    /// A WebSocket upgrade, or a head too large to judge: tungstenite's handshake takes it.
    WebSocket,
    /// A plain HTTP request, answered here.
    Plain(Plain),
}

/// A plain HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plain {
    /// `GET` (or `HEAD`, the head of the reply alone) of a known path.
    Get { route: Route, head_only: bool },
    /// Anything else: an error status. 400: not HTTP; 404: an unknown path; 405: another
    /// method on a known path.
    Refused { status: u16, head_only: bool },
}

/// Classifies the first `buf.len()` bytes of a connection; `full`: that is all [`MAX_HEAD`]
/// allows, no more will be looked at.
pub fn classify(buf: &[u8], full: bool) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if full => Request::WebSocket,
        Ok(httparse::Status::Partial) => Request::Incomplete,
        // tungstenite allows no more: it answers this one as before.
        Err(httparse::Error::TooManyHeaders) => Request::WebSocket,
        Err(_) => Request::Plain(Plain::Refused {
            status: 400,
            head_only: false,
        }),
        Ok(httparse::Status::Complete(_)) => {
            // tungstenite's handshake requires `Upgrade: websocket`: every request it accepts
            // goes to it, whatever the path.
            let upgrade = req.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("upgrade")
                    && h.value
                        .windows(9)
                        .any(|w| w.eq_ignore_ascii_case(b"websocket"))
            });
            if upgrade {
                return Request::WebSocket;
            }
            let method = req.method.unwrap_or("");
            let head_only = method == "HEAD";
            let path = req.path.unwrap_or("");
            let path = path.split(['?', '#']).next().unwrap_or(path);
            let route = match path {
                "/healthz" => Route::Health,
                "/metrics" => Route::Metrics,
                _ => {
                    return Request::Plain(Plain::Refused {
                        status: 404,
                        head_only,
                    });
                }
            };
            Request::Plain(if method == "GET" || head_only {
                Plain::Get { route, head_only }
            } else {
                Plain::Refused {
                    status: 405,
                    head_only,
                }
            })
        }
    }
}

/// One complete response; the connection closes after it.
pub fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// The answer to a plain request: a report from `core` and `net`, or an error.
pub fn answer(request: Plain, core: &Server, net: &NetStats) -> Vec<u8> {
    match request {
        Plain::Get {
            route: Route::Health,
            head_only,
        } => {
            let body = metrics::render_health(&core.census(), net);
            response(200, JSON, body.as_bytes(), head_only)
        }
        Plain::Get {
            route: Route::Metrics,
            head_only,
        } => {
            let body = metrics::render_prometheus(core.metrics(), &core.census(), net);
            response(200, PROMETHEUS, body.as_bytes(), head_only)
        }
        Plain::Refused { status, head_only } => {
            let body = match status {
                404 => "not found: try /healthz or /metrics\n",
                405 => "method not allowed: GET or HEAD\n",
                _ => "bad request\n",
            };
            let text = "text/plain; charset=utf-8";
            response(status, text, body.as_bytes(), head_only)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(route: Route) -> Request {
        Request::Plain(Plain::Get {
            route,
            head_only: false,
        })
    }

    fn refused(status: u16) -> Request {
        Request::Plain(Plain::Refused {
            status,
            head_only: false,
        })
    }

    #[test]
    fn plain_requests_are_routed_and_upgrades_go_to_the_websocket_handshake() {
        let c = |s: &str| classify(s.as_bytes(), false);
        assert_eq!(
            c("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
            get(Route::Health)
        );
        assert_eq!(c("GET /metrics HTTP/1.0\r\n\r\n"), get(Route::Metrics));
        assert_eq!(c("GET /metrics?x=1 HTTP/1.1\r\n\r\n"), get(Route::Metrics));
        assert_eq!(
            c("HEAD /healthz HTTP/1.1\r\n\r\n"),
            Request::Plain(Plain::Get {
                route: Route::Health,
                head_only: true
            })
        );
        assert_eq!(c("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), refused(404));
        assert_eq!(c("GET /healthz/ HTTP/1.1\r\n\r\n"), refused(404));
        assert_eq!(c("POST /nope HTTP/1.1\r\n\r\n"), refused(404));
        assert_eq!(c("POST /healthz HTTP/1.1\r\n\r\n"), refused(405));
        assert_eq!(c("PUT /metrics HTTP/1.1\r\n\r\n"), refused(405));
        assert_eq!(c("hello\r\n\r\n"), refused(400));
        assert_eq!(c("GET /healthz HTTP/2.0\r\n\r\n"), refused(400));
        assert_eq!(c("\x16\x03\x01\x00"), refused(400));
        // Upgrades, on any path; the header's case does not matter.
        let upgrade = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
                       upgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(c(upgrade), Request::WebSocket);
        assert_eq!(
            c("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
            Request::WebSocket
        );
        // An upgrade to something else is not ours to refuse or accept: answered as plain.
        assert_eq!(
            c("GET /healthz HTTP/1.1\r\nUpgrade: h2c\r\n\r\n"),
            get(Route::Health)
        );
    }

    #[test]
    fn an_incomplete_head_waits_unless_the_buffer_is_full() {
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
        assert_eq!(classify(head, false), Request::Incomplete);
        assert_eq!(classify(b"", false), Request::Incomplete);
        assert_eq!(classify(b"GET /heal", false), Request::Incomplete);
        assert_eq!(classify(head, true), Request::WebSocket);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS + 1 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(classify(&many, false), Request::WebSocket);
    }

    /// Every prefix of a request waits for the rest; random bytes never panic, and bytes that
    /// are refused as not HTTP stay refused whatever follows (so waiting could not change it).
    #[test]
    fn prefixes_wait_and_random_bytes_are_judged_without_panicking() {
        let full = b"GET /metrics HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n";
        for end in 0..full.len() {
            assert_eq!(classify(&full[..end], false), Request::Incomplete, "{end}");
        }
        assert_eq!(classify(full, false), get(Route::Metrics));
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 {
                // Mostly a real head with one byte changed: the interesting cases.
                buf = full.to_vec();
                let at = (next() as usize) % buf.len();
                buf[at] = next() as u8;
                buf.truncate((next() as usize) % (buf.len() + 1));
            }
            let verdict = classify(&buf, false);
            if verdict == refused(400) {
                buf.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
                assert_eq!(classify(&buf, false), refused(400), "{buf:?}");
            }
        }
    }

    #[test]
    fn responses_are_complete_and_close_the_connection() {
        let r = String::from_utf8(response(200, JSON, b"{}", false)).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n{}"
        );
        let r = String::from_utf8(response(405, "text/plain", b"no", true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.contains("\r\nAllow: GET, HEAD\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Length: 2\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "HEAD: no body: {r}");
    }
}
