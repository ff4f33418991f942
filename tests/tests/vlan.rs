//! What imq does with 802.1Q VLANs, as the README says: the kernel takes a VLAN tag
//! off a received frame before TC ingress runs (and, where the device offloads VLAN
//! transmit, as veth and most NICs do, keeps it out of the frame at TC egress too). A
//! rule on a trunk's parent device therefore takes the traffic of every VLAN on it;
//! a rule on a VLAN device (`s0.10`) takes that VLAN's alone.

use imq_tests::{
    NetNs, Pair,
    check::{assert_rate, assert_unshaped, goodput, tbf},
    require_root,
};

/// VLAN 10 over the pair's veth: `c0.10` 198.19.N.1 — `s0.10` 198.19.N.2. Returns the
/// server's VLAN address.
fn vlan10(pair: &Pair) -> String {
    let net = pair.id % 250;
    let both: [(&NetNs, &str, u8); 2] = [(&pair.client, "c0", 1), (&pair.server, "s0", 2)];
    for (ns, parent, host) in both {
        let dev = format!("{parent}.10");
        ns.ip(&["link", "add", "link", parent, "name", &dev, "type", "vlan", "id", "10"])
            .unwrap();
        ns.ip(&["addr", "add", &format!("198.19.{net}.{host}/24"), "dev", &dev])
            .unwrap();
        ns.ip(&["link", "set", &dev, "up"]).unwrap();
    }
    format!("198.19.{net}.2")
}

#[test]
#[ignore = "needs VLAN devices (8021q), which this machine's kernel lacks: `cargo xtask vm-test` runs it"]
fn a_rule_on_a_trunk_takes_every_vlan_and_one_on_a_vlan_device_only_its_own() {
    require_root();
    let pair = Pair::new("vlan").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    let tagged = vlan10(&pair);
    let untagged = pair.server_v4();

    // Ingress on the parent: untagged and VLAN 10 traffic alike.
    s.imqctl_ok(&["attach", "s0"]);
    tbf(s, "imq0", 10);
    assert_rate(goodput(c, s, &untagged, 5201), 9.6, 0.15, "ingress on s0, untagged");
    assert_rate(goodput(c, s, &tagged, 5202), 9.6, 0.15, "ingress on s0, VLAN 10");
    s.imqctl_ok(&["detach", "s0"]);

    // Ingress on the VLAN device: VLAN 10 only.
    s.imqctl_ok(&["attach", "s0.10"]);
    assert_rate(goodput(c, s, &tagged, 5203), 9.6, 0.15, "ingress on s0.10, VLAN 10");
    assert_unshaped(goodput(c, s, &untagged, 5204), "ingress on s0.10, untagged");
    s.imqctl_ok(&["detach", "s0.10"]);

    // Egress on the parent (veth offloads the tag): VLAN 10 traffic leaving c0 too.
    c.imqctl_ok(&["attach", "c0", "--direction", "egress"]);
    tbf(c, "imq0", 10);
    assert_rate(goodput(c, s, &tagged, 5205), 9.6, 0.15, "egress on c0, VLAN 10");
}
