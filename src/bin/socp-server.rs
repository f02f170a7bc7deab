//! `socp-server`: parse the command line, load the identity and database, bind, and run the
//! event loop until SIGINT/SIGTERM (a second signal exits at once).

use socp::config::{self, Command};
use socp::core::federation::{FedConfig, PeerSpec};
use socp::core::server::{Limits, Server};
use socp::core::transfer::TransferLimits;
use socp::crypto::PublicKey;
use socp::net::Net;
use socp::store::Store;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// glibc's malloc serves an allocation above its mmap threshold with its own mapping, returned
/// to the system when freed; but by default the threshold *rises* to the size of any such block
/// that is freed (up to 32 MiB). A server builds large short-lived frames (a directory snapshot
/// is ~0.8 KiB per online user, one per login), so the threshold soon exceeds them, they come
/// from the heap among long-lived per-connection data, and the heap keeps their pages: with
/// 1000 idle connections, 47–56 KB of resident memory each instead of 15 KB (`socp-bench
/// --scenario idle`). Setting the threshold fixes it at 128 KiB (glibc's initial value).
///
/// And one arena: frames are completed by the signer threads (`--sign-threads`), so their text
/// would come from those threads' own arenas, whose freed pages the loop thread never reuses;
/// after a burst of logins they kept ~3.5 KB of resident memory per connection.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_large_allocations_out_of_the_heap() {
    // SAFETY: mallopt only changes a malloc tuning parameter (glibc serialises it with its own
    // locks); it is called at start-up, before any other thread exists, and M_MMAP_THRESHOLD
    // and M_ARENA_MAX with positive values are valid on every glibc.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    if ok != 1 {
        log::warn!("could not set malloc's mmap threshold; idle memory may be higher");
    }
    // SAFETY: as above.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if ok != 1 {
        log::warn!("could not limit malloc's arenas; idle memory may be higher");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_allocations_out_of_the_heap() {}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    keep_large_allocations_out_of_the_heap();
    let env = |name: &str| std::env::var(name).ok();
    let cfg = match config::parse_server_args(std::env::args_os().skip(1), &env) {
        Ok(Command::Help(usage)) => {
            print!("{usage}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("socp-server {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::PrintPubkey(cfg)) => {
            // The key file only: no database is created or opened.
            let key = dir_of(&cfg, &cfg.key, false).and_then(|()| {
                socp::identity::load_or_create_key(&cfg.key, cfg.server_id.as_deref())
            });
            return match key {
                Ok((_, key)) => {
                    println!("{}", key.public_key().encoded());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        Ok(Command::Run(cfg)) => cfg,
        Err(e) => {
            eprintln!("socp-server: {e}\nTry 'socp-server --help'.");
            return ExitCode::from(2);
        }
    };
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &str) -> ExitCode {
    eprintln!("socp-server: {e}");
    ExitCode::FAILURE
}

/// Makes sure the directory holding `file` exists (and, with `writable`, that we may create
/// files in it), with an error that names it and says why.
fn dir_of(cfg: &config::Config, file: &std::path::Path, writable: bool) -> Result<(), String> {
    let Some(dir) = file.parent() else {
        return Ok(());
    };
    let label = if dir == cfg.data_dir {
        "data directory"
    } else {
        "directory"
    };
    socp::startup::prepare_dir(dir, label, writable)
}

fn open(cfg: &config::Config) -> Result<(String, socp::crypto::PrivateKey, Store), String> {
    dir_of(cfg, &cfg.db, true)?;
    socp::startup::check_database(&cfg.db)?;
    let store = Store::open(&cfg.db).map_err(|e| format!("database {}: {e}", cfg.db.display()))?;
    dir_of(cfg, &cfg.key, false)?;
    let (id, key) = socp::identity::load_or_create(&cfg.key, cfg.server_id.as_deref(), &store)?;
    Ok((id, key, store))
}

/// The TLS configurations: the listener's (`--tls-cert`/`--tls-key`), and the one `wss://`
/// peers are dialled with (or why they cannot be). Files the operator named must be usable;
/// the system's roots must be only if a `--bootstrap` peer is `wss://` (a server learned of
/// later that needs them fails each dial with the reason, logged).
type PeerTls = Result<Arc<rustls::ClientConfig>, String>;

fn tls_setup(cfg: &config::Config) -> Result<(Option<Arc<rustls::ServerConfig>>, PeerTls), String> {
    let server = match &cfg.tls {
        Some(files) => Some(socp::net::tls::server_config(&files.cert, &files.key)?),
        None => None,
    };
    let wss_bootstrap = cfg.bootstrap.iter().any(|b| b.tls);
    let peers = if cfg.ca_file.is_some() || wss_bootstrap {
        Ok(socp::net::tls::client_config(cfg.ca_file.as_deref())?)
    } else if cfg.peer_tls {
        socp::net::tls::client_config(None)
            .inspect_err(|e| log::warn!("servers learned of cannot be dialled with wss://: {e}"))
    } else {
        Err("no wss:// peer configured (--peer-scheme wss, or a wss:// --bootstrap)".into())
    };
    Ok((server, peers))
}

fn run(cfg: config::Config) -> Result<(), String> {
    let (server_tls, peer_tls) = tls_setup(&cfg)?;
    let scheme = if server_tls.is_some() { "wss" } else { "ws" };
    let (id, key, store) = open(&cfg)?;
    let listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .map_err(|e| format!("cannot listen on {}:{}: {e}", cfg.host, cfg.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let signals = install_signal_handlers().map_err(|e| format!("signal handlers: {e}"))?;
    log::info!(
        "server {id} listening on {scheme}://{addr} (database {})",
        cfg.db.display()
    );
    // One line on stdout for scripts and tests (the port may have been chosen by the system).
    println!("socp-server listening on {scheme}://{addr} server_id={id}");
    if cfg.open_join {
        log::warn!(
            "open join (--open-join / SOCP_OPEN_JOIN): servers whose key is not pinned may link"
        );
    }
    let advertise_host = cfg.advertise_host.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        }
    });
    let fed = FedConfig {
        advertise_host,
        advertise_port: addr.port(),
        bootstrap: cfg
            .bootstrap
            .iter()
            .map(|b| {
                let key = PublicKey::parse(&b.pubkey).map_err(|e| format!("bootstrap key: {e}"))?;
                Ok(PeerSpec {
                    host: b.host.clone(),
                    port: b.port,
                    tls: b.tls,
                    key: Arc::new(key),
                })
            })
            .collect::<Result<_, String>>()?,
        peer_tls: cfg.peer_tls,
        open_join: cfg.open_join,
        mesh: cfg.mesh,
        heartbeat_ms: cfg.heartbeat_ms,
        dead_after_ms: cfg.dead_after_ms,
        backoff_max_ms: cfg.backoff_max_ms,
        rng_seed: u64::from_le_bytes(socp::crypto::random_bytes::<8>()),
        ..FedConfig::default()
    };
    let transfers = TransferLimits {
        max_file_size: cfg.max_file_size,
        max_per_user: cfg.max_transfers_per_user,
        idle_ms: cfg.transfer_idle_ms,
    };
    let core = Server::new(id, key, Limits::from(&cfg), store)
        .with_federation(fed)
        .with_transfer_limits(transfers);
    let net = Net::new(&cfg, listener, Some(signals), core)
        .map_err(|e| e.to_string())?
        .with_tls(server_tls, peer_tls);
    net.run().map_err(|e| format!("event loop: {e}"))
}

/// SIGINT/SIGTERM write a byte to a self-pipe the event loop watches; a second signal, while the
/// graceful shutdown runs, exits at once with status 130.
fn install_signal_handlers() -> std::io::Result<std::os::unix::net::UnixStream> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let (read, write) = std::os::unix::net::UnixStream::pair()?;
    let first_seen = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Order matters: the exit check runs before the flag is set by this same signal.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&first_seen))?;
        signal_hook::flag::register(signal, Arc::clone(&first_seen))?;
        signal_hook::low_level::pipe::register(signal, write.try_clone()?)?;
    }
    Ok(read)
}
