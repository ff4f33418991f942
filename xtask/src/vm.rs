//! `cargo xtask vm-test`: the privileged test suite on the kernels users run, Debian's
//! own, booted under qemu.
//!
//! For each kernel: its package comes from Debian's archive through apt (a private apt
//! state under the cache directory, pointed at the archive this machine's apt already
//! uses), and an initramfs is built from this machine's tools and their libraries, the
//! freshly built imqctl and test binaries, and the kernel's network modules. The guest
//! runs every test binary as its init's children and powers off; the serial console
//! comes back here, is shown live, and its `test result:` lines are counted.
//!
//! No shared folders: Debian's cloud kernels have no 9p, and virtio-fs only from 6.12
//! (KERNEL-FACTS §12). KVM is tried first where /dev/kvm opens; a guest that dies before
//! its init runs (nested KVM here does) is booted again with TCG.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, imqctl_path, run, setup};

/// Test binaries that check imq's own logic more than the kernel's (the rule compiler
/// and apply at scale, crash and race consistency, watch, metrics, unit tests): 6.1
/// attaches exactly as 5.10 does (cls_bpf + mirred, the fentry device hook), so they
/// run on 5.10 and 6.12 and are left out on 6.1, which keeps CI within its time.
const SAME_ON_6_1: &[&str] = &["select", "robustness", "watch", "metrics", "imq"];

/// The Debian releases whose kernels imq is tested on, oldest first.
pub const SUITES: &[(&str, &str)] = &[
    ("bullseye", "Debian 11"),
    ("bookworm", "Debian 12"),
    ("trixie", "Debian 13"),
];

/// Host packages this needs beside those of `cargo xtask setup`.
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
];

/// Programs the tests and the init script run inside the guest, copied from this
/// machine with their libraries.
const GUEST_TOOLS: &[&str] = &[
    "bash",
    "ip",
    "tc",
    "ping",
    "iptables",
    "ip6tables",
    "nft",
    "tcpdump",
    "setpriv",
    "sysctl",
    "kmod",
    "modprobe",
    "uname",
    // tests/trust.rs: private mount namespaces, a bpffs of its own, modes and owners.
    "sh",
    "unshare",
    "mount",
    "umount",
    "mktemp",
    "stat",
    "grep",
    "ls",
    "chmod",
    "chown",
    "ln",
    "rmdir",
    "mkdir",
];

/// Module trees the guest gets (with what they depend on): qdiscs, classifiers,
/// actions, netfilter, and the virtual devices the tests create.
const MODULE_DIRS: &[&str] = &[
    "kernel/net",
    "kernel/drivers/net/ifb.ko",
    "kernel/drivers/net/veth.ko",
    "kernel/drivers/net/vxlan",
];

/// Printed by the guest's init as its first line: the kernel booted and runs our code.
const BOOTED: &str = "IMQ-VM-BOOTED";
/// How long a KVM guest may take to reach its init before TCG is tried instead.
const KVM_BOOT_LIMIT: Duration = Duration::from_secs(90);
const DONE: &str = "IMQ-VM-DONE";

pub struct Options {
    pub suites: Vec<String>,
    pub filter: Option<String>,
    /// Per kernel, from boot to power-off.
    pub timeout: Duration,
    /// Run the soak (for this many seconds) instead of the suite.
    pub soak_seconds: Option<u64>,
}

/// What one kernel's run counted.
struct Outcome {
    release: String,
    passed: u32,
    failed: u32,
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IMQ_VM_CACHE") {
        return PathBuf::from(d);
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/imq-vm")
}

