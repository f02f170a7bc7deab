//! SOCP v1.3: a federated, end-to-end encrypted chat server and its line client.
pub mod b64;
