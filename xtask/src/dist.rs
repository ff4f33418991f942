//! `cargo xtask dist`: a Debian package of imq, built with dpkg-deb from the release
//! imqctl, the unit and sample config of dist/, and the man pages and completions
//! imqctl generates from its own command definitions.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{imqctl_path, run, workspace_root};

/// Where the package is written.
pub fn deb_path() -> PathBuf {
    workspace_root().join(format!("target/dist/imq_{}_{}.deb", version(), arch()))
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Output of a command that must succeed.
fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    fs::create_dir_all(path.parent().unwrap())?;
    fs::write(path, contents).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The newest glibc symbol version imqctl links against: the package's lowest libc6.
fn glibc_needed(binary: &Path) -> Result<String> {
    let dump = String::from_utf8(output(Command::new("objdump").arg("-T").arg(binary))?)?;
    let newest = dump
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("(GLIBC_").or_else(|| w.strip_prefix("GLIBC_")))
        .map(|v| v.trim_end_matches(')'))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>());
            Some((parts.next()?.ok()?, parts.next().and_then(Result::ok).unwrap_or(0)))
        })
        .max()
        .context("imqctl links no versioned glibc symbol")?;
    Ok(format!("{}.{}", newest.0, newest.1))
}

/// Builds the package from the release build (which must exist); returns its path.
pub fn package() -> Result<PathBuf> {
    let root = workspace_root();
    let imqctl = imqctl_path();
    let stage = root.join(format!("target/dist/imq_{}_{}", version(), arch()));
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }

    // The binary, stripped of debug info (the eBPF object inside keeps its BTF).
    let sbin = stage.join("usr/sbin/imqctl");
    fs::create_dir_all(sbin.parent().unwrap())?;
    run(Command::new("objcopy").arg("--strip-debug").arg(&imqctl).arg(&sbin))?;
    fs::set_permissions(&sbin, fs::Permissions::from_mode(0o755))?;

    let dist = root.join("dist");
    write(
        &stage.join("usr/lib/systemd/system/imq.service"),
        &fs::read(dist.join("imq.service"))?,
        0o644,
    )?;
    write(
        &stage.join("etc/imq/imq.toml"),
        &fs::read(dist.join("imq.toml"))?,
        0o644,
    )?;

    // Man pages, compressed as Debian's policy wants them.
    let man = stage.join("usr/share/man/man8");
    fs::create_dir_all(&man)?;
    run(Command::new(&imqctl).arg("manpages").arg(&man))?;
    for page in fs::read_dir(&man)? {
        let page = page?.path();
        run(Command::new("gzip").args(["-9n"]).arg(&page))?;
        fs::set_permissions(page.with_extension("8.gz"), fs::Permissions::from_mode(0o644))?;
    }
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/imqctl"),
        ("zsh", "usr/share/zsh/vendor-completions/_imqctl"),
        ("fish", "usr/share/fish/vendor_completions.d/imqctl.fish"),
    ] {
        let script = output(Command::new(&imqctl).args(["completions", shell]))?;
        write(&stage.join(path), &script, 0o644)?;
    }
    write(
        &stage.join("usr/share/doc/imq/copyright"),
        b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
          Upstream-Name: imq\n\nFiles: *\nLicense: MIT or Apache-2.0\n",
        0o644,
    )?;

    let installed_kb = dir_size(&stage)?.div_ceil(1024);
    let control = format!(
        "Package: imq\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: imq developers <imq@example.org>\n\
         Depends: libc6 (>= {glibc}), iproute2\n\
         Section: net\n\
         Priority: optional\n\
         Installed-Size: {installed_kb}\n\
         Description: intermediate queueing devices: ingress shaping and shared limits\n \
         imq queues the traffic of chosen interfaces in imq (ifb) devices with eBPF\n \
         programs on their TC hooks, where any qdisc shapes it: cake or HTB on what a\n \
         WAN link receives, one limit over several interfaces, packets selected by\n \
         address, port, DSCP or netfilter mark. No kernel patch (Linux 5.10 or later).\n \
         imq.service keeps /etc/imq/imq.toml applied across reboots and hotplug.\n",
        version = version(),
        arch = arch(),
        glibc = glibc_needed(&imqctl)?,
    );
    write(&stage.join("DEBIAN/control"), control.as_bytes(), 0o644)?;
    write(&stage.join("DEBIAN/conffiles"), b"/etc/imq/imq.toml\n", 0o644)?;
    // Installing or removing the unit tells a running systemd; nothing is started or
    // stopped for the admin: `systemctl enable --now imq` when the config is ready.
    let reload =
        "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then\n\tsystemctl daemon-reload >/dev/null || true\nfi\n";
    write(&stage.join("DEBIAN/postinst"), reload.as_bytes(), 0o755)?;
    write(&stage.join("DEBIAN/postrm"), reload.as_bytes(), 0o755)?;

    let deb = deb_path();
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(deb)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