pub fn run_tests(opts: &Options) -> Result<()> {
    for s in &opts.suites {
        if !SUITES.iter().any(|(name, _)| name == s) {
            bail!("unknown kernel '{s}': one of {}, or all", suite_names());
        }
    }
    setup::ensure_packages(HOST_PACKAGES)?;
    let cache = cache_dir();
    let apt = Apt::new(&cache.join("apt"))?;
    apt.update(&opts.suites)?;

    let work = crate::workspace_root().join("target/vm");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let binaries = build_tests()?;
    let base = work.join("base.cpio.gz");
    // The soak (an ignored test of minutes) is `cargo xtask soak`'s, not the suite's.
    let names: Vec<String> = binaries
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| (n == "soak") == opts.soak_seconds.is_some())
        .collect();
    build_base(
        &work.join("base"),
        &binaries,
        &init_script(&names, opts.filter.as_deref(), opts.soak_seconds),
        &base,
    )?;

    let mut outcomes = Vec::new();
    for suite in &opts.suites {
        let kernel = apt.kernel(suite, &cache.join("kernels"))?;
        let initrd = work.join(format!("initrd-{suite}.cpio.gz"));
        build_initrd(&kernel, &work.join(format!("modules-{suite}")), &base, &initrd)?;
        let log = work.join(format!("{suite}.log"));
        eprintln!("vm-test: booting {suite} ({}), log {}", kernel.release, log.display());
        let started = Instant::now();
        let outcome =
            boot(&kernel, &initrd, &log, opts.timeout).with_context(|| format!("{suite} ({})", kernel.release))?;
        eprintln!("vm-test: {suite} took {:.0} s", started.elapsed().as_secs_f64());
        outcomes.push(outcome);
    }
    for o in &outcomes {
        println!("kernel {}: {} passed, {} failed", o.release, o.passed, o.failed);
    }
    let failed: u32 = outcomes.iter().map(|o| o.failed).sum();
    if failed > 0 {
        bail!("{failed} test(s) failed in the VMs");
    }
    Ok(())
}

/// `cargo xtask vm-bench`: builds the benchmark binary `bin` of imq-tests, runs it
/// with `args` in the VM of one kernel, and returns the kernel's release and the
/// lines the benchmark printed that start with `prefix` (prefix removed).
pub fn run_bench(
    suite: &str,
    bin: &str,
    args: &[&str],
    prefix: &str,
    timeout: Duration,
) -> Result<(String, Vec<String>)> {
    if !SUITES.iter().any(|(name, _)| *name == suite) {
        bail!("unknown kernel '{suite}': one of {}", suite_names());
    }
    setup::ensure_packages(HOST_PACKAGES)?;
    let cache = cache_dir();
    let apt = Apt::new(&cache.join("apt"))?;
    apt.update(&[suite.to_owned()])?;
    let work = crate::workspace_root().join("target/vm-bench");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let out = cargo()
        .args([
            "build",
            "--release",
            "--message-format=json",
            "--package",
            "imq-tests",
            "--bin",
            bin,
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo build")?;
    if !out.status.success() {
        bail!("building {bin} failed");
    }
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|m| (m["target"]["name"] == bin).then(|| m["executable"].as_str().map(PathBuf::from))?)
        .with_context(|| format!("cargo built no {bin}"))?;
    let base = work.join("base.cpio.gz");
    build_base(
        &work.join("base"),
        &[(bin.to_owned(), exe)],
        &bench_init(bin, args),
        &base,
    )?;
    let kernel = apt.kernel(suite, &cache.join("kernels"))?;
    let initrd = work.join(format!("initrd-{suite}.cpio.gz"));
    build_initrd(&kernel, &work.join(format!("modules-{suite}")), &base, &initrd)?;
    let log = work.join(format!("{suite}.log"));
    eprintln!("vm-bench: booting {suite} ({}), log {}", kernel.release, log.display());
    let outcome = boot(&kernel, &initrd, &log, timeout)?;
    let text = fs::read_to_string(&log)?;
    if !text.lines().any(|l| l.trim_end() == format!("IMQ-VM-EXIT {bin} 0")) {
        bail!("{bin} failed in the VM (log: {})", log.display());
    }
    let lines = text
        .lines()
        .filter_map(|l| l.strip_prefix(prefix).map(str::to_owned))
        .collect();
    Ok((outcome.release, lines))
}

pub fn suite_names() -> String {
    SUITES.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(", ")
}

/// A private apt: its own sources, lists and cache, none of the host's state. The
/// archive is the one this machine's apt is configured with.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Self> {
        for d in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(dir.join(d))?;
        }
        Ok(Self { dir: dir.to_owned() })
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        [
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            "Dir::State::status=/dev/null".into(),
            "APT::Sandbox::User=root".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_owned(), o])
        .collect()
    }

    fn update(&self, suites: &[String]) -> Result<()> {
        let archive = debian_archive()?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let list: String = suites
            .iter()
            .map(|s| format!("deb [signed-by={keyring}] {archive} {s} main\n"))
            .collect();
        fs::write(self.dir.join("sources.list"), list)?;
        run(Command::new("apt-get").args(self.options()).args(["-qq", "update"]))
    }

    /// The cloud kernel image of `suite`, downloaded and unpacked once.
    fn kernel(&self, suite: &str, dir: &Path) -> Result<Kernel> {
        // The metapackage names the current image, whose ABI number moves.
        let show = output(
            Command::new("apt-cache")
                .args(self.options())
                .args(["show", &format!("linux-image-cloud-amd64/{suite}")]),
        )?;
        let image = show
            .lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .and_then(|d| d.split([' ', ',']).find(|p| p.starts_with("linux-image-")))
            .with_context(|| format!("linux-image-cloud-amd64/{suite} names no image package"))?
            .to_owned();
        let root = dir.join(&image);
        if !root.join(".unpacked").exists() {
            let debs = self.dir.join("debs");
            let _ = fs::remove_dir_all(&root);
            run(Command::new("apt-get").current_dir(&debs).args(self.options()).args([
                "-qq",
                "download",
                &format!("{image}/{suite}"),
            ]))?;
            let deb = fs::read_dir(&debs)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{image}_")))
                })
                .with_context(|| format!("apt-get download left no {image} package"))?;
            fs::create_dir_all(&root)?;
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
            fs::remove_file(&deb)?;
            fs::write(root.join(".unpacked"), "")?;
        }
        let vmlinuz = fs::read_dir(root.join("boot"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .with_context(|| format!("{image} has no boot/vmlinuz-*"))?;
        let release = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_owned();
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|m| root.join(m).join(&release))
            .find(|p| p.is_dir())
            .with_context(|| format!("{image} has no modules for {release}"))?;
        Ok(Kernel {
            release,
            vmlinuz,
            modules,
        })
    }
}

