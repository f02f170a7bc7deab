//! Several server cores wired together by the simulated [`Mesh`] (tests/support/mesh.rs): no
//! sockets, one simulated clock, every frame between servers verified as it leaves. Each core's
//! `Dial`, `Send`/`Route`, `Close` and `Timer` actions are the others' inputs, so what only the
//! real-process tests (tests/mesh.rs) could show before — convergence, link loss and redial
//! backoff, relaying through a server in the middle — runs here in milliseconds.
//!
//! Servers are "srv-a" … "srv-d" (keys server1 … server4, ports 9001 …), users alice, bob,
//! carol, dave (keys user1 … user4).

// Nodes, their users and ids are parallel arrays indexed by node number.
#![allow(clippy::needless_range_loop)]

mod common;
mod support;

use common::keys::test_key;
use serde_json::json;
use socp::core::server::{ConnId, Timer};
use socp::crypto::{PrivateKey, verify_content_sig};
use socp::wire::{self, Envelope, types};
use support::mesh::{Cut, IDS, Mesh};
use support::*;

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

fn user_key(i: usize) -> PrivateKey {
    test_key(&format!("user{}", i + 1))
}

/// Every node bootstraps every other one (each pins the others' keys).
fn everyone_knows_everyone(n: usize) -> Vec<Vec<usize>> {
    (0..n)
        .map(|i| (0..n).filter(|&j| j != i).collect())
        .collect()
}

fn mesh_of(bootstrap: &[Vec<usize>], full_mesh: bool) -> Mesh {
    let lists: Vec<&[usize]> = bootstrap.iter().map(Vec::as_slice).collect();
    Mesh::new(&lists, full_mesh)
}

fn ids(of: &[usize]) -> Vec<String> {
    of.iter().map(|&i| IDS[i].to_string()).collect()
}

/// What every directory should hold: user `i` at server `i`, for the nodes listed.
fn everyone_at_home(nodes: &[usize]) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = nodes
        .iter()
        .map(|&i| (USERS[i].to_string(), IDS[i].to_string()))
        .collect();
    all.sort();
    all
}

/// Asserts the mesh of `n` nodes is whole: each links every other, over exactly one
/// connection per pair, and every directory holds user `i` at server `i`.
#[track_caller]
fn assert_converged(mesh: &Mesh, n: usize, context: &str) {
    assert_linked_fully(mesh, n, context);
    let all: Vec<usize> = (0..n).collect();
    for i in 0..n {
        assert_eq!(
            mesh.directory(i),
            everyone_at_home(&all),
            "{context}: directory of {}",
            IDS[i]
        );
    }
}

/// Asserts each of the `n` nodes links every other, over exactly one connection per pair.
#[track_caller]
fn assert_linked_fully(mesh: &Mesh, n: usize, context: &str) {
    for i in 0..n {
        let others: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        assert_eq!(
            mesh.linked(i),
            ids(&others),
            "{context}: links of {}",
            IDS[i]
        );
        for &j in &others {
            assert_eq!(
                mesh.wires_between(i, j),
                1,
                "{context}: one link per pair ({} – {})",
                IDS[i],
                IDS[j]
            );
        }
    }
}

/// The user ids in the `USER_ADVERTISE` / `USER_REMOVE` frames among `frames`, by kind.
fn presence(frames: &[Envelope], kind: &str) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.kind == kind)
        .map(|f| str_field(f, "user_id").to_string())
        .collect()
}

// -------------------------------------------------------------------- convergence

/// §4.3, §7: whatever order three servers start in (each dialling the others, the first ones
/// failing and backing off until the later ones are up), they end with one link per pair and
/// the same directory, users logged in along the way included; each user's `LIST_RESPONSE`
/// names everyone.
#[test]
fn directories_converge_whatever_the_start_order() {
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for order in orders {
        let context = format!("start order {:?}", ids(&order));
        let mut mesh = mesh_of(&everyone_knows_everyone(3), true);
        let mut conns = [ConnId(0); 3];
        for &i in &order {
            mesh.start(i);
            // Its user logs in at once, before any link is up.
            conns[i] = mesh.login(i, USERS[i], &user_key(i));
            mesh.advance(1_500);
        }
        mesh.advance(60_000);
        assert_converged(&mesh, 3, &context);
        for i in 0..3 {
            mesh.nodes[i].clear();
            assert_eq!(
                mesh.nodes[i].list(conns[i], USERS[i]),
                ["alice", "bob", "carol"],
                "{context}"
            );
        }
        // Every server that started before another failed to dial it at first.
        let first = order[0];
        assert!(
            mesh.dial_log
                .iter()
                .any(|&(_, from, _, ok)| from == first && !ok),
            "{context}: {:?}",
            mesh.dial_log
        );
    }
}

