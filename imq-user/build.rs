//! Builds imq-ebpf for the BPF target (nightly, build-std=core, bpf-linker) so that
//! imqctl embeds the object and needs nothing installed beside it.
//! `cargo xtask setup` installs what this needs.
//!
//! The nested cargo's output is kept to itself on success (cargo would print every
//! line of it as a `warning:`), and shown whole when the eBPF build fails.

use std::{
    env,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

const PACKAGE: &str = "imq-ebpf";
/// The eBPF crate's binary: the object imqctl embeds.
const BINARY: &str = "imq";

fn main() {
    // A failed build script's stderr is what cargo shows.
    if let Err(e) = build() {
        eprintln!("{e:#}");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(PACKAGE);
    println!("cargo:rerun-if-changed={}", root.display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "big" => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    // aya-ebpf picks its architecture-specific definitions by this cfg.
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let target_dir = out_dir.join("ebpf-target");

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        PACKAGE,
        "--bins",
        "--release",
    ])
    .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
    .arg(&target_dir)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            &format!("--cfg=bpf_target_arch=\"{arch}\""),
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\x1f"),
    )
    // The outer build's compiler is the stable one; the nested build must pick
    // nightly's.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .current_dir(&root)
    .stdin(Stdio::null());
    let output = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !output.status.success() {
        eprint!("{}", String::from_utf8_lossy(&output.stdout));
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        bail!(
            "building {PACKAGE} for {target} failed ({}); its output is above",
            output.status
        );
    }
    let built = target_dir.join(target).join("release").join(BINARY);
    std::fs::copy(&built, out_dir.join(BINARY)).with_context(|| format!("copy {}", built.display()))?;
    Ok(())
}
