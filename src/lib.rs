//! SOCP v1.3: a federated, end-to-end encrypted chat server and its line client.
pub mod b64;
pub mod canon;
pub mod channel;
pub mod client;
pub mod config;
pub mod crypto;
pub mod dedup;
pub mod directory;
pub mod federation;
pub mod identity;
pub mod ids;
pub mod net;
pub mod server;
pub mod store;
pub mod timer;
pub mod wire;
