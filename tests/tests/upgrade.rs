//! A newer imqctl replaces the programs an older build pinned, in place: every hook
//! (TCX link, cls_bpf filter, device hook) runs the new build's program afterwards,
//! the rules, counters and devices stay, and no packet is lost or passes unselected
//! while it happens. An older build's state is made here by renaming the build marker
//! (`programs-<hash>`) of state this build made: to imqctl that is exactly what
//! another build left (its programs are then replaced by the same code, which changes
//! nothing the test could tell apart but the program ids, which it checks).

use std::{collections::HashSet, net::SocketAddr, path::Path, thread, time::Duration};

use aya::programs::{
    ProgramInfo,
    links::{FdLink, PinnedLink},
    loaded_programs,
};
use imq_tests::{
    NetNs, Pair,
    check::{assert_rate, show, tbf},
    require_root,
    udp::udp_flow_loss,
};
use serde_json::Value;

/// The id of the program pinned at `dir/name`, if there is one.
fn pinned_prog(dir: &Path, name: &str) -> Option<u32> {
    ProgramInfo::from_pin(dir.join(name)).ok().map(|p| p.id())
}

/// The program a pinned link runs.
fn link_prog(path: &Path) -> u32 {
    let link: FdLink = PinnedLink::from_pin(path).expect("pinned link").into();
    link.info().expect("link info").program_id()
}

/// The programs the hooks of `ns`'s state run: TCX links and the device hook (from
/// their pins), imq's cls_bpf filters (from tc).
fn hook_progs(ns: &NetNs, dev: &str) -> Vec<u32> {
    let dir = ns.imq_state_dir();
    let mut ids: Vec<u32> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .map(|e| link_prog(&e.path()))
        .collect();
    for direction in ["ingress", "egress"] {
        let out = ns
            .tc(&["-j", "filter", "show", "dev", dev, direction])
            .unwrap_or_default();
        let filters: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        for f in filters.as_array().into_iter().flatten() {
            if f["kind"] == "bpf"
                && let Some(id) = f["options"]["prog"]["id"].as_u64()
            {
                ids.push(id as u32);
            }
        }
    }
    ids.sort_unstable();
    ids
}

/// Makes the state of `ns` look as another build left it.
fn age(ns: &NetNs) {
    let dir = ns.imq_state_dir();
    let marker = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("programs-"))
        .expect("a build marker")
        .path();
    std::fs::remove_dir(&marker).unwrap();
    std::fs::create_dir(dir.join("programs-0123456789abcdef")).unwrap();
}

#[test]
fn a_newer_build_replaces_the_pinned_programs_in_place() {
    require_root();
    let pair = Pair::new("upgrade").unwrap();
    let (c, s) = (&pair.client, &pair.server);
    // Ingress on the server (TCX or cls_bpf, as the kernel has it), egress on the
    // client (cls_bpf), each into a TBF; port 5320 for the UDP flow into the server's.
    s.imqctl_ok(&["attach", "s0", "--proto", "udp", "--dport", "5320", "--dev", "imq1"]);
    s.imqctl_ok(&["attach", "s0", "--proto", "tcp", "--dport", "5201"]);
    tbf(s, "imq0", 10);
    c.imqctl_ok(&[
        "attach",
        "c0",
        "--direction",
        "egress",
        "--proto",
        "tcp",
        "--dport",
        "5202",
    ]);
    tbf(c, "imq0", 20);
    let (s_dir, c_dir) = (s.imq_state_dir(), c.imq_state_dir());
    let before: Vec<u32> = [hook_progs(s, "s0"), hook_progs(c, "c0")].concat();
    let pinned_before: Vec<u32> = ["prog_ingress", "prog_ingress_cls", "prog_egress"]
        .iter()
        .flat_map(|n| [pinned_prog(&s_dir, n), pinned_prog(&c_dir, n)])
        .flatten()
        .collect();
    assert!(before.len() >= 2, "hooks of both namespaces: {before:?}");

    age(s);
    age(c);
    // The server's programs are replaced by the first command there, during a flow
    // its ingress rule selects.
    let addr: SocketAddr = format!("{}:5320", pair.server_v4()).parse().unwrap();
    let (sent, received, lost) = udp_flow_loss(c, s, addr, 20_000, Duration::from_secs(3), || {
        thread::sleep(Duration::from_secs(1));
        s.imqctl_ok(&["show"]);
    })
    .unwrap();
    eprintln!("flow while the programs were replaced: sent {sent}, received {received}, lost {lost}");
    assert_eq!(lost, 0, "packets lost while the programs were replaced");
    c.imqctl_ok(&["show"]);

    let after: Vec<u32> = [hook_progs(s, "s0"), hook_progs(c, "c0")].concat();
    assert_eq!(after.len(), before.len(), "the same hooks: {before:?} -> {after:?}");
    let old: HashSet<u32> = before.iter().chain(&pinned_before).copied().collect();
    assert!(
        after.iter().all(|id| !old.contains(id)),
        "a hook still runs an old program: {before:?} -> {after:?}"
    );
    // Nothing holds the old programs any more: they are freed.
    thread::sleep(Duration::from_millis(500));
    let loaded: HashSet<u32> = loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
    assert!(old.is_disjoint(&loaded), "old programs still loaded: {old:?}");
    for dir in [&s_dir, &c_dir] {
        assert!(
            !dir.join("programs-0123456789abcdef").exists(),
            "the old marker stays in {}",
            dir.display()
        );
    }

    // Rules and counters stayed; every packet of the flow was selected.
    let status = show(s);
    let udp = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dev"] == "imq1")
        .unwrap_or_else(|| panic!("{status}"));
    assert!(udp["packets"].as_u64().unwrap() >= sent, "{udp}");
    assert_eq!(status["rules"].as_array().unwrap().len(), 2, "{status}");
    assert_rate(
        imq_tests::check::goodput(c, s, &pair.server_v4(), 5201),
        9.6,
        0.15,
        "ingress, after",
    );
    assert_rate(
        imq_tests::check::goodput(c, s, &pair.server_v4(), 5202),
        19.2,
        0.15,
        "egress, after",
    );
    // A second command has nothing left to replace.
    let again = hook_progs(s, "s0");
    s.imqctl_ok(&["show"]);
    assert_eq!(hook_progs(s, "s0"), again, "programs replaced twice");
}
