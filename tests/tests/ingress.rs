//! Ingress shaping end to end: real namespaces, veth, ifb, TCP traffic from the test
//! kit's generator, and rates measured at the receiver.
//!
//! Topology per test: client (c0) —veth— server (s0). imq is attached to the ingress
//! of s0, so the client's upload is what the server receives through imq0.

use imq_tests::{
    Goodput, Pair,
    check::{assert_between, assert_unshaped, config, goodput, links, rule_counters, show, show_at_rest, tbf},
    require_root,
};
use serde_json::Value;

const SHAPED_MBIT: u32 = 10;

fn upload(pair: &Pair, port: u16) -> Goodput {
    goodput(&pair.client, &pair.server, &pair.server_v4(), port)
}

fn upload_v6(pair: &Pair, port: u16) -> Goodput {
    goodput(&pair.client, &pair.server, &pair.server_v6(), port)
}

/// Through TBF 10mbit: 8.5-10.5 Mbit/s.
fn assert_shaped(g: Goodput, what: &str) {
    assert_between(g, 8.5, 10.5, what);
}

#[test]
fn tbf_on_imq0_shapes_ingress_and_detach_restores_it() {
    require_root();
    let pair = Pair::new("shape").unwrap();
    let s = &pair.server;

    // imqctl exits after attach: everything below runs on pinned kernel objects.
    s.imqctl_ok(&["attach", "s0", "--direction", "ingress"]);

    // With an unlimited FIFO on imq0 traffic passes at full speed, and the rule counted
    // exactly what imq0 received. ifb counts in ifb_xmit, after the root qdisc, so the
    // qdisc must neither drop nor segment (TBF splits GSO packets) for them to agree.
    s.tc(&["qdisc", "replace", "dev", "imq0", "root", "pfifo", "limit", "100000"])
        .unwrap();
    assert_unshaped(upload(&pair, 5200), "through imq0 with pfifo");
    let (status, rx) = show_at_rest(s, &["imq0"]);
    let (packets, bytes) = rule_counters(&status);
    let qdisc: Value = serde_json::from_str(&s.tc(&["-s", "-j", "qdisc", "show", "dev", "imq0"]).unwrap()).unwrap();
    assert_eq!(qdisc[0]["drops"], 0, "{qdisc}");
    assert_eq!((packets, bytes), rx[0], "rule counters vs imq0 rx: {status}");
    // Not a trivial 0 == 0: 3 s at no less than 200 Mbit/s is 75 MB. (Bytes, not
    // packets: a GSO packet is counted once, whatever its size.)
    assert!(bytes > 10_000_000, "{status}");

    tbf(s, "imq0", SHAPED_MBIT);
    assert_shaped(upload(&pair, 5201), "IPv4 upload into s0");
    assert_shaped(upload_v6(&pair, 5202), "IPv6 upload into s0");

    let dev = &status["devices"][0];
    assert_eq!(dev["name"], "imq0");
    assert_eq!(dev["state"], "up");
    assert!(dev["txqueuelen"].as_u64().unwrap() >= 1000, "{dev}");
    let rule = &status["rules"][0];
    assert_eq!(
        (rule["interface"].as_str(), rule["direction"].as_str()),
        (Some("s0"), Some("ingress"))
    );
    assert_eq!(rule["dev"], "imq0");
    assert!(rule.get("mark").is_none(), "{rule}");

    s.imqctl_ok(&["detach", "s0"]);
    assert_unshaped(upload(&pair, 5203), "after detach");
    assert_eq!(show(s)["rules"].as_array().unwrap().len(), 0);
}

