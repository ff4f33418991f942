//! Differential fuzzing of the classifier: random rule sets and random frames, each
//! frame run through the real ingress program (BPF_PROG_TEST_RUN, rules compiled and
//! installed as imqctl does) and through a reference written here in plain Rust from
//! the rule model and the documented parsing: first match by prio over the rules as
//! written. Verdict, selected rule (each rule sets a class of its own), and the mark
//! and class the packet leaves with must agree.
//!
//! `cargo xtask test` runs a fixed-seed slice; `cargo xtask fuzz --minutes N` runs
//! fresh seeds for N minutes (`IMQ_FUZZ_SECONDS`, `IMQ_FUZZ_SEED`). A mismatch prints
//! the seed, the rules, the frame in hex and both answers.

#[allow(
    dead_code,
    reason = "the harness serves several test files; this one uses part of it"
)]
mod harness;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use harness::{Harness, LO, TC_ACT_REDIRECT, TCX_NEXT};
use imq::{
    compile::compile,
    rule::{Actions, ClassId, DevName, Direction, Dscp, Mark, Match, PortRange, Prefix, Proto, Rule},
};
use imq_tests::rng::Rng;

const PROTOS: &[u8] = &[1, 6, 17, 47, 50, 58, 132, 136];
const PORT_PROTOS: &[u8] = &[6, 17, 132, 136];
/// IPv6 extension headers the program walks.
const EXT: &[u8] = &[0, 43, 60, 51, 44];

/// How a port field of a rule template is drawn.
#[derive(Clone, Copy)]
enum PortForm {
    One,
    /// An aligned block of 2^k ports.
    Block(u32),
    Range,
}

/// What the rules of one shape share: which fields, which prefix lengths, which
/// port forms. Rules drawn from a few templates keep the shape count realistic.
#[derive(Clone, Copy)]
struct Template {
    family: u8,
    mark_mask: Option<u32>,
    src_len: Option<u8>,
    dst_len: Option<u8>,
    proto: Option<Option<u8>>,
    sport: Option<PortForm>,
    dport: Option<PortForm>,
    dscp: bool,
}

fn template(rng: &mut Rng) -> Template {
    let family = rng.pick(&[0, 4, 6, 4, 6]);
    let max = if family == 6 { 128 } else { 32 };
    let len = |rng: &mut Rng| {
        rng.chance(40).then(|| {
            if rng.chance(30) {
                max
            } else {
                rng.below(u64::from(max) + 1) as u8
            }
        })
    };
    let (src_len, dst_len) = if family == 0 {
        (None, None)
    } else {
        (len(rng), len(rng))
    };
    let ports = rng.chance(35);
    let port_form = |rng: &mut Rng| {
        rng.chance(50).then(|| match rng.below(3) {
            0 => PortForm::One,
            1 => PortForm::Block(rng.below(12) as u32 + 1),
            _ => PortForm::Range,
        })
    };
    Template {
        family,
        mark_mask: rng
            .chance(25)
            .then(|| rng.pick(&[u32::MAX, 0xff, 0xf00, 0xffff_0000, 0x1])),
        src_len,
        dst_len,
        // Some(None): a protocol drawn per rule; ports need one that has them.
        proto: if ports {
            Some(None)
        } else {
            rng.chance(40).then(|| rng.chance(50).then(|| rng.pick(PROTOS)))
        },
        sport: if ports { port_form(rng) } else { None },
        dport: if ports { port_form(rng) } else { None },
        dscp: rng.chance(15),
    }
}

fn random_addr(rng: &mut Rng, family: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    if family == 4 {
        // Mostly 198.18.0.0/15, sometimes anywhere.
        let v = if rng.chance(80) {
            0xc612_0000 | (rng.next_u64() as u32 & 0x1_ffff)
        } else {
            rng.next_u64() as u32
        };
        a[..4].copy_from_slice(&v.to_be_bytes());
    } else {
        a = rng
            .next_u64()
            .to_be_bytes()
            .iter()
            .chain(&rng.next_u64().to_be_bytes())
            .copied()
            .collect::<Vec<_>>()[..]
            .try_into()
            .unwrap();
        if rng.chance(80) {
            a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            // Few distinct bits, so prefixes of random lengths hit now and then.
            for b in &mut a[4..14] {
                *b &= 0x03;
            }
        }
    }
    a
}

