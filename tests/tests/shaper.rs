//! `imqctl shape`: the one-step WAN shaper. The server's `s0` plays the WAN
//! interface: what the client sends is the shaper's download, what the server sends
//! back its upload. Shaping needs cake or fq_codel, which this machine's kernel lacks:
//! those tests run in `cargo xtask vm-test`; the refusals run everywhere.

use imq_tests::{
    NetNs, Pair,
    check::{assert_rate, assert_unshaped, goodput, links, show},
    require_root,
};
use serde_json::Value;

fn client_v4(pair: &Pair) -> String {
    format!("198.18.{}.1", pair.id % 250)
}

fn imq_devices(ns: &NetNs) -> Vec<String> {
    links(ns)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|n| n.starts_with("imq"))
        .collect()
}

fn root_qdisc(ns: &NetNs, dev: &str) -> String {
    ns.tc(&["qdisc", "show", "dev", dev, "root"]).unwrap()
}

/// The kernel's own answer, through tc, to whether it has `kind`.
fn kernel_has(ns: &NetNs, kind: &str) -> bool {
    ns.ip(&["link", "add", "probe0", "type", "veth", "peer", "name", "probe1"])
        .unwrap();
    let has = ns.tc(&["qdisc", "add", "dev", "probe0", "root", kind]).is_ok();
    ns.ip(&["link", "del", "probe0"]).unwrap();
    has
}

fn refused(ns: &NetNs, args: &[&str], code: i32, says: &str) {
    let r = ns.imqctl(args);
    assert_eq!(r.code, code, "imqctl {args:?}: {}", r.stderr.trim());
    let err = r.stderr.trim();
    assert_eq!(err.lines().count(), 1, "imqctl {args:?}: not one line: {err}");
    assert!(err.contains(says), "imqctl {args:?}: {err}");
}

/// Bad input and what cannot be set up get one line and change nothing: an admin's
/// own root qdisc stays, no imq device is left behind, no rule is added.
#[test]
fn shape_refuses_cleanly_and_changes_nothing() {
    require_root();
    let pair = Pair::new("shno").unwrap();
    let s = &pair.server;
    refused(s, &["shape", "s0"], 1, "give --down RATE, --up RATE or both");
    refused(s, &["shape", "s0", "--down", "10mbps"], 2, "bytes per second");
    refused(s, &["shape", "s0", "--down", "10"], 2, "give a unit");
    refused(
        s,
        &["shape", "nosuch0", "--down", "10mbit"],
        1,
        "no interface 'nosuch0'",
    );
    refused(
        s,
        &["shape", "s0", "--down", "10mbit", "--qdisc", "fq_codel", "--nat"],
        1,
        "--nat needs --qdisc cake",
    );
    refused(
        s,
        &["shape", "s0", "--down", "10mbit", "--overhead", "300"],
        1,
        "overhead 300",
    );
    refused(s, &["unshape", "s0"], 1, "no shaper on s0");

    // An admin's root qdisc is theirs: the upload side refuses to replace it.
    s.tc(&[
        "qdisc", "add", "dev", "s0", "root", "handle", "5:", "tbf", "rate", "50mbit", "burst", "32kb", "latency",
        "50ms",
    ])
    .unwrap();
    refused(
        s,
        &["shape", "s0", "--down", "10mbit", "--up", "5mbit"],
        1,
        "has a root qdisc of its own (tbf 5:)",
    );
    assert!(root_qdisc(s, "s0").contains("tbf 5:"), "{}", root_qdisc(s, "s0"));
    assert!(imq_devices(s).is_empty(), "left behind: {:?}", imq_devices(s));
    s.tc(&["qdisc", "del", "dev", "s0", "root"]).unwrap();

    // A kernel without cake: said in one line, with what it has instead.
    if !kernel_has(s, "cake") {
        refused(
            s,
            &["shape", "s0", "--down", "10mbit", "--up", "5mbit"],
            1,
            "this kernel has no cake qdisc",
        );
        assert!(imq_devices(s).is_empty(), "left behind: {:?}", imq_devices(s));
        assert!(root_qdisc(s, "s0").contains("noqueue"), "{}", root_qdisc(s, "s0"));
    }
    if !kernel_has(s, "fq_codel") {
        refused(
            s,
            &["shape", "s0", "--up", "5mbit", "--qdisc", "fq_codel"],
            1,
            "this kernel has no fq_codel qdisc",
        );
        assert!(root_qdisc(s, "s0").contains("noqueue"), "{}", root_qdisc(s, "s0"));
    }
    let status = show(s);
    assert_eq!(status["rules"].as_array().unwrap().len(), 0, "{status}");
    assert_eq!(status["shapers"].as_array().unwrap().len(), 0, "{status}");
}