/// The Debian archive this machine's apt uses (deb822 `.sources` or a classic
/// `sources.list` line), so that the kernels come from where its packages come from.
fn debian_archive() -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else { continue };
        if let Some(uri) = archive_in(&text) {
            return Ok(uri);
        }
    }
    bail!("this machine's apt sources name no Debian archive with component main")
}

/// The first archive URI of `text` that serves Debian's `main` for a release suite
/// (not security, not updates).
fn archive_in(text: &str) -> Option<String> {
    let release = |suites: &str| {
        suites
            .split_whitespace()
            .any(|s| SUITES.iter().any(|(n, _)| *n == s) || s == "stable" || s == "sid")
    };
    // deb822 stanzas.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .map(str::trim)
        };
        if let (Some(uris), Some(suites), Some(components)) = (field("URIs"), field("Suites"), field("Components"))
            && release(suites)
            && components.split_whitespace().any(|c| c == "main")
            && !uris.contains("security")
        {
            return uris.split_whitespace().next().map(str::to_owned);
        }
    }
    // One-line style: deb [options] URI SUITE COMPONENTS...
    for line in text.lines() {
        let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
        if words.next() != Some("deb") {
            continue;
        }
        let line_rest: Vec<&str> = words.filter(|w| !w.ends_with(']')).collect();
        if let [uri, suite, components @ ..] = line_rest.as_slice()
            && release(suite)
            && components.contains(&"main")
            && !uri.contains("security")
        {
            return Some((*uri).to_owned());
        }
    }
    None
}

struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Test binaries that do not depend on the kernel and need what the guest lacks:
/// the package test (dpkg-deb, systemd-analyze and the .deb) runs on the host only.
const HOST_ONLY: &[&str] = &["package"];

/// Builds the test binaries of imq-tests and imq-user (as `cargo xtask test` runs
/// them); returns (name, path) of each.
fn build_tests() -> Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args(["test", "--release", "--no-run", "--message-format=json"])
        .args(["--package", "imq-tests", "--package", "imq-user"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && !HOST_ONLY.contains(&msg["target"]["name"].as_str().unwrap_or(""))
            && let Some(exe) = msg["executable"].as_str()
        {
            let name = msg["target"]["name"].as_str().unwrap_or("test").to_owned();
            bins.push((name, PathBuf::from(exe)));
        }
    }
    if bins.is_empty() {
        bail!("cargo built no test binaries");
    }
    Ok(bins)
}

