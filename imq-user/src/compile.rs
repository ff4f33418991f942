//! Rules into what the data path searches: per hook, shapes and entries (see
//! imq-common for the scheme). Pure, so it is unit tested here and the data path is
//! tested on its output.

use std::collections::{BTreeMap, HashMap};

use imq_common::{
    EntryKey, FLOW_PORTS, FlowKey, Hook, HookKey, MAX_ENTRIES, MAX_SHAPES, Shape, TARGET_QUEUE_DST, TARGET_QUEUE_FIXED,
    TARGET_QUEUE_SRC, TARGET_SET_MARK, TARGET_SET_PRIORITY, Target,
};

use crate::{
    error::{Error, Result},
    rule::{Direction, Queue, Rule},
};

/// Entries one generation may use: half the map, the other half is the other one.
pub const MAX_ENTRIES_PER_GENERATION: usize = MAX_ENTRIES as usize / 2;

/// A rule set compiled for generation 0 (the caller sets the generation it writes).
#[derive(Debug, Default)]
pub struct Compiled {
    pub hooks: Vec<(HookKey, Hook)>,
    pub entries: Vec<(EntryKey, Target)>,
}

/// Compiles `rules` (id, rule). `name` names an interface in errors.
pub fn compile<'a>(rules: impl IntoIterator<Item = (u32, &'a Rule)>, name: impl Fn(u32) -> String) -> Result<Compiled> {
    let mut by_hook: BTreeMap<(u32, Direction), Vec<(u32, &Rule)>> = BTreeMap::new();
    for (id, r) in rules {
        by_hook.entry((r.ifindex, r.direction)).or_default().push((id, r));
    }
    let mut out = Compiled::default();
    for ((ifindex, direction), mut rules) in by_hook {
        rules.sort_by_key(|(_, r)| r.prio);
        let hook_key = HookKey {
            ifindex,
            direction: direction.to_raw() as u16,
            generation: 0,
        };
        // Shapes in order of first use, which is prio order; entries keep the first
        // (lowest prio) rule that claims them.
        let mut shapes: Vec<Shape> = Vec::new();
        let mut entries: HashMap<(usize, FlowKey), Target> = HashMap::new();
        let mut order = Vec::new();
        let unmatched_dev = rules.iter().map(|(_, r)| r.dev.0).min().unwrap_or(0);
        for (id, rule) in rules {
            for (mask, value) in patterns(rule) {
                // Rules of one family get shapes of their own, even where the mask
                // alone is the same (a /24 of IPv4 and a /24 of IPv6).
                let family = u32::from(value.family);
                let shape = match shapes.iter().position(|s| s.mask == mask && s.family == family) {
                    Some(i) => i,
                    None => {
                        shapes.push(Shape {
                            mask,
                            min_prio: rule.prio,
                            family,
                        });
                        shapes.len() - 1
                    }
                };
                entries.entry((shape, value)).or_insert_with(|| {
                    order.push((shape, value));
                    target(id, rule)
                });
            }
        }
        if shapes.len() > MAX_SHAPES {
            return Err(Error::TooManyShapes {
                hook: format!("{} {direction}", name(ifindex)),
                shapes: shapes.len(),
                max: MAX_SHAPES,
            });
        }
        let mut hook = Hook::empty();
        hook.len = shapes.len() as u32;
        hook.unmatched_dev = unmatched_dev;
        hook.shapes[..shapes.len()].copy_from_slice(&shapes);
        out.hooks.push((hook_key, hook));
        for key in order {
            out.entries.push((
                EntryKey {
                    hook: hook_key,
                    shape: key.0 as u32,
                    flow: key.1,
                },
                entries[&key],
            ));
        }
    }
    if out.entries.len() > MAX_ENTRIES_PER_GENERATION {
        return Err(Error::TooManyEntries {
            entries: out.entries.len(),
            max: MAX_ENTRIES_PER_GENERATION,
        });
    }
    Ok(out)
}

fn target(id: u32, rule: &Rule) -> Target {
    let mut t = Target {
        prio: rule.prio,
        rule_id: id,
        dev: rule.dev.0,
        ..Target::default()
    };
    if let Some(m) = rule.actions.set_mark {
        t.flags |= TARGET_SET_MARK;
        (t.set_mark_value, t.set_mark_mask) = (m.value, m.mask);
    }
    if let Some(c) = rule.actions.classid {
        t.flags |= TARGET_SET_PRIORITY;
        t.priority = c.0;
    }
    match rule.actions.queue {
        Some(Queue::Fixed(n)) => (t.flags, t.queue) = (t.flags | TARGET_QUEUE_FIXED, n.into()),
        Some(Queue::Src) => t.flags |= TARGET_QUEUE_SRC,
        Some(Queue::Dst) => t.flags |= TARGET_QUEUE_DST,
        None => {}
    }
    t
}

fn words(bytes: [u8; 16]) -> [u32; 4] {
    core::array::from_fn(|i| u32::from_ne_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]))
}

