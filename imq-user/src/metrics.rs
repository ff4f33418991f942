//! `imqctl show --format prometheus|openmetrics` and `watch --metrics`: rule counters,
//! imq device states and the counters of the qdiscs that shape (imq devices' and
//! shapers' upload qdiscs) in the Prometheus text exposition format (0.0.4, what
//! node_exporter's textfile collector reads) or OpenMetrics 1.0 text.
//!
//! Names follow Prometheus' conventions: an `imq_` prefix, base units (bytes,
//! seconds), `_total` on counters; labels name what the admin names (`interface`,
//! `direction`, `dev`, `device`).

use std::fmt::Write as _;

use crate::{DeviceStatus, RuleStatus, ShaperStatus, Status, shaper::QdiscStats};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Text exposition format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text: counter families named without `_total`, `# EOF` last.
    OpenMetrics,
}

impl Format {
    /// The HTTP Content-Type of a scrape answer.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One metric family: its samples, each with its labels.
struct Family {
    /// Without `_total`.
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, Value)>,
}

#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: Vec<(&'static str, String)>, value: u64) {
        self.samples.push((labels, Value::Int(value)));
    }

    fn add_f(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.samples.push((labels, Value::Float(value)));
    }

    fn write(&self, out: &mut String, format: Format) {
        let sample_name = match self.kind {
            Kind::Counter => format!("{}_total", self.name),
            Kind::Gauge => self.name.to_owned(),
        };
        // 0.0.4 names the family after its samples; OpenMetrics names counters
        // without the suffix.
        let family_name = match format {
            Format::Prometheus => sample_name.as_str(),
            Format::OpenMetrics => self.name,
        };
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {family_name} {}", self.help);
        let _ = writeln!(out, "# TYPE {family_name} {kind}");
        for (labels, value) in &self.samples {
            out.push_str(&sample_name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape(v));
                }
                out.push('}');
            }
            let _ = match value {
                Value::Int(v) => writeln!(out, " {v}"),
                Value::Float(v) => writeln!(out, " {v}"),
            };
        }
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn rule_labels(r: &RuleStatus) -> Vec<(&'static str, String)> {
    vec![
        ("interface", r.interface.clone()),
        ("direction", r.direction.to_string()),
        ("prio", r.prio.to_string()),
        ("dev", r.dev.clone()),
    ]
}

/// The qdiscs that shape: every qdisc of the imq devices, and each shaper's upload
/// qdisc on its interface. `device` is the network device they sit on.
fn qdiscs(status: &Status) -> Vec<(String, &QdiscStats)> {
    let devices = status
        .devices
        .iter()
        .flat_map(|d: &DeviceStatus| d.qdiscs.iter().map(move |q| (d.name.clone(), q)));
    let uploads = status
        .shapers
        .iter()
        .filter_map(|s: &ShaperStatus| Some((s.shaper.interface.clone(), s.upload.as_ref()?)));
    devices.chain(uploads).collect()
}

