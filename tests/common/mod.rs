#![allow(dead_code)]
pub mod keys;
pub mod proc;
