//! `imqctl monitor`: its events and captures are checked against packets the test
//! sent (addresses, ports, lengths, rule, device, class, mark), and against the rule
//! counters the kernel keeps: every packet a rule took is either reported or counted
//! as over the rate, never both and never neither.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{SocketAddr, UdpSocket},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use imq_tests::{
    NetNs, Pair,
    check::{assert_rate, config, goodput, rule_counters, show, show_at_rest, tbf},
    imqctl_path, ping, require_root,
};
use serde_json::Value;

/// A running `imqctl monitor`, killed if the test fails before stopping it.
struct Monitor {
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
}

impl Monitor {
    /// Starts `imqctl monitor ARGS` in `ns` and waits until it reports.
    fn start(ns: &NetNs, args: &[&str]) -> Self {
        let path = imqctl_path().expect("no imqctl binary");
        let mut child = ns
            .command(path.to_str().unwrap())
            .arg("monitor")
            .args(args)
            // A bound, should the test never stop it.
            .args(["--duration", "120"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn imqctl monitor");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("imqctl monitor said nothing");
        assert!(first.starts_with("monitoring"), "imqctl monitor: {first}");
        Self {
            child: Some(child),
            stderr: rx,
        }
    }

    /// Stops it (SIGINT, as Ctrl-C) once what was sent had time to arrive; returns
    /// its stdout and its last stderr line (the summary).
    fn stop(mut self) -> (Vec<u8>, String) {
        thread::sleep(Duration::from_millis(500));
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child (ip netns exec execs imqctl in place).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let status = child.wait().unwrap();
        let rest: Vec<String> = self.stderr.iter().collect();
        assert!(status.success(), "imqctl monitor: {status}: {rest:?}");
        (out, rest.last().cloned().unwrap_or_default())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `count` UDP datagrams of `payload` bytes from `ns` to `dst`, paced so no
/// queue on the way drops one; returns the source port.
fn send_udp(ns: &NetNs, dst: SocketAddr, count: usize, payload: usize) -> u16 {
    ns.spawn(move || {
        let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let s = UdpSocket::bind(bind)?;
        let data = vec![0x5a; payload];
        for i in 0..count {
            s.send_to(&data, dst)?;
            if i % 50 == 49 {
                thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(s.local_addr()?.port())
    })
    .join()
    .unwrap()
    .expect("send UDP")
}

/// Pings the server over IPv4 and IPv6 until it answers: neighbour discovery is done
/// before the packets a test counts are sent (an unresolved neighbour holds them back).
fn reach(pair: &Pair) {
    for dst in [pair.server_v4(), pair.server_v6()] {
        assert!(
            ping(&pair.client, &dst, 1) == 1 || ping(&pair.client, &dst, 3) > 0,
            "no answer from {dst}"
        );
    }
}

fn events(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn with_dport(events: &[Value], port: u16) -> Vec<&Value> {
    events.iter().filter(|e| e["dport"] == port).collect()
}

/// The summary's "N over --rate" figure.
fn over_rate(summary: &str) -> u64 {
    let (_, rest) = summary.split_once("; ").expect(summary);
    rest.split_whitespace().next().unwrap().parse().expect(summary)
}

/// Ingress (TCX where the kernel has it): what a rule took with its prio, device,
/// class and mark; what no rule took with `--all`; the lengths and ports of the
/// packets sent; the rule counted exactly what was reported. IPv4 and IPv6.
#[test]
fn monitor_shows_what_each_rule_took_and_what_none_took() {
    require_root();
    let pair = Pair::new("mon").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    reach(&pair);
    s.imqctl_ok(&[
        "attach",
        "s0",
        "--proto",
        "udp",
        "--dport",
        "5300",
        "--prio",
        "10",
        "--classid",
        "1:20",
        "--set-mark",
        "0x5/0xff",
    ]);
    let mon = Monitor::start(s, &["-j", "--all"]);
    let v4: SocketAddr = format!("{}:5300", pair.server_v4()).parse().unwrap();
    let v6: SocketAddr = format!("[{}]:5300", pair.server_v6()).parse().unwrap();
    let other: SocketAddr = format!("{}:5301", pair.server_v4()).parse().unwrap();
    let p4 = send_udp(c, v4, 20, 100);
    let p6 = send_udp(c, v6, 20, 100);
    let po = send_udp(c, other, 10, 60);
    let (out, summary) = mon.stop();
    let all = events(&out);

    let took = with_dport(&all, 5300);
    assert_eq!(took.len(), 40, "{all:?}");
    for e in &took {
        let v6 = e["family"] == 6;
        assert_eq!(e["verdict"], "selected", "{e}");
        assert_eq!(e["interface"], "s0", "{e}");
        assert_eq!(e["direction"], "ingress", "{e}");
        assert_eq!(e["prio"], 10, "{e}");
        assert_eq!(e["dev"], "imq0", "{e}");
        assert_eq!(e["classid"], "1:20", "{e}");
        assert_eq!((e["mark"].as_u64(), e["new_mark"].as_u64()), (Some(0), Some(5)), "{e}");
        assert_eq!(e["proto"], 17, "{e}");
        let (src, dst, sport, len) = if v6 {
            (
                format!("2001:db8:{:x}::1", pair.id % 250),
                pair.server_v6(),
                p6,
                14 + 40 + 8 + 100,
            )
        } else {
            (
                format!("198.18.{}.1", pair.id % 250),
                pair.server_v4(),
                p4,
                14 + 20 + 8 + 100,
            )
        };
        assert_eq!(
            (e["src"].as_str(), e["dst"].as_str()),
            (Some(&*src), Some(&*dst)),
            "{e}"
        );
        assert_eq!(e["sport"], sport, "{e}");
        assert_eq!(e["len"], len, "{e}");
        assert_eq!(e["captured"], 0, "lines carry no packet bytes: {e}");
    }
    assert_eq!(took.iter().filter(|e| e["family"] == 6).count(), 20, "{all:?}");

    let missed = with_dport(&all, 5301);
    assert_eq!(missed.len(), 10, "{all:?}");
    for e in &missed {
        assert_eq!(e["verdict"], "unmatched", "{e}");
        assert_eq!(e["sport"], po, "{e}");
        assert_eq!(e["len"], 14 + 20 + 8 + 60, "{e}");
        assert!(e.get("prio").is_none() && e.get("dev").is_none(), "{e}");
    }
    assert_eq!(over_rate(&summary), 0, "{summary}");
    let (packets, _) = rule_counters(&show(s));
    assert_eq!(packets, 40, "the rule counted what the monitor reported");
}

/// Egress, classic mode with two imq devices on one interface (one filter per
/// device): each packet is reported once, unmatched ones included, with its own
/// device; `--dev` and `--prio` keep only theirs; the text format names them.
#[test]
fn monitor_on_egress_with_two_devices_reports_each_packet_once() {
    require_root();
    let pair = Pair::new("mone").unwrap();
    let c = &pair.client;
    reach(&pair);
    c.imqctl_ok(&[
        "attach", "c0", "-d", "egress", "--proto", "udp", "--dport", "5300", "--prio", "10",
    ]);
    c.imqctl_ok(&[
        "attach", "c0", "-d", "egress", "--proto", "udp", "--dport", "5301", "--prio", "20", "--dev", "imq1",
    ]);
    let dst = |port: u16| -> SocketAddr { format!("{}:{port}", pair.server_v4()).parse().unwrap() };

    let mon = Monitor::start(c, &["-j", "--all"]);
    send_udp(c, dst(5300), 10, 10);
    send_udp(c, dst(5301), 10, 10);
    send_udp(c, dst(5302), 10, 10);
    let (out, _) = mon.stop();
    let all = events(&out);
    for (port, verdict, dev) in [
        (5300, "selected", "imq0"),
        (5301, "selected", "imq1"),
        (5302, "unmatched", ""),
    ] {
        let got = with_dport(&all, port);
        assert_eq!(got.len(), 10, "port {port}: {all:?}");
        for e in got {
            assert_eq!(e["verdict"], verdict, "{e}");
            assert_eq!(e["direction"], "egress", "{e}");
            assert_eq!(e["dev"].as_str().unwrap_or(""), dev, "{e}");
        }
    }

    let mon = Monitor::start(c, &["--dev", "imq1"]);
    send_udp(c, dst(5300), 5, 10);
    send_udp(c, dst(5301), 5, 10);
    let (out, _) = mon.stop();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    for l in lines {
        assert!(l.contains(" c0 egress prio 20 imq1 mark 0x0 udp "), "{l}");
        assert!(l.contains(":5301 dscp 0 len 52"), "{l}");
    }

    let mon = Monitor::start(c, &["-j", "--prio", "10"]);
    send_udp(c, dst(5300), 5, 10);
    send_udp(c, dst(5301), 5, 10);
    let (out, _) = mon.stop();
    let got = events(&out);
    assert_eq!(got.len(), 5, "{got:?}");
    assert!(got.iter().all(|e| e["prio"] == 10 && e["dport"] == 5300), "{got:?}");
}

/// `-w FILE` writes pcap that tcpdump reads back: the packets sent, cut at
/// `--snaplen`, with their original length.
#[test]
fn monitor_capture_is_pcap_that_tcpdump_reads() {
    require_root();
    let pair = Pair::new("monw").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    reach(&pair);
    s.imqctl_ok(&["attach", "s0", "--proto", "udp", "--dport", "5300"]);
    let file = std::env::temp_dir().join(format!("imq-monitor-{}.pcap", pair.id));
    let _cleanup = RemoveOnDrop(file.clone());
    let mon = Monitor::start(s, &["-w", file.to_str().unwrap(), "--snaplen", "60"]);
    let dst: SocketAddr = format!("{}:5300", pair.server_v4()).parse().unwrap();
    let sport = send_udp(c, dst, 20, 300);
    let (out, _) = mon.stop();
    assert!(out.is_empty(), "-w FILE prints nothing on stdout");

    // Our own reading of the file: header, then records of 60 captured bytes.
    let data = std::fs::read(&file).unwrap();
    assert_eq!(&data[..4], &0xa1b2_c3d4u32.to_le_bytes());
    assert_eq!(u32::from_le_bytes(data[16..20].try_into().unwrap()), 60, "snaplen");
    assert_eq!(u32::from_le_bytes(data[20..24].try_into().unwrap()), 1, "Ethernet");
    let records = pcap_records(&data);
    let udp: Vec<_> = records
        .iter()
        .filter(|(_, _, p)| p.len() >= 38 && p[12..14] == [0x08, 0x00] && p[36..38] == 5300u16.to_be_bytes())
        .collect();
    assert_eq!(udp.len(), 20, "{} records", records.len());
    for (incl, orig, p) in udp {
        assert_eq!((p.len(), *incl, *orig), (60, 60, 14 + 20 + 8 + 300));
        assert_eq!(p[34..36], sport.to_be_bytes());
        assert_eq!(
            p[30..34],
            pair.server_v4().parse::<std::net::Ipv4Addr>().unwrap().octets()
        );
        assert!(p[42..].iter().all(|&b| b == 0x5a), "payload bytes");
    }

    // tcpdump drops to its own user by default; -Z root keeps it able to read the file.
    let out = std::process::Command::new("tcpdump")
        .args(["-Z", "root", "-nr", file.to_str().unwrap(), "udp", "port", "5300"])
        .output()
        .expect("run tcpdump (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tcpdump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!(
        "IP 198.18.{}.1.{sport} > {}.5300: UDP, length 300",
        pair.id % 250,
        pair.server_v4()
    );
    assert_eq!(text.lines().filter(|l| l.contains(&want)).count(), 20, "{text}");
}

/// Whole packets of every size reach the capture intact: the ring buffer's records
/// come in a few fixed sizes (up to 256, 2,048 and 65,536 bytes of packet), and a
/// packet goes into the smallest that holds it. Jumbo frames (MTU 9000 on the pair)
/// take the largest.
#[test]
fn monitor_captures_whole_packets_of_every_size() {
    require_root();
    let pair = Pair::new("mons").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    c.ip(&["link", "set", "c0", "mtu", "9000"]).unwrap();
    s.ip(&["link", "set", "s0", "mtu", "9000"]).unwrap();
    reach(&pair);
    s.imqctl_ok(&["attach", "s0", "--proto", "udp", "--dport", "5300"]);
    let file = std::env::temp_dir().join(format!("imq-monitor-{}.pcap", pair.id));
    let _cleanup = RemoveOnDrop(file.clone());
    let mon = Monitor::start(s, &["-w", file.to_str().unwrap(), "--snaplen", "65535"]);
    let dst: SocketAddr = format!("{}:5300", pair.server_v4()).parse().unwrap();
    // 14 + 20 + 8 bytes of headers: frames of 60, 256 (the first class, full), 257,
    // 1,442, 2,048 (the second, full), 2,049 and 8,042 bytes.
    let payloads = [18, 214, 215, 1400, 2006, 2007, 8000];
    for &n in &payloads {
        send_udp(c, dst, 3, n);
    }
    let (_, summary) = mon.stop();
    assert!(summary.contains(" 0 lost"), "{summary}");
    let data = std::fs::read(&file).unwrap();
    let mut got = Vec::new();
    for (incl, orig, p) in pcap_records(&data) {
        if p.len() >= 42 && p[12..14] == [0x08, 0x00] && p[36..38] == 5300u16.to_be_bytes() {
            assert_eq!(incl, orig, "captured whole");
            assert!(
                p[42..].iter().all(|&b| b == 0x5a),
                "payload bytes of a {incl}-byte frame"
            );
            got.push(incl - 42);
        }
    }
    let want: Vec<usize> = payloads.iter().flat_map(|&n| [n; 3]).collect();
    assert_eq!(got, want, "payload sizes captured, in order");
}

/// Whether the ring buffer of the monitor with this pid exists (`imq_mon_<pid>`,
/// looked up among every BPF map of the host).
fn ring_exists(pid: u32) -> bool {
    let name = format!("imq_mon_{pid}");
    aya::maps::loaded_maps().any(|m| m.is_ok_and(|m| m.name_as_str() == Some(name.as_str())))
}

/// Waits up to 5 s for that ring buffer to be freed (the kernel frees a map after a
/// grace period, from a work queue).
fn ring_gone(pid: u32) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while ring_exists(pid) {
        if std::time::Instant::now() > until {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The records of a pcap file: (captured length, original length, captured bytes);
/// they must end with the file.
fn pcap_records(data: &[u8]) -> Vec<(usize, usize, Vec<u8>)> {
    let mut records = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let word = |i: usize| u32::from_le_bytes(data[off + i..off + i + 4].try_into().unwrap()) as usize;
        let (incl, orig) = (word(8), word(12));
        records.push((incl, orig, data[off + 16..off + 16 + incl].to_vec()));
        off += 16 + incl;
    }
    assert_eq!(off, data.len(), "records end with the file");
    records
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `--rate` bounds what a flood sends the reader, and counts the rest: reported
/// plus over the rate is exactly what the rule took. `--sample N` reports about one
/// in N.
#[test]
fn monitor_rate_and_sampling_bound_the_events() {
    require_root();
    let pair = Pair::new("monr").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    reach(&pair);
    s.imqctl_ok(&["attach", "s0", "--proto", "udp", "--dport", "5300"]);
    let dst: SocketAddr = format!("{}:5300", pair.server_v4()).parse().unwrap();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as u64;

    let before = rule_counters(&show(s)).0;
    let mon = Monitor::start(s, &["-j", "--rate", "20"]);
    let start = std::time::Instant::now();
    send_udp(c, dst, 2000, 10);
    let (out, summary) = mon.stop();
    let secs = start.elapsed().as_secs_f64();
    let reported = with_dport(&events(&out), 5300).len() as u64;
    let limited = over_rate(&summary);
    let took = rule_counters(&show(s)).0 - before;
    eprintln!("--rate 20: {reported} reported, {limited} over the rate, {took} taken in {secs:.2} s");
    assert_eq!(reported + limited, took, "{summary}");
    // A bucket of 20 per CPU, refilled at 20 per second.
    let bound = (20.0 * cpus as f64 * (1.0 + secs)).ceil() as u64;
    assert!(reported <= bound, "{reported} events, at most {bound}");
    assert!(reported >= 20, "{reported} events, a full bucket is 20");

    let mon = Monitor::start(s, &["-j", "--sample", "10", "--rate", "1000000"]);
    send_udp(c, dst, 2000, 10);
    let (out, summary) = mon.stop();
    let reported = with_dport(&events(&out), 5300).len();
    eprintln!("--sample 10: {reported} of 2000 reported");
    assert_eq!(over_rate(&summary), 0, "{summary}");
    // Binomial(2000, 0.1): mean 200, standard deviation 13.4; this is ±6 of them.
    assert!((120..=280).contains(&reported), "{reported} of 2000 with --sample 10");
}

/// A monitor changes nothing in what it watches: with one capturing every packet,
/// the rule still counts exactly what its imq device received (an unlimited FIFO,
/// which neither drops nor splits packets), and TBF shapes to the same rate as
/// without one.
#[test]
fn monitoring_leaves_counters_and_shaping_unchanged() {
    require_root();
    let pair = Pair::new("monu").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    reach(&pair);
    s.imqctl_ok(&["attach", "s0"]);
    s.tc(&["qdisc", "replace", "dev", "imq0", "root", "pfifo", "limit", "100000"])
        .unwrap();
    let capture = ["--all", "-w", "/dev/null", "--snaplen", "1500", "--rate", "1000000"];
    let mon = Monitor::start(s, &capture);
    let dst: SocketAddr = format!("{}:5300", pair.server_v4()).parse().unwrap();
    send_udp(c, dst, 500, 1000);
    goodput(c, s, &pair.server_v4(), 5200);
    let (_, summary) = mon.stop();
    eprintln!("monitor: {summary}");
    let (status, rx) = show_at_rest(s, &["imq0"]);
    assert_eq!(rule_counters(&status), rx[0], "rule counters vs imq0 rx: {status}");
    assert!(rule_counters(&status).0 >= 500, "{status}");

    tbf(s, "imq0", 10);
    let off = goodput(c, s, &pair.server_v4(), 5201);
    assert_rate(off, 10.0, 0.15, "shaped, no monitor");
    let mon = Monitor::start(s, &capture);
    let on = goodput(c, s, &pair.server_v4(), 5202);
    let (_, summary) = mon.stop();
    eprintln!("monitor: {summary}");
    assert_rate(on, 10.0, 0.15, "shaped, with a monitor capturing every packet");
}

/// Refusals, each one line, each changing nothing: a second monitor in the same
/// namespace, a namespace without imq, an unknown interface, bad values.
#[test]
fn bad_monitor_requests_are_refused_in_one_line() {
    require_root();
    let pair = Pair::new("monx").unwrap();
    let (c, s) = (&pair.client, &pair.server);

    let r = c.imqctl(&["monitor"]);
    assert_ne!(r.code, 0);
    assert_eq!(
        r.stderr.trim(),
        "imqctl: imq has no rules in this network namespace: nothing to monitor"
    );

    s.imqctl_ok(&["attach", "s0"]);
    let before = config(s);
    let mon = Monitor::start(s, &[]);
    let r = s.imqctl(&["monitor", "--duration", "1"]);
    assert_ne!(r.code, 0);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("already runs in this network namespace"),
        "{}",
        r.stderr
    );
    drop(mon.stop());

    for (args, says) in [
        (&["monitor", "nosuch0"][..], "no interface 'nosuch0'"),
        (&["monitor", "--sample", "0"], "--sample"),
        (&["monitor", "--dev", "eth0"], "invalid imq device name"),
        (&["monitor", "--snaplen", "70000", "-w", "/dev/null"], "--snaplen"),
        (&["monitor", "--unmatched", "--prio", "3"], "--prio"),
    ] {
        let r = s.imqctl(args);
        assert_ne!(r.code, 0, "{args:?}");
        assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    assert_eq!(config(s), before, "refusals changed nothing");
    // A monitor that ends turns the reports off: the next one starts. So does one
    // killed outright (SIGKILL: no chance to clean up), after any imqctl command.
    // Each monitor's ring buffer (named after its pid) goes with it: at once when it
    // stops, at the next imqctl command when it was killed.
    let stopped = Monitor::start(s, &[]);
    let pid = stopped.child.as_ref().unwrap().id();
    assert!(ring_exists(pid), "a running monitor has its ring");
    stopped.stop();
    assert!(ring_gone(pid), "the ring of a monitor that stopped is freed");
    let mut killed = Monitor::start(s, &[]);
    let pid = killed.child.as_ref().unwrap().id();
    drop(killed.child.take().map(|mut c| (c.kill(), c.wait())));
    thread::sleep(Duration::from_millis(300));
    assert!(
        ring_exists(pid),
        "a killed monitor's ring stays in the data path's slot"
    );
    s.imqctl_ok(&["show"]);
    assert!(ring_gone(pid), "the next command frees a killed monitor's ring");
    let mon = Monitor::start(s, &["-j"]);
    assert!(ping(c, &pair.server_v4(), 2) > 0);
    let (out, _) = mon.stop();
    assert!(!events(&out).is_empty(), "the monitor after a killed one reports");
}