/// §4.2, §4.3: servers that only know a server in the middle (srv-a and srv-c bootstrap srv-b
/// alone) learn each other from it — its welcome and the announces it relays pin their keys —
/// and link directly: the mesh becomes full, for any start order.
#[test]
fn a_star_of_bootstraps_becomes_a_full_mesh() {
    let bootstrap = vec![vec![1], vec![0, 2], vec![1]];
    for order in [[0, 1, 2], [1, 0, 2], [2, 1, 0]] {
        let context = format!("start order {:?}", ids(&order));
        let mut mesh = mesh_of(&bootstrap, true);
        for &i in &order {
            mesh.start(i);
            mesh.login(i, USERS[i], &user_key(i));
            mesh.advance(3_000);
        }
        mesh.advance(120_000);
        assert_converged(&mesh, 3, &context);
        assert!(
            mesh.dial_log
                .iter()
                .any(|&(_, from, to, ok)| ok && ((from, to) == (0, 2) || (from, to) == (2, 0))),
            "{context}: srv-a and srv-c dialled each other: {:?}",
            mesh.dial_log
        );
    }
}

/// The same scenario twice gives the same run: the same dials at the same times, the same
/// frames (by type and direction) in the same order.
#[test]
fn a_mesh_run_is_deterministic() {
    let run = || {
        let mut mesh = mesh_of(&[vec![1], vec![0, 2], vec![1]], true);
        for i in [2, 0, 1] {
            mesh.start(i);
            mesh.login(i, USERS[i], &user_key(i));
            mesh.advance(700);
        }
        mesh.advance(30_000);
        let frames: Vec<(usize, usize, String)> = mesh
            .wire_log
            .iter()
            .map(|(a, b, t)| (*a, *b, Envelope::parse(t).unwrap().kind))
            .collect();
        (mesh.dial_log.clone(), frames)
    };
    let (dials, frames) = run();
    assert!(!frames.is_empty());
    assert_eq!(run(), (dials, frames));
}

/// §4.4: two servers that start at the same instant dial each other at once; of the two
/// links, both keep the one the smaller id (srv-a) dialled, and the other is closed cleanly.
#[test]
fn simultaneous_dials_leave_the_link_the_smaller_id_dialled() {
    let mut mesh = mesh_of(&everyone_knows_everyone(2), true);
    mesh.start(1);
    mesh.start(0);
    mesh.advance(0);
    let dials: Vec<(usize, usize, bool)> = mesh
        .dial_log
        .iter()
        .map(|&(_, from, to, ok)| (from, to, ok))
        .collect();
    assert_eq!(dials, [(1, 0, true), (0, 1, true)], "both dialled");
    assert_eq!(mesh.wires_between(0, 1), 1);
    assert_eq!(mesh.wires_dialled(0, 1), 1, "srv-a's dial survives");
    assert_eq!(mesh.wires_dialled(1, 0), 0);
    assert_eq!(mesh.linked(0), ["srv-b"]);
    assert_eq!(mesh.linked(1), ["srv-a"]);
    // The surviving link carries presence both ways, and stays up on heartbeats.
    let alice = mesh.login(0, "alice", &user_key(0));
    let bob = mesh.login(1, "bob", &user_key(1));
    assert_eq!(
        presence(&mesh.nodes[0].frames_to(alice), types::USER_ADVERTISE),
        ["bob"]
    );
    mesh.advance(120_000);
    assert_eq!(mesh.wires_between(0, 1), 1);
    assert_eq!(mesh.linked(0), ["srv-b"]);
    assert!(mesh.nodes[0].frames_to(alice).is_empty(), "no flapping");
    assert!(mesh.nodes[1].frames_to(bob).is_empty(), "no flapping");
}

// -------------------------------------------------------------------- link loss (§4.4)

/// Two linked servers with alice at srv-a and bob at srv-b; the users' frames so far taken.
fn alice_and_bob() -> (Mesh, ConnId, ConnId) {
    let mut mesh = mesh_of(&everyone_knows_everyone(2), true);
    mesh.start(0);
    mesh.start(1);
    mesh.advance(5_000);
    let alice = mesh.login(0, "alice", &user_key(0));
    let bob = mesh.login(1, "bob", &user_key(1));
    assert_eq!(
        presence(&mesh.nodes[0].frames_to(alice), types::USER_ADVERTISE),
        ["bob"]
    );
    mesh.nodes[1].clear();
    (mesh, alice, bob)
}

/// The times of the dials from node `from` to node `to` at or after `since`.
fn dial_times(mesh: &Mesh, from: usize, to: usize, since: u64) -> Vec<u64> {
    mesh.dial_log
        .iter()
        .filter(|&&(at, f, t, _)| f == from && t == to && at >= since)
        .map(|&(at, ..)| at)
        .collect()
}

