//! Every tunable of the server in one [`Config`], and the `socp-server` command line that fills it.
//!
//! Sources, strongest first: command-line flags, `SOCP_*` environment variables, defaults.
//! With no arguments at all the server picks a data directory, creates its key and database
//! there, and listens on `127.0.0.1:8765`.

use std::path::PathBuf;

/// A peer to dial at start, with the key we pin for it (PROTOCOL.md §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub host: String,
    pub port: u16,
    /// `wss://`: dialled over TLS, the certificate checked against `--ca-file` or the system's
    /// roots (in addition to the pinned key).
    pub tls: bool,
    /// The peer's public key as given (any accepted encoding); checked to parse at start-up.
    pub pubkey: String,
}

impl Bootstrap {
    /// Parses `ws://host:port#<pubkey>` or `wss://…` (IPv6 hosts in brackets:
    /// `ws://[::1]:9000#...`).
    pub fn parse(text: &str) -> Result<Bootstrap, String> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("wss://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("ws://") {
            (false, rest)
        } else {
            return Err(format!(
                "bootstrap {text:?}: must start with ws:// or wss://"
            ));
        };
        let (addr, pubkey) = rest
            .split_once('#')
            .ok_or_else(|| format!("bootstrap {text:?}: missing #<pubkey> to pin"))?;
        let addr = addr.trim_end_matches('/');
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("bootstrap {text:?}: missing :port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .map_err(|_| format!("bootstrap {text:?}: bad port {port:?}"))?;
        if host.is_empty() || port == 0 {
            return Err(format!("bootstrap {text:?}: missing host or port"));
        }
        crate::crypto::PublicKey::parse(pubkey)
            .map_err(|e| format!("bootstrap {text:?}: pinned key: {e}"))?;
        Ok(Bootstrap {
            host: host.to_string(),
            port,
            tls,
            pubkey: pubkey.to_string(),
        })
    }
}

