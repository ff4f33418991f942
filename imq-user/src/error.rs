use std::{io, path::PathBuf};

use crate::rule::{Direction, Selector};

/// Everything imq can refuse or fail at. Each message is one line a network admin can
/// act on; `imqctl` prints it as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid mark '{}': {reason}", shown(input))]
    InvalidMark { input: String, reason: &'static str },
    #[error("invalid imq device name '{}': imq devices are named imq0 .. imq255", shown(.0))]
    InvalidDevName(String),
    #[error("invalid {what} '{}': {reason}", shown(input))]
    Invalid {
        what: &'static str,
        input: String,
        reason: &'static str,
    },
    #[error("impossible match: {0}")]
    BadMatch(String),
    #[error("invalid direction '{}': expected ingress, egress or both", shown(.0))]
    InvalidDirection(String),
    #[error("invalid txqueuelen {0}: use 1000 or more, ifb's default of 32 drops bursts")]
    InvalidTxQueueLen(u32),
    #[error(
        "{dev} exists with {has} TX queue(s), not {wanted}: queues are set when a device is created; \
         delete it (its rules bypass it meanwhile) and add it again"
    )]
    QueuesDiffer { dev: String, has: u32, wanted: u32 },
    #[error("no interface '{}' in this network namespace", shown(.0))]
    NoSuchInterface(String),
    #[error("{0} is an imq device: attach the interfaces whose traffic it should shape")]
    ImqAsInterface(String),
    #[error("{0} is an ifb device: its packets are already redirected ones, imq cannot queue them")]
    IfbAsInterface(String),
    #[error(
        "{name} is not an Ethernet interface (link type {link_type}): imq can only queue frames with an Ethernet header"
    )]
    NotEthernet { name: String, link_type: String },
    #[error("imqctl needs root (CAP_NET_ADMIN and CAP_BPF or CAP_SYS_ADMIN): run it with sudo")]
    NotPrivileged,
    #[error(
        "imqctl runs in a user namespace (a rootless container?), where capabilities do not reach BPF: run it as root of the host's user namespace"
    )]
    InUserNamespace,
    #[error(
        "conflicts with the rule at prio {prio} on {iface} {direction}, which sends the same match to {dev}: detach it first"
    )]
    Conflict {
        iface: String,
        direction: Direction,
        prio: u32,
        dev: String,
    },
    #[error("prio {prio} is already taken on {iface} {direction}")]
    DuplicatePrio {
        iface: String,
        direction: Direction,
        prio: u32,
    },
    #[error(
        "{hook}: the rules need {shapes} match shapes, at most {max} (a shape is one combination of matched fields, prefix lengths and aligned port blocks)"
    )]
    TooManyShapes { hook: String, shapes: usize, max: usize },
    #[error("the rules compile to {entries} entries, at most {max} (port ranges count once per aligned block)")]
    TooManyEntries { entries: usize, max: usize },
    #[error("a namespace holds at most {0} rules")]
    TooManyRules(u32),
    #[error("no imq rule on {iface} {direction}{selector}")]
    NoSuchRule {
        iface: String,
        direction: String,
        selector: Selector,
    },
    #[error("imq state in {0} has an older layout: flush it with the imqctl that made it, or remove the directory")]
    OldLayout(PathBuf),
    #[error("line {line}: {}", shown(message))]
    RuleFile { line: usize, message: String },
    #[error("no imq device {0} in this network namespace")]
    NoSuchDevice(String),
    #[error("{dev} still receives traffic from {rules} rule(s): detach them first")]
    DeviceInUse { dev: String, rules: usize },
    #[error("{name} exists and is not an ifb device (kind {kind}): pick another imq device")]
    NotIfb { name: String, kind: String },
    #[error("{0} is not on a bpffs and none can be mounted there")]
    NotBpffs(PathBuf),
    #[error(
        "{0} {1}: refusing imq state that another user could have made or changed (check it, then remove it: rm -r {0})"
    )]
    UntrustedState(PathBuf, String),
    #[error("{0}")]
    BadShaper(String),
    #[error("this kernel has no {kind} qdisc (sch_{kind}){available}")]
    NoQdisc { kind: String, available: String },
    #[error("{0}")]
    QdiscInUse(String),
    #[error("no shaper on {0}")]
    NoSuchShaper(String),
    /// A rule file that cannot be read as a whole, named with its path.
    #[error("{0}")]
    Config(String),
    #[error("imq has no rules in this network namespace: nothing to monitor")]
    NothingToMonitor,
    #[error("imqctl monitor (pid {0}) already runs in this network namespace: one at a time")]
    MonitorBusy(u32),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("bpf: {0}")]
    Bpf(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the user gave, for an error message that stays one line: control characters
/// (a newline in a rule file string, say) are escaped as Rust writes them.
fn shown(input: &str) -> String {
    input
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// `err` with its causes on one line: aya's errors keep the failed syscall's
    /// errno in a source, and some already print their source themselves.
    pub(crate) fn bpf(context: &str, err: impl std::error::Error) -> Self {
        let mut line = format!("{context}: {err}");
        let mut cause = err.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        Self::Bpf(line)
    }
}
