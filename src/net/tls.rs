//! TLS for `wss://` (issue "Ready for operators and scripts", item 7): rustls on the aws-lc-rs
//! provider, for the server's listener, its dials to `wss://` peers, and the `socp` client.
//!
//! A connection's byte stream is a [`MaybeTls`]: plain TCP, or a [`TlsStream`] that drives a
//! rustls [`Connection`] over the socket itself with `read_tls` / `process_new_packets` /
//! `write_tls`, as rustls's `tlsserver-mio` example does. Both implement `Read + Write`, so
//! tungstenite's `WebSocket<S>` and its handshakes run over either unchanged.
//!
//! Rules that keep the event loop right (DESIGN.md "Rules of the event loop") on a non-blocking
//! socket:
//! - `read` returns `WouldBlock` only when rustls holds no decrypted data *and* the socket is
//!   drained, so "read until `WouldBlock`" never leaves plaintext behind with no readiness event
//!   to come for it (tungstenite issue #54).
//! - TLS records leave eagerly: every `write` pushes what the socket takes, and `flush` writes
//!   out the rest or returns `WouldBlock` (the socket is full: the next writable event flushes
//!   again). Records that reading produced (handshake messages, alerts, session tickets) are
//!   written at once, or by the next read or flush.
//! - A write that rustls's buffer cannot take (its 64 KiB limit) is `WouldBlock`, never `Ok(0)`
//!   (which tungstenite would take for a reset).
//!
//! PEM files are read with rustls-pki-types; system roots come from `rustls-native-certs`.
//! Certificate checks are in addition to the key pins of PROTOCOL.md §4.2 and §5.2, never
//! instead of them.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use std::io::{self, ErrorKind, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// The crypto provider every TLS configuration here uses: aws-lc-rs (the project's crypto
/// library), with its default cipher suites and key exchange groups.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in the PEM file at `path`; an error names the file.
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let fail = |e: pem::Error| format!("{what} {}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(fail)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate (BEGIN CERTIFICATE) in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The server side: the certificate chain (leaf first) and its private key, both PEM.
/// Errors name the file and say what is wrong (unreadable, no key in it, key and certificate
/// that do not match).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain = certificates(cert, "TLS certificate")?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "TLS key {}: no PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE \
             KEY) in it",
            key.display()
        ),
        e => format!("TLS key {}: {e}", key.display()),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "TLS certificate {} with key {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// The client side (the `socp` client, and a server dialling `wss://` peers): trusts the
/// certificates in `ca_file` (PEM) if given, *instead of* the system's roots (as `curl
/// --cacert` does); otherwise the system's roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path, "CA file")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(format!(
                    "no system root certificates found{why}: give the server's CA certificate \
                     with --ca-file"
                ));
            }
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name a `wss://` server's certificate must carry: the URL's host, a DNS name or an IP
/// address (brackets of an IPv6 address removed).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("TLS server name {host:?}: {e}"))
}

/// A connection's byte stream: plain TCP, or TLS over it. tungstenite's `WebSocket<S>` runs
/// over either unchanged.
pub enum MaybeTls<S: Read + Write> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S: Read + Write> MaybeTls<S> {
    /// The socket underneath (for its address, options and registration with a poll).
    pub fn tcp(&self) -> &S {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(t) => &t.sock,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl<S: Read + Write> Read for MaybeTls<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            MaybeTls::Plain(s) => s.read(buf),
            MaybeTls::Tls(t) => t.read(buf),
        }
    }
}

impl<S: Read + Write> Write for MaybeTls<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MaybeTls::Plain(s) => s.write(buf),
            MaybeTls::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            MaybeTls::Plain(s) => s.flush(),
            MaybeTls::Tls(t) => t.flush(),
        }
    }
}

/// A rustls connection (server or client side) over its socket, driven by hand: see the
/// module documentation for how it behaves on a non-blocking socket.
pub struct TlsStream<S: Read + Write> {
    conn: Connection,
    sock: S,
    /// Decrypted bytes taken out of rustls by [`TlsStream::peek`], read again first.
    peeked: Vec<u8>,
}

