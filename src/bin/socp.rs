//! `socp`: the line client. Reads commands from stdin (a terminal or a pipe), prints one line
//! per event on stdout (`--json`: one JSON object per line).
//!
//! I/O shape: the WebSocket handshake is done blocking; then one `mio::Poll` watches the socket
//! and a `Waker` that the stdin thread rings for each line, so nothing polls on a timer.

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use socp::client::chunks::ThreadedMaker;
use socp::client::{Event, Identity, Outcome, Pins, Session, warning};
use socp::net::tls::{MaybeTls, TlsStream};
use std::cell::{Cell, RefCell};
use std::io::{BufRead, ErrorKind, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// The connection: plain TCP (`ws://`) or TLS over it (`wss://`).
type Stream = MaybeTls<TcpStream>;

const SOCKET: Token = Token(0);
const STDIN: Token = Token(1);

const USAGE: &str = "\
socp: a SOCP v1.3 chat client

USAGE: socp --name NAME [--server ws[s]://HOST:PORT] [OPTIONS]  a key file on this machine
       socp --login NAME [--password-file PATH] [OPTIONS]      an account on the server
       socp --register NAME [--password-file PATH] [OPTIONS]   create that account
       socp [OPTIONS]                       then type /register NAME or /login NAME

OPTIONS:
  --server URL      server to connect to, ws://HOST:PORT or wss://HOST:PORT (TLS)
                    [env SOCP_SERVER, default ws://127.0.0.1:8765]
  --ca-file PATH    CA certificates (PEM) that wss:// servers are checked against, instead
                    of the system's roots (a private CA) [env SOCP_CA_FILE]
  --name NAME       your display name (1-32 of [A-Za-z0-9._-]); picks the key file
  --key PATH        key file                    [default DATA_DIR/NAME.json, created 0600]
  --login NAME      log in to an account: the server keeps your key sealed by your password
  --register NAME   create an account with a new key, then log in
  --password-file PATH  read the password from the first line of PATH (for scripts);
                    otherwise it is asked for on the terminal, without echo
  --downloads DIR   where received files are saved [default ~/Downloads/socp]
  --max-file-size BYTES  largest file sent or accepted [default 67108864]
  --data-dir DIR    where keys and server pins live (created 0700)
                    [env SOCP_CLIENT_DATA_DIR, default ~/.local/share/socp]
  --json            one JSON object per output line
  -h, --help        this help
  -V, --version     version

A new password (--register) must have at least 8 characters; at a terminal it is asked twice.

Then type /help for the commands.

EXIT STATUS: 0 every command worked; 1 a command failed; 2 usage; 3 the server closed the
session or the connection was lost; 4 cannot connect; 5 bad credentials (login refused, name
taken, passwords differ or too short, unusable key file).
";

/// Exit statuses, listed in the README ("Scripting the client").
#[derive(Debug, Clone, Copy, PartialEq)]
enum Exit {
    /// A command failed (or an unexpected local error).
    Failed = 1,
    /// The command line is wrong.
    Usage = 2,
    /// The server closed the session, or the connection was lost.
    ServerClosed = 3,
    /// The server cannot be reached (connection, WebSocket handshake).
    CannotConnect = 4,
    /// Login refused, name taken, passwords that differ or are too short, unusable key file.
    Credentials = 5,
}

impl Exit {
    /// The `code` of the `fatal` JSON event.
    fn code(self) -> &'static str {
        match self {
            Exit::Failed => "ERROR",
            Exit::Usage => "USAGE",
            Exit::ServerClosed => "SERVER_CLOSED",
            Exit::CannotConnect => "CANNOT_CONNECT",
            Exit::Credentials => "BAD_CREDENTIALS",
        }
    }
}

/// Why the client stops before its session ends normally.
#[derive(Debug)]
struct Fatal {
    exit: Exit,
    message: String,
}

impl Fatal {
    fn new(exit: Exit, message: impl Into<String>) -> Fatal {
        Fatal {
            exit,
            message: message.into(),
        }
    }
}

/// Errors without a more specific status are local failures (exit 1).
impl From<String> for Fatal {
    fn from(message: String) -> Fatal {
        Fatal::new(Exit::Failed, message)
    }
}

/// A new password must have at least this many characters (counted as Unicode characters).
const MIN_PASSWORD_CHARS: usize = 8;

/// How the client gets its identity.
enum Mode {
    /// A key file on this machine (`--name`).
    KeyFile(String),
    /// An account on the server (`--login` / `--register`).
    Account { name: String, register: bool },
    /// Ask: the first command is `/register` or `/login`.
    Ask,
}

struct Args {
    server: String,
    /// `--ca-file`: the roots for `wss://` instead of the system's.
    ca_file: Option<PathBuf>,
    mode: Mode,
    password_file: Option<PathBuf>,
    key: Option<PathBuf>,
    downloads: PathBuf,
    max_file_size: u64,
    data_dir: PathBuf,
    /// `data_dir` is the default (neither `--data-dir` nor `SOCP_CLIENT_DATA_DIR`).
    default_data_dir: bool,
    json: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let mut server = env("SOCP_SERVER");
    let mut ca_file = env("SOCP_CA_FILE").map(PathBuf::from);
    let mut name = None;
    let mut account: Option<(String, bool)> = None;
    let mut password_file = None;
    let mut downloads = None;
    let mut max_file_size: u64 = 64 << 20;
    let mut key = None;
    // Not SOCP_DATA_DIR: that is the server's (its keys and database).
    let mut data_dir = env("SOCP_CLIENT_DATA_DIR").map(PathBuf::from);
    let mut json = false;
    let text = |p: &mut lexopt::Parser| -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|v| format!("{v:?} is not valid UTF-8"))
    };
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("server") => server = Some(text(&mut parser)?),
            Long("ca-file") => ca_file = Some(PathBuf::from(text(&mut parser)?)),
            Long("name") => name = Some(text(&mut parser)?),
            Long("login") => account = Some((text(&mut parser)?, false)),
            Long("register") => account = Some((text(&mut parser)?, true)),
            Long("password-file") => password_file = Some(PathBuf::from(text(&mut parser)?)),
            Long("downloads") => downloads = Some(PathBuf::from(text(&mut parser)?)),
            Long("max-file-size") => {
                let v = text(&mut parser)?;
                max_file_size = v.parse().map_err(|_| {
                    format!("--max-file-size: expected a number of bytes, got {v:?}")
                })?;
            }
            Long("key") => key = Some(PathBuf::from(text(&mut parser)?)),
            Long("data-dir") => data_dir = Some(PathBuf::from(text(&mut parser)?)),
            Long("json") => json = true,
            Short('h') | Long("help") => {
                print!("{USAGE}");
                return Ok(None);
            }
            Short('V') | Long("version") => {
                println!("socp {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    let mode = match (name, account) {
        (Some(_), Some(_)) => return Err("--name and --login/--register exclude each other".into()),
        (Some(name), None) => Mode::KeyFile(name),
        (None, Some((name, register))) => Mode::Account { name, register },
        (None, None) => Mode::Ask,
    };
    if let Mode::KeyFile(name) | Mode::Account { name, .. } = &mode {
        check_name(name)?;
    }
    let server = server.unwrap_or_else(|| "ws://127.0.0.1:8765".into());
    if !server.starts_with("ws://") && !server.starts_with("wss://") {
        return Err(format!(
            "server URL {server:?} must start with ws:// or wss://"
        ));
    }
    let default_data_dir = data_dir.is_none();
    let data_dir = data_dir.unwrap_or_else(|| {
        let env = |n: &str| std::env::var(n).ok().filter(|_| n != "SOCP_DATA_DIR");
        socp::config::default_data_dir(&env, "socp")
    });
    Ok(Some(Args {
        server,
        ca_file,
        mode,
        password_file,
        key,
        downloads: downloads.unwrap_or_else(|| default_downloads(&data_dir)),
        max_file_size,
        data_dir,
        default_data_dir,
        json,
    }))
}

/// `$XDG_DOWNLOAD_DIR/socp`, else `~/Downloads/socp`, else `DATA_DIR/downloads`.
fn default_downloads(data_dir: &std::path::Path) -> PathBuf {
    let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    if let Some(dir) = env("XDG_DOWNLOAD_DIR") {
        return PathBuf::from(dir).join("socp");
    }
    if let Some(home) = env("HOME") {
        return PathBuf::from(home).join("Downloads").join("socp");
    }
    data_dir.join("downloads")
}

fn check_name(name: &str) -> Result<(), String> {
    if socp::wire::ids::is_valid_display_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1-32 characters of [A-Za-z0-9._-]"
        ))
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            // The arguments did not parse, but a script asking for JSON still gets it.
            let json = std::env::args_os().any(|a| a == "--json");
            let printer = Printer::new(json, false);
            printer.fatal(&Fatal::new(Exit::Usage, format!("{e}\nTry 'socp --help'.")));
            return ExitCode::from(Exit::Usage as u8);
        }
    };
    use std::io::IsTerminal;
    let printer = Printer::new(args.json, std::io::stderr().is_terminal());
    match run(args, &printer) {
        Ok(()) if printer.failures.get() > 0 => ExitCode::from(Exit::Failed as u8),
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            printer.fatal(&fatal);
            ExitCode::from(fatal.exit as u8)
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Prints events, one line each, flushing so pipes see them at once; counts failed commands.
struct Printer {
    json: bool,
    me: RefCell<String>,
    out: RefCell<Box<dyn Write>>,
    err: RefCell<Box<dyn Write>>,
    /// Progress lines go to stderr, and only when it is a terminal.
    progress_to_terminal: bool,
    /// A progress line is on the terminal without its end of line.
    progress_open: Cell<bool>,
    /// Events that said a command failed ([`Event::is_failure`]).
    failures: Cell<u32>,
}

impl Printer {
    fn new(json: bool, progress_to_terminal: bool) -> Printer {
        Printer {
            json,
            me: RefCell::new(String::new()),
            out: RefCell::new(Box::new(std::io::stdout())),
            err: RefCell::new(Box::new(std::io::stderr())),
            progress_to_terminal,
            progress_open: Cell::new(false),
            failures: Cell::new(0),
        }
    }

    fn print(&self, events: impl IntoIterator<Item = Event>) {
        let mut out = self.out.borrow_mut();
        for event in events {
            if event.is_failure() {
                self.failures.set(self.failures.get() + 1);
            }
            if let Event::Progress { .. } = event
                && !self.json
            {
                // A progress line belongs to a person at a terminal, not to a script's output.
                if self.progress_to_terminal {
                    let mut err = self.err.borrow_mut();
                    let _ = write!(err, "\r{}   ", event.human(&self.me.borrow()));
                    let _ = err.flush();
                    self.progress_open.set(true);
                }
                continue;
            }
            self.end_progress();
            let line = if self.json {
                event.json().to_string()
            } else {
                event.human(&self.me.borrow())
            };
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    /// Ends a progress line left open on the terminal, so the next line starts on its own.
    fn end_progress(&self) {
        if self.progress_open.replace(false) {
            let mut err = self.err.borrow_mut();
            let _ = writeln!(err);
            let _ = err.flush();
        }
    }

    /// Why the client stops: on stderr, and with `--json` also as a `fatal` event on stdout.
    fn fatal(&self, fatal: &Fatal) {
        self.end_progress();
        let _ = writeln!(self.err.borrow_mut(), "socp: {}", fatal.message);
        if self.json {
            let event = serde_json::json!({"event": "fatal", "code": fatal.exit.code(),
                "exit": fatal.exit as u8, "detail": fatal.message});
            let mut out = self.out.borrow_mut();
            let _ = writeln!(out, "{event}");
            let _ = out.flush();
        }
    }

    fn warn(&self, code: &'static str, detail: String) {
        self.print([Event::Warning { code, detail }]);
    }
}

/// Connects, runs the TLS handshake for `wss://` (checking the certificate against `ca_file`
/// or the system's roots), then the WebSocket handshake; all blocking, under timeouts.
fn connect(url: &str, ca_file: Option<&Path>) -> Result<WebSocket<Stream>, Fatal> {
    let (tls, rest) = match (url.strip_prefix("wss://"), url.strip_prefix("ws://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => {
            return Err(Fatal::new(
                Exit::Usage,
                format!("server URL {url:?} must start with ws:// or wss://"),
            ));
        }
    };
    let cannot = |why: String| {
        Fatal::new(
            Exit::CannotConnect,
            format!("cannot connect to {url}: {why}"),
        )
    };
    let hostport = rest.split('/').next().unwrap_or(rest);
    // Before connecting: a CA file that cannot be used is the user's to fix (exit 1).
    let tls_config = match (tls, ca_file) {
        (false, _) => None,
        (true, Some(path)) => Some(socp::net::tls::client_config(Some(path))?),
        (true, None) => Some(socp::net::tls::client_config(None).map_err(cannot)?),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| cannot(format!("{hostport}: {e}")))?
        .next()
        .ok_or_else(|| cannot(format!("{hostport}: no address")))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| cannot(e.to_string()))?;
    stream.set_nodelay(true).ok();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let stream = match tls_config {
        None => MaybeTls::Plain(stream),
        Some(config) => {
            let host = hostport.rsplit_once(':').map_or(hostport, |(host, _)| host);
            let name = socp::net::tls::server_name(host).map_err(cannot)?;
            let mut tls = TlsStream::client(&config, name, stream).map_err(|e| e.to_string())?;
            // Its own step, so that a refused certificate is reported as what it is.
            tls.handshake().map_err(|e| {
                let hint = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    Some(rustls::Error::InvalidCertificate(_)) if ca_file.is_none() => {
                        " (a server with a private CA needs --ca-file)"
                    }
                    _ => "",
                };
                cannot(format!("TLS handshake failed: {e}{hint}"))
            })?;
            MaybeTls::Tls(Box::new(tls))
        }
    };
    // A directory snapshot can be large; frames from our own server are trusted in size.
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    let (ws, _) =
        tungstenite::client::client_with_config(url, stream, Some(config)).map_err(|e| {
            // A TLS server answers a plain request with a TLS alert, which is no HTTP.
            let hint = if !tls
                && matches!(
                    e,
                    tungstenite::HandshakeError::Failure(
                        tungstenite::Error::Http(_)
                            | tungstenite::Error::HttpFormat(_)
                            | tungstenite::Error::Protocol(_)
                    )
                ) {
                " (if the server serves wss://, use a wss:// URL)"
            } else {
                ""
            };
            cannot(format!("WebSocket handshake failed: {e}{hint}"))
        })?;
    // Accounts (`/login`) take a PBKDF2 on each side: allow the reply a while.
    ws.get_ref()
        .tcp()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// The password: the first line of `--password-file`, else asked on the terminal without echo.
fn password(file: Option<&PathBuf>, prompt: &str) -> Result<String, Fatal> {
    let bad = |message: String| Fatal::new(Exit::Credentials, message);
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("password file {}: {e}", path.display())))?;
            let line = text.lines().next().unwrap_or("").to_string();
            if line.is_empty() {
                return Err(bad(format!("password file {} is empty", path.display())));
            }
            Ok(line)
        }
        None => {
            rpassword::prompt_password(prompt).map_err(|e| bad(format!("reading password: {e}")))
        }
    }
}

