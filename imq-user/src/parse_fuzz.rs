//! Parser fuzzing on stable Rust: every value parser behind a CLI flag or a rule file
//! key, and the rule file parser, fed valid inputs mutated at random (seeded, so a
//! failure replays). Properties: no panic; an error is one non-empty line (a rule
//! file's also names a line of the file); a value accepted prints back as text that
//! parses to the same value.

use std::{fmt, panic, str::FromStr};

use crate::{
    error::Error,
    rule::{ClassId, DevName, Directions, Dscp, Mark, PortRange, Prefix, Proto},
    rulefile,
    shaper::{Diffserv, LinkLayer, Rate, ShaperQdisc},
};

/// The seed; `IMQ_FUZZ_SEED` (hexadecimal) replays another.
fn seed() -> u64 {
    std::env::var("IMQ_FUZZ_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x005e_ed0f_1e1d)
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// `input` with one to four random edits: characters from `alphabet` inserted or
/// replacing one, characters deleted, a piece repeated, a token inserted, the end cut.
fn mutate(rng: &mut Rng, input: &str, alphabet: &[char], tokens: &[&str]) -> String {
    let mut s: Vec<char> = input.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(s.len() + 1);
        match rng.below(7) {
            0 => s.insert(at, alphabet[rng.below(alphabet.len())]),
            1 if at < s.len() => s[at] = alphabet[rng.below(alphabet.len())],
            2 if at < s.len() => {
                s.remove(at);
            }
            3 if at < s.len() => {
                let end = (at + 1 + rng.below(8)).min(s.len());
                let piece: Vec<char> = s[at..end].to_vec();
                let to = rng.below(s.len() + 1);
                s.splice(to..to, piece);
            }
            4 => {
                let t: Vec<char> = rng.pick(tokens).chars().collect();
                s.splice(at..at, t);
            }
            5 => s.truncate(at),
            _ => {
                // A character from anywhere in Unicode's first planes.
                let c = char::from_u32(rng.next() as u32 % 0x3_0000).unwrap_or('\u{fffd}');
                s.insert(at, c);
            }
        }
    }
    s.into_iter().collect()
}

/// Runs `f`, turning a panic into a test failure that names the input.
fn no_panic<T>(what: &str, input: &str, f: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => panic!("{what} panicked on {input:?} (seed {:#x})", seed()),
    }
}

/// Fuzzes one value parser from `corpus`; returns (accepted, refused).
fn values<T>(what: &str, corpus: &[&str], alphabet: &str, rounds: usize) -> (usize, usize)
where
    T: FromStr<Err = Error> + fmt::Display + fmt::Debug + PartialEq,
{
    let alphabet: Vec<char> = alphabet.chars().collect();
    let mut rng = Rng(seed() ^ what.len() as u64 ^ (what.as_bytes()[0] as u64) << 40);
    let (mut ok, mut refused) = (0, 0);
    for i in 0..rounds {
        let input = if i < corpus.len() {
            corpus[i].to_owned()
        } else {
            let base = rng.pick(corpus);
            mutate(&mut rng, base, &alphabet, corpus)
        };
        match no_panic(what, &input, || input.parse::<T>()) {
            Ok(v) => {
                ok += 1;
                let text = v.to_string();
                let again = no_panic(what, &text, || text.parse::<T>());
                assert_eq!(
                    again.as_ref().ok(),
                    Some(&v),
                    "{what}: {input:?} was read as {v:?}, which prints as {text:?}, which reads back as {again:?}"
                );
            }
            Err(e) => {
                refused += 1;
                let msg = e.to_string();
                assert!(
                    !msg.trim().is_empty() && !msg.contains('\n'),
                    "{what}: the error for {input:?} is not one line: {msg:?}"
                );
            }
        }
    }
    (ok, refused)
}

