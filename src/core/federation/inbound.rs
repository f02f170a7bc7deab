//! Frames from linked servers (PROTOCOL.md §6, §7): the `impl Server` glue that checks each
//! one (pinned key of `from` → dedup → signature → handler) and applies it — presence, announces,
//! channel news, deliveries — with the seen-cache and the presence order of the relay
//! component, and the pins of the links component.

use super::REFRESH_AT_LEAST;
use crate::core::dedup::{self, Stale};
use crate::core::directory::{Directory, Entry};
use crate::core::server::{Server, Time};
use crate::core::signer::Urgency;
use crate::crypto::PublicKey;
use crate::wire::canon;
use crate::wire::frame::{Frame, Lane, Signed};
use crate::wire::peer::{Announce, Delivery, PeerFrame, Presence, Route};
use crate::wire::user::unknown_type;
use crate::wire::{self, Envelope, ErrorCode, Fields, Text, WireError, types};
use log::{debug, info, warn};
use serde_json::{Map, Value, json};
use std::sync::Arc;

impl Server {
    /// Records a remote user `{user_id, server_id, pubkey, meta}` told by server `sender`, and
    /// tells local users. An entry without `server_id` is hosted by `sender` (§4.3 *Accept*);
    /// an `advert` (`Some((frame text, link it came on))`) must be, and is forwarded to the
    /// other links once it is accepted, before it is re-signed for local users (§7).
    /// Refused, and logged (§7 *A user stays where it is*): a claim on a user hosted by another live linked server, and a key other than the one this
    /// server knows for the id (bound here, or first seen from the mesh).
    pub(super) fn learn_remote_user(
        &mut self,
        now: Time,
        entry: &Map<String, Value>,
        sender: &str,
        advert: Option<(&str, &str)>,
    ) -> Result<(), WireError> {
        let f = Fields(entry);
        let user_id = f.id("user_id")?;
        let server_id = match entry.get("server_id") {
            None => sender,
            Some(_) => f.id("server_id")?,
        };
        if advert.is_some() && server_id != sender {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                "USER_ADVERTISE server_id differs from its sender",
            ));
        }
        if server_id == self.id {
            return Ok(());
        }
        let meta = entry
            .get("meta")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        // *Accept*: the key at the top or inside meta (§7).
        let Some(key_text) = f
            .str("pubkey")
            .ok()
            .or_else(|| meta.get("pubkey").and_then(Value::as_str))
        else {
            return Err(WireError::field("pubkey", "missing"));
        };
        let pubkey = self.parse_key("pubkey", key_text)?;
        if let Some(existing) = self.dir.get(user_id) {
            if existing.local.is_some() {
                info!("server {sender} claims user {user_id}, who is online here: refused");
                return Err(WireError::new(
                    ErrorCode::NameInUse,
                    format!("user {user_id} is online at server {}", self.id),
                ));
            }
            if existing.server_id != server_id && self.fed.links.is_linked(&existing.server_id) {
                warn!(
                    "server {sender} claims user {user_id} for server {server_id}, but live \
                     server {} hosts it: refused",
                    existing.server_id
                );
                return Err(WireError::new(
                    ErrorCode::NameInUse,
                    format!("user {user_id} is online at server {}", existing.server_id),
                ));
            }
            if existing.pubkey == pubkey && existing.server_id == server_id && existing.meta == meta
            {
                // Nothing new here; a server behind us may not know it yet. This advert (at
                // least as new as the last, §7) is the one a new link gets from now on.
                if let Some((text, link)) = advert {
                    self.dir.set_advert(user_id, Text::from(text.to_string()));
                    self.forward(text, link);
                }
                return Ok(());
            }
        }
        self.check_user_key(user_id, &pubkey, sender)?;
        let entry = Entry {
            server_id: server_id.to_string(),
            local: None,
            pubkey,
            meta,
            advert: advert.map(|(text, _)| Text::from(text.to_string())),
            advertised_ms: 0,
        };
        let relay = Directory::entry_json(user_id, &entry);
        self.dir.insert(user_id, entry);
        debug!("user {user_id} online at server {server_id}");
        // Forward first: the other servers' work then overlaps with ours.
        if let Some((text, link)) = advert {
            self.forward(text, link);
        }
        let original = advert.map(|(text, _)| text);
        self.broadcast_local(now, types::USER_ADVERTISE, &relay, original, Urgency::Bulk);
        Ok(())
    }

    /// §7: a user id's key, once known here, does not change through gossip. The first key
    /// seen for a remote user is remembered in the database, so a restart does not forget it.
    fn check_user_key(
        &mut self,
        user_id: &str,
        pubkey: &Arc<PublicKey>,
        sender: &str,
    ) -> Result<(), WireError> {
        let refused = |why: &str| {
            warn!("server {sender} gave user {user_id} another key than {why}: refused");
            Err(WireError::new(
                ErrorCode::BadKey,
                format!("user {user_id} has another key"),
            ))
        };
        if let Some(known) = self.dir.get(user_id) {
            return if known.pubkey == *pubkey {
                Ok(())
            } else {
                refused("the one it is online with")
            };
        }
        match self.store.known_user_key(user_id) {
            Ok(Some(known)) => match self.cached_key(&known) {
                Ok(known) if known == *pubkey => Ok(()),
                _ => refused("the one known here"),
            },
            Ok(None) => {
                if let Err(e) = self.store.remember_user_key(user_id, pubkey.encoded()) {
                    warn!("could not remember the key of user {user_id}: {e}");
                }
                Ok(())
            }
            Err(e) => {
                // The directory check above still holds; availability over a lookup.
                warn!("could not look up the key of user {user_id}: {e}");
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------ frames from peers

    pub(crate) fn on_peer_frame(
        &mut self,
        now: Time,
        link: &str,
        env: &Envelope,
        text: &str,
    ) -> Result<(), WireError> {
        self.fed.links.heard(link, now.mono_ms);
        let frame = PeerFrame::parse(env);
        if let PeerFrame::Error { code, detail } = frame {
            info!("server {link} reports {code}: {detail}");
            return Ok(()); // never answer an error with an error
        }
        if env.from == self.id {
            return Ok(()); // our own frame, flooded back to us
        }
        // §6 *Who may sign*: the pinned key of `from`. An ANNOUNCE from a server we do not know
        // yet introduces it, proving possession of the key it carries; the link vouches for it.
        let key = match self.fed.links.key_of(&env.from) {
            Some(k) => k,
            None if let PeerFrame::Announce(announce) = &frame => {
                wire::check_id("from", &env.from)?;
                self.parse_key("pubkey", announce.pubkey.clone()?)?
            }
            None => {
                return Err(WireError::new(
                    ErrorCode::InvalidSig,
                    format!("unknown or unpinned server {:?}", env.from),
                ));
            }
        };
        let canonical = canon::canonical_object(&env.payload)?;
        // §6: judged on what the signature covers. A payload with its own `ts` is fresh by that
        // `ts` and the same frame whatever its envelope says; one without keeps the envelope's.
        let payload_ts = match env.payload.get("ts") {
            None => None,
            Some(_) => Some(env.fields().i64("ts")?),
        };
        let ts = payload_ts.unwrap_or(env.ts);
        let dedup_key = dedup::key(
            &env.kind, &env.from, &env.to, env.ts, payload_ts, &canonical,
        );
        match self.fed.relay.check_seen(&dedup_key, ts, now.wall_ms) {
            Ok(()) => {}
            Err(Stale::Duplicate) => {
                self.metrics.dedup_drop(Stale::Duplicate);
                return Ok(());
            }
            Err(Stale::OutOfWindow) => {
                self.metrics.dedup_drop(Stale::OutOfWindow);
                debug!(
                    "dropping {} from {}: ts outside the window",
                    env.kind, env.from
                );
                return Ok(());
            }
        }
        if !wire::verify_canonical(&key, &canonical, &env.payload, &env.sig)? {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                format!("{} signature does not verify", env.kind),
            ));
        }
        // A heartbeat does nothing twice, and its one signed payload (`{}`) could otherwise be
        // re-sent with any envelope to fill the cache: it is not recorded.
        if !matches!(frame, PeerFrame::Heartbeat) {
            let until = self.fed.relay.record_seen(dedup_key, ts, now.wall_ms);
            if payload_ts.is_some()
                && let Err(e) = self.store.remember_seen(&dedup_key, until)
            {
                warn!("could not save a seen-cache entry: {e}");
            }
        }
        let is_advert = matches!(frame, PeerFrame::Advertise(_));
        match frame {
            PeerFrame::Heartbeat => Ok(()),
            PeerFrame::Announce(announce) => self.on_announce(now, env, announce, key, link, text),
            PeerFrame::Advertise(presence) | PeerFrame::Remove(presence) => {
                let Presence { user_id, server_id } = presence?;
                if server_id != env.from {
                    return Err(WireError::new(
                        ErrorCode::InvalidSig,
                        format!("{} server_id differs from its sender", env.kind),
                    ));
                }
                // §7: presence older than the newest applied for that user is ignored.
                if let Some(ts) = payload_ts
                    && !self
                        .fed
                        .relay
                        .presence_is_newest(server_id, user_id, ts, now.wall_ms)
                {
                    debug!("ignoring {} for {user_id}: older than the last", env.kind);
                    return Ok(());
                }
                if is_advert {
                    let advert = Some((text, link));
                    return self.learn_remote_user(now, &env.payload, &env.from, advert);
                }
                self.forward(text, link);
                if self.dir.remove_if_hosted_by(user_id, server_id).is_some() {
                    debug!("user {user_id} offline at server {server_id}");
                    let payload = json!({"user_id": user_id, "server_id": server_id});
                    self.broadcast_local(
                        now,
                        types::USER_REMOVE,
                        &payload,
                        Some(text),
                        Urgency::Bulk,
                    );
                    self.transfers_user_gone(now, user_id);
                }
                Ok(())
            }
            PeerFrame::ChannelAdd => {
                self.forward(text, link);
                Ok(())
            }
            PeerFrame::ChannelUpdated(version) => {
                self.channel.adopt(version?);
                self.forward(text, link);
                Ok(())
            }
            PeerFrame::Delivery(delivery) => {
                self.on_peer_delivery(now, env, delivery, link, text, &canonical)
            }
            PeerFrame::Welcome | PeerFrame::Hello => {
                debug!("ignoring {} on an established link", env.kind);
                Ok(())
            }
            // Answered above.
            PeerFrame::Error { .. } => Ok(()),
            PeerFrame::Unknown(kind) => Err(unknown_type(kind)),
        }
    }

    /// Re-advertises, signed afresh, our users whose advert last went to every link a third of
    /// the dedup window ago or more: a new link anywhere in the mesh is handed the adverts
    /// other servers keep of them (see `link_up`), and one older than the window would be
    /// refused there (§6 freshness), so a user online for long would never reach a server
    /// that links in later. As announces are (see [`super::relay::REANNOUNCE_EVERY`]), adverts are kept
    /// inside the window. The receivers forward them and tell their users nothing (nothing
    /// changed). At most an eighth of our users (at least [`REFRESH_AT_LEAST`]) per heartbeat,
    /// so a login storm does not come back as a signing storm: with the defaults every advert
    /// relayed is at most 100 s + 15 s + 8 × 15 s old. Nobody waits for them: they are signed
    /// when the signers have nothing else to do ([`Urgency::Background`]), and every frame
    /// sent after them on a link but presence of the same user may pass them while they wait
    /// ([`Lane::Refresh`]): they carry no news.
    pub(super) fn refresh_adverts(&mut self, now: Time) {
        let third = (self.fed.cfg.dedup_window_ms / 3) as i64;
        let before = now.wall_ms.saturating_sub(third);
        let max = (self.dir.local_len() / 8).max(REFRESH_AT_LEAST);
        for user_id in self.dir.local_adverts_due(before, max) {
            if let Some(signed) = self.advert(now, &user_id, Urgency::Background) {
                let text = self.own_broadcast(now, types::USER_ADVERTISE, &signed);
                self.send_links(text.in_lane(Lane::refresh(&user_id)), None);
                self.dir.set_advertised(&user_id, now.wall_ms);
            }
        }
    }

    /// Sends our `SERVER_ANNOUNCE` to every link.
    pub(super) fn announce_self(&mut self, now: Time) {
        if let Some(signed) = self.sign(&self.hello_payload(), Urgency::Conversation) {
            let text = self.own_broadcast(now, types::SERVER_ANNOUNCE, &signed);
            self.send_links(text, None);
        }
    }

    fn on_announce(
        &mut self,
        now: Time,
        env: &Envelope,
        announce: Announce<'_>,
        key: Arc<PublicKey>,
        link: &str,
        text: &str,
    ) -> Result<(), WireError> {
        let (host, port) = announce.addr?;
        let host = host.to_string();
        if self.parse_key("pubkey", announce.pubkey?)? != key {
            return Err(WireError::field(
                "pubkey",
                "differs from the key pinned for this server",
            ));
        }
        let from = env.from.clone();
        self.fed
            .relay
            .keep_announce(from.clone(), Frame::from(text.to_string()));
        if from != self.id {
            if !self.fed.links.is_known(&from) {
                info!("learned server {from} at ws://{host}:{port} from server {link}");
            }
            self.pin_server(now, &from, &host, port, &key);
            self.ensure_target(now, &from, &host, port, &key);
        }
        self.forward(text, link);
        Ok(())
    }

    /// `SERVER_DELIVER`, server-to-server `MSG_PUBLIC_CHANNEL` and file frames (§6).
    fn on_peer_delivery(
        &mut self,
        now: Time,
        env: &Envelope,
        delivery: Delivery<'_>,
        link: &str,
        text: &str,
        canonical: &str,
    ) -> Result<(), WireError> {
        if env.to != self.id {
            // Relay unchanged toward `to`, never back where it came from.
            if !self.route_toward(&env.to, Frame::from(text.to_string()), Some(link)) {
                debug!("no route to server {} for a relayed {}", env.to, env.kind);
            }
            return Ok(());
        }
        let Route { user_id, sender } = delivery.route?;
        // A delivery may claim only a sender its signing server hosts (§6).
        if self.dir.get(sender).map(|e| e.server_id.as_str()) != Some(env.from.as_str()) {
            return Err(WireError::new(
                ErrorCode::InvalidSig,
                format!("server {} does not host {sender}", env.from),
            ));
        }
        let Some(dest) = self.dir.get(user_id).and_then(|e| e.local) else {
            debug!("{} for {user_id}, who is not here: dropped", env.kind);
            return Ok(());
        };
        let kind = delivery.local_kind;
        // §5.6: a user who takes other servers' signatures gets the payload that server signed,
        // unchanged (its `from` and `sig`; only `type` and `to` change): no signature here.
        // Only when the payload is complete: one without `ts` is re-signed with it.
        if self.is_peer_sig(dest) && env.payload.contains_key("ts") {
            let signed = Signed::ready(canonical.to_string(), env.sig.clone());
            let sender = env.payload.get("sender").and_then(Value::as_str);
            let text = signed
                .frame(kind, &env.from, user_id, env.ts)
                .in_lane(Lane::for_sender(sender));
            self.out.route(dest, text);
            return Ok(());
        }
        let mut payload = env.payload.clone();
        payload.remove("user_id");
        // §6 *Accept*: the standard's own form carries the original `ts` in the envelope only;
        // the user's frame always has it in the payload (§5.5), where `content_sig` needs it.
        payload.entry("ts").or_insert_with(|| Value::from(env.ts));
        self.route_signed(now, dest, kind, user_id, &Value::Object(payload));
        Ok(())
    }
}
