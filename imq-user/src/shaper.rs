//! WAN shapers: the one-step fix for bufferbloat, as sqm-scripts and qosify set it
//! up. `imqctl shape eth0 --down 45mbit --up 9mbit` queues everything eth0 receives
//! in an imq device with cake in `ingress` mode at 45 Mbit/s, and puts cake at
//! 9 Mbit/s on eth0's own egress. `--qdisc fq_codel` uses HTB with one fq_codel leaf
//! instead (sqm's simplest.qos).
//!
//! The kernel holds the whole shaper; nothing else is stored. A shaper's qdiscs carry
//! the handle [`SHAPER_MAJOR`]`:` (`1a1:`), which is how imq tells them from an
//! admin's own, and its download side is a catch-all ingress rule to the imq device.
//! Reading a shaper back (`show`, `export`) reads those qdiscs' options.

use std::{fmt, str::FromStr};

use serde::Serialize;

use crate::{
    error::{Error, Result},
    rule::DevName,
};

/// Handle major of the root qdisc of every shaper, on the interface (upload) and on
/// the imq device (download).
pub const SHAPER_MAJOR: u16 = 0x1a1;
/// Handle major of the fq_codel leaf under the HTB class `1a1:1`.
pub const LEAF_MAJOR: u16 = 0x1a2;
/// The prio of a shaper's catch-all ingress rule: after the rules an admin adds
/// with the default prios, which then take their packets first.
pub const SHAPER_PRIO: u32 = 60_000;

/// A rate in bits per second, written as tc writes it: `45mbit`, `800kbit`, `1.5gbit`.
/// The kernel keeps bytes per second, so a rate is a whole number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(u64);

impl Rate {
    /// Lowest rate taken: below it no shaper is useful, and a typo is likelier.
    pub const MIN_BITS: u64 = 64_000;
    /// Highest: 1 Tbit/s.
    pub const MAX_BITS: u64 = 1_000_000_000_000;

    pub fn bytes_per_sec(self) -> u64 {
        self.0
    }

    pub fn bits_per_sec(self) -> u64 {
        self.0 * 8
    }

    pub fn from_bytes_per_sec(b: u64) -> Self {
        Self(b)
    }
}

