//! Rule sets as files, for `imqctl apply -f` and `imqctl export`: TOML, one
//! `[[rule]]` table per rule, keys named after imqctl's flags.
//!
//! ```toml
//! [[rule]]
//! interface = "eth0"
//! direction = "ingress"     # ingress (default), egress or both
//! dev = "imq0"              # default imq0
//! dst = "198.18.0.10/32"
//! classid = "1:10"
//!
//! [[shaper]]                # imqctl shape: keys named after its flags
//! interface = "eth1"
//! down = "45mbit"
//! up = "9mbit"
//! overhead = 18
//!
//! [[device]]                # an imq device and its qdiscs, as tc commands
//! name = "imq0"
//! txqueuelen = 1000
//! qdisc = [
//!   "qdisc add root handle 1: htb default 20",
//!   "class add parent 1: classid 1:10 htb rate 10mbit",
//! ]
//! ```

use std::{collections::HashMap, fmt::Write as _};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    error::{Error, Result},
    rule::{Actions, DevName, Direction, Directions, Match, PRIO_STEP, Rule, set_field},
    shaper::{Diffserv, LinkLayer, Shaper},
};

/// One `[[rule]]` of a file, checked field by field; `line` is where it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRule {
    pub line: usize,
    pub interface: String,
    pub directions: Directions,
    pub dev: DevName,
    pub prio: Option<u32>,
    pub matches: Match,
    pub actions: Actions,
}

/// A whole file: rules, shapers and imq devices (shapers and devices with the line
/// they start on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Setup {
    pub rules: Vec<FileRule>,
    pub shapers: Vec<(usize, Shaper)>,
    pub devices: Vec<FileDevice>,
}

/// One `[[device]]`: an imq device imq creates (or adopts) and keeps, with the
/// qdiscs, classes and filters of its `qdisc` lines: tc commands without `tc` and
/// without `dev` (imq adds `dev NAME`), run in order by `tc -batch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDevice {
    pub line: usize,
    pub name: DevName,
    pub txqueuelen: u32,
    /// TX queues (ifb's numtxqueues), fixed when the device is created.
    pub queues: u32,
    pub qdisc: Vec<String>,
}

/// Most bytes of `qdisc` lines a device may have (what imq keeps of them, to tell a
/// change and to export them): a few hundred classes. Larger setups belong in a
/// `tc -batch` file of their own.
pub const MAX_QDISC_SETUP: usize = 32 * 1024 - 16;

/// Most TX queues of an imq device.
pub const MAX_QUEUES: u32 = 256;

impl FileDevice {
    /// Checks one `qdisc` line: a tc qdisc, class or filter command that adds,
    /// replaces or changes, without `dev`.
    fn check_line(name: DevName, n: usize, line: &str) -> Result<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let bad = |why: String| Error::Config(format!("{name} qdisc line {n}: {why}"));
        match words.as_slice() {
            [object, verb, _, ..]
                if ["qdisc", "class", "filter"].contains(object) && ["add", "replace", "change"].contains(verb) => {}
            _ => {
                return Err(bad(format!(
                    "'{line}' is not a tc command imq runs: qdisc|class|filter add|replace|change ..."
                )));
            }
        }
        if words.contains(&"dev") {
            return Err(bad(format!("leave out dev: imq adds dev {name}")));
        }
        if line.contains(['\n', ';', '#']) {
            return Err(bad("one command per line, without ; or #".into()));
        }
        Ok(words.join(" "))
    }

    /// The lines as `tc -batch` takes them, with `dev NAME` after the verb.
    pub fn batch(name: &str, lines: &[String]) -> String {
        let mut out = String::new();
        for l in lines {
            let mut words = l.split_whitespace();
            let (object, verb) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let rest: Vec<&str> = words.collect();
            let _ = writeln!(out, "{object} {verb} dev {name} {}", rest.join(" "));
        }
        out
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: String,
    txqueuelen: Option<i64>,
    queues: Option<i64>,
    #[serde(default)]
    qdisc: Vec<String>,
}