/// §4.4: a link that closes takes its users with it (each side tells its users once), and is
/// redialled by both sides with backoff — about 1 s, then 1 s, 2 s, 4 s … after each failure
/// (±20 %), capped at 60 s — for as long as the peer is unreachable. Once it is back, one
/// link comes up and presence returns.
#[test]
fn a_reset_link_is_redialled_with_backoff_and_presence_comes_back() {
    let (mut mesh, alice, bob) = alice_and_bob();
    let cut_at = mesh.now.mono_ms;
    mesh.cut(0, 1, Cut::Reset);
    told_of_each_other(&mut mesh, alice, bob, types::USER_REMOVE);
    assert_eq!(
        mesh.directory(0),
        [("alice".to_string(), "srv-a".to_string())]
    );
    assert!(mesh.linked(0).is_empty() && mesh.linked(1).is_empty());

    mesh.advance(300_000);
    for (from, to) in [(0, 1), (1, 0)] {
        let times = dial_times(&mesh, from, to, cut_at);
        assert!(times.len() >= 8, "{from}→{to}: {times:?}");
        let mut gaps = vec![times[0] - cut_at];
        gaps.extend(times.windows(2).map(|w| w[1] - w[0]));
        for (k, gap) in gaps.iter().enumerate() {
            // The redial after the link went down, then one per failure: 1 s, 1 s, 2 s, 4 s …
            let nominal = (1_000u64 << k.saturating_sub(1)).min(60_000);
            assert!(
                *gap >= nominal * 8 / 10 && *gap <= nominal * 12 / 10 + 1,
                "{from}→{to}: gap {k} is {gap} ms, nominal {nominal}: {gaps:?}"
            );
        }
        assert!(
            gaps.iter().filter(|&&g| g >= 48_000).count() >= 2,
            "capped at 60 s ±20 %, for ever: {gaps:?}"
        );
    }
    // Still nobody told anything new while the peer was away.
    assert!(mesh.nodes[0].frames_to(alice).is_empty());

    heal_and_meet_again(&mut mesh, alice, bob);
    // And a DM crosses the new link.
    let (payload, _) = mesh.nodes[0].dm(
        alice,
        "alice",
        &user_key(0),
        "bob",
        user_key(1).public_key(),
    );
    mesh.settle();
    let got = mesh.nodes[1].frames_to(bob);
    assert_eq!(kinds(&got), [types::USER_DELIVER]);
    assert_eq!(got[0].payload["ciphertext"], payload["ciphertext"]);
}

#[track_caller]
/// Heals the srv-a – srv-b link and lets it come back: converged, and alice (on srv-a) and bob
/// (on srv-b) each told of the other again.
fn heal_and_meet_again(mesh: &mut Mesh, alice: ConnId, bob: ConnId) {
    mesh.heal(0, 1);
    mesh.advance(75_000);
    assert_converged_pair(mesh);
    told_of_each_other(mesh, alice, bob, types::USER_ADVERTISE);
}

/// Alice (on srv-a) and bob (on srv-b) were each sent one `kind` presence frame since their
/// frames were last taken, about the other.
#[track_caller]
fn told_of_each_other(mesh: &mut Mesh, alice: ConnId, bob: ConnId, kind: &str) {
    assert_eq!(presence(&mesh.nodes[0].frames_to(alice), kind), ["bob"]);
    assert_eq!(presence(&mesh.nodes[1].frames_to(bob), kind), ["alice"]);
}

fn assert_converged_pair(mesh: &Mesh) {
    assert_eq!(mesh.linked(0), ["srv-b"]);
    assert_eq!(mesh.linked(1), ["srv-a"]);
    assert_eq!(mesh.wires_between(0, 1), 1);
    let both = everyone_at_home(&[0, 1]);
    assert_eq!(mesh.directory(0), both);
    assert_eq!(mesh.directory(1), both);
}

/// §4.4: a link that goes silent (frames lost, nothing closed) is declared dead after 45 s
/// without a frame — found by the heartbeats, on each side — and is redialled until the peer
/// is reachable again.
#[test]
fn a_silent_link_is_found_dead_by_heartbeats_and_comes_back() {
    let (mut mesh, alice, bob) = alice_and_bob();
    let cut_at = mesh.now.mono_ms;
    mesh.cut(0, 1, Cut::Silent);
    // Heartbeats came at least every 15 s before: 29 s later the silence is under 45 s.
    mesh.advance(29_000);
    assert_eq!(mesh.linked(0), ["srv-b"]);
    assert_eq!(mesh.linked(1), ["srv-a"]);
    assert!(mesh.nodes[0].frames_to(alice).is_empty());
    // Within one more heartbeat period after 45 s, both sides have given up on it.
    mesh.advance(cut_at + 45_000 + 15_000 - mesh.now.mono_ms);
    assert!(mesh.linked(0).is_empty() && mesh.linked(1).is_empty());
    told_of_each_other(&mut mesh, alice, bob, types::USER_REMOVE);
    assert!(
        !dial_times(&mesh, 0, 1, cut_at).is_empty(),
        "redialling: {:?}",
        mesh.dial_log
    );

    heal_and_meet_again(&mut mesh, alice, bob);
}

/// §4.4: a server that shuts down closes its links; the others mark its users offline and
/// redial it, and dial attempts keep failing (it is gone), each followed by the next timer.
#[test]
fn a_server_that_stops_is_redialled_and_its_users_go_offline() {
    let mut mesh = mesh_of(&everyone_knows_everyone(3), true);
    for i in 0..3 {
        mesh.start(i);
    }
    mesh.advance(5_000);
    let conns: Vec<ConnId> = (0..3)
        .map(|i| mesh.login(i, USERS[i], &user_key(i)))
        .collect();
    for i in 0..3 {
        mesh.nodes[i].clear();
    }
    let stopped_at = mesh.now.mono_ms;
    mesh.shutdown(2);
    for i in 0..2 {
        assert_eq!(mesh.linked(i), ids(&[1 - i]));
        assert_eq!(
            presence(&mesh.nodes[i].frames_to(conns[i]), types::USER_REMOVE),
            ["carol"]
        );
        assert_eq!(mesh.directory(i), everyone_at_home(&[0, 1]));
    }
    mesh.advance(20_000);
    for i in 0..2 {
        let times = dial_times(&mesh, i, 2, stopped_at);
        assert!(times.len() >= 3, "{times:?}");
        let redials = mesh
            .pending_timers()
            .into_iter()
            .filter(|&(_, node, t)| node == i && matches!(t, Timer::Redial(_)))
            .count();
        assert_eq!(redials, 1, "the next attempt is armed");
    }
}

