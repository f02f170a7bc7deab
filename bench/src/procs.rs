//! Starting and stopping the `socp-server` processes the benchmark measures.
//!
//! Every child is kept in one process-wide registry. It is killed and reaped by the
//! [`ServerSet`] that started it when that is dropped (normal end, error return or panic), and
//! by the signal thread on SIGINT/SIGTERM before the benchmark exits, so no server outlives the
//! run. Each server gets its own temporary data directory (removed with it) and logs there.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Children started by this process, by pid, and the directories to remove with them.
static REGISTRY: Mutex<Vec<(u32, Child)>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Kills (SIGKILL) and reaps the child with this pid, if it is ours and still registered.
fn kill_pid(pid: u32) {
    let child = {
        let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        reg.iter()
            .position(|(p, _)| *p == pid)
            .map(|i| reg.swap_remove(i).1)
    };
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|d| d != dir);
}

/// Kills every registered child and removes every registered directory (signal path).
pub fn kill_everything() {
    let pids: Vec<u32> = REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(p, _)| *p)
        .collect();
    for pid in pids {
        kill_pid(pid);
    }
    let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// On SIGINT/SIGTERM: stop our servers, then exit 130. (Drop guards do not run when a signal
/// ends the process, so this thread does their work.)
pub fn install_signal_cleanup() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    eprintln!("socp-bench: signal {sig}: stopping the servers it started");
                    kill_everything();
                    std::process::exit(130);
                }
            });
        }
        Err(e) => eprintln!("socp-bench: cannot watch signals ({e}); Ctrl-C may leave servers"),
    }
}

/// One running server.
pub struct Server {
    pub pid: u32,
    pub port: u16,
    pub server_id: String,
    pub dir: PathBuf,
}

impl Server {
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the process is still running (not a zombie).
    pub fn alive(&self) -> bool {
        let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        match reg.iter_mut().find(|(p, _)| *p == self.pid) {
            Some((_, child)) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// Servers started together; all are killed and their directories removed on drop.
pub struct ServerSet {
    pub servers: Vec<Server>,
    /// Keep the data directories (logs) after the run.
    pub keep: bool,
}

impl Drop for ServerSet {
    fn drop(&mut self) {
        for s in &self.servers {
            kill_pid(s.pid);
            if !self.keep {
                remove_dir(&s.dir);
            }
        }
    }
}

/// How to start servers.
pub struct Spawn<'a> {
    pub bin: &'a Path,
    /// Flags added to every server (limits).
    pub extra: Vec<String>,
    /// Pin every server to every other with `--bootstrap` (a full mesh).
    pub mesh: bool,
    /// `RUST_LOG` for the servers.
    pub log_level: &'a str,
    /// More environment variables for the servers (`SOCP_SIGN_THREADS`).
    pub env: Vec<(String, String)>,
    pub tag: &'a str,
}

/// Ports the system considers free right now: bound together (so distinct), then released.
/// Another process could take one before the server binds it; [`start`] retries then.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

fn temp_dir(tag: &str, n: usize) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "socp-bench-{}-{tag}-{n}-{}",
        std::process::id(),
        socp::wire::b64::encode(&socp::crypto::random_bytes::<6>())
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.clone());
    Ok(dir)
}