/// A password for a new account: from the file, or asked twice at the terminal; at least
/// [`MIN_PASSWORD_CHARS`] characters either way. The server keeps the key sealed by it and
/// cannot recover it: a typo here would lose the account.
fn new_password(file: Option<&PathBuf>) -> Result<String, Fatal> {
    let pw = password(file, "New password: ")?;
    check_new_password(&pw)?;
    if file.is_none() && password(None, "Repeat the password: ")? != pw {
        return Err(Fatal::new(
            Exit::Credentials,
            "the passwords do not match; nothing was registered",
        ));
    }
    Ok(pw)
}

fn check_new_password(pw: &str) -> Result<(), Fatal> {
    if pw.chars().count() < MIN_PASSWORD_CHARS {
        return Err(Fatal::new(
            Exit::Credentials,
            format!(
                "password too short: a new password must have at least {MIN_PASSWORD_CHARS} \
                 characters; nothing was registered"
            ),
        ));
    }
    Ok(())
}

/// Sends one account frame and waits for the reply (`USER_REGISTERED`, `USER_LOGGED_IN` or
/// `ERROR`). Returns the reply's payload, or the server's error as text.
fn account_exchange(
    ws: &mut WebSocket<Stream>,
    frame: String,
    want: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, Fatal> {
    let lost = |message: String| Fatal::new(Exit::ServerClosed, message);
    ws.send(Message::Text(frame.into()))
        .map_err(|e| lost(format!("send failed: {e}")))?;
    loop {
        let text = match ws.read() {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) => return Err(lost("the server closed the connection".into())),
            Ok(_) => continue,
            Err(e) => return Err(lost(format!("no answer from the server: {e}"))),
        };
        let env = socp::wire::Envelope::parse(&text).map_err(|e| e.to_string())?;
        if env.kind == want {
            return Ok(env.payload);
        }
        if env.kind == socp::wire::types::ERROR {
            let f = env.fields();
            return Err(Fatal::new(
                Exit::Credentials,
                format!(
                    "{}: {}",
                    f.str("code").unwrap_or("ERROR"),
                    f.str("detail").unwrap_or("")
                ),
            ));
        }
    }
}