impl RawDevice {
    fn check(self, line: usize) -> Result<FileDevice> {
        let name: DevName = self.name.parse()?;
        let txqueuelen = match self.txqueuelen {
            None => crate::DEFAULT_TXQUEUELEN,
            Some(q) => match u32::try_from(q) {
                Ok(q) if q > 0 => q,
                _ => {
                    return Err(Error::Invalid {
                        what: "txqueuelen",
                        input: q.to_string(),
                        reason: "expected 1 to 4294967295 (1000 or more: ifb's default of 32 drops bursts)",
                    });
                }
            },
        };
        let queues = match self.queues {
            None => 1,
            Some(q) => match u32::try_from(q) {
                Ok(q) if (1..=MAX_QUEUES).contains(&q) => q,
                _ => {
                    return Err(Error::Invalid {
                        what: "queues",
                        input: q.to_string(),
                        reason: "expected 1 to 256 TX queues",
                    });
                }
            },
        };
        let qdisc = self
            .qdisc
            .iter()
            .enumerate()
            .map(|(i, l)| FileDevice::check_line(name, i + 1, l))
            .collect::<Result<Vec<_>>>()?;
        let size: usize = qdisc.iter().map(|l| l.len() + 1).sum();
        if size > MAX_QDISC_SETUP {
            return Err(Error::Invalid {
                what: "qdisc setup",
                input: format!("of {name} ({size} bytes)"),
                reason: "at most 32 KiB: run a larger one with tc -batch after imq has created the device",
            });
        }
        Ok(FileDevice {
            line,
            name,
            txqueuelen,
            queues,
            qdisc,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    shaper: Vec<Spanned<RawShaper>>,
    #[serde(default)]
    device: Vec<Spanned<RawDevice>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShaper {
    interface: String,
    down: Option<String>,
    up: Option<String>,
    dev: Option<String>,
    qdisc: Option<String>,
    overhead: Option<i64>,
    mpu: Option<i64>,
    link_layer: Option<String>,
    diffserv: Option<String>,
    #[serde(default)]
    nat: bool,
    #[serde(default)]
    wash: bool,
    #[serde(default)]
    ack_filter: bool,
}

impl RawShaper {
    fn check(self) -> Result<Shaper> {
        fn opt<T: std::str::FromStr<Err = Error>>(v: Option<String>) -> Result<Option<T>> {
            v.map(|s| s.parse()).transpose()
        }
        let int = |what: &'static str, v: Option<i64>| {
            v.map(|v| {
                i32::try_from(v).map_err(|_| Error::Invalid {
                    what,
                    input: v.to_string(),
                    reason: "out of range",
                })
            })
            .transpose()
        };
        let shaper = Shaper {
            down: opt(self.down)?,
            up: opt(self.up)?,
            dev: opt(self.dev)?,
            qdisc: opt(self.qdisc)?.unwrap_or_default(),
            overhead: int("overhead", self.overhead)?,
            mpu: int("mpu", self.mpu)?
                .map(|m| {
                    u32::try_from(m).map_err(|_| Error::Invalid {
                        what: "mpu",
                        input: m.to_string(),
                        reason: "negative",
                    })
                })
                .transpose()?,
            link_layer: opt(self.link_layer)?.unwrap_or_default(),
            diffserv: opt(self.diffserv)?.unwrap_or_default(),
            nat: self.nat,
            wash: self.wash,
            ack_filter: self.ack_filter,
            interface: self.interface,
        };
        shaper.validate()?;
        Ok(shaper)
    }
}

/// Values may be written as strings or, where they are numbers, as integers.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Int(i64),
    Str(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Self::Int(i) => i.to_string(),
            Self::Str(s) => s.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    interface: String,
    direction: Option<String>,
    dev: Option<String>,
    prio: Option<i64>,
    mark: Option<Scalar>,
    src: Option<String>,
    dst: Option<String>,
    proto: Option<Scalar>,
    sport: Option<Scalar>,
    dport: Option<Scalar>,
    dscp: Option<Scalar>,
    set_mark: Option<Scalar>,
    classid: Option<String>,
    queue: Option<Scalar>,
}

/// Line numbers of byte offsets: one pass over the text, then a binary search each.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        Self(
            text.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        )
    }