// -------------------------------------------------------------------- a partial mesh

/// srv-a – srv-b – srv-c with no srv-a – srv-c link (servers dial only their bootstrap peers).
fn partial_mesh() -> Mesh {
    let mut mesh = mesh_of(&[vec![1], vec![0, 2], vec![1]], false);
    for i in [0, 1, 2] {
        mesh.start(i);
    }
    mesh.advance(5_000);
    assert_eq!(mesh.linked(0), ["srv-b"]);
    assert_eq!(mesh.linked(1), ["srv-a", "srv-c"]);
    assert_eq!(mesh.linked(2), ["srv-b"]);
    assert_eq!(mesh.wires_between(0, 2), 0);
    mesh
}

/// The one frame of `kind` put on the wire from `a` to `b` whose payload has `user_id`.
#[track_caller]
fn carried_one(mesh: &Mesh, a: usize, b: usize, kind: &str, user_id: &str) -> String {
    let found: Vec<String> = mesh
        .carried(a, b)
        .into_iter()
        .filter(|(e, _)| e.kind == kind && e.payload.get("user_id") == Some(&json!(user_id)))
        .map(|(_, t)| t.to_string())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{kind} for {user_id} from {a} to {b}: {found:#?}"
    );
    found.into_iter().next().unwrap()
}

/// The first frame of `kind` put on the wire from `a` to `b` whose payload has `user_id`.
#[track_caller]
fn carried_first(mesh: &Mesh, a: usize, b: usize, kind: &str, user_id: &str) -> String {
    mesh.carried(a, b)
        .into_iter()
        .find(|(e, _)| e.kind == kind && e.payload.get("user_id") == Some(&json!(user_id)))
        .map(|(_, t)| t.to_string())
        .unwrap_or_else(|| panic!("no {kind} for {user_id} from {a} to {b}"))
}

