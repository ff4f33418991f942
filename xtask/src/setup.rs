//! `cargo xtask setup`: everything a fresh machine needs to build and test imq, each
//! step skipped when already done.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// The bpf-linker release that builds with the toolchains here (KERNEL-FACTS §9).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Commands the tests, the demo and the package build run, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("setpriv", "util-linux"),
    ("ping", "iputils-ping"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("tcpdump", "tcpdump"),
    // `cargo xtask dist`
    ("dpkg-deb", "dpkg"),
    ("objcopy", "binutils"),
    ("objdump", "binutils"),
    ("gzip", "gzip"),
];

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    )
}

/// PATH with cargo's bin directory in front, where `cargo install` puts bpf-linker.
pub fn path_with_cargo_bin() -> OsString {
    let bin = cargo_home().join("bin");
    let mut paths = vec![bin.clone()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p).filter(|d| *d != bin));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.env("PATH", path_with_cargo_bin())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn on_path(program: &str) -> bool {
    std::env::split_paths(&path_with_cargo_bin()).any(|d| d.join(program).is_file())
}

pub fn setup() -> Result<()> {
    let mut did = Vec::new();

    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        did.push("installed the nightly toolchain");
    }
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?);
    if !sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists() {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        did.push("added rust-src to nightly");
    }

    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        build_bpf_linker(&sysroot)?;
        did.push("built bpf-linker against the nightly's LLVM");
    }

    if ensure_packages(TOOLS)? {
        did.push("installed Debian packages");
    }

    if did.is_empty() {
        eprintln!(
            "setup: nothing to do (nightly + rust-src, bpf-linker, {} present)",
            tool_names()
        );
    } else {
        eprintln!("setup: {}", did.join("; "));
    }
    Ok(())
}

/// Installs the Debian package of each (command, package) whose command is missing;
/// whether it installed any.
pub fn ensure_packages(tools: &[(&str, &str)]) -> Result<bool> {
    let mut packages: Vec<&str> = tools.iter().filter(|(t, _)| !on_path(t)).map(|(_, p)| *p).collect();
    packages.sort_unstable();
    packages.dedup();
    if packages.is_empty() {
        return Ok(false);
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(true)
}

fn tool_names() -> String {
    TOOLS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
}

/// The LLVM major version of `rustc -vV` output ("LLVM version: 22.1.4" -> 22).
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The real shared library among the sysroot's lib files: `libLLVM.so.<major>.<...>`.
/// (`libLLVM-<major>-rust-*.so` beside it is a linker script, not a library.)
fn llvm_library(files: &[String], major: u32) -> Option<&str> {
    let prefix = format!("libLLVM.so.{major}.");
    files.iter().map(String::as_str).find(|f| f.starts_with(&prefix))
}

/// bpf-linker links against LLVM; the nightly toolchain ships a libLLVM of exactly the
/// version its rustc emits, so we point bpf-linker's build at that one through a
/// prefix directory of symlinks. The prefix stays under CARGO_HOME: the installed
/// binary finds libLLVM there at run time (RUNPATH).
fn build_bpf_linker(sysroot: &Path) -> Result<()> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = llvm_major(&vv).context("rustc +nightly -vV names no LLVM version")?;
    let lib_dir = sysroot.join("lib");
    let files: Vec<String> = fs::read_dir(&lib_dir)
        .with_context(|| format!("read {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let lib =
        llvm_library(&files, major).with_context(|| format!("no libLLVM.so.{major}.* in {}", lib_dir.display()))?;

    let prefix = cargo_home().join(format!("imq-llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", lib] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(lib), &link).with_context(|| format!("symlink {}", link.display()))?;
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {lib} (about a minute)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_version_and_library_are_derived() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
        let files = [
            "libLLVM-22-rust-1.97.0-nightly.so".to_owned(),
            "librustc_driver-1234.so".to_owned(),
            "libLLVM.so.22.1-rust-1.97.0-nightly".to_owned(),
        ];
        assert_eq!(llvm_library(&files, 22), Some("libLLVM.so.22.1-rust-1.97.0-nightly"));
        assert_eq!(llvm_library(&files, 21), None);
    }
}
