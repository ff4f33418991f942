//! Selection without netfilter (addresses, ports, protocol, DSCP), the set-mark and
//! classid actions, and rule files applied while traffic flows: real traffic through
//! namespaces, effects measured.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use imq_tests::{
    Goodput, Load, NetNs, Pair,
    check::{assert_rate, assert_unshaped, config, goodput, show, tbf},
    require_root, tcp_goodput,
    udp::udp_flow_loss,
};
use serde_json::Value;

/// TCP flows from `client` to each of `addrs` on `server`, all at once.
fn concurrent_flows(client: &NetNs, server: &NetNs, addrs: &[SocketAddr]) -> Vec<Goodput> {
    let flows: Vec<_> = addrs
        .iter()
        .map(|&addr| {
            let (c, s) = (client.name().to_owned(), server.name().to_owned());
            thread::spawn(move || tcp_goodput(&NetNs::adopt(&c), &NetNs::adopt(&s), addr, Load::default()))
        })
        .collect();
    flows.into_iter().map(|f| f.join().unwrap().expect("traffic")).collect()
}

/// The rule of `status` on `interface` at `prio`.
fn rule_at<'a>(status: &'a Value, interface: &str, prio: u64) -> &'a Value {
    status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["interface"] == interface && r["prio"] == prio)
        .unwrap_or_else(|| panic!("no rule at prio {prio}: {status}"))
}

/// Packets sent by an HTB class, from `tc -s class show` (this tc has no JSON for
/// classes): "class htb 1:10 ...", then " Sent N bytes P pkt ...".
fn class_packets(stats: &str, class: &str) -> u64 {
    let mut lines = stats.lines();
    lines
        .find(|l| l.starts_with(&format!("class htb {class} ")))
        .unwrap_or_else(|| panic!("no class {class}: {stats}"));
    let sent: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    match sent.as_slice() {
        ["Sent", _, "bytes", p, "pkt", ..] => p.parse().unwrap(),
        _ => panic!("class {class}: unexpected statistics: {stats}"),
    }
}

/// Two flows told apart by port, put into HTB classes of 10 and 30 Mbit/s by
/// `--classid` alone: the HTB on imq0 has no tc filter and no default class, so an
/// unclassified packet would go to its direct queue, unshaped.
#[test]
fn classid_puts_port_selected_flows_into_htb_classes() {
    require_root();
    let pair = Pair::new("cls").unwrap();
    let s = &pair.server;
    s.imqctl_ok(&["attach", "s0", "--proto", "tcp", "--dport", "5301", "--classid", "1:10"]);
    s.imqctl_ok(&["attach", "s0", "--proto", "tcp", "--dport", "5302", "--classid", "1:20"]);
    s.tc(&["qdisc", "replace", "dev", "imq0", "root", "handle", "1:", "htb"])
        .unwrap();
    for (class, rate) in [("1:10", "10mbit"), ("1:20", "30mbit")] {
        s.tc(&[
            "class", "add", "dev", "imq0", "parent", "1:", "classid", class, "htb", "rate", rate, "ceil", rate,
        ])
        .unwrap();
    }
    let server = pair.server_v4();
    let addrs: Vec<SocketAddr> = [5301, 5302]
        .iter()
        .map(|p| format!("{server}:{p}").parse().unwrap())
        .collect();
    let g = concurrent_flows(&pair.client, s, &addrs);
    assert_rate(g[0], 10.0, 0.15, "port 5301 in class 1:10 (10mbit)");
    assert_rate(g[1], 30.0, 0.15, "port 5302 in class 1:20 (30mbit)");

    // Each class saw its flow's packets: HTB classified by skb->priority.
    let stats = s.tc(&["-s", "class", "show", "dev", "imq0"]).unwrap();
    for class in ["1:10", "1:20"] {
        assert!(class_packets(&stats, class) > 1000, "class {class}: {stats}");
    }
    let status = show(s);
    assert_eq!(rule_at(&status, "s0", 10)["classid"], "1:10");
    // Bytes, not packets: how many packets carried them depends on GRO, which
    // aggregates more on a slower machine (hundreds of 40 KB packets in the VMs).
    assert!(
        rule_at(&status, "s0", 20)["bytes"].as_u64().unwrap() > 4_000_000,
        "{status}"
    );

    // Another port is not selected at all: unshaped.
    assert_unshaped(goodput(&pair.client, s, &server, 5303), "port 5303, no rule");
}