/// `USER_REGISTER` then `USER_LOGIN` (§5.3): a new key, sealed by the password, kept by the
/// server. The password never leaves this process.
fn register(ws: &mut WebSocket<Stream>, name: &str, pw: &str) -> Result<Identity, Fatal> {
    use socp::wire::{SignedPayload, encode_frame, types};
    let key = socp::crypto::PrivateKey::generate().map_err(|e| e.to_string())?;
    let user_id = socp::wire::ids::new_uuid();
    let payload = serde_json::json!({
        "user_id": user_id,
        "pubkey": key.public_key().encoded(),
        "privkey_store": socp::account::seal_private_key(&key, pw),
        "auth": socp::account::auth_token(pw, name),
        "meta": {"display_name": name},
    });
    let signed = SignedPayload::sign(&payload, &key).map_err(|e| e.to_string())?;
    let frame = encode_frame(types::USER_REGISTER, &user_id, "", now_ms(), &signed);
    account_exchange(ws, frame, types::USER_REGISTERED)?;
    Ok(Identity {
        user_id,
        display_name: name.to_string(),
        key: key.into(),
    })
}

/// `USER_LOGIN` (§5.3): fetch the sealed key and open it locally.
fn login(ws: &mut WebSocket<Stream>, name: &str, pw: &str) -> Result<Identity, Fatal> {
    use socp::wire::{SignedPayload, encode_frame, types};
    let payload = serde_json::json!({
        "display_name": name,
        "auth": socp::account::auth_token(pw, name),
    });
    let signed = SignedPayload::unsigned(&payload).map_err(|e| e.to_string())?;
    let frame = encode_frame(types::USER_LOGIN, "", "", now_ms(), &signed);
    let reply = account_exchange(ws, frame, types::USER_LOGGED_IN)?;
    let f = socp::wire::Fields(&reply);
    let user_id = f.id("user_id").map_err(|e| e.to_string())?.to_string();
    let store = f.str("privkey_store").map_err(|e| e.to_string())?;
    let key = socp::account::open_private_key(store, pw).map_err(|e| {
        Fatal::new(
            Exit::Credentials,
            format!("cannot open the key the server keeps for {name}: {e}"),
        )
    })?;
    Ok(Identity {
        user_id,
        display_name: name.to_string(),
        key: key.into(),
    })
}

