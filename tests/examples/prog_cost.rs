//! For `cargo xtask bench`: what the ingress program itself costs per packet, with
//! 1, 100, 1,000 and 10,000 rules, through BPF_PROG_TEST_RUN with many repeats (the
//! kernel times the program alone). Prints one JSON array:
//! `[{"rules": N, "ns_per_packet": X, "runs_ns": [...]}, ...]`, the last row one rule with
//! `queue dst` on a 2-queue device. Needs root.

#[allow(dead_code)]
#[path = "../tests/harness/mod.rs"]
mod harness;

use harness::{A, B, Harness, TC_ACT_REDIRECT, ipv4, ports, rule_to};
use imq::rule::Rule;

const REPEAT: u32 = 500_000;
const RUNS: usize = 5;

fn main() -> anyhow::Result<()> {
    let mut h = Harness::new();
    // n - 1 per-host rules no test packet matches, then a catch-all: the shape of the
    // bench's rule-scale case.
    let frame = ipv4(A, B, 0, 17, 0, &ports(40000, 5201));
    let mut out = Vec::new();
    for n in [1u32, 100, 1000, 10_000] {
        let mut rules: Vec<(u32, Rule)> = (0..n - 1)
            .map(|i| {
                (
                    i,
                    rule_to(i + 1, 0, &format!("dst 203.0.{}.{}/32", i / 250, i % 250 + 1)),
                )
            })
            .collect();
        rules.push((n - 1, rule_to(100_000, 0, "")));
        h.install(&rules);
        let (median, runs) = timed(&h, &frame)?;
        out.push(serde_json::json!({ "rules": n, "ns_per_packet": median, "runs_ns": runs }));
    }
    // One rule that also picks a queue of a 2-queue device by a hash of the
    // destination: what `--queue dst` adds to the 1-rule row.
    h.device_flags(0, harness::LO, 2 << imq_common::DEVICE_QUEUES_SHIFT);
    h.install(&[(0, rule_to(100_000, 0, "queue dst"))]);
    let (median, runs) = timed(&h, &frame)?;
    out.push(serde_json::json!({ "rules": 1, "queue": "dst", "ns_per_packet": median, "runs_ns": runs }));
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// RUNS timed runs of REPEAT each on `frame`, which must be selected: their median and
/// all of them, in ns per packet.
fn timed(h: &Harness, frame: &[u8]) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let (verdict, ns) = h.timed_run(frame, REPEAT)?;
        anyhow::ensure!(verdict == TC_ACT_REDIRECT, "verdict {verdict}");
        runs.push(ns);
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    Ok((sorted[RUNS / 2], runs))
}