/// §6, §5.6, §7 through a server in the middle: carol's presence and her DM reach srv-a only
/// through srv-b, which relays them unchanged (srv-c's `from` and `sig`, the same text). At
/// srv-a, alice (who takes other servers' signatures) gets srv-c's signed payload with srv-c's
/// signature; ann (who does not) gets a copy signed by srv-a. And back: alice's DM reaches
/// carol through srv-b.
#[test]
fn a_dm_and_presence_are_relayed_through_the_middle_keeping_their_signature() {
    let mut mesh = partial_mesh();
    let (alice_key, ann_key, carol_key) = (user_key(0), test_key("user5"), user_key(2));
    let alice = mesh.login_caps(0, "alice", &alice_key, &["peer-sig"]);
    let ann = mesh.login(0, "ann", &ann_key);
    mesh.nodes[0].clear();
    let carol = mesh.login(2, "carol", &carol_key);
    assert_eq!(mesh.directory(0), mesh.directory(2));

    // Presence: srv-c's advert, relayed by srv-b unchanged.
    let advert = carried_one(&mesh, 2, 1, types::USER_ADVERTISE, "carol");
    assert_eq!(
        carried_one(&mesh, 1, 0, types::USER_ADVERTISE, "carol"),
        advert
    );
    let to_alice = mesh.nodes[0].sent_to(alice);
    assert_eq!(to_alice.len(), 1, "{to_alice:#?}");
    assert_eq!(
        to_alice[0].text, advert,
        "alice gets srv-c's advert unchanged"
    );
    assert_eq!(to_alice[0].env.from, "srv-c");
    let to_ann = mesh.nodes[0].frames_to(ann);
    assert_eq!(presence(&to_ann, types::USER_ADVERTISE), ["carol"]);
    assert_eq!(
        to_ann[0].from, "srv-a",
        "ann gets it signed by her own server"
    );
    let advert = Envelope::parse(&advert).unwrap();
    assert_eq!(to_ann[0].payload["pubkey"], advert.payload["pubkey"]);
    assert_eq!(advert.payload["server_id"], "srv-c");

    // A DM from carol to alice: srv-c has no link to srv-a, so it goes to srv-b (§6 step 3),
    // which relays it unchanged; srv-a hands alice srv-c's payload and signature.
    let (sent, ts) = mesh.nodes[2].dm(carol, "carol", &carol_key, "alice", alice_key.public_key());
    mesh.settle();
    let deliver = carried_one(&mesh, 2, 1, types::SERVER_DELIVER, "alice");
    assert_eq!(
        carried_one(&mesh, 1, 0, types::SERVER_DELIVER, "alice"),
        deliver
    );
    let deliver = Envelope::parse(&deliver).unwrap();
    assert_eq!(
        (deliver.from.as_str(), deliver.to.as_str()),
        ("srv-c", "srv-a")
    );
    let got = mesh.nodes[0].frames_to(alice);
    assert_eq!(kinds(&got), [types::USER_DELIVER], "{got:#?}");
    let d = &got[0];
    assert_eq!((d.from.as_str(), d.to.as_str()), ("srv-c", "alice"));
    assert_eq!(
        d.sig, deliver.sig,
        "the signature srv-c made, not a new one"
    );
    assert_eq!(d.payload, deliver.payload);
    assert!(
        wire::verify_payload_sig(test_key("server3").public_key(), &d.payload, &d.sig).unwrap()
    );
    assert_eq!(d.payload["ciphertext"], sent["ciphertext"]);
    assert_eq!(d.payload["sender"], "carol");
    assert!(verify_content_sig(
        carol_key.public_key(),
        d.payload["content_sig"].as_str().unwrap(),
        d.payload["ciphertext"].as_str().unwrap(),
        "carol",
        Some("alice"),
        ts,
    ));
    let plain = alice_key
        .decrypt(&wire::b64::decode(d.payload["ciphertext"].as_str().unwrap()).unwrap())
        .unwrap();
    assert_eq!(plain, b"hello over the mesh");

    // To ann, who takes only her server's signatures: re-signed by srv-a.
    mesh.nodes[2].dm(carol, "carol", &carol_key, "ann", ann_key.public_key());
    mesh.settle();
    let got = mesh.nodes[0].frames_to(ann);
    assert_eq!(kinds(&got), [types::USER_DELIVER], "{got:#?}");
    assert_eq!(got[0].from, "srv-a");
    assert_eq!(got[0].payload["sender"], "carol");
    assert!(
        got[0].payload.get("user_id").is_none(),
        "{:?}",
        got[0].payload
    );

    // And back: alice to carol, relayed by srv-b unchanged, delivered by srv-c.
    let (sent, _) = mesh.nodes[0].dm(alice, "alice", &alice_key, "carol", carol_key.public_key());
    mesh.settle();
    let deliver = carried_one(&mesh, 0, 1, types::SERVER_DELIVER, "carol");
    assert_eq!(
        carried_one(&mesh, 1, 2, types::SERVER_DELIVER, "carol"),
        deliver
    );
    let got = mesh.nodes[2].frames_to(carol);
    assert_eq!(kinds(&got), [types::USER_DELIVER], "{got:#?}");
    assert_eq!(got[0].from, "srv-c");
    assert_eq!(got[0].payload["ciphertext"], sent["ciphertext"]);
    // Nothing reached srv-b's own users, and nothing went back where it came from.
    assert!(
        mesh.carried(1, 2).iter().all(|(e, _)| {
            !(e.kind == types::SERVER_DELIVER && e.payload["user_id"] == "alice")
        })
    );

    // carol leaves: srv-c's USER_REMOVE reaches alice unchanged, ann re-signed.
    mesh.user_leaves(2, carol);
    let remove = carried_one(&mesh, 1, 0, types::USER_REMOVE, "carol");
    assert_eq!(
        carried_one(&mesh, 2, 1, types::USER_REMOVE, "carol"),
        remove
    );
    let to_alice = mesh.nodes[0].sent_to(alice);
    assert_eq!(to_alice.len(), 1, "{to_alice:#?}");
    assert_eq!(to_alice[0].text, remove);
    let to_ann = mesh.nodes[0].frames_to(ann);
    assert_eq!(presence(&to_ann, types::USER_REMOVE), ["carol"]);
    assert_eq!(to_ann[0].from, "srv-a");
    assert_eq!(mesh.directory(0), mesh.directory(1));
    assert!(mesh.directory(0).iter().all(|(u, _)| u != "carol"));
}

/// §6, §8 across the partial mesh: alice's public-channel copies, one per member, reach bob at
/// srv-b directly and carol at srv-c through srv-b, each exactly once, with the content the
/// sender signed.
#[test]
fn public_channel_copies_cross_the_partial_mesh_once() {
    let mut mesh = partial_mesh();
    let keys: Vec<PrivateKey> = (0..3).map(user_key).collect();
    let conns: Vec<ConnId> = (0..3).map(|i| mesh.login(i, USERS[i], &keys[i])).collect();
    mesh.advance(5_000); // the channel's batched news
    for i in 0..3 {
        mesh.nodes[i].clear();
    }
    let ts = mesh.now.wall_ms - 10;
    for member in [1, 2] {
        let p = message_payload(
            &keys[0],
            keys[member].public_key(),
            "alice",
            None,
            ts,
            "hi all",
        );
        let f = user_frame_at(
            types::MSG_PUBLIC_CHANNEL,
            "alice",
            USERS[member],
            ts,
            &p,
            None,
        );
        mesh.user_sends(0, conns[0], &f);
    }
    assert!(
        mesh.nodes[0].frames_to(conns[0]).is_empty(),
        "no copy for the sender"
    );
    for member in [1, 2] {
        let got = mesh.nodes[member].frames_to(conns[member]);
        assert_eq!(
            kinds(&got),
            [types::MSG_PUBLIC_CHANNEL],
            "{}: {got:#?}",
            USERS[member]
        );
        let m = &got[0];
        assert_eq!(
            (m.from.as_str(), m.to.as_str()),
            (IDS[member], USERS[member])
        );
        assert_eq!(m.payload["sender"], "alice");
        assert!(verify_content_sig(
            keys[0].public_key(),
            str_field(m, "content_sig"),
            str_field(m, "ciphertext"),
            "alice",
            None,
            ts,
        ));
        let ct = wire::b64::decode(str_field(m, "ciphertext")).unwrap();
        assert_eq!(keys[member].decrypt(&ct).unwrap(), b"hi all");
    }
    // carol's copy went srv-a → srv-b → srv-c unchanged.
    let copy = carried_one(&mesh, 0, 1, types::MSG_PUBLIC_CHANNEL, "carol");
    assert_eq!(
        carried_one(&mesh, 1, 2, types::MSG_PUBLIC_CHANNEL, "carol"),
        copy
    );
}