/// The key file for `--name NAME`.
fn key_path(args: &Args, name: &str) -> PathBuf {
    args.key
        .clone()
        .unwrap_or_else(|| args.data_dir.join(format!("{name}.json")))
}

/// Before connecting: loads (or creates) the key file, or reads the account's password, so
/// that a mistake there needs no server.
fn prepare(args: &Args, printer: &Printer) -> Result<Prepared, Fatal> {
    let pw_file = args.password_file.as_ref();
    Ok(match &args.mode {
        Mode::KeyFile(name) => {
            let path = key_path(args, name);
            check_old_data_dir(args, name, &path)?;
            warn_if_readable_by_others(&path, printer);
            let me = Identity::load_or_create(&path, name)
                .map_err(|e| Fatal::new(Exit::Credentials, e))?;
            Prepared::Ready(me)
        }
        Mode::Account { register, .. } => Prepared::Password(if *register {
            new_password(pw_file)?
        } else {
            password(pw_file, "Password: ")?
        }),
        Mode::Ask => Prepared::Ask,
    })
}

enum Prepared {
    Ready(Identity),
    Password(String),
    Ask,
}

/// Gets an identity for `args.mode`, using the open connection for accounts.
fn identity(
    args: &Args,
    prepared: Prepared,
    ws: &mut WebSocket<Stream>,
    printer: &Printer,
) -> Result<Option<Identity>, Fatal> {
    match (&args.mode, prepared) {
        (_, Prepared::Ready(me)) => Ok(Some(me)),
        (
            Mode::Account {
                name,
                register: true,
            },
            Prepared::Password(pw),
        ) => register_then_login(ws, name, &pw, printer).map(Some),
        (Mode::Account { name, .. }, Prepared::Password(pw)) => login(ws, name, &pw).map(Some),
        _ => ask_identity(ws, printer),
    }
}

