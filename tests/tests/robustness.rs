//! imqctl killed at any point, and many imqctl at once: the state stays whole, the
//! next command works, and the data path never loses a packet or lets one pass
//! unselected on the way.

use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use imq_tests::{
    NetNs, Pair, Routed,
    check::{dev_rx, show},
    imqctl_path, require_root,
    rng::Rng,
    udp::udp_flow_loss,
    unique_id,
};
use serde_json::Value;

/// Starts `imqctl args` in `ns` without waiting for it.
fn spawn_imqctl(ns: &NetNs, args: &[&str]) -> Child {
    // `ip netns exec` execs imqctl in its own process: killing the child kills imqctl.
    ns.command(imqctl_path().unwrap().to_str().unwrap())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn imqctl")
}

/// A rule file in a temporary file; removed on drop.
struct RuleFile(std::path::PathBuf);

impl RuleFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("imq-robust-{}.toml", unique_id()));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for RuleFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The rules of a status as (interface, prio, dev, dport) — what tells sets apart.
fn rule_set(status: &Value) -> Vec<(String, u64, String, String)> {
    let mut v: Vec<_> = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["interface"].as_str().unwrap_or("").to_owned(),
                r["prio"].as_u64().unwrap_or(0),
                r["dev"].as_str().unwrap_or("").to_owned(),
                r["dport"].to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Two rule files that send the flow's port to different devices, with `extra`
/// other rules each so an apply has real work to cut short.
fn two_sets(extra: u16) -> (String, String) {
    let mut a =
        String::from("[[rule]]\ninterface = \"s0\"\nprio = 10\nproto = \"udp\"\ndport = 5320\ndev = \"imq0\"\n");
    let mut b =
        String::from("[[rule]]\ninterface = \"s0\"\nprio = 20\nproto = \"udp\"\ndport = 5320\ndev = \"imq1\"\n");
    for i in 0..extra {
        a.push_str(&format!(
            "[[rule]]\ninterface = \"s0\"\nprio = {}\nproto = \"tcp\"\ndport = {}\ndev = \"imq0\"\n",
            1000 + i,
            10_000 + i
        ));
        b.push_str(&format!(
            "[[rule]]\ninterface = \"s0\"\nprio = {}\nproto = \"tcp\"\ndport = {}\ndev = \"imq1\"\n",
            3000 + i,
            20_000 + i
        ));
    }
    (a, b)
}

/// imqctl apply (then attach and detach), killed with SIGKILL at a random moment of
/// its run, over and over while a flow runs through the rules it changes. After each kill `show` works and
/// holds one whole rule set (the old or the new), and the next apply succeeds. No
/// packet of the flow is lost, and every one went through imq0 or imq1: old rules or
/// new, never none.
#[test]
fn imqctl_killed_at_any_point_leaves_whole_state_and_loses_nothing() {
    require_root();
    let pair = Pair::new("kill").unwrap();
    let s = &pair.server;
    let (a, b) = two_sets(200);
    let (fa, fb) = (RuleFile::new(&a), RuleFile::new(&b));
    let apply = |f: &RuleFile| {
        let r = s.imqctl(&["apply", "-f", f.path()]);
        assert_eq!(r.code, 0, "apply: {}", r.stderr);
    };
    apply(&fb);
    apply(&fa);
    let set_a = rule_set(&show(s));
    apply(&fb);
    let set_b = rule_set(&show(s));
    assert_ne!(set_a, set_b);
    // How long an apply takes here, uninterrupted: kills land anywhere within it.
    let start = Instant::now();
    apply(&fa);
    apply(&fb);
    let span = start.elapsed() / 2;

    // 120 kills, or as many as about 40 s allow where an apply is slow (the emulated
    // guests: about 0.9 s each).
    let per_kill = span.as_secs_f64() * 1.5 + 0.08;
    let iterations: u64 = std::env::var("IMQ_KILL_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(((40.0 / per_kill) as u64).clamp(20, 120));
    let seed = unique_id() as u64 ^ 0x6b11_1000;
    eprintln!("{iterations} kills within {span:?} (seed {seed:#x})");
    let rx = |dev| dev_rx(s, dev).0;
    let before = rx("imq0") + rx("imq1");
    let addr: SocketAddr = format!("{}:5320", pair.server_v4()).parse().unwrap();
    let mut killed_mid_way = 0;
    let seconds = (iterations as f64 * (span.as_secs_f64() * 1.5 + 0.08)
        + (iterations / 2) as f64 * (span.as_secs_f64() * 0.5 + 0.08))
        .max(3.0);
    let (sent, received, lost) = udp_flow_loss(&pair.client, s, addr, 2_000, Duration::from_secs_f64(seconds), || {
        let mut rng = Rng::new(seed);
        let deadline = Instant::now() + Duration::from_secs_f64(seconds - 0.5);
        for i in 0..iterations {
            if Instant::now() > deadline {
                break;
            }
            let f = if i % 2 == 0 { &fa } else { &fb };
            let mut child = spawn_imqctl(s, &["apply", "-f", f.path()]);
            let delay = Duration::from_nanos(rng.next_u64() % (span.as_nanos() as u64 * 12 / 10 + 1));
            thread::sleep(delay);
            let _ = child.kill();
            let status = child.wait().unwrap();
            if status.code().is_none() {
                killed_mid_way += 1;
            }
            // Consistent: one whole set, whichever.
            let now = rule_set(&show(s));
            assert!(
                now == set_a || now == set_b,
                "after a kill at {delay:?}: a set that is neither: {} rules",
                now.len()
            );
        }
        // The next command works, and lands.
        apply(&fa);
        assert_eq!(rule_set(&show(s)), set_a);
        // attach and detach of one more rule (to a device attach creates), killed the
        // same way: afterwards the rule is there whole or not at all, and the rest is
        // untouched.
        let extra = [
            "attach", "s0", "--proto", "udp", "--dport", "7000", "--prio", "5", "--dev", "imq2",
        ];
        for i in 0..iterations / 2 {
            if Instant::now() > deadline {
                break;
            }
            let args: &[&str] = if i % 2 == 0 {
                &extra
            } else {
                &["detach", "s0", "--prio", "5"]
            };
            let mut child = spawn_imqctl(s, args);
            let delay = Duration::from_nanos(rng.next_u64() % (span.as_nanos() as u64 / 2 + 1));
            thread::sleep(delay);
            let _ = child.kill();
            if child.wait().unwrap().code().is_none() {
                killed_mid_way += 1;
            }
            let now = rule_set(&show(s));
            let rest: Vec<_> = now.iter().filter(|r| r.1 != 5).cloned().collect();
            assert_eq!(rest, set_a, "after a killed {}: the other rules changed", args[0]);
            assert!(
                now.len() == set_a.len() || now.len() == set_a.len() + 1,
                "after a killed {}: {} rules",
                args[0],
                now.len()
            );
        }
        // And the next ones work.
        let _ = s.imqctl(&["detach", "s0", "--prio", "5"]);
        s.imqctl_ok(&extra);
        s.imqctl_ok(&["detach", "s0", "--prio", "5"]);
        assert_eq!(rule_set(&show(s)), set_a);
    })
    .unwrap();
    let through = rx("imq0") + rx("imq1") - before;
    eprintln!(
        "{killed_mid_way} of {} applies, attaches and detaches killed mid-way; flow: sent {sent}, received {received}, \
         lost {lost}; {through} through imq0/imq1",
        iterations + iterations / 2
    );
    assert!(
        killed_mid_way >= iterations / 2,
        "too few kills landed mid-way: {killed_mid_way}"
    );
    assert_eq!(lost, 0, "packets lost");
    assert_eq!(through, sent, "every packet went through imq0 or imq1");
}

/// Many imqctl at once, in one namespace and in several: each change lands whole, and
/// the result is what one after the other would give.
#[test]
fn many_imqctl_at_once_land_as_if_one_after_the_other() {
    require_root();
    let routed = Routed::new("race", 3).unwrap();
    let nss: Vec<&NetNs> = [&routed.router, &routed.server]
        .into_iter()
        .chain(&routed.clients)
        .collect();
    // 1. Distinct attaches at once: 12 in the router, 4 in each other namespace.
    let mut children = Vec::new();
    for (n, ns) in nss.iter().enumerate() {
        let (iface, count) = match n {
            0 => ("r0", 12),
            1 => ("s0", 4),
            _ => ("c0", 4),
        };
        for i in 0..count {
            let port = (6000 + i).to_string();
            let prio = (100 + i).to_string();
            let dev = format!("imq{}", i % 3);
            let args: Vec<String> = [
                "attach", iface, "--proto", "udp", "--dport", &port, "--prio", &prio, "--dev", &dev,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            children.push((ns.name().to_owned(), spawn_imqctl(ns, &args)));
        }
    }
    let processes = children.len();
    for (ns, c) in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{ns}: {}", String::from_utf8_lossy(&out.stderr));
    }
    for (n, ns) in nss.iter().enumerate() {
        let want = if n == 0 { 12 } else { 4 };
        let got = rule_set(&show(ns));
        assert_eq!(got.len(), want, "{}: {got:?}", ns.name());
    }

    // 2. Whole files at once in one namespace: the last to land wins whole; no mix.
    let files: Vec<(String, RuleFile)> = (0..8)
        .map(|k| {
            let mut t = String::new();
            for i in 0..40 {
                t.push_str(&format!(
                    "[[rule]]\ninterface = \"r0\"\nprio = {}\nproto = \"tcp\"\ndport = {}\ndev = \"imq{}\"\n",
                    10 + i,
                    1000 * (k + 1) + i,
                    k % 4
                ));
            }
            (t.clone(), RuleFile::new(&t))
        })
        .collect();
    let router = &routed.router;
    let mut sets = Vec::new();
    for (_, f) in &files {
        router.imqctl_ok(&["apply", "-f", f.path()]);
        sets.push(rule_set(&show(router)));
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Meanwhile, reads: each sees one whole set.
    let reader = {
        let (name, stop, sets) = (router.name().to_owned(), stop.clone(), sets.clone());
        thread::spawn(move || {
            let ns = NetNs::adopt(&name);
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let now = rule_set(&show(&ns));
                assert!(sets.contains(&now), "a read saw a mix of {} rules", now.len());
                reads += 1;
            }
            reads
        })
    };
    let rounds = if imq_tests::emulated() { 1 } else { 3 };
    for round in 0..rounds {
        let children: Vec<Child> = files
            .iter()
            .map(|(_, f)| spawn_imqctl(router, &["apply", "-f", f.path()]))
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let now = rule_set(&show(router));
        assert!(sets.contains(&now), "round {round}: the final state is no file's");
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    eprintln!(
        "{processes} attaches at once in 5 namespaces, then {rounds} × 8 applies at once with {reads} reads: all whole"
    );
}