impl<S: Read + Write> TlsStream<S> {
    /// `conn` over `sock`; the TLS handshake runs as the stream is read and written.
    pub fn new(conn: Connection, sock: S) -> TlsStream<S> {
        TlsStream {
            conn,
            sock,
            peeked: Vec::new(),
        }
    }

    /// The server side of an accepted socket; the TLS handshake runs as it is read.
    pub fn server(config: &Arc<ServerConfig>, sock: S) -> io::Result<TlsStream<S>> {
        let conn = rustls::ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        Ok(TlsStream::new(conn.into(), sock))
    }

    /// The client side of a connected socket, checking the server's certificate for `name`.
    /// The handshake runs as it is read and written (or with [`TlsStream::handshake`]).
    pub fn client(
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
        sock: S,
    ) -> io::Result<TlsStream<S>> {
        let conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
        Ok(TlsStream::new(conn.into(), sock))
    }

    /// Whether the TLS handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Completes the TLS handshake on a blocking socket, so that a refused certificate is
    /// reported as what it is, before any WebSocket traffic.
    pub fn handshake(&mut self) -> io::Result<()> {
        while self.conn.is_handshaking() {
            let (read, wrote) = self.conn.complete_io(&mut self.sock)?;
            if read == 0 && wrote == 0 && self.conn.is_handshaking() {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                ));
            }
        }
        Ok(())
    }

    /// Like `TcpStream::peek`: up to `buf.len()` decrypted bytes that the next reads return
    /// again (at least one; `WouldBlock` when none has arrived; `Ok(0)` at end of stream).
    /// Drives the TLS handshake as reading does.
    pub fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.peeked.len() < buf.len() {
            let mut chunk = [0u8; 4096];
            let want = (buf.len() - self.peeked.len()).min(chunk.len());
            match self.read_decrypted(&mut chunk[..want]) {
                Ok(0) => break,
                Ok(n) => self.peeked.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock && !self.peeked.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        let n = self.peeked.len().min(buf.len());
        buf[..n].copy_from_slice(&self.peeked[..n]);
        Ok(n)
    }

    /// Sends a `close_notify` alert (the end of what we send), as far as the socket takes it.
    pub fn close_notify(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        self.write_records()
    }

    /// Writes buffered TLS records until none is left (`Ok`) or the socket is full
    /// (`WouldBlock`).
    fn write_records(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// [`TlsStream::write_records`] where a full socket is not an error: what is left goes
    /// with the next write or flush (a writable event follows a full socket).
    fn write_records_if_possible(&mut self) -> io::Result<()> {
        match self.write_records() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

impl<S: Read + Write> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.peeked.is_empty() {
            let n = self.peeked.len().min(buf.len());
            buf[..n].copy_from_slice(&self.peeked[..n]);
            self.peeked.drain(..n);
            return Ok(n);
        }
        self.read_decrypted(buf)
    }
}

impl<S: Read + Write> TlsStream<S> {
    /// Reads decrypted data, reading and decrypting records as needed (see the module
    /// documentation: `WouldBlock` only when rustls holds none and the socket is drained).
    fn read_decrypted(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.write_records_if_possible()?;
        loop {
            // Decrypted data first: there may be some left from earlier records.
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Data, a clean close (close_notify: Ok(0)), or the TCP stream ended without
                // one (UnexpectedEof).
                other => return other,
            }
            // None left: read records until the socket has no more (WouldBlock). At end of
            // stream (Ok(0)) the reader above says how the stream ended.
            self.conn.read_tls(&mut self.sock)?;
            if let Err(e) = self.conn.process_new_packets() {
                // rustls queued an alert for the peer: send it if the socket takes it.
                let _ = self.write_records();
                return Err(io::Error::new(ErrorKind::InvalidData, e));
            }
            // Handshake messages and the like go out at once.
            self.write_records_if_possible()?;
        }
    }
}