/// A directory that becomes an initramfs: a merged-/usr layout like this machine's.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn new(root: &Path) -> Result<Self> {
        let _ = fs::remove_dir_all(root);
        for d in [
            "usr/bin",
            "usr/sbin",
            "usr/lib",
            "usr/lib64",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "etc",
            "imq/tests",
        ] {
            fs::create_dir_all(root.join(d))?;
        }
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            symlink(target, root.join(link))?;
        }
        fs::create_dir_all(root.join("var"))?;
        symlink("../run", root.join("var/run"))?;
        Ok(Self { root: root.to_owned() })
    }

    /// Where host path `p` goes in the tree, with /bin, /lib... folded into /usr.
    fn place(&self, p: &Path) -> PathBuf {
        let rel = p.strip_prefix("/").unwrap_or(p);
        let rel = match rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
        {
            Some(top) if ["bin", "sbin", "lib", "lib64"].contains(&top.as_str()) => Path::new("usr").join(rel),
            _ => rel.to_owned(),
        };
        self.root.join(rel)
    }

    /// Copies host file `p` (following links) to the same path in the tree; if `p` is
    /// a link, it stays one (multi-call programs dispatch on their name).
    fn copy(&self, p: &Path) -> Result<()> {
        let real = fs::canonicalize(p).with_context(|| format!("{}", p.display()))?;
        let dst = self.place(&real);
        if !dst.exists() {
            fs::create_dir_all(dst.parent().unwrap())?;
            fs::copy(&real, &dst).with_context(|| format!("copy {}", real.display()))?;
        }
        let at = self.place(p);
        if at != dst && !at.exists() {
            fs::create_dir_all(at.parent().unwrap())?;
            symlink(&real, &at)?;
        }
        Ok(())
    }

    /// A program and every library it loads (ldd), or that it opens as a plugin.
    fn program(&self, p: &Path, libs: &mut BTreeSet<PathBuf>) -> Result<()> {
        self.copy(p)?;
        libs.extend(shared_libraries(p)?);
        Ok(())
    }
}

fn shared_libraries(p: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(p).output()?;
    // "not a dynamic executable" (static) exits non-zero: no libraries.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(PathBuf::from))
        .collect())
}

fn which(program: &str) -> Result<PathBuf> {
    let path = setup::path_with_cargo_bin();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found on this machine"))
}

