//! What the core asks the net layer to do, in order: the one place its [`Action`]s are made.
//!
//! Components say what they mean — `Outbox::send` a frame, `Outbox::route` one carried for
//! the input's sender (flow-controlled), `Outbox::broadcast` one frame to many,
//! `Outbox::arm` a timer, `Outbox::close` a connection, `Outbox::dial` a peer — and the
//! net layer drains the actions in order after each input ([`Server::actions`]).
//!
//! [`Server::actions`]: crate::core::server::Server::actions

use crate::core::server::{Action, CloseCode, ConnId, Timer};
use crate::wire::frame::Frame;
use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct Outbox {
    actions: VecDeque<Action>,
}

impl Outbox {
    /// A frame to one connection.
    pub(crate) fn send(&mut self, conn: ConnId, text: Frame) {
        self.actions.push_back(Action::Send { conn, text });
    }

    /// A frame carried for the sender of the input being handled (see [`Action::Route`]).
    pub(crate) fn route(&mut self, conn: ConnId, text: Frame) {
        self.actions.push_back(Action::Route { conn, text });
    }

    /// One frame to each of `conns`: one text shared by all.
    pub(crate) fn broadcast(&mut self, conns: impl IntoIterator<Item = ConnId>, text: &Frame) {
        for conn in conns {
            self.send(conn, text.clone());
        }
    }

    /// `timer` fires as an input at `at_ms` (monotonic).
    pub(crate) fn arm(&mut self, at_ms: u64, timer: Timer) {
        self.actions.push_back(Action::Timer { at_ms, timer });
    }

    /// Closes `conn` with `code`; the core has already forgotten it.
    pub(crate) fn close(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        self.actions.push_back(Action::Close { conn, code, reason });
    }

    /// Opens a connection to peer target `target`.
    pub(crate) fn dial(&mut self, target: u32, host: String, port: u16, tls: bool) {
        self.actions.push_back(Action::Dial {
            target,
            host,
            port,
            tls,
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The oldest action not yet taken.
    pub(crate) fn pop(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}
