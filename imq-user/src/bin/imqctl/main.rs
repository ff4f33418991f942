//! imqctl: queue incoming (and soon outgoing) traffic of chosen interfaces in imq
//! devices, where any kernel qdisc shapes it.

mod show;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use imq::{
    AttachRequest, Attached, DEFAULT_TXQUEUELEN, Imq, Options,
    rule::{DevName, Directions, Mark},
};

#[derive(Parser)]
#[command(
    name = "imqctl",
    version,
    about = "Intermediate queueing devices for Linux, without a kernel patch"
)]
struct Cli {
    /// bpffs directory for imq's pinned state [default: /sys/fs/bpf, mounted if needed]
    #[arg(long, global = true, env = "IMQ_BPFFS", value_name = "DIR")]
    bpffs: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Queue the IPv4/IPv6 traffic of an interface in an imq device
    Attach {
        /// Interface whose traffic is queued
        interface: String,
        /// ingress (egress and both: not yet)
        #[arg(long, short, default_value = "ingress", value_parser = parse_directions)]
        direction: Directions,
        /// imq device the traffic goes to; created (ifb, up) if missing
        #[arg(long, default_value = "imq0", value_parser = parse_dev)]
        dev: DevName,
        /// Only packets whose fwmark matches: VALUE[/MASK], e.g. 0x10/0xff
        #[arg(long, value_parser = parse_mark)]
        mark: Option<Mark>,
        /// Rule order on this interface and direction, lowest first [default: after the last]
        #[arg(long)]
        prio: Option<u32>,
    },
    /// Remove rules; an interface left without rules is detached
    Detach {
        interface: String,
        #[arg(long, short, default_value = "ingress", value_parser = parse_directions)]
        direction: Directions,
        /// Only the rule with this match [default: every rule of the interface]
        #[arg(long, value_parser = parse_mark)]
        mark: Option<Mark>,
    },
    /// imq devices, rules in match order, and what each rule queued
    Show {
        /// One JSON object: {"devices": [...], "rules": [...]}
        #[arg(long, short)]
        json: bool,
    },
    /// Manage imq devices
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Remove every rule and program imq attached in this network namespace
    Flush,
}

#[derive(Subcommand)]
enum DevCommand {
    /// Create an imq device (an ifb, up)
    Add {
        #[arg(value_parser = parse_dev)]
        name: DevName,
        #[arg(long, default_value_t = DEFAULT_TXQUEUELEN)]
        txqueuelen: u32,
    },
    /// Delete an imq device no rule sends traffic to
    Del {
        #[arg(value_parser = parse_dev)]
        name: DevName,
    },
}

fn parse_directions(s: &str) -> Result<Directions, String> {
    s.parse().map_err(|e: imq::Error| e.to_string())
}

fn parse_dev(s: &str) -> Result<DevName, String> {
    s.parse().map_err(|e: imq::Error| e.to_string())
}

fn parse_mark(s: &str) -> Result<Mark, String> {
    s.parse().map_err(|e: imq::Error| e.to_string())
}

/// clap's messages span several lines; an admin's scripts and logs want one.
fn one_line(err: &clap::Error) -> String {
    err.render()
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut imq = Imq::new(Options { bpffs: cli.bpffs })?;
    match cli.command {
        Command::Attach {
            interface,
            direction,
            dev,
            mark,
            prio,
        } => {
            let req = AttachRequest {
                interface,
                directions: direction,
                dev,
                mark,
                prio,
            };
            match imq.attach(&req)? {
                Attached::Added { created_dev: true } => eprintln!("created {dev}"),
                Attached::Added { created_dev: false } => {}
                Attached::Unchanged => eprintln!("rule already present on {} {}", req.interface, direction.as_str()),
            }
        }
        Command::Detach {
            interface,
            direction,
            mark,
        } => {
            let n = imq.detach(&interface, direction, mark)?;
            eprintln!("removed {n} rule(s) from {interface}");
        }
        Command::Show { json } => {
            let status = imq.show()?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print!("{}", show::render(&status));
            }
        }
        Command::Dev {
            command: DevCommand::Add { name, txqueuelen },
        } => {
            if !imq.dev_add(name, txqueuelen)? {
                eprintln!("{name} already exists");
            }
        }
        Command::Dev {
            command: DevCommand::Del { name },
        } => imq.dev_del(name)?,
        Command::Flush => {
            let n = imq.flush()?;
            eprintln!("removed {n} rule(s)");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("imqctl: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imqctl: {e}");
            ExitCode::FAILURE
        }
    }
}
