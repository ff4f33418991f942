//! Shared by the BPF_PROG_TEST_RUN tests and the program-cost benchmark: the ingress
//! program loaded on its own with unpinned maps (never touching imq state), rules
//! installed as imqctl compiles them, and crafted frames.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use imq::{
    compile::compile,
    rule::{Actions, DevName, Direction, Match, Rule, set_field},
};
use imq_common::{
    COUNTERS_MAP, Counters, DEVICES_MAP, Device, ENTRIES_MAP, EntryKey, HOOKS_MAP, Hook, HookKey, INGRESS_PROG, Target,
};
use imq_tests::require_root;

pub const LO: u32 = 1;
pub const TC_ACT_REDIRECT: u32 = 7;
/// TCX_NEXT (-1): not selected, the packet goes on untouched.
pub const TCX_NEXT: u32 = u32::MAX;

pub struct Harness {
    pub ebpf: Ebpf,
}

/// What a run returned: the verdict and the skb fields the program may change.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: u32,
    pub mark: u32,
    pub priority: u32,
}

impl Harness {
    pub fn new() -> Self {
        require_root();
        let mut ebpf = EbpfLoader::new().load(imq::EBPF_OBJECT).expect("load object");
        let prog: &mut SchedClassifier = ebpf.program_mut(INGRESS_PROG).unwrap().try_into().unwrap();
        prog.load().expect("verifier accepts the ingress program");
        // imq0 is "lo" here: a device that exists, so rules can select packets.
        // Generation 0 is active (the map starts zeroed).
        let mut h = Self { ebpf };
        h.device(0, LO);
        h
    }

    /// Installs `rules` (id, rule) for lo's ingress as imqctl would: compiled into
    /// shapes and entries, with zeroed counters.
    pub fn install(&mut self, rules: &[(u32, Rule)]) {
        let mut hooks = HashMap::<_, HookKey, Hook>::try_from(self.ebpf.map_mut(HOOKS_MAP).unwrap()).unwrap();
        for k in hooks.keys().map(Result::unwrap).collect::<Vec<_>>() {
            hooks.remove(&k).unwrap();
        }
        let mut entries = HashMap::<_, EntryKey, Target>::try_from(self.ebpf.map_mut(ENTRIES_MAP).unwrap()).unwrap();
        for k in entries.keys().map(Result::unwrap).collect::<Vec<_>>() {
            entries.remove(&k).unwrap();
        }
        self.write_generation(rules, 0);
    }

    /// Adds `rules` to `generation` (hooks, entries, zeroed counters), leaving what
    /// is there, and which generation is active, as it is.
    pub fn write_generation(&mut self, rules: &[(u32, Rule)], generation: u16) {
        let compiled = compile(rules.iter().map(|(id, r)| (*id, r)), |i| i.to_string()).unwrap();
        let with_generation = |k: HookKey| HookKey { generation, ..k };
        let mut hooks = HashMap::<_, HookKey, Hook>::try_from(self.ebpf.map_mut(HOOKS_MAP).unwrap()).unwrap();
        for (k, v) in &compiled.hooks {
            hooks.insert(with_generation(*k), v, 0).unwrap();
        }
        let mut entries = HashMap::<_, EntryKey, Target>::try_from(self.ebpf.map_mut(ENTRIES_MAP).unwrap()).unwrap();
        for (k, v) in &compiled.entries {
            let key = EntryKey {
                hook: with_generation(k.hook),
                ..*k
            };
            entries.insert(key, v, 0).unwrap();
        }
        let cpus = aya::util::nr_cpus().unwrap();
        let mut counters =
            PerCpuHashMap::<_, u32, Counters>::try_from(self.ebpf.map_mut(COUNTERS_MAP).unwrap()).unwrap();
        for (id, _) in rules {
            let zero = PerCpuValues::try_from(vec![Counters::default(); cpus]).unwrap();
            counters.insert(id, zero, 0).unwrap();
        }
    }

    /// Rules numbered by position: id i, prio 10 * (i + 1), all to imq0.
    pub fn rules(&mut self, rules: &[Rule]) {
        let numbered: Vec<(u32, Rule)> = rules.iter().enumerate().map(|(i, r)| (i as u32, *r)).collect();
        self.install(&numbered);
    }

    pub fn device(&mut self, dev: u32, ifindex: u32) {
        self.device_flags(dev, ifindex, 0);
    }

    pub fn device_flags(&mut self, dev: u32, ifindex: u32, flags: u32) {
        Array::<_, Device>::try_from(self.ebpf.map_mut(DEVICES_MAP).unwrap())
            .unwrap()
            .set(dev, Device { ifindex, flags }, 0)
            .unwrap();
    }