/// The client used to read `SOCP_DATA_DIR` (now the server's only). A key left in that folder
/// must not be silently replaced by a new identity in the default one.
fn check_old_data_dir(args: &Args, name: &str, path: &Path) -> Result<(), Fatal> {
    if !args.default_data_dir || args.key.is_some() || path.exists() {
        return Ok(());
    }
    let Some(old) = std::env::var_os("SOCP_DATA_DIR").filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let old = PathBuf::from(old);
    if old.join(format!("{name}.json")).exists() && old != args.data_dir {
        return Err(Fatal::new(
            Exit::Usage,
            format!(
                "no key file {}, but {} exists: the client no longer reads SOCP_DATA_DIR (it \
                 is the server's). Set SOCP_CLIENT_DATA_DIR={} or pass --data-dir {}",
                path.display(),
                old.join(format!("{name}.json")).display(),
                old.display(),
                old.display()
            ),
        ));
    }
    Ok(())
}

/// As the server does for its own key file: a private key others can read is said so.
fn warn_if_readable_by_others(path: &Path, printer: &Printer) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        printer.warn(
            warning::KEY_FILE_PERMISSIONS,
            format!(
                "key file {} is readable by other users; run: chmod 600 {}",
                path.display(),
                path.display()
            ),
        );
    }
}

