//! Project tasks: `cargo xtask setup | build | run | test | vm-test | vm-bench | lint | bench | dist`.

mod bench;
mod bufferbloat;
mod demo;
mod dist;
mod queues_bench;
mod setup;
mod vm;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready: nightly + rust-src, bpf-linker, Debian tools (idempotent)
    Setup,
    /// Build target/release/imqctl with the eBPF object embedded
    Build,
    /// Without arguments: a shaping demo in throwaway namespaces. With `-- ARGS`: imqctl ARGS
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run every test: unit, BPF_PROG_TEST_RUN and privileged integration tests (root)
    Test {
        /// Only tests whose name contains this
        filter: Option<String>,
    },
    /// Run the test suite on Debian 11, 12 and 13's kernels, booted under qemu (root)
    VmTest {
        /// bullseye, bookworm, trixie or all; repeat or separate with commas
        #[arg(long, default_value = "all", value_delimiter = ',')]
        kernel: Vec<String>,
        /// Minutes one kernel may take, boot to power-off
        #[arg(long, default_value_t = 40)]
        timeout_minutes: u64,
        /// Only tests whose name contains this
        filter: Option<String>,
    },
    /// Latency under load on a bloated WAN link with each shaper setup, in a VM of a
    /// kernel that has cake (root): bench/bufferbloat/ and BENCHMARKS.md §7
    VmBench {
        /// The kernel to boot: bullseye, bookworm or trixie
        #[arg(long, default_value = "trixie")]
        kernel: String,
        /// Seconds each load lasts
        #[arg(long, default_value_t = 20)]
        seconds: u32,
        /// Times every setup and load is measured, taking turns
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Sum up the console log of an earlier run instead of running again
        #[arg(long, value_name = "LOG")]
        from_log: Option<PathBuf>,
    },
    /// Differential fuzzing of the classifier for N minutes (root): random rule sets and
    /// frames through the real program (BPF_PROG_TEST_RUN) and a reference matcher
    Fuzz {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Start from this seed (hexadecimal) instead of a fresh one
        #[arg(long)]
        seed: Option<String>,
    },
    /// A soak of N minutes (root): a flow through imq while watch, rule sets, imq devices
    /// and interfaces churn; checks nothing lost and nothing grew (RELIABILITY.md)
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Run it in a VM of this kernel (bullseye, bookworm or trixie), where the
        /// device hook runs and imq devices are deleted and flapped too
        #[arg(long)]
        kernel: Option<String>,
    },
    /// cargo fmt --check and clippy -D warnings on the host and eBPF crates
    Lint,
    /// Build the Debian package: target/dist/imq_VERSION_ARCH.deb (imqctl, imq.service,
    /// /etc/imq/imq.toml, man pages, completions)
    Dist,
    /// Measure imq beside no imq and the classic ifb setup; writes BENCHMARKS.md (root)
    Bench {
        /// Only write BENCHMARKS.md again from bench/results.json
        #[arg(long)]
        render_only: bool,
        /// Only measure what `imqctl monitor` costs (section 8), keeping the other figures
        #[arg(long, conflicts_with = "render_only")]
        monitor_only: bool,
        /// Only measure multi-queue imq devices (section 9), keeping the other figures
        #[arg(long, conflicts_with_all = ["render_only", "monitor_only"])]
        queues_only: bool,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

pub fn imqctl_path() -> PathBuf {
    workspace_root().join("target/release/imqctl")
}

/// Runs a command to completion; an error names it and its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin());
    c
}

fn build() -> Result<()> {
    setup::setup()?;
    run(cargo().args(["build", "--release", "--package", "imq-user"]))?;
    println!("built {}", imqctl_path().display());
    Ok(())
}