/// `a` with the bits after `len` cleared (of a 32- or 128-bit address).
fn masked(a: [u8; 16], len: u8) -> [u8; 16] {
    let mut out = a;
    for (i, b) in out.iter_mut().enumerate() {
        let keep = usize::from(len).saturating_sub(i * 8).min(8);
        *b &= (0xff00u16 >> keep) as u8;
    }
    out
}

fn to_prefix(family: u8, a: [u8; 16], len: u8) -> Prefix {
    let a = masked(a, len);
    let addr = if family == 4 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    };
    Prefix { addr, len }
}

fn port_range(rng: &mut Rng, form: PortForm) -> PortRange {
    let interesting = [53u16, 80, 443, 1024, 5201, 65535, 0];
    match form {
        PortForm::One => {
            let p = if rng.chance(50) {
                rng.pick(&interesting)
            } else {
                rng.next_u64() as u16
            };
            PortRange { lo: p, hi: p }
        }
        PortForm::Block(k) => {
            let size = 1u32 << k;
            let lo = (rng.next_u64() as u32 % 65536) & !(size - 1);
            PortRange {
                lo: lo as u16,
                hi: (lo + size - 1) as u16,
            }
        }
        PortForm::Range => {
            let (a, b) = (rng.next_u64() as u16, rng.next_u64() as u16);
            PortRange {
                lo: a.min(b),
                hi: a.max(b),
            }
        }
    }
}

fn rule_from(rng: &mut Rng, t: &Template, prio: u32, id: u32) -> Rule {
    let family = t.family;
    let mut m = Match {
        mark: t.mark_mask.map(|mask| Mark {
            value: rng.next_u64() as u32 & mask,
            mask,
        }),
        src: t.src_len.map(|l| to_prefix(family, random_addr(rng, family), l)),
        dst: t.dst_len.map(|l| to_prefix(family, random_addr(rng, family), l)),
        proto: t.proto.map(|p| {
            Proto(p.unwrap_or_else(|| {
                if t.sport.is_some() || t.dport.is_some() {
                    rng.pick(PORT_PROTOS)
                } else {
                    rng.pick(PROTOS)
                }
            }))
        }),
        sport: t.sport.map(|f| port_range(rng, f)),
        dport: t.dport.map(|f| port_range(rng, f)),
        dscp: t.dscp.then(|| Dscp(rng.below(64) as u8)),
    };
    // The model refuses icmp with IPv6 addresses and icmpv6 with IPv4 ones.
    if m.validate().is_err() {
        m.proto = Some(Proto(17));
    }
    m.validate().expect("a valid match");
    let set_mark = rng.chance(30).then(|| {
        let mask = rng.pick(&[u32::MAX, 0xff, 0xff00, 0x8000_0000]);
        Mark {
            value: rng.next_u64() as u32 & mask,
            mask,
        }
    });
    Rule {
        ifindex: LO,
        direction: Direction::Ingress,
        prio,
        dev: DevName(rng.below(4) as u32),
        matches: m,
        // Every rule's own class, so the class a packet leaves with names its rule.
        actions: Actions {
            set_mark,
            classid: Some(ClassId((1 << 16) | (id + 1))),
            queue: None,
        },
    }
}

fn rule_set(rng: &mut Rng) -> Vec<(u32, Rule)> {
    let templates: Vec<Template> = (0..1 + rng.below(8)).map(|_| template(rng)).collect();
    let n = match rng.below(10) {
        0..=5 => 1 + rng.below(12),
        6..=8 => 10 + rng.below(200),
        _ => 200 + rng.below(3000),
    } as u32;
    let mut prios: Vec<u32> = (1..=n).map(|i| i * 10).collect();
    for i in (1..prios.len()).rev() {
        prios.swap(i, rng.below(i as u64 + 1) as usize);
    }
    (0..n)
        .map(|id| {
            let t = rng.pick(&templates);
            (id, rule_from(rng, &t, prios[id as usize], id))
        })
        .collect()
}

