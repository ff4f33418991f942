//! What the integration tests measure and assert, shared by all of them.

use std::net::SocketAddr;

use serde_json::Value;

use crate::{Goodput, Load, NetNs, Pair, tcp_goodput};

/// Unshaped: five times the highest rate any test shapes to (40 Mbit/s), so nothing
/// shaped can pass for it. Unshaped veth TCP is 15-20 Gbit/s on this machine's kernel
/// and 0.5-1.5 Gbit/s in the emulated VMs of `cargo xtask vm-test` (one receiver with
/// a 96 KB window, [`Load::default`]): an absolute multi-gigabit floor would only
/// measure the machine.
pub const UNSHAPED_FLOOR_MBIT: f64 = 200.0;

/// One measured TCP stream from `client` to `dst:port` (IPv4 or IPv6) on `server`.
pub fn goodput(client: &NetNs, server: &NetNs, dst: &str, port: u16) -> Goodput {
    let addr: SocketAddr = if dst.contains(':') {
        format!("[{dst}]:{port}")
    } else {
        format!("{dst}:{port}")
    }
    .parse()
    .expect("address");
    tcp_goodput(client, server, addr, Load::default()).expect("traffic")
}

/// A TBF of `mbit` as the root qdisc of `dev`.
pub fn tbf(ns: &NetNs, dev: &str, mbit: u32) {
    let rate = format!("{mbit}mbit");
    ns.tc(&[
        "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", "32kb", "latency", "100ms",
    ])
    .expect("tbf");
}

pub fn assert_between(g: Goodput, lo: f64, hi: f64, what: &str) {
    eprintln!("{what}: {g}");
    let m = g.mbit_per_s();
    assert!(
        (lo..=hi).contains(&m),
        "{what}: expected {lo:.1}-{hi:.1} Mbit/s, measured {g}"
    );
}

/// Within `tolerance` (a fraction) of `mbit`.
pub fn assert_rate(g: Goodput, mbit: f64, tolerance: f64, what: &str) {
    assert_between(g, mbit * (1.0 - tolerance), mbit * (1.0 + tolerance), what);
}

/// TCP from a pair's client to its server (IPv4, port 5201) runs at `mbit` ±15%.
pub fn assert_pair_rate(pair: &Pair, mbit: f64, what: &str) {
    assert_rate(
        goodput(&pair.client, &pair.server, &pair.server_v4(), 5201),
        mbit,
        0.15,
        what,
    );
}

/// TCP from a pair's client to its server (IPv4, port 5201) is not shaped.
pub fn assert_pair_unshaped(pair: &Pair, what: &str) {
    assert_unshaped(goodput(&pair.client, &pair.server, &pair.server_v4(), 5201), what);
}

pub fn assert_unshaped(g: Goodput, what: &str) {
    eprintln!("{what}: {g}");
    assert!(
        g.mbit_per_s() > UNSHAPED_FLOOR_MBIT,
        "{what}: expected unshaped (> {UNSHAPED_FLOOR_MBIT} Mbit/s), measured {g}"
    );
}

/// `imqctl show -j` in the namespace.
pub fn show(ns: &NetNs) -> Value {
    serde_json::from_str(&ns.imqctl_ok(&["show", "-j"])).expect("show -j is JSON")
}

/// `imqctl show -j` without the per-rule and per-qdisc counters: the configuration alone. Counters
/// move on their own (an MLD report or router solicitation a peer sends after link-up
/// is selected like any other packet), so "changed nothing" compares this.
pub fn config(ns: &NetNs) -> Value {
    let mut status = show(ns);
    for rule in status["rules"].as_array_mut().unwrap() {
        let rule = rule.as_object_mut().unwrap();
        rule.remove("packets");
        rule.remove("bytes");
    }
    // The qdiscs' counters move with those packets too; their kinds and handles stay.
    let keep = |q: &mut Value| {
        if let Some(q) = q.as_object_mut() {
            q.retain(|k, _| matches!(k.as_str(), "kind" | "handle" | "parent"));
        }
    };
    for d in status["devices"].as_array_mut().unwrap() {
        d["qdiscs"].as_array_mut().unwrap().iter_mut().for_each(keep);
    }
    for s in status["shapers"].as_array_mut().unwrap() {
        if let Some(upload) = s.get_mut("upload") {
            keep(upload);
        }
    }
    status
}

/// (packets, bytes) the device received, from its own counters. ifb counts in
/// ifb_xmit, after the root qdisc: compare with imq's counters only through a qdisc
/// that neither drops nor segments.
pub fn dev_rx(ns: &NetNs, dev: &str) -> (u64, u64) {
    let v: Value = serde_json::from_str(&ns.ip(&["-s", "-j", "link", "show", dev]).unwrap()).unwrap();
    let rx = &v[0]["stats64"]["rx"];
    (rx["packets"].as_u64().unwrap(), rx["bytes"].as_u64().unwrap())
}

/// `imqctl show -j` and the (packets, bytes) each of `devs` received, read while
/// nothing moved: a packet of the namespace's own (an IPv6 router solicitation or MLD
/// report, say) would make exact counts differ, whether it lands between the reads or
/// was counted by its rule and is still on its way through the device's qdisc. At rest
/// means: the devices' counts and the rules' counters are the same in two readings
/// 50 ms apart (time for a packet in flight to reach the device). Tries a few times;
/// returns the last reading if they never rest.
pub fn show_at_rest(ns: &NetNs, devs: &[&str]) -> (Value, Vec<(u64, u64)>) {
    let read = || (devs.iter().map(|d| dev_rx(ns, d)).collect::<Vec<_>>(), show(ns));
    let mut last = read();
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = read();
        if now.0 == last.0 && rule_counters(&now.1) == rule_counters(&last.1) {
            return (now.1, now.0);
        }
        last = now;
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    (last.1, last.0)
}

/// (packets, bytes) counted by all rules of a `show -j` status.
pub fn rule_counters(status: &Value) -> (u64, u64) {
    status["rules"].as_array().unwrap().iter().fold((0, 0), |(p, b), r| {
        (p + r["packets"].as_u64().unwrap(), b + r["bytes"].as_u64().unwrap())
    })
}

/// A device's state in a `show -j` status, or "absent".
pub fn device_state(status: &Value, dev: &str) -> String {
    status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == dev)
        .map_or_else(|| "absent".into(), |d| d["state"].as_str().unwrap().to_owned())
}

/// The namespace's devices and whether each is administratively up: what imqctl could
/// change (operational state, e.g. carrier, settles on its own and is left out).
pub fn links(ns: &NetNs) -> Vec<(String, bool)> {
    let v: Value = serde_json::from_str(&ns.ip(&["-j", "link", "show"]).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let up = l["flags"].as_array().unwrap().iter().any(|f| f == "UP");
            (l["ifname"].as_str().unwrap().to_owned(), up)
        })
        .collect()
}
