//! Rule vocabulary and rule-set editing. Pure: nothing here touches the kernel, so the
//! whole decision of what a command would change is made (and refused) before any
//! change.

use std::{fmt, str::FromStr};

use imq_common::{DIRECTION_EGRESS, DIRECTION_INGRESS, MAX_DEVICES, MAX_RULES_PER_HOOK, Rule, RuleSet};
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

impl Serialize for Mark {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// Distance between automatically numbered rules, leaving room to insert between.
pub const PRIO_STEP: u32 = 10;

/// What adding a rule to a hook's set does.
#[derive(Debug, PartialEq, Eq)]
pub enum Insert {
    /// The same rule is already there.
    Unchanged,
    /// The new set, with the new rule in prio order.
    Changed(Box<RuleSet>),
}

/// The match part of a rule, as stored.
fn rule_mark(rule: &Rule) -> Option<Mark> {
    (rule.mark_mask != 0).then_some(Mark {
        value: rule.mark_value,
        mask: rule.mark_mask,
    })
}

/// Adds `mark -> dev` to `set`. Same match and device: unchanged. Same match to another
/// device: a conflict (which would win is a question the user must answer). Rules stay
/// sorted by prio; without a prio the rule goes last.
pub fn insert(
    set: &RuleSet,
    iface: &str,
    direction: Direction,
    mark: Option<Mark>,
    dev: DevName,
    prio: Option<u32>,
    id: u32,
) -> Result<Insert> {
    let rules = set.as_slice();
    if let Some(existing) = rules.iter().find(|r| rule_mark(r) == mark) {
        if existing.dev == dev.0 && prio.is_none_or(|p| p == existing.prio) {
            return Ok(Insert::Unchanged);
        }
        return Err(Error::Conflict {
            iface: iface.to_owned(),
            direction,
            prio: existing.prio,
            dev: DevName(existing.dev).to_string(),
        });
    }
    if let Some(prio) = prio
        && rules.iter().any(|r| r.prio == prio)
    {
        return Err(Error::DuplicatePrio {
            iface: iface.to_owned(),
            direction,
            prio,
        });
    }
    if rules.len() >= MAX_RULES_PER_HOOK {
        return Err(Error::TooManyRules {
            iface: iface.to_owned(),
            direction,
            max: MAX_RULES_PER_HOOK,
        });
    }
    let prio = prio.unwrap_or_else(|| {
        rules
            .iter()
            .map(|r| r.prio)
            .max()
            .map_or(PRIO_STEP, |p| p.saturating_add(PRIO_STEP))
    });
    let mut new = *set;
    let at = rules.partition_point(|r| r.prio < prio);
    new.rules.copy_within(at..rules.len(), at + 1);
    new.rules[at] = Rule {
        mark_value: mark.map_or(0, |m| m.value),
        mark_mask: mark.map_or(0, |m| m.mask),
        dev: dev.0,
        id,
        prio,
        flags: 0,
    };
    new.len += 1;
    Ok(Insert::Changed(Box::new(new)))
}

/// Removes the rules with the given match (all rules without one). Returns the new set
/// and the removed rules.
pub fn remove(set: &RuleSet, mark: Option<Mark>) -> (RuleSet, Vec<Rule>) {
    let (removed, kept): (Vec<Rule>, Vec<Rule>) = set
        .as_slice()
        .iter()
        .partition(|r| mark.is_none() || rule_mark(r) == mark);
    let mut new = RuleSet::empty();
    new.rules[..kept.len()].copy_from_slice(&kept);
    new.len = kept.len() as u32;
    (new, removed)
}

/// The stored rule's match, for display.
pub fn mark_of(rule: &Rule) -> Option<Mark> {
    rule_mark(rule)
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

    fn add(set: &RuleSet, m: Option<&str>, dev: u32, prio: Option<u32>, id: u32) -> Result<Insert> {
        insert(set, "eth0", Direction::Ingress, m.map(mark), DevName(dev), prio, id)
    }

    fn changed(r: Result<Insert>) -> RuleSet {
        match r.unwrap() {
            Insert::Changed(s) => *s,
            Insert::Unchanged => panic!("expected a change"),
        }
    }

    fn prios(set: &RuleSet) -> Vec<(u32, u32)> {
        set.as_slice().iter().map(|r| (r.prio, r.id)).collect()
    }

    #[test]
    fn rules_are_kept_in_prio_order() {
        let s = changed(add(&RuleSet::empty(), Some("1"), 0, None, 7));
        let s = changed(add(&s, Some("2"), 0, None, 8));
        assert_eq!(prios(&s), [(10, 7), (20, 8)]);
        let s = changed(add(&s, Some("3"), 1, Some(15), 9));
        assert_eq!(prios(&s), [(10, 7), (15, 9), (20, 8)]);
        let s = changed(add(&s, None, 1, Some(1), 10));
        assert_eq!(prios(&s), [(1, 10), (10, 7), (15, 9), (20, 8)]);
        let s = changed(add(&s, Some("4"), 1, None, 11));
        assert_eq!(s.as_slice().last().unwrap().prio, 30);
    }

    #[test]
    fn same_rule_twice_is_a_no_op_and_conflicts_are_refused() {
        let s = changed(add(&RuleSet::empty(), Some("0x10/0xff"), 0, None, 1));
        assert_eq!(add(&s, Some("0x10/0xff"), 0, None, 2).unwrap(), Insert::Unchanged);
        assert_eq!(add(&s, Some("0x10/0xff"), 0, Some(10), 2).unwrap(), Insert::Unchanged);
        assert!(matches!(
            add(&s, Some("0x10/0xff"), 1, None, 2),
            Err(Error::Conflict { prio: 10, .. })
        ));
        assert!(matches!(
            add(&s, Some("0x10/0xff"), 0, Some(5), 2),
            Err(Error::Conflict { .. })
        ));
        assert!(matches!(
            add(&s, Some("0x20/0xff"), 0, Some(10), 2),
            Err(Error::DuplicatePrio { .. })
        ));
        // A different mask is a different match.
        changed(add(&s, Some("0x10/0xf0"), 1, None, 2));
    }

    #[test]
    fn a_hook_holds_a_bounded_number_of_rules() {
        let mut s = RuleSet::empty();
        for i in 0..MAX_RULES_PER_HOOK as u32 {
            s = changed(add(&s, Some(&i.to_string()), 0, None, i));
        }
        assert!(matches!(
            add(&s, Some("999"), 0, None, 999),
            Err(Error::TooManyRules { .. })
        ));
    }

    #[test]
    fn remove_by_match_or_all() {
        let s = changed(add(&RuleSet::empty(), Some("1"), 0, None, 1));
        let s = changed(add(&s, None, 0, None, 2));
        let s = changed(add(&s, Some("3/3"), 1, None, 3));
        let (after, gone) = remove(&s, Some(mark("3/3")));
        assert_eq!(gone.iter().map(|r| r.id).collect::<Vec<_>>(), [3]);
        assert_eq!(prios(&after), [(10, 1), (20, 2)]);
        let (after, gone) = remove(&s, Some(mark("4")));
        assert!(gone.is_empty());
        assert_eq!(after, s);
        let (after, gone) = remove(&s, None);
        assert_eq!(gone.len(), 3);
        assert_eq!(after.len, 0);
    }
}