/// What the classifier must see of a frame, worked out from its bytes by the rules
/// the README documents: Ethernet type 0x0800/0x86dd (an in-band VLAN tag is not IP),
/// a complete IPv4 header (IHL included) or IPv6 fixed header; IPv6 extension headers
/// walked up to 8 (hop-by-hop, routing, destination options, AH, fragment), each by its
/// first four bytes; ports only in a first fragment (or no fragment) of TCP, UDP,
/// SCTP or UDP-Lite with at least four bytes of transport header.
#[derive(Debug, Clone, Copy)]
struct Facts {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    dscp: u8,
    proto: u8,
    ports: Option<(u16, u16)>,
}

fn reference_parse(f: &[u8]) -> Option<Facts> {
    let get = |at: usize, n: usize| f.get(at..at + n);
    let ethertype = u16::from_be_bytes(get(12, 2)?.try_into().ok()?);
    let (family, src, dst, dscp, proto, l4, whole) = match ethertype {
        0x0800 => {
            let h = get(14, 20)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return None;
            }
            get(14, ihl)?;
            let mut src = [0; 16];
            let mut dst = [0; 16];
            src[..4].copy_from_slice(&h[12..16]);
            dst[..4].copy_from_slice(&h[16..20]);
            let offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            (4, src, dst, h[1] >> 2, h[9], 14 + ihl, offset == 0)
        }
        0x86dd => {
            let h = get(14, 40)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let tclass = ((h[0] & 0x0f) << 4) | (h[1] >> 4);
            let src: [u8; 16] = h[8..24].try_into().unwrap();
            let dst: [u8; 16] = h[24..40].try_into().unwrap();
            let (mut next, mut off) = (h[6], 54);
            let mut walked = None;
            for _ in 0..8 {
                if !EXT.contains(&next) {
                    walked = Some((next, off, true));
                    break;
                }
                let Some(e) = get(off, 4) else {
                    walked = Some((next, off, false));
                    break;
                };
                let len = match next {
                    44 if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 => {
                        walked = Some((e[0], off + 8, false));
                        break;
                    }
                    44 => 8,
                    51 => (usize::from(e[1]) + 2) * 4,
                    _ => (usize::from(e[1]) + 1) * 8,
                };
                next = e[0];
                off += len;
            }
            let (proto, l4, whole) = walked.unwrap_or((next, off, false));
            (6, src, dst, tclass >> 2, proto, l4, whole)
        }
        _ => return None,
    };
    let ports = (whole && PORT_PROTOS.contains(&proto))
        .then(|| get(l4, 4))
        .flatten()
        .map(|p| (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])));
    Some(Facts {
        family,
        src,
        dst,
        dscp,
        proto,
        ports,
    })
}

fn prefix_holds(p: &Prefix, family: u8, addr: &[u8; 16]) -> bool {
    let (pf, pa) = match p.addr {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            (4, b)
        }
        IpAddr::V6(a) => (6, a.octets()),
    };
    pf == family && masked(pa, p.len) == masked(*addr, p.len)
}

fn reference_matches(m: &Match, f: &Facts, mark: u32) -> bool {
    let family = m
        .src
        .or(m.dst)
        .map(|p| if p.addr.is_ipv4() { 4 } else { 6 })
        .or(match m.proto {
            Some(Proto(1)) => Some(4),
            Some(Proto(58)) => Some(6),
            _ => None,
        });
    let in_range = |r: Option<PortRange>, port: Option<u16>| match (r, port) {
        (None, _) => true,
        (Some(r), Some(p)) => (r.lo..=r.hi).contains(&p),
        (Some(_), None) => false,
    };
    family.is_none_or(|fam| fam == f.family)
        && m.mark.is_none_or(|k| mark & k.mask == k.value)
        && m.src.is_none_or(|p| prefix_holds(&p, f.family, &f.src))
        && m.dst.is_none_or(|p| prefix_holds(&p, f.family, &f.dst))
        && m.proto.is_none_or(|p| p.0 == f.proto)
        && m.dscp.is_none_or(|d| d.0 == f.dscp)
        && in_range(m.sport, f.ports.map(|p| p.0))
        && in_range(m.dport, f.ports.map(|p| p.1))
}