/// Creates the server's identity (`--print-pubkey` makes the key on first use) and returns the
/// public key that peers pin.
fn print_pubkey(bin: &Path, dir: &Path, server_id: &str) -> Result<String, String> {
    let out = Command::new(bin)
        .arg("--data-dir")
        .arg(dir)
        .args(["--server-id", server_id, "--print-pubkey"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --print-pubkey failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if key.is_empty() {
        return Err("--print-pubkey printed nothing".into());
    }
    Ok(key)
}

/// Starts `n` servers. With `mesh`, each pins all others via `--bootstrap`; the caller waits
/// for the links with [`wait_links`].
pub fn start(spawn: &Spawn, n: usize) -> Result<ServerSet, String> {
    let mut set = ServerSet {
        servers: Vec::new(),
        keep: false,
    };
    // Identities first (in parallel: RSA-4096 key generation takes a while).
    let ids: Vec<String> = (0..n).map(|i| format!("bench-{}{i}", spawn.tag)).collect();
    let dirs: Vec<PathBuf> = (0..n)
        .map(|i| temp_dir(spawn.tag, i))
        .collect::<Result<_, _>>()?;
    let keys: Vec<Result<String, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (dir, id) = (&dirs[i], &ids[i]);
                s.spawn(move || print_pubkey(spawn.bin, dir, id))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("key thread panicked".into()))
            })
            .collect()
    });
    let keys: Vec<String> = match keys.into_iter().collect::<Result<_, _>>() {
        Ok(k) => k,
        Err(e) => {
            for d in &dirs {
                remove_dir(d);
            }
            return Err(e);
        }
    };
    let mut last_err = String::new();
    for _attempt in 0..3 {
        let ports = free_ports(n).map_err(|e| format!("cannot find free ports: {e}"))?;
        let mut ok = true;
        for i in 0..n {
            match start_one(spawn, &dirs[i], &ids[i], &keys, &ports, i) {
                Ok(server) => set.servers.push(server),
                Err(e) => {
                    last_err = e;
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return Ok(set);
        }
        // A port was taken meanwhile (or the server failed): stop what started, try again.
        for s in set.servers.drain(..) {
            kill_pid(s.pid);
        }
    }
    for d in &dirs {
        remove_dir(d);
    }
    Err(last_err)
}

fn start_one(
    spawn: &Spawn,
    dir: &Path,
    id: &str,
    keys: &[String],
    ports: &[u16],
    me: usize,
) -> Result<Server, String> {
    let _ = std::fs::remove_file(dir.join("stdout.log"));
    let stdout = std::fs::File::create(dir.join("stdout.log")).map_err(|e| e.to_string())?;
    let stderr = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(spawn.bin);
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--server-id", id, "--host", "127.0.0.1"])
        .args(["--port", &ports[me].to_string()])
        .args(&spawn.extra)
        .env("RUST_LOG", spawn.log_level)
        .envs(spawn.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    if spawn.mesh {
        // Pin every other server: its address and the key its --print-pubkey printed.
        for (j, port) in ports.iter().enumerate() {
            if j != me {
                cmd.args(["--bootstrap", &format!("ws://127.0.0.1:{port}#{}", keys[j])]);
            }
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", spawn.bin.display()))?;
    let pid = child.id();
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((pid, child));
    let server = Server {
        pid,
        port: ports[me],
        server_id: id.to_string(),
        dir: dir.to_path_buf(),
    };
    // Wait for "socp-server listening on ws://ADDR server_id=ID".
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::fs::read_to_string(dir.join("stdout.log")).unwrap_or_default();
        if out.contains("listening on") {
            if !out.contains(&format!(":{} ", ports[me])) {
                kill_pid(pid);
                return Err(format!("server {id} listens elsewhere than asked: {out}"));
            }
            return Ok(server);
        }
        if !server.alive() {
            let log = server.log();
            kill_pid(pid);
            return Err(format!(
                "server {id} exited at start: {}",
                last_lines(&log, 5)
            ));
        }
        if Instant::now() > deadline {
            kill_pid(pid);
            return Err(format!("server {id} did not start listening within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Waits until every server has logged `link up` with every other server (by id), or fails
/// after `timeout` naming the missing links.
pub fn wait_links(set: &ServerSet, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let mut missing = Vec::new();
        for s in &set.servers {
            if !s.alive() {
                return Err(format!(
                    "server {} died: {}",
                    s.server_id,
                    last_lines(&s.log(), 5)
                ));
            }
            let log = s.log();
            for peer in &set.servers {
                if peer.server_id != s.server_id
                    && !log.contains(&format!("link up with server {} ", peer.server_id))
                {
                    missing.push(format!("{}->{}", s.server_id, peer.server_id));
                }
            }
        }
        if missing.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "links not up after {} s: {}",
                timeout.as_secs(),
                missing.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