// -------------------------------------------------------------------- presence

/// §7 across four servers: each user is told of every user who logs in later exactly once
/// (the advert reaches each server over several paths; the seen-cache stops the copies), and
/// of each one who leaves exactly once; every list names those online.
#[test]
fn users_on_each_server_see_each_others_presence_once() {
    let mut mesh = mesh_of(&everyone_knows_everyone(4), true);
    for i in [3, 1, 0, 2] {
        mesh.start(i);
    }
    mesh.advance(10_000);
    assert_linked_fully(&mesh, 4, "started");
    assert!((0..4).all(|i| mesh.directory(i).is_empty()));
    let mut conns = Vec::new();
    for i in 0..4 {
        let c = mesh.login(i, USERS[i], &user_key(i));
        conns.push(c);
        for (j, &cj) in conns.iter().enumerate().take(i) {
            let frames = mesh.nodes[j].frames_to(cj);
            assert_eq!(
                presence(&frames, types::USER_ADVERTISE),
                [USERS[i]],
                "{} told of {}: {frames:#?}",
                USERS[j],
                USERS[i]
            );
            let ad = &frames[0];
            assert_eq!(ad.from, IDS[j], "re-signed by the user's own server");
            assert_eq!(ad.payload["server_id"], IDS[i]);
            assert_eq!(
                ad.payload["pubkey"],
                json!(user_key(i).public_key().encoded())
            );
        }
    }
    assert_converged(&mesh, 4, "all logged in");
    for i in 0..4 {
        assert_eq!(mesh.nodes[i].list(conns[i], USERS[i]), USERS);
    }

    // They leave one by one; each one still here hears of it once.
    for i in 0..3 {
        mesh.user_leaves(i, conns[i]);
        for j in i + 1..4 {
            let frames = mesh.nodes[j].frames_to(conns[j]);
            assert_eq!(
                presence(&frames, types::USER_REMOVE),
                [USERS[i]],
                "{} told {} left: {frames:#?}",
                USERS[j],
                USERS[i]
            );
            assert_eq!(frames.len(), 1, "{frames:#?}");
        }
        let online: Vec<(String, String)> = (i + 1..4)
            .map(|k| (USERS[k].to_string(), IDS[k].to_string()))
            .collect();
        for j in 0..4 {
            assert_eq!(
                mesh.directory(j),
                online,
                "{} after {} left",
                IDS[j],
                USERS[i]
            );
        }
    }
}

/// §7 login-order independence in a partial mesh: srv-a and srv-c are up with their users
/// before srv-b, the only server between them, starts. Once srv-b has linked both, each user
/// sees the other (the directory, and the list).
///
/// srv-b dials both at once, so srv-a's welcome and advert of alice may reach srv-b before its
/// link to srv-c is up, with no other link to forward them to. A link coming up then carries
/// srv-b's whole directory (§4.3): its own users signed afresh, and the users behind other
/// servers as the adverts their servers signed.
#[test]
fn a_partial_mesh_converges_when_the_middle_starts_last() {
    let mut mesh = mesh_of(&[vec![1], vec![0, 2], vec![1]], false);
    mesh.start(0);
    mesh.start(2);
    let alice = mesh.login(0, "alice", &user_key(0));
    let carol = mesh.login(2, "carol", &user_key(2));
    mesh.advance(2_000);
    mesh.start(1);
    mesh.advance(120_000);
    assert_eq!(mesh.linked(0), ["srv-b"]);
    assert_eq!(mesh.linked(2), ["srv-b"]);
    let both = vec![
        ("alice".to_string(), "srv-a".to_string()),
        ("carol".to_string(), "srv-c".to_string()),
    ];
    assert_eq!(mesh.directory(1), both, "srv-b");
    assert_eq!(mesh.directory(0), both, "srv-a");
    assert_eq!(mesh.directory(2), both, "srv-c");
    mesh.nodes[0].clear();
    mesh.nodes[2].clear();
    assert_eq!(mesh.nodes[0].list(alice, "alice"), ["alice", "carol"]);
    assert_eq!(mesh.nodes[2].list(carol, "carol"), ["alice", "carol"]);
}