/// The (mask, masked value) pairs that together match exactly what `rule` matches:
/// one, or one per combination of port blocks.
fn patterns(rule: &Rule) -> Vec<(FlowKey, FlowKey)> {
    let m = &rule.matches;
    let (mut mask, mut value) = (FlowKey::default(), FlowKey::default());
    let family = m.family();
    if family != 0 {
        (mask.family, value.family) = (0xff, family);
    }
    if let Some(mark) = m.mark {
        (mask.mark, value.mark) = (mark.mask, mark.value);
    }
    if let Some(p) = m.src {
        (mask.src, value.src) = (words(p.mask_bytes()), words(p.bytes()));
    }
    if let Some(p) = m.dst {
        (mask.dst, value.dst) = (words(p.mask_bytes()), words(p.bytes()));
    }
    if let Some(p) = m.proto {
        (mask.proto, value.proto) = (0xff, p.0);
    }
    if let Some(d) = m.dscp {
        (mask.dscp, value.dscp) = (0xff, d.0);
    }
    if m.sport.is_none() && m.dport.is_none() {
        return vec![(mask, value)];
    }
    (mask.flags, value.flags) = (FLOW_PORTS, FLOW_PORTS);
    let any = [(0, 0)];
    let sport = m.sport.map(|r| r.blocks());
    let dport = m.dport.map(|r| r.blocks());
    let mut out = Vec::new();
    for &(sv, sm) in sport.as_deref().unwrap_or(&any) {
        for &(dv, dm) in dport.as_deref().unwrap_or(&any) {
            let (mut mask, mut value) = (mask, value);
            (mask.sport, value.sport, mask.dport, value.dport) = (sm, sv, dm, dv);
            out.push((mask, value));
        }
    }
    out
}

