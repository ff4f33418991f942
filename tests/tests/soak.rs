//! The soak run (`cargo xtask soak --minutes N`; ignored in the test suite): a
//! sequenced UDP flow through imq for N minutes while `imqctl watch` keeps a rule file
//! in place and everything around it churns: the file switches between two rule sets
//! (the flow's port into imq0 or imq1, with 500 other rules each) and is reloaded,
//! a second interface with rules of its own flaps, and, where the kernel allows the
//! device hook that follows imq devices at once, imq1 is deleted behind imq's back and
//! imq0 taken down and up. Reconciled at the end: every packet sent was received once
//! (nothing blackholed, nothing looped back into the path), and the pinned maps hold as many entries and the kernel as many imq
//! programs, maps and links as after the first apply, and watch's resident memory
//! has not grown.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use aya::{
    maps::{MapInfo, loaded_maps},
    programs::{loaded_links, loaded_programs},
};
use imq_tests::{
    NetNs, Pair,
    check::{dev_rx, device_state, show},
    imqctl_path, require_root,
    udp::{udp_flow, udp_flow_loss},
    unique_id,
};

fn rule_file(dev: &str, base: u16) -> String {
    let mut t = format!("[[rule]]\ninterface = \"s0\"\nprio = 10\nproto = \"udp\"\ndport = 5320\ndev = \"{dev}\"\n");
    for i in 0..500u16 {
        t.push_str(&format!(
            "[[rule]]\ninterface = \"{}\"\nprio = {}\nproto = \"tcp\"\ndport = {}\ndev = \"{dev}\"\n",
            if i % 2 == 0 { "s0" } else { "s1" },
            100 + i,
            base + i
        ));
    }
    t
}

/// Entries of each hash map in the namespace's state, by name, counted with
/// BPF_MAP_GET_NEXT_KEY.
fn map_entries(ns: &NetNs) -> Vec<(String, u64)> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let dir = ns.imq_state_dir();
    let mut out = Vec::new();
    for name in ["imq_rules", "imq_hooks", "imq_entries", "imq_counters", "imq_ifindexes"] {
        let info = MapInfo::from_pin(dir.join(name)).expect("pinned map");
        let fd = info.fd().expect("map fd");
        let mut key = vec![0u8; info.key_size() as usize];
        let mut next = key.clone();
        let mut count = 0u64;
        let mut first = true;
        loop {
            // BPF_MAP_GET_NEXT_KEY: map_fd (u32, padded), key (NULL: the first), next_key.
            let mut attr = [0u64; 16];
            attr[0] = fd.as_fd().as_raw_fd() as u64;
            attr[1] = if first { 0 } else { key.as_ptr() as u64 };
            attr[2] = next.as_mut_ptr() as u64;
            // SAFETY: a zeroed union bpf_attr with pointers to live buffers of key_size.
            let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_GET_NEXT_KEY, attr.as_mut_ptr(), 128usize) };
            if r != 0 {
                break;
            }
            count += 1;
            first = false;
            key.copy_from_slice(&next);
        }
        out.push((name.to_owned(), count));
    }
    out
}

/// The kernel's imq objects: programs named imq_*, and all maps and links (nothing
/// else loads BPF while the soak runs).
fn kernel_objects() -> (usize, usize, usize) {
    let progs = loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("imq_")))
        .count();
    (progs, loaded_maps().count(), loaded_links().count())
}

struct Watch(Child);

