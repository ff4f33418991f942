//! Rule vocabulary and rule-set editing. Pure: nothing here touches the kernel, so the
//! whole decision of what a command would change is made (and refused) before any
//! change.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use imq_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, MAX_DEVICES, RuleSpec, SPEC_CLASSID, SPEC_DPORT, SPEC_DSCP, SPEC_DST,
    SPEC_MARK, SPEC_PROTO, SPEC_QUEUE, SPEC_QUEUE_DST, SPEC_QUEUE_FIXED, SPEC_QUEUE_SRC, SPEC_SET_MARK, SPEC_SPORT,
    SPEC_SRC,
};
use serde::Serialize;

use crate::error::{Error, Result};

/// The hook a rule sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    pub const fn to_raw(self) -> u32 {
        match self {
            Self::Ingress => DIRECTION_INGRESS,
            Self::Egress => DIRECTION_EGRESS,
        }
    }

    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            DIRECTION_INGRESS => Some(Self::Ingress),
            DIRECTION_EGRESS => Some(Self::Egress),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `--direction` names: one hook or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directions {
    Ingress,
    Egress,
    Both,
}

impl Directions {
    pub fn iter(self) -> impl Iterator<Item = Direction> {
        let (i, e) = match self {
            Self::Ingress => (true, false),
            Self::Egress => (false, true),
            Self::Both => (true, true),
        };
        [(i, Direction::Ingress), (e, Direction::Egress)]
            .into_iter()
            .filter_map(|(on, d)| on.then_some(d))
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
            Self::Both => "both",
        }
    }
}

impl fmt::Display for Directions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Directions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ingress" | "in" => Ok(Self::Ingress),
            "egress" | "out" => Ok(Self::Egress),
            "both" => Ok(Self::Both),
            _ => Err(Error::InvalidDirection(s.to_owned())),
        }
    }
}

/// A netfilter mark match, `(skb->mark & mask) == value`, written `VALUE[/MASK]` like
/// iptables' `--mark`. Without a mask all 32 bits must be equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

impl FromStr for Mark {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidMark {
            input: s.to_owned(),
            reason,
        };
        let (value, mask) = match s.split_once('/') {
            Some((v, m)) => (v, Some(m)),
            None => (s, None),
        };
        let value = parse_u32(value).ok_or_else(|| bad("the value is not a 32-bit number"))?;
        let mask = match mask {
            Some(m) => parse_u32(m).ok_or_else(|| bad("the mask is not a 32-bit number"))?,
            None => u32::MAX,
        };
        if mask == 0 {
            return Err(bad("a zero mask matches every packet; leave --mark out instead"));
        }
        if value & !mask != 0 {
            return Err(bad("the value has bits outside the mask, so nothing could match"));
        }
        Ok(Self { value, mask })
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mask == u32::MAX {
            write!(f, "{:#x}", self.value)
        } else {
            write!(f, "{:#x}/{:#x}", self.value, self.mask)
        }
    }
}

/// Decimal or `0x` hexadecimal, as iptables and tc accept.
fn parse_u32(s: &str) -> Option<u32> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() => u32::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if s.starts_with('+') => None,
        None => s.parse().ok(),
    }
}

/// An imq device, `imqN`; `N` indexes the device table of the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DevName(pub u32);

impl FromStr for DevName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidDevName(s.to_owned());
        let n = s.strip_prefix("imq").ok_or_else(bad)?;
        // No sign, no leading zeros: exactly one spelling per device.
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
            return Err(bad());
        }
        match n.parse() {
            Ok(n) if n < MAX_DEVICES => Ok(Self(n)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for DevName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "imq{}", self.0)
    }
}

/// A CIDR prefix, IPv4 or IPv6. A bare address is a /32 or /128. Host bits must be
/// zero: `198.18.0.1/24` is refused rather than silently read as `198.18.0.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub const fn family(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 4,
            IpAddr::V6(_) => 6,
        }
    }

    /// The address as it sits in a packet, in 16 bytes (IPv4 in the first four).
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0; 16];
        match self.addr {
            IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => b = a.octets(),
        }
        b
    }

    /// The prefix mask over [`Self::bytes`].
    pub fn mask_bytes(&self) -> [u8; 16] {
        let mut m = [0; 16];
        for (i, byte) in m.iter_mut().enumerate() {
            let bits = usize::from(self.len).saturating_sub(i * 8).min(8);
            *byte = (0xff00u16 >> bits) as u8;
        }
        m
    }

    fn from_bytes(family: u8, bytes: [u8; 16], len: u8) -> Option<Self> {
        let addr = match family {
            4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
            6 => IpAddr::V6(Ipv6Addr::from(bytes)),
            _ => return None,
        };
        Some(Self { addr, len })
    }
}