#[test]
fn mark_rules_select_by_fwmark() {
    require_root();
    let pair = Pair::new("mark").unwrap();
    let s = &pair.server;

    // At TC ingress netfilter has not run, so arriving packets carry mark 0.
    s.imqctl_ok(&["attach", "s0", "--mark", "0x10/0xff"]);
    tbf(s, "imq0", SHAPED_MBIT);
    assert_unshaped(upload(&pair, 5201), "non-matching --mark");
    let status = show(s);
    assert_eq!(status["rules"][0]["mark"], "0x10/0xff");
    assert_eq!(rule_counters(&status), (0, 0), "nothing matched: {status}");

    // A rule that does match mark 0, after the first: first match wins.
    s.imqctl_ok(&["attach", "s0", "--mark", "0/0xff"]);
    assert_shaped(upload(&pair, 5202), "matching --mark 0/0xff");
    let status = show(s);
    let rules = status["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0]["packets"], 0, "{status}");
    assert!(rules[1]["packets"].as_u64().unwrap() > 0, "{status}");

    // Remove only the matching rule: traffic is unshaped again.
    s.imqctl_ok(&["detach", "s0", "--mark", "0/0xff"]);
    assert_eq!(show(s)["rules"].as_array().unwrap().len(), 1);
    assert_unshaped(upload(&pair, 5203), "after detaching the matching rule");
}

#[test]
fn two_namespaces_attach_independently() {
    require_root();
    let a = Pair::new("nsa").unwrap();
    let b = Pair::new("nsb").unwrap();
    a.server.imqctl_ok(&["attach", "s0"]);
    tbf(&a.server, "imq0", SHAPED_MBIT);
    b.server.imqctl_ok(&["attach", "s0", "--mark", "0x7"]);

    // Each namespace sees only its own rules.
    let (sa, sb) = (show(&a.server), show(&b.server));
    assert_eq!(sa["rules"].as_array().unwrap().len(), 1, "{sa}");
    assert!(sa["rules"][0].get("mark").is_none(), "{sa}");
    assert_eq!(sb["rules"][0]["mark"], "0x7", "{sb}");

    // Flushing b leaves a's data path and state alone.
    b.server.imqctl_ok(&["flush"]);
    assert_eq!(show(&b.server)["rules"].as_array().unwrap().len(), 0);
    assert_eq!(show(&a.server)["rules"].as_array().unwrap().len(), 1);
    assert_shaped(upload(&a, 5201), "namespace a after b's flush");
    assert_unshaped(upload(&b, 5201), "namespace b");
}

#[test]
fn imq_device_can_be_added_and_deleted() {
    require_root();
    let pair = Pair::new("dev").unwrap();
    let s = &pair.server;
    s.imqctl_ok(&["dev", "add", "imq3", "--txqueuelen", "2000"]);
    let status = show(s);
    assert_eq!(status["devices"][0]["name"], "imq3");
    assert_eq!(status["devices"][0]["txqueuelen"], 2000);
    // A second add adopts the device and is not an error.
    s.imqctl_ok(&["dev", "add", "imq3"]);

    s.imqctl_ok(&["attach", "s0", "--dev", "imq3"]);
    // The same rule twice is a no-op; a second interface may feed the same device.
    s.imqctl_ok(&["attach", "s0", "--dev", "imq3"]);
    s.ip(&["link", "add", "vx", "type", "veth", "peer", "name", "vy"])
        .unwrap();
    s.imqctl_ok(&["attach", "vx", "--dev", "imq3"]);
    let rules = show(s)["rules"].as_array().unwrap().clone();
    assert_eq!(
        rules
            .iter()
            .map(|r| (r["interface"].as_str().unwrap(), r["dev"].as_str().unwrap()))
            .collect::<Vec<_>>(),
        [("s0", "imq3"), ("vx", "imq3")]
    );
    let refused = s.imqctl(&["dev", "del", "imq3"]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("detach"), "{}", refused.stderr);
    s.imqctl_ok(&["flush"]);
    s.imqctl_ok(&["dev", "del", "imq3"]);
    assert!(s.ip(&["link", "show", "imq3"]).is_err(), "imq3 still exists");
    assert_eq!(show(s)["devices"].as_array().unwrap().len(), 0);
}

/// Everything that must be refused: one line on stderr, a non-zero exit, and no change
/// to imq's state or to the namespace's devices.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    require_root();
    let pair = Pair::new("bad").unwrap();
    let s = &pair.server;
    s.imqctl_ok(&["attach", "s0", "--mark", "0x10/0xff"]);
    s.ip(&["link", "add", "ifb7", "type", "ifb"]).unwrap();
    s.ip(&["link", "add", "vx", "type", "veth", "peer", "name", "vy"])
        .unwrap();

    let before = (config(s), links(s));
    let cases: &[(&[&str], &str)] = &[
        (&["attach", "nosuch0"], "no interface 'nosuch0'"),
        (&["attach", "s0", "--mark", "0x1zz"], "invalid mark"),
        (&["attach", "s0", "--mark", "0x11/0x0f"], "outside the mask"),
        (&["attach", "s0", "--mark", "1/0x100000000"], "invalid mark"),
        (&["attach", "s0", "--direction", "sideways"], "invalid direction"),
        (&["attach", "imq0"], "imq0 is an imq device"),
        (&["attach", "ifb7"], "ifb7 is an ifb device"),
        (&["attach", "lo"], "not an Ethernet interface"),
        (&["attach", "vx", "--dev", "eth0"], "invalid imq device name"),
        (&["attach", "vx", "--dev", "imq256"], "invalid imq device name"),
        (
            &["attach", "s0", "--mark", "0x10/0xff", "--dev", "imq1"],
            "conflicts with the rule at prio 10",
        ),
        (&["attach", "vx", "--dev", "ifb7"], "invalid imq device name"),
        (&["detach", "s0", "--mark", "0x20"], "no imq rule on s0"),
        (&["detach", "vx"], "no imq rule on vx"),
        (&["dev", "del", "imq0"], "detach them first"),
        (&["dev", "del", "imq9"], "no imq device imq9"),
        (&["dev", "add", "imq1", "--txqueuelen", "0"], "invalid txqueuelen"),
        (&["frobnicate"], "unrecognized subcommand"),
        (&["attach", "s0", "--dport", "80"], "ports need --proto tcp, udp"),
        (
            &["attach", "s0", "--proto", "icmp", "--sport", "1"],
            "ports need --proto tcp, udp",
        ),
        (&["attach", "s0", "--src", "198.18.0.1/24"], "host bits are set"),
        (&["attach", "s0", "--dst", "2001:db8::/129"], "at most /128"),
        (
            &["attach", "s0", "--src", "198.18.0.0/16", "--dst", "2001:db8::/32"],
            "different address families",
        ),
        (&["attach", "s0", "--proto", "tcpp"], "invalid protocol"),
        (
            &["attach", "s0", "--proto", "tcp", "--dport", "90-80"],
            "the range is empty",
        ),
        (&["attach", "s0", "--dscp", "64"], "invalid DSCP"),
        (&["attach", "s0", "--classid", "0:10"], "invalid classid"),
        (&["attach", "s0", "--classid", "1"], "invalid classid"),
        (&["attach", "s0", "--set-mark", "0x10/0x1"], "outside the mask"),
        (
            &["detach", "s0", "--proto", "udp"],
            "no imq rule on s0 ingress matching proto udp",
        ),
        (
            &["detach", "s0", "--prio", "99"],
            "no imq rule on s0 ingress at prio 99",
        ),
    ];
    for (args, expect) in cases {
        let r = s.imqctl(args);
        assert_ne!(r.code, 0, "imqctl {args:?} succeeded");
        assert!(r.stdout.is_empty(), "imqctl {args:?} printed {:?}", r.stdout);
        let line = r.stderr.trim_end();
        assert!(!line.contains('\n'), "imqctl {args:?}: more than one line: {line:?}");
        assert!(
            line.starts_with("imqctl: ") && line.contains(expect),
            "imqctl {args:?}: {line:?}"
        );
        assert_eq!((config(s), links(s)), before, "imqctl {args:?} changed something");
    }

    // Without privileges: refused before anything is read or changed.
    let imqctl = imq_tests::imqctl_path().unwrap();
    let out = s
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&imqctl)
        .args(["attach", "vx"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "unprivileged attach succeeded");
    assert!(
        err.trim_end().lines().count() == 1 && err.contains("needs root"),
        "{err:?}"
    );
    assert_eq!((config(s), links(s)), before, "unprivileged attach changed something");
}

