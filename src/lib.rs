//! SOCP v1.3: a federated, end-to-end encrypted chat server and its line client.
//!
//! The crate is the library under three binaries: `socp-server` (`src/bin/socp-server.rs`),
//! the line client `socp` (`src/bin/socp.rs`) and, in its own crate `bench/`, the benchmark
//! `socp-bench`. The server is one thread, one `mio::Poll`, no async runtime (DESIGN.md
//! "The shape"). Its code is in layers, each a folder or file here:
//!
//! | layer | owns | must not |
//! |---|---|---|
//! | [`wire`] | the envelope and frame types, canonical JSON, base64, ids (PROTOCOL.md §1–§3) | touch a socket, a clock or any state |
//! | [`crypto`] | RSA-4096 keys, PSS signatures, OAEP, `content_sig`, the key cache (§3) | know about connections or server state |
//! | [`core`] | the server as a sans-IO state machine: sessions, accounts, federation, directory, public channel, transfers, seen-cache, counters (§4–§10); the `Persistence` trait it stores through | touch a socket, a file or the clock, draw OS randomness, sleep, block |
//! | [`net`] | the event loop: sockets, WebSocket handshakes, TLS, timers, signals, `/healthz` and `/metrics` | decide what a frame means |
//! | [`store`] | SQLite, one database per server (§11): what must survive a restart; implements the core's `Persistence` | know about connections or frames: it keeps what the core tells it |
//! | [`client`] | the client's session and file transfers (§5, §9) | open a socket or read the terminal: the `socp` binary does |
//!
//! The core performs no I/O of its own. It stores through the
//! [`Persistence`](crate::core::persist::Persistence) trait it is handed, the SQLite
//! [`Store`](crate::store::Store) in the server (an in-memory
//! [`MemStore`](crate::core::persist::MemStore) in tests), and calls it synchronously: a key
//! binding or an account is on disk before the reply that confirms it (§11). Its random bytes
//! (challenge nonces, password salts) come from the [`Random`](crate::core::random::Random)
//! source it is handed: the OS's CSPRNG in the server.
//!
//! Beside them: [`account`] (§5.3: what a password becomes, used by the client and by the
//! core's login), and what `socp-server` does before its loop starts: [`config`] (every
//! tunable, flags and `SOCP_*` variables), [`identity`] (the server's id and key file, §4.1)
//! and [`startup`] (checks on the data directory and database).
//!
//! # One frame's way through
//!
//! Take a `MSG_DIRECT` from alice, connected here, to bob on another server (§6):
//!
//! 1. **socket → net.** `mio` reports alice's socket readable. [`net::Net`] has her connection
//!    read WebSocket messages from it until `WouldBlock` (DESIGN.md "Rules of the event loop", rule 1), within
//!    a per-turn budget, over plain TCP or [`net::tls`].
//! 2. **net → core.** Each text message goes to the core as
//!    [`Input::Text`](crate::core::server::Input::Text) with the current
//!    [`Time`](crate::core::server::Time): the net layer reads the clock; the core decides
//!    nothing by a clock of its own.
//! 3. **wire parse.** The core ([`Server`](crate::core::server::Server)) parses it into a
//!    [`wire::Envelope`] (lenient where §1–§3 say *Accept*; a frame that does not parse is
//!    answered with an `ERROR`, §10), then dispatches on the connection's state and the frame's
//!    `type`: here, a user's frame after the hello (§5.4).
//! 4. **core.** It checks the payload (alice's `sender_pub` is her key), looks bob up in the
//!    [directory](crate::core::directory) (§7) and routes: to a user here as `USER_DELIVER`, or,
//!    as here, to bob's server as `SERVER_DELIVER` (§6). Its payload is put in canonical form
//!    ([`wire::canon`], §3.3) and handed to the core's [signer](crate::core::signer): the
//!    frame ([`wire::frame::Frame`]) is made at once, its `sig` may come later. Links, relays
//!    and dedup of frames between servers are [`core::federation`] and [`core::dedup`].
//! 5. **core → actions.** Nothing is written yet: the core queues
//!    [`Action`](crate::core::server::Action)s (`Route` this text to that connection, `Send`,
//!    `Close`, arm a `Timer`, `Dial` a peer) and the net layer drains them after every input.
//! 6. **signing.** With `--sign-threads N` (the default: one per CPU) a
//!    [pool of threads](crate::net::signpool) makes the RSA signature, conversations before
//!    logins and leaves, completes every frame waiting for it and wakes the loop; with `0`
//!    it is made at once, on the loop.
//! 7. **net writes.** The net layer `write()`s each complete frame to its connection at once
//!    and `flush()`es every written connection once per loop turn; a frame still waiting for
//!    its signature, or refused by a full socket, waits in the connection's outbox, and what
//!    comes after it waits behind it, in order (the one exception: a frame carried for a user
//!    may pass another user's presence not written yet, [`wire::frame::Lane`]). Timers the
//!    core armed fire from the net layer's [timer wheel](crate::net::timer) and come back as
//!    `Input::Timer`.
//!
//! Because steps 2–5 are plain function calls with no I/O, `tests/core*.rs` drive the core
//! (and a mesh of cores) with simulated time; the other tests run the real binaries over
//! loopback.

pub mod account;
pub mod client;
pub mod config;
pub mod core;
pub mod crypto;
pub mod identity;
pub mod net;
pub mod startup;
pub mod store;
pub mod wire;
