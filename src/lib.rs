//! SOCP v1.3: a federated, end-to-end encrypted chat server and its line client.
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
