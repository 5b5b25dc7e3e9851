//! The agent's conntrack garbage collector.
//!
//! The datapath only ignores an idle flow (it re-creates it); deleting
//! entries is the agent's job, so the LRU map holds live flows and `lbctl
//! conntrack` shows what is really open.
//!
//! A flow's two directions live and die together (SEMANTICS C1): the
//! datapath refreshes both entries on every packet in either direction, a
//! flow is idle only when both are ([`DatapathConfig::flow_expired`], the
//! same definition the datapath uses), and the GC removes both together.
//!
//! Two steps, so that a flow that comes back to life between them is never
//! cut:
//! 1. [`expired_keys`] picks, from a snapshot of the map, the flows that
//!    were idle: pairs, a FORWARD entry whose REPLY peer is gone (evicted),
//!    and REPLY entries without their FORWARD peer (left over when a flow
//!    was re-created, or evicted).
//! 2. [`crate::dataplane::maps::DatapathMaps::delete_conntrack`] re-reads both
//!    entries of each candidate right before deleting, skips any flow that
//!    is live again, and deletes each key with BPF_MAP_LOOKUP_AND_DELETE_ELEM:
//!    the value it removes is the freshest one, and if a packet refreshed it
//!    in the meantime the entry is put back (BPF_NOEXIST, so a repair the
//!    datapath made meanwhile wins) and the flow is kept.
//!
//! The window that remains: a packet of the flow that arrives in the
//! microseconds between the atomic delete of an entry and its re-insertion
//! finds that entry missing. A reply then finds its FORWARD entry gone
//! and the datapath re-creates it from the REPLY entry; a forward packet
//! whose FORWARD entry is gone is a new flow (UDP: at once; TCP: the
//! backend may reset it). The FORWARD entry is deleted first, so a reply in
//! the window is still translated. Only a flow that was idle for its whole
//! lifetime and sends a packet in exactly that window is affected;
//! netfilter has the same edge when a conntrack entry times out.

use std::borrow::BorrowMut;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use aya::maps::MapData;
use lb_common::{ConntrackEntry, ConntrackKey, DatapathConfig, CT_DIR_FORWARD};

use super::maps::{DatapathMaps, MapsError};

/// What one GC pass did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcPass {
    /// Entries in the map when it was read.
    pub entries: usize,
    /// Entries deleted (both halves of a flow count).
    pub deleted: usize,
    /// Wall time of the pass (read, judge, delete).
    pub duration: Duration,
}

/// One GC pass over the conntrack map of `maps`: a snapshot read with
/// batch lookups ([`DatapathMaps::conntrack_entries`]), the idle flows
/// judged at `now_ns` by [`DatapathConfig::flow_expired`] (each state its
/// own lifetime), and those deleted after a re-check of each
/// ([`DatapathMaps::delete_conntrack`]). It only touches the conntrack
/// map: the agent runs it on a thread of its own, so a pass over a
/// million entries (about 2 s with 125,000 expired, release build, two
/// shared cores) never stalls the control loop.
pub fn gc_pass<T: BorrowMut<MapData>>(
    maps: &mut DatapathMaps<T>,
    cfg: &DatapathConfig,
    now_ns: u64,
) -> Result<GcPass, MapsError> {
    let t0 = Instant::now();
    let entries = maps.conntrack_entries()?;
    let expired = expired_keys(&entries, cfg, now_ns);
    let deleted = if expired.is_empty() {
        0
    } else {
        maps.delete_conntrack(&expired)?
    };
    Ok(GcPass {
        entries: entries.len(),
        deleted,
        duration: t0.elapsed(),
    })
}

/// One flow the snapshot found idle: its FORWARD key and its REPLY key,
/// either of which may be missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    pub forward: Option<ConntrackKey>,
    pub reply: Option<ConntrackKey>,
}