fn test(filter: Option<String>) -> Result<()> {
    build()?;
    // The package test checks what `cargo xtask dist` builds.
    let deb = dist::package()?;
    let mut cmd = cargo();
    // Every test binary runs, also after one has failed.
    cmd.args(["test", "--release", "--no-fail-fast"])
        .env("IMQCTL", imqctl_path())
        .env("IMQ_DEB", deb);
    // Throughput tests share two cores: one at a time keeps their figures honest.
    cmd.args(["--", "--test-threads=1"]);
    cmd.args(filter);
    run(&mut cmd)
}

fn fuzz(minutes: u64, seed: Option<String>) -> Result<()> {
    build()?;
    let seed = seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        format!("{:x}", nanos ^ u64::from(std::process::id()).rotate_left(32))
    });
    println!("fuzzing for {minutes} min from seed {seed} (replay: cargo xtask fuzz --seed {seed})");
    run(cargo()
        .args(["test", "--release", "--package", "imq-tests", "--test", "differential"])
        .env("IMQ_FUZZ_SEED", &seed)
        .env("IMQ_FUZZ_SECONDS", (minutes * 60).to_string())
        .args(["--", "--nocapture"]))
}

fn lint() -> Result<()> {
    setup::setup()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--release", "--all-targets", "--", "-D", "warnings"]))?;
    // CARGO is the stable toolchain's cargo itself; rustup picks the nightly one.
    run(Command::new("rustup")
        .current_dir(workspace_root().join("imq-ebpf"))
        .env("PATH", setup::path_with_cargo_bin())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => build(),
        Task::Run { args } if args.is_empty() => build().and_then(|()| demo::run()),
        Task::Run { args } => {
            return match build().and_then(|()| Ok(Command::new(imqctl_path()).args(args).status()?)) {
                Ok(status) => ExitCode::from(status.code().unwrap_or(1) as u8),
                Err(e) => {
                    eprintln!("xtask: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Task::Test { filter } => test(filter),
        Task::VmTest {
            kernel,
            timeout_minutes,
            filter,
        } => build().and_then(|()| {
            let suites = if kernel.iter().any(|k| k == "all") {
                vm::SUITES.iter().map(|(s, _)| (*s).to_owned()).collect()
            } else {
                kernel
            };
            vm::run_tests(&vm::Options {
                suites,
                filter,
                timeout: std::time::Duration::from_secs(timeout_minutes * 60),
                soak_seconds: None,
            })
        }),
        Task::VmBench {
            kernel,
            seconds,
            rounds,
            from_log: Some(log),
        } => bufferbloat::run(&kernel, seconds, rounds, Some(&log)),
        Task::VmBench {
            kernel,
            seconds,
            rounds,
            from_log: None,
        } => build().and_then(|()| bufferbloat::run(&kernel, seconds, rounds, None)),
        Task::Fuzz { minutes, seed } => fuzz(minutes, seed),
        Task::Soak {
            minutes,
            kernel: Some(kernel),
        } => build().and_then(|()| {
            vm::run_tests(&vm::Options {
                suites: vec![kernel],
                filter: None,
                timeout: std::time::Duration::from_secs((minutes + 20) * 60),
                soak_seconds: Some(minutes * 60),
            })
        }),
        Task::Soak { minutes, kernel: None } => build().and_then(|()| {
            run(cargo()
                .args(["test", "--release", "--package", "imq-tests", "--test", "soak"])
                .env("IMQCTL", imqctl_path())
                .env("IMQ_SOAK_SECONDS", (minutes * 60).to_string())
                .args(["--", "--ignored", "--nocapture"]))
        }),
        Task::Lint => lint(),
        Task::Dist => build().and_then(|()| {
            println!("built {}", dist::package()?.display());
            Ok(())
        }),
        Task::Bench { render_only: true, .. } => bench::render_saved(),
        Task::Bench { monitor_only: true, .. } => build().and_then(|()| bench::monitor_only()),
        Task::Bench { queues_only: true, .. } => build().and_then(|()| bench::queues_only()),
        Task::Bench { .. } => build().and_then(|()| bench::run()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
