//! How imq attaches on the running kernel (TCX where it exists, else cls_bpf on
//! clsact), and that the admin's own ingress/clsact qdiscs and filters stay intact and
//! keep working beside imq's, before, during and after.

use imq_tests::{
    NetNs, Pair,
    check::{assert_rate, assert_unshaped, goodput, show, tbf},
    require_root,
};
use serde_json::Value;

/// Whether the running kernel has TCX, by its version: an oracle independent of
/// imqctl, which probes the kernel instead (TCX came in 6.6).
fn kernel_has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().unwrap().parse().unwrap();
    let minor: u32 = parts.next().unwrap().parse().unwrap();
    (major, minor) >= (6, 6)
}

fn rules(status: &Value) -> &Vec<Value> {
    status["rules"].as_array().unwrap()
}

/// The tc filters of `dev`'s ingress hook, as `tc -j filter show` lists them.
fn ingress_filters(ns: &NetNs, dev: &str) -> Vec<Value> {
    let out = ns.tc(&["-j", "filter", "show", "dev", dev, "ingress"]).unwrap();
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn ingress_uses_tcx_where_the_kernel_has_it_and_clsact_elsewhere() {
    require_root();
    let pair = Pair::new("mode").unwrap();
    let s = &pair.server;
    s.imqctl_ok(&["attach", "s0"]);
    s.imqctl_ok(&["attach", "s0", "--direction", "egress"]);
    let status = show(s);
    let hook = |direction: &str| {
        rules(&status).iter().find(|r| r["direction"] == direction).unwrap()["hook"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let expected = if kernel_has_tcx() { "tcx" } else { "clsact" };
    assert_eq!(hook("ingress"), expected, "{status}");
    assert_eq!(hook("egress"), "clsact", "{status}");
    assert!(s.imqctl_ok(&["show"]).contains(&format!("hook {expected}")));
    // imq's cls_bpf filter is on the ingress hook exactly when it is not a TCX link.
    let imq_filters = ingress_filters(s, "s0").iter().filter(|f| f["kind"] == "bpf").count();
    assert_eq!(imq_filters > 0, expected == "clsact", "{:?}", ingress_filters(s, "s0"));

    // Shaping works the same either way.
    tbf(s, "imq0", 10);
    assert_rate(goodput(&pair.client, s, &pair.server_v4(), 5201), 9.6, 0.15, "ingress");
    s.imqctl_ok(&["detach", "s0", "-d", "both"]);
    assert!(rules(&show(s)).is_empty());
    assert!(
        !ingress_filters(s, "s0").iter().any(|f| f["kind"] == "bpf"),
        "imq's filter is left behind"
    );
    assert_unshaped(goodput(&pair.client, s, &pair.server_v4(), 5202), "detached");
}

/// The admin's own classic setup, on an `ingress` or a `clsact` qdisc: a u32 filter
/// sending port 5304 to their own ifb, shaped to 15 Mbit/s. imq beside it shapes port
/// 5301 to 10 Mbit/s; neither disturbs the other, and detaching imq leaves the
/// admin's qdisc, filter and shaping as they were.
#[test]
fn the_admins_ingress_or_clsact_qdisc_and_filters_stay_intact() {
    require_root();
    for qdisc in ["ingress", "clsact"] {
        let pair = Pair::new("admin").unwrap();
        let (c, s) = (&pair.client, &pair.server);
        let server = pair.server_v4();
        s.ip(&["link", "add", "ifbx", "type", "ifb"]).unwrap();
        s.ip(&["link", "set", "ifbx", "up"]).unwrap();
        tbf(s, "ifbx", 15);
        s.tc(&["qdisc", "add", "dev", "s0", qdisc]).unwrap();
        s.tc(&[
            "filter", "add", "dev", "s0", "ingress", "pref", "100", "protocol", "ip", "u32", "match", "ip", "dport",
            "5304", "0xffff", "action", "mirred", "egress", "redirect", "dev", "ifbx",
        ])
        .unwrap();
        let admin = ingress_filters(s, "s0");
        let qdiscs = || s.tc(&["qdisc", "show", "dev", "s0"]).unwrap();
        let before = qdiscs();

        s.imqctl_ok(&["attach", "s0", "--proto", "tcp", "--dport", "5301"]);
        tbf(s, "imq0", 10);
        assert_eq!(qdiscs(), before, "{qdisc}: imq changed the qdiscs");
        let now = ingress_filters(s, "s0");
        for f in &admin {
            assert!(now.contains(f), "{qdisc}: the admin's filter {f} is gone: {now:?}");
        }
        assert_rate(goodput(c, s, &server, 5301), 9.6, 0.15, &format!("{qdisc}: imq's port"));
        assert_rate(
            goodput(c, s, &server, 5304),
            14.4,
            0.15,
            &format!("{qdisc}: the admin's port"),
        );
        assert_unshaped(goodput(c, s, &server, 5303), &format!("{qdisc}: neither's port"));

        s.imqctl_ok(&["detach", "s0"]);
        assert_eq!(qdiscs(), before, "{qdisc}: detach changed the qdiscs");
        assert_eq!(ingress_filters(s, "s0"), admin, "{qdisc}: detach changed the filters");
        assert_rate(
            goodput(c, s, &server, 5304),
            14.4,
            0.15,
            &format!("{qdisc}: the admin's port, after"),
        );
        assert_unshaped(goodput(c, s, &server, 5301), &format!("{qdisc}: imq's port, after"));
    }
}

/// Removes a directory on drop: the test's obstacle must not outlive a failure, or
/// the namespace's `imqctl flush` could not remove its state.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A step that fails after a change landed does not undo what the new rules use.
/// `apply` moves the rules from s0 to a second link s1 and a new device imq1; taking
/// s0's now unused ingress hook down fails (its pin is made a directory, where
/// imqctl cannot open a link). The apply stands: exit 0, one warning naming the
/// hook, imq1 kept, and traffic over s1 shaped by imq1's TBF. Before the fix, the
/// apply reported failure and deleted imq1, which the committed rules sent to.
///
/// Only a TCX link has a pin to spoil; on kernels without TCX the same move is
/// checked without the fault (no warning, the old filter gone, the new one shaping).
#[test]
fn a_failure_after_the_rules_changed_keeps_what_they_use() {
    require_root();
    let pair = Pair::new("aftercommit").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    c.veth("c1", s, "s1").unwrap();
    let net = pair.id % 250;
    for (ns, dev, host) in [(c, "c1", 1), (s, "s1", 2)] {
        ns.ip(&["addr", "add", &format!("198.19.{net}.{host}/24"), "dev", dev])
            .unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    let s1_addr = format!("198.19.{net}.2");
    s.imqctl_ok(&["attach", "s0", "--dev", "imq0"]);

    let tcx = kernel_has_tcx();
    let _obstacle = if tcx {
        let ifindex = s.ip(&["-j", "link", "show", "s0"]).unwrap();
        let ifindex = serde_json::from_str::<Value>(&ifindex).unwrap()[0]["ifindex"]
            .as_u64()
            .unwrap();
        let pin = s.imq_state_dir().join(format!("link_ingress_{ifindex}"));
        assert!(pin.exists(), "no TCX link pin at {}", pin.display());
        // Unpinning detaches the link; the directory is where imqctl expects it.
        std::fs::remove_file(&pin).unwrap();
        std::fs::create_dir(&pin).unwrap();
        Some(RemoveDir(pin))
    } else {
        None
    };

    let r = s.imqctl_apply("[[rule]]\ninterface = \"s1\"\ndev = \"imq1\"\n");
    eprintln!("{}", r.stderr.trim());
    assert_eq!(r.code, 0, "the apply stands: {}", r.stderr);
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("imqctl: warning: "))
        .collect();
    if tcx {
        assert_eq!(warnings.len(), 1, "one warning: {}", r.stderr);
        assert!(
            warnings[0].contains("the ingress hook of s0") && warnings[0].contains("was not removed"),
            "{}",
            r.stderr
        );
    } else {
        assert!(warnings.is_empty(), "{}", r.stderr);
        assert!(
            !ingress_filters(s, "s0").iter().any(|f| f["kind"] == "bpf"),
            "imq's filter on s0 is left behind"
        );
    }
    let status = show(s);
    let now: Vec<&str> = rules(&status)
        .iter()
        .map(|r| r["interface"].as_str().unwrap())
        .collect();
    assert_eq!(now, ["s1"], "{status}");
    assert!(
        s.ip(&["link", "show", "imq1"]).is_ok(),
        "imq1 was deleted under its rule"
    );
    tbf(s, "imq1", 10);
    assert_rate(goodput(c, s, &s1_addr, 5201), 9.6, 0.15, "s1 through imq1");
    assert_unshaped(goodput(c, s, &pair.server_v4(), 5202), "s0, no rule left");
}
