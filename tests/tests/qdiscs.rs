//! The qdiscs users put on imq devices: cake, HTB + fq_codel, and netem on the path.
//! This machine's kernel has none of them, so these run in `cargo xtask vm-test`, on
//! Debian's kernels, which have all three.

use std::time::Duration;

use imq_tests::{
    Load, NetNs, Pair,
    check::{assert_rate, goodput},
    ping_rtt_ms, require_root, tcp_goodput,
};

/// cake with `options` as imq0's root qdisc.
fn cake(ns: &NetNs, options: &[&str]) {
    let mut args = vec!["qdisc", "replace", "dev", "imq0", "root", "cake"];
    args.extend_from_slice(options);
    ns.tc(&args).unwrap();
}

fn fq_codel_shaper(ns: &NetNs, dev: &str, rate: &str) {
    ns.tc(&[
        "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "10",
    ])
    .unwrap();
    ns.tc(&[
        "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", rate, "ceil", rate,
    ])
    .unwrap();
    ns.tc(&["qdisc", "add", "dev", dev, "parent", "1:10", "fq_codel"])
        .unwrap();
}

/// cake in its ingress mode on the server's imq0 (downloads, as sqm-scripts sets it
/// up), cake on the client's egress imq0 (uploads), and HTB + fq_codel on both.
#[test]
#[ignore = "needs cake, fq_codel and netem, which this machine's kernel lacks: `cargo xtask vm-test` runs it"]
fn cake_and_fq_codel_shape_ingress_and_egress() {
    require_root();
    let pair = Pair::new("cake").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    s.imqctl_ok(&["attach", "s0"]);
    c.imqctl_ok(&["attach", "c0", "--direction", "egress"]);
    let server = pair.server_v4();

    cake(s, &["bandwidth", "10mbit", "ingress"]);
    assert_rate(goodput(c, s, &server, 5201), 9.5, 0.15, "ingress, cake 10mbit");
    s.tc(&["qdisc", "del", "dev", "imq0", "root"]).unwrap();

    cake(c, &["bandwidth", "20mbit"]);
    assert_rate(goodput(c, s, &server, 5202), 19.0, 0.15, "egress, cake 20mbit");
    assert!(
        c.tc(&["-s", "qdisc", "show", "dev", "imq0"]).unwrap().contains("cake"),
        "cake is not on imq0"
    );
    c.tc(&["qdisc", "del", "dev", "imq0", "root"]).unwrap();

    fq_codel_shaper(s, "imq0", "10mbit");
    assert_rate(
        goodput(c, s, &server, 5203),
        9.6,
        0.15,
        "ingress, htb 10mbit + fq_codel",
    );
    s.tc(&["qdisc", "del", "dev", "imq0", "root"]).unwrap();
    fq_codel_shaper(c, "imq0", "20mbit");
    assert_rate(
        goodput(c, s, &server, 5204),
        19.0,
        0.15,
        "egress, htb 20mbit + fq_codel",
    );
}

/// netem delays the path; cake on imq0 still shapes to its rate, and the delay netem
/// adds is what ping measures (imq adds no delay of its own to an idle path).
#[test]
#[ignore = "needs cake, fq_codel and netem, which this machine's kernel lacks: `cargo xtask vm-test` runs it"]
fn netem_delay_on_the_path_with_cake_on_imq() {
    require_root();
    let pair = Pair::new("netem").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    let server = pair.server_v4();
    // 20 ms each way, on the client's egress and the server's egress.
    for (ns, dev) in [(c, "c0"), (s, "s0")] {
        ns.tc(&["qdisc", "replace", "dev", dev, "root", "netem", "delay", "20ms"])
            .unwrap();
    }
    let idle = ping_rtt_ms(c, &server, 10);
    eprintln!("idle RTT over netem: {idle:.1} ms");
    assert!((40.0..60.0).contains(&idle), "netem 2 x 20 ms: idle RTT {idle:.1} ms");

    s.imqctl_ok(&["attach", "s0"]);
    cake(s, &["bandwidth", "10mbit", "ingress"]);
    let through_imq = ping_rtt_ms(c, &server, 10);
    eprintln!("idle RTT through imq0 + cake: {through_imq:.1} ms");
    assert!(
        (through_imq - idle).abs() < 10.0,
        "idle RTT through imq0 + cake {through_imq:.1} ms, without {idle:.1} ms"
    );
    // Over a 40 ms RTT TCP needs longer to settle than on a bare veth, and a window
    // of several times the path's 50 KB bandwidth-delay product: with the default
    // 1.5 s and 96 KB, runs under qemu measured 8.1-8.9 Mbit/s. cake, unlike a FIFO,
    // keeps the larger window's queue short.
    let load = Load {
        warmup: Duration::from_secs(3),
        window: Duration::from_secs(4),
        rcvbuf: Some(256 << 10),
        ..Load::default()
    };
    let addr = format!("{server}:5201").parse().unwrap();
    let g = tcp_goodput(c, s, addr, load).expect("traffic");
    assert_rate(g, 9.5, 0.15, "cake 10mbit behind 40 ms of netem");
}