/// What the data path would select for `flow` on a hook: the reference the BPF
/// program is tested against, written as plainly as the search it mirrors.
pub fn lookup(compiled: &Compiled, ifindex: u32, direction: Direction, flow: &FlowKey) -> Option<Target> {
    let (hook_key, hook) = compiled
        .hooks
        .iter()
        .find(|(k, _)| k.ifindex == ifindex && k.direction == direction.to_raw() as u16)?;
    let mut best: Option<Target> = None;
    for (i, shape) in hook.shapes[..hook.len as usize].iter().enumerate() {
        if best.is_some_and(|b| b.prio <= shape.min_prio) {
            break;
        }
        if shape.family != 0 && shape.family != u32::from(flow.family) {
            continue;
        }
        let key = EntryKey {
            hook: *hook_key,
            shape: i as u32,
            flow: flow.masked(&shape.mask),
        };
        if let Some((_, t)) = compiled.entries.iter().find(|(k, _)| *k == key)
            && best.is_none_or(|b| t.prio < b.prio)
        {
            best = Some(*t);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::rule::{Actions, DevName, Match, set_field};

    fn rule(prio: u32, dev: u32, m: &str) -> Rule {
        let (mut matches, mut actions) = (Match::default(), Actions::default());
        let mut it = m.split_whitespace();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            set_field(&mut matches, &mut actions, k, v).unwrap();
        }
        matches.validate().unwrap();
        Rule {
            ifindex: 1,
            direction: Direction::Ingress,
            prio,
            dev: DevName(dev),
            matches,
            actions,
        }
    }

    fn flow(src: &str, dst: &str, proto: u8, ports: Option<(u16, u16)>, dscp: u8, mark: u32) -> FlowKey {
        let addr = |s: &str| -> (u8, [u32; 4]) {
            match s.parse::<IpAddr>().unwrap() {
                IpAddr::V4(a) => {
                    let mut b = [0; 16];
                    b[..4].copy_from_slice(&a.octets());
                    (4, words(b))
                }
                IpAddr::V6(a) => (6, words(a.octets())),
            }
        };
        let ((family, src), (_, dst)) = (addr(src), addr(dst));
        let (sport, dport) = ports.unwrap_or((0, 0));
        FlowKey {
            mark,
            src,
            dst,
            sport,
            dport,
            family,
            proto,
            dscp,
            flags: if ports.is_some() { FLOW_PORTS } else { 0 },
        }
    }

    /// `rules` compiled with their positions as ids.
    fn numbered(rules: &[Rule]) -> Result<Compiled> {
        compile(rules.iter().enumerate().map(|(i, r)| (i as u32, r)), |_| "eth0".into())
    }

    fn select(rules: &[Rule], f: &FlowKey) -> Option<u32> {
        lookup(&numbered(rules).unwrap(), 1, Direction::Ingress, f).map(|t| t.rule_id)
    }

    #[test]
    fn first_match_by_prio_across_shapes() {
        let rules = [
            rule(30, 0, ""),
            rule(10, 1, "dst 198.18.1.0/24 proto tcp dport 80"),
            rule(20, 2, "dst 198.18.0.0/16"),
        ];
        let web = flow("198.19.0.1", "198.18.1.9", 6, Some((40000, 80)), 0, 0);
        assert_eq!(select(&rules, &web), Some(1));
        let other = flow("198.19.0.1", "198.18.2.9", 6, Some((40000, 80)), 0, 0);
        assert_eq!(select(&rules, &other), Some(2));
        let outside = flow("198.19.0.1", "198.20.0.1", 17, Some((1, 2)), 0, 0);
        assert_eq!(select(&rules, &outside), Some(0));
        let v6 = flow("2001:db8::1", "2001:db8::2", 58, None, 0, 0);
        assert_eq!(select(&rules, &v6), Some(0));
    }

    #[test]
    fn non_first_fragments_only_match_rules_without_ports() {
        let rules = [rule(10, 0, "proto udp dport 53"), rule(20, 1, "proto udp")];
        let first = flow("198.18.0.1", "198.18.0.2", 17, Some((999, 53)), 0, 0);
        let later = flow("198.18.0.1", "198.18.0.2", 17, None, 0, 0);
        assert_eq!(select(&rules, &first), Some(0));
        assert_eq!(select(&rules, &later), Some(1));
    }

    #[test]
    fn ranges_marks_dscp_and_families() {
        let rules = [
            rule(10, 0, "proto tcp sport 1024-65535 dport 5000-5100"),
            rule(20, 0, "mark 0x10/0xf0 dscp ef"),
            rule(30, 0, "src 2001:db8:1::/48"),
        ];
        let f = |sport, dport| flow("198.18.0.1", "198.18.0.2", 6, Some((sport, dport)), 0, 0);
        assert_eq!(select(&rules, &f(1024, 5000)), Some(0));
        assert_eq!(select(&rules, &f(65535, 5100)), Some(0));
        assert_eq!(select(&rules, &f(1023, 5050)), None);
        assert_eq!(select(&rules, &f(2000, 5101)), None);
        let marked = flow("198.18.0.1", "198.18.0.2", 17, None, 46, 0x1234_5618);
        assert_eq!(select(&rules, &marked), Some(1));
        let wrong_dscp = flow("198.18.0.1", "198.18.0.2", 17, None, 45, 0x18);
        assert_eq!(select(&rules, &wrong_dscp), None);
        assert_eq!(
            select(&rules, &flow("2001:db8:1:ff::1", "2001:db8::1", 6, None, 0, 0)),
            Some(2)
        );
        assert_eq!(
            select(&rules, &flow("2001:db8:2::1", "2001:db8::1", 6, None, 0, 0)),
            None
        );
        // An IPv4 address whose bytes equal the IPv6 prefix's is still not in it.
        assert_eq!(select(&rules, &flow("32.1.13.184", "198.18.0.1", 6, None, 0, 0)), None);
    }

    #[test]
    fn ipv4_and_ipv6_rules_never_share_a_shape() {
        // Both masks are the first three bytes; the families tell them apart.
        let rules = [rule(10, 0, "src 198.18.0.0/24"), rule(20, 1, "src 2001:d00::/24")];
        let c = numbered(&rules).unwrap();
        let hook = &c.hooks[0].1;
        assert_eq!(hook.len, 2);
        assert_eq!(hook.shapes[0].mask, hook.shapes[1].mask);
        assert_eq!((hook.shapes[0].family, hook.shapes[1].family), (4, 6));
        assert_eq!(
            select(&rules, &flow("198.18.0.9", "198.19.0.1", 6, None, 0, 0)),
            Some(0)
        );
        assert_eq!(
            select(&rules, &flow("2001:d00::9", "2001:db8::1", 6, None, 0, 0)),
            Some(1)
        );
        // An IPv6 address whose first bytes are those of the IPv4 prefix.
        assert_eq!(select(&rules, &flow("c612:0::1", "2001:db8::1", 6, None, 0, 0)), None);
    }

    #[test]
    fn ten_thousand_host_rules_are_one_shape() {
        let rules: Vec<Rule> = (0..10_000u32)
            .map(|i| rule(10 + i, i % 4, &format!("dst 198.18.{}.{}/32", i / 256, i % 256)))
            .collect();
        let c = numbered(&rules).unwrap();
        assert_eq!((c.hooks.len(), c.hooks[0].1.len, c.entries.len()), (1, 1, 10_000));
        let f = flow("198.19.0.1", "198.18.39.15", 6, None, 0, 0);
        assert_eq!(
            lookup(&c, 1, Direction::Ingress, &f).map(|t| t.rule_id),
            Some(39 * 256 + 15)
        );
    }

    #[test]
    fn too_many_shapes_is_refused_with_the_hook() {
        let rules: Vec<Rule> = (0..=MAX_SHAPES as u32)
            .map(|i| rule(10 + i, 0, &format!("dst 0.0.0.0/{}", i % 33)))
            .collect();
        let e = numbered(&rules).unwrap_err();
        assert!(e.to_string().contains("eth0 ingress"), "{e}");
    }
}