/// The reference's answer: (verdict, mark, priority) after the program.
fn reference(rules: &[(u32, Rule)], frame: &[u8], mark: u32) -> (u32, u32, u32) {
    let Some(facts) = reference_parse(frame) else {
        return (TCX_NEXT, mark, 0);
    };
    let mut by_prio: Vec<&(u32, Rule)> = rules.iter().collect();
    by_prio.sort_by_key(|(_, r)| r.prio);
    match by_prio
        .iter()
        .find(|(_, r)| reference_matches(&r.matches, &facts, mark))
    {
        None => (TCX_NEXT, mark, 0),
        Some((_, r)) => {
            let mark = r.actions.set_mark.map_or(mark, |s| (mark & !s.mask) | s.value);
            (TC_ACT_REDIRECT, mark, r.actions.classid.map_or(0, |c| c.0))
        }
    }
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An address for a frame: inside a rule's prefix (host bits random) most of the
/// time, else random.
fn frame_addr(rng: &mut Rng, rules: &[(u32, Rule)], family: u8, src: bool) -> [u8; 16] {
    let mut a = random_addr(rng, family);
    if !rules.is_empty() && rng.chance(70) {
        let (_, r) = &rules[rng.below(rules.len() as u64) as usize];
        if let Some(p) = if src { r.matches.src } else { r.matches.dst }
            && (p.addr.is_ipv4() == (family == 4))
        {
            let pa = match p.addr {
                IpAddr::V4(v) => {
                    let mut b = [0; 16];
                    b[..4].copy_from_slice(&v.octets());
                    b
                }
                IpAddr::V6(v) => v.octets(),
            };
            // Inside the prefix, or (sometimes) just outside: one bit of it flipped.
            for (i, b) in a.iter_mut().enumerate() {
                let keep = usize::from(p.len).saturating_sub(i * 8).min(8);
                let m = (0xff00u16 >> keep) as u8;
                *b = (pa[i] & m) | (*b & !m);
            }
            if p.len > 0 && rng.chance(15) {
                let bit = rng.below(u64::from(p.len)) as usize;
                a[bit / 8] ^= 0x80 >> (bit % 8);
            }
        }
    }
    if family == 4 {
        a[4..].fill(0);
    }
    a
}

fn frame_port(rng: &mut Rng, rules: &[(u32, Rule)], src: bool) -> u16 {
    if !rules.is_empty() && rng.chance(70) {
        let (_, r) = &rules[rng.below(rules.len() as u64) as usize];
        if let Some(pr) = if src { r.matches.sport } else { r.matches.dport } {
            let span = u32::from(pr.hi) - u32::from(pr.lo);
            return match rng.below(5) {
                0 => pr.lo,
                1 => pr.hi,
                2 => pr.lo.wrapping_sub(1),
                3 => pr.hi.wrapping_add(1),
                _ => pr.lo + (rng.below(u64::from(span) + 1) as u16),
            };
        }
    }
    rng.next_u64() as u16
}

/// A frame: valid IPv4 or IPv6 most of the time, then variously broken: extension
/// header chains, fragments, IPv4 options, cuts at any length, VLAN tags, other
/// Ethernet types, wrong versions, odd payload lengths.
fn frame(rng: &mut Rng, rules: &[(u32, Rule)]) -> Vec<u8> {
    let family = if rng.chance(50) { 4 } else { 6 };
    let (src, dst) = (
        frame_addr(rng, rules, family, true),
        frame_addr(rng, rules, family, false),
    );
    let dscp = if !rules.is_empty() && rng.chance(40) {
        rules[rng.below(rules.len() as u64) as usize]
            .1
            .matches
            .dscp
            .map_or(rng.below(64) as u8, |d| d.0)
    } else {
        rng.below(64) as u8
    };
    let proto = if !rules.is_empty() && rng.chance(60) {
        rules[rng.below(rules.len() as u64) as usize]
            .1
            .matches
            .proto
            .map_or_else(|| rng.pick(PROTOS), |p| p.0)
    } else if rng.chance(90) {
        rng.pick(PROTOS)
    } else {
        rng.next_u64() as u8
    };
    let mut l4 = Vec::new();
    l4.extend_from_slice(&frame_port(rng, rules, true).to_be_bytes());
    l4.extend_from_slice(&frame_port(rng, rules, false).to_be_bytes());
    let payload = rng.below(64) as usize;
    l4.extend(rng.bytes(4 + payload));
    let mut f;
    if family == 4 {
        f = eth(0x0800);
        let options = if rng.chance(10) { rng.below(11) as usize } else { 0 };
        let frag: u16 = match rng.below(10) {
            0 => 0x2000,                                  // first fragment, more to come
            1 => rng.below(0x1fff) as u16 + 1,            // a later fragment
            2 => 0x2000 | (rng.below(0x1fff) as u16 + 1), // a middle one
            3 => 0x4000,                                  // DF
            _ => 0,
        };
        f.extend_from_slice(&[0x40 | (5 + options as u8), dscp << 2]);
        f.extend_from_slice(&((20 + options * 4 + l4.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0]);
        f.extend_from_slice(&src[..4]);
        f.extend_from_slice(&dst[..4]);
        f.extend(rng.bytes(options * 4));
    } else {
        f = eth(0x86dd);
        let mut chain = Vec::new();
        let n = match rng.below(10) {
            0..=5 => 0,
            6..=8 => 1 + rng.below(3),
            _ => 3 + rng.below(8),
        };
        let types: Vec<u8> = (0..n).map(|_| rng.pick(EXT)).collect();
        for (i, &t) in types.iter().enumerate() {
            let next = types.get(i + 1).copied().unwrap_or(proto);
            match t {
                44 => {
                    let offset: u16 = if rng.chance(70) { 0 } else { rng.below(8191) as u16 + 1 };
                    chain.push(next);
                    chain.push(0);
                    chain.extend_from_slice(&((offset << 3) | u16::from(rng.chance(50))).to_be_bytes());
                    chain.extend(rng.bytes(4));
                }
                51 => {
                    let units = rng.below(4) as u8 + 1;
                    chain.push(next);
                    chain.push(units);
                    chain.extend(rng.bytes((usize::from(units) + 2) * 4 - 2));
                }
                _ => {
                    let units = rng.below(3) as u8;
                    chain.push(next);
                    chain.push(units);
                    chain.extend(rng.bytes((usize::from(units) + 1) * 8 - 2));
                }
            }
        }
        let first = types.first().copied().unwrap_or(proto);
        let tc = dscp << 2;
        f.extend_from_slice(&[0x60 | (tc >> 4), (tc & 0xf) << 4, 0, 0]);
        f.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[first, 64]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend(chain);
    }
    f.extend(l4);
    match rng.below(40) {
        // Cut anywhere after the Ethernet header.
        0..=3 => f.truncate(14 + rng.below(f.len() as u64 - 13) as usize),
        // An in-band 802.1Q tag in front.
        4 => {
            let inner = f.split_off(12);
            f.extend_from_slice(&[0x81, 0x00, 0, rng.below(4095) as u8 + 1]);
            f.extend(inner);
        }
        // Another Ethernet type.
        5 => {
            let any = rng.next_u64() as u16;
            f[12..14].copy_from_slice(&rng.pick(&[0x0806u16, 0x88a8, 0x8847, any]).to_be_bytes());
        }
        // A version that does not fit the Ethernet type.
        6 => f[14] = (f[14] & 0x0f) | (rng.pick(&[4u8, 5, 6, 0, 15]) << 4),
        // IPv4 IHL below 5.
        7 if family == 4 => f[14] = 0x40 | rng.below(5) as u8,
        _ => {}
    }
    f
}

fn mark_for(rng: &mut Rng, rules: &[(u32, Rule)]) -> u32 {
    if !rules.is_empty() && rng.chance(50) {
        let (_, r) = &rules[rng.below(rules.len() as u64) as usize];
        if let Some(m) = r.matches.mark {
            // The rule's value, with bits outside its mask random.
            return m.value | (rng.next_u64() as u32 & !m.mask) ^ if rng.chance(10) { 1 } else { 0 };
        }
    }
    if rng.chance(50) { 0 } else { rng.next_u64() as u32 }
}

#[derive(Default)]
struct Tally {
    rule_sets: u64,
    rules: u64,
    refused_by_compiler: u64,
    frames: u64,
    selected: u64,
    not_ip: u64,
    refused_by_kernel: u64,
}

/// Runs rule sets from `seed` for `budget` (at least `min_sets` of them); panics
/// at the first mismatch with everything needed to replay it.
fn fuzz(seed: u64, min_sets: u64, budget: Duration, frames_per_set: u64) -> Tally {
    let mut h = Harness::new();
    for dev in 1..4 {
        h.device(dev, LO);
    }
    let mut rng = Rng::new(seed);
    let mut t = Tally::default();
    let start = Instant::now();
    while t.rule_sets < min_sets || start.elapsed() < budget {
        let set_seed = rng.next_u64();
        let mut r = Rng::new(set_seed);
        let rules = rule_set(&mut r);
        if compile(rules.iter().map(|(id, r)| (*id, r)), |i| i.to_string()).is_err() {
            // Too many shapes or entries for one hook: imqctl refuses such a set.
            t.refused_by_compiler += 1;
            continue;
        }
        h.install(&rules);
        t.rule_sets += 1;
        t.rules += rules.len() as u64;
        for _ in 0..frames_per_set {
            let f = frame(&mut r, &rules);
            let mark = mark_for(&mut r, &rules);
            let want = reference(&rules, &f, mark);
            let got = match h.try_run(&f, mark) {
                Ok(o) => (o.verdict, o.mark, o.priority),
                Err(e) => {
                    // BPF_PROG_TEST_RUN refuses some short frames itself; only frames
                    // the classifier would leave alone may be among them.
                    assert_eq!(
                        want.0, TCX_NEXT,
                        "the kernel refused a frame the reference selects: {e}"
                    );
                    t.refused_by_kernel += 1;
                    continue;
                }
            };
            t.frames += 1;
            if want.0 == TC_ACT_REDIRECT {
                t.selected += 1;
            }
            if reference_parse(&f).is_none() {
                t.not_ip += 1;
            }
            if got != want {
                let mut listing = String::new();
                let mut sorted = rules.clone();
                sorted.sort_by_key(|(_, r)| r.prio);
                for (id, r) in sorted.iter().take(60) {
                    listing.push_str(&format!(
                        "  id {id} prio {} dev imq{} {:?} {:?}\n",
                        r.prio, r.dev.0, r.matches, r.actions
                    ));
                }
                let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
                panic!(
                    "mismatch (seed {seed:#x}, rule set seed {set_seed:#x}, {} rules):\n\
                     frame {hex}\nmark {mark:#x}\nparsed by the reference: {:?}\n\
                     program (verdict, mark, class): {got:x?}\nreference: {want:x?}\n\
                     rules by prio (first 60):\n{listing}",
                    rules.len(),
                    reference_parse(&f)
                );
            }
        }
    }
    eprintln!(
        "differential: seed {seed:#x}: {} rule sets ({} rules; {} more refused by the compiler), \
         {} frames ({} selected, {} not IP; {} more refused by BPF_PROG_TEST_RUN), 0 mismatches, {:.1} s",
        t.rule_sets,
        t.rules,
        t.refused_by_compiler,
        t.frames,
        t.selected,
        t.not_ip,
        t.refused_by_kernel,
        start.elapsed().as_secs_f64()
    );
    t
}

/// The fixed-seed slice `cargo xtask test` runs (and `cargo xtask fuzz` for longer,
/// with its own seed).
#[test]
fn the_program_agrees_with_the_reference_matcher() {
    let seed = std::env::var("IMQ_FUZZ_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x1d1f_f0e5);
    let seconds: u64 = std::env::var("IMQ_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let t = fuzz(seed, 150, Duration::from_secs(seconds), 400);
    // The slice must exercise both answers and most sets must compile: a generator
    // that drifted into producing nothing useful fails here.
    assert!(t.rule_sets >= 150);
    assert!(
        t.selected * 10 > t.frames,
        "too few frames selected: {} of {}",
        t.selected,
        t.frames
    );
    assert!(
        t.selected * 10 < t.frames * 9,
        "too few frames left alone: {} of {}",
        t.selected,
        t.frames
    );
    assert!(t.not_ip > 0, "no frame the classifier must leave alone");
    assert!(
        t.refused_by_compiler * 4 < t.rule_sets,
        "{} sets refused by the compiler",
        t.refused_by_compiler
    );
}
