//! Section 9 of `cargo xtask bench`: multi-queue imq devices. Two TCP flows shaped
//! by HTB into one imq device with one TX queue, with two (mq, one HTB per queue),
//! and into a classic single-queue ifb; then per-subscriber accuracy with many
//! subscribers over one queue and over two.

use std::{fmt::Write as _, fs, net::SocketAddr};

use anyhow::{Context as _, Result};
use imq_tests::{Load, NetNs, Pair, concurrent_tcp_goodput};
use serde_json::{Value, json};

use crate::bench::{GOODPUT_PER_WIRE, RUNS, median, progress, tcp_load};

/// How the server's ingress reaches its shaper.
#[derive(Clone, Copy)]
enum Setup {
    /// ifb0, one queue, u32 + mirred on s0, u32 filters on ifb0 into HTB classes.
    Classic,
    /// imq0 with one queue: one HTB, rules choosing its classes.
    OneQueue,
    /// imq0 with two queues: mq, an HTB per queue, rules choosing queue and class.
    TwoQueues,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Self::Classic => "classic ifb (1 queue, u32 + mirred)",
            Self::OneQueue => "imq, 1 queue",
            Self::TwoQueues => "imq, 2 queues (mq, HTB per queue)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::OneQueue => "imq_1q",
            Self::TwoQueues => "imq_2q",
        }
    }

    /// A pair whose server shapes what arrives on s0: flow (or subscriber) `k`, sent
    /// to `dst(k)`, in its own HTB class of `rate`, and on queue `k % 2 + 1` with two.
    fn pair(self, tag: &str, flows: usize, rate: &str, by_dst: bool) -> Result<Pair> {
        let pair = Pair::new(tag)?;
        let s = &pair.server;
        let net = pair.id % 250;
        let dev = match self {
            Self::Classic => "ifb0",
            _ => "imq0",
        };
        let mut tc = String::new();
        match self {
            Self::Classic => {
                s.ip(&["link", "add", "ifb0", "txqueuelen", "1000", "type", "ifb"])?;
                s.ip(&["link", "set", "ifb0", "up"])?;
                s.tc(&["qdisc", "add", "dev", "s0", "clsact"])?;
                s.tc(&[
                    "filter", "add", "dev", "s0", "ingress", "protocol", "ip", "u32", "match", "u32", "0", "0",
                    "action", "mirred", "egress", "redirect", "dev", "ifb0",
                ])?;
                let _ = writeln!(tc, "qdisc add dev ifb0 root handle 1: htb");
            }
            Self::OneQueue => {
                s.imqctl_ok(&["dev", "add", "imq0"]);
                let _ = writeln!(tc, "qdisc add dev imq0 root handle 1: htb");
            }
            Self::TwoQueues => {
                s.imqctl_ok(&["dev", "add", "imq0", "--queues", "2"]);
                let _ = writeln!(tc, "qdisc replace dev imq0 root handle 100: mq");
                for q in 1..=2 {
                    let _ = writeln!(tc, "qdisc add dev imq0 parent 100:{q} handle {q}: htb");
                }
            }
        }
        let mut rules = String::new();
        for k in 0..flows {
            let major = match self {
                Self::TwoQueues => k % 2 + 1,
                _ => 1,
            };
            let minor = 0x10 + k;
            let _ = writeln!(
                tc,
                "class add dev {dev} parent {major}: classid {major}:{minor:x} htb rate {rate} ceil {rate}"
            );
            let (field, value) = if by_dst {
                let addr = format!("198.18.{net}.{}", 10 + k);
                s.ip(&["addr", "add", &format!("{addr}/32"), "dev", "s0"])?;
                ("dst", addr)
            } else {
                ("dport", (5201 + k).to_string())
            };
            match self {
                Self::Classic => {
                    let m = if by_dst {
                        format!("ip dst {value}/32")
                    } else {
                        format!("ip dport {value} 0xffff")
                    };
                    let _ = writeln!(
                        tc,
                        "filter add dev ifb0 parent 1: protocol ip u32 match {m} flowid 1:{minor:x}"
                    );
                }
                _ => {
                    let _ = write!(
                        rules,
                        "[[rule]]\ninterface = \"s0\"\n{field} = \"{value}\"\nclassid = \"{major}:{minor:x}\"\n"
                    );
                    if !by_dst {
                        rules.push_str("proto = \"tcp\"\n");
                    }
                    if matches!(self, Self::TwoQueues) {
                        let _ = writeln!(rules, "queue = \"{major}\"");
                    }
                    rules.push('\n');
                }
            }
        }
        let path = std::env::temp_dir().join(format!("imq-bench-{}-{tag}.tc", std::process::id()));
        fs::write(&path, &tc)?;
        let res = s.exec("tc", &["-batch", path.to_str().context("utf-8 path")?]);
        let _ = fs::remove_file(&path);
        res?;
        if !rules.is_empty() {
            let r = s.imqctl_apply(&rules);
            anyhow::ensure!(r.code == 0, "apply: {}", r.stderr.trim());
        }
        Ok(pair)
    }
}