impl<S: Read + Write> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.conn.writer().write(buf)?;
            if n > 0 {
                // Eager: the records leave now, as far as the socket takes them; a socket
                // error shows on the next write or flush.
                let _ = self.write_records_if_possible();
                return Ok(n);
            }
            // rustls's buffer is at its limit: the socket has to take some first.
            if !self.conn.wants_write() {
                // Plaintext waiting for the handshake to finish: reading moves it on.
                return Err(ErrorKind::WouldBlock.into());
            }
            self.write_records()?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.writer().flush()?;
        self.write_records()?;
        self.sock.flush()
    }
}

impl<S: Read + Write> Drop for TlsStream<S> {
    /// Says goodbye properly (a `close_notify` alert), so the peer sees a clean end of stream
    /// rather than a truncation. One attempt: a full socket just misses it.
    fn drop(&mut self) {
        self.conn.send_close_notify();
        let _ = self.conn.write_tls(&mut self.sock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    /// A non-blocking server side and a blocking client side, handshake done.
    fn pair() -> (
        TlsStream<std::net::TcpStream>,
        TlsStream<std::net::TcpStream>,
    ) {
        let server = server_config(&fixture("server.pem"), &fixture("server.key")).unwrap();
        let client = client_config(Some(&fixture("ca.pem"))).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dialler = std::thread::spawn(move || {
            let sock = std::net::TcpStream::connect(addr).unwrap();
            let name = server_name("127.0.0.1").unwrap();
            let mut tls = TlsStream::client(&client, name, sock).unwrap();
            tls.handshake().unwrap();
            tls
        });
        let (sock, _) = listener.accept().unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut accepted = TlsStream::server(&server, sock).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while accepted.is_handshaking() {
            assert!(Instant::now() < deadline, "handshake");
            match accepted.read(&mut [0u8; 1]) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                other => panic!("{other:?}"),
            }
        }
        (accepted, dialler.join().unwrap())
    }

    /// tungstenite issue #54, for TLS: once the socket is drained, rustls may still hold
    /// decrypted data, and no readiness event will come for it. A read returns `WouldBlock`
    /// only when there is none, so one pass of "read until `WouldBlock`" gets everything,
    /// even in pieces far smaller than the records.
    #[test]
    fn reading_until_would_block_leaves_no_decrypted_data_behind() {
        let (mut server, mut client) = pair();
        let mut sent = Vec::new();
        for i in 0..200 {
            let record = format!("message {i:03} {}\n", "x".repeat(i % 50));
            client.write_all(record.as_bytes()).unwrap();
            client.flush().unwrap();
            sent.extend_from_slice(record.as_bytes());
        }
        std::thread::sleep(Duration::from_millis(200)); // all of it in the server's socket
        let mut got = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match server.read(&mut buf) {
                Ok(0) => panic!("end of stream"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), sent.len());
        assert_eq!(got, sent);
    }

    /// A full socket makes writes `WouldBlock` (never `Ok(0)`), and `flush` says whether
    /// records still wait; everything written arrives once the peer reads.
    #[test]
    fn a_full_socket_is_would_block_and_flush_finishes_the_job() {
        let (mut server, mut client) = pair();
        let chunk = vec![b'z'; 16 * 1024];
        let mut written = 0usize;
        let mut blocked = false;
        while written < 64 << 20 {
            match server.write(&chunk) {
                Ok(0) => panic!("Ok(0) from write"),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    blocked = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(blocked, "64 MiB never filled the socket");
        let reader = std::thread::spawn(move || {
            let mut total = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while total < written {
                let n = client.read(&mut buf).expect("read");
                assert!(n > 0, "end of stream after {total}");
                assert!(buf[..n].iter().all(|&b| b == b'z'));
                total += n;
            }
            total
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "never flushed");
            match server.flush() {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(reader.join().unwrap(), written);
    }
}