/// Reads `/register NAME [PASSWORD]` or `/login NAME [PASSWORD]` lines until one works;
/// `None` after `/quit`.
fn ask_identity(ws: &mut WebSocket<Stream>, printer: &Printer) -> Result<Option<Identity>, Fatal> {
    printer.print([Event::Notice(
        "not logged in: type /register NAME or /login NAME (or /quit)".into(),
    )]);
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let attempt = match words.as_slice() {
            ["/quit"] => return Ok(None),
            [cmd @ ("/register" | "/login"), name, rest @ ..] if rest.len() <= 1 => {
                let register = *cmd == "/register";
                check_name(name)
                    .map_err(|e| Fatal::new(Exit::Usage, e))
                    .and_then(|()| match (register, rest) {
                        (true, [pw]) => check_new_password(pw).map(|()| pw.to_string()),
                        (true, _) => new_password(None),
                        (false, [pw]) => Ok(pw.to_string()),
                        (false, _) => password(None, "Password: "),
                    })
                    .and_then(|pw| {
                        if register {
                            register_then_login(ws, name, &pw, printer)
                        } else {
                            login(ws, name, &pw)
                        }
                    })
            }
            _ => Err(Fatal::new(
                Exit::Usage,
                "type /register NAME [PASSWORD] or /login NAME [PASSWORD]",
            )),
        };
        match attempt {
            Ok(me) => return Ok(Some(me)),
            // The connection is gone: asking again cannot help.
            Err(e) if e.exit == Exit::ServerClosed => return Err(e),
            Err(e) => printer.warn(warning::LOGIN_FAILED, e.message),
        }
    }
    Err(Fatal::new(
        Exit::Credentials,
        "end of input before logging in",
    ))
}

fn register_then_login(
    ws: &mut WebSocket<Stream>,
    name: &str,
    pw: &str,
    printer: &Printer,
) -> Result<Identity, Fatal> {
    let me = register(ws, name, pw)?;
    printer.print([Event::Notice(format!(
        "registered {name} as {}",
        me.user_id
    ))]);
    login(ws, name, pw)
}

fn run(args: Args, printer: &Printer) -> Result<(), Fatal> {
    let prepared = prepare(&args, printer)?;
    // Server pins live here, whatever the mode: create it as a key file's folder is (0700).
    use std::os::unix::fs::DirBuilderExt;
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
    {
        printer.warn(
            warning::DATA_DIR,
            format!(
                "cannot create {}: {e}; server keys will not be pinned",
                args.data_dir.display()
            ),
        );
    }
    let pins = Pins::load(&args.data_dir.join("server-pins.json"));
    let mut ws = connect(&args.server, args.ca_file.as_deref())?;
    let Some(me) = identity(&args, prepared, &mut ws, printer)? else {
        let _ = ws.close(None);
        return Ok(()); // `/quit` before logging in
    };
    *printer.me.borrow_mut() = me.user_id.clone();
    ws.get_ref()
        .tcp()
        .set_read_timeout(None)
        .map_err(|e| e.to_string())?;
    ws.get_ref()
        .tcp()
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let mut session = Session::new(me, &args.server, pins);
    session.downloads = args.downloads.clone();
    session.max_file_size = args.max_file_size;
    let result = event_loop(&mut ws, &mut session, printer);
    // Whatever ended the session, nothing partial is left looking complete.
    session.abandon_files();
    result
}

