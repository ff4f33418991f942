//! `[[device]]` in rule files: imq devices with their txqueuelen and qdiscs, set up
//! before the rules send them traffic, changed only when the file changes, refused
//! whole when tc or the kernel refuses a line, given back by `export`.

use imq_tests::{
    NetNs, Pair,
    check::{assert_pair_rate, assert_pair_unshaped},
    require_root,
};
use serde_json::Value;

fn setup(rate: &str) -> String {
    format!(
        "[[device]]\nname = \"imq1\"\ntxqueuelen = 2000\nqdisc = [\n  \
         \"qdisc add root handle 1: htb default 10\",\n  \
         \"class add parent 1: classid 1:10 htb rate {rate}\",\n]\n\n\
         [[rule]]\ninterface = \"s0\"\ndev = \"imq1\"\n"
    )
}

/// (rate as tc prints it, bytes sent) of the HTB class 1:10 on imq1 (tc has no
/// JSON for HTB classes).
fn class_1_10(ns: &NetNs) -> (String, u64) {
    let out = ns
        .tc(&["-s", "class", "show", "dev", "imq1", "classid", "1:10"])
        .unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |w: &str| {
        let i = words
            .iter()
            .position(|x| *x == w)
            .unwrap_or_else(|| panic!("no {w} in {out}"));
        words[i + 1].to_owned()
    };
    (after("rate"), after("Sent").parse().unwrap())
}

fn qlen(ns: &NetNs, dev: &str) -> u64 {
    let v: Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", dev]).unwrap()).unwrap();
    v[0]["txqlen"].as_u64().unwrap()
}

#[test]
fn a_device_entry_sets_up_its_qdiscs_and_export_gives_it_back() {
    require_root();
    let pair = Pair::new("devs").unwrap();
    let s = &pair.server;
    let r = s.imqctl_apply(&setup("10mbit"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stderr.trim(),
        "applied 1 rule(s) (1 added, 0 removed), 0 shaper(s); qdiscs set up on imq1"
    );
    assert_eq!(qlen(s, "imq1"), 2000);
    assert_eq!(class_1_10(s).0, "10Mbit");
    assert_pair_rate(&pair, 9.6, "HTB 10mbit on imq1");

    // The export is the file: applying it again changes nothing, not even the
    // qdisc's counters.
    let export = s.imqctl_ok(&["export"]);
    assert!(
        export.contains("[[device]]\nname = \"imq1\"\ntxqueuelen = 2000\n"),
        "{export}"
    );
    assert!(
        export.contains("\"class add parent 1: classid 1:10 htb rate 10mbit\","),
        "{export}"
    );
    let sent = class_1_10(s).1;
    assert!(sent > 1_000_000, "class 1:10 sent {sent} bytes");
    let r = s.imqctl_apply(&export);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.ends_with("; nothing changed\n"), "{}", r.stderr);
    assert!(class_1_10(s).1 >= sent, "the qdisc was set up again");
    assert_eq!(s.imqctl_ok(&["export"]), export);

    // A changed line sets the device up again.
    let r = s.imqctl_apply(&setup("20mbit"));
    assert!(
        r.stderr
            .contains("(0 added, 0 removed), 0 shaper(s); qdiscs set up on imq1"),
        "{}",
        r.stderr
    );
    assert_eq!(class_1_10(s).0, "20Mbit");
    assert_pair_rate(&pair, 19.2, "HTB 20mbit on imq1");

    // A line tc refuses: one line naming the file's line and the qdisc line, and the
    // device keeps its qdiscs.
    let r = s.imqctl_apply(&setup("tenmbit"));
    assert_ne!(r.code, 0);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("line 1: imq1: qdisc line 2: tc: "), "{}", r.stderr);
    assert_eq!(class_1_10(s).0, "20Mbit");
    assert!(
        s.ip(&["link", "show", "imq-check"]).is_err(),
        "the scratch device was left behind"
    );
    // `dev` is imq's to add.
    let r = s.imqctl_apply("[[device]]\nname = \"imq1\"\nqdisc = [\"qdisc add dev imq1 root tbf\"]\n");
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("line 1: imq1 qdisc line 1: leave out dev"),
        "{}",
        r.stderr
    );
    assert_eq!(class_1_10(s).0, "20Mbit");

    // Left out of the file: its qdiscs go and export forgets it.
    let r = s.imqctl_apply("[[rule]]\ninterface = \"s0\"\ndev = \"imq1\"\n");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("; qdiscs removed from imq1"), "{}", r.stderr);
    let qdiscs = s.tc(&["qdisc", "show", "dev", "imq1"]).unwrap();
    assert!(!qdiscs.contains("htb"), "{qdiscs}");
    assert!(!s.imqctl_ok(&["export"]).contains("[[device]]"));
    assert_pair_unshaped(&pair, "imq1 without qdiscs");

    // flush takes a setup's qdiscs with the rules; the device stays.
    assert_eq!(s.imqctl_apply(&setup("10mbit")).code, 0);
    s.imqctl_ok(&["flush"]);
    let qdiscs = s.tc(&["qdisc", "show", "dev", "imq1"]).unwrap();
    assert!(!qdiscs.contains("htb"), "{qdiscs}");
    assert!(!s.imqctl_ok(&["export"]).contains("[[device]]"));
}
