//! The agent's conntrack garbage collector.
//!
//! The datapath only ignores an idle FORWARD entry (it re-creates the flow);
//! deleting entries is the agent's job, so the LRU map holds live flows and
//! `lbctl conntrack` shows what is really open. Both directions of a flow go
//! together: the FORWARD entry's idle time decides (a REPLY entry is only
//! refreshed by replies), and a REPLY entry without its FORWARD peer goes once
//! it is idle itself.

use std::collections::BTreeMap;

use lb_common::{ConntrackEntry, ConntrackKey, DatapathConfig, CT_DIR_FORWARD};

fn idle_past_lifetime(
    cfg: &DatapathConfig,
    k: &ConntrackKey,
    e: &ConntrackEntry,
    now_ns: u64,
) -> bool {
    now_ns.saturating_sub(e.last_seen_ns) > cfg.ct_lifetime_ns(k.proto, e.flags)
}

/// Keys to delete from a snapshot of the conntrack map (`now_ns` on the
/// clock of bpf_ktime_get_boot_ns, CLOCK_BOOTTIME).
pub fn expired_keys(
    entries: &[(ConntrackKey, ConntrackEntry)],
    cfg: &DatapathConfig,
    now_ns: u64,
) -> Vec<ConntrackKey> {
    let by_key: BTreeMap<ConntrackKey, &ConntrackEntry> =
        entries.iter().map(|(k, e)| (*k, e)).collect();
    let mut out = Vec::new();
    for (k, e) in entries {
        if k.dir == CT_DIR_FORWARD {
            if idle_past_lifetime(cfg, k, e, now_ns) {
                out.push(*k);
                let peer = k.peer(e);
                if by_key.contains_key(&peer) {
                    out.push(peer);
                }
            }
        } else if !by_key.contains_key(&k.peer(e)) && idle_past_lifetime(cfg, k, e, now_ns) {
            out.push(*k);
        }
    }
    out.sort();
    out.dedup();
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
            nat_addr: fk.daddr,
            nat_port: fk.dport,
            flags,
            last_seen_ns: rev_seen,
            ..Default::default()
        };
        assert_eq!(rk.dir, CT_DIR_REPLY);
        vec![(fk, fe), (rk, re)]
    }

    #[test]
    fn idle_forward_entries_go_with_their_reply() {
        let cfg = DatapathConfig::DEFAULT; // UDP 60 s
        let now = 1_000 * S;
        let mut entries = flow(PROTO_UDP, 1000, 0, now - 61 * S, now - S);
        entries.extend(flow(PROTO_UDP, 1001, 0, now - 59 * S, now - 100 * S));
        let keys = expired_keys(&entries, &cfg, now);
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.contains(&entries[0].0) && keys.contains(&entries[1].0));
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
            now,
        );
        let syn = flow(PROTO_TCP, 1001, ct_flags::TCP_SYN, now - 61 * S, now);
        let closed = flow(
            PROTO_TCP,
            1002,
            ct_flags::TCP_ESTABLISHED | ct_flags::TCP_FIN,
            now - 61 * S,
            now,
        );
        let all: Vec<_> = est.iter().chain(&syn).chain(&closed).copied().collect();
        let keys = expired_keys(&all, &cfg, now);
        assert!(!keys.contains(&est[0].0));
        assert!(keys.contains(&syn[0].0) && keys.contains(&syn[1].0));
        assert!(keys.contains(&closed[0].0) && keys.contains(&closed[1].0));
    }

    #[test]
    fn orphan_reply_goes_only_when_idle() {
        let cfg = DatapathConfig::DEFAULT;
        let now = 1_000 * S;
        let fresh = flow(PROTO_UDP, 1000, 0, now, now - S);
        let stale = flow(PROTO_UDP, 1001, 0, now, now - 61 * S);
        // Only the REPLY halves: their FORWARD peers are gone.
        let entries = vec![fresh[1], stale[1]];
        assert_eq!(expired_keys(&entries, &cfg, now), vec![stale[1].0]);
    }
}
