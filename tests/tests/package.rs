//! The Debian package `cargo xtask dist` builds (`$IMQ_DEB`; `cargo xtask test` sets
//! it): its metadata and files, its unit as systemd reads it, and the service's
//! command run from the unpacked package the way the unit runs it — with only the
//! unit's capabilities — on the packaged sample config made live. Host only: the
//! package does not depend on the kernel.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use imq_tests::{NetNs, require_root, unique_id};

fn deb() -> PathBuf {
    let deb = std::env::var_os("IMQ_DEB")
        .map(PathBuf::from)
        .expect("IMQ_DEB is not set: run `cargo xtask test`, or `cargo xtask dist` and set IMQ_DEB to the .deb");
    assert!(deb.exists(), "{} does not exist", deb.display());
    deb
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package unpacked into a fresh directory, removed on drop.
struct Unpacked(PathBuf);

impl Unpacked {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("imq-deb-{}", unique_id()));
        run(Command::new("dpkg-deb").arg("-x").arg(deb()).arg(&dir));
        Self(dir)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p.trim_start_matches('/'))
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `Key=value` of a unit file (the last one given).
fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
}

#[test]
fn the_package_holds_the_binary_unit_config_man_pages_and_completions() {
    let deb = deb();
    let field = |f: &str| {
        run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "imq");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert!(field("Depends").contains("libc6 (>= "), "{}", field("Depends"));

    // Every file where Debian looks for it, owned by root, with its mode.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let entry = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
            .to_owned()
    };
    for (path, mode) in [
        ("/usr/sbin/imqctl", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/imq.service", "-rw-r--r--"),
        ("/etc/imq/imq.toml", "-rw-r--r--"),
        ("/usr/share/man/man8/imqctl.8.gz", "-rw-r--r--"),
        ("/usr/share/man/man8/imqctl-watch.8.gz", "-rw-r--r--"),
        ("/usr/share/man/man8/imqctl-attach.8.gz", "-rw-r--r--"),
        ("/usr/share/bash-completion/completions/imqctl", "-rw-r--r--"),
        ("/usr/share/zsh/vendor-completions/_imqctl", "-rw-r--r--"),
        ("/usr/share/fish/vendor_completions.d/imqctl.fish", "-rw-r--r--"),
        ("/usr/share/doc/imq/copyright", "-rw-r--r--"),
    ] {
        let line = entry(path);
        assert!(line.starts_with(mode), "{line}");
        assert!(line.contains(" root/root "), "{line}");
    }

    let u = Unpacked::new();
    // The sample config is a conffile: an admin's edits survive upgrades.
    let control = std::env::temp_dir().join(format!("imq-deb-ctrl-{}", unique_id()));
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = fs::read_to_string(control.join("conffiles")).unwrap();
    let _ = fs::remove_dir_all(&control);
    assert_eq!(conffiles.trim(), "/etc/imq/imq.toml");

    // The binary runs, and its pages and scripts are what it generates.
    let imqctl = u.path("/usr/sbin/imqctl");
    let version = run(Command::new(&imqctl).arg("--version"));
    assert_eq!(version.trim(), format!("imqctl {}", env!("CARGO_PKG_VERSION")));
    let page = run(Command::new("gzip")
        .arg("-dc")
        .arg(u.path("/usr/share/man/man8/imqctl-watch.8.gz")));
    assert!(page.starts_with(".ie"), "{page}");
    assert!(page.contains(".TH imqctl-watch 8"), "{page}");
    assert!(page.contains("SIGHUP"), "{page}");
    let bash = u.path("/usr/share/bash-completion/completions/imqctl");
    run(Command::new("bash").arg("-n").arg(&bash));
    assert_eq!(
        fs::read(&bash).unwrap(),
        Command::new(&imqctl)
            .args(["completions", "bash"])
            .output()
            .unwrap()
            .stdout
    );
}