impl FromStr for Rate {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason| Error::Invalid {
            what: "rate",
            input: s.to_owned(),
            reason,
        };
        let lower = s.trim().to_ascii_lowercase();
        let split = lower
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(lower.len());
        let (number, unit) = lower.split_at(split);
        let scale: u64 = match unit {
            "bit" => 1,
            "kbit" => 1_000,
            "mbit" => 1_000_000,
            "gbit" => 1_000_000_000,
            "" => return Err(bad("give a unit: kbit, mbit or gbit (e.g. 45mbit)")),
            u if u.ends_with("bps") || u.ends_with("byte") => {
                return Err(bad("use kbit, mbit or gbit (tc's bps means bytes per second)"));
            }
            _ => return Err(bad("expected a number with kbit, mbit or gbit (e.g. 45mbit)")),
        };
        // Decimal fractions exactly: "1.5" is 15 tenths, never a float.
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 9 {
            return Err(bad("expected a number with kbit, mbit or gbit (e.g. 45mbit)"));
        }
        let digits = format!("{int}{frac}");
        let value: u128 = digits.parse().map_err(|_| bad("not a number"))?;
        let bits = value * u128::from(scale) / 10u128.pow(frac.len() as u32);
        if bits < u128::from(Self::MIN_BITS) {
            return Err(bad("below 64kbit"));
        }
        if bits > u128::from(Self::MAX_BITS) {
            return Err(bad("above 1000gbit"));
        }
        Ok(Self((bits as u64).div_ceil(8)))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bits_per_sec();
        for (scale, unit) in [(1_000_000_000, "gbit"), (1_000_000, "mbit"), (1_000, "kbit")] {
            if bits >= scale {
                let whole = bits / scale;
                let rest = bits % scale;
                if rest == 0 {
                    return write!(f, "{whole}{unit}");
                }
                // Up to three decimals, exactly when they suffice.
                if (rest * 1000).is_multiple_of(scale) {
                    let frac = format!("{:03}", rest * 1000 / scale);
                    return write!(f, "{whole}.{}{unit}", frac.trim_end_matches('0'));
                }
            }
        }
        write!(f, "{bits}bit")
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

macro_rules! keyword_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal, { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub enum $name {
            #[default]
            $($variant),+
        }

        impl $name {
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(s))
                    .ok_or_else(|| Error::Invalid {
                        what: $what,
                        input: s.to_owned(),
                        reason: concat!("expected ", $($text, " "),+),
                    })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

keyword_enum!(
    /// What shapes each direction.
    ShaperQdisc, "qdisc", { Cake = "cake", FqCodel = "fq_codel" }
);
keyword_enum!(
    /// Framing below IP that the shaper accounts for: ATM cells (ADSL) or PTM's
    /// 64b/65b (VDSL2).
    LinkLayer, "link layer", { Ethernet = "ethernet", Atm = "atm", Ptm = "ptm" }
);
keyword_enum!(
    /// cake's priority tins, as `tc qdisc ... cake diffserv4` names them.
    Diffserv, "diffserv mode", {
        Diffserv3 = "diffserv3",
        Diffserv4 = "diffserv4",
        Diffserv8 = "diffserv8",
        Besteffort = "besteffort",
        Precedence = "precedence",
    }
);

/// One WAN shaper, as `shape` and the rule file's `[[shaper]]` state it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Shaper {
    /// The WAN interface.
    pub interface: String,
    /// Download: what the interface receives, shaped in `dev`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down: Option<Rate>,
    /// Upload: what the interface sends, shaped on the interface itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub up: Option<Rate>,
    /// The imq device of the download side [default: the lowest free one].
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "display")]
    pub dev: Option<DevName>,
    pub qdisc: ShaperQdisc,
    /// Bytes of framing per packet below IP (cake's `overhead`; HTB's rate overhead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overhead: Option<i32>,
    /// Smallest packet size, after overhead, that the link really sends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mpu: Option<u32>,
    pub link_layer: LinkLayer,
    /// cake only [default: diffserv3].
    pub diffserv: Diffserv,
    /// cake only: look through NAT for per-host fairness.
    pub nat: bool,
    /// cake only: clear DSCP after the tins are chosen.
    pub wash: bool,
    /// cake only, upload: drop ACKs a later ACK makes redundant.
    pub ack_filter: bool,
}

fn display<S: serde::Serializer>(v: &Option<DevName>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.collect_str(d),
        None => s.serialize_none(),
    }
}