/// The server's configuration. Durations are in milliseconds so the core can run on simulated
/// time.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1`: a fresh server is reachable only locally.
    pub host: String,
    /// Port to listen on. Default 8765. 0 picks a free port (tests).
    pub port: u16,
    /// Where the key and database go by default (`--data-dir`, `SOCP_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Our server id; default: the one in the key file, or a new UUID v4 saved there.
    pub server_id: Option<String>,
    /// SQLite database file. Default `<data dir>/socp.db`; env `SOCP_DB`.
    pub db: PathBuf,
    /// Key file holding our id and RSA-4096 key (mode 0600). Default `<data dir>/server.key`;
    /// env `SOCP_SERVER_KEYFILE`.
    pub key: PathBuf,
    /// Peers to dial, each with its pinned key (used by federation).
    pub bootstrap: Vec<Bootstrap>,
    /// Serve `wss://`: the certificate chain (PEM, leaf first) and its private key (PEM).
    /// Both or neither; env `SOCP_TLS_CERT`, `SOCP_TLS_KEY`. Default: plain `ws://`.
    pub tls: Option<TlsFiles>,
    /// CA certificates (PEM) trusted for `wss://` peers instead of the system's roots (a private
    /// CA). Env `SOCP_CA_FILE`. Default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Whether servers learned of from other servers (`SERVER_WELCOME`, `SERVER_ANNOUNCE`) or
    /// remembered from an earlier run are dialled with `wss://`: announces carry host and port
    /// only. `--peer-scheme ws|wss`, env `SOCP_PEER_SCHEME`. Default: `wss` when this server
    /// serves TLS, else `ws` (a federation's servers are assumed to be set up alike).
    /// `--bootstrap` peers always use their own URL's scheme.
    pub peer_tls: bool,
    /// A WebSocket handshake must finish within this. Default 10 000 ms.
    pub handshake_timeout_ms: u64,
    /// A connection must complete its hello (§5.2) within this. Default 30 000 ms: a login
    /// with 600 000 PBKDF2 rounds on a slow client still fits.
    pub hello_timeout_ms: u64,
    /// Most simultaneous connections (users and peers); more are refused at accept. Default 4096.
    pub max_connections: usize,
    /// Largest incoming WebSocket message and frame. Default 65 536 bytes: a file chunk with
    /// its signatures is under 3 KiB, a directory snapshot from a peer stays well below.
    pub max_message_size: usize,
    /// Per-connection read buffer. Default 4096 bytes: allocated per connection, so it is the
    /// main per-idle-connection cost.
    pub read_buffer_size: usize,
    /// Bytes queued for a connection that does not read before it is closed. Default 32 MiB:
    /// a directory snapshot is ~0.8 KiB per online user, so this holds one for ~40 000 users.
    pub max_write_buffer: usize,
    /// Errors answered per connection before further ones are dropped unanswered (every error
    /// costs a signature). Bucket size; it refills at [`Config::error_refill_per_s`].
    pub error_burst: u32,
    /// Refill rate of the error budget, per second. Default 4.
    pub error_refill_per_s: u32,
    /// Largest message on a link we dialled: `SERVER_WELCOME` carries the whole directory.
    /// Default 16 MiB.
    pub max_peer_message_size: usize,
    /// Host peers should dial to reach us (sent in hellos and announces). Default: `host`,
    /// or 127.0.0.1 when listening on every address.
    pub advertise_host: Option<String>,
    /// Accept links from servers whose key is not pinned (introducer mode). Default off.
    pub open_join: bool,
    /// Dial every server we learn of (full mesh). `--no-mesh`: only bootstrap peers.
    pub mesh: bool,
    /// `HEARTBEAT` interval. Default 15 000 ms (§4.4).
    pub heartbeat_ms: u64,
    /// A link silent this long is dead. Default 45 000 ms (§4.4).
    pub dead_after_ms: u64,
    /// Longest delay between redials. Default 60 000 ms (§4.4).
    pub backoff_max_ms: u64,
    /// Largest file a local user may send, in bytes. Default 64 MiB (§9).
    pub max_file_size: i64,
    /// File transfers one user may have under way at once. Default 4.
    pub max_transfers_per_user: usize,
    /// A transfer with no frame for this long is aborted. Default 60 000 ms.
    pub transfer_idle_ms: u64,
    /// A connection whose socket has refused our data this long is closed (a reader that does
    /// not keep up). Shorter than a link's death time, so a stalled user is dropped before the
    /// backpressure it causes can starve a server link. Default 30 000 ms.
    pub slow_reader_timeout_ms: u64,
    /// Threads that make the server's signatures, off the event loop. `--sign-threads N`,
    /// env `SOCP_SIGN_THREADS`; `0` signs on the loop itself (one-core machines). Default: the
    /// number of CPUs available to the process.
    pub sign_threads: usize,
}