/// The idle flows of a snapshot, with the configuration and the time they
/// were judged by: [`crate::dataplane::maps::DatapathMaps::delete_conntrack`]
/// checks each again against the map before deleting it.
#[derive(Clone, Debug)]
pub struct ExpiredFlows {
    pub cfg: DatapathConfig,
    /// CLOCK_BOOTTIME ns of the snapshot; a `last_seen_ns` after it is
    /// always live.
    pub now_ns: u64,
    pub flows: Vec<Candidate>,
}

impl ExpiredFlows {
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Every key the candidates name, sorted.
    pub fn keys(&self) -> Vec<ConntrackKey> {
        let mut out: Vec<ConntrackKey> = self
            .flows
            .iter()
            .flat_map(|c| c.forward.into_iter().chain(c.reply))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether the flow made of `forward` and `reply` (either may be
    /// missing) is idle now, judged as the datapath does.
    pub fn idle(
        &self,
        proto: u8,
        forward: Option<&ConntrackEntry>,
        reply: Option<&ConntrackEntry>,
    ) -> bool {
        match (forward, reply) {
            (Some(f), r) => self.cfg.flow_expired(proto, f, r, self.now_ns),
            (None, Some(r)) => self.cfg.flow_expired(proto, r, None, self.now_ns),
            (None, None) => true,
        }
    }
}

/// The flows of a snapshot of the conntrack map that are idle past their
/// lifetime (`now_ns` on the clock of bpf_ktime_get_boot_ns, CLOCK_BOOTTIME).
pub fn expired_keys(
    entries: &[(ConntrackKey, ConntrackEntry)],
    cfg: &DatapathConfig,
    now_ns: u64,
) -> ExpiredFlows {
    let mut by_key: HashMap<ConntrackKey, &ConntrackEntry> = HashMap::with_capacity(entries.len());
    by_key.extend(entries.iter().map(|(k, e)| (*k, e)));
    // The entry under `key` if it pairs back with `peer`.
    let paired = |key: &ConntrackKey, peer: &ConntrackKey| {
        by_key.get(key).copied().filter(|e| key.peer(e) == *peer)
    };
    let mut out = ExpiredFlows {
        cfg: *cfg,
        now_ns,
        flows: Vec::new(),
    };
    for (k, e) in entries {
        let peer_key = k.peer(e);
        let peer = paired(&peer_key, k);
        if k.dir == CT_DIR_FORWARD {
            if cfg.flow_expired(k.proto, e, peer, now_ns) {
                out.flows.push(Candidate {
                    forward: Some(*k),
                    reply: peer.map(|_| peer_key),
                });
            }
        } else if peer.is_none() && cfg.flow_expired(k.proto, e, None, now_ns) {
            // A REPLY entry whose FORWARD peer is gone or belongs to
            // another REPLY key now (the flow was re-created).
            out.flows.push(Candidate {
                forward: None,
                reply: Some(*k),
            });
        }
    }
    out.flows.sort();
    out.flows.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{ct_flags, ipv4_to_net, port_to_net, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP};

    const S: u64 = 1_000_000_000;

    fn flow(
        proto: u8,
        cport: u16,
        flags: u16,
        fwd_seen: u64,
        rev_seen: u64,
    ) -> Vec<(ConntrackKey, ConntrackEntry)> {
        let fk = ConntrackKey {
            saddr: ipv4_to_net([10, 244, 1, 5]),
            daddr: ipv4_to_net([10, 96, 0, 10]),
            sport: port_to_net(cport),
            dport: port_to_net(53),
            proto,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        let fe = ConntrackEntry {
            nat_addr: ipv4_to_net([10, 244, 2, 3]),
            nat_port: port_to_net(5353),
            flags,
            last_seen_ns: fwd_seen,
            ..Default::default()
        };
        let rk = fk.peer(&fe);
        let re = ConntrackEntry {
            last_seen_ns: rev_seen,
            ..fk.peer_entry(&fe)
        };
        assert_eq!(rk.dir, CT_DIR_REPLY);
        vec![(fk, fe), (rk, re)]
    }

    #[test]
    fn c1_a_flow_goes_only_when_both_directions_are_idle() {
        let cfg = DatapathConfig::DEFAULT; // UDP 30 s
        let now = 1_000 * S;
        // Idle both ways; idle forward but busy replies (one query, a
        // stream of answers); busy forward, idle replies.
        let idle = flow(PROTO_UDP, 1000, 0, now - 61 * S, now - 70 * S);
        let replies = flow(PROTO_UDP, 1001, 0, now - 600 * S, now - S);
        let requests = flow(PROTO_UDP, 1002, 0, now - S, now - 600 * S);
        let all: Vec<_> = idle
            .iter()
            .chain(&replies)
            .chain(&requests)
            .copied()
            .collect();
        let expired = expired_keys(&all, &cfg, now);
        assert_eq!(
            expired.flows,
            vec![Candidate {
                forward: Some(idle[0].0),
                reply: Some(idle[1].0),
            }]
        );
        assert_eq!(expired.keys().len(), 2);
    }

    #[test]
    fn established_tcp_lives_longer_than_a_half_open_one() {
        let cfg = DatapathConfig::DEFAULT;
        let now = 100_000 * S;
        let est = flow(
            PROTO_TCP,
            1000,
            ct_flags::TCP_ESTABLISHED,
            now - 3_600 * S,
            now - 3_600 * S,
        );
        // SYN_SENT (120 s) and TIME_WAIT (120 s), idle 121 s.
        let syn = flow(
            PROTO_TCP,
            1001,
            ct_flags::TCP_SYN,
            now - 121 * S,
            now - 121 * S,
        );
        let closed = flow(
            PROTO_TCP,
            1002,
            ct_flags::TCP_ESTABLISHED
                | ct_flags::TCP_FIN
                | ct_flags::FIN_FORWARD
                | ct_flags::FIN_REPLY,
            now - 121 * S,
            now - 121 * S,
        );
        let all: Vec<_> = est.iter().chain(&syn).chain(&closed).copied().collect();
        let keys = expired_keys(&all, &cfg, now).keys();
        assert!(!keys.contains(&est[0].0) && !keys.contains(&est[1].0));
        assert!(keys.contains(&syn[0].0) && keys.contains(&syn[1].0));
        assert!(keys.contains(&closed[0].0) && keys.contains(&closed[1].0));
    }

    #[test]
    fn c1_half_pairs_go_only_when_idle() {
        let cfg = DatapathConfig::DEFAULT;
        let now = 1_000 * S;
        let fresh = flow(PROTO_UDP, 1000, 0, now, now - S);
        let stale = flow(PROTO_UDP, 1001, 0, now - 61 * S, now - 61 * S);
        // Only the REPLY halves (their FORWARD peers evicted), and only the
        // FORWARD half of another pair.
        let entries = vec![fresh[1], stale[1], stale[0]];
        let expired = expired_keys(&entries, &cfg, now);
        // The stale FORWARD entry finds its REPLY peer: one pair.
        assert_eq!(
            expired.flows,
            vec![Candidate {
                forward: Some(stale[0].0),
                reply: Some(stale[1].0),
            }]
        );
        let entries = vec![fresh[1], stale[1]];
        assert_eq!(expired_keys(&entries, &cfg, now).keys(), vec![stale[1].0]);
        let entries = vec![fresh[0], stale[0]];
        assert_eq!(expired_keys(&entries, &cfg, now).keys(), vec![stale[0].0]);
    }

    /// The race-free delete against a real BPF hash map (needs CAP_BPF;
    /// skipped without it): every candidate is read again right before it
    /// is deleted.
    #[test]
    fn c1_the_gc_rechecks_each_flow_in_the_map_before_deleting_it() {
        use crate::dataplane::maps::DatapathMaps;
        use aya::maps::{HashMap, MapData, PerCpuArray};
        let Ok(conntrack) = HashMap::<MapData, ConntrackKey, ConntrackEntry>::create(64, 0) else {
            eprintln!("skipped: cannot create BPF maps here (no CAP_BPF)");
            return;
        };
        let stats = PerCpuArray::<MapData, u64>::create(1, 0).unwrap();
        let mut maps = DatapathMaps { conntrack, stats };
        let cfg = DatapathConfig::DEFAULT;
        let now = 1_000 * S;
        let put = |maps: &mut DatapathMaps<MapData>, f: &[(ConntrackKey, ConntrackEntry)]| {
            for (k, e) in f {
                maps.conntrack.insert(k, e, 0).unwrap();
            }
        };
        let idle = flow(PROTO_UDP, 1000, 0, now - 100 * S, now - 100 * S);
        let revived = flow(PROTO_UDP, 1001, 0, now - 100 * S, now - 100 * S);
        let lone = flow(PROTO_UDP, 1002, 0, now - 100 * S, now - 100 * S);
        put(&mut maps, &idle);
        put(&mut maps, &revived);
        put(&mut maps, &lone[1..]);
        let snapshot = maps.conntrack_entries().unwrap();
        let expired = expired_keys(&snapshot, &cfg, now);
        assert_eq!(expired.len(), 3);
        // Between the snapshot and the delete: a reply refreshes one flow
        // (its REPLY entry only), the datapath re-creates the lone reply's
        // FORWARD entry with a fresh packet.
        let mut r = revived[1].1;
        r.last_seen_ns = now + S;
        maps.conntrack.insert(revived[1].0, r, 0).unwrap();
        let mut f = lone[0].1;
        f.last_seen_ns = now + S;
        maps.conntrack.insert(lone[0].0, f, 0).unwrap();
        let deleted = maps.delete_conntrack(&expired).unwrap();
        assert_eq!(deleted, 2, "only the idle pair goes");
        let left: Vec<ConntrackKey> = maps
            .conntrack_entries()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for k in [revived[0].0, revived[1].0, lone[0].0, lone[1].0] {
            assert!(left.contains(&k), "{k:?} was deleted");
        }
        assert!(!left.contains(&idle[0].0) && !left.contains(&idle[1].0));
    }

    #[test]
    fn c1_a_reply_left_over_by_a_recreated_flow_goes_alone() {
        // The flow moved to another backend: its FORWARD entry pairs with a
        // new REPLY key; the old REPLY entry is a leftover.
        let cfg = DatapathConfig::DEFAULT;
        let now = 1_000 * S;
        let old = flow(PROTO_UDP, 1000, 0, now - 100 * S, now - 100 * S);
        let mut moved = old.clone();
        moved[0].1.nat_addr = ipv4_to_net([10, 244, 3, 3]);
        moved[0].1.last_seen_ns = now;
        let new_reply = (
            moved[0].0.peer(&moved[0].1),
            ConntrackEntry {
                last_seen_ns: now,
                ..moved[0].0.peer_entry(&moved[0].1)
            },
        );
        let entries = vec![moved[0], new_reply, old[1]];
        let expired = expired_keys(&entries, &cfg, now);
        assert_eq!(
            expired.flows,
            vec![Candidate {
                forward: None,
                reply: Some(old[1].0),
            }]
        );
    }

    /// #9 item 4: a GC pass over a map of a million entries (500k flows in
    /// every state, an eighth of them idle past their state's lifetime)
    /// reads it with batch lookups and deletes exactly the expired flows,
    /// both entries each, in a bounded time (printed). Needs CAP_BPF: it
    /// fails under LB_REQUIRE_PRIVILEGED=1 without it.
    #[test]
    fn i9_a_gc_pass_over_a_million_entries_deletes_exactly_the_expired_flows() {
        use crate::dataplane::maps::DatapathMaps;
        use aya::maps::{HashMap as BpfHashMap, IterableMap, PerCpuArray};
        const FLOWS: u32 = 500_000;
        let conntrack =
            match BpfHashMap::<MapData, ConntrackKey, ConntrackEntry>::create(2 * FLOWS, 0) {
                Ok(m) => m,
                Err(e) => {
                    assert!(
                        std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
                        "cannot create a BPF map: {e}"
                    );
                    eprintln!("skipped: cannot create BPF maps here (no CAP_BPF)");
                    return;
                }
            };
        let stats = PerCpuArray::<MapData, u64>::create(1, 0).unwrap();
        let mut maps = DatapathMaps { conntrack, stats };
        let cfg = DatapathConfig::DEFAULT;
        let now = 200_000 * S;
        let est = ct_flags::TCP_SYN | ct_flags::SEEN_REPLY | ct_flags::TCP_ESTABLISHED;
        let fin = ct_flags::TCP_FIN | ct_flags::FIN_FORWARD;
        let states = [
            (PROTO_TCP, ct_flags::TCP_SYN),
            (PROTO_TCP, ct_flags::TCP_SYN | ct_flags::SEEN_REPLY),
            (PROTO_TCP, est),
            (PROTO_TCP, ct_flags::TCP_SYN | fin),
            (PROTO_TCP, est | fin),
            (PROTO_TCP, est | fin | ct_flags::FIN_REPLY),
            (PROTO_TCP, est | ct_flags::TCP_RST),
            (PROTO_UDP, ct_flags::SEEN_REPLY),
            (PROTO_UDP, ct_flags::SEEN_REPLY | ct_flags::UDP_STREAM),
        ];
        let mut keys = Vec::with_capacity(2 * FLOWS as usize);
        let mut values = Vec::with_capacity(2 * FLOWS as usize);
        let mut expired_flows = 0usize;
        for i in 0..FLOWS {
            let (proto, flags) = states[i as usize % states.len()];
            let lifetime = cfg.ct_lifetime_ns(proto, flags);
            // Every 8th flow is idle 1 s past its lifetime, the others 1 s
            // short of it (or less).
            let expired = i % 8 == 3;
            expired_flows += usize::from(expired);
            let idle = if expired {
                lifetime + S
            } else {
                lifetime.saturating_sub(S) / (1 + u64::from(i % 3))
            };
            let fk = ConntrackKey {
                saddr: ipv4_to_net([10, 128 + (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                daddr: ipv4_to_net([10, 96, 0, 10]),
                sport: port_to_net(1024 + (i % 50_000) as u16),
                dport: port_to_net(443),
                proto,
                dir: CT_DIR_FORWARD,
                _pad: [0; 2],
            };
            let fe = ConntrackEntry {
                nat_addr: ipv4_to_net([10, 244, (i >> 8) as u8, i as u8]),
                nat_port: port_to_net(8443),
                backend_id: i,
                service_id: 1,
                flags,
                last_seen_ns: now - idle,
                ..Default::default()
            };
            // One direction more recent than the other in some flows: the
            // later one counts.
            let re = ConntrackEntry {
                last_seen_ns: now - idle - (i % 2) as u64 * S / 2,
                ..fk.peer_entry(&fe)
            };
            keys.push(fk);
            values.push(fe);
            keys.push(fk.peer(&fe));
            values.push(re);
        }
        super::super::sys::map_update_batch(maps.conntrack.map(), &keys, &values).unwrap();
        let t0 = std::time::Instant::now();
        let pass = gc_pass(&mut maps, &cfg, now).unwrap();
        let took = t0.elapsed();
        eprintln!(
            "GC pass over {} entries: {} deleted in {:.2} s",
            pass.entries,
            pass.deleted,
            took.as_secs_f64()
        );
        assert_eq!(pass.entries, 2 * FLOWS as usize);
        assert_eq!(pass.deleted, 2 * expired_flows);
        let left: HashMap<ConntrackKey, ConntrackEntry> =
            maps.conntrack_entries().unwrap().into_iter().collect();
        assert_eq!(left.len(), 2 * (FLOWS as usize - expired_flows));
        for (i, (k, v)) in keys.iter().zip(&values).enumerate() {
            let flow = (i / 2) as u32;
            assert_eq!(left.contains_key(k), flow % 8 != 3, "flow {flow} {k:?}");
            if let Some(e) = left.get(k) {
                assert_eq!(e, v);
            }
        }
    }
}