    fn line_of(&self, offset: usize) -> usize {
        self.0.partition_point(|&nl| nl < offset) + 1
    }
}

/// Parses and checks a rule file. Errors name the line of the rule or shaper (or of
/// the TOML error) and the reason. Whether interfaces exist is for the caller to
/// check.
pub fn parse_setup(text: &str) -> Result<Setup> {
    let lines = Lines::new(text);
    let file: File = toml::from_str(text).map_err(|e| Error::RuleFile {
        line: e.span().map_or(1, |s| lines.line_of(s.start)),
        message: e.message().trim().replace('\n', " "),
    })?;
    let at = |line: usize| {
        move |e: Error| match e {
            Error::RuleFile { .. } => e,
            other => Error::RuleFile {
                line,
                message: other.to_string(),
            },
        }
    };
    let rules = file
        .rule
        .into_iter()
        .map(|spanned| {
            let line = lines.line_of(spanned.span().start);
            check(spanned.into_inner(), line).map_err(at(line))
        })
        .collect::<Result<_>>()?;
    let mut shapers: Vec<(usize, Shaper)> = Vec::new();
    for spanned in file.shaper {
        let line = lines.line_of(spanned.span().start);
        let shaper = spanned.into_inner().check().map_err(at(line))?;
        if let Some((other, _)) = shapers.iter().find(|(_, s)| s.interface == shaper.interface) {
            return Err(Error::RuleFile {
                line,
                message: format!("a second shaper on {} (the first is on line {other})", shaper.interface),
            });
        }
        shapers.push((line, shaper));
    }
    let mut devices: Vec<FileDevice> = Vec::new();
    for spanned in file.device {
        let line = lines.line_of(spanned.span().start);
        let device = spanned.into_inner().check(line).map_err(at(line))?;
        if let Some(other) = devices.iter().find(|d| d.name == device.name) {
            return Err(Error::RuleFile {
                line,
                message: format!("{} again (it is on line {})", device.name, other.line),
            });
        }
        if let Some((_, s)) = shapers
            .iter()
            .find(|(_, s)| s.dev == Some(device.name) && s.down.is_some())
            && !device.qdisc.is_empty()
        {
            return Err(Error::RuleFile {
                line,
                message: format!(
                    "{} is the download device of {}'s shaper, which sets its qdisc",
                    device.name, s.interface
                ),
            });
        }
        devices.push(device);
    }
    Ok(Setup {
        rules,
        shapers,
        devices,
    })
}

/// The rules of a rule file ([`parse_setup`] without the shapers).
pub fn parse(text: &str) -> Result<Vec<FileRule>> {
    parse_setup(text).map(|s| s.rules)
}

fn check(raw: RawRule, line: usize) -> Result<FileRule> {
    fn opt<T: std::str::FromStr<Err = Error>>(v: Option<String>) -> Result<Option<T>> {
        v.map(|s| s.parse()).transpose()
    }
    let text = |v: Option<Scalar>| v.map(|s| s.text());
    let prio = match raw.prio {
        None => None,
        Some(p) => Some(u32::try_from(p).map_err(|_| Error::RuleFile {
            line,
            message: format!("invalid prio {p}: expected 0 to {}", u32::MAX),
        })?),
    };
    let (mut matches, mut actions) = (Match::default(), Actions::default());
    let fields = [
        ("mark", text(raw.mark)),
        ("src", raw.src),
        ("dst", raw.dst),
        ("proto", text(raw.proto)),
        ("sport", text(raw.sport)),
        ("dport", text(raw.dport)),
        ("dscp", text(raw.dscp)),
        ("set_mark", text(raw.set_mark)),
        ("classid", raw.classid),
        ("queue", text(raw.queue)),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            set_field(&mut matches, &mut actions, key, &v)?;
        }
    }
    matches.validate()?;
    Ok(FileRule {
        line,
        interface: raw.interface,
        directions: opt(raw.direction)?.unwrap_or(Directions::Ingress),
        dev: opt(raw.dev)?.unwrap_or_default(),
        prio,
        matches,
        actions,
    })
}