impl Config {
    /// Defaults rooted in `data_dir`.
    pub fn with_data_dir(data_dir: PathBuf) -> Config {
        Config {
            host: "127.0.0.1".into(),
            port: 8765,
            server_id: None,
            db: data_dir.join("socp.db"),
            key: data_dir.join("server.key"),
            data_dir,
            bootstrap: Vec::new(),
            tls: None,
            ca_file: None,
            peer_tls: false,
            handshake_timeout_ms: 10_000,
            hello_timeout_ms: 30_000,
            max_connections: 4096,
            max_message_size: 64 * 1024,
            read_buffer_size: 4096,
            max_write_buffer: 32 << 20,
            error_burst: 32,
            error_refill_per_s: 4,
            max_peer_message_size: 16 << 20,
            advertise_host: None,
            open_join: false,
            mesh: true,
            heartbeat_ms: 15_000,
            dead_after_ms: 45_000,
            backoff_max_ms: 60_000,
            max_file_size: 64 << 20,
            max_transfers_per_user: 4,
            transfer_idle_ms: 60_000,
            slow_reader_timeout_ms: 30_000,
            sign_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The certificate and key files a TLS listener serves (`--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The default data directory: `$SOCP_DATA_DIR`, else `$XDG_DATA_HOME/socp-server`, else
/// `$HOME/.local/share/socp-server`, else `./socp-data`.
pub fn default_data_dir(env: &dyn Fn(&str) -> Option<String>, app: &str) -> PathBuf {
    if let Some(dir) = env("SOCP_DATA_DIR").filter(|s| !s.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env("XDG_DATA_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(dir).join(app);
    }
    if let Some(home) = env("HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(home).join(".local/share").join(app);
    }
    PathBuf::from("./socp-data")
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Config),
    PrintPubkey(Config),
    /// The help text, with the data directory this invocation would use.
    Help(String),
    Version,
}

/// `socp-server --help`, naming the data directory this invocation would use (`data_dir`).
pub fn server_usage(data_dir: &std::path::Path) -> String {
    SERVER_USAGE.replace("{DATA_DIR}", &data_dir.display().to_string())
}

const SERVER_USAGE: &str = "\
socp-server: a SOCP v1.3 chat server

USAGE: socp-server [OPTIONS]

OPTIONS:
  --host HOST             listen address            [env SOCP_HOST, default 127.0.0.1]
  --port PORT             listen port (0: any free)  [env SOCP_PORT, default 8765]
  --server-id ID          this server's id           [env SOCP_SERVER_ID, default: from key file]
  --data-dir DIR          where key and database go  [env SOCP_DATA_DIR, default
                          $XDG_DATA_HOME/socp-server or ~/.local/share/socp-server;
                          here: {DATA_DIR}]
  --db PATH               SQLite database            [env SOCP_DB, default DIR/socp.db]
  --key PATH              key file (mode 0600)       [env SOCP_SERVER_KEYFILE, default DIR/server.key]
  --bootstrap URL#KEY     peer to link to, ws://host:port#<pubkey> or wss://…; repeatable
                                                     [env SOCP_BOOTSTRAP, space-separated]
  --tls-cert PATH         serve wss://: certificate chain, PEM  [env SOCP_TLS_CERT]
  --tls-key PATH          its private key, PEM (both or neither) [env SOCP_TLS_KEY]
  --ca-file PATH          CA certificates (PEM) trusted for wss:// peers instead of the
                          system's roots [env SOCP_CA_FILE]
  --peer-scheme ws|wss    how to dial servers learned of from other servers
                          [env SOCP_PEER_SCHEME, default wss with --tls-cert, else ws]
  --max-connections N     connection limit           [default 4096]
  --hello-timeout-ms MS   time allowed to finish the hello [default 30000]
  --handshake-timeout-ms MS  time allowed for the WebSocket handshake [default 10000]
  --max-write-buffer BYTES   bytes queued for a client that does not read before it
                          is disconnected [default 33554432]
  --open-join             accept links from servers whose key is not pinned
                          [env SOCP_OPEN_JOIN=1|0|true|false|yes|no|on|off]
  --no-mesh               dial only --bootstrap peers, not every server learned of
  --advertise-host HOST   host peers should dial to reach us [env SOCP_ADVERTISE_HOST,
                          default: --host, or 127.0.0.1 when that is 0.0.0.0/::]
  --heartbeat-ms MS       heartbeat interval between servers [default 15000]
  --dead-after-ms MS      a silent link is dead after this [default 45000]
  --backoff-max-ms MS     longest wait between redials of a peer [default 60000]
  --max-file-size BYTES   largest file a user here may send [default 67108864]
  --transfer-idle-ms MS   abort a file transfer idle this long [default 60000]
  --slow-reader-timeout-ms MS  close a connection that has not taken our data for this
                          long [default 30000]
  --sign-threads N        threads that make the server's signatures, off the event loop;
                          0 signs on the loop (one-core machines) [default: the CPUs
                          available; env SOCP_SIGN_THREADS]
  --print-pubkey          print this server's public key (what peers pin) and exit
  -h, --help              this help
  -V, --version           version

Logging: RUST_LOG=debug|info|warn (default info). At info: links up and down, the first
failure of a peer, then a summary at most every 10 attempts and 5 minutes; every attempt at debug.
";

/// Parses the server command line. `env` looks up environment variables (injected for tests).
pub fn parse_server_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Command, String> {
    use lexopt::prelude::*;

    let mut parser = lexopt::Parser::from_args(args);
    let mut flags = ServerFlags::default();
    let mut print_pubkey = false;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("host") => flags.host = Some(string(&mut parser)?),
            Long("port") => flags.port = Some(string(&mut parser)?),
            Long("server-id") => flags.server_id = Some(string(&mut parser)?),
            Long("data-dir") => flags.data_dir = Some(string(&mut parser)?),
            Long("db") => flags.db = Some(string(&mut parser)?),
            Long("key") => flags.key = Some(string(&mut parser)?),
            Long("bootstrap") => flags.bootstrap.push(string(&mut parser)?),
            Long("tls-cert") => flags.tls_cert = Some(string(&mut parser)?),
            Long("tls-key") => flags.tls_key = Some(string(&mut parser)?),
            Long("ca-file") => flags.ca_file = Some(string(&mut parser)?),
            Long("peer-scheme") => flags.peer_scheme = Some(string(&mut parser)?),
            Long("max-connections") => flags.max_connections = Some(string(&mut parser)?),
            Long("hello-timeout-ms") => flags.hello_timeout_ms = Some(string(&mut parser)?),
            Long("handshake-timeout-ms") => flags.handshake_timeout_ms = Some(string(&mut parser)?),
            Long("max-write-buffer") => flags.max_write_buffer = Some(string(&mut parser)?),
            Long("print-pubkey") => print_pubkey = true,
            Long("open-join") => flags.open_join = true,
            Long("no-mesh") => flags.no_mesh = true,
            Long("advertise-host") => flags.advertise_host = Some(string(&mut parser)?),
            Long("heartbeat-ms") => flags.heartbeat_ms = Some(string(&mut parser)?),
            Long("dead-after-ms") => flags.dead_after_ms = Some(string(&mut parser)?),
            Long("backoff-max-ms") => flags.backoff_max_ms = Some(string(&mut parser)?),
            Long("max-file-size") => flags.max_file_size = Some(string(&mut parser)?),
            Long("transfer-idle-ms") => flags.transfer_idle_ms = Some(string(&mut parser)?),
            Long("sign-threads") => flags.sign_threads = Some(string(&mut parser)?),
            Long("slow-reader-timeout-ms") => {
                flags.slow_reader_timeout_ms = Some(string(&mut parser)?)
            }
            Short('h') | Long("help") => {
                let dir = flags
                    .data_dir
                    .or_else(|| env("SOCP_DATA_DIR").filter(|s| !s.is_empty()))
                    .map(PathBuf::from)
                    .unwrap_or_else(|| default_data_dir(env, "socp-server"));
                return Ok(Command::Help(server_usage(&dir)));
            }
            Short('V') | Long("version") => return Ok(Command::Version),
            _ => return Err(arg.unexpected().to_string()),
        }
    }

    let pick =
        |flag: Option<String>, var: &str| flag.or_else(|| env(var).filter(|s| !s.is_empty()));
    let data_dir = pick(flags.data_dir, "SOCP_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| default_data_dir(env, "socp-server"));
    let mut cfg = Config::with_data_dir(data_dir);
    if let Some(host) = pick(flags.host, "SOCP_HOST") {
        cfg.host = host;
    }
    if let Some(port) = pick(flags.port, "SOCP_PORT") {
        cfg.port = port
            .parse()
            .map_err(|_| format!("invalid port {port:?}: expected 0-65535"))?;
    }
    if let Some(id) = pick(flags.server_id, "SOCP_SERVER_ID") {
        if !crate::wire::ids::is_valid_id(&id) {
            return Err(format!(
                "invalid server id {id:?}: use a UUID or 1-64 characters of [A-Za-z0-9._-]"
            ));
        }
        cfg.server_id = Some(id);
    }
    if let Some(db) = pick(flags.db, "SOCP_DB") {
        cfg.db = PathBuf::from(db);
    }
    if let Some(key) = pick(flags.key, "SOCP_SERVER_KEYFILE") {
        cfg.key = PathBuf::from(key);
    }
    let bootstrap: Vec<String> = if flags.bootstrap.is_empty() {
        env("SOCP_BOOTSTRAP")
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    } else {
        flags.bootstrap
    };
    cfg.bootstrap = bootstrap
        .iter()
        .map(|b| Bootstrap::parse(b))
        .collect::<Result<_, _>>()?;
    cfg.tls = match (
        pick(flags.tls_cert, "SOCP_TLS_CERT"),
        pick(flags.tls_key, "SOCP_TLS_KEY"),
    ) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(
                "--tls-cert needs --tls-key (or SOCP_TLS_KEY): give both or neither".into(),
            );
        }
        (None, Some(_)) => {
            return Err(
                "--tls-key needs --tls-cert (or SOCP_TLS_CERT): give both or neither".into(),
            );
        }
    };
    cfg.ca_file = pick(flags.ca_file, "SOCP_CA_FILE").map(PathBuf::from);
    cfg.peer_tls = match pick(flags.peer_scheme, "SOCP_PEER_SCHEME").as_deref() {
        None => cfg.tls.is_some(),
        Some("ws") => false,
        Some("wss") => true,
        Some(other) => return Err(format!("--peer-scheme: expected ws or wss, got {other:?}")),
    };
    if let Some(n) = flags.max_connections {
        cfg.max_connections = parse_positive("--max-connections", &n)?;
    }
    if let Some(ms) = flags.hello_timeout_ms {
        cfg.hello_timeout_ms = parse_positive("--hello-timeout-ms", &ms)? as u64;
    }
    if let Some(ms) = flags.handshake_timeout_ms {
        cfg.handshake_timeout_ms = parse_positive("--handshake-timeout-ms", &ms)? as u64;
    }
    if let Some(bytes) = flags.max_write_buffer {
        // tungstenite needs room for at least one whole message beyond its buffer.
        cfg.max_write_buffer =
            parse_positive("--max-write-buffer", &bytes)?.max(2 * cfg.max_message_size);
    }
    cfg.open_join = flags.open_join || env_bool(env, "SOCP_OPEN_JOIN")?.unwrap_or(false);
    cfg.mesh = !flags.no_mesh;
    cfg.advertise_host = pick(flags.advertise_host, "SOCP_ADVERTISE_HOST");
    if let Some(ms) = flags.heartbeat_ms {
        cfg.heartbeat_ms = parse_positive("--heartbeat-ms", &ms)? as u64;
    }
    if let Some(ms) = flags.dead_after_ms {
        cfg.dead_after_ms = parse_positive("--dead-after-ms", &ms)? as u64;
    }
    if let Some(ms) = flags.backoff_max_ms {
        cfg.backoff_max_ms = parse_positive("--backoff-max-ms", &ms)? as u64;
    }
    if let Some(bytes) = flags.max_file_size {
        cfg.max_file_size = parse_positive("--max-file-size", &bytes)? as i64;
    }
    if let Some(ms) = flags.transfer_idle_ms {
        cfg.transfer_idle_ms = parse_positive("--transfer-idle-ms", &ms)? as u64;
    }
    if let Some(ms) = flags.slow_reader_timeout_ms {
        cfg.slow_reader_timeout_ms = parse_positive("--slow-reader-timeout-ms", &ms)? as u64;
    }
    if let Some(n) = pick(flags.sign_threads, "SOCP_SIGN_THREADS") {
        cfg.sign_threads = match n.trim().parse::<usize>() {
            Ok(n) if n <= MAX_SIGN_THREADS => n,
            _ => {
                return Err(format!(
                    "--sign-threads: expected 0 to {MAX_SIGN_THREADS}, got {n:?}"
                ));
            }
        };
    }
    Ok(if print_pubkey {
        Command::PrintPubkey(cfg)
    } else {
        Command::Run(cfg)
    })
}

#[derive(Default)]
struct ServerFlags {
    host: Option<String>,
    port: Option<String>,
    server_id: Option<String>,
    data_dir: Option<String>,
    db: Option<String>,
    key: Option<String>,
    bootstrap: Vec<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    ca_file: Option<String>,
    peer_scheme: Option<String>,
    max_connections: Option<String>,
    hello_timeout_ms: Option<String>,
    handshake_timeout_ms: Option<String>,
    max_write_buffer: Option<String>,
    open_join: bool,
    no_mesh: bool,
    advertise_host: Option<String>,
    heartbeat_ms: Option<String>,
    dead_after_ms: Option<String>,
    backoff_max_ms: Option<String>,
    max_file_size: Option<String>,
    transfer_idle_ms: Option<String>,
    slow_reader_timeout_ms: Option<String>,
    sign_threads: Option<String>,
}

/// More signer threads than this is a typo, not a machine.
const MAX_SIGN_THREADS: usize = 256;

fn string(parser: &mut lexopt::Parser) -> Result<String, String> {
    parser
        .value()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|v| format!("{v:?} is not valid UTF-8"))
}

/// A boolean environment variable: unset or empty is `None`; `1`/`true`/`yes`/`on` and
/// `0`/`false`/`no`/`off` (any case) are accepted; anything else is an error naming it.
pub fn env_bool(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<bool>, String> {
    let Some(value) = env(name).filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(Some(true)),
        "0" | "false" | "no" | "off" => Ok(Some(false)),
        _ => Err(format!(
            "{name}={value:?}: expected a boolean (1/0, true/false, yes/no, on/off)"
        )),
    }
}

fn parse_positive(flag: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{flag}: expected a positive number, got {value:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Command, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        parse_server_args(args.iter().map(|a| a.into()), &lookup)
    }

    fn run(args: &[&str], env: &[(&str, &str)]) -> Config {
        match parse(args, env) {
            Ok(Command::Run(cfg)) => cfg,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn defaults_need_no_arguments() {
        let cfg = run(&[], &[("HOME", "/home/u")]);
        assert_eq!((cfg.host.as_str(), cfg.port), ("127.0.0.1", 8765));
        assert_eq!(
            cfg.db,
            PathBuf::from("/home/u/.local/share/socp-server/socp.db")
        );
        assert_eq!(
            cfg.key,
            PathBuf::from("/home/u/.local/share/socp-server/server.key")
        );
    }

    #[test]
    fn flags_win_over_environment() {
        let env = [("SOCP_DB", "/env.db"), ("SOCP_SERVER_KEYFILE", "/env.key")];
        let cfg = run(&[], &env);
        assert_eq!(cfg.db, PathBuf::from("/env.db"));
        assert_eq!(cfg.key, PathBuf::from("/env.key"));
        let cfg = run(&["--db", "/flag.db", "--port", "0"], &env);
        assert_eq!(cfg.db, PathBuf::from("/flag.db"));
        assert_eq!(cfg.key, PathBuf::from("/env.key"));
        assert_eq!(cfg.port, 0);
    }

    #[test]
    fn tls_settings() {
        let cfg = run(&[], &[]);
        assert_eq!((cfg.tls, cfg.ca_file, cfg.peer_tls), (None, None, false));
        let env = [("SOCP_TLS_CERT", "/c.pem"), ("SOCP_TLS_KEY", "/k.pem")];
        let cfg = run(&["--ca-file", "/ca.pem"], &env);
        let files = cfg.tls.expect("tls");
        assert_eq!(files.cert, PathBuf::from("/c.pem"));
        assert_eq!(files.key, PathBuf::from("/k.pem"));
        assert_eq!(cfg.ca_file, Some(PathBuf::from("/ca.pem")));
        assert!(
            cfg.peer_tls,
            "a TLS server dials learned peers with wss:// by default"
        );
        assert!(!run(&["--peer-scheme", "ws"], &env).peer_tls);
        assert!(run(&["--peer-scheme", "wss"], &[]).peer_tls);
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/keys/server1.pem"
        ))
        .expect("fixture key");
        let key = crate::crypto::PrivateKey::from_pem(&pem).expect("key");
        let pin = key.public_key().encoded();
        let b = Bootstrap::parse(&format!("wss://[::1]:9000#{pin}")).expect("wss bootstrap");
        assert_eq!((b.host.as_str(), b.port, b.tls), ("::1", 9000, true));
        let b = Bootstrap::parse(&format!("ws://h:1/#{pin}")).expect("ws bootstrap");
        assert!(!b.tls);
    }

    #[test]
    fn usage_errors_are_reported() {
        assert!(
            parse(&["--port", "99999"], &[])
                .unwrap_err()
                .contains("port")
        );
        assert!(parse(&["--bogus"], &[]).is_err());
        assert!(parse(&["--server-id", "a b"], &[]).is_err());
        assert!(parse(&["--bootstrap", "http://x:1#k"], &[]).is_err());
        assert!(parse(&["--bootstrap", "ws://x:1"], &[]).is_err());
        assert!(parse(&["--tls-cert", "c.pem"], &[]).is_err());
        assert!(parse(&["--tls-key", "k.pem"], &[]).is_err());
        assert!(parse(&["--tls-key", "k.pem"], &[("SOCP_TLS_CERT", "c.pem")]).is_ok());
        assert!(parse(&["--peer-scheme", "https"], &[]).is_err());
        assert!(matches!(parse(&["--help"], &[]), Ok(Command::Help(_))));
        assert!(matches!(
            parse(&["--print-pubkey"], &[]),
            Ok(Command::PrintPubkey(_))
        ));
    }

    #[test]
    fn help_names_the_data_directory_in_use() {
        let help = |args: &[&str], env: &[(&str, &str)]| match parse(args, env) {
            Ok(Command::Help(text)) => text,
            other => panic!("expected Help, got {other:?}"),
        };
        assert!(
            help(&["--help"], &[("HOME", "/home/u")]).contains("/home/u/.local/share/socp-server")
        );
        let env = [("HOME", "/home/u"), ("XDG_DATA_HOME", "/xdg")];
        assert!(help(&["-h"], &env).contains("here: /xdg/socp-server"));
        let env = [("HOME", "/home/u"), ("SOCP_DATA_DIR", "/srv/socp")];
        assert!(help(&["--help"], &env).contains("here: /srv/socp"));
        assert!(help(&["--data-dir", "/flag", "--help"], &env).contains("here: /flag"));
    }

    #[test]
    fn boolean_variables_take_the_usual_spellings() {
        for yes in ["1", "true", "TRUE", "yes", "Yes", "on", "ON"] {
            assert!(run(&[], &[("SOCP_OPEN_JOIN", yes)]).open_join, "{yes}");
        }
        for no in ["0", "false", "False", "no", "NO", "off", "Off", ""] {
            assert!(!run(&[], &[("SOCP_OPEN_JOIN", no)]).open_join, "{no:?}");
        }
        assert!(!run(&[], &[]).open_join);
        assert!(run(&["--open-join"], &[("SOCP_OPEN_JOIN", "no")]).open_join);
        for bad in ["maybe", "2", "y", "enable"] {
            let err = parse(&[], &[("SOCP_OPEN_JOIN", bad)]).unwrap_err();
            assert!(err.contains("SOCP_OPEN_JOIN") && err.contains(bad), "{err}");
        }
    }
}