/// The part of the initramfs every kernel shares: tools, libraries, imqctl, the test
/// binaries and the init script.
fn build_base(dir: &Path, binaries: &[(String, PathBuf)], init_text: &str, out: &Path) -> Result<()> {
    let tree = Tree::new(dir)?;
    let mut libs = BTreeSet::new();
    for tool in GUEST_TOOLS {
        tree.program(&which(tool)?, &mut libs)?;
    }
    // busybox only for what the init script needs (mount, mkdir, poweroff), and
    // always called as `busybox X`: as a link it would shadow the real tools.
    tree.program(&which("busybox")?, &mut libs)?;
    // iptables loads its matches and targets as plugins.
    let xtables = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    if xtables.is_dir() {
        for e in fs::read_dir(xtables)? {
            let p = e?.path();
            tree.program(&p, &mut libs)?;
        }
    }
    for lib in &libs {
        tree.copy(lib)?;
    }
    // modprobe is how the kernel loads a qdisc's module on first use.
    symlink("kmod", tree.root.join("usr/sbin/modprobe")).ok();
    fs::write(
        tree.root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(tree.root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;

    let imqctl = tree.root.join("imq/imqctl");
    fs::copy(imqctl_path(), &imqctl).context("copy imqctl (run `cargo xtask build`)")?;
    for (name, path) in binaries {
        let dst = tree.root.join("imq/tests").join(name);
        fs::copy(path, &dst)?;
        libs_for(&tree, path)?;
    }
    let init = tree.root.join("init");
    fs::write(&init, init_text)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    cpio(&tree.root, out)
}

fn libs_for(tree: &Tree, p: &Path) -> Result<()> {
    for lib in shared_libraries(p)? {
        tree.copy(&lib)?;
    }
    Ok(())
}

/// The guest's init: mounts, runs each test binary (ignored tests too: those that
/// need what only these kernels have; with their output, so that the log holds every
/// rate measured on each kernel), reports, powers off.
fn init_script(tests: &[String], filter: Option<&str>, soak_seconds: Option<u64>) -> String {
    let filter = filter
        .map(|f| format!(" '{}'", f.replace('\'', "")))
        .unwrap_or_default();
    let mut s = init_preamble();
    if let Some(seconds) = soak_seconds {
        s.push_str(&format!("export IMQ_SOAK_SECONDS={seconds}\n"));
    }
    for t in tests {
        let run = format!(
            "echo \"IMQ-VM-RUN {t}\"\nIMQCTL=/imq/imqctl IMQ_EMULATED=1 RUST_BACKTRACE=1 /imq/tests/{t} --test-threads=1 --include-ignored --nocapture{filter}\necho \"IMQ-VM-EXIT {t} $?\"\n"
        );
        if SAME_ON_6_1.contains(&t.as_str()) {
            s.push_str(&format!(
                "case \"$(uname -r)\" in 6.1.*) echo \"IMQ-VM-SKIP {t}: user-space logic, run on 5.10 and 6.12\";; *)\n{run};; esac\n"
            ));
        } else {
            s.push_str(&run);
        }
    }
    s.push_str(&format!("echo {DONE}\nbusybox poweroff -f\n"));
    s
}

/// The guest's init for a benchmark: runs one binary with `args`, powers off.
fn bench_init(name: &str, args: &[&str]) -> String {
    let mut s = init_preamble();
    s.push_str(&format!(
        "echo \"IMQ-VM-RUN {name}\"\nIMQCTL=/imq/imqctl RUST_BACKTRACE=1 /imq/tests/{name} {}\necho \"IMQ-VM-EXIT {name} $?\"\necho {DONE}\nbusybox poweroff -f\n",
        args.join(" ")
    ));
    s
}

/// Mounts and environment every guest init starts with.
fn init_preamble() -> String {
    let mut s = String::from(
        r#"#!/bin/bash
export PATH=/usr/sbin:/usr/bin HOME=/root
# Debian's kernels allow fentry programs (KERNEL-FACTS §12): imq must follow its
# devices going down and up there, and the device-state test checks that it does.
export IMQ_EXPECT_DEVICE_HOOK=1
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
busybox mount -t tmpfs tmp /tmp
busybox mount -t tmpfs run /run
busybox mkdir -p /sys/fs/bpf /root /dev/shm
busybox mount -t bpf bpf /sys/fs/bpf
busybox mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up
"#,
    );
    s.push_str(&format!("echo \"{BOOTED} $(uname -r)\"\n"));
    s.push_str("cd /tmp\n");
    s
}

fn cpio(dir: &Path, out: &Path) -> Result<()> {
    let script = format!(
        "cd '{}' && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > '{}'",
        dir.display(),
        out.display()
    );
    run(Command::new("sh").args(["-c", &script]))
}

/// The kernel's network modules and all they depend on, decompressed (the guest's
/// kmod may not read every compression), indexed with depmod; appended to `base`.
fn build_initrd(kernel: &Kernel, dir: &Path, base: &Path, out: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    // modules.dep of the package itself (Debian generates it at install time). depmod
    // looks in BASE/lib/modules/RELEASE: BASE is three levels up, whether the package
    // puts its modules in /lib or in /usr/lib.
    let pkg_base = kernel.modules.ancestors().nth(3).unwrap();
    run(Command::new("depmod").arg("-b").arg(pkg_base).arg(&kernel.release))?;
    let dep = fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let deps: BTreeMap<&str, Vec<&str>> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let mut wanted: Vec<&str> = deps
        .keys()
        .copied()
        .filter(|m| MODULE_DIRS.iter().any(|d| m.starts_with(d)))
        .collect();
    let mut all = BTreeSet::new();
    while let Some(m) = wanted.pop() {
        if all.insert(m) {
            wanted.extend(deps.get(m).into_iter().flatten().copied());
        }
    }
    let dest = dir.join("usr/lib/modules").join(&kernel.release);
    fs::create_dir_all(&dest)?;
    // As in the base archive, /lib is /usr/lib.
    symlink("usr/lib", dir.join("lib"))?;
    for m in &all {
        let src = kernel.modules.join(m);
        let (plain, decompress) = match m.rsplit_once('.') {
            Some((stem, "xz")) => (stem, Some("xz")),
            Some((stem, "zst")) => (stem, Some("zstd")),
            _ => (*m, None),
        };
        let dst = dest.join(plain);
        fs::create_dir_all(dst.parent().unwrap())?;
        match decompress {
            Some(tool) => {
                let data = Command::new(tool).args(["-dc"]).arg(&src).output()?;
                if !data.status.success() {
                    bail!("{tool} -dc {}", src.display());
                }
                fs::write(&dst, data.stdout)?;
            }
            None => {
                fs::copy(&src, &dst)?;
            }
        }
    }
    for f in ["modules.order", "modules.builtin", "modules.builtin.modinfo"] {
        if kernel.modules.join(f).exists() {
            fs::copy(kernel.modules.join(f), dest.join(f))?;
        }
    }
    run(Command::new("depmod").arg("-b").arg(dir).arg(&kernel.release))?;
    let mods = out.with_extension("mods");
    cpio(dir, &mods)?;
    // Concatenated archives are one initramfs to the kernel.
    let mut initrd = fs::read(base)?;
    initrd.extend(fs::read(&mods)?);
    fs::write(out, initrd)?;
    Ok(())
}

/// Boots the kernel with KVM if it runs here, else (or if the KVM guest dies before
/// its init) with TCG; shows and logs the console; counts the results.
fn boot(kernel: &Kernel, initrd: &Path, log: &Path, timeout: Duration) -> Result<Outcome> {
    let kvm = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if kvm {
        match qemu(kernel, initrd, log, timeout, "kvm")? {
            Some(o) => return Ok(o),
            None => eprintln!("vm-test: the KVM guest died before its init ran; booting again with TCG"),
        }
    }
    qemu(kernel, initrd, log, timeout, "tcg")?.context("the guest died before its init ran")
}

/// One boot; `None` if the guest never reached its init.
fn qemu(kernel: &Kernel, initrd: &Path, log: &Path, timeout: Duration, accel: &str) -> Result<Option<Outcome>> {
    let cpu = if accel == "kvm" { "host" } else { "max" };
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-cpu", cpu, "-m", "3072", "-smp", "2"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {line}"));
        }
    });
    let mut log_file = fs::File::create(log)?;
    let started = Instant::now();
    let deadline = started + timeout;
    let mut counter = Counter::default();
    loop {
        // A KVM guest that breaks here either dies or hangs with "KVM internal error";
        // one that has not reached its init after KVM_BOOT_LIMIT is given up too.
        if accel == "kvm" && counter.release.is_none() && started.elapsed() > KVM_BOOT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(5))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                writeln!(log_file, "{line}")?;
                println!("[{accel}] {line}");
                counter.line(&line);
                if accel == "kvm" && counter.release.is_none() && line.contains("KVM internal error") {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(None);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("no power-off after {} s (log: {})", timeout.as_secs(), log.display());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    let Some(release) = counter.release.clone() else {
        if accel == "kvm" {
            return Ok(None);
        }
        bail!("the guest never ran its init ({status}; log: {})", log.display());
    };
    if !counter.done {
        // Init did not finish: whatever was running counts as failed.
        counter.failed += 1;
        eprintln!("vm-test: the guest stopped before its tests ended ({status})");
    }
    Ok(Some(Outcome {
        release,
        passed: counter.passed,
        failed: counter.failed,
    }))
}

