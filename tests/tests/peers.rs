//! What imq shapes on egress reaches the receiver as any packet would: a veth peer
//! (containers) or the next hop of a router runs its own TC ingress on it — its imq,
//! an admin's classic tc filter — and the sender queues each packet exactly once,
//! with one imq device or several.

use imq_tests::{
    NetNs, Pair, Routed,
    check::{assert_rate, goodput, rule_counters, show, show_at_rest, tbf},
    require_root,
};

/// The peer's own shaping of what arrives on `dev`: imq (tbf 10mbit on its imq0), or
/// the admin's classic setup (u32 + mirred to their own ifb, tbf 15mbit there).
#[derive(Clone, Copy, Debug)]
enum PeerShaper {
    Imq,
    Classic,
}

impl PeerShaper {
    fn install(self, ns: &NetNs, dev: &str) -> f64 {
        match self {
            Self::Imq => {
                ns.imqctl_ok(&["attach", dev]);
                tbf(ns, "imq0", 10);
                9.6
            }
            Self::Classic => {
                ns.ip(&["link", "add", "ifbx", "type", "ifb"]).unwrap();
                ns.ip(&["link", "set", "ifbx", "up"]).unwrap();
                tbf(ns, "ifbx", 15);
                ns.tc(&["qdisc", "add", "dev", dev, "ingress"]).unwrap();
                ns.tc(&[
                    "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
                    "action", "mirred", "egress", "redirect", "dev", "ifbx",
                ])
                .unwrap();
                14.4
            }
        }
    }
}

/// `ns`'s imq rules counted at least the `payload` bytes its receiver got: every byte
/// crossed them, headers and retransmissions on top. Bytes, not packets: a GSO or GRO
/// packet is counted once whatever its size, and TCP sizes them as it likes.
fn assert_saw_all(ns: &NetNs, payload: u64, what: &str) {
    let status = show(ns);
    let (packets, bytes) = rule_counters(&status);
    eprintln!("{what}: {packets} packets, {bytes} bytes; the receiver got {payload} bytes");
    assert!(
        bytes >= payload,
        "{what} counted {bytes} bytes, the receiver got {payload}: {status}"
    );
}

/// Client — server over veth: the client shapes its egress through imq (40mbit, more
/// than the server allows), the server shapes its ingress with its own imq or a
/// classic filter; the server's limit is what arrives, IPv4 and IPv6.
#[test]
fn a_veth_peer_shapes_what_imq_shaped_on_egress() {
    require_root();
    for peer in [PeerShaper::Imq, PeerShaper::Classic] {
        let pair = Pair::new("peer").unwrap();
        let (c, s) = (&pair.client, &pair.server);
        c.imqctl_ok(&["attach", "c0", "--direction", "egress"]);
        tbf(c, "imq0", 40);
        let rate = peer.install(s, "s0");
        let v4 = goodput(c, s, &pair.server_v4(), 5201);
        assert_rate(v4, rate, 0.15, &format!("{peer:?}, IPv4"));
        let v6 = goodput(c, s, &pair.server_v6(), 5202);
        assert_rate(v6, rate, 0.15, &format!("{peer:?}, IPv6"));
        if let PeerShaper::Imq = peer {
            assert_saw_all(s, v4.bytes + v6.bytes, "the peer's imq");
        }
    }
}

/// Client — router — server: the router shapes what it forwards to the server on its
/// egress (imq0, 40mbit); the server's own shaping of its ingress (its imq at 10mbit,
/// or a classic filter to its own ifb at 15mbit) still applies.
#[test]
fn the_next_hop_shapes_what_a_router_shaped_on_egress() {
    require_root();
    for peer in [PeerShaper::Imq, PeerShaper::Classic] {
        let net = Routed::new("hop", 1).unwrap();
        let (c, r, s) = (&net.clients[0], &net.router, &net.server);
        r.imqctl_ok(&["attach", "rs", "--direction", "egress"]);
        tbf(r, "imq0", 40);
        let rate = peer.install(s, "s0");
        let v4 = goodput(c, s, Routed::SERVER_V4, 5201);
        assert_rate(v4, rate, 0.15, &format!("{peer:?}, forwarded IPv4"));
        let v6 = goodput(c, s, Routed::SERVER_V6, 5202);
        assert_rate(v6, rate, 0.15, &format!("{peer:?}, forwarded IPv6"));
        assert_saw_all(r, v4.bytes + v6.bytes, "the router's imq");
    }
}

/// Two imq devices on one egress, told apart by port: each packet is queued once, in
/// its own device (rule counters equal what each device received, through FIFOs that
/// neither drop nor segment), and the peer's imq sees both flows.
#[test]
fn each_packet_is_queued_once_with_several_devices() {
    require_root();
    let pair = Pair::new("once").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    c.imqctl_ok(&[
        "attach", "c0", "-d", "egress", "--proto", "tcp", "--dport", "5201", "--dev", "imq0",
    ]);
    c.imqctl_ok(&["attach", "c0", "-d", "egress", "--dev", "imq1"]);
    for dev in ["imq0", "imq1"] {
        c.tc(&["qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "100000"])
            .unwrap();
    }
    s.imqctl_ok(&["attach", "s0"]);
    s.tc(&["qdisc", "replace", "dev", "imq0", "root", "pfifo", "limit", "100000"])
        .unwrap();
    goodput(c, s, &pair.server_v4(), 5201);
    goodput(c, s, &pair.server_v4(), 5202);

    let (status, rx) = show_at_rest(c, &["imq0", "imq1"]);
    let counted = |dev: &str| {
        status["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["dev"] == dev)
            .fold((0, 0), |(p, b), r| {
                (p + r["packets"].as_u64().unwrap(), b + r["bytes"].as_u64().unwrap())
            })
    };
    for (dev, rx) in ["imq0", "imq1"].into_iter().zip(rx) {
        assert!(counted(dev).1 > 10_000_000, "{dev}: {status}");
        assert_eq!(counted(dev), rx, "{dev}: rule counters vs what it received: {status}");
    }
    // The peer's ingress imq saw what both devices queued. Compared in bytes, at 90%:
    // a peer that merges packets (GRO) counts fewer packets and fewer headers.
    let peer = rule_counters(&show(s)).1;
    let sent = counted("imq0").1 + counted("imq1").1;
    assert!(
        peer as f64 >= 0.9 * sent as f64,
        "the peer's imq counted {peer} bytes of the {sent} the client queued"
    );
}
