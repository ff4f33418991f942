//! Latency under load, the RRUL way: a client behind a bloated WAN link saturates
//! its download, its upload, and both at once with several TCP flows while it pings
//! the server 10 times a second. Run for each setup of the client's WAN shaper:
//! none, imq + cake, imq + fq_codel, and classic ifb + mirred + cake (sqm-scripts).
//!
//! ```text
//! server s0 ──(netem 20 ms)── i0 [ISP: i0 egress TBF UP_LINE, i1 egress TBF DOWN_LINE,
//!                                  each with a deep FIFO] i1 ── c0 client (the shaper)
//! ```
//!
//! `cargo xtask vm-bench` runs it in a VM of a Debian kernel that has cake, fq_codel
//! and netem, and reads its `IMQ-BENCH {json}` lines from the console. Every flow and
//! ping is bounded in time; everything lives in namespaces it creates, with addresses
//! from 198.18.0.0/15.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use imq_tests::{NetNs, imqctl_path, require_root};
use serde_json::json;

/// The line as the ISP sells it, and the shaper set a little below.
const DOWN_LINE: &str = "50mbit";
const UP_LINE: &str = "10mbit";
const DOWN_SHAPED: &str = "45mbit";
const UP_SHAPED: &str = "9mbit";
const DOWN_SHAPED_MBIT: f64 = 45.0;
const UP_SHAPED_MBIT: f64 = 9.0;
/// The FIFOs of the bottlenecks: 1.5 MB down (240 ms at 50 Mbit/s), 300 KB up
/// (240 ms at 10 Mbit/s): an ordinary bloated modem and DSLAM.
const DOWN_FIFO: &str = "1500000";
const UP_FIFO: &str = "300000";
const FLOWS: usize = 4;

const SERVER: &str = "198.18.200.1";
const CLIENT: &str = "198.18.201.2";

struct Net {
    server: NetNs,
    isp: NetNs,
    client: NetNs,
}

