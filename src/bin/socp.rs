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

USAGE: socp --name NAME [--server ws://HOST:PORT] [OPTIONS]

OPTIONS:
  --server URL      server to connect to        [env SOCP_SERVER, default ws://127.0.0.1:8765]
  --name NAME       your display name (1-32 of [A-Za-z0-9._-]); picks the key file
  --key PATH        key file                    [default DATA_DIR/NAME.json, created 0600]
  --data-dir DIR    where keys and server pins live [env SOCP_DATA_DIR, default ~/.local/share/socp]
  --json            one JSON object per output line
  -h, --help        this help
  -V, --version     version

Then type /help for the commands.
";

struct Args {
    server: String,
    name: String,
    key: Option<PathBuf>,
    data_dir: PathBuf,
    json: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let mut server = env("SOCP_SERVER");
    let mut name = None;
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
    let name = name.ok_or("--name is required")?;
    if !socp::ids::is_valid_display_name(&name) {
        return Err(format!(
            "invalid name {name:?}: use 1-32 characters of [A-Za-z0-9._-]"
        ));
    }
    let data_dir = data_dir
        .unwrap_or_else(|| socp::config::default_data_dir(&|n| std::env::var(n).ok(), "socp"));
    Ok(Some(Args {
        server: server.unwrap_or_else(|| "ws://127.0.0.1:8765".into()),
        name,
        key,
        data_dir,
        json,
    }))
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
    ws.get_ref()
        .set_read_timeout(None)
        .map_err(|e| e.to_string())?;
    ws.get_ref()
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

fn run(args: Args) -> Result<(), String> {
    let key_path = args
        .key
        .clone()
        .unwrap_or_else(|| args.data_dir.join(format!("{}.json", args.name)));
    let me = Identity::load_or_create(&key_path, &args.name)?;
    let pins = Pins::load(&args.data_dir.join("server-pins.json"));
    let printer = Printer {
        json: args.json,
        me: me.user_id.clone(),
    };
    let mut ws = connect(&args.server)?;
    let mut session = Session::new(me, &args.server, pins);

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
        match ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => return Err(format!("send failed: {e}")),
        }
        printer.print(session.events.drain(..));
        if quitting {
            let _ = ws.close(None);
            let _ = ws.flush();
            break;
        }

        match poll.poll(&mut events, None) {
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
        if stdin_done && queued.is_empty() && session.ready() && !quitting {
            let _ = session.command("/quit", now_ms());
            quitting = true;
        }
    }
    Ok(())
}