/// The whole status as metrics.
pub fn render(status: &Status, format: Format) -> String {
    let mut families = Vec::new();

    let mut packets = Family::new(
        "imq_rule_packets",
        Kind::Counter,
        "Packets a rule sent to its imq device.",
    );
    let mut bytes = Family::new("imq_rule_bytes", Kind::Counter, "Bytes a rule sent to its imq device.");
    let mut attached = Family::new(
        "imq_rule_attached",
        Kind::Gauge,
        "1 if the rule's program is attached to its interface, 0 if the interface is gone.",
    );
    for r in &status.rules {
        packets.add(rule_labels(r), r.packets);
        bytes.add(rule_labels(r), r.bytes);
        attached.add(rule_labels(r), u64::from(r.attached));
    }
    families.extend([packets, bytes, attached]);

    let mut up = Family::new(
        "imq_device_up",
        Kind::Gauge,
        "1 if the imq device is up and shapes what its rules select; 0 if that traffic passes unshaped or is dropped (see state).",
    );
    let mut state = Family::new(
        "imq_device_state",
        Kind::Gauge,
        "1 for the imq device's state as imqctl show reports it (up, up-bypassed, down, down-dropping, missing, stale).",
    );
    for d in &status.devices {
        up.add(vec![("dev", d.name.clone())], u64::from(d.state == "up"));
        state.add(vec![("dev", d.name.clone()), ("state", d.state.to_owned())], 1);
    }
    families.extend([up, state]);

    let mut rate = Family::new(
        "imq_shaper_rate_bytes_per_second",
        Kind::Gauge,
        "The rate a WAN shaper shapes to, per direction.",
    );
    for s in &status.shapers {
        for (direction, r) in [("download", s.shaper.down), ("upload", s.shaper.up)] {
            if let Some(r) = r {
                let labels = vec![
                    ("interface", s.shaper.interface.clone()),
                    ("direction", direction.to_owned()),
                ];
                rate.add(labels, r.bytes_per_sec());
            }
        }
    }
    families.push(rate);

    let q = qdiscs(status);
    let qlabels = |device: &str, s: &QdiscStats| {
        vec![
            ("device", device.to_owned()),
            ("kind", s.kind.clone()),
            ("handle", s.handle.clone()),
            ("parent", s.parent.clone()),
        ]
    };
    type Field = fn(&QdiscStats) -> u64;
    let qfields: [(&'static str, Kind, &'static str, Field); 7] = [
        ("imq_qdisc_sent_bytes", Kind::Counter, "Bytes the qdisc sent.", |s| {
            s.sent_bytes
        }),
        (
            "imq_qdisc_sent_packets",
            Kind::Counter,
            "Packets the qdisc sent.",
            |s| s.sent_packets,
        ),
        ("imq_qdisc_drops", Kind::Counter, "Packets the qdisc dropped.", |s| {
            s.drops
        }),
        (
            "imq_qdisc_overlimits",
            Kind::Counter,
            "Times the qdisc held a packet back to keep to its rate.",
            |s| s.overlimits,
        ),
        (
            "imq_qdisc_requeues",
            Kind::Counter,
            "Packets the qdisc requeued.",
            |s| s.requeues,
        ),
        (
            "imq_qdisc_backlog_bytes",
            Kind::Gauge,
            "Bytes queued in the qdisc.",
            |s| s.backlog_bytes,
        ),
        (
            "imq_qdisc_backlog_packets",
            Kind::Gauge,
            "Packets queued in the qdisc.",
            |s| s.backlog_packets,
        ),
    ];
    for (name, kind, help, field) in qfields {
        let mut f = Family::new(name, kind, help);
        for (device, s) in &q {
            f.add(qlabels(device, s), field(s));
        }
        families.push(f);
    }

    // cake's tins: where its latency goes.
    type TinField = fn(&crate::shaper::CakeTin) -> u64;
    let tin_counts: [(&'static str, Kind, &'static str, TinField); 5] = [
        (
            "imq_cake_tin_sent_bytes",
            Kind::Counter,
            "Bytes a cake tin sent.",
            |t| t.sent_bytes,
        ),
        (
            "imq_cake_tin_dropped_packets",
            Kind::Counter,
            "Packets a cake tin dropped.",
            |t| t.dropped_packets,
        ),
        (
            "imq_cake_tin_ecn_marked_packets",
            Kind::Counter,
            "Packets a cake tin marked ECN CE instead of dropping them.",
            |t| t.ecn_marked_packets,
        ),
        (
            "imq_cake_tin_ack_dropped_packets",
            Kind::Counter,
            "ACKs a cake tin's ACK filter dropped.",
            |t| t.ack_dropped_packets,
        ),
        (
            "imq_cake_tin_backlog_bytes",
            Kind::Gauge,
            "Bytes queued in a cake tin.",
            |t| t.backlog_bytes,
        ),
    ];
    let tins: Vec<(Vec<(&'static str, String)>, &crate::shaper::CakeTin)> = q
        .iter()
        .filter_map(|(device, s)| Some((device, s.cake.as_ref()?)))
        .flat_map(|(device, c)| {
            c.tins
                .iter()
                .enumerate()
                .map(move |(i, t)| (vec![("device", device.clone()), ("tin", i.to_string())], t))
        })
        .collect();
    for (name, kind, help, field) in tin_counts {
        let mut f = Family::new(name, kind, help);
        for (labels, t) in &tins {
            f.add(labels.clone(), field(t));
        }
        families.push(f);
    }
    type Delay = fn(&crate::shaper::CakeTin) -> u64;
    let delays: [(&'static str, &'static str, Delay); 3] = [
        (
            "imq_cake_tin_peak_delay_seconds",
            "Peak queueing delay in a cake tin.",
            |t| t.peak_delay_us,
        ),
        (
            "imq_cake_tin_average_delay_seconds",
            "Average queueing delay in a cake tin.",
            |t| t.avg_delay_us,
        ),
        (
            "imq_cake_tin_base_delay_seconds",
            "Base (lowest) queueing delay in a cake tin.",
            |t| t.base_delay_us,
        ),
    ];
    for (name, help, field) in delays {
        let mut f = Family::new(name, Kind::Gauge, help);
        for (labels, t) in &tins {
            f.add_f(labels.clone(), field(t) as f64 / 1e6);
        }
        families.push(f);
    }

    let mut out = String::new();
    for f in &families {
        f.write(&mut out, format);
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn counters_are_named_per_format() {
        let status = Status {
            rules: vec![RuleStatus {
                interface: "eth0".into(),
                ifindex: 2,
                direction: crate::rule::Direction::Ingress,
                prio: 10,
                dev: "imq0".into(),
                matches: Default::default(),
                actions: Default::default(),
                attached: true,
                hook: "tcx",
                packets: 5,
                bytes: 300,
            }],
            ..Default::default()
        };
        let prom = render(&status, Format::Prometheus);
        assert!(prom.contains("# TYPE imq_rule_packets_total counter\n"), "{prom}");
        assert!(
            prom.contains(
                "imq_rule_packets_total{interface=\"eth0\",direction=\"ingress\",prio=\"10\",dev=\"imq0\"} 5\n"
            ),
            "{prom}"
        );
        assert!(!prom.contains("# EOF"));
        let om = render(&status, Format::OpenMetrics);
        assert!(om.contains("# TYPE imq_rule_packets counter\n"), "{om}");
        assert!(om.contains("imq_rule_bytes_total{"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
