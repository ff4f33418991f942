//! `imqctl show --format prometheus|openmetrics`: parsed by a Prometheus text parser
//! (the prometheus-parse crate) and checked against what the kernel counted for
//! packets the test sent.

use std::collections::BTreeMap;

use imq_tests::{
    NetNs, Pair,
    check::{show_at_rest, tbf},
    ping, require_root,
};
use prometheus_parse::{Scrape, Value};

/// Parses an exposition; every sample line must become a sample (the parser skips
/// lines it cannot read, which would hide a malformed one).
pub fn parse(text: &str) -> Scrape {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parse");
    let sample_lines = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
    assert_eq!(scrape.samples.len(), sample_lines, "a line was not understood:\n{text}");
    scrape
}

/// The value of the one sample of `metric` whose labels include `labels`.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Value {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
    found[0].value.clone()
}

/// (packets, bytes) sent by `dev`'s root qdisc, from tc.
fn tc_root_sent(ns: &NetNs, dev: &str) -> (f64, f64) {
    let out = ns.tc(&["-s", "-j", "qdisc", "show", "dev", dev, "root"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (v[0]["packets"].as_f64().unwrap(), v[0]["bytes"].as_f64().unwrap())
}

#[test]
fn prometheus_and_openmetrics_output_carry_the_kernels_counters() {
    require_root();
    let pair = Pair::new("prom").unwrap();
    let s = &pair.server;
    s.imqctl_ok(&["attach", "s0", "--proto", "icmp"]);
    tbf(s, "imq0", 10);
    assert_eq!(ping(&pair.client, &pair.server_v4(), 25), 25);
    let (status, _) = show_at_rest(s, &["imq0"]);
    let text = s.imqctl_ok(&["show", "--format", "prometheus"]);
    let scrape = parse(&text);

    let rule = [("interface", "s0"), ("direction", "ingress"), ("dev", "imq0")];
    let packets = status["rules"][0]["packets"].as_f64().unwrap();
    let bytes = status["rules"][0]["bytes"].as_f64().unwrap();
    assert!(packets >= 25.0, "{status}");
    assert_eq!(value(&scrape, "imq_rule_packets_total", &rule), Value::Counter(packets));
    assert_eq!(value(&scrape, "imq_rule_bytes_total", &rule), Value::Counter(bytes));
    assert_eq!(value(&scrape, "imq_rule_attached", &rule), Value::Gauge(1.0));
    assert_eq!(value(&scrape, "imq_device_up", &[("dev", "imq0")]), Value::Gauge(1.0));
    assert_eq!(
        value(&scrape, "imq_device_state", &[("dev", "imq0"), ("state", "up")]),
        Value::Gauge(1.0)
    );
    // The imq device's qdisc, as tc reads it.
    let (tc_packets, tc_bytes) = tc_root_sent(s, "imq0");
    let tbf_root = [("device", "imq0"), ("kind", "tbf"), ("parent", "root")];
    assert!(tc_packets >= 25.0);
    assert_eq!(
        value(&scrape, "imq_qdisc_sent_packets_total", &tbf_root),
        Value::Counter(tc_packets)
    );
    assert_eq!(
        value(&scrape, "imq_qdisc_sent_bytes_total", &tbf_root),
        Value::Counter(tc_bytes)
    );
    assert_eq!(value(&scrape, "imq_qdisc_drops_total", &tbf_root), Value::Counter(0.0));
    assert_eq!(
        value(&scrape, "imq_qdisc_backlog_packets", &tbf_root),
        Value::Gauge(0.0)
    );
    // Every family has its help and type.
    for name in ["imq_rule_packets_total", "imq_qdisc_sent_bytes_total", "imq_device_up"] {
        assert!(scrape.docs.contains_key(name), "no HELP for {name}");
    }

    // OpenMetrics: the same samples; counter families named without `_total`; `# EOF`.
    let om = s.imqctl_ok(&["show", "--format", "openmetrics"]);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE imq_rule_packets counter\n"), "{om}");
    assert!(!om.contains("# TYPE imq_rule_packets_total"), "{om}");
    let samples = |s: &Scrape| -> BTreeMap<String, f64> {
        s.samples
            .iter()
            .filter(|x| !x.metric.starts_with("imq_rule_") || x.metric == "imq_rule_attached")
            .map(|x| {
                let mut labels: Vec<String> = x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                let v = match x.value {
                    Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                    _ => panic!("{x:?}"),
                };
                (format!("{}{labels:?}", x.metric), v)
            })
            .collect()
    };
    let om_scrape = parse(&om);
    assert_eq!(om_scrape.samples.len(), scrape.samples.len());
    // Rule counters may have moved (an IPv6 router solicitation); the rest are the
    // qdisc's and devices' at rest.
    assert_eq!(samples(&om_scrape), samples(&scrape));
}