impl Shaper {
    /// Refuses what cannot be set up as stated, before anything changes.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::BadShaper(format!("{}: {m}", self.interface)));
        if self.down.is_none() && self.up.is_none() {
            return bad("give --down RATE, --up RATE or both".into());
        }
        if let Some(o) = self.overhead
            && !(-64..=256).contains(&o)
        {
            return bad(format!("overhead {o} is outside -64..256"));
        }
        if let Some(m) = self.mpu
            && m > 256
        {
            return bad(format!("mpu {m} is above 256"));
        }
        if self.qdisc == ShaperQdisc::FqCodel {
            let cake_only = [
                ("--diffserv", self.diffserv != Diffserv::default()),
                ("--nat", self.nat),
                ("--wash", self.wash),
                ("--ack-filter", self.ack_filter),
                ("--link-layer ptm", self.link_layer == LinkLayer::Ptm),
                ("a negative --overhead", self.overhead.is_some_and(|o| o < 0)),
            ];
            if let Some((opt, _)) = cake_only.iter().find(|(_, set)| *set) {
                return bad(format!("{opt} needs --qdisc cake"));
            }
        }
        if self.ack_filter && self.up.is_none() {
            return bad("--ack-filter acts on the upload: give --up".into());
        }
        if self.dev.is_some() && self.down.is_none() {
            return bad("--dev names the download's imq device: give --down".into());
        }
        Ok(())
    }

    /// The options of this shaper's cake qdisc for one direction. Every option is
    /// stated, so that replacing a running cake leaves nothing of the old setup.
    pub(crate) fn cake_options(&self, rate: Rate, ingress: bool, had_nat: bool) -> Vec<u8> {
        let mut o = Vec::new();
        nla(&mut o, cake::BASE_RATE64, &rate.bytes_per_sec().to_ne_bytes());
        nla_u32(&mut o, cake::DIFFSERV_MODE, self.diffserv.cake_mode());
        nla_u32(
            &mut o,
            cake::ATM,
            match self.link_layer {
                LinkLayer::Ethernet => 0,
                LinkLayer::Atm => 1,
                LinkLayer::Ptm => 2,
            },
        );
        // cake adds its overhead in raw mode too: "none" is raw with an overhead of 0.
        nla_u32(&mut o, cake::OVERHEAD, self.overhead.unwrap_or(0) as u32);
        if self.overhead.is_none() {
            nla_u32(&mut o, cake::RAW, 0);
        }
        nla_u32(&mut o, cake::MPU, self.mpu.unwrap_or(0));
        // A kernel without conntrack refuses the attribute itself, even as 0.
        if self.nat || had_nat {
            nla_u32(&mut o, cake::NAT, u32::from(self.nat));
        }
        nla_u32(&mut o, cake::WASH, u32::from(self.wash));
        nla_u32(&mut o, cake::INGRESS, u32::from(ingress));
        nla_u32(&mut o, cake::ACK_FILTER, u32::from(self.ack_filter && !ingress));
        o
    }

    /// HTB's class options for `rate`: rate and ceil, with the link layer's framing
    /// in the rate spec so the kernel accounts for it.
    pub(crate) fn htb_class_options(&self, rate: Rate) -> Vec<u8> {
        let bytes = rate.bytes_per_sec();
        let spec = RateSpec {
            linklayer: if self.link_layer == LinkLayer::Atm { 2 } else { 1 },
            overhead: self.overhead.unwrap_or(0).max(0) as u16,
            mpu: self.mpu.unwrap_or(0) as u16,
            rate: u32::try_from(bytes).unwrap_or(u32::MAX),
        };
        // A bucket of 1 ms at the rate, at least two full frames: sqm's default.
        let burst = (bytes / 1000).max(3028);
        // In psched ticks of 64 ns (PSCHED_SHIFT), as the kernel reads it.
        let ticks = u32::try_from(burst * 1_000_000_000 / bytes / 64).unwrap_or(u32::MAX);
        let mut parms = Vec::with_capacity(44);
        spec.emit(&mut parms);
        spec.emit(&mut parms); // ceil = rate
        for v in [ticks, ticks, 0, 0, 0] {
            // buffer, cbuffer, quantum (from r2q), level, prio
            parms.extend_from_slice(&v.to_ne_bytes());
        }
        let mut o = Vec::new();
        nla(&mut o, htb::PARMS, &parms);
        if bytes > u64::from(u32::MAX) {
            nla(&mut o, htb::RATE64, &bytes.to_ne_bytes());
            nla(&mut o, htb::CEIL64, &bytes.to_ne_bytes());
        }
        o
    }

    /// HTB's qdisc options: everything to class `1a1:1`.
    pub(crate) fn htb_qdisc_options() -> Vec<u8> {
        let mut glob = Vec::with_capacity(20);
        // version 3, rate2quantum 10, default class 1, debug 0, direct_pkts 0
        for v in [3u32, 10, 1, 0, 0] {
            glob.extend_from_slice(&v.to_ne_bytes());
        }
        let mut o = Vec::new();
        nla(&mut o, htb::INIT, &glob);
        o
    }
}

impl Diffserv {
    fn cake_mode(self) -> u32 {
        match self {
            Self::Diffserv3 => 0,
            Self::Diffserv4 => 1,
            Self::Diffserv8 => 2,
            Self::Besteffort => 3,
            Self::Precedence => 4,
        }
    }

    fn from_cake_mode(m: u32) -> Self {
        match m {
            1 => Self::Diffserv4,
            2 => Self::Diffserv8,
            3 => Self::Besteffort,
            4 => Self::Precedence,
            _ => Self::Diffserv3,
        }
    }
}

/// `struct tc_ratespec`.
struct RateSpec {
    linklayer: u8,
    overhead: u16,
    mpu: u16,
    rate: u32,
}

impl RateSpec {
    fn emit(&self, out: &mut Vec<u8>) {
        out.push(0); // cell_log
        out.push(self.linklayer);
        out.extend_from_slice(&self.overhead.to_ne_bytes());
        out.extend_from_slice(&0i16.to_ne_bytes()); // cell_align
        out.extend_from_slice(&self.mpu.to_ne_bytes());
        out.extend_from_slice(&self.rate.to_ne_bytes());
    }
}

