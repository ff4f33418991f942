//! `imqctl watch`: a rule file kept in place while interfaces and imq devices come
//! and go, reloaded on SIGHUP, left in place on SIGTERM. Every step is checked with
//! real traffic or the kernel's own view, and by the line watch logged for it.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use imq_tests::{
    NetNs, Pair,
    check::{assert_pair_rate, assert_pair_unshaped, dev_rx, device_state, show, tbf},
    imqctl_path, ping, require_root, unique_id,
};
use serde_json::Value;

/// A running `imqctl watch -f FILE` in a namespace, its stderr in a file; SIGKILLed
/// on drop if a test ends before it stopped.
struct Watcher {
    child: Child,
    log: PathBuf,
    file: PathBuf,
    /// Bytes of the log already matched by `wait_for`.
    seen: usize,
}

impl Watcher {
    fn start(ns: &NetNs, config: &str) -> Self {
        Self::start_with(ns, config, &[])
    }

    fn start_with(ns: &NetNs, config: &str, extra: &[&str]) -> Self {
        let id = unique_id();
        let file = std::env::temp_dir().join(format!("imq-watch-{}-{id}.toml", ns.name()));
        let log = std::env::temp_dir().join(format!("imq-watch-{}-{id}.log", ns.name()));
        fs::write(&file, config).unwrap();
        let imqctl = imqctl_path().expect("no imqctl binary: run `cargo xtask build` or set IMQCTL");
        let child = ns
            .command(imqctl.to_str().unwrap())
            .args(["watch", "-f", file.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut w = Self {
            child,
            log,
            file,
            seen: 0,
        };
        w.wait_for("watching ");
        w
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (10 s at most) for a line containing `what` logged after the last
    /// line matched; returns that line.
    fn wait_for(&mut self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(pos) = log[self.seen..].find(what) {
                let start = self.seen + pos;
                let end = log[start..].find('\n').map_or(log.len(), |e| start + e);
                self.seen = end;
                let line_start = log[..start].rfind('\n').map_or(0, |s| s + 1);
                return log[line_start..end].to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("watch exited ({status}) before logging {what:?}; its log:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "watch did not log {what:?} within 10 s; its log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) of our own child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill {sig}: {}", std::io::Error::last_os_error());
    }

    fn rewrite(&self, config: &str) {
        fs::write(&self.file, config).unwrap();
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
        let _ = fs::remove_file(&self.file);
    }
}

/// The client–server veth of `pair` again, as `Pair::new` made it.
fn recreate_link(pair: &Pair) {
    let net = pair.id % 250;
    pair.client.veth("c0", &pair.server, "s0").unwrap();
    for (ns, dev, host) in [(&pair.client, "c0", 1), (&pair.server, "s0", 2)] {
        ns.ip(&["addr", "add", &format!("198.18.{net}.{host}/24"), "dev", dev])
            .unwrap();
        ns.ip(&[
            "addr",
            "add",
            &format!("2001:db8:{net:x}::{host}/64"),
            "dev",
            dev,
            "nodad",
        ])
        .unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
}

fn rules(status: &Value) -> Vec<Value> {
    status["rules"].as_array().unwrap().clone()
}

fn ifindex(ns: &NetNs, dev: &str) -> u64 {
    let v: Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", dev]).unwrap()).unwrap();
    v[0]["ifindex"].as_u64().unwrap()
}

#[test]
fn watch_follows_interfaces_and_devices_and_leaves_the_rules_on_sigterm() {
    require_root();
    let pair = Pair::new("watch").unwrap();
    let s = &pair.server;
    let mut w = Watcher::start(s, "[[rule]]\ninterface = \"s0\"\n");
    let line = w.wait_for("applied ");
    assert!(line.contains("1 rule(s) (1 added, 0 removed)"), "{line}");
    let status = show(s);
    assert_eq!(rules(&status).len(), 1, "{status}");
    assert_eq!(rules(&status)[0]["attached"], true, "{status}");
    tbf(s, "imq0", 10);
    assert_pair_rate(&pair, 9.6, "shaped at start");

    // The interface is deleted (its rules with it) and comes back: re-attached.
    s.ip(&["link", "del", "s0"]).unwrap();
    w.wait_for("s0 is gone");
    recreate_link(&pair);
    w.wait_for("s0 appeared");
    w.wait_for("applied ");
    let status = show(s);
    assert_eq!(rules(&status).len(), 1, "{status}");
    assert_eq!(rules(&status)[0]["ifindex"], ifindex(s, "s0"), "{status}");
    assert_eq!(rules(&status)[0]["attached"], true, "{status}");
    assert_pair_rate(&pair, 9.6, "shaped after re-creation");

    // imq0 taken down by hand: recorded at once, so its traffic passes unshaped
    // instead of being dropped (on every kernel, with or without the device hook).
    s.ip(&["link", "set", "imq0", "down"]).unwrap();
    w.wait_for("imq0 is down");
    assert_eq!(device_state(&show(s), "imq0"), "down");
    assert_eq!(
        ping(&pair.client, &pair.server_v4(), 20),
        20,
        "pings while imq0 is down"
    );
    assert_pair_unshaped(&pair, "imq0 down");
    s.ip(&["link", "set", "imq0", "up"]).unwrap();
    w.wait_for("imq0 is up");
    assert_eq!(device_state(&show(s), "imq0"), "up");
    assert_pair_rate(&pair, 9.6, "shaped when up again");

    // imq0 deleted: re-created, registered, and receiving the traffic again.
    s.ip(&["link", "del", "imq0"]).unwrap();
    w.wait_for("imq0 was deleted");
    w.wait_for("applied ");
    assert_eq!(device_state(&show(s), "imq0"), "up");
    let before = dev_rx(s, "imq0").0;
    assert_eq!(
        ping(&pair.client, &pair.server_v4(), 10),
        10,
        "pings after imq0 came back"
    );
    let queued = dev_rx(s, "imq0").0 - before;
    assert!(queued >= 10, "imq0 received {queued} packets for 10 pings");

    // SIGTERM: exits 0 and leaves the data path in place.
    w.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = w.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "watch still runs 5 s after SIGTERM:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "watch exited {status}:\n{}", w.log());
    w.wait_for("SIGTERM: exiting");
    let status = show(s);
    assert_eq!(rules(&status).len(), 1, "{status}");
    assert_eq!(rules(&status)[0]["attached"], true, "{status}");
    let before = dev_rx(s, "imq0").0;
    assert_eq!(ping(&pair.client, &pair.server_v4(), 5), 5);
    assert!(dev_rx(s, "imq0").0 - before >= 5, "imq0 still receives s0's traffic");
}

#[test]
fn watch_reloads_a_good_file_on_sighup_and_keeps_running_on_a_bad_one() {
    require_root();
    let pair = Pair::new("wrel").unwrap();
    let s = &pair.server;
    let first = "[[rule]]\ninterface = \"s0\"\nproto = \"tcp\"\ndport = 5201\n";
    // s9 does not exist yet: its rule waits for it.
    let second = "[[rule]]\ninterface = \"s0\"\nproto = \"udp\"\ndport = 5202\n\n\
                  [[rule]]\ninterface = \"s9\"\ndev = \"imq1\"\n";
    let mut w = Watcher::start(s, first);
    w.wait_for("applied ");
    let dports = |status: &Value| -> Vec<String> {
        rules(status)
            .iter()
            .map(|r| format!("{} {}", r["interface"].as_str().unwrap(), r["dport"]))
            .collect()
    };
    assert_eq!(dports(&show(s)), ["s0 \"5201\""]);

    w.rewrite(second);
    w.signal(libc::SIGHUP);
    w.wait_for("reloaded ");
    let line = w.wait_for("applied ");
    assert!(line.contains("waiting for s9"), "{line}");
    assert_eq!(dports(&show(s)), ["s0 \"5202\""]);

    // s9 appears: its rule is attached.
    let other = NetNs::new(format!("imq-wrel-{}-o", unique_id())).unwrap();
    s.veth("s9", &other, "o0").unwrap();
    w.wait_for("s9 appeared");
    w.wait_for("applied ");
    let status = show(s);
    assert_eq!(dports(&status), ["s0 \"5202\"", "s9 null"], "{status}");

    // A bad file is refused with its line, and the running setup stays.
    let export = s.imqctl_ok(&["export"]);
    w.rewrite("[[rule]]\ninterface = \"s0\"\nport = 80\n");
    w.signal(libc::SIGHUP);
    let line = w.wait_for("reload refused");
    assert!(line.contains("line 1") || line.contains("line 3"), "{line}");
    assert!(line.contains("port"), "{line}");
    assert_eq!(s.imqctl_ok(&["export"]), export);
    assert!(w.child.try_wait().unwrap().is_none(), "watch exited on a bad file");

    // Fixed and reloaded: taken.
    w.rewrite(first);
    w.signal(libc::SIGHUP);
    w.wait_for("reloaded ");
    w.wait_for("applied ");
    assert_eq!(dports(&show(s)), ["s0 \"5201\""]);
}

#[test]
fn watch_refuses_a_bad_file_at_start_and_changes_nothing() {
    require_root();
    let pair = Pair::new("wbad").unwrap();
    let s = &pair.server;
    let path = std::env::temp_dir().join(format!("imq-watch-bad-{}.toml", unique_id()));
    fs::write(&path, "[[rule]]\ninterface = \"s0\"\nmark = \"0xzz\"\n").unwrap();
    let r = s.imqctl(&["watch", "-f", path.to_str().unwrap()]);
    let _ = fs::remove_file(&path);
    assert_ne!(r.code, 0);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("line 1: invalid mark"), "{}", r.stderr);
    assert!(rules(&show(s)).is_empty());
    assert!(s.ip(&["link", "show", "imq0"]).is_err(), "imq0 was created");
}

/// One HTTP GET of `path` on the namespace's 127.0.0.1:`port`: (status line, body).
fn http_get(ns: &NetNs, port: u16, path: &str, accept: &str) -> (String, String) {
    use std::io::{Read as _, Write as _};
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n\r\n");
    let reply = ns
        .spawn(move || {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(request.as_bytes())?;
            let mut reply = String::new();
            c.read_to_string(&mut reply)?;
            Ok(reply)
        })
        .join()
        .unwrap()
        .unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    (head.to_owned(), body.to_owned())
}

#[test]
fn watch_serves_metrics_that_prometheus_can_scrape() {
    require_root();
    let pair = Pair::new("wmet").unwrap();
    let s = &pair.server;
    let mut w = Watcher::start_with(
        s,
        "[[rule]]\ninterface = \"s0\"\nproto = \"icmp\"\n",
        &["--metrics", "127.0.0.1:9464"],
    );
    w.wait_for("applied ");
    assert_eq!(ping(&pair.client, &pair.server_v4(), 15), 15);

    let (head, body) = http_get(s, 9464, "/metrics", "text/plain");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let packets = scrape
        .samples
        .iter()
        .find(|x| x.metric == "imq_rule_packets_total" && x.labels.get("interface") == Some("s0"))
        .map(|x| x.value.clone());
    assert_eq!(packets, Some(prometheus_parse::Value::Counter(15.0)), "{body}");

    // A scraper that asks for OpenMetrics gets it.
    let (head, body) = http_get(
        s,
        9464,
        "/metrics",
        "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
    );
    assert!(head.contains("application/openmetrics-text; version=1.0.0"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let (head, _) = http_get(s, 9464, "/", "*/*");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // An address that is taken is refused at start, in one line.
    let r = s.imqctl(&["watch", "-f", "/dev/null", "--metrics", "127.0.0.1:9464"]);
    assert_ne!(r.code, 0);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("127.0.0.1:9464"), "{}", r.stderr);
}

#[test]
fn watch_sets_a_deleted_device_up_again_with_its_qdiscs() {
    require_root();
    let pair = Pair::new("wdev").unwrap();
    let s = &pair.server;
    let config = "[[device]]\nname = \"imq1\"\nqdisc = [\n  \"qdisc add root handle 1: htb default 10\",\n  \
                  \"class add parent 1: classid 1:10 htb rate 10mbit\",\n]\n\n\
                  [[rule]]\ninterface = \"s0\"\ndev = \"imq1\"\n";
    let mut w = Watcher::start(s, config);
    w.wait_for("applied ");
    assert_pair_rate(&pair, 9.6, "HTB 10mbit on imq1");

    s.ip(&["link", "del", "imq1"]).unwrap();
    w.wait_for("imq1 was deleted");
    w.wait_for("applied ");
    let classes = s.tc(&["class", "show", "dev", "imq1"]).unwrap();
    assert!(classes.contains("rate 10Mbit"), "{classes}");
    assert_eq!(device_state(&show(s), "imq1"), "up");
    assert_pair_rate(&pair, 9.6, "imq1 set up again");

    // Re-created behind imq's back, without qdiscs: set up again too.
    s.ip(&["link", "del", "imq1"]).unwrap();
    s.ip(&["link", "add", "imq1", "type", "ifb"]).unwrap();
    s.ip(&["link", "set", "imq1", "up"]).unwrap();
    w.wait_for("applied ");
    let classes = s.tc(&["class", "show", "dev", "imq1"]).unwrap();
    assert!(classes.contains("rate 10Mbit"), "{classes}\n{}", w.log());
    assert_pair_rate(&pair, 9.6, "imq1 re-created by hand");
}

#[test]
fn watch_follows_an_interface_renamed_away_and_back_and_one_moved_in() {
    require_root();
    let pair = Pair::new("wren").unwrap();
    let s = &pair.server;
    let mut w = Watcher::start(s, "[[rule]]\ninterface = \"s0\"\n\n[[rule]]\ninterface = \"m0\"\n");
    let line = w.wait_for("applied ");
    assert!(line.contains("waiting for m0"), "{line}");
    tbf(s, "imq0", 10);
    assert_pair_rate(&pair, 9.6, "s0 shaped");

    // Renamed: no longer the interface the file names, so its rule goes. (Kernels
    // before 6.x refuse to rename an interface that is up.)
    let rename = |from: &str, to: &str| {
        s.ip(&["link", "set", from, "down"]).unwrap();
        s.ip(&["link", "set", from, "name", to]).unwrap();
        s.ip(&["link", "set", to, "up"]).unwrap();
    };
    rename("s0", "wan9");
    w.wait_for("s0 is gone");
    w.wait_for("applied ");
    assert!(rules(&show(s)).is_empty());
    assert_pair_unshaped(&pair, "renamed away");
    // Renamed back: the same interface instance gets its rule again.
    rename("wan9", "s0");
    w.wait_for("s0 appeared");
    w.wait_for("applied ");
    assert_pair_rate(&pair, 9.6, "renamed back");

    // An interface moved into the namespace (a container's veth, say).
    let other = NetNs::new(format!("imq-wren-{}-o", unique_id())).unwrap();
    other
        .ip(&["link", "add", "m0", "type", "veth", "peer", "name", "m1"])
        .unwrap();
    other.ip(&["link", "set", "m0", "netns", s.name()]).unwrap();
    w.wait_for("m0 appeared");
    let line = w.wait_for("applied ");
    assert!(line.contains("2 rule(s)"), "{line}");
    let status = show(s);
    let attached: Vec<(String, bool)> = rules(&status)
        .iter()
        .map(|r| (r["interface"].as_str().unwrap().to_owned(), r["attached"] == true))
        .collect();
    assert_eq!(attached, [("m0".to_owned(), true), ("s0".to_owned(), true)], "{status}");
}
