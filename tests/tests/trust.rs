//! Who imq's pinned state trusts: a bpffs that imqctl mounts is root's alone (mode
//! 0700, nosuid, nodev, noexec), and an `imq/` directory another user made, or may
//! write to, is refused in one line before anything changes.
//!
//! Every mount here happens in a private mount namespace (`unshare --mount`) that dies
//! with the command: the host's mounts are never touched.

use std::process::Command;

use imq_tests::{Pair, imqctl_path, require_root};

/// Runs `script` with sh in a private mount namespace (and a new pid namespace when
/// `new_pid_ns`, where imqctl sees no ancestor outside it); returns (exit code,
/// stdout, stderr).
fn in_private_mount_ns(script: &str, new_pid_ns: bool) -> (i32, String, String) {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private"]);
    if new_pid_ns {
        c.args(["--pid", "--fork", "--mount-proc"]);
    }
    let out = c
        .args(["sh", "-c", script])
        .env("IMQCTL", imqctl_path().expect("no imqctl binary"))
        .output()
        .expect("run unshare");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With no bpffs on /sys/fs/bpf, imqctl mounts one: for root alone, and with no
/// devices, setuid files or executables in it.
#[test]
fn trust_bpffs_imqctl_mounts_is_roots_alone() {
    require_root();
    // The private namespace's /sys/fs/bpf unmounted (lazily, should something hold
    // it), then any imqctl command; then what it mounted.
    let script = r#"
        umount -l /sys/fs/bpf 2>/dev/null
        if grep -q " /sys/fs/bpf bpf " /proc/self/mounts; then echo "still mounted"; exit 1; fi
        "$IMQCTL" show >/dev/null || exit 1
        stat -c '%a %u' /sys/fs/bpf
        grep " /sys/fs/bpf bpf " /proc/self/mounts
    "#;
    let (code, out, err) = in_private_mount_ns(script, true);
    assert_eq!(code, 0, "{out}{err}");
    let mut lines = out.lines();
    // The kernel always adds the sticky bit to a bpffs root (bpf_fill_super).
    assert_eq!(lines.next(), Some("1700 0"), "mode and owner of the bpffs root: {out}");
    let mount = lines.next().expect("the bpffs mount");
    let options: Vec<&str> = mount.split_whitespace().nth(3).unwrap().split(',').collect();
    for want in ["nosuid", "nodev", "noexec", "mode=700"] {
        assert!(options.contains(&want), "{want} missing from {mount}");
    }
}

/// An `imq/` directory that is not root's, or that others may write to, is refused in
/// one line, and nothing is created: no device, no pinned state.
#[test]
fn trust_refuses_imq_state_another_user_could_touch() {
    require_root();
    let pair = Pair::new("trust").unwrap();
    let ns = pair.server.name();
    for (setup, says) in [
        ("chown 65534 $d/imq", "is owned by uid 65534, not root"),
        ("chmod 0777 $d/imq", "is writable by other users (mode 777)"),
        ("chmod 0720 $d/imq", "is writable by other users (mode 720)"),
        ("rmdir $d/imq && ln -s /tmp $d/imq", "is not a directory"),
    ] {
        // A bpffs of the test's own, mounted the way a careless setup would (1777),
        // with an imq/ directory prepared as `setup` says.
        let script = format!(
            r#"
            d=$(mktemp -d) && mount -t bpf bpf "$d" && chmod 1777 "$d" && mkdir -m 0700 "$d/imq" && {setup} || exit 99
            ip netns exec {ns} "$IMQCTL" --bpffs "$d" attach s0 2>&1
            echo "exit $?"
            ls -d "$d"/imq/net-* 2>/dev/null | grep -c . || true
            "#
        );
        let (code, out, err) = in_private_mount_ns(&script, false);
        assert_eq!(code, 0, "{setup}: {out}{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{setup}: one line of error, the exit, the count: {out}");
        assert!(
            lines[0].starts_with("imqctl: ") && lines[0].contains(says),
            "{setup}: {out}"
        );
        assert!(lines[0].contains("refusing imq state"), "{setup}: {out}");
        assert_ne!(lines[1], "exit 0", "{setup}: {out}");
        assert_eq!(lines[2], "0", "{setup}: no namespace state created in imq/: {out}");
        assert!(
            pair.server.ip(&["link", "show", "imq0"]).is_err(),
            "{setup}: no imq device created"
        );
    }
}

/// The namespace directories under the host's `imq/`.
fn state_dirs() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/fs/bpf/imq")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Without the host's CAP_NET_ADMIN and CAP_BPF (or CAP_SYS_ADMIN) imqctl refuses in
/// one line and changes nothing: as root with every other capability dropped, as
/// another user holding CAP_NET_ADMIN alone, and as root of a user namespace (which
/// holds every capability there, and none that reaches BPF).
#[test]
fn trust_without_the_hosts_capabilities_imqctl_refuses_and_changes_nothing() {
    require_root();
    let pair = Pair::new("caps").unwrap();
    let s = &pair.server;
    let imqctl = imqctl_path().unwrap();
    let imqctl = imqctl.to_str().unwrap();
    // The namespace's links by name (their carrier may still be coming up).
    let links = || {
        let mut v: Vec<String> = s
            .ip(&["-o", "link", "show"])
            .unwrap()
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
            .collect();
        v.sort();
        v
    };
    let links_before = links();
    let dirs_before = state_dirs();
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "root with CAP_NET_ADMIN alone",
            vec!["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all", imqctl],
            "needs root",
        ),
        (
            "uid 65534 with CAP_NET_ADMIN (ambient)",
            vec![
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all,+net_admin",
                "--ambient-caps=-all,+net_admin",
                imqctl,
            ],
            "needs root",
        ),
        (
            "root of a user namespace",
            vec!["unshare", "--user", "--map-root-user", imqctl],
            "user namespace",
        ),
    ];
    for (what, argv, says) in cases {
        let out = s
            .command(argv[0])
            .args(&argv[1..])
            .args(["attach", "s0", "--dev", "imq5"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: attach succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err:?}");
        assert!(err.starts_with("imqctl: ") && err.contains(says), "{what}: {err:?}");
        assert_eq!(links(), links_before, "{what}: links changed");
        assert_eq!(state_dirs(), dirs_before, "{what}: state created");
    }
}