#[test]
fn every_value_parser_survives_mutated_input() {
    const N: usize = 20_000;
    let digits = "0123456789abcdefxX/:-. ";
    let results = [
        (
            "mark",
            values::<Mark>(
                "mark",
                &["0x10", "0x100/0xf00", "16", "4294967295", "0x1/0x1"],
                digits,
                N,
            ),
        ),
        (
            "prefix",
            values::<Prefix>(
                "prefix",
                &[
                    "198.18.0.0/15",
                    "198.18.0.1",
                    "2001:db8::/32",
                    "2001:db8::1/128",
                    "0.0.0.0/0",
                    "::/0",
                ],
                "0123456789abcdef:./ ",
                N,
            ),
        ),
        (
            "port range",
            values::<PortRange>(
                "port",
                &["80", "1024-65535", "0", "65535", "5000-5000"],
                "0123456789- +",
                N,
            ),
        ),
        (
            "protocol",
            values::<Proto>(
                "proto",
                &["tcp", "udp", "icmpv6", "47", "255", "sctp"],
                "abcdefghijklmnopqrstuvwxyz0123456789",
                N,
            ),
        ),
        (
            "DSCP",
            values::<Dscp>(
                "dscp",
                &["ef", "af41", "cs7", "0", "63", "be", "le", "va"],
                "abcdefls0123456789",
                N,
            ),
        ),
        (
            "classid",
            values::<ClassId>(
                "classid",
                &["1:10", "fffe:ffff", "1:0", "abcd:1"],
                "0123456789abcdefg:x",
                N,
            ),
        ),
        (
            "device",
            values::<DevName>("dev", &["imq0", "imq255", "imq17"], "imq0123456789-", N),
        ),
        (
            "direction",
            values::<Directions>(
                "direction",
                &["ingress", "egress", "both", "in", "out"],
                "ingresoutbh",
                N,
            ),
        ),
        (
            "rate",
            values::<Rate>(
                "rate",
                &["45mbit", "1.5gbit", "64kbit", "1000gbit", "100000bit"],
                "0123456789.kmgbitps",
                N,
            ),
        ),
        (
            "qdisc",
            values::<ShaperQdisc>("qdisc", &["cake", "fq_codel"], "cakefq_odl", N),
        ),
        (
            "link layer",
            values::<LinkLayer>("link layer", &["ethernet", "atm", "ptm"], "ethrnapm", N),
        ),
        (
            "diffserv",
            values::<Diffserv>(
                "diffserv",
                &["diffserv3", "diffserv4", "besteffort"],
                "difserv348btfo",
                N,
            ),
        ),
    ];
    for (what, (ok, refused)) in results {
        // Both sides must be reached, or the mutations say nothing.
        assert!(ok > 0 && refused > 0, "{what}: {ok} accepted, {refused} refused");
    }
}

const RULE_FILES: &[&str] = &[
    "[[rule]]\ninterface = \"eth0\"\ndst = \"198.18.0.0/24\"\nclassid = \"1:10\"\n",
    "# uplink\n[[rule]]\ninterface = \"eth1\"\ndirection = \"both\"\ndev = \"imq3\"\nprio = 5\nproto = \"udp\"\n\
     dport = 5060\ndscp = \"ef\"\nmark = 16\nset_mark = \"0x100/0xf00\"\n",
    "[[shaper]]\ninterface = \"eth0\"\ndown = \"45mbit\"\nup = \"9mbit\"\nqdisc = \"cake\"\n",
    "[[device]]\nname = \"imq1\"\nqdisc = [\"root handle 1: htb default 10\", \"parent 1: classid 1:10 htb rate 10mbit\"]\n\n\
     [[rule]]\ninterface = \"eth0\"\ndev = \"imq1\"\nsrc = \"2001:db8::/32\"\nsport = \"1024-65535\"\nproto = \"tcp\"\n",
    "",
];

#[test]
fn the_rule_file_parser_survives_mutated_files() {
    let alphabet: Vec<char> = "[]{}=\"'#,.:/-_ \n\t0123456789abcdefghijklmnopqrstuvwxyz"
        .chars()
        .collect();
    let tokens = [
        "[[rule]]\n",
        "[[shaper]]\n",
        "[[device]]\n",
        "interface = \"eth0\"\n",
        "dport = 80\n",
        "proto = \"tcp\"\n",
        "prio = 99999999999\n",
        "mark = \"0x1/0x0\"\n",
        "dst = \"::1/129\"\n",
        "\"\"\"",
        "= [",
        "\n",
        "#",
        "\\u0000",
        "\\n",
    ];
    let mut rng = Rng(seed());
    let (mut ok, mut refused) = (0, 0);
    for i in 0..20_000 {
        let base = RULE_FILES[i % RULE_FILES.len()];
        let text = if i < RULE_FILES.len() {
            base.to_owned()
        } else {
            mutate(&mut rng, base, &alphabet, &tokens)
        };
        match no_panic("the rule file parser", &text, || rulefile::parse_setup(&text)) {
            Ok(_) => ok += 1,
            Err(e @ Error::RuleFile { .. }) => {
                refused += 1;
                let Error::RuleFile { line, .. } = e else {
                    unreachable!()
                };
                let message = e.to_string();
                let lines = text.lines().count().max(1);
                assert!(
                    (1..=lines + 1).contains(&line),
                    "line {line} of a {lines}-line file: {message} ({text:?})"
                );
                assert!(
                    !message.trim().is_empty() && !message.contains('\n'),
                    "not one line: {message:?} ({text:?})"
                );
            }
            Err(e) => panic!("an error without a line: {e} ({text:?})"),
        }
    }
    assert!(ok > 100 && refused > 100, "{ok} accepted, {refused} refused");
}
