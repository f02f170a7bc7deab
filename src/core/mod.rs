//! The core: the server as a sans-IO state machine (DESIGN.md "The shape").
//!
//! It owns every piece of server state that the protocol talks about: connections and sessions
//! (`sessions`, dispatched by [`server`]), accounts ([`login`]), links to other servers,
//! dialling and relaying ([`federation`], whose relay part keeps the seen-cache for relayed
//! frames, [`dedup`]), who is online where ([`directory`]), the public channel ([`channel`]),
//! file transfers ([`transfer`]) and the counters that `GET /metrics` reports ([`metrics`]). It is fed [`server::Input`]s with a [`server::Time`]
//! and answers with [`server::Action`]s.
//!
//! Each of these is a type with private fields: `Sessions`, `Accounts`, [`transfer::Transfers`],
//! [`directory::Directory`], [`channel::PublicChannel`], and [`federation::Federation`] with
//! its own parts (dialling, links, relay: the last owns the [`dedup::SeenCache`]).
//! [`server::Server`] owns them all and the dispatch; its `impl` blocks in the component
//! modules are glue that calls the components' methods with what they need (`now`, the outbox,
//! the signer, the store).
//!
//! It must not touch a socket, read the clock, sleep or block: the net layer does all of that
//! and hands the core `now`. What it keeps across restarts it reads and writes through the
//! [`persist::Persistence`] trait it is given (the SQLite [`crate::store::Store`] in the server,
//! [`persist::MemStore`] in tests), synchronously, so a key binding or an account is durable
//! before the reply that confirms it (PROTOCOL.md §11). Its random bytes come from the
//! [`random::Random`] source it is given (the OS's in the server, a seeded one in tests that
//! want to replay a run). (Its one clock reading times signatures for `/metrics` and decides
//! nothing.) That is what lets `tests/core*.rs` drive it, a whole mesh too, with simulated time
//! and no network.

pub mod channel;
pub mod dedup;
pub mod directory;
pub mod federation;
pub mod login;
pub mod metrics;
pub mod outbox;
pub mod persist;
pub mod random;
pub mod server;
pub(crate) mod sessions;
pub mod signer;
pub mod transfer;
