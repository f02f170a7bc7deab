//! `socp`: the line client. Reads commands from stdin (a terminal or a pipe), prints one line
//! per event on stdout (`--json`: one JSON object per line).
//!
//! I/O shape: the WebSocket handshake is done blocking; then one `mio::Poll` watches the socket
//! and a `Waker` that the stdin thread rings for each line, so nothing polls on a timer.

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use socp::client::{Event, Identity, Outcome, Pins, Session};
use std::io::{BufRead, ErrorKind, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

const SOCKET: Token = Token(0);
const STDIN: Token = Token(1);

const USAGE: &str = "\
socp: a SOCP v1.3 chat client

USAGE: socp --name NAME [--server ws://HOST:PORT] [OPTIONS]     a key file on this machine
       socp --login NAME [--password-file PATH] [OPTIONS]      an account on the server
       socp --register NAME [--password-file PATH] [OPTIONS]   create that account
       socp [OPTIONS]                       then type /register NAME or /login NAME

OPTIONS:
  --server URL      server to connect to        [env SOCP_SERVER, default ws://127.0.0.1:8765]
  --name NAME       your display name (1-32 of [A-Za-z0-9._-]); picks the key file
  --key PATH        key file                    [default DATA_DIR/NAME.json, created 0600]
  --login NAME      log in to an account: the server keeps your key sealed by your password
  --register NAME   create an account with a new key, then log in
  --password-file PATH  read the password from the first line of PATH (for scripts);
                    otherwise it is asked for on the terminal, without echo
  --downloads DIR   where received files are saved [default ~/Downloads/socp]
  --max-file-size BYTES  largest file sent or accepted [default 67108864]
  --data-dir DIR    where keys and server pins live [env SOCP_DATA_DIR, default ~/.local/share/socp]
  --json            one JSON object per output line
  -h, --help        this help
  -V, --version     version

Then type /help for the commands.
";

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
    mode: Mode,
    password_file: Option<PathBuf>,
    key: Option<PathBuf>,
    downloads: PathBuf,
    max_file_size: u64,
    data_dir: PathBuf,
    json: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let mut server = env("SOCP_SERVER");
    let mut name = None;
    let mut account: Option<(String, bool)> = None;
    let mut password_file = None;
    let mut downloads = None;
    let mut max_file_size: u64 = 64 << 20;
    let mut key = None;
    let mut data_dir = env("SOCP_DATA_DIR").map(PathBuf::from);
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
    let data_dir = data_dir
        .unwrap_or_else(|| socp::config::default_data_dir(&|n| std::env::var(n).ok(), "socp"));
    Ok(Some(Args {
        server: server.unwrap_or_else(|| "ws://127.0.0.1:8765".into()),
        mode,
        password_file,
        key,
        downloads: downloads.unwrap_or_else(|| default_downloads(&data_dir)),
        max_file_size,
        data_dir,
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
    if socp::ids::is_valid_display_name(name) {
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
            eprintln!("socp: {e}\nTry 'socp --help'.");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Prints events, one line each, flushing so pipes see them at once.
struct Printer {
    json: bool,
    me: String,
}

impl Printer {
    fn print(&self, events: impl IntoIterator<Item = Event>) {
        let mut out = std::io::stdout().lock();
        for event in events {
            if let Event::Progress { .. } = event
                && !self.json
            {
                // A progress line belongs to a person at a terminal, not to a script's output.
                use std::io::IsTerminal;
                if std::io::stderr().is_terminal() {
                    eprint!("\r{}   ", event.human(&self.me));
                }
                continue;
            }
            let line = if self.json {
                event.json().to_string()
            } else {
                event.human(&self.me)
            };
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

fn connect(url: &str) -> Result<WebSocket<TcpStream>, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("server URL {url:?} must start with ws://"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport}: no address"))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    stream.set_nodelay(true).ok();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    // A directory snapshot can be large; frames from our own server are trusted in size.
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    let (ws, _) = tungstenite::client::client_with_config(url, stream, Some(config))
        .map_err(|e| format!("WebSocket handshake with {url} failed: {e}"))?;
    // Accounts (`/login`) take a PBKDF2 on each side: allow the reply a while.
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// The password: the first line of `--password-file`, else asked on the terminal without echo.
fn password(file: Option<&PathBuf>, prompt: &str) -> Result<String, String> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("password file {}: {e}", path.display()))?;
            let line = text.lines().next().unwrap_or("").to_string();
            if line.is_empty() {
                return Err(format!("password file {} is empty", path.display()));
            }
            Ok(line)
        }
        None => rpassword::prompt_password(prompt).map_err(|e| format!("reading password: {e}")),
    }
}

/// Sends one account frame and waits for the reply (`USER_REGISTERED`, `USER_LOGGED_IN` or
/// `ERROR`). Returns the reply's payload, or the server's error as text.
fn account_exchange(
    ws: &mut WebSocket<TcpStream>,
    frame: String,
    want: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    ws.send(Message::Text(frame.into()))
        .map_err(|e| format!("send failed: {e}"))?;
    loop {
        let text = match ws.read() {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) => return Err("the server closed the connection".into()),
            Ok(_) => continue,
            Err(e) => return Err(format!("no answer from the server: {e}")),
        };
        let env = socp::wire::Envelope::parse(&text).map_err(|e| e.to_string())?;
        if env.kind == want {
            return Ok(env.payload);
        }
        if env.kind == socp::wire::types::ERROR {
            let f = env.fields();
            return Err(format!(
                "{}: {}",
                f.str("code").unwrap_or("ERROR"),
                f.str("detail").unwrap_or("")
            ));
        }
    }
}

/// `USER_REGISTER` then `USER_LOGIN` (§5.3): a new key, sealed by the password, kept by the
/// server. The password never leaves this process.
fn register(ws: &mut WebSocket<TcpStream>, name: &str, pw: &str) -> Result<Identity, String> {
    use socp::wire::{SignedPayload, encode_frame, types};
    let key = socp::crypto::PrivateKey::generate().map_err(|e| e.to_string())?;
    let user_id = socp::ids::new_uuid();
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
        key,
    })
}

/// `USER_LOGIN` (§5.3): fetch the sealed key and open it locally.
fn login(ws: &mut WebSocket<TcpStream>, name: &str, pw: &str) -> Result<Identity, String> {
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
    let key = socp::account::open_private_key(store, pw)
        .map_err(|e| format!("cannot open the key the server keeps for {name}: {e}"))?;
    Ok(Identity {
        user_id,
        display_name: name.to_string(),
        key,
    })
}

/// Gets an identity for `args.mode`, using the open connection for accounts.
fn identity(
    args: &Args,
    ws: &mut WebSocket<TcpStream>,
    printer: &Printer,
) -> Result<Identity, String> {
    let pw_file = args.password_file.as_ref();
    match &args.mode {
        Mode::KeyFile(name) => {
            let key_path = args
                .key
                .clone()
                .unwrap_or_else(|| args.data_dir.join(format!("{name}.json")));
            Identity::load_or_create(&key_path, name)
        }
        Mode::Account {
            name,
            register: true,
        } => register_then_login(ws, name, &password(pw_file, "New password: ")?, printer),
        Mode::Account {
            name,
            register: false,
        } => login(ws, name, &password(pw_file, "Password: ")?),
        Mode::Ask => ask_identity(ws, printer),
    }
}

/// Reads `/register NAME [PASSWORD]` or `/login NAME [PASSWORD]` lines until one works.
fn ask_identity(ws: &mut WebSocket<TcpStream>, printer: &Printer) -> Result<Identity, String> {
    printer.print([Event::Notice(
        "not logged in: type /register NAME or /login NAME (or /quit)".into(),
    )]);
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let attempt = match words.as_slice() {
            ["/quit"] => return Err("quit before logging in".into()),
            [cmd @ ("/register" | "/login"), name, rest @ ..] if rest.len() <= 1 => {
                let register = *cmd == "/register";
                check_name(name).and_then(|()| {
                    let pw = match rest {
                        [pw] => pw.to_string(),
                        _ => password(None, "Password: ")?,
                    };
                    if register {
                        register_then_login(ws, name, &pw, printer)
                    } else {
                        login(ws, name, &pw)
                    }
                })
            }
            _ => Err("type /register NAME [PASSWORD] or /login NAME [PASSWORD]".into()),
        };
        match attempt {
            Ok(me) => return Ok(me),
            Err(e) => printer.print([Event::Warning(e)]),
        }
    }
    Err("end of input before logging in".into())
}

fn register_then_login(
    ws: &mut WebSocket<TcpStream>,
    name: &str,
    pw: &str,
    printer: &Printer,
) -> Result<Identity, String> {
    let me = register(ws, name, pw)?;
    printer.print([Event::Notice(format!(
        "registered {name} as {}",
        me.user_id
    ))]);
    login(ws, name, pw)
}

fn run(args: Args) -> Result<(), String> {
    let pins = Pins::load(&args.data_dir.join("server-pins.json"));
    let mut printer = Printer {
        json: args.json,
        me: String::new(),
    };
    let mut ws = connect(&args.server)?;
    let me = identity(&args, &mut ws, &printer)?;
    printer.me = me.user_id.clone();
    ws.get_ref()
        .set_read_timeout(None)
        .map_err(|e| e.to_string())?;
    ws.get_ref()
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let mut session = Session::new(me, &args.server, pins);
    session.downloads = args.downloads.clone();
    session.max_file_size = args.max_file_size;
    let result = event_loop(&mut ws, &mut session, &printer);
    // Whatever ended the session, nothing partial is left looking complete.
    session.abandon_files();
    result
}

/// Sends our close frame and waits for the server's reply before closing the socket. The server
/// reads in order, so its reply means it has read everything we sent; closing earlier, with
/// unread data of ours in its buffer, would reset the connection and could lose our last frames.
fn close_gracefully(
    ws: &mut WebSocket<TcpStream>,
    poll: &mut Poll,
    session: &mut Session,
    printer: &Printer,
) -> Result<(), String> {
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

/// Runs the session until `/quit`, end of input, or the connection ends.
fn event_loop(
    ws: &mut WebSocket<TcpStream>,
    session: &mut Session,
    printer: &Printer,
) -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let fd = ws.get_ref().as_raw_fd();
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
    loop {
        // Send what the session produced, then flush once.
        for frame in session.outbox.drain(..) {
            match ws.write(Message::Text(frame.into())) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("send failed: {e}")),
            }
        }
        let flushed = match ws.flush() {
            Ok(()) => true,
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => false,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => return Err(format!("send failed: {e}")),
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
            Err(e) => return Err(e.to_string()),
        }
        for event in events.iter() {
            if event.token() != SOCKET {
                continue;
            }
            loop {
                match ws.read() {
                    Ok(Message::Text(text)) => {
                        let was_ready = session.ready();
                        session.on_frame(text.as_str(), now_ms());
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
                        if let Some(f) = frame
                            && !f.reason.is_empty()
                        {
                            printer.print([Event::Warning(format!(
                                "server closed the connection: {}",
                                f.reason
                            ))]);
                        }
                        let _ = ws.flush();
                        printer.print([Event::Closed]);
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(tungstenite::Error::ConnectionClosed) => {
                        printer.print([Event::Closed]);
                        return Ok(());
                    }
                    Err(e) => return Err(format!("connection lost: {e}")),
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
    Ok(())
}