#[test]
fn ipv6_prefix_rules_select_only_their_prefix() {
    require_root();
    let pair = Pair::new("pfx").unwrap();
    let s = &pair.server;
    let client_net = format!("2001:db8:{:x}::/64", pair.id % 250);
    s.imqctl_ok(&["attach", "s0", "--src", &client_net]);
    tbf(s, "imq0", 10);
    assert_rate(
        goodput(&pair.client, s, &pair.server_v6(), 5310),
        9.5,
        0.1,
        &format!("IPv6 from {client_net}"),
    );
    assert_unshaped(
        goodput(&pair.client, s, &pair.server_v4(), 5311),
        "IPv4: not in an IPv6 prefix",
    );

    // A neighbouring prefix does not catch the client.
    s.imqctl_ok(&["detach", "s0"]);
    s.imqctl_ok(&["attach", "s0", "--src", "2001:db8:ffff::/48"]);
    assert_unshaped(
        goodput(&pair.client, s, &pair.server_v6(), 5312),
        "IPv6 outside 2001:db8:ffff::/48",
    );
    // Nor does an IPv4 prefix whose bytes begin like the IPv6 one (0x20 0x01 ...).
    s.imqctl_ok(&["detach", "s0"]);
    s.imqctl_ok(&["attach", "s0", "--src", "32.1.0.0/16"]);
    assert_unshaped(
        goodput(&pair.client, s, &pair.server_v6(), 5313),
        "IPv6 vs IPv4 32.1.0.0/16",
    );
}

/// `--classid` on egress: the cls_bpf filter sets skb->priority before mirred sends
/// the packet to imq0, whose HTB has no filter.
#[test]
fn classid_works_on_egress() {
    require_root();
    let pair = Pair::new("cle").unwrap();
    let c = &pair.client;
    c.imqctl_ok(&[
        "attach",
        "c0",
        "-d",
        "egress",
        "--proto",
        "tcp",
        "--dport",
        "5350",
        "--classid",
        "1:10",
    ]);
    c.tc(&["qdisc", "replace", "dev", "imq0", "root", "handle", "1:", "htb"])
        .unwrap();
    c.tc(&[
        "class", "add", "dev", "imq0", "parent", "1:", "classid", "1:10", "htb", "rate", "20mbit", "ceil", "20mbit",
    ])
    .unwrap();
    assert_rate(
        goodput(c, &pair.server, &pair.server_v6(), 5350),
        20.0,
        0.15,
        "IPv6 port 5350 in class 1:10 (20mbit), egress",
    );
    assert_unshaped(goodput(c, &pair.server, &pair.server_v6(), 5351), "port 5351, no rule");
}