/// TCA_CAKE_* (include/uapi/linux/pkt_sched.h).
mod cake {
    pub const BASE_RATE64: u16 = 2;
    pub const DIFFSERV_MODE: u16 = 3;
    pub const ATM: u16 = 4;
    pub const OVERHEAD: u16 = 6;
    pub const NAT: u16 = 11;
    pub const RAW: u16 = 12;
    pub const WASH: u16 = 13;
    pub const MPU: u16 = 14;
    pub const INGRESS: u16 = 15;
    pub const ACK_FILTER: u16 = 16;
    /// TCA_CAKE_STATS_*, in TCA_STATS_APP.
    pub const STATS_MEMORY_USED: u16 = 4;
    pub const STATS_TIN_STATS: u16 = 10;
    /// TCA_CAKE_TIN_STATS_*, one nest per tin.
    pub const TIN_SENT_PACKETS: u16 = 2;
    pub const TIN_SENT_BYTES64: u16 = 3;
    pub const TIN_DROPPED_PACKETS: u16 = 4;
    pub const TIN_ACKS_DROPPED_PACKETS: u16 = 6;
    pub const TIN_ECN_MARKED_PACKETS: u16 = 8;
    pub const TIN_BACKLOG_BYTES: u16 = 11;
    pub const TIN_THRESHOLD_RATE64: u16 = 12;
    pub const TIN_PEAK_DELAY_US: u16 = 18;
    pub const TIN_AVG_DELAY_US: u16 = 19;
    pub const TIN_BASE_DELAY_US: u16 = 20;
    pub const TIN_SPARSE_FLOWS: u16 = 21;
    pub const TIN_BULK_FLOWS: u16 = 22;
}

/// TCA_HTB_*.
mod htb {
    pub const PARMS: u16 = 1;
    pub const INIT: u16 = 2;
    pub const RATE64: u16 = 6;
    pub const CEIL64: u16 = 7;
}

/// Appends one netlink attribute, padded to 4 bytes.
pub(crate) fn nla(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (len.next_multiple_of(4) - len), 0);
}

fn nla_u32(out: &mut Vec<u8>, kind: u16, v: u32) {
    nla(out, kind, &v.to_ne_bytes());
}

/// The attributes in a buffer of them, (type without flags, value); stops at the
/// first malformed one.
pub(crate) fn nlas(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

fn get<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn u64_of(v: &[u8]) -> Option<u64> {
    match v.len() {
        8.. => Some(u64::from_ne_bytes(v[..8].try_into().ok()?)),
        4 => u32_of(v).map(u64::from),
        _ => None,
    }
}

/// What one direction of a shaper is, read back from its root qdisc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Side {
    pub rate: Rate,
    pub shaper: Shaper,
    /// cake in ingress mode (the download side).
    pub ingress: bool,
}

/// Reads a cake qdisc's options back into a shaper's terms.
pub(crate) fn read_cake(options: &[u8]) -> Option<Side> {
    let a = nlas(options);
    let u = |k| get(&a, k).and_then(u32_of);
    let rate = Rate::from_bytes_per_sec(get(&a, cake::BASE_RATE64).and_then(u64_of)?);
    let raw = get(&a, cake::RAW).is_some();
    Some(Side {
        rate,
        ingress: u(cake::INGRESS).unwrap_or(0) != 0,
        shaper: Shaper {
            qdisc: ShaperQdisc::Cake,
            overhead: if raw { None } else { u(cake::OVERHEAD).map(|v| v as i32) },
            mpu: u(cake::MPU).filter(|&m| m != 0),
            link_layer: match u(cake::ATM) {
                Some(1) => LinkLayer::Atm,
                Some(2) => LinkLayer::Ptm,
                _ => LinkLayer::Ethernet,
            },
            diffserv: Diffserv::from_cake_mode(u(cake::DIFFSERV_MODE).unwrap_or(0)),
            nat: u(cake::NAT).unwrap_or(0) != 0,
            wash: u(cake::WASH).unwrap_or(0) != 0,
            ack_filter: u(cake::ACK_FILTER).unwrap_or(0) != 0,
            ..Shaper::default()
        },
    })
}