impl FromStr for Prefix {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason| Error::Invalid {
            what: "prefix",
            input: s.to_owned(),
            reason,
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) && l.len() <= 3 => {
                l.parse::<u8>().map_err(|_| bad("the length is out of range"))?
            }
            Some(_) => return Err(bad("the length is not a number")),
        };
        if len > max {
            return Err(bad(if max == 32 {
                "an IPv4 prefix is at most /32"
            } else {
                "an IPv6 prefix is at most /128"
            }));
        }
        let p = Self { addr, len };
        if p.bytes().iter().zip(p.mask_bytes()).any(|(b, m)| b & !m != 0) {
            return Err(bad("host bits are set; write the network address"));
        }
        Ok(p)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A port or an inclusive range of ports, `PORT[-PORT]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    /// The range as aligned power-of-two blocks, each a (value, mask) pair: what a
    /// hash lookup with a mask can match. 1024-65535 is six blocks.
    pub fn blocks(&self) -> Vec<(u16, u16)> {
        let (mut lo, hi) = (u32::from(self.lo), u32::from(self.hi));
        let mut out = Vec::new();
        while lo <= hi {
            // The largest block that starts at lo, is aligned there and ends by hi.
            let mut size = if lo == 0 { 1 << 16 } else { 1 << lo.trailing_zeros() };
            while lo + size - 1 > hi {
                size >>= 1;
            }
            out.push((lo as u16, !(size - 1) as u16));
            lo += size;
        }
        out
    }
}

impl FromStr for PortRange {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason| Error::Invalid {
            what: "port",
            input: s.to_owned(),
            reason,
        };
        let port = |p: &str| -> Result<u16> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("ports are numbers from 0 to 65535"));
            }
            p.parse().map_err(|_| bad("ports are numbers from 0 to 65535"))
        };
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => (port(s)?, port(s)?),
        };
        if lo > hi {
            return Err(bad("the range is empty: the first port is above the last"));
        }
        Ok(Self { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// An IP protocol number: a name or 0..255.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Proto(pub u8);

const PROTO_NAMES: &[(&str, u8)] = &[
    ("icmp", 1),
    ("tcp", 6),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("icmpv6", 58),
    ("sctp", 132),
    ("udplite", 136),
];

impl Proto {
    pub const ICMP: Self = Self(1);
    pub const ICMPV6: Self = Self(58);

    /// Protocols whose header starts with source and destination ports.
    pub const fn has_ports(self) -> bool {
        matches!(self.0, 6 | 17 | 132 | 136)
    }
}

impl FromStr for Proto {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(&(_, n)) = PROTO_NAMES.iter().find(|(name, _)| s.eq_ignore_ascii_case(name)) {
            return Ok(Self(n));
        }
        if !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = s.parse()
        {
            return Ok(Self(n));
        }
        Err(Error::Invalid {
            what: "protocol",
            input: s.to_owned(),
            reason: "expected tcp, udp, icmp, icmpv6, sctp, udplite, gre, esp or a number from 0 to 255",
        })
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match PROTO_NAMES.iter().find(|&&(_, n)| n == self.0) {
            Some((name, _)) => f.write_str(name),
            None => write!(f, "{}", self.0),
        }
    }
}

/// A DSCP value, 0..63, or its name: `ef`, `af11` .. `af43`, `cs0` .. `cs7`, `be`,
/// `le`, `va`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dscp(pub u8);

impl FromStr for Dscp {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let l = s.to_ascii_lowercase();
        let named = match l.as_str() {
            "be" | "df" => Some(0),
            "le" => Some(1),
            "ef" => Some(46),
            "va" => Some(44),
            _ => {
                let digit = |c: u8| c.is_ascii_digit().then(|| c - b'0');
                match l.as_bytes() {
                    [b'c', b's', c] => digit(*c).filter(|&n| n <= 7).map(|n| n << 3),
                    [b'a', b'f', c, p] => match (digit(*c), digit(*p)) {
                        (Some(c @ 1..=4), Some(p @ 1..=3)) => Some((c << 3) | (p << 1)),
                        _ => None,
                    },
                    _ => None,
                }
            }
        };
        if let Some(n) = named {
            return Ok(Self(n));
        }
        match parse_u32(s) {
            Some(n) if n < 64 => Ok(Self(n as u8)),
            _ => Err(Error::Invalid {
                what: "DSCP",
                input: s.to_owned(),
                reason: "expected 0 to 63 or a name such as ef, af41, cs1",
            }),
        }
    }
}

impl fmt::Display for Dscp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A tc class, `MAJOR:MINOR` in hexadecimal as tc writes it (`1:10` is minor 0x10).
/// Set as skb->priority, it puts the packet straight into that class of an HTB, HFSC
/// or DRR... qdisc whose handle is MAJOR, with no tc filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassId(pub u32);

impl FromStr for ClassId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason| Error::Invalid {
            what: "classid",
            input: s.to_owned(),
            reason,
        };
        let (major, minor) = s
            .split_once(':')
            .ok_or_else(|| bad("expected MAJOR:MINOR, e.g. 1:10"))?;
        let hex = |h: &str| {
            if h.is_empty() || h.len() > 4 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("MAJOR and MINOR are hexadecimal numbers up to ffff, as in tc"));
            }
            Ok(u32::from_str_radix(h, 16).expect("checked hex digits"))
        };
        let (major, minor) = (hex(major)?, hex(minor)?);
        if major == 0 || major == 0xffff {
            return Err(bad("MAJOR must be the handle of a qdisc: 1 to fffe"));
        }
        Ok(Self((major << 16) | minor))
    }
}

impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{:x}", self.0 >> 16, self.0 & 0xffff)
    }
}

/// Which TX queue of a multi-queue imq device a rule's packets go to: a fixed one
/// (counted from 1, as `mq` numbers its classes: queue 2 is class `:2`), or one
/// chosen by a hash of the source or destination address (IPv6: of its /64
/// prefix), so that each subscriber's packets always meet the same qdisc. Either way
/// a flow keeps to one queue, so queueing does not reorder it. On a device with one
/// queue it does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Queue {
    Fixed(u16),
    Src,
    Dst,
}

impl FromStr for Queue {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "src" => Ok(Self::Src),
            "dst" => Ok(Self::Dst),
            n => match n.parse::<u16>() {
                Ok(q) if q >= 1 => Ok(Self::Fixed(q)),
                _ => Err(Error::Invalid {
                    what: "queue",
                    input: s.to_owned(),
                    reason: "expected a queue number from 1 (mq's class :1) to 65535, src or dst",
                }),
            },
        }
    }
}

impl fmt::Display for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(q) => write!(f, "{q}"),
            Self::Src => f.write_str("src"),
            Self::Dst => f.write_str("dst"),
        }
    }
}

macro_rules! serialize_as_display {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
serialize_as_display!(Mark, Prefix, PortRange, Proto, ClassId, Queue);

impl Serialize for Dscp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u8(self.0)
    }
}

/// What a rule matches. Every field given must match; none given matches every
/// IPv4/IPv6 packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Match {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark: Option<Mark>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<Prefix>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<Prefix>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<PortRange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<PortRange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dscp: Option<Dscp>,
}

impl Match {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// 0 (either), 4 or 6: the family the addresses (or protocol) pin down.
    pub fn family(&self) -> u8 {
        self.src
            .or(self.dst)
            .map(|p| p.family())
            .or(match self.proto {
                Some(Proto::ICMP) => Some(4),
                Some(Proto::ICMPV6) => Some(6),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Combinations no packet could match, refused with the reason.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &str| Err(Error::BadMatch(reason.to_owned()));
        if let (Some(s), Some(d)) = (self.src, self.dst)
            && s.family() != d.family()
        {
            return bad("--src and --dst are of different address families");
        }
        if let Some(p) = self.src.or(self.dst) {
            match (p.family(), self.proto) {
                (6, Some(Proto::ICMP)) => return bad("icmp is IPv4's; IPv6 uses icmpv6"),
                (4, Some(Proto::ICMPV6)) => return bad("icmpv6 is IPv6's; IPv4 uses icmp"),
                _ => {}
            }
        }
        if (self.sport.is_some() || self.dport.is_some()) && !self.proto.is_some_and(Proto::has_ports) {
            return bad("ports need --proto tcp, udp, sctp or udplite");
        }
        Ok(())
    }
}

impl Match {
    /// The fields that are set, named as the flags and rule file keys name them.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        fn s(v: Option<impl fmt::Display>) -> Option<String> {
            v.map(|v| v.to_string())
        }
        [
            ("mark", s(self.mark)),
            ("src", s(self.src)),
            ("dst", s(self.dst)),
            ("proto", s(self.proto)),
            ("sport", s(self.sport)),
            ("dport", s(self.dport)),
            ("dscp", s(self.dscp)),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.fields().into_iter().map(|(k, v)| format!("{k} {v}")).collect();
        if parts.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// What a rule does to a packet it sends to its imq device, besides sending it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Actions {
    /// skb->mark = (skb->mark & !mask) | value, as iptables' `MARK --set-mark`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_mark: Option<Mark>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classid: Option<ClassId>,
    /// The TX queue of a multi-queue imq device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<Queue>,
}

/// Sets the match field or action named `key`, as rule files name them (`mark`,
/// `src`, `dst`, `proto`, `sport`, `dport`, `dscp`, `set_mark`, `classid`, `queue`), from its
/// text.
pub fn set_field(matches: &mut Match, actions: &mut Actions, key: &str, value: &str) -> Result<()> {
    match key {
        "mark" => matches.mark = Some(value.parse()?),
        "src" => matches.src = Some(value.parse()?),
        "dst" => matches.dst = Some(value.parse()?),
        "proto" => matches.proto = Some(value.parse()?),
        "sport" => matches.sport = Some(value.parse()?),
        "dport" => matches.dport = Some(value.parse()?),
        "dscp" => matches.dscp = Some(value.parse()?),
        "set_mark" => actions.set_mark = Some(value.parse()?),
        "classid" => actions.classid = Some(value.parse()?),
        "queue" => actions.queue = Some(value.parse()?),
        _ => {
            return Err(Error::Invalid {
                what: "field",
                input: key.to_owned(),
                reason: "expected mark, src, dst, proto, sport, dport, dscp, set_mark, classid or queue",
            });
        }
    }
    Ok(())
}

/// One rule of one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub ifindex: u32,
    pub direction: Direction,
    pub prio: u32,
    pub dev: DevName,
    pub matches: Match,
    pub actions: Actions,
}

impl Rule {
    /// The record kept in the rules map.
    pub fn to_spec(&self) -> RuleSpec {
        let m = &self.matches;
        let mut s = RuleSpec {
            ifindex: self.ifindex,
            direction: self.direction.to_raw(),
            prio: self.prio,
            dev: self.dev.0,
            family: m.family(),
            ..RuleSpec::default()
        };
        if let Some(v) = m.mark {
            s.flags |= SPEC_MARK;
            (s.mark_value, s.mark_mask) = (v.value, v.mask);
        }
        if let Some(p) = m.src {
            s.flags |= SPEC_SRC;
            (s.src, s.src_len) = (p.bytes(), p.len);
        }
        if let Some(p) = m.dst {
            s.flags |= SPEC_DST;
            (s.dst, s.dst_len) = (p.bytes(), p.len);
        }
        if let Some(p) = m.proto {
            s.flags |= SPEC_PROTO;
            s.proto = p.0;
        }
        if let Some(r) = m.sport {
            s.flags |= SPEC_SPORT;
            s.sport = [r.lo, r.hi];
        }
        if let Some(r) = m.dport {
            s.flags |= SPEC_DPORT;
            s.dport = [r.lo, r.hi];
        }
        if let Some(d) = m.dscp {
            s.flags |= SPEC_DSCP;
            s.dscp = d.0;
        }
        if let Some(v) = self.actions.set_mark {
            s.flags |= SPEC_SET_MARK;
            (s.set_mark_value, s.set_mark_mask) = (v.value, v.mask);
        }
        if let Some(c) = self.actions.classid {
            s.flags |= SPEC_CLASSID;
            s.classid = c.0;
        }
        if let Some(q) = self.actions.queue {
            s.flags |= SPEC_QUEUE;
            (s.queue_by, s.queue) = match q {
                Queue::Fixed(n) => (SPEC_QUEUE_FIXED, n),
                Queue::Src => (SPEC_QUEUE_SRC, 0),
                Queue::Dst => (SPEC_QUEUE_DST, 0),
            };
        }
        s
    }

    /// The rule a record holds; `None` for a record this imqctl does not understand.
    pub fn from_spec(s: &RuleSpec) -> Option<Self> {
        let has = |flag| s.flags & flag != 0;
        let prefix = |flag, bytes, len| {
            if has(flag) {
                Prefix::from_bytes(s.family, bytes, len).map(Some)
            } else {
                Some(None)
            }
        };
        let mark = |on: bool, value, mask| on.then_some(Mark { value, mask });
        let range = |on: bool, [lo, hi]: [u16; 2]| on.then_some(PortRange { lo, hi });
        Some(Self {
            ifindex: s.ifindex,
            direction: Direction::from_raw(s.direction)?,
            prio: s.prio,
            dev: DevName(s.dev),
            matches: Match {
                mark: mark(has(SPEC_MARK), s.mark_value, s.mark_mask),
                src: prefix(SPEC_SRC, s.src, s.src_len)?,
                dst: prefix(SPEC_DST, s.dst, s.dst_len)?,
                proto: has(SPEC_PROTO).then_some(Proto(s.proto)),
                sport: range(has(SPEC_SPORT), s.sport),
                dport: range(has(SPEC_DPORT), s.dport),
                dscp: has(SPEC_DSCP).then_some(Dscp(s.dscp)),
            },
            actions: Actions {
                set_mark: mark(has(SPEC_SET_MARK), s.set_mark_value, s.set_mark_mask),
                classid: has(SPEC_CLASSID).then_some(ClassId(s.classid)),
                queue: if has(SPEC_QUEUE) {
                    Some(match s.queue_by {
                        SPEC_QUEUE_FIXED if s.queue >= 1 => Queue::Fixed(s.queue),
                        SPEC_QUEUE_SRC => Queue::Src,
                        SPEC_QUEUE_DST => Queue::Dst,
                        _ => return None,
                    })
                } else {
                    None
                },
            },
        })
    }
}

/// Distance between automatically numbered rules, leaving room to insert between.
pub const PRIO_STEP: u32 = 10;

/// A rule as a command states it, before it has a prio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewRule {
    pub ifindex: u32,
    pub direction: Direction,
    pub prio: Option<u32>,
    pub dev: DevName,
    pub matches: Match,
    pub actions: Actions,
}

/// What adding a rule does.
#[derive(Debug, PartialEq, Eq)]
pub enum Insert {
    /// The same rule is already there.
    Unchanged,
    /// The rule to add, with its prio.
    Add(Rule),
}

/// Adds `new` to `rules` (the rules of every hook). The same match with the same
/// device and actions: unchanged. The same match doing something else: a conflict
/// (which should win is a question for the user). Without a prio the rule goes after
/// the last rule of its hook.
pub fn insert(rules: &[Rule], iface: &str, new: &NewRule) -> Result<Insert> {
    let hook: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.ifindex == new.ifindex && r.direction == new.direction)
        .collect();
    if let Some(existing) = hook.iter().find(|r| r.matches == new.matches) {
        if existing.dev == new.dev && existing.actions == new.actions && new.prio.is_none_or(|p| p == existing.prio) {
            return Ok(Insert::Unchanged);
        }
        return Err(Error::Conflict {
            iface: iface.to_owned(),
            direction: new.direction,
            prio: existing.prio,
            dev: existing.dev.to_string(),
        });
    }
    if let Some(prio) = new.prio
        && hook.iter().any(|r| r.prio == prio)
    {
        return Err(Error::DuplicatePrio {
            iface: iface.to_owned(),
            direction: new.direction,
            prio,
        });
    }
    let prio = new.prio.unwrap_or_else(|| {
        hook.iter()
            .map(|r| r.prio)
            .max()
            .map_or(PRIO_STEP, |p| p.saturating_add(PRIO_STEP))
    });
    Ok(Insert::Add(Rule {
        ifindex: new.ifindex,
        direction: new.direction,
        prio,
        dev: new.dev,
        matches: new.matches,
        actions: new.actions,
    }))
}

/// Which rules of a hook `detach` removes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// Only the rule with exactly this match (None: any match).
    pub matches: Option<Match>,
    pub prio: Option<u32>,
}

impl Selector {
    pub fn selects(&self, rule: &Rule) -> bool {
        self.matches.is_none_or(|m| m == rule.matches) && self.prio.is_none_or(|p| p == rule.prio)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = self.matches {
            write!(f, " matching {m}")?;
        }
        if let Some(p) = self.prio {
            write!(f, " at prio {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(s: &str) -> Mark {
        s.parse().unwrap()
    }

    #[test]
    fn marks_parse_like_iptables() {
        assert_eq!(
            mark("0x10/0xff"),
            Mark {
                value: 0x10,
                mask: 0xff
            }
        );
        assert_eq!(
            mark("16"),
            Mark {
                value: 16,
                mask: u32::MAX
            }
        );
        assert_eq!(
            mark("0XfF"),
            Mark {
                value: 0xff,
                mask: u32::MAX
            }
        );
        assert_eq!(
            mark("0xffffffff"),
            Mark {
                value: u32::MAX,
                mask: u32::MAX
            }
        );
        assert_eq!(mark("0/1"), Mark { value: 0, mask: 1 });
        assert_eq!(mark("0x10/0xff").to_string(), "0x10/0xff");
        assert_eq!(mark("7").to_string(), "0x7");
    }

    #[test]
    fn bad_marks_are_refused_with_a_reason() {
        for bad in [
            "",
            "x",
            "0x",
            "0x1g",
            "-1",
            "+1",
            "0x100000000",
            "1/",
            "/1",
            "1/2/3",
            "0x11/0x0f",
            "1/0",
        ] {
            let err = bad.parse::<Mark>().unwrap_err();
            assert!(matches!(err, Error::InvalidMark { .. }), "{bad}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn device_names() {
        assert_eq!("imq0".parse::<DevName>().unwrap(), DevName(0));
        assert_eq!("imq255".parse::<DevName>().unwrap(), DevName(255));
        for bad in ["imq", "imq256", "imq01", "imq-1", "ifb0", "eth0", "imq1a", "IMQ1"] {
            assert!(bad.parse::<DevName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn directions() {
        assert_eq!("ingress".parse::<Directions>().unwrap(), Directions::Ingress);
        assert_eq!(
            "both".parse::<Directions>().unwrap().iter().collect::<Vec<_>>(),
            [Direction::Ingress, Direction::Egress]
        );
        assert!("sideways".parse::<Directions>().is_err());
        assert_eq!(Direction::from_raw(Direction::Egress.to_raw()), Some(Direction::Egress));
    }

    #[test]
    fn prefixes() {
        let p: Prefix = "198.18.0.0/15".parse().unwrap();
        assert_eq!((p.family(), p.len, p.to_string().as_str()), (4, 15, "198.18.0.0/15"));
        assert_eq!(p.mask_bytes()[..4], [255, 254, 0, 0]);
        assert_eq!(
            "2001:db8::/32".parse::<Prefix>().unwrap().mask_bytes()[..5],
            [255, 255, 255, 255, 0]
        );
        assert_eq!("198.18.0.1".parse::<Prefix>().unwrap().len, 32);
        assert_eq!("2001:db8::1".parse::<Prefix>().unwrap().len, 128);
        assert_eq!("0.0.0.0/0".parse::<Prefix>().unwrap().mask_bytes(), [0; 16]);
        for bad in [
            "198.18.0.1/24",
            "198.18.0.0/33",
            "2001:db8::/129",
            "x",
            "1.2.3/8",
            "1.2.3.4/",
            "1.2.3.4/-1",
        ] {
            let e = bad.parse::<Prefix>().unwrap_err();
            assert!(matches!(e, Error::Invalid { what: "prefix", .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn port_ranges_split_into_aligned_blocks() {
        let r = |s: &str| s.parse::<PortRange>().unwrap();
        assert_eq!(r("80").blocks(), [(80, 0xffff)]);
        assert_eq!(r("0-65535").blocks(), [(0, 0)]);
        assert_eq!(r("1024-65535").blocks().len(), 6);
        // Every port of the range is in exactly one block, and no other port is.
        for range in ["1-65534", "5000-5100", "0-0", "65535", "1023-1025"] {
            let r = r(range);
            let blocks = r.blocks();
            for port in 0..=65535u16 {
                let hits = blocks.iter().filter(|(v, m)| port & m == *v).count();
                assert_eq!(hits, usize::from((r.lo..=r.hi).contains(&port)), "{range} {port}");
            }
        }
        for bad in ["", "-1", "80-", "70000", "90-80", "a"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn protocols_dscp_classids() {
        assert_eq!("tcp".parse::<Proto>().unwrap(), Proto(6));
        assert_eq!("ICMPv6".parse::<Proto>().unwrap(), Proto(58));
        assert_eq!("47".parse::<Proto>().unwrap().to_string(), "gre");
        assert!("256".parse::<Proto>().is_err() && "tcpp".parse::<Proto>().is_err());
        assert_eq!("ef".parse::<Dscp>().unwrap(), Dscp(46));
        assert_eq!("af41".parse::<Dscp>().unwrap(), Dscp(34));
        assert_eq!("CS1".parse::<Dscp>().unwrap(), Dscp(8));
        assert_eq!("63".parse::<Dscp>().unwrap(), Dscp(63));
        assert!("64".parse::<Dscp>().is_err() && "af51".parse::<Dscp>().is_err());
        assert_eq!("1:10".parse::<ClassId>().unwrap(), ClassId(0x10010));
        assert_eq!(ClassId(0x10010).to_string(), "1:10");
        for bad in ["1", "0:1", "ffff:1", "1:10000", "g:1", ":1"] {
            assert!(bad.parse::<ClassId>().is_err(), "{bad}");
        }
        assert_eq!("2".parse::<Queue>().unwrap(), Queue::Fixed(2));
        assert_eq!("dst".parse::<Queue>().unwrap(), Queue::Dst);
        assert_eq!(Queue::Src.to_string(), "src");
        for bad in ["0", "65536", "-1", "hash", ""] {
            assert!(bad.parse::<Queue>().is_err(), "{bad}");
        }
    }

    #[test]
    fn impossible_matches_are_refused() {
        let m = |src: Option<&str>, dst: Option<&str>, proto: Option<&str>, dport: Option<&str>| Match {
            src: src.map(|s| s.parse().unwrap()),
            dst: dst.map(|s| s.parse().unwrap()),
            proto: proto.map(|s| s.parse().unwrap()),
            dport: dport.map(|s| s.parse().unwrap()),
            ..Match::default()
        };
        assert!(m(None, None, Some("tcp"), Some("80")).validate().is_ok());
        assert!(m(None, None, None, Some("80")).validate().is_err());
        assert!(m(None, None, Some("icmp"), Some("80")).validate().is_err());
        assert!(
            m(Some("198.18.0.0/24"), Some("2001:db8::/32"), None, None)
                .validate()
                .is_err()
        );
        assert!(m(Some("2001:db8::/32"), None, Some("icmp"), None).validate().is_err());
    }

    fn full_rule() -> Rule {
        Rule {
            ifindex: 7,
            direction: Direction::Egress,
            prio: 30,
            dev: DevName(2),
            matches: Match {
                mark: Some(mark("0x10/0xff")),
                src: Some("2001:db8:1::/48".parse().unwrap()),
                dst: Some("2001:db8::1".parse().unwrap()),
                proto: Some(Proto(17)),
                sport: Some("5000-5100".parse().unwrap()),
                dport: Some("5060".parse().unwrap()),
                dscp: Some(Dscp(46)),
            },
            actions: Actions {
                set_mark: Some(mark("0x100/0xf00")),
                classid: Some(ClassId(0x10020)),
                queue: Some(Queue::Fixed(3)),
            },
        }
    }

    #[test]
    fn rules_survive_their_record() {
        let r = full_rule();
        assert_eq!(Rule::from_spec(&r.to_spec()), Some(r));
        let plain = Rule {
            matches: Match::default(),
            actions: Actions::default(),
            ..r
        };
        assert_eq!(Rule::from_spec(&plain.to_spec()), Some(plain));
        let v4 = Rule {
            matches: Match {
                dst: Some("198.18.3.0/24".parse().unwrap()),
                ..Match::default()
            },
            ..r
        };
        assert_eq!(Rule::from_spec(&v4.to_spec()), Some(v4));
        for queue in [Queue::Src, Queue::Dst, Queue::Fixed(65535)] {
            let q = Rule {
                actions: Actions {
                    queue: Some(queue),
                    ..r.actions
                },
                ..r
            };
            assert_eq!(Rule::from_spec(&q.to_spec()), Some(q));
        }
    }

    fn new_rule(m: Option<&str>, dev: u32, prio: Option<u32>) -> NewRule {
        NewRule {
            ifindex: 1,
            direction: Direction::Ingress,
            prio,
            dev: DevName(dev),
            matches: Match {
                mark: m.map(mark),
                ..Match::default()
            },
            actions: Actions::default(),
        }
    }

    fn add(rules: &mut Vec<Rule>, m: Option<&str>, dev: u32, prio: Option<u32>) -> Result<Insert> {
        let r = insert(rules, "eth0", &new_rule(m, dev, prio))?;
        if let Insert::Add(rule) = r {
            rules.push(rule);
        }
        Ok(r)
    }

    #[test]
    fn prios_follow_the_last_rule_of_the_hook() {
        let mut rules = Vec::new();
        add(&mut rules, Some("1"), 0, None).unwrap();
        add(&mut rules, Some("2"), 0, None).unwrap();
        add(&mut rules, Some("3"), 1, Some(15)).unwrap();
        add(&mut rules, Some("4"), 1, None).unwrap();
        assert_eq!(rules.iter().map(|r| r.prio).collect::<Vec<_>>(), [10, 20, 15, 30]);
        // Another hook numbers on its own.
        let other = NewRule {
            direction: Direction::Egress,
            ..new_rule(None, 0, None)
        };
        assert!(matches!(
            insert(&rules, "eth0", &other).unwrap(),
            Insert::Add(Rule { prio: 10, .. })
        ));
    }

    #[test]
    fn same_rule_twice_is_a_no_op_and_conflicts_are_refused() {
        let mut rules = Vec::new();
        add(&mut rules, Some("0x10/0xff"), 0, None).unwrap();
        assert_eq!(add(&mut rules, Some("0x10/0xff"), 0, None).unwrap(), Insert::Unchanged);
        assert_eq!(
            add(&mut rules, Some("0x10/0xff"), 0, Some(10)).unwrap(),
            Insert::Unchanged
        );
        assert!(matches!(
            add(&mut rules, Some("0x10/0xff"), 1, None),
            Err(Error::Conflict { prio: 10, .. })
        ));
        assert!(matches!(
            add(&mut rules, Some("0x10/0xff"), 0, Some(5)),
            Err(Error::Conflict { .. })
        ));
        assert!(matches!(
            add(&mut rules, Some("0x20/0xff"), 0, Some(10)),
            Err(Error::DuplicatePrio { .. })
        ));
        // A different mask is a different match; so is a different action.
        add(&mut rules, Some("0x10/0xf0"), 1, None).unwrap();
        let mut marking = new_rule(Some("0x10/0xff"), 0, None);
        marking.actions.classid = Some(ClassId(0x10001));
        assert!(matches!(insert(&rules, "eth0", &marking), Err(Error::Conflict { .. })));
    }

    #[test]
    fn selectors() {
        let r = full_rule();
        assert!(Selector::default().selects(&r));
        assert!(
            Selector {
                matches: Some(r.matches),
                prio: None
            }
            .selects(&r)
        );
        assert!(
            !Selector {
                matches: Some(Match::default()),
                prio: None
            }
            .selects(&r)
        );
        assert!(
            !Selector {
                matches: None,
                prio: Some(31)
            }
            .selects(&r)
        );
    }
}