/// §4.3, §5.6, §6 *Who may sign*: what the middle server tells a new link of a user behind
/// another server is the advert that user's server signed, unchanged — srv-b cannot sign for
/// alice's server. carol (who takes other servers' signatures) gets srv-a's frame as srv-a put
/// it on the wire; cy (who does not) gets it signed by srv-c. Nobody is told of anyone twice,
/// and srv-b does not send srv-c's own users back to it.
#[test]
fn a_new_link_gets_the_users_behind_other_servers_as_their_server_signed_them() {
    let mut mesh = mesh_of(&[vec![1], vec![0, 2], vec![1]], false);
    mesh.start(0);
    mesh.start(2);
    let alice = mesh.login(0, "alice", &user_key(0));
    let carol = mesh.login_caps(2, "carol", &user_key(2), &["peer-sig"]);
    let cy = mesh.login(2, "cy", &test_key("user5"));
    mesh.nodes[2].clear();
    mesh.advance(2_000);
    mesh.start(1);
    mesh.advance(120_000);
    assert_eq!(mesh.linked(1), ["srv-a", "srv-c"]);
    let all = vec![
        ("alice".to_string(), "srv-a".to_string()),
        ("carol".to_string(), "srv-c".to_string()),
        ("cy".to_string(), "srv-c".to_string()),
    ];
    for i in 0..3 {
        assert_eq!(mesh.directory(i), all, "{}", IDS[i]);
    }

    // The advert of alice srv-a signed for srv-b went on to srv-c unchanged. (Later ones are
    // srv-a's refreshes, see below.)
    let advert = carried_first(&mesh, 0, 1, types::USER_ADVERTISE, "alice");
    assert_eq!(
        carried_first(&mesh, 1, 2, types::USER_ADVERTISE, "alice"),
        advert
    );
    let parsed = Envelope::parse(&advert).unwrap();
    assert_eq!(parsed.from, "srv-a");
    assert_eq!(parsed.payload["server_id"], "srv-a");
    assert!(
        wire::verify_payload_sig(
            test_key("server1").public_key(),
            &parsed.payload,
            &parsed.sig
        )
        .unwrap()
    );
    // srv-c's users are not sent back to it.
    assert!(
        mesh.carried(1, 2)
            .iter()
            .all(|(e, _)| e.kind != types::USER_ADVERTISE || e.payload["server_id"] != "srv-c"),
        "srv-b sent srv-c its own users"
    );

    // carol: srv-a's frame itself, once (after the list that vouches for srv-a's key).
    let to_carol = mesh.nodes[2].sent_to(carol);
    let adverts: Vec<_> = to_carol
        .iter()
        .filter(|s| s.env.kind == types::USER_ADVERTISE)
        .collect();
    assert_eq!(adverts.len(), 1, "{to_carol:#?}");
    assert_eq!(
        adverts[0].text, advert,
        "carol gets srv-a's advert unchanged"
    );
    let list_before = to_carol.iter().position(|s| {
        s.env.kind == types::LIST_RESPONSE
            && s.env.payload["servers"]
                .as_array()
                .is_some_and(|v| v.iter().any(|s| s["server_id"] == "srv-a"))
    });
    let advert_at = to_carol
        .iter()
        .position(|s| s.env.kind == types::USER_ADVERTISE);
    assert!(
        list_before.is_some() && list_before < advert_at,
        "srv-a's key is vouched for before its frame: {to_carol:#?}"
    );
    // cy: re-signed by srv-c, once.
    let to_cy = mesh.nodes[2].frames_to(cy);
    assert_eq!(presence(&to_cy, types::USER_ADVERTISE), ["alice"]);
    let ad = to_cy
        .iter()
        .find(|f| f.kind == types::USER_ADVERTISE)
        .unwrap();
    assert_eq!(ad.from, "srv-c");
    assert_eq!(ad.payload["server_id"], "srv-a");
    assert_eq!(ad.payload["pubkey"], parsed.payload["pubkey"]);
    // And alice hears of carol and cy once each.
    let to_alice = mesh.nodes[0].frames_to(alice);
    let mut told = presence(&to_alice, types::USER_ADVERTISE);
    told.sort();
    assert_eq!(told, ["carol", "cy"], "{to_alice:#?}");
}

/// What the fix above could break (§7): a user who left before a link came up is not brought
/// back by it. alice and ann are online at srv-a, linked with srv-b; alice leaves; then srv-c
/// starts and links srv-b. srv-b tells srv-c of ann (srv-a's advert, besides its welcome) and
/// of no one else.
#[test]
fn a_user_who_left_before_a_link_came_up_is_not_resurrected_by_it() {
    let mut mesh = mesh_of(&[vec![1], vec![0, 2], vec![1]], false);
    mesh.start(0);
    mesh.start(1);
    mesh.advance(5_000);
    assert_eq!(mesh.linked(1), ["srv-a"]);
    let alice = mesh.login(0, "alice", &user_key(0));
    mesh.login(0, "ann", &test_key("user5"));
    mesh.advance(1_000);
    mesh.user_leaves(0, alice);
    carried_one(&mesh, 0, 1, types::USER_REMOVE, "alice");
    let ann_only = vec![("ann".to_string(), "srv-a".to_string())];
    assert_eq!(mesh.directory(1), ann_only, "srv-b");

    // carol is online at srv-c before its link comes up, so she is told of ann by an advert.
    mesh.cut(1, 2, Cut::Reset);
    mesh.start(2);
    let carol = mesh.login_caps(2, "carol", &user_key(2), &["peer-sig"]);
    assert!(mesh.linked(2).is_empty());
    mesh.heal(1, 2);
    mesh.advance(120_000);
    assert_eq!(mesh.linked(1), ["srv-a", "srv-c"]);
    let want = vec![
        ("ann".to_string(), "srv-a".to_string()),
        ("carol".to_string(), "srv-c".to_string()),
    ];
    for i in 0..3 {
        assert_eq!(mesh.directory(i), want, "{}", IDS[i]);
    }
    // srv-b relayed ann's advert and nothing of alice.
    let ann_advert = carried_first(&mesh, 1, 2, types::USER_ADVERTISE, "ann");
    assert_eq!(Envelope::parse(&ann_advert).unwrap().from, "srv-a");
    // (Nor anywhere else: srv-c dialled srv-b, whose welcome lists the users it knows.)
    assert!(
        mesh.carried(1, 2)
            .iter()
            .all(|(_, text)| !text.contains("\"alice\"")),
        "alice reached srv-c"
    );
    let to_carol = mesh.nodes[2].frames_to(carol);
    assert_eq!(presence(&to_carol, types::USER_ADVERTISE), ["ann"]);
    assert!(presence(&to_carol, types::USER_REMOVE).is_empty());
    assert_eq!(mesh.nodes[2].list(carol, "carol"), ["ann", "carol"]);
}

