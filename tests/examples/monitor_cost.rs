//! For `cargo xtask bench`: what `imqctl monitor` costs the ingress program per packet,
//! through BPF_PROG_TEST_RUN on one 64-byte IPv4 UDP frame that a catch-all rule
//! selects. Cases: no monitor (the data path's only cost is reading one flag); a
//! monitor that watches another interface (its filters run); one whose rate limit
//! holds every event back; one that reports every packet into the ring buffer a reader
//! drains, without and with 64 bytes of the packet. Prints one JSON array:
//! `[{"case": "...", "ns_per_packet": X, "min_ns": X, "max_ns": X, "events": N}, ...]`.
//! Needs root.

#[allow(dead_code)]
#[path = "../tests/harness/mod.rs"]
mod harness;

use aya::maps::{Array, Map};
use harness::{A, B, Harness, TC_ACT_REDIRECT, ipv4, ports, rule_to};
use imq_common::{EVENTS_MAP, MONITOR_IFINDEX, MONITOR_MAP, MONITOR_SELECTED, MonitorConfig};

/// Runs per measurement: few enough that the events of one fit the ring buffer (so
/// none is refused for want of room, which would be cheaper than a real report).
const REPEAT: u32 = 2_000;
const RUNS: usize = 201;

fn main() -> anyhow::Result<()> {
    let mut h = Harness::new();
    h.install(&[(0, rule_to(10, 0, ""))]);
    let frame = ipv4(A, B, 0, 17, 0, &ports(40000, 5201));
    let cases: [(&str, MonitorConfig); 5] = [
        ("no monitor", MonitorConfig::default()),
        (
            "monitor on another interface",
            MonitorConfig {
                flags: MONITOR_SELECTED | MONITOR_IFINDEX,
                ifindex: 999_999,
                rate: u32::MAX,
                ..MonitorConfig::default()
            },
        ),
        (
            "monitor, every event over --rate",
            MonitorConfig {
                flags: MONITOR_SELECTED,
                rate: 1,
                ..MonitorConfig::default()
            },
        ),
        (
            "monitor, every packet reported",
            MonitorConfig {
                flags: MONITOR_SELECTED,
                rate: u32::MAX,
                ..MonitorConfig::default()
            },
        ),
        (
            "monitor, every packet reported with 64 bytes (-w)",
            MonitorConfig {
                flags: MONITOR_SELECTED,
                rate: u32::MAX,
                snaplen: 64,
                ..MonitorConfig::default()
            },
        ),
    ];
    let Some(Map::ArrayOfMaps(slot)) = h.ebpf.take_map(EVENTS_MAP) else {
        anyhow::bail!("{EVENTS_MAP} is not a map-of-maps");
    };
    let mut ring = imq::monitor::open_event_ring(&slot)?;
    let mut out = Vec::new();
    for (case, cfg) in cases {
        Array::<_, MonitorConfig>::try_from(h.ebpf.map_mut(MONITOR_MAP).unwrap())?.set(0, cfg, 0)?;
        let mut runs = Vec::new();
        let mut reported = 0u64;
        for _ in 0..RUNS {
            let (verdict, ns) = h.timed_run(&frame, REPEAT)?;
            anyhow::ensure!(verdict == TC_ACT_REDIRECT, "verdict {verdict}");
            runs.push(ns);
            while ring.next().is_some() {
                reported += 1;
            }
        }
        let expected = if cfg.flags != 0 && cfg.rate == u32::MAX && cfg.ifindex == 0 {
            u64::from(REPEAT) * RUNS as u64
        } else {
            0
        };
        // The rate-limited case lets its first bucketful through.
        anyhow::ensure!(
            reported == expected || (cfg.rate == 1 && reported <= RUNS as u64 + 1),
            "{case}: {reported} events, expected {expected}"
        );
        let mut sorted = runs;
        sorted.sort_by(f64::total_cmp);
        out.push(serde_json::json!({
            "case": case,
            "ns_per_packet": sorted[RUNS / 2],
            "min_ns": sorted[0],
            "max_ns": sorted[RUNS - 1],
            "events": reported,
        }));
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
