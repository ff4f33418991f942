//! imq's pinned state lives as long as the network namespace it serves: when a
//! namespace is deleted, the next imqctl (in any namespace) removes its pins, and with
//! them its maps, programs and links. On a container host the state of namespaces
//! that come and go would otherwise grow without bound, and each one's device hook
//! would keep running on every device event of the host.

use std::{collections::HashSet, path::Path, thread, time::Duration};

use aya::{
    maps::{MapInfo, loaded_maps},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_links, loaded_programs,
    },
};
use imq_tests::{Pair, check::show, require_root};

/// Polls `done` every 100 ms for up to `secs` seconds.
fn within(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 10 {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    done()
}

/// The kernel ids of what a namespace's state pins: its device hook's link and
/// program, and its rules map.
fn pinned_ids(dir: &Path) -> (u32, u32, u32) {
    let link: FdLink = PinnedLink::from_pin(dir.join("link_netdev_event"))
        .expect("the device hook's link is pinned")
        .into();
    let info = link.info().expect("link info");
    let map = MapInfo::from_pin(dir.join("imq_rules")).expect("the rules map is pinned");
    (info.id(), info.program_id(), map.id())
}

/// The namespace's device hook (fentry) sees its loopback device unregister, which
/// is how imq knows it is gone.
#[test]
#[ignore = "needs tracing programs (fentry), which this machine's kernel refuses: `cargo xtask vm-test` runs it"]
fn the_state_of_a_deleted_namespace_is_reclaimed() {
    require_root();
    let live = Pair::new("alive").unwrap();
    live.server.imqctl_ok(&["attach", "s0"]);
    let gone = Pair::new("gone").unwrap();
    gone.server.imqctl_ok(&["attach", "s0", "--dev", "imq3"]);
    gone.server.imqctl_ok(&["attach", "s0", "--direction", "egress"]);
    let dir = gone.server.imq_state_dir();
    assert!(dir.is_dir(), "no state at {}", dir.display());
    let (link, prog, map) = pinned_ids(&dir);

    // Deleted as a container runtime would: no imqctl flush first.
    let out = std::process::Command::new("ip")
        .args(["netns", "del", gone.server.name()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip netns del: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The kernel tears a namespace down in a work queue, a moment later; any imqctl
    // afterwards, here one in the live namespace, finds it gone.
    assert!(
        within(10, || {
            live.server.imqctl_ok(&["show"]);
            !dir.exists()
        }),
        "{} is still there",
        dir.display()
    );
    // Unpinned is freed: nothing else held them.
    let freed = within(5, || {
        let links: HashSet<u32> = loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
        let progs: HashSet<u32> = loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
        let maps: HashSet<u32> = loaded_maps().filter_map(Result::ok).map(|m| m.id()).collect();
        !links.contains(&link) && !progs.contains(&prog) && !maps.contains(&map)
    });
    assert!(
        freed,
        "link {link}, program {prog} or map {map} of the deleted namespace is still loaded"
    );

    // The live namespace's state is untouched, and it still works.
    let status = show(&live.server);
    assert_eq!(status["rules"].as_array().unwrap().len(), 1, "{status}");
    assert!(live.server.imq_state_dir().is_dir());
    imq_tests::check::tbf(&live.server, "imq0", 10);
    imq_tests::check::assert_pair_rate(&live, 10.0 * 0.96, "the live namespace, after");
}