fn shaper(status: &Value) -> &Value {
    let shapers = status["shapers"].as_array().unwrap();
    assert_eq!(shapers.len(), 1, "{status}");
    &shapers[0]
}

/// The qdisc stats `show -j` reports for imq0's root.
fn imq0_root(status: &Value) -> Value {
    let dev = status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "imq0")
        .unwrap_or_else(|| panic!("no imq0: {status}"));
    dev["qdiscs"][0].clone()
}

/// cake both ways in one command, counters in `show`, a rate change in place,
/// export/apply round trip, and `unshape` leaves the interface as it was.
#[test]
#[ignore = "needs cake, which this machine's kernel lacks: `cargo xtask vm-test` runs it"]
fn shape_with_cake_both_ways_and_unshape() {
    require_root();
    let pair = Pair::new("shcake").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    let (server, client) = (pair.server_v4(), client_v4(&pair));

    let r = s.imqctl(&[
        "shape",
        "s0",
        "--down",
        "10mbit",
        "--up",
        "20mbit",
        "--overhead",
        "18",
        "--diffserv",
        "diffserv4",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("s0 down 10mbit dev imq0 up 20mbit qdisc cake overhead 18"),
        "{}",
        r.stderr
    );
    assert_rate(goodput(c, s, &server, 5301), 9.5, 0.15, "download, cake 10mbit on imq0");
    assert_rate(goodput(s, c, &client, 5302), 19.0, 0.15, "upload, cake 20mbit on s0");

    let status = show(s);
    let sh = shaper(&status);
    assert_eq!(
        (
            &sh["interface"],
            &sh["down"],
            &sh["up"],
            &sh["dev"],
            &sh["qdisc"],
            &sh["overhead"],
            &sh["diffserv"]
        ),
        (
            &Value::from("s0"),
            &Value::from("10mbit"),
            &Value::from("20mbit"),
            &Value::from("imq0"),
            &Value::from("cake"),
            &Value::from(18),
            &Value::from("diffserv4")
        ),
        "{sh}"
    );
    let down = imq0_root(&status);
    assert_eq!(
        (&down["kind"], &down["handle"]),
        (&Value::from("cake"), &Value::from("1a1:")),
        "{down}"
    );
    // At least nine tenths of the transfer (warm-up and window) at 9.5 Mbit/s, and at
    // 19 Mbit/s upload, went through them.
    let load = imq_tests::Load::default();
    let transfer = (load.warmup + load.window).as_secs_f64() * 0.9 / 8.0;
    assert!(down["sent_bytes"].as_u64().unwrap() as f64 > 9.5e6 * transfer, "{down}");
    assert_eq!(
        down["cake"]["tins"].as_array().unwrap().len(),
        4,
        "diffserv4 has 4 tins: {down}"
    );
    let up = &sh["upload"];
    assert!(up["sent_bytes"].as_u64().unwrap() as f64 > 19e6 * transfer, "{up}");
    let text = s.imqctl_ok(&["show"]);
    for line in [
        "shaper s0 down 10mbit dev imq0 up 20mbit qdisc cake overhead 18 diffserv diffserv4",
        "  qdisc cake 1a1: root sent ",
        "  upload qdisc cake 1a1: root sent ",
    ] {
        assert!(text.contains(line), "no '{line}' in show:\n{text}");
    }
    assert!(text.contains(" delay avg "), "no cake tin in show:\n{text}");

    // A new rate replaces the old in place: same device, same rule.
    s.imqctl_ok(&["shape", "s0", "--down", "5mbit", "--up", "20mbit"]);
    assert_rate(goodput(c, s, &server, 5303), 4.75, 0.15, "download, cake 5mbit");
    let status = show(s);
    assert_eq!(
        shaper(&status)["overhead"],
        Value::Null,
        "overhead was not stated again: {status}"
    );
    assert_eq!(status["rules"].as_array().unwrap().len(), 1, "{status}");

    // detach leaves the shaper's rule to unshape.
    refused(
        s,
        &["detach", "s0"],
        1,
        "the only rule there is s0's shaper: imqctl unshape s0",
    );
    s.imqctl_ok(&["attach", "s0", "--proto", "udp", "--dev", "imq5", "--prio", "10"]);
    let r = s.imqctl(&["detach", "s0"]);
    assert!(r.code == 0 && r.stderr.contains("removed 1 rule(s)"), "{}", r.stderr);
    s.imqctl_ok(&["dev", "del", "imq5"]);
    assert_eq!(shaper(&show(s))["down"], "5mbit");

    // export → unshape → apply: the same shaper again.
    let exported = s.imqctl_ok(&["export"]);
    assert!(
        exported.contains("[[shaper]]") && !exported.contains("[[rule]]"),
        "{exported}"
    );
    let r = s.imqctl(&["unshape", "s0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        imq_devices(s).is_empty(),
        "imq0 stays after unshape: {:?}",
        imq_devices(s)
    );
    assert!(root_qdisc(s, "s0").contains("noqueue"), "{}", root_qdisc(s, "s0"));
    assert_unshaped(goodput(c, s, &server, 5304), "download after unshape");
    let r = s.imqctl_apply(&exported);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let again = show(s);
    assert_eq!(shaper(&again)["down"], "5mbit", "{again}");
    assert_eq!(shaper(&again)["up"], "20mbit", "{again}");
    assert_rate(goodput(c, s, &server, 5305), 4.75, 0.15, "download after apply");

    // An empty file removes the shaper as it removes rules (when asked to).
    let r = s.imqctl_apply("");
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--allow-empty"), "{}", r.stderr);
    assert_eq!(shaper(&show(s))["down"], "5mbit", "the refusal changed nothing");
    assert_eq!(s.imqctl_apply_with("", &["--allow-empty"]).code, 0);
    assert!(imq_devices(s).is_empty(), "{:?}", imq_devices(s));
    assert!(root_qdisc(s, "s0").contains("noqueue"), "{}", root_qdisc(s, "s0"));
}

/// `--qdisc fq_codel`: HTB with one fq_codel leaf each way; then the same shaper
/// switched to cake by one command.
#[test]
#[ignore = "needs fq_codel and cake, which this machine's kernel lacks: `cargo xtask vm-test` runs it"]
fn shape_with_fq_codel_then_cake() {
    require_root();
    let pair = Pair::new("shfq").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    let (server, client) = (pair.server_v4(), client_v4(&pair));
    s.imqctl_ok(&[
        "shape", "s0", "--down", "10mbit", "--up", "20mbit", "--qdisc", "fq_codel",
    ]);
    assert_rate(
        goodput(c, s, &server, 5311),
        9.6,
        0.15,
        "download, htb 10mbit + fq_codel",
    );
    assert_rate(
        goodput(s, c, &client, 5312),
        19.2,
        0.15,
        "upload, htb 20mbit + fq_codel",
    );
    let status = show(s);
    assert_eq!(shaper(&status)["qdisc"], "fq_codel", "{status}");
    let kinds: Vec<&str> = status["devices"][0]["qdiscs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["htb", "fq_codel"], "{status}");
    assert!(root_qdisc(s, "s0").contains("htb 1a1:"), "{}", root_qdisc(s, "s0"));

    s.imqctl_ok(&["shape", "s0", "--down", "10mbit", "--up", "20mbit"]);
    assert!(root_qdisc(s, "s0").contains("cake 1a1:"), "{}", root_qdisc(s, "s0"));
    assert_eq!(imq0_root(&show(s))["kind"], "cake");
    assert_rate(goodput(c, s, &server, 5313), 9.5, 0.15, "download, cake after htb");
    s.imqctl_ok(&["unshape", "s0"]);
    assert!(imq_devices(s).is_empty(), "{:?}", imq_devices(s));

    // flush takes shapers with it, up-only ones too.
    s.imqctl_ok(&[
        "shape", "s0", "--down", "10mbit", "--up", "20mbit", "--qdisc", "fq_codel",
    ]);
    s.imqctl_ok(&["flush"]);
    assert!(imq_devices(s).is_empty(), "{:?}", imq_devices(s));
    assert!(root_qdisc(s, "s0").contains("noqueue"), "{}", root_qdisc(s, "s0"));
    s.imqctl_ok(&["shape", "s0", "--up", "20mbit"]);
    s.imqctl_ok(&["flush"]);
    assert!(root_qdisc(s, "s0").contains("noqueue"), "{}", root_qdisc(s, "s0"));
    assert_unshaped(goodput(s, c, &client, 5314), "upload after flush");
}