#[test]
fn dpkg_installs_removes_and_purges_the_package() {
    require_root();
    let root = std::env::temp_dir().join(format!("imq-dpkg-{}", unique_id()));
    let _cleanup = Unpacked(root.clone());
    let admin = root.join("var/lib/dpkg");
    fs::create_dir_all(admin.join("info")).unwrap();
    fs::create_dir_all(admin.join("updates")).unwrap();
    fs::write(admin.join("status"), "").unwrap();
    // An empty system: its dependencies are not in this database, and the maintainer
    // scripts run here (they only tell a running systemd, which this machine has not).
    let dpkg = |args: &[&str]| {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", root.display()))
            .args(["--force-depends", "--force-script-chrootless", "--log=/dev/null"])
            .args(args);
        c
    };
    run(&mut dpkg(&["-i", deb().to_str().unwrap()]));
    let status = run(&mut dpkg(&["-s", "imq"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(root.join("usr/sbin/imqctl").exists());
    assert!(root.join("usr/lib/systemd/system/imq.service").exists());

    // The admin's config survives removal; purge takes it.
    fs::write(root.join("etc/imq/imq.toml"), "# mine\n").unwrap();
    run(&mut dpkg(&["-r", "imq"]));
    assert!(!root.join("usr/sbin/imqctl").exists());
    assert_eq!(fs::read_to_string(root.join("etc/imq/imq.toml")).unwrap(), "# mine\n");
    run(&mut dpkg(&["-P", "imq"]));
    assert!(!root.join("etc/imq/imq.toml").exists());
}

#[test]
fn systemd_accepts_the_unit_and_it_runs_what_the_package_installs() {
    let u = Unpacked::new();
    let unit_path = u.path("/usr/lib/systemd/system/imq.service");
    let unit = fs::read_to_string(&unit_path).unwrap();
    let exec = unit_value(&unit, "ExecStart");
    assert_eq!(exec, "/usr/sbin/imqctl watch -f /etc/imq/imq.toml");
    assert!(u.path("/usr/sbin/imqctl").exists() && u.path("/etc/imq/imq.toml").exists());
    assert_eq!(unit_value(&unit, "Type"), "notify");
    // systemd-analyze checks the unit against the unpacked tree (ExecReload's kill is
    // the system's: give the tree one).
    fs::create_dir_all(u.path("/bin")).unwrap();
    fs::copy("/bin/kill", u.path("/bin/kill")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", u.0.display()))
        .arg("/usr/lib/systemd/system/imq.service")
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // Hardened: systemd's own score of what the service may do.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=50"])
        .arg(&unit_path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exposure above 5.0:\n{report}");
}

/// The capabilities the unit leaves the service, as setpriv takes them.
fn unit_caps(unit: &str) -> String {
    let caps: Vec<String> = unit_value(unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!("-all,{}", caps.join(","))
}

/// A bpffs of the test's own: in a namespace entered with `ip netns exec`, /sys is
/// a fresh sysfs without the bpffs that systemd mounts on /sys/fs/bpf.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("imq-bpffs-{}", unique_id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir));
        Self(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// A child process killed on drop, should a test end before it stopped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(log: &Path, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {what:?} within 10 s:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_service_runs_the_sample_config_with_the_units_capabilities() {
    require_root();
    let u = Unpacked::new();
    let unit = fs::read_to_string(u.path("/usr/lib/systemd/system/imq.service")).unwrap();
    let sample = fs::read_to_string(u.path("/etc/imq/imq.toml")).unwrap();
    // As shipped it sets up nothing; its examples, uncommented, are a working setup.
    let live: String = sample
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(live.contains("[[shaper]]") && live.contains("[[rule]]"), "{live}");
    let config = std::env::temp_dir().join(format!("imq-deb-{}.toml", unique_id()));
    fs::write(&config, &live).unwrap();

    // eth1 and eth2 of the examples; eth0 (the shaper's) is not there yet.
    let ns = NetNs::new(format!("imq-deb-{}", unique_id())).unwrap();
    for (a, b) in [("eth1", "x1"), ("eth2", "x2")] {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b]).unwrap();
        ns.ip(&["link", "set", a, "up"]).unwrap();
    }
    let bpffs = Bpffs::new();
    let log = config.with_extension("log");
    // Type=notify: systemd's socket, as it passes it.
    let notify_path = config.with_extension("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let said = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut child = Killed(
        ns.command("setpriv")
            .args(["--bounding-set", &unit_caps(&unit)])
            .arg(u.path("/usr/sbin/imqctl"))
            .arg("--bpffs")
            .arg(&bpffs.0)
            .args(["watch", "-f"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let text = wait_for(&log, "applied ");
    let _ = fs::remove_file(&config);
    assert_eq!(said(), "READY=1");
    // Both rules, the second with its mark, into imq1; the shaper waits for eth0.
    assert!(
        text.contains("2 rule(s)") && text.contains("waiting for eth0"),
        "{text}"
    );
    let bpffs_arg = ["--bpffs", bpffs.0.to_str().unwrap()];
    let status: serde_json::Value =
        serde_json::from_str(&ns.imqctl_ok(&[&bpffs_arg[..], &["show", "-j"]].concat())).unwrap();
    let rules: Vec<(String, String)> = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["interface"].as_str().unwrap().to_owned(),
                r["dev"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [("eth1".into(), "imq1".into()), ("eth2".into(), "imq1".into())],
        "{status}"
    );
    assert!(
        status["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["attached"] == true),
        "{status}"
    );

    // systemctl stop: SIGTERM, exit 0, rules left in place.
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let exit = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "still running 5 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    assert!(exit.success(), "{exit}: {text}");
    assert_eq!(said(), "STOPPING=1");
    let _ = fs::remove_file(&notify_path);
    ns.imqctl_ok(&[&bpffs_arg[..], &["flush"]].concat());
}