/// The rules of a file as they will be: interfaces resolved by `ifindex` (which says
/// why a name cannot carry rules), both directions expanded, prios assigned, and
/// two rules with one prio or one match on the same hook refused. A rule without a
/// prio goes after every rule before it in the file on its hook, so file order is
/// match order.
pub fn plan(rules: &[FileRule], ifindex: impl Fn(&str) -> Result<u32>) -> Result<Vec<Rule>> {
    type Hook = (u32, Direction);
    // Per hook: the line of each prio and of each match, and the highest prio.
    let mut prios: HashMap<(Hook, u32), usize> = HashMap::new();
    let mut matches: HashMap<(Hook, Match), usize> = HashMap::new();
    let mut last: HashMap<Hook, u32> = HashMap::new();
    let mut planned = Vec::with_capacity(rules.len());
    for fr in rules {
        let index = ifindex(&fr.interface).map_err(|e| Error::RuleFile {
            line: fr.line,
            message: e.to_string(),
        })?;
        for direction in fr.directions.iter() {
            let hook = (index, direction);
            let prio = fr
                .prio
                .unwrap_or_else(|| last.get(&hook).map_or(PRIO_STEP, |p| p.saturating_add(PRIO_STEP)));
            let clash = |what: &str, other: usize| Error::RuleFile {
                line: fr.line,
                message: format!("{what} as the rule on line {other} ({} {direction})", fr.interface),
            };
            if let Some(&other) = prios.get(&(hook, prio)) {
                return Err(clash(&format!("prio {prio} is the same"), other));
            }
            if let Some(&other) = matches.get(&(hook, fr.matches)) {
                return Err(clash("the same match (so this one could never match)", other));
            }
            prios.insert((hook, prio), fr.line);
            matches.insert((hook, fr.matches), fr.line);
            let top = last.entry(hook).or_insert(prio);
            *top = (*top).max(prio);
            planned.push(Rule {
                ifindex: index,
                direction,
                prio,
                dev: fr.dev,
                matches: fr.matches,
                actions: fr.actions,
            });
        }
    }
    Ok(planned)
}