/// Counts libtest's results on the console.
#[derive(Default)]
struct Counter {
    release: Option<String>,
    passed: u32,
    failed: u32,
    /// Whether the binary now running printed its `test result:` line.
    reported: bool,
    done: bool,
}

impl Counter {
    fn line(&mut self, line: &str) {
        if let Some(r) = line.strip_prefix(BOOTED) {
            self.release = Some(r.trim().to_owned());
        } else if line.starts_with("IMQ-VM-RUN ") {
            self.reported = false;
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 5 passed; 0 failed; 2 ignored; ..." or "FAILED. 3 passed; 1 failed; ..."
            self.reported = true;
            for part in rest.split(';') {
                let words: Vec<&str> = part.split_whitespace().collect();
                let n = words
                    .iter()
                    .rev()
                    .nth(1)
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(0);
                match words.last() {
                    Some(&"passed") => self.passed += n,
                    Some(&"failed") => self.failed += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("IMQ-VM-EXIT ") {
            // A binary that died without its summary (a crash, a panic outside a test).
            let code = rest.rsplit(' ').next().unwrap_or("1");
            if code != "0" && !self.reported {
                self.failed += 1;
            }
        } else if line == DONE {
            self.done = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(archive_in(deb822).as_deref(), Some("http://mirror.example/debian"));
        let classic = "# comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(archive_in(classic).as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(archive_in("deb http://x.example/ubuntu jammy universe\n"), None);
    }

    #[test]
    fn results_are_counted_per_binary() {
        let mut c = Counter::default();
        for l in [
            "IMQ-VM-BOOTED 6.1.0-50-cloud-amd64",
            "IMQ-VM-RUN ingress",
            "test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.2s",
            "IMQ-VM-EXIT ingress 101",
            "IMQ-VM-RUN egress",
            "IMQ-VM-EXIT egress 134",
            "IMQ-VM-RUN select",
            "test result: ok. 7 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9s",
            "IMQ-VM-EXIT select 0",
            DONE,
        ] {
            c.line(l);
        }
        assert_eq!(c.release.as_deref(), Some("6.1.0-50-cloud-amd64"));
        assert_eq!((c.passed, c.failed, c.done), (10, 2, true));
    }
}
