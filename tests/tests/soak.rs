//! The soak run (`cargo xtask soak --minutes N`; ignored in the test suite): a
//! sequenced UDP flow through imq for N minutes while `imqctl watch` keeps a rule file
//! in place and everything around it churns: the file switches between two rule sets
//! (the flow's port into imq0 or imq1, with 500 other rules each) and is reloaded,
//! a second interface with rules of its own flaps, and, where the kernel allows the
//! device hook that follows imq devices at once, imq1 is deleted behind imq's back and
//! imq0 taken down and up. Reconciled at the end: every packet sent was received (nothing
//! blackholed), and the pinned maps hold as many entries and the kernel as many imq
//! programs, maps and links as after the first apply.

use std::{
    fs,
    net::SocketAddr,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::{
    maps::{MapInfo, loaded_maps},
    programs::{loaded_links, loaded_programs},
};
use imq_tests::{NetNs, Pair, check::show, imqctl_path, require_root, udp::udp_flow_loss, unique_id};

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
    let watch = Watch(
        s.command(imqctl.to_str().unwrap())
            .args(["watch", "-f", file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let settle = || thread::sleep(Duration::from_millis(1500));
    settle();
    s.imqctl_ok(&["dev", "add", "imq1"]);
    settle();
    let entries_before = map_entries(s);
    let objects_before = kernel_objects();
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
    let (mut switches, mut deletions, mut flaps, mut iface_flaps) = (0u64, 0u64, 0u64, 0u64);
    let addr: SocketAddr = format!("{}:5320", pair.server_v4()).parse().unwrap();
    let (sent, received, lost) = udp_flow_loss(c, s, addr, 2_000, Duration::from_secs(seconds), || {
        let end = Instant::now() + Duration::from_secs(seconds.saturating_sub(3));
        let mut i = 0u64;
        while Instant::now() < end {
            i += 1;
            fs::write(&file, if i.is_multiple_of(2) { &a } else { &b }).unwrap();
            hup(&watch);
            switches += 1;
            thread::sleep(Duration::from_millis(400));
            // Without the device hook a device deleted or taken down behind imq's
            // back drops what is sent to it until watch hears of it (README, Limits):
            // that is measured where the hook runs.
            if tracks && i.is_multiple_of(7) {
                let _ = s.ip(&["link", "del", "imq1"]);
                deletions += 1;
            }
            if tracks && i.is_multiple_of(5) {
                s.ip(&["link", "set", "imq0", "down"]).unwrap();
                thread::sleep(Duration::from_millis(200));
                s.ip(&["link", "set", "imq0", "up"]).unwrap();
                flaps += 1;
            }
            if i.is_multiple_of(3) {
                s.ip(&["link", "set", "s1", "down"]).unwrap();
                s.ip(&["link", "set", "s1", "up"]).unwrap();
                iface_flaps += 1;
            }
            thread::sleep(Duration::from_millis(400));
        }
    })
    .unwrap();
    // Back to the first file, then the same state as at the start.
    fs::write(&file, &a).unwrap();
    hup(&watch);
    settle();
    if s.ip(&["link", "show", "imq1"]).is_err() {
        s.imqctl_ok(&["dev", "add", "imq1"]);
        settle();
    }
    let entries_after = map_entries(s);
    let objects_after = kernel_objects();
    drop(watch);
    let _ = fs::remove_file(&file);
    eprintln!(
        "soak: {switches} rule set switches, {deletions} imq1 deletions, {flaps} imq0 flaps, {iface_flaps} s1 flaps; \
         flow sent {sent}, received {received}, lost {lost}; maps {entries_after:?}; objects {objects_after:?}"
    );
    assert_eq!(lost, 0, "packets lost");
    assert_eq!(entries_after, entries_before, "map entries grew");
    assert!(
        objects_after.0 <= objects_before.0
            && objects_after.1 <= objects_before.1
            && objects_after.2 <= objects_before.2,
        "kernel objects grew: {objects_before:?} -> {objects_after:?}"
    );
}