/// Busy, softirq and total jiffies of all CPUs (/proc/stat: user nice system idle
/// iowait irq softirq steal).
fn cpu_jiffies() -> Result<[u64; 3]> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|w| w.parse().ok()).collect();
    let field = |i: usize| v.get(i).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Ok([total - field(3) - field(4), field(6), total])
}

/// What the CPUs did during a measurement: shares of all cores' time.
struct Cpu {
    busy: f64,
    /// In softirq, where the packet path, imq and the qdiscs run.
    softirq: f64,
}

/// `flows` concurrent TCP streams from the pair's client to the server, flow k to
/// `dst(k)`; their goodputs and what the CPUs did meanwhile.
fn run_flows(pair: &Pair, flows: usize, by_dst: bool, load: Load) -> Result<(Vec<f64>, Cpu)> {
    let net = pair.id % 250;
    let clients: Vec<NetNs> = (0..flows).map(|_| NetNs::adopt(pair.client.name())).collect();
    let server = pair.server_v4();
    let addr = |k: usize| -> SocketAddr {
        if by_dst {
            format!("198.18.{net}.{}:5201", 10 + k)
        } else {
            format!("{server}:{}", 5201 + k)
        }
        .parse()
        .expect("address")
    };
    let before = cpu_jiffies()?;
    let g = concurrent_tcp_goodput(&clients, &pair.server, addr, load)?;
    let after = cpu_jiffies()?;
    let share = |i: usize| (after[i] - before[i]) as f64 / (after[2] - before[2]).max(1) as f64;
    let cpu = Cpu {
        busy: share(0),
        softirq: share(1),
    };
    Ok((g.iter().map(|g| g.mbit_per_s()).collect(), cpu))
}

/// Per-subscriber rate of the accuracy part, Mbit/s.
const SUBSCRIBER_MBIT: f64 = 40.0;
const SUBSCRIBERS: usize = 8;

/// Measures section 9 into a JSON value.
pub fn measure() -> Result<Value> {
    let setups = [Setup::Classic, Setup::OneQueue, Setup::TwoQueues];
    // Throughput: two flows, each in an HTB class far above what the machine moves,
    // so that the CPUs, not the rate, are the limit.
    let pairs: Vec<Pair> = setups
        .iter()
        .enumerate()
        .map(|(i, s)| s.pair(&format!("q{i}"), 2, "20gbit", false))
        .collect::<Result<_>>()?;
    let unlimited = Load {
        rcvbuf: None,
        ..tcp_load()
    };
    let mut sums = vec![Vec::new(); setups.len()];
    let mut busy = vec![Vec::new(); setups.len()];
    let mut softirq = vec![Vec::new(); setups.len()];
    for run in 0..RUNS {
        for (i, (s, pair)) in setups.iter().zip(&pairs).enumerate() {
            progress(&format!("multi-queue throughput, run {}/{RUNS}: {}", run + 1, s.name()))?;
            let (g, cpu) = run_flows(pair, 2, false, unlimited)?;
            sums[i].push(g.iter().sum::<f64>());
            busy[i].push(cpu.busy);
            softirq[i].push(cpu.softirq);
        }
    }
    drop(pairs);
    let throughput: Vec<Value> = setups
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (mbit, cpu) = (median(sums[i].clone()), median(busy[i].clone()));
            json!({ "setup": s.key(), "name": s.name(), "mbit": mbit, "cpu_busy": cpu, "cpu_softirq": median(softirq[i].clone()), "mbit_per_cpu": mbit / (cpu * crate::bench::cores() as f64) })
        })
        .collect();

    // Accuracy: SUBSCRIBERS subscribers at SUBSCRIBER_MBIT each, all at once.
    let rate = format!("{SUBSCRIBER_MBIT}mbit");
    let acc_setups = [Setup::Classic, Setup::OneQueue, Setup::TwoQueues];
    let pairs: Vec<Pair> = acc_setups
        .iter()
        .enumerate()
        .map(|(i, s)| s.pair(&format!("qa{i}"), SUBSCRIBERS, &rate, true))
        .collect::<Result<_>>()?;
    let mut errors = vec![Vec::new(); acc_setups.len()];
    let mut last = vec![Vec::new(); acc_setups.len()];
    for run in 0..RUNS {
        for (i, (s, pair)) in acc_setups.iter().zip(&pairs).enumerate() {
            progress(&format!(
                "multi-queue accuracy, run {}/{RUNS}: {} subscribers, {}",
                run + 1,
                SUBSCRIBERS,
                s.name()
            ))?;
            let (g, _) = run_flows(pair, SUBSCRIBERS, true, tcp_load())?;
            let expected = SUBSCRIBER_MBIT * GOODPUT_PER_WIRE;
            let worst = g
                .iter()
                .map(|m| (m - expected) / expected * 100.0)
                .fold(0.0f64, |a, e| if e.abs() > a.abs() { e } else { a });
            errors[i].push(worst);
            last[i] = g;
        }
    }
    let accuracy: Vec<Value> = acc_setups
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "setup": s.key(), "name": s.name(), "subscribers": SUBSCRIBERS, "mbit_each": SUBSCRIBER_MBIT,
                "expected": SUBSCRIBER_MBIT * GOODPUT_PER_WIRE,
                "worst_error_pct": errors[i].iter().fold(0.0f64, |a, e| a.max(e.abs())),
                "worst_error_pct_by_run": errors[i],
                "last_run": last[i],
            })
        })
        .collect();
    Ok(json!({ "throughput": throughput, "accuracy": accuracy }))
}