/// §7 across servers: a user who leaves one server and logs in at another, with the same key,
/// is found at the new one everywhere; users elsewhere are told of the move.
#[test]
fn a_user_who_moves_to_another_server_is_found_there_everywhere() {
    let mut mesh = mesh_of(&everyone_knows_everyone(3), true);
    for i in 0..3 {
        mesh.start(i);
    }
    mesh.advance(5_000);
    let alice = mesh.login(0, "alice", &user_key(0));
    let bob = mesh.login(1, "bob", &user_key(1));
    mesh.nodes[0].clear();
    mesh.user_leaves(1, bob);
    mesh.advance(1_000);
    let bob = mesh.login(2, "bob", &user_key(1));
    let want = vec![
        ("alice".to_string(), "srv-a".to_string()),
        ("bob".to_string(), "srv-c".to_string()),
    ];
    for i in 0..3 {
        assert_eq!(mesh.directory(i), want, "{}", IDS[i]);
    }
    let told = mesh.nodes[0].frames_to(alice);
    assert_eq!(
        kinds(&told),
        [types::USER_REMOVE, types::USER_ADVERTISE],
        "{told:#?}"
    );
    assert_eq!(told[1].payload["server_id"], "srv-c");
    // A DM to bob now goes to srv-c.
    mesh.nodes[0].dm(
        alice,
        "alice",
        &user_key(0),
        "bob",
        user_key(1).public_key(),
    );
    mesh.settle();
    assert_eq!(kinds(&mesh.nodes[2].frames_to(bob)), [types::USER_DELIVER]);
}

/// §6 freshness, §7: a link that comes up long after a user logged in still carries that
/// user. srv-b keeps srv-a's advert of alice to hand to new links, and a copy older than the
/// dedup window (5 minutes) would be refused by srv-c; so srv-a re-advertises its users well
/// inside the window, and srv-b keeps the newest. srv-b's own user is not told again.
#[test]
fn a_user_online_for_long_reaches_a_server_that_links_in_later() {
    let mut mesh = mesh_of(&[vec![1], vec![0, 2], vec![1]], false);
    mesh.cut(1, 2, Cut::Reset);
    for i in 0..3 {
        mesh.start(i);
    }
    mesh.advance(5_000);
    assert_eq!(mesh.linked(1), ["srv-a"]);
    let bob = mesh.login(1, "bob", &user_key(1));
    mesh.login(0, "alice", &user_key(0));
    mesh.advance(600_000); // twice the window

    let kept = mesh.nodes[1].server.directory().get("alice").unwrap();
    let kept = Envelope::parse(kept.advert.as_ref().expect("an advert kept").as_str()).unwrap();
    assert_eq!(kept.from, "srv-a");
    let age = mesh.now.wall_ms - kept.payload["ts"].as_i64().unwrap();
    assert!(age < 150_000, "srv-b keeps an advert {age} ms old");
    let to_bob = mesh.nodes[1].frames_to(bob);
    assert_eq!(presence(&to_bob, types::USER_ADVERTISE), ["alice"]);

    mesh.heal(1, 2);
    mesh.advance(120_000);
    assert_eq!(mesh.linked(2), ["srv-b"]);
    let want = vec![
        ("alice".to_string(), "srv-a".to_string()),
        ("bob".to_string(), "srv-b".to_string()),
    ];
    assert_eq!(mesh.directory(2), want, "srv-c");
    assert!(
        mesh.carried(1, 2)
            .iter()
            .any(|(e, text)| e.kind == types::USER_ADVERTISE
                && e.from == "srv-a"
                && e.payload["user_id"] == "alice"
                && *text == kept_text(&mesh)),
        "srv-b handed srv-c the advert it keeps"
    );
}

/// The advert srv-b keeps of alice, as text.
fn kept_text(mesh: &support::mesh::Mesh) -> String {
    let entry = mesh.nodes[1].server.directory().get("alice").unwrap();
    entry.advert.as_ref().unwrap().as_str().to_string()
}
