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
//! ```

use std::fmt::Write as _;

use serde::Deserialize;
use toml::Spanned;

use crate::{
    error::{Error, Result},
    rule::{Actions, DevName, Direction, Directions, Match, Rule},
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
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

/// Parses and checks a rule file. Errors name the line of the rule (or of the
/// TOML error) and the reason. Whether interfaces exist is for the caller to check.
pub fn parse(text: &str) -> Result<Vec<FileRule>> {
    let lines = Lines::new(text);
    let file: File = toml::from_str(text).map_err(|e| Error::RuleFile {
        line: e.span().map_or(1, |s| lines.line_of(s.start)),
        message: e.message().trim().replace('\n', " "),
    })?;
    file.rule
        .into_iter()
        .map(|spanned| {
            let line = lines.line_of(spanned.span().start);
            let raw = spanned.into_inner();
            check(raw, line).map_err(|e| match e {
                Error::RuleFile { .. } => e,
                other => Error::RuleFile {
                    line,
                    message: other.to_string(),
                },
            })
        })
        .collect()
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
    let matches = Match {
        mark: opt(text(raw.mark))?,
        src: opt(raw.src)?,
        dst: opt(raw.dst)?,
        proto: opt(text(raw.proto))?,
        sport: opt(text(raw.sport))?,
        dport: opt(text(raw.dport))?,
        dscp: opt(text(raw.dscp))?,
    };
    matches.validate()?;
    Ok(FileRule {
        line,
        interface: raw.interface,
        directions: opt(raw.direction)?.unwrap_or(Directions::Ingress),
        dev: opt(raw.dev)?.unwrap_or_default(),
        prio,
        matches,
        actions: Actions {
            set_mark: opt(text(raw.set_mark))?,
            classid: opt(raw.classid)?,
        },
    })
}

/// The rules (with their interface names) as a rule file `parse` reads back.
pub fn render(rules: &[(String, Rule)]) -> String {
    let mut out = String::from("# imq rule set: imqctl apply -f FILE\n");
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
        match parse(text).unwrap_err() {
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
        let again = parse(&render(&[("eth0".to_owned(), rule)])).unwrap();
        assert_eq!(again[0].matches, r.matches);
        assert_eq!(again[0].actions, r.actions);
        assert_eq!((again[0].prio, again[0].dev), (Some(7), DevName(1)));
        assert_eq!(again[0].directions, Directions::Egress);
    }
}