/// Sends our close frame and waits for the server's reply before closing the socket. The server
/// reads in order, so its reply means it has read everything we sent; closing earlier, with
/// unread data of ours in its buffer, would reset the connection and could lose our last frames.
fn close_gracefully(
    ws: &mut WebSocket<Stream>,
    poll: &mut Poll,
    session: &mut Session,
    printer: &Printer,
) -> Result<(), Fatal> {
    let _ = ws.close(None);
    let mut events = Events::with_capacity(16);
    // Generous: a server applying backpressure may take a while to reach our close frame.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                session.on_frame(text.as_str(), now_ms());
                printer.print(session.events.drain(..));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                let _ = ws.flush();
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                let _ = poll.poll(&mut events, Some(left));
            }
            Err(_) => return Ok(()), // closed: the handshake is complete
        }
    }
}

/// Runs the session until `/quit`, end of input, or the connection ends (a [`Fatal`] with
/// [`Exit::ServerClosed`], or [`Exit::Credentials`] when the server refused the hello).
fn event_loop(
    ws: &mut WebSocket<Stream>,
    session: &mut Session,
    printer: &Printer,
) -> Result<(), Fatal> {
    let lost = |message: String| Fatal::new(Exit::ServerClosed, message);
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let fd = ws.get_ref().tcp().as_raw_fd();
    poll.registry()
        .register(
            &mut SourceFd(&fd),
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        )
        .map_err(|e| e.to_string())?;
    // The main thread keeps a handle too: a Waker dropped with the stdin thread would close
    // its eventfd and could take a just-posted wake-up (end of input) with it.
    let waker = std::sync::Arc::new(Waker::new(poll.registry(), STDIN).map_err(|e| e.to_string())?);
    let thread_waker = std::sync::Arc::clone(&waker);
    // File chunks are read, encrypted and signed ahead on the spare cores (woken through the
    // same waker: a turn of the loop then sends what is ready). Dropped with the session.
    match ThreadedMaker::start(
        ThreadedMaker::spare_cores(),
        Some(Box::new(std::sync::Arc::clone(&waker))),
    ) {
        Ok(maker) => session.set_chunk_maker(Box::new(maker)),
        Err(e) => printer.print([Event::Notice(format!(
            "cannot start threads for file chunks ({e}); they are prepared as they are sent"
        ))]),
    }
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(Some(line)).is_err() {
                return;
            }
            let _ = thread_waker.wake();
        }
        let _ = tx.send(None);
        let _ = thread_waker.wake();
    });

    session.hello(now_ms());
    let mut queued: Vec<String> = Vec::new(); // typed before the directory snapshot came
    let mut stdin_done = false;
    let mut quitting = false;
    let mut events = Events::with_capacity(64);
    let mut check_socket = true;
    loop {
        // Send what the session produced, then flush once.
        for frame in session.outbox.drain(..) {
            match ws.write(Message::Text(frame.into())) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(lost(format!("connection lost: send failed: {e}"))),
            }
        }
        let flushed = match ws.flush() {
            Ok(()) => true,
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => false,
            Err(tungstenite::Error::ConnectionClosed) => {
                return Err(lost("the server closed the session".into()));
            }
            Err(e) => return Err(lost(format!("connection lost: send failed: {e}"))),
        };
        // File chunks go out at the pace the connection takes them: only into an empty pipe.
        if flushed && !quitting {
            session.pump(now_ms());
        }
        printer.print(session.events.drain(..));
        if quitting {
            return close_gracefully(ws, &mut poll, session, printer);
        }

        let busy = !session.outbox.is_empty() || (flushed && session.can_pump());
        let timeout = busy.then_some(Duration::ZERO);
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string().into()),
        }
        // Also once at the start: TLS may hold data decrypted during the blocking handshake
        // phase, for which no readiness event will come.
        if std::mem::take(&mut check_socket) || events.iter().any(|e| e.token() == SOCKET) {
            loop {
                match ws.read() {
                    Ok(Message::Text(text)) => {
                        let was_ready = session.ready();
                        session.on_frame(text.as_str(), now_ms());
                        if !was_ready
                            && let Some(Event::ServerError { code, detail }) = session
                                .events
                                .iter()
                                .find(|e| matches!(e, Event::ServerError { .. }))
                                .cloned()
                        {
                            // The hello was refused (NAME_IN_USE, BAD_KEY, …): nothing more
                            // can happen on this connection.
                            printer.print(session.events.drain(..));
                            let _ = close_gracefully(ws, &mut poll, session, printer);
                            return Err(Fatal::new(
                                Exit::Credentials,
                                format!("the server refused the hello: {code}: {detail}"),
                            ));
                        }
                        if !was_ready && session.ready() {
                            for line in queued.drain(..) {
                                if session.command(&line, now_ms()) == Outcome::Quit {
                                    quitting = true;
                                }
                            }
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        printer.print(session.events.drain(..));
                        let _ = ws.flush();
                        printer.print([Event::Closed]);
                        let reason = frame
                            .map(|f| f.reason.to_string())
                            .filter(|r| !r.is_empty())
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default();
                        return Err(lost(format!("the server closed the session{reason}")));
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(tungstenite::Error::ConnectionClosed) => {
                        printer.print(session.events.drain(..));
                        printer.print([Event::Closed]);
                        return Err(lost("the server closed the session".into()));
                    }
                    Err(e) => {
                        printer.print(session.events.drain(..));
                        printer.print([Event::Closed]);
                        return Err(lost(format!("connection lost: {e}")));
                    }
                }
            }
        }
        while let Ok(line) = rx.try_recv() {
            match line {
                Some(line) if !session.ready() => queued.push(line),
                Some(line) => {
                    if session.command(&line, now_ms()) == Outcome::Quit {
                        quitting = true;
                    }
                }
                None => stdin_done = true,
            }
        }
        // End of input: leave once everything typed has been sent.
        if stdin_done
            && queued.is_empty()
            && session.ready()
            && !session.awaiting_replies()
            && !quitting
        {
            let _ = session.command("/quit", now_ms());
            quitting = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    /// A writer whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Rc<RefCell<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.borrow().clone()).unwrap()
        }
    }

    fn progress(done: u64) -> Event {
        Event::Progress {
            sending: true,
            name: "f".into(),
            done,
            total: 2,
        }
    }

    #[test]
    fn a_progress_line_is_ended_before_the_next_line() {
        let (out, err) = (Shared::default(), Shared::default());
        let mut printer = Printer::new(false, true);
        printer.out = RefCell::new(Box::new(out.clone()));
        printer.err = RefCell::new(Box::new(err.clone()));
        printer.print([progress(1)]);
        printer.print([progress(2), Event::Notice("next".into())]);
        assert_eq!(
            err.text(),
            "\rsending f: 1/2 bytes (50%)   \rsending f: 2/2 bytes (100%)   \n"
        );
        assert_eq!(out.text(), "* next\n");
        // Nothing to end: no empty line.
        printer.print([Event::Notice("again".into())]);
        assert!(err.text().ends_with("(100%)   \n"));
        // A fatal error ends it too.
        printer.print([progress(1)]);
        printer.fatal(&Fatal::new(Exit::ServerClosed, "gone"));
        assert!(
            err.text().ends_with("(50%)   \nsocp: gone\n"),
            "{}",
            err.text()
        );
    }

    #[test]
    fn failed_commands_are_counted() {
        let printer = Printer::new(true, false);
        *printer.out.borrow_mut() = Box::new(Shared::default());
        printer.print([
            Event::Notice("fine".into()),
            Event::Warning {
                code: warning::SERVER_KEY_CHANGED,
                detail: "not a command".into(),
            },
        ]);
        assert_eq!(printer.failures.get(), 0);
        printer.print([
            Event::Warning {
                code: warning::NO_SUCH_USER,
                detail: "no user x is online".into(),
            },
            Event::ServerError {
                code: "USER_NOT_FOUND".into(),
                detail: String::new(),
            },
        ]);
        assert_eq!(printer.failures.get(), 2);
    }
}