/// Section 9 of BENCHMARKS.md.
pub fn section(r: &Value) -> String {
    let q = &r["queues"];
    let Some(rows) = q["throughput"].as_array() else {
        return String::new();
    };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n## 9. Multi-queue imq devices (ingress, HTB)\n\n\
         Two TCP streams at once, each in its own HTB class of 20 Gbit/s (so that the CPUs, not the rate, \
         are the limit), into one single-queue classic ifb, one imq device with one queue, and one with two \
         queues (`mq`, one HTB per queue, each stream's rule on its own queue). CPU busy: the share of \
         all cores busy during the run, senders and receivers included; of which softirq: the part spent \
         in softirq, where the packet path, imq and the qdiscs run.\n"
    );
    let _ = writeln!(
        o,
        "| setup | Mbit/s (sum) | vs 1 queue | CPU busy | of which softirq | Mbit/s per busy core |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
    let one = rows
        .iter()
        .find(|x| x["setup"] == "imq_1q")
        .map_or(f64::NAN, |x| f(&x["mbit"]));
    for x in rows {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.2} | {:.0}% | {:.0}% | {:.0} |",
            x["name"].as_str().unwrap_or("?"),
            f(&x["mbit"]),
            f(&x["mbit"]) / one,
            f(&x["cpu_busy"]) * 100.0,
            f(&x["cpu_softirq"]) * 100.0,
            f(&x["mbit_per_cpu"])
        );
    }
    o.push_str(
        "\nWhere more queues help: a packet is put into its queue's qdisc on the CPU that received it, and each \
         queue has its own qdisc lock and its own ifb tasklet, run on that CPU. With N queues and traffic arriving \
         on N CPUs (RSS queues of the NIC, or RPS), N HTBs shape at once, where one HTB would serialize them on \
         its lock. On this 2-core machine the senders and receivers use the same two cores, and TCP with GSO \
         moves up to 64 KB per qdisc operation, so the lock is not what limits: compare the two imq rows with \
         the ±10% run-to-run spread of TCP noted in Findings. A router whose cores only forward is the case \
         that gains.\n",
    );
    if let Some(acc) = q["accuracy"].as_array() {
        let _ = writeln!(
            o,
            "\nPer-subscriber accuracy: {} subscribers (server addresses), each its own HTB class of {} Mbit/s, \
             one TCP stream each, all at once; with two queues subscriber k's rule names queue k % 2 + 1 and a \
             class of that queue's HTB; the classic ifb classifies with one u32 filter per subscriber. \
             Expected goodput {:.2} Mbit/s each.\n",
            SUBSCRIBERS,
            SUBSCRIBER_MBIT,
            SUBSCRIBER_MBIT * GOODPUT_PER_WIRE
        );
        let _ = writeln!(
            o,
            "| setup | worst error, any subscriber, any run | per subscriber, last run |"
        );
        let _ = writeln!(o, "|---|---:|---|");
        for x in acc {
            let each = crate::bench::one_decimal(&x["last_run"]);
            let _ = writeln!(
                o,
                "| {} | {:.1}% | {} |",
                x["name"].as_str().unwrap_or("?"),
                f(&x["worst_error_pct"]),
                each.join(", ")
            );
        }
    }
    o
}