/// Packets counted by the first rule of a mangle PREROUTING chain.
fn prerouting_packets(ns: &NetNs, tool: &str) -> u64 {
    let out = ns.exec(tool, &["-t", "mangle", "-nvxL", "PREROUTING"]).unwrap();
    // Chain header, column header, then the rule: "pkts bytes target ...".
    let line = out.lines().nth(2).unwrap_or_else(|| panic!("{tool}: no rule in {out}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// A mark set at TC ingress is there when netfilter sees the packet: after the imq
/// device, ifb re-injects it into the stack, before PREROUTING.
#[test]
fn set_mark_is_seen_by_iptables_and_ip6tables() {
    require_root();
    let pair = Pair::new("smk").unwrap();
    let s = &pair.server;
    for tool in ["iptables", "ip6tables"] {
        s.exec(
            tool,
            &[
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-i",
                "s0",
                "-m",
                "mark",
                "--mark",
                "0x42/0xff",
            ],
        )
        .unwrap();
    }
    imq_tests::ping(&pair.client, &pair.server_v4(), 3);
    imq_tests::ping(&pair.client, &pair.server_v6(), 3);
    assert_eq!(prerouting_packets(s, "iptables"), 0, "nothing is marked yet");
    assert_eq!(prerouting_packets(s, "ip6tables"), 0, "nothing is marked yet");

    s.imqctl_ok(&["attach", "s0", "--proto", "icmp", "--set-mark", "0x42/0xff"]);
    s.imqctl_ok(&["attach", "s0", "--proto", "icmpv6", "--set-mark", "0x1042"]);
    assert_eq!(imq_tests::ping(&pair.client, &pair.server_v4(), 5), 5);
    assert_eq!(imq_tests::ping(&pair.client, &pair.server_v6(), 5), 5);
    let (v4, v6) = (prerouting_packets(s, "iptables"), prerouting_packets(s, "ip6tables"));
    assert!(v4 >= 5, "iptables saw {v4} marked packets");
    assert!(v6 >= 5, "ip6tables saw {v6} marked packets");
    let status = show(s);
    assert!(rule_at(&status, "s0", 10)["packets"].as_u64().unwrap() >= 5, "{status}");
    assert_eq!(rule_at(&status, "s0", 20)["set_mark"], "0x1042");
}

/// One `[[rule]]` table.
fn toml_rule(fields: &[(&str, &str)]) -> String {
    let mut t = String::from("[[rule]]\n");
    for (k, v) in fields {
        t.push_str(&format!("{k} = {v}\n"));
    }
    t
}

/// The flow's rule, and 10,000 per-host rules ahead of it (prio 1 .. 10000) that the
/// data path must look past for every packet of the flow.
fn ten_thousand_rules(flow_rule: &str) -> String {
    let mut text = String::with_capacity(1 << 20);
    for i in 0..10_000u32 {
        let src = format!("\"198.19.{}.{}/32\"", 100 + i / 250, i % 250);
        let prio = (i + 1).to_string();
        text.push_str(&toml_rule(&[
            ("interface", "\"s0\""),
            ("prio", &prio),
            ("src", &src),
            ("dev", "\"imq1\""),
            ("classid", "\"1:2\""),
        ]));
    }
    text.push_str(flow_rule);
    text
}

/// Held by the tests that apply tens of thousands of rules, one at a time: the CPU
/// time of one such apply would disturb the throughput and loss another measures.
static BULK_APPLY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `n` per-host rules on s0 (prio 1..=n, sources 198.19.0.0 up, then 198.18.255.0
/// up), all to `dev`.
fn per_host_rules(n: u32, dev: &str) -> String {
    let mut text = String::with_capacity(n as usize * 100);
    let dev = format!("\"{dev}\"");
    for i in 0..n {
        let src = match i {
            0..65_536 => format!("\"198.19.{}.{}/32\"", i / 256, i % 256),
            _ => format!("\"198.18.255.{}/32\"", i - 65_536),
        };
        let prio = (i + 1).to_string();
        text.push_str(&toml_rule(&[
            ("interface", "\"s0\""),
            ("prio", &prio),
            ("src", &src),
            ("dev", &dev),
        ]));
    }
    text
}

/// `apply` can replace every rule with as many others at once: the old ones stay in
/// force until the new ones land, so both sets need rule ids at the same time, which
/// stopped at 32,768 rules each. 33,000 replaced by 33,000 others shows it (65,536 by
/// 65,536 works too, but takes minutes under the VMs' emulation). More than 65,536
/// rules are refused with that figure, changing nothing.
#[test]
fn every_rule_can_be_replaced_at_once() {
    require_root();
    let _bulk = BULK_APPLY.lock().unwrap_or_else(|e| e.into_inner());
    let pair = Pair::new("cap").unwrap();
    let s = &pair.server;
    let count = |dev: &str| {
        show(s)["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["dev"] == dev)
            .count()
    };
    for dev in ["imq1", "imq2"] {
        let r = s.imqctl_apply(&per_host_rules(33_000, dev));
        assert_eq!(r.code, 0, "33,000 rules to {dev}: {}", r.stderr);
        assert_eq!(count(dev), 33_000, "every rule now sends to {dev}");
    }
    let r = s.imqctl_apply(&per_host_rules(65_537, "imq3"));
    assert_ne!(r.code, 0);
    assert_eq!(
        r.stderr.trim(),
        "imqctl: a namespace holds at most 65536 rules",
        "one line, the real limit"
    );
    assert_eq!(count("imq2"), 33_000, "the refusal changed nothing");
}

fn tcp_unshaped(pair: &Pair, port: u16) -> f64 {
    // The full windows even in the emulated guests: unshaped TCP there varies too
    // much over the shorter ones for a ratio (1.32 seen on 5.10 with 1 s + 2 s).
    let load = Load {
        warmup: Duration::from_millis(1500),
        window: Duration::from_secs(3),
        ..Load::default()
    };
    let addr = format!("{}:{port}", pair.server_v4()).parse().unwrap();
    let g = tcp_goodput(&pair.client, &pair.server, addr, load).expect("traffic");
    eprintln!("port {port}: {g}");
    g.mbit_per_s()
}

/// Replacing one rule with 10,000 (plus that one) while a flow runs: no packet of
/// the flow is lost or passes unselected, and afterwards the flow is as fast as with
/// one rule (within 20%).
#[test]
fn apply_of_ten_thousand_rules_while_a_flow_runs() {
    require_root();
    let _bulk = BULK_APPLY.lock().unwrap_or_else(|e| e.into_inner());
    let pair = Pair::new("app").unwrap();
    let s = &pair.server;
    let server = pair.server_v4();
    let flow_rule = toml_rule(&[
        ("interface", "\"s0\""),
        ("prio", "100000"),
        ("dst", &format!("\"{server}/32\"")),
    ]);
    let many = ten_thousand_rules(&flow_rule);
    let r = s.imqctl_apply(&flow_rule);
    assert_eq!(r.code, 0, "{}", r.stderr);
    s.tc(&["qdisc", "replace", "dev", "imq0", "root", "pfifo", "limit", "100000"])
        .unwrap();

    // 20,000 packets/s for 3 s; 10,000 rules go in a second into it.
    let addr: SocketAddr = format!("{server}:5320").parse().unwrap();
    let before = rule_at(&show(s), "s0", 100000)["packets"].as_u64().unwrap();
    let mut took = Duration::ZERO;
    let (sent, received, lost) = udp_flow_loss(&pair.client, s, addr, 20_000, Duration::from_secs(3), || {
        thread::sleep(Duration::from_secs(1));
        let start = Instant::now();
        let r = s.imqctl_apply(&many);
        took = start.elapsed();
        assert_eq!(r.code, 0, "{}", r.stderr);
    })
    .unwrap();
    eprintln!("apply of 10,001 rules took {took:?}; flow: sent {sent}, received {received}, lost {lost}");
    assert_eq!(lost, 0, "packets lost while the rules changed");
    let status = show(s);
    assert_eq!(status["rules"].as_array().unwrap().len(), 10_001);
    let flow = rule_at(&status, "s0", 100000);
    // The rule kept its counters through the apply (same rule, same id), and every
    // packet of the flow was selected by it: none passed unselected mid-switch.
    let counted = flow["packets"].as_u64().unwrap() - before;
    assert!(counted >= sent, "the flow's rule counted {counted} of {sent} packets");
    let others: u64 = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["prio"] != 100000)
        .map(|r| r["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(others, 0, "packets selected by rules that do not match them");

    // Throughput with 10,001 rules vs 1, alternating, through the same pfifo.
    let (mut one, mut many_rate) = (0.0, 0.0);
    for round in 0..2 {
        let r = s.imqctl_apply(&flow_rule);
        assert_eq!(r.code, 0, "{}", r.stderr);
        one += tcp_unshaped(&pair, 5330 + round);
        let r = s.imqctl_apply(&many);
        assert_eq!(r.code, 0, "{}", r.stderr);
        many_rate += tcp_unshaped(&pair, 5340 + round);
    }
    let ratio = many_rate / one;
    eprintln!("10,001 rules / 1 rule: {ratio:.3}");
    assert!(
        // More rules cannot make a flow faster: above 1 is the noise of unshaped TCP
        // (up to 1.32 seen under emulation), so the upper bound is only a sanity one.
        (0.8..=1.5).contains(&ratio),
        "throughput ratio {ratio:.3} (10,001 rules / 1)"
    );
}

/// Bad rule files are refused with the rule's line and the reason, and change
/// nothing; a good one replaces every rule; export prints what apply reads back.
#[test]
fn rule_files_are_checked_whole_and_export_reads_back() {
    require_root();
    let pair = Pair::new("rfl").unwrap();
    let s = &pair.server;
    s.imqctl_ok(&["attach", "s0", "--mark", "0x7"]);
    s.ip(&["link", "add", "ifb3", "type", "ifb"]).unwrap();
    let before = config(s);
    let good = toml_rule(&[("interface", "\"s0\""), ("proto", "\"udp\"")]);
    let cases: &[(String, &str)] = &[
        (
            format!(
                "{good}\n{}",
                toml_rule(&[("interface", "\"s0\""), ("dst", "\"198.18.0.1/24\"")])
            ),
            "line 5: invalid prefix",
        ),
        (
            format!("{good}\n{}", toml_rule(&[("interface", "\"s0\""), ("dport", "80")])),
            "line 5: impossible match: ports need",
        ),
        (format!("{good}frobnicate = 1\n"), "line 4: unknown field `frobnicate`"),
        (
            format!(
                "{good}prio = 5\n\n{}",
                toml_rule(&[("interface", "\"s0\""), ("prio", "5"), ("proto", "\"tcp\"")])
            ),
            "line 6: prio 5 is the same as the rule on line 1",
        ),
        (toml_rule(&[("interface", "\"imq0\"")]), "line 1: imq0 is an imq device"),
        (toml_rule(&[("interface", "\"ifb3\"")]), "line 1: ifb3 is an ifb device"),
        (
            toml_rule(&[("interface", "\"nosuch0\"")]),
            "line 1: no interface 'nosuch0'",
        ),
        (
            toml_rule(&[("interface", "\"s0\""), ("dev", "\"eth0\"")]),
            "line 1: invalid imq device name",
        ),
        ("[[rule]\n".to_owned(), "line 1:"),
    ];
    for (text, expect) in cases {
        let r = s.imqctl_apply(text);
        assert_ne!(r.code, 0, "applied: {text}");
        let line = r.stderr.trim_end();
        assert!(
            !line.contains('\n') && line.contains(expect),
            "{expect:?} not in {line:?}"
        );
        assert_eq!(config(s), before, "a refused file changed something: {text}");
    }

    let text = format!(
        "{}\n{}",
        toml_rule(&[
            ("interface", "\"s0\""),
            ("direction", "\"both\""),
            ("dst", "\"2001:db8::/32\""),
            ("proto", "\"tcp\""),
            ("dport", "\"1024-65535\""),
            ("classid", "\"1:10\""),
        ]),
        toml_rule(&[
            ("interface", "\"s0\""),
            ("dscp", "\"ef\""),
            ("dev", "\"imq2\""),
            ("set_mark", "\"0x1/0x1\"")
        ]),
    );
    let r = s.imqctl_apply(&text);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let applied = config(s);
    let rules = applied["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 3, "{applied}");
    assert!(
        rules.iter().all(|r| r["mark"].is_null()),
        "the old rule is gone: {applied}"
    );
    assert_eq!(rule_at(&applied, "s0", 20)["dscp"], 46);

    // detach picks rules by exact match or by prio.
    let exported = s.imqctl_ok(&["export"]);
    s.imqctl_ok(&["detach", "s0", "--dscp", "46"]);
    s.imqctl_ok(&["detach", "s0", "-d", "egress", "--prio", "10"]);
    let left = config(s);
    let left = left["rules"].as_array().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        (left[0]["direction"].as_str(), left[0]["classid"].as_str()),
        (Some("ingress"), Some("1:10"))
    );

    s.imqctl_ok(&["flush"]);
    let r = s.imqctl_apply(&exported);
    assert_eq!(r.code, 0, "{}\n{exported}", r.stderr);
    assert_eq!(config(s), applied, "export, then apply, gives back the same rules");

    // A file with no rules (empty, or comments only: a truncated or wrong file) would
    // remove every rule: refused in one line unless asked for, changing nothing.
    for text in ["", "# nothing yet\n"] {
        let r = s.imqctl_apply(text);
        assert_ne!(r.code, 0);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(
            r.stderr
                .contains("has no rules: applying it would remove all 3 rule(s) in place; pass --allow-empty"),
            "{}",
            r.stderr
        );
        assert_eq!(config(s), applied, "the refusal changed nothing");
    }
    let r = s.imqctl_apply_with("", &["--allow-empty"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(config(s)["rules"].as_array().unwrap().is_empty());
    // With nothing to remove, an empty file is no loss.
    assert_eq!(s.imqctl_apply("").code, 0);

    // --dry-run prints the blocks that would go (-) and come (+), changes nothing.
    assert_eq!(s.imqctl_apply(&exported).code, 0);
    let dry = |text: &str| {
        let r = s.imqctl_apply_with(text, &["--dry-run"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(config(s), applied, "a dry run changed nothing");
        (r.stdout, r.stderr.trim().to_owned())
    };
    let (out, said) = dry(&exported);
    assert_eq!(
        (out.as_str(), said.as_str()),
        ("", "dry run: 0 block(s) removed, 0 added, 3 unchanged; nothing changed")
    );
    let (out, said) = dry("");
    assert_eq!(
        said,
        "dry run: 3 block(s) removed, 0 added, 0 unchanged; nothing changed"
    );
    assert_eq!(out.matches("- [[rule]]\n").count(), 3, "{out}");
    assert!(out.lines().all(|l| l.starts_with("- ")), "{out}");
    let more = format!(
        "{exported}\n{}",
        toml_rule(&[
            ("interface", "\"s0\""),
            ("prio", "77"),
            ("dport", "4444"),
            ("proto", "\"tcp\"")
        ])
    );
    let (out, said) = dry(&more);
    assert_eq!(
        said,
        "dry run: 0 block(s) removed, 1 added, 3 unchanged; nothing changed"
    );
    assert!(out.starts_with("+ [[rule]]\n+ interface = \"s0\"\n"), "{out}");
    assert!(out.contains("+ dport = \"4444\"\n"), "{out}");
}

/// A packet an imq device re-injects is never selected again, even when a rule's
/// `--set-mark` made it match another rule, into another device, on the way back.
#[test]
fn a_re_injected_packet_is_not_selected_again_after_set_mark() {
    require_root();
    let pair = Pair::new("rei").unwrap();
    let c = &pair.client;
    c.imqctl_ok(&[
        "attach",
        "c0",
        "-d",
        "egress",
        "--mark",
        "0x0/0xff",
        "--set-mark",
        "0x1/0xff",
        "--dev",
        "imq0",
    ]);
    c.imqctl_ok(&["attach", "c0", "-d", "egress", "--mark", "0x1/0xff", "--dev", "imq1"]);
    for dev in ["imq0", "imq1"] {
        c.tc(&["qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "100000"])
            .unwrap();
    }
    assert_eq!(imq_tests::ping(c, &pair.server_v4(), 5), 5);
    assert_eq!(imq_tests::ping(c, &pair.server_v6(), 5), 5);
    let status = show(c);
    let (first, second) = (rule_at(&status, "c0", 10), rule_at(&status, "c0", 20));
    assert!(first["packets"].as_u64().unwrap() >= 10, "{status}");
    assert_eq!(second["packets"], 0, "re-injected packets selected again: {status}");
    assert_eq!(
        imq_tests::check::dev_rx(c, "imq1").0,
        0,
        "imq1 received re-injected packets"
    );
}

/// The name of this namespace's imq state directory.
fn netns_dir(ns: &NetNs) -> String {
    ns.spawn(|| Ok(imq::netns_id()?.dir_name())).join().unwrap().unwrap()
}

/// What a command that died half-way through a change leaves in the unused
/// generation (rule records, hooks, entries) is invisible, and the next change clears
/// it before writing its own.
#[test]
fn a_half_written_generation_is_cleared_by_the_next_change() {
    use aya::maps::{Array, HashMap, Map, MapData};
    use imq_common::{EntryKey, FlowKey, Hook, HookKey, RuleKey, RuleSpec, Target};
    require_root();
    let pair = Pair::new("gen").unwrap();
    let s = &pair.server;
    s.imqctl_ok(&["attach", "s0", "--proto", "udp"]);
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/imq/{}", netns_dir(s)));
    let open = |name: &str| Map::from_map_data(MapData::from_pin(dir.join(name)).unwrap()).unwrap();
    let active: u32 = Array::<_, u32>::try_from(open("imq_active"))
        .unwrap()
        .get(&0, 0)
        .unwrap();
    let unused = active ^ 1;

    // The debris of a dead command in the unused generation.
    let mut rules = HashMap::<_, RuleKey, RuleSpec>::try_from(open("imq_rules")).unwrap();
    let debris_rule = RuleKey {
        id: 4242,
        generation: unused,
    };
    rules.insert(debris_rule, RuleSpec::default(), 0).unwrap();
    let debris_hook = HookKey {
        ifindex: 999_999,
        direction: 0,
        generation: unused as u16,
    };
    let mut hooks = HashMap::<_, HookKey, Hook>::try_from(open("imq_hooks")).unwrap();
    hooks.insert(debris_hook, Hook::empty(), 0).unwrap();
    let debris_entry = EntryKey {
        hook: debris_hook,
        shape: 0,
        flow: FlowKey::default(),
    };
    let mut entries = HashMap::<_, EntryKey, Target>::try_from(open("imq_entries")).unwrap();
    entries.insert(debris_entry, Target::default(), 0).unwrap();

    // Not part of what is in force.
    assert_eq!(config(s)["rules"].as_array().unwrap().len(), 1);
    // The next change clears it, and its own rules are what is in force.
    s.imqctl_ok(&["attach", "s0", "--proto", "tcp"]);
    assert!(
        rules.get(&debris_rule, 0).is_err(),
        "the debris rule record is still there"
    );
    assert!(hooks.get(&debris_hook, 0).is_err(), "the debris hook is still there");
    assert!(
        entries.get(&debris_entry, 0).is_err(),
        "the debris entry is still there"
    );
    let status = config(s);
    let rules_now = status["rules"].as_array().unwrap();
    assert_eq!(rules_now.len(), 2, "{status}");
    let in_force: usize = rules
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.generation == unused)
        .count();
    assert_eq!(in_force, 2, "the new generation holds the two rules");
}