/// Creates a BPF array map (`value_size` bytes, `entries` of them) and pins it at
/// `path`, as someone other than imq might.
fn pin_foreign_array(path: &std::path::Path, value_size: u32, entries: u32) {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u64 = 2;
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (64 KiB by default).
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| {
        // SAFETY: a zeroed union bpf_attr of 128 bytes, filled in for `cmd`.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128usize) };
        assert!(r >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
        r
    };
    // BPF_MAP_CREATE: map_type, key_size, value_size, max_entries (u32 each).
    let mut attr = [0u64; 16];
    attr[0] = BPF_MAP_TYPE_ARRAY | (4 << 32);
    attr[1] = u64::from(value_size) | (u64::from(entries) << 32);
    // SAFETY: the syscall returned a new map fd.
    let map = unsafe { OwnedFd::from_raw_fd(bpf(BPF_MAP_CREATE, &mut attr) as i32) };
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // BPF_OBJ_PIN: pathname (pointer), bpf_fd.
    let mut attr = [0u64; 16];
    attr[0] = cpath.as_ptr() as u64;
    attr[1] = std::os::fd::AsRawFd::as_raw_fd(&map) as u64;
    bpf(BPF_OBJ_PIN, &mut attr);
}

/// A pinned map imq did not make, where imq keeps one of its own, is refused in one
/// line (it names the map and what it is) instead of being written into: in state imq
/// made, and in a directory someone prepared before imq ever ran there.
#[test]
fn trust_refuses_pinned_maps_it_did_not_make() {
    require_root();
    let pair = Pair::new("foreign").unwrap();
    let s = &pair.server;
    s.imqctl_ok(&["attach", "s0"]);
    let dir = s.imq_state_dir();
    let rules = dir.join("imq_rules");
    std::fs::remove_file(&rules).unwrap();
    pin_foreign_array(&rules, 8, 16);
    let r = s.imqctl(&["attach", "s0", "--proto", "udp", "--dev", "imq4"]);
    assert_ne!(r.code, 0, "attach over a foreign imq_rules succeeded");
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("imq_rules is a map of type 2, key 4 B, value 8 B, 16 entries")
            && r.stderr.contains("refusing imq state"),
        "{}",
        r.stderr
    );
    assert!(s.ip(&["link", "show", "imq4"]).is_err(), "a device was created");
    std::fs::remove_dir_all(&dir).unwrap();

    // Prepared before imq ran in the namespace.
    let other = Pair::new("foreign2").unwrap();
    let dir = other.server.imq_state_dir();
    std::fs::create_dir_all(dir.join("layout-4")).unwrap();
    pin_foreign_array(&dir.join("imq_active"), 4, 1024);
    pin_foreign_array(&dir.join("imq_rules"), 4, 1);
    let r = other.server.imqctl(&["attach", "s0"]);
    assert_ne!(r.code, 0, "attach over prepared pins succeeded");
    assert!(r.stderr.contains("refusing imq state"), "{}", r.stderr);
    assert!(
        other.server.ip(&["link", "show", "imq0"]).is_err(),
        "a device was created"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