/// The resident memory of the watch process, in KiB (`ip netns exec` execs imqctl,
/// so the child's pid is imqctl's).
fn rss_kib(w: &Watch) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", w.0.id())).expect("watch is running");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "a soak of minutes: cargo xtask soak --minutes N"]
fn soak() {
    require_root();
    let seconds: u64 = std::env::var("IMQ_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let pair = Pair::new("soak").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    c.veth("c1", s, "s1").unwrap();
    s.ip(&["link", "set", "s1", "up"]).unwrap();
    let (a, b) = (rule_file("imq0", 10_000), rule_file("imq1", 20_000));
    let file = std::env::temp_dir().join(format!("imq-soak-{}.toml", unique_id()));
    fs::write(&file, &a).unwrap();
    let imqctl = imqctl_path().unwrap();
    let mut watch = Watch(
        s.command(imqctl.to_str().unwrap())
            .args(["watch", "-f", file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // watch's log, each line with when it came, to put beside a loss.
    let watch_log: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    {
        let stderr = watch.0.stderr.take().unwrap();
        let log = Arc::clone(&watch_log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push((Instant::now(), line));
            }
        });
    }
    let settle = || thread::sleep(Duration::from_millis(1500));
    settle();
    s.imqctl_ok(&["dev", "add", "imq1"]);
    settle();
    let entries_before = map_entries(s);
    let objects_before = kernel_objects();
    let rss_before = rss_kib(&watch);
    let tracks = show(s)["tracks_device_state"].as_bool().unwrap_or(false);
    eprintln!(
        "soak: {seconds} s; maps {entries_before:?}; imq programs, maps, links {objects_before:?}; \
         imq0 flaps {}",
        if tracks {
            "on"
        } else {
            "off (this kernel refuses the device hook)"
        }
    );

    let hup = |w: &Watch| {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(w.0.id() as libc::pid_t, libc::SIGHUP) };
    };
    // What happened when, to put each lost packet beside the event before it.
    let mut events: Vec<(Instant, &str)> = Vec::new();
    let addr: SocketAddr = format!("{}:5320", pair.server_v4()).parse().unwrap();
    // watch's resident memory each minute: a leak grows in steps with the passes,
    // an allocator's slack levels off.
    let mut rss: Vec<u64> = vec![rss_before];
    let mut next_sample = Instant::now() + Duration::from_secs(60);
    let flow = udp_flow(c, s, addr, 2_000, Duration::from_secs(seconds), || {
        let end = Instant::now() + Duration::from_secs(seconds.saturating_sub(3));
        let mut i = 0u64;
        while Instant::now() < end {
            i += 1;
            if Instant::now() >= next_sample {
                rss.push(rss_kib(&watch));
                next_sample += Duration::from_secs(60);
            }
            let to_imq0 = i.is_multiple_of(2);
            fs::write(&file, if to_imq0 { &a } else { &b }).unwrap();
            hup(&watch);
            events.push((
                Instant::now(),
                if to_imq0 { "switch to imq0" } else { "switch to imq1" },
            ));
            thread::sleep(Duration::from_millis(400));
            // Without the device hook a device deleted or taken down behind imq's
            // back drops what is sent to it until watch hears of it (README, Limits):
            // that is measured where the hook runs.
            if tracks && i.is_multiple_of(7) {
                events.push((
                    Instant::now(),
                    if to_imq0 {
                        "imq1 deleted (idle)"
                    } else {
                        "imq1 deleted (in use)"
                    },
                ));
                let _ = s.ip(&["link", "del", "imq1"]);
            }
            if tracks && i.is_multiple_of(5) {
                events.push((
                    Instant::now(),
                    if to_imq0 {
                        "imq0 down (in use)"
                    } else {
                        "imq0 down (idle)"
                    },
                ));
                s.ip(&["link", "set", "imq0", "down"]).unwrap();
                thread::sleep(Duration::from_millis(200));
                events.push((
                    Instant::now(),
                    if to_imq0 { "imq0 up (in use)" } else { "imq0 up (idle)" },
                ));
                s.ip(&["link", "set", "imq0", "up"]).unwrap();
            }
            if i.is_multiple_of(3) {
                events.push((Instant::now(), "s1 down and up"));
                s.ip(&["link", "set", "s1", "down"]).unwrap();
                s.ip(&["link", "set", "s1", "up"]).unwrap();
            }
            thread::sleep(Duration::from_millis(400));
        }
    })
    .unwrap();
    let (sent, lost) = (flow.sent, flow.lost.len() as u64);
    // Each loss, by the event before it: (kind, events, packets lost, most in one).
    let mut by_kind: Vec<(&str, u64, u64, u64)> = Vec::new();
    let mut per_event = vec![0u64; events.len()];
    let mut before_any = 0u64;
    for t in &flow.lost {
        match events.iter().rposition(|(at, _)| at <= t) {
            Some(e) => per_event[e] += 1,
            None => before_any += 1,
        }
    }
    for ((_, kind), n) in events.iter().zip(&per_event) {
        match by_kind.iter_mut().find(|k| k.0 == *kind) {
            Some(k) => {
                k.1 += 1;
                k.2 += n;
                k.3 = k.3.max(*n);
            }
            None => by_kind.push((kind, 1, *n, *n)),
        }
    }
    let count = |k: &str| events.iter().filter(|(_, e)| e.starts_with(k)).count();
    let (switches, deletions, flaps, iface_flaps) =
        (count("switch"), count("imq1 deleted"), count("imq0 down"), count("s1"));
    eprintln!("soak: lost packets by the event before them (events, packets lost, most after one):");
    for (kind, events, n, most) in &by_kind {
        eprintln!("soak:   {kind:<22} {events:>5} {n:>6} {most:>5}");
    }
    if before_any > 0 {
        eprintln!("soak:   before any event {before_any:>12}");
    }
    // Each burst of consecutive losses, with what happened from a second before it.
    let mut bursts: Vec<(Instant, Instant, usize)> = Vec::new();
    for &t in &flow.lost {
        match bursts.last_mut() {
            Some((_, last, n)) if t.duration_since(*last) < Duration::from_millis(2) => {
                *last = t;
                *n += 1;
            }
            _ => bursts.push((t, t, 1)),
        }
    }
    let at = |t: Instant| t.duration_since(flow.start).as_secs_f64();
    let watch_lines = watch_log.lock().unwrap().clone();
    for (first, last, n) in bursts.iter().take(12) {
        eprintln!(
            "soak: {n} lost, sent from {:.4} s to {:.4} s; before and during:",
            at(*first),
            at(*last)
        );
        let from = first.checked_sub(Duration::from_secs(1)).unwrap_or(flow.start);
        let mut around: Vec<(Instant, String)> = events
            .iter()
            .map(|(t, e)| (*t, format!("soak: {e}")))
            .chain(watch_lines.iter().map(|(t, l)| (*t, format!("watch: {l}"))))
            .filter(|(t, _)| *t >= from && *t <= *last)
            .collect();
        around.sort_by_key(|(t, _)| *t);
        for (t, what) in around {
            eprintln!("soak:     {:.4} s {what}", at(t));
        }
    }
    // Back to the first file, then the same state as at the start.
    fs::write(&file, &a).unwrap();
    hup(&watch);
    settle();
    if s.ip(&["link", "show", "imq1"]).is_err() {
        s.imqctl_ok(&["dev", "add", "imq1"]);
        settle();
    }
    // Shaping is back where it was: the flow goes through imq0 again, whole.
    let (rx_before, _) = dev_rx(s, "imq0");
    let (end_sent, end_received, end_lost) = udp_flow_loss(c, s, addr, 2_000, Duration::from_secs(1), || {}).unwrap();
    let (rx_after, _) = dev_rx(s, "imq0");
    let status = show(s);
    let states = (device_state(&status, "imq0"), device_state(&status, "imq1"));
    eprintln!(
        "soak: after: a flow of {end_sent}, {end_received} received, {} through imq0; imq0 {}, imq1 {}",
        rx_after - rx_before,
        states.0,
        states.1
    );
    let entries_after = map_entries(s);
    let objects_after = kernel_objects();
    let rss_after = rss_kib(&watch);
    rss.push(rss_after);
    eprintln!("soak: imqctl watch resident KiB, at the start, each minute and at the end: {rss:?}");
    drop(watch);
    let _ = fs::remove_file(&file);
    eprintln!(
        "soak: {switches} rule set switches, {deletions} imq1 deletions, {flaps} imq0 flaps, {iface_flaps} s1 flaps; \
         flow sent {sent}, received {}, lost {lost}, received twice {}; maps {entries_after:?}; objects {objects_after:?}",
        sent - lost,
        flow.duplicates
    );
    assert_eq!(lost, 0, "packets lost");
    assert_eq!(flow.duplicates, 0, "packets received twice");
    assert_eq!(end_lost, 0, "packets lost after the soak");
    assert!(rx_after - rx_before >= end_sent, "the flow no longer goes through imq0");
    assert_eq!(
        states,
        ("up".to_owned(), "up".to_owned()),
        "imq devices not up after the soak"
    );
    assert_eq!(entries_after, entries_before, "map entries grew");
    // A leak of even a few hundred bytes a pass would show here over a long soak;
    // the allocator's own slack is well below this.
    assert!(
        rss_after <= rss_before + 4096,
        "imqctl watch grew from {rss_before} to {rss_after} KiB"
    );
    assert!(
        objects_after.0 <= objects_before.0
            && objects_after.1 <= objects_before.1
            && objects_after.2 <= objects_before.2,
        "kernel objects grew: {objects_before:?} -> {objects_after:?}"
    );
}