/// The rules (with their interface names), shapers and devices as a rule file
/// `parse_setup` reads back.
pub fn render(rules: &[(String, Rule)], shapers: &[Shaper], devices: &[FileDevice]) -> String {
    let mut out = String::from("# imq rule set: imqctl apply -f FILE\n");
    for d in devices {
        let _ = write!(
            out,
            "\n[[device]]\nname = \"{}\"\ntxqueuelen = {}\n",
            d.name, d.txqueuelen
        );
        if d.queues > 1 {
            let _ = writeln!(out, "queues = {}", d.queues);
        }
        if !d.qdisc.is_empty() {
            out.push_str("qdisc = [\n");
            for l in &d.qdisc {
                let _ = writeln!(out, "  {},", quote(l));
            }
            out.push_str("]\n");
        }
    }
    for s in shapers {
        let _ = write!(out, "\n[[shaper]]\ninterface = {}\n", quote(&s.interface));
        let strings = [
            ("down", s.down.map(|r| r.to_string())),
            ("up", s.up.map(|r| r.to_string())),
            ("dev", s.dev.map(|d| d.to_string())),
            ("qdisc", Some(s.qdisc.to_string())),
            (
                "link_layer",
                (s.link_layer != LinkLayer::default()).then(|| s.link_layer.to_string()),
            ),
            (
                "diffserv",
                (s.diffserv != Diffserv::default()).then(|| s.diffserv.to_string()),
            ),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                let _ = writeln!(out, "{key} = {}", quote(&v));
            }
        }
        let numbers = [("overhead", s.overhead.map(i64::from)), ("mpu", s.mpu.map(i64::from))];
        for (key, value) in numbers {
            if let Some(v) = value {
                let _ = writeln!(out, "{key} = {v}");
            }
        }
        for (key, on) in [("nat", s.nat), ("wash", s.wash), ("ack_filter", s.ack_filter)] {
            if on {
                let _ = writeln!(out, "{key} = true");
            }
        }
    }
    for (interface, r) in rules {
        let m = &r.matches;
        let _ = write!(
            out,
            "\n[[rule]]\ninterface = {}\ndirection = \"{}\"\ndev = \"{}\"\nprio = {}\n",
            quote(interface),
            match r.direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            },
            r.dev,
            r.prio
        );
        let actions = [
            ("set_mark", r.actions.set_mark.map(|v| v.to_string())),
            ("classid", r.actions.classid.map(|v| v.to_string())),
            ("queue", r.actions.queue.map(|v| v.to_string())),
        ];
        let fields = m
            .fields()
            .into_iter()
            .chain(actions.into_iter().filter_map(|(k, v)| Some((k, v?))));
        for (key, value) in fields {
            let _ = writeln!(out, "{key} = {}", quote(&value));
        }
    }
    out
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04x}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (usize, String) {
        match parse_setup(text).unwrap_err() {
            Error::RuleFile { line, message } => (line, message),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn rules_parse_with_their_lines() {
        let rules = parse(
            "# comment\n[[rule]]\ninterface = \"eth0\"\ndst = \"198.18.0.0/24\"\nclassid = \"1:10\"\n\n\
             [[rule]]\ninterface = \"eth1\"\ndirection = \"both\"\ndev = \"imq3\"\nprio = 5\nproto = \"udp\"\n\
             dport = 5060\ndscp = \"ef\"\nmark = 16\nset_mark = \"0x100/0xf00\"\n",
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (rules[0].line, rules[0].dev, rules[0].directions),
            (2, DevName(0), Directions::Ingress)
        );
        assert_eq!(rules[0].actions.classid.unwrap().0, 0x10010);
        assert_eq!(
            (rules[1].line, rules[1].prio, rules[1].directions),
            (7, Some(5), Directions::Both)
        );
        assert_eq!(rules[1].matches.dport.unwrap().lo, 5060);
        assert_eq!(rules[1].matches.mark.unwrap().value, 16);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_rules_name_their_line_and_reason() {
        let two = "[[rule]]\ninterface = \"a\"\n\n[[rule]]\ninterface = \"b\"\n";
        assert_eq!(err(&format!("{two}dst = \"198.18.0.1/24\"\n")).0, 4);
        assert!(err(&format!("{two}dst = \"198.18.0.1/24\"\n")).1.contains("host bits"));
        let (line, msg) = err(&format!("{two}dport = 80\n"));
        assert_eq!(line, 4);
        assert!(msg.contains("ports need"), "{msg}");
        let (line, msg) = err("[[rule]]\ninterface = \"a\"\nfrobnicate = 1\n");
        assert_eq!(line, 3);
        assert!(msg.contains("frobnicate"), "{msg}");
        assert!(err("[[rule]]\ndst = \"198.18.0.0/24\"\n").1.contains("interface"));
        assert!(err("[[rule]]\ninterface = \"a\"\nprio = -1\n").1.contains("prio"));
        assert!(
            err("[[rule]]\ninterface = \"a\"\ndev = \"eth0\"\n")
                .1
                .contains("imq device")
        );
        assert!(err("[[rules]]\ninterface = \"a\"\n").1.contains("rules"));
        assert_eq!(err("[[rule]\n").0, 1);
    }

    fn planned(text: &str) -> Result<Vec<(u32, Direction, u32)>> {
        let rules = parse(text)?;
        let index = |name: &str| match name {
            "eth0" => Ok(1),
            "eth1" => Ok(2),
            _ => Err(Error::NoSuchInterface(name.to_owned())),
        };
        Ok(plan(&rules, index)?
            .iter()
            .map(|r| (r.ifindex, r.direction, r.prio))
            .collect())
    }

    #[test]
    fn file_order_is_match_order() {
        let rule = |iface: &str, extra: &str| format!("[[rule]]\ninterface = \"{iface}\"\n{extra}\n");
        let text = [
            rule("eth0", "proto = \"tcp\""),
            rule("eth0", "proto = \"udp\"\nprio = 5"),
            rule("eth1", "proto = \"tcp\""),
            rule("eth0", "proto = \"icmp\""),
            rule("eth0", "proto = \"gre\"\ndirection = \"both\""),
        ]
        .concat();
        use Direction::{Egress, Ingress};
        assert_eq!(
            planned(&text).unwrap(),
            [
                (1, Ingress, 10),
                (1, Ingress, 5),
                (2, Ingress, 10),
                (1, Ingress, 20),
                (1, Ingress, 30),
                (1, Egress, 10)
            ]
        );
        let dup = [rule("eth0", "prio = 7"), rule("eth0", "prio = 7\nproto = \"tcp\"")].concat();
        let Err(Error::RuleFile { line: 4, message }) = planned(&dup) else {
            panic!("duplicate prio accepted");
        };
        assert!(
            message.contains("prio 7 is the same as the rule on line 1 (eth0 ingress)"),
            "{message}"
        );
        let same = [rule("eth0", "dscp = 46"), rule("eth0", "dscp = \"ef\"")].concat();
        assert!(matches!(planned(&same), Err(Error::RuleFile { line: 4, .. })));
        let missing = [rule("eth0", ""), rule("eth9", "")].concat();
        let Err(Error::RuleFile { line: 4, message }) = planned(&missing) else {
            panic!("missing interface accepted");
        };
        assert!(message.contains("no interface 'eth9'"), "{message}");
    }

    #[test]
    fn shapers_parse_render_and_read_back() {
        let text = "[[rule]]\ninterface = \"eth0\"\n\n[[shaper]]\ninterface = \"wan0\"\ndown = \"45mbit\"\n\
                    up = \"9.5mbit\"\noverhead = -4\nmpu = 64\nlink_layer = \"ptm\"\ndiffserv = \"diffserv4\"\n\
                    nat = true\nack_filter = true\ndev = \"imq3\"\n";
        let setup = parse_setup(text).unwrap();
        assert_eq!(setup.rules.len(), 1);
        let (line, s) = &setup.shapers[0];
        assert_eq!(*line, 4);
        assert_eq!(
            (s.down.unwrap().bits_per_sec(), s.up.unwrap().bits_per_sec()),
            (45_000_000, 9_500_000)
        );
        assert_eq!((s.overhead, s.mpu, s.dev), (Some(-4), Some(64), Some(DevName(3))));
        assert_eq!((s.link_layer, s.diffserv), (LinkLayer::Ptm, Diffserv::Diffserv4));
        assert!(s.nat && s.ack_filter && !s.wash);
        let again = parse_setup(&render(&[], std::slice::from_ref(s), &[])).unwrap();
        assert_eq!(again.shapers[0].1, *s);
    }

    #[test]
    fn bad_shapers_name_their_line_and_reason() {
        let shaper =
            |extra: &str| format!("[[rule]]\ninterface = \"a\"\n\n[[shaper]]\ninterface = \"wan0\"\n{extra}\n");
        for (extra, says) in [
            ("", "give --down RATE, --up RATE or both"),
            ("down = \"45mbps\"", "bytes per second"),
            ("down = \"45mbit\"\nqdisc = \"sfq\"", "invalid qdisc 'sfq'"),
            (
                "up = \"9mbit\"\nqdisc = \"fq_codel\"\nwash = true",
                "--wash needs --qdisc cake",
            ),
            ("down = \"45mbit\"\nmpu = -1", "mpu"),
            ("down = \"45mbit\"\nspeed = 3", "speed"),
        ] {
            let (line, msg) = err(&shaper(extra));
            assert_eq!(line, if extra.contains("speed") { 7 } else { 4 }, "{extra}: {msg}");
            assert!(msg.contains(says), "{extra}: {msg}");
        }
        let two = "[[shaper]]\ninterface = \"w\"\nup = \"1mbit\"\n[[shaper]]\ninterface = \"w\"\nup = \"2mbit\"\n";
        let (line, msg) = err(two);
        assert_eq!(line, 4);
        assert!(msg.contains("a second shaper on w (the first is on line 1)"), "{msg}");
    }

    #[test]
    fn render_reads_back() {
        let text = "[[rule]]\ninterface = \"eth0\"\ndirection = \"egress\"\ndev = \"imq1\"\nprio = 7\nsrc = \"2001:db8::/32\"\n\
                    proto = \"tcp\"\nsport = \"1024-65535\"\ndscp = 46\nset_mark = \"0x1\"\nclassid = \"1:a\"\n";
        let parsed = parse(text).unwrap();
        let r = &parsed[0];
        let rule = Rule {
            ifindex: 1,
            direction: Direction::Egress,
            prio: r.prio.unwrap(),
            dev: r.dev,
            matches: r.matches,
            actions: r.actions,
        };
        let again = parse(&render(&[("eth0".to_owned(), rule)], &[], &[])).unwrap();
        assert_eq!(again[0].matches, r.matches);
        assert_eq!(again[0].actions, r.actions);
        assert_eq!((again[0].prio, again[0].dev), (Some(7), DevName(1)));
        assert_eq!(again[0].directions, Directions::Egress);
    }

    #[test]
    fn devices_parse_check_their_lines_and_round_trip() {
        let text = "[[device]]\nname = \"imq2\"\ntxqueuelen = 3000\nqueues = 4\nqdisc = [\"qdisc add root handle 1:  htb\", \"class add parent 1: classid 1:1 htb rate 1mbit\"]\n";
        let setup = parse_setup(text).unwrap();
        let d = &setup.devices[0];
        assert_eq!((d.line, d.name, d.txqueuelen, d.queues), (1, DevName(2), 3000, 4));
        assert_eq!(d.qdisc[0], "qdisc add root handle 1: htb");
        assert_eq!(
            FileDevice::batch("imq2", &d.qdisc),
            "qdisc add dev imq2 root handle 1: htb\nclass add dev imq2 parent 1: classid 1:1 htb rate 1mbit\n"
        );
        let again = parse_setup(&render(&[], &[], &setup.devices)).unwrap().devices;
        assert_eq!(again[0], FileDevice { line: 3, ..d.clone() });
        let plain = &parse_setup("[[device]]\nname = \"imq0\"\n").unwrap().devices[0];
        assert_eq!((plain.txqueuelen, plain.queues), (1000, 1));

        for (text, line, says) in [
            ("[[device]]\nname = \"eth0\"\n", 1, "invalid imq device name"),
            ("\n[[device]]\nname = \"imq1\"\ntxqueuelen = 0\n", 2, "txqueuelen"),
            (
                "[[device]]\nname = \"imq1\"\nqdisc = [\"qdisc del root\"]\n",
                1,
                "not a tc command imq runs",
            ),
            (
                "[[device]]\nname = \"imq1\"\nqdisc = [\"qdisc add dev imq1 root htb\"]\n",
                1,
                "leave out dev",
            ),
            (
                "[[device]]\nname = \"imq1\"\nqdisc = [\"qdisc add root htb; qdisc del root\"]\n",
                1,
                "one command per line",
            ),
            (
                "[[device]]\nname = \"imq1\"\n[[device]]\nname = \"imq1\"\n",
                3,
                "imq1 again (it is on line 1)",
            ),
            ("[[device]]\nname = \"imq1\"\nqueues = 0\n", 1, "invalid queues '0'"),
            ("[[device]]\nname = \"imq1\"\nqueues = 257\n", 1, "1 to 256"),
            ("[[device]]\nname = \"imq1\"\nqueue = 2\n", 3, "unknown field `queue`"),
            (
                "[[shaper]]\ninterface = \"eth0\"\ndown = \"10mbit\"\ndev = \"imq1\"\n[[device]]\nname = \"imq1\"\nqdisc = [\"qdisc add root sfq\"]\n",
                5,
                "shaper, which sets its qdisc",
            ),
        ] {
            let (l, message) = err(text);
            assert_eq!(l, line, "{text}: {message}");
            assert!(message.contains(says), "{text}: {message}");
        }
        let huge = format!(
            "[[device]]\nname = \"imq1\"\nqdisc = [{}]\n",
            vec!["\"class add parent 1: classid 1:1 htb rate 1mbit ceil 2mbit\""; 1000].join(",")
        );
        assert!(err(&huge).1.contains("at most 32 KiB"));
    }
}