/// imqctl invocations are serialized: concurrent attaches on one interface (each a
/// read-modify-write of its rule set) lose no rule and never share a prio or counter.
#[test]
fn concurrent_imqctl_runs_lose_no_rule() {
    require_root();
    let pair = Pair::new("conc").unwrap();
    let imqctl = imq_tests::imqctl_path().unwrap();
    let children: Vec<_> = (1..=12)
        .map(|m| {
            pair.server
                .command(imqctl.to_str().unwrap())
                .args(["attach", "s0", "--mark", &format!("{m:#x}")])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn imqctl")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let status = show(&pair.server);
    let rules = status["rules"].as_array().unwrap();
    let mut marks: Vec<_> = rules.iter().map(|r| r["mark"].as_str().unwrap().to_owned()).collect();
    let mut prios: Vec<_> = rules.iter().map(|r| r["prio"].as_u64().unwrap()).collect();
    marks.sort();
    marks.dedup();
    prios.dedup();
    assert_eq!((marks.len(), prios.len()), (12, 12), "{status}");
}

/// Rules of an interface that is deleted are shown as gone, then forgotten by the next
/// command that changes rules.
#[test]
fn rules_of_deleted_interfaces_are_forgotten() {
    require_root();
    let pair = Pair::new("gone").unwrap();
    let s = &pair.server;
    s.ip(&["link", "add", "vx", "type", "veth", "peer", "name", "vy"])
        .unwrap();
    s.imqctl_ok(&["attach", "vx"]);
    s.imqctl_ok(&["attach", "vx", "--mark", "0x5", "-d", "both"]);
    s.imqctl_ok(&["attach", "s0"]);
    s.ip(&["link", "del", "vx"]).unwrap();

    let status = config(s);
    let gone: Vec<_> = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["interface"].as_str().unwrap().starts_with("(gone"))
        .collect();
    assert_eq!(gone.len(), 3, "{status}");
    assert!(gone.iter().all(|r| r["attached"] == false), "{status}");

    // A refused command changes nothing, not even this housekeeping.
    assert_ne!(s.imqctl(&["attach", "s0", "--mark", "0x1/0x2"]).code, 0);
    assert_eq!(config(s), status);

    s.imqctl_ok(&["attach", "s0", "--mark", "0x9"]);
    let status = show(s);
    let left: Vec<_> = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["interface"].as_str().unwrap().to_owned(), r["prio"].as_u64().unwrap()))
        .collect();
    assert_eq!(left, [("s0".to_owned(), 10), ("s0".to_owned(), 20)], "{status}");
}