/// Reads the HTB class `1a1:1` of an fq_codel shaper back.
pub(crate) fn read_htb_class(options: &[u8]) -> Option<Side> {
    let a = nlas(options);
    let parms = get(&a, htb::PARMS)?;
    if parms.len() < 44 {
        return None;
    }
    let linklayer = parms[1];
    let overhead = u16::from_ne_bytes([parms[2], parms[3]]);
    let mpu = u16::from_ne_bytes([parms[6], parms[7]]);
    let rate32 = u32_of(&parms[8..12])?;
    let bytes = get(&a, htb::RATE64).and_then(u64_of).unwrap_or(u64::from(rate32));
    Some(Side {
        rate: Rate::from_bytes_per_sec(bytes),
        ingress: false,
        shaper: Shaper {
            qdisc: ShaperQdisc::FqCodel,
            overhead: (overhead != 0).then_some(i32::from(overhead)),
            mpu: (mpu != 0).then_some(u32::from(mpu)),
            link_layer: if linklayer == 2 {
                LinkLayer::Atm
            } else {
                LinkLayer::Ethernet
            },
            ..Shaper::default()
        },
    })
}

/// One qdisc's counters, as `tc -s qdisc show` prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QdiscStats {
    pub kind: String,
    /// `1a1:`
    pub handle: String,
    /// `root` or the parent class, `1a1:1`.
    pub parent: String,
    pub sent_bytes: u64,
    pub sent_packets: u64,
    pub drops: u64,
    pub overlimits: u64,
    pub requeues: u64,
    pub backlog_bytes: u64,
    pub backlog_packets: u64,
    /// cake's own statistics, where the qdisc is cake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cake: Option<CakeStats>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CakeStats {
    pub memory_used: u64,
    /// Per priority tin, in cake's order (tin 0 is bulk in diffserv3/4).
    pub tins: Vec<CakeTin>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CakeTin {
    /// The tin's share of the bandwidth, bits per second.
    pub threshold_bps: u64,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub dropped_packets: u64,
    /// ECN CE marks: congestion signalled without a drop.
    pub ecn_marked_packets: u64,
    pub ack_dropped_packets: u64,
    pub backlog_bytes: u64,
    pub peak_delay_us: u64,
    pub avg_delay_us: u64,
    pub base_delay_us: u64,
    pub sparse_flows: u64,
    pub bulk_flows: u64,
}

/// cake's TCA_STATS_APP.
pub(crate) fn read_cake_stats(app: &[u8]) -> CakeStats {
    let a = nlas(app);
    let mut stats = CakeStats {
        memory_used: get(&a, cake::STATS_MEMORY_USED).and_then(u64_of).unwrap_or(0),
        tins: Vec::new(),
    };
    if let Some(tins) = get(&a, cake::STATS_TIN_STATS) {
        let mut nested = nlas(tins);
        nested.sort_by_key(|(k, _)| *k);
        for (_, tin) in nested {
            let t = nlas(tin);
            let v = |k| get(&t, k).and_then(u64_of).unwrap_or(0);
            stats.tins.push(CakeTin {
                threshold_bps: v(cake::TIN_THRESHOLD_RATE64) * 8,
                sent_packets: v(cake::TIN_SENT_PACKETS),
                sent_bytes: v(cake::TIN_SENT_BYTES64),
                dropped_packets: v(cake::TIN_DROPPED_PACKETS),
                ecn_marked_packets: v(cake::TIN_ECN_MARKED_PACKETS),
                ack_dropped_packets: v(cake::TIN_ACKS_DROPPED_PACKETS),
                backlog_bytes: v(cake::TIN_BACKLOG_BYTES),
                peak_delay_us: v(cake::TIN_PEAK_DELAY_US),
                avg_delay_us: v(cake::TIN_AVG_DELAY_US),
                base_delay_us: v(cake::TIN_BASE_DELAY_US),
                sparse_flows: v(cake::TIN_SPARSE_FLOWS),
                bulk_flows: v(cake::TIN_BULK_FLOWS),
            });
        }
    }
    stats
}