    /// Runs the program on `frame` with `skb->mark = mark`; returns the verdict.
    pub fn run(&self, frame: &[u8], mark: u32) -> u32 {
        self.try_run(frame, mark).expect("BPF_PROG_TEST_RUN").verdict
    }

    pub fn try_run(&self, frame: &[u8], mark: u32) -> Result<Outcome, aya::programs::ProgramError> {
        // struct __sk_buff: mark at offset 8, priority at 32; the rest stays zero.
        let mut ctx = [0u8; 192];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut out = [0u8; 192];
        let prog: &SchedClassifier = self.ebpf.program(INGRESS_PROG).unwrap().try_into().unwrap();
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        let verdict = prog.test_run(opts)?.return_value;
        let word = |at: usize| u32::from_ne_bytes(out[at..at + 4].try_into().unwrap());
        Ok(Outcome {
            verdict,
            mark: word(8),
            priority: word(32),
        })
    }

    /// Runs the ingress program `repeat` times on `frame`; returns the verdict and the
    /// time per run the kernel measured, in ns.
    #[allow(dead_code, reason = "used by the cost examples, not by every test")]
    pub fn timed_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, f64), aya::programs::ProgramError> {
        let prog: &SchedClassifier = self.ebpf.program(INGRESS_PROG).unwrap().try_into().unwrap();
        let ctx = [0u8; 192];
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::new()
        };
        let r = prog.test_run(opts)?;
        Ok((r.return_value, r.duration.as_nanos() as f64))
    }

    pub fn counters(&self, id: u32) -> Counters {
        let map = PerCpuHashMap::<_, u32, Counters>::try_from(self.ebpf.map(COUNTERS_MAP).unwrap()).unwrap();
        map.get(&id, 0)
            .unwrap()
            .iter()
            .fold(Counters::default(), |a, c| Counters {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            })
    }

    /// Which rule (by id) selected `frame`, from the counters: None if none did.
    pub fn selected_by(&self, frame: &[u8], ids: std::ops::Range<u32>) -> Option<u32> {
        let before: Vec<u64> = ids.clone().map(|i| self.counters(i).packets).collect();
        let verdict = self.run(frame, 0);
        let hit: Vec<u32> = ids
            .clone()
            .zip(before)
            .filter(|&(i, b)| self.counters(i).packets != b)
            .map(|(i, _)| i)
            .collect();
        assert!(hit.len() <= 1, "one packet counted by rules {hit:?}");
        assert_eq!(
            verdict == TC_ACT_REDIRECT,
            hit.len() == 1,
            "verdict {verdict} vs counters {hit:?}"
        );
        hit.first().copied()
    }
}

/// A rule on lo's ingress to `dev`, from `key value` pairs, keys as rule files name them.
pub fn rule_to(prio: u32, dev: u32, spec: &str) -> Rule {
    let mut m = Match::default();
    let mut actions = Actions::default();
    let mut it = spec.split_whitespace();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        set_field(&mut m, &mut actions, k, v).unwrap();
    }
    m.validate().unwrap();
    Rule {
        ifindex: LO,
        direction: Direction::Ingress,
        prio,
        dev: DevName(dev),
        matches: m,
        actions,
    }
}

/// Rules for `rules()`: the i-th gets prio 10 * (i + 1).
pub fn rules(specs: &[&str]) -> Vec<Rule> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| rule_to(10 * (i as u32 + 1), 0, s))
        .collect()
}

pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// IPv4 from `src` to `dst` with `dscp`, protocol `proto`, fragment offset field
/// `frag` (flags and offset), and `l4` as the transport header and payload.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], dscp: u8, proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut f = eth(0x0800);
    f.extend_from_slice(&[0x45, dscp << 2]);
    f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1]);
    f.extend_from_slice(&frag.to_be_bytes());
    f.extend_from_slice(&[64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(l4);
    f
}

/// IPv6 with `dscp`, first next-header `next`, then `rest` (extension headers and
/// transport header as bytes).
pub fn ipv6(src: &str, dst: &str, dscp: u8, next: u8, rest: &[u8]) -> Vec<u8> {
    let mut f = eth(0x86dd);
    let tc = dscp << 2;
    f.extend_from_slice(&[0x60 | (tc >> 4), (tc & 0xf) << 4, 0, 0]);
    f.extend_from_slice(&(rest.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(rest);
    f
}

/// A UDP or TCP header's first bytes with the ports, and some payload.
pub fn ports(sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = sport.to_be_bytes().to_vec();
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&[0; 16]);
    l4
}

pub const A: [u8; 4] = [198, 18, 0, 1];
pub const B: [u8; 4] = [198, 18, 0, 2];
