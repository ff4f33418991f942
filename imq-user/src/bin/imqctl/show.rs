//! Human output of `imqctl show`, terse like iproute2:
//!
//! ```text
//! dev imq0 ifindex 7 up txqueuelen 1000
//! ingress eth0 prio 10 mark 0x10/0xff dev imq0 packets 1432 bytes 2071228 hook tcx
//! egress eth0 prio 20 proto udp dport 5060 dev imq0 classid 1:10 packets 12 bytes 2400 hook clsact
//! ```
//!
//! Each device's qdiscs follow it, indented, with their counters (and cake's tins
//! that carried traffic); shapers come last.

use std::fmt::Write as _;

use imq::{
    Status,
    shaper::{Diffserv, LinkLayer, QdiscStats, Shaper},
};

/// A shaper in one line, in the words of `imqctl shape`.
pub fn shaper_line(s: &Shaper) -> String {
    let mut out = s.interface.clone();
    if let Some(r) = s.down {
        let _ = write!(out, " down {r}");
        if let Some(d) = s.dev {
            let _ = write!(out, " dev {d}");
        }
    }
    if let Some(r) = s.up {
        let _ = write!(out, " up {r}");
    }
    let _ = write!(out, " qdisc {}", s.qdisc);
    if let Some(o) = s.overhead {
        let _ = write!(out, " overhead {o}");
    }
    if let Some(m) = s.mpu {
        let _ = write!(out, " mpu {m}");
    }
    if s.link_layer != LinkLayer::default() {
        let _ = write!(out, " link-layer {}", s.link_layer);
    }
    if s.diffserv != Diffserv::default() {
        let _ = write!(out, " diffserv {}", s.diffserv);
    }
    for (flag, on) in [("nat", s.nat), ("wash", s.wash), ("ack-filter", s.ack_filter)] {
        if on {
            let _ = write!(out, " {flag}");
        }
    }
    out
}

fn ms(us: u64) -> String {
    format!("{}.{}ms", us / 1000, us % 1000 / 100)
}

fn qdisc_lines(out: &mut String, indent: &str, q: &QdiscStats) {
    let _ = writeln!(
        out,
        "{indent}qdisc {} {} {} sent {} bytes {} pkts dropped {} overlimits {} requeues {} backlog {}b {}p",
        q.kind,
        q.handle,
        if q.parent == "root" {
            "root".to_owned()
        } else {
            format!("parent {}", q.parent)
        },
        q.sent_bytes,
        q.sent_packets,
        q.drops,
        q.overlimits,
        q.requeues,
        q.backlog_bytes,
        q.backlog_packets
    );
    if let Some(cake) = &q.cake {
        for (i, t) in cake.tins.iter().enumerate() {
            if t.sent_packets == 0 && t.dropped_packets == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "{indent}  tin {i} thresh {}bit sent {} pkts drops {} marks {} ack-drops {} delay avg {} peak {} base {} flows sparse {} bulk {}",
                t.threshold_bps,
                t.sent_packets,
                t.dropped_packets,
                t.ecn_marked_packets,
                t.ack_dropped_packets,
                ms(t.avg_delay_us),
                ms(t.peak_delay_us),
                ms(t.base_delay_us),
                t.sparse_flows,
                t.bulk_flows
            );
        }
    }
}

pub fn render(status: &Status) -> String {
    let mut out = String::new();
    if status.devices.is_empty() && status.rules.is_empty() && status.shapers.is_empty() {
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
        } else if d.state == "up-bypassed" {
            let _ = writeln!(
                out,
                "dev {} ifindex {} up, but imq does not send to it (its traffic passes unshaped): `imqctl dev add {}`",
                d.name, d.ifindex, d.name
            );
        } else if d.state == "down" {
            let _ = writeln!(
                out,
                "dev {} ifindex {} down (its traffic passes unshaped)",
                d.name, d.ifindex
            );
        } else {
            let _ = write!(
                out,
                "dev {} ifindex {} {} txqueuelen {}",
                d.name, d.ifindex, d.state, d.txqueuelen
            );
            if d.queues > 1 {
                let _ = write!(out, " queues {}", d.queues);
            }
            out.push('\n');
        }
        for q in &d.qdiscs {
            qdisc_lines(&mut out, "  ", q);
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
        if let Some(q) = r.actions.queue {
            let _ = write!(out, " queue {q}");
        }
        let _ = write!(out, " packets {} bytes {}", r.packets, r.bytes);
        if r.attached {
            let _ = write!(out, " hook {}", r.hook);
        } else {
            out.push_str(" (not attached)");
        }
        out.push('\n');
    }
    for s in &status.shapers {
        let _ = writeln!(out, "shaper {}", shaper_line(&s.shaper));
        if let Some(q) = &s.upload {
            qdisc_lines(&mut out, "  upload ", q);
        }
    }
    out
}