/// The qdiscs this kernel has, as far as it says (built in, loaded, or a module on
/// disk), for the message that says which one it lacks. Empty if it cannot tell.
pub fn available_qdiscs() -> Vec<String> {
    let mut kinds = std::collections::BTreeSet::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut add = |module: &str| {
        if let Some(kind) = module.strip_prefix("sch_")
            && !matches!(kind, "ingress" | "generic" | "api" | "mq" | "mqprio" | "fifo")
        {
            kinds.insert(kind.to_owned());
        }
    };
    // The kernel's own config, where it exports it.
    if let Ok(out) = std::process::Command::new("zcat").arg("/proc/config.gz").output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.strip_prefix("CONFIG_NET_SCH_")
                && let Some((name, v)) = name.split_once('=')
                && (v == "y" || v == "m")
            {
                add(&format!("sch_{}", name.to_ascii_lowercase()));
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/module") {
        for e in dir.flatten() {
            add(&e.file_name().to_string_lossy());
        }
    }
    let modules = format!("/lib/modules/{release}");
    if let Ok(builtin) = std::fs::read_to_string(format!("{modules}/modules.builtin")) {
        for line in builtin.lines() {
            if let Some(file) = line.rsplit('/').next() {
                add(file.trim_end_matches(".ko"));
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(format!("{modules}/kernel/net/sched")) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            add(name.split('.').next().unwrap_or(""));
        }
    }
    kinds.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_and_print_like_tc() {
        for (text, bits, shown) in [
            ("45mbit", 45_000_000, "45mbit"),
            ("45Mbit", 45_000_000, "45mbit"),
            ("1.5gbit", 1_500_000_000, "1.5gbit"),
            ("800kbit", 800_000, "800kbit"),
            ("9.25mbit", 9_250_000, "9.25mbit"),
            ("100000bit", 100_000, "100kbit"),
        ] {
            let r: Rate = text.parse().unwrap();
            assert_eq!(r.bits_per_sec(), bits, "{text}");
            assert_eq!(r.to_string(), shown);
        }
        for bad in [
            "45",
            "45mbps",
            "45MB",
            "mbit",
            "4.5.1mbit",
            "10kbit",
            "2000gbit",
            "-5mbit",
            "",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        let msg = "45mbps".parse::<Rate>().unwrap_err().to_string();
        assert!(msg.contains("bytes per second"), "{msg}");
    }

    #[test]
    fn cake_options_read_back() {
        let s = Shaper {
            interface: "wan".into(),
            down: Some("45mbit".parse().unwrap()),
            overhead: Some(18),
            mpu: Some(64),
            link_layer: LinkLayer::Atm,
            diffserv: Diffserv::Diffserv4,
            nat: true,
            wash: true,
            ..Shaper::default()
        };
        let side = read_cake(&s.cake_options(s.down.unwrap(), true, false)).unwrap();
        assert_eq!(side.rate, s.down.unwrap());
        assert!(side.ingress);
        let expect = Shaper {
            interface: String::new(),
            down: None,
            ..s.clone()
        };
        assert_eq!(side.shaper, expect);
        let raw = Shaper::default().cake_options("10mbit".parse().unwrap(), false, false);
        assert_eq!(read_cake(&raw).unwrap().shaper.overhead, None);
    }

    #[test]
    fn htb_options_read_back() {
        let s = Shaper {
            qdisc: ShaperQdisc::FqCodel,
            overhead: Some(44),
            link_layer: LinkLayer::Atm,
            ..Shaper::default()
        };
        for rate in ["20mbit", "40gbit"] {
            let rate: Rate = rate.parse().unwrap();
            let side = read_htb_class(&s.htb_class_options(rate)).unwrap();
            assert_eq!(side.rate, rate);
            assert_eq!(
                (side.shaper.overhead, side.shaper.link_layer),
                (Some(44), LinkLayer::Atm)
            );
        }
    }

    #[test]
    fn cake_only_options_are_refused_for_fq_codel() {
        let s = Shaper {
            interface: "wan".into(),
            up: Some("10mbit".parse().unwrap()),
            qdisc: ShaperQdisc::FqCodel,
            nat: true,
            ..Shaper::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("--nat needs --qdisc cake")
        );
        let none = Shaper {
            interface: "wan".into(),
            ..Shaper::default()
        };
        assert!(none.validate().is_err());
    }
}
