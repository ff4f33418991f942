//! Human output of `imqctl show`, terse like iproute2:
//!
//! ```text
//! dev imq0 ifindex 7 up txqueuelen 1000
//! ingress eth0 prio 10 mark 0x10/0xff dev imq0 packets 1432 bytes 2071228 hook tcx
//! egress eth0 prio 20 proto udp dport 5060 dev imq0 classid 1:10 packets 12 bytes 2400 hook clsact
//! ```

use std::fmt::Write as _;

use imq::Status;

pub fn render(status: &Status) -> String {
    let mut out = String::new();
    if status.devices.is_empty() && status.rules.is_empty() {
        out.push_str("no imq devices or rules in this network namespace\n");
        return out;
    }
    for d in &status.devices {
        if d.state == "missing" {
            let _ = writeln!(out, "dev {} missing (its traffic passes unshaped)", d.name);
        } else if d.state == "stale" {
            let _ = writeln!(
                out,
                "dev {} ifindex {} re-created outside imqctl: its traffic passes unshaped until `imqctl dev add {}`",
                d.name, d.ifindex, d.name
            );
        } else if d.state == "down-dropping" {
            let _ = writeln!(
                out,
                "dev {} ifindex {} down, and its traffic is DROPPED: `ip link set {} up`, or `imqctl dev add {}` to pass it unshaped",
                d.name, d.ifindex, d.name, d.name
            );
        } else if d.state == "down" {
            let _ = writeln!(
                out,
                "dev {} ifindex {} down (its traffic passes unshaped)",
                d.name, d.ifindex
            );
        } else {
            let _ = writeln!(
                out,
                "dev {} ifindex {} {} txqueuelen {}",
                d.name, d.ifindex, d.state, d.txqueuelen
            );
        }
    }
    for r in &status.rules {
        let _ = write!(out, "{} {} prio {}", r.direction, r.interface, r.prio);
        let _ = write!(out, " {} dev {}", r.matches, r.dev);
        if let Some(m) = r.actions.set_mark {
            let _ = write!(out, " set-mark {m}");
        }
        if let Some(c) = r.actions.classid {
            let _ = write!(out, " classid {c}");
        }
        let _ = write!(out, " packets {} bytes {}", r.packets, r.bytes);
        if r.attached {
            let _ = write!(out, " hook {}", r.hook);
        } else {
            out.push_str(" (not attached)");
        }
        out.push('\n');
    }
    out
}