impl Net {
    fn new() -> Result<Self> {
        let id = std::process::id() % 10_000;
        let server = NetNs::new(format!("bb-{id}-srv"))?;
        let isp = NetNs::new(format!("bb-{id}-isp"))?;
        let client = NetNs::new(format!("bb-{id}-cli"))?;
        server.veth("s0", &isp, "i0")?;
        client.veth("c0", &isp, "i1")?;
        for (ns, dev, addr) in [
            (&server, "s0", "198.18.200.1/24"),
            (&isp, "i0", "198.18.200.2/24"),
            (&isp, "i1", "198.18.201.1/24"),
            (&client, "c0", "198.18.201.2/24"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        server.ip(&["route", "add", "default", "via", "198.18.200.2"])?;
        client.ip(&["route", "add", "default", "via", "198.18.201.1"])?;
        isp.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // The path's delay, away from every queue that is measured.
        server.tc(&[
            "qdisc", "add", "dev", "s0", "root", "netem", "delay", "20ms", "limit", "100000",
        ])?;
        // The bottlenecks: a token bucket in front of a deep byte FIFO, each way.
        for (dev, rate, fifo) in [("i1", DOWN_LINE, DOWN_FIFO), ("i0", UP_LINE, UP_FIFO)] {
            isp.tc(&[
                "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "16k", "limit", fifo,
            ])?;
        }
        Ok(Self { server, isp, client })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Unshaped,
    ImqCake,
    ImqFqCodel,
    IfbCake,
}

impl Setup {
    const ALL: [Self; 4] = [Self::Unshaped, Self::ImqCake, Self::ImqFqCodel, Self::IfbCake];

    fn name(self) -> &'static str {
        match self {
            Self::Unshaped => "unshaped",
            Self::ImqCake => "imq + cake",
            Self::ImqFqCodel => "imq + fq_codel",
            Self::IfbCake => "ifb + mirred + cake",
        }
    }

    fn imqctl(ns: &NetNs, args: &[&str]) -> Result<()> {
        let imqctl = imqctl_path().context("no imqctl: set IMQCTL")?;
        let out = ns.command(imqctl.to_str().context("path")?).args(args).output()?;
        if !out.status.success() {
            bail!("imqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn up(self, c: &NetNs) -> Result<()> {
        let shape = ["shape", "c0", "--down", DOWN_SHAPED, "--up", UP_SHAPED];
        match self {
            Self::Unshaped => Ok(()),
            Self::ImqCake => Self::imqctl(c, &shape),
            Self::ImqFqCodel => Self::imqctl(c, &[&shape[..], &["--qdisc", "fq_codel"]].concat()),
            Self::IfbCake => {
                // sqm-scripts' layout: ingress qdisc, a match-all u32 filter with
                // mirred to an ifb, cake in ingress mode there; cake on the egress.
                c.ip(&["link", "add", "ifb4c0", "type", "ifb"])?;
                c.ip(&["link", "set", "ifb4c0", "up"])?;
                c.tc(&[
                    "qdisc",
                    "add",
                    "dev",
                    "ifb4c0",
                    "root",
                    "cake",
                    "bandwidth",
                    DOWN_SHAPED,
                    "ingress",
                ])?;
                c.tc(&["qdisc", "add", "dev", "c0", "handle", "ffff:", "ingress"])?;
                c.tc(&[
                    "filter", "add", "dev", "c0", "parent", "ffff:", "protocol", "all", "prio", "10", "u32", "match",
                    "u32", "0", "0", "flowid", "1:1", "action", "mirred", "egress", "redirect", "dev", "ifb4c0",
                ])?;
                c.tc(&["qdisc", "add", "dev", "c0", "root", "cake", "bandwidth", UP_SHAPED])?;
                Ok(())
            }
        }
    }

    fn down(self, c: &NetNs) -> Result<()> {
        match self {
            Self::Unshaped => Ok(()),
            Self::ImqCake | Self::ImqFqCodel => Self::imqctl(c, &["unshape", "c0"]),
            Self::IfbCake => {
                c.tc(&["qdisc", "del", "dev", "c0", "ingress"])?;
                c.tc(&["qdisc", "del", "dev", "c0", "root"])?;
                c.ip(&["link", "del", "ifb4c0"])?;
                Ok(())
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    Idle,
    Download,
    Upload,
    Both,
}

impl Traffic {
    fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Download => "download",
            Self::Upload => "upload",
            Self::Both => "both",
        }
    }
}

/// One ping a 100 ms from the client for `secs`: (seconds since start, RTT ms) of
/// each reply, and how many went unanswered.
fn ping(client: &NetNs, secs: u32) -> Result<(Vec<(f64, f64)>, u32)> {
    let out = client
        .command("ping")
        .args(["-n", "-D", "-i", "0.1", "-W", "2", "-w", &secs.to_string(), SERVER])
        .stdin(Stdio::null())
        .output()
        .context("ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut samples = Vec::new();
    let mut first = None;
    let mut max_seq = 0u32;
    for line in text.lines() {
        // "[1700000000.123456] 64 bytes from 198.18.200.1: icmp_seq=12 ttl=63 time=23.4 ms"
        let Some(ts) = line.strip_prefix('[').and_then(|l| l.split(']').next()) else {
            continue;
        };
        let (Ok(ts), Some(rtt)) = (
            ts.parse::<f64>(),
            line.split("time=").nth(1).and_then(|t| t.split_whitespace().next()),
        ) else {
            continue;
        };
        if let Some(seq) = line
            .split("icmp_seq=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        {
            max_seq = max_seq.max(seq);
        }
        let t0 = *first.get_or_insert(ts);
        samples.push((ts - t0, rtt.parse::<f64>().context("rtt")?));
    }
    let sent = text
        .lines()
        .find_map(|l| {
            l.split(" packets transmitted")
                .next()
                .filter(|_| l.contains(" packets transmitted"))
        })
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(max_seq);
    Ok((samples.clone(), sent.saturating_sub(samples.len() as u32)))
}

/// `FLOWS` TCP flows from `from` to a listener at `to_addr` in `to`, for `secs`:
/// bytes the receivers got after `warmup`.
fn flows(
    from: &NetNs,
    to: &NetNs,
    to_addr: &str,
    port: u16,
    secs: f64,
    warmup: f64,
) -> Result<thread::JoinHandle<Result<u64>>> {
    let addr: SocketAddr = format!("{to_addr}:{port}").parse()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receivers = to.spawn(move || {
        let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        ready_tx.send(())?;
        listener.set_nonblocking(true)?;
        let start = Instant::now();
        let mut handles = Vec::new();
        while handles.len() < FLOWS {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false)?;
                    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
                    handles.push(thread::spawn(move || {
                        let mut buf = vec![0u8; 128 << 10];
                        let mut bytes = 0u64;
                        loop {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    let t = start.elapsed().as_secs_f64();
                                    if t >= warmup && t < secs {
                                        bytes += n as u64;
                                    }
                                }
                            }
                        }
                        bytes
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed().as_secs_f64() < 5.0 => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accept"),
            }
        }
        Ok(handles.into_iter().map(|h| h.join().unwrap_or(0)).sum())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    for _ in 0..FLOWS {
        let _ = from.spawn(move || {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            conn.set_write_timeout(Some(Duration::from_secs(2)))?;
            let buf = vec![0x5au8; 64 << 10];
            let start = Instant::now();
            let mut sent = 0u64;
            // Bounded in time and volume: 4 GB is far above 30 s at the line's rate.
            while start.elapsed().as_secs_f64() < secs && sent < 4 << 30 {
                match conn.write(&buf) {
                    Ok(n) => sent += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            Ok(sent)
        });
    }
    Ok(receivers)
}

/// Static keys the run would otherwise switch on and off while packets flow, each
/// switch a live patch of the kernel's receive path: SO_TIMESTAMP (every ping start and
/// exit flips netstamp_needed_key) and clsact (the tc ingress/egress keys, flipped by
/// every setup change). Under qemu's TCG with two vCPUs such a patch once crashed the
/// guest (int3 in __netif_receive_skb_core); held on from the start, they are never
/// patched again. Neither changes what is measured.
fn hold_static_keys(isp: &NetNs) -> Result<std::net::UdpSocket> {
    isp.tc(&["qdisc", "add", "dev", "lo", "clsact"])?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a pointer to an int of the given length.
    let ret = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMP,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_TIMESTAMP");
    }
    Ok(sock)
}

fn main() -> Result<()> {
    require_root();
    let arg = |name: &str, default: u32| -> Result<u32> {
        std::env::args()
            .skip_while(|a| a != name)
            .nth(1)
            .map_or(Ok(default), |s| s.parse())
            .with_context(|| format!("{name} N"))
    };
    let secs = arg("--seconds", 20)?;
    // Each round measures every setup and load once: rounds take turns, so a slow
    // moment of the machine does not land on one setup alone.
    let rounds = arg("--rounds", 3)?;
    // Slow start overshoots into the ISP's FIFO, which a shaper below the line drains
    // only at the difference of the rates: up to 2.4 s for 1.5 MB at 50 - 45 Mbit/s.
    let warmup = 5.0;
    let net = Net::new()?;
    let _keys = hold_static_keys(&net.isp)?;
    eprintln!(
        "bufferbloat: line {DOWN_LINE} down / {UP_LINE} up, FIFOs {DOWN_FIFO} / {UP_FIFO} bytes, 20 ms base RTT, {FLOWS} flows each way, {secs} s per load"
    );
    let mut port = 6000;
    for round in 0..rounds {
        for setup in Setup::ALL {
            setup.up(&net.client)?;
            for traffic in [Traffic::Idle, Traffic::Download, Traffic::Upload, Traffic::Both] {
                let window = f64::from(secs) - warmup;
                let down = matches!(traffic, Traffic::Download | Traffic::Both)
                    .then(|| flows(&net.server, &net.client, CLIENT, port, f64::from(secs), warmup))
                    .transpose()?;
                let up = matches!(traffic, Traffic::Upload | Traffic::Both)
                    .then(|| flows(&net.client, &net.server, SERVER, port + 1, f64::from(secs), warmup))
                    .transpose()?;
                port += 2;
                let (rtt, lost) = ping(&net.client, if traffic == Traffic::Idle { 5 } else { secs })?;
                let mbit = |h: Option<thread::JoinHandle<Result<u64>>>| -> Result<Option<f64>> {
                    h.map(|h| {
                        let bytes = h.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
                        Ok(bytes as f64 * 8.0 / window / 1e6)
                    })
                    .transpose()
                };
                let (down_mbit, up_mbit) = (mbit(down)?, mbit(up)?);
                let record = json!({
                    "round": round,
                    "setup": setup.name(),
                    "load": traffic.name(),
                    "warmup_s": if traffic == Traffic::Idle { 0.0 } else { warmup },
                    "down_mbit": down_mbit,
                    "up_mbit": up_mbit,
                    "down_shaped_mbit": DOWN_SHAPED_MBIT,
                    "up_shaped_mbit": UP_SHAPED_MBIT,
                    "lost": lost,
                    "rtt": rtt.iter().map(|(t, r)| [(t * 100.0).round() / 100.0, (r * 100.0).round() / 100.0]).collect::<Vec<_>>(),
                });
                println!("IMQ-BENCH {record}");
                std::io::stdout().flush()?;
                // Let the queues drain before the next load.
                thread::sleep(Duration::from_secs(2));
            }
            setup.down(&net.client)?;
        }
    }
    Ok(())
}
