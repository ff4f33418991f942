//! The ingress program's verdicts on crafted frames, through BPF_PROG_TEST_RUN.
//!
//! The test loads its own copy of the embedded object with unpinned maps, so it never
//! touches imq state. BPF_PROG_TEST_RUN runs the program on `lo` (ifindex 1) and does
//! not carry out redirects: the verdict and the rule counters are what is checked.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use imq_common::{
    COUNTERS_MAP, Counters, DEVICE_DOWN, DEVICES_MAP, DIRECTION_INGRESS, Device, HookKey, INGRESS_PROG, RULES_MAP,
    Rule, RuleSet,
};
use imq_tests::require_root;

const LO: u32 = 1;
const TC_ACT_REDIRECT: u32 = 7;
/// TCX_NEXT (-1): not selected, the packet goes on untouched.
const TCX_NEXT: u32 = u32::MAX;

struct Harness {
    ebpf: Ebpf,
}

impl Harness {
    fn new() -> Self {
        require_root();
        let mut ebpf = EbpfLoader::new().load(imq::EBPF_OBJECT).expect("load object");
        let prog: &mut SchedClassifier = ebpf.program_mut(INGRESS_PROG).unwrap().try_into().unwrap();
        prog.load().expect("verifier accepts the ingress program");
        // imq0 is "lo" here: a device that exists, so rules can select packets.
        Array::<_, Device>::try_from(ebpf.map_mut(DEVICES_MAP).unwrap())
            .unwrap()
            .set(0, Device { ifindex: LO, flags: 0 }, 0)
            .unwrap();
        Self { ebpf }
    }

    fn rules(&mut self, rules: &[Rule]) {
        let mut set = RuleSet::empty();
        set.rules[..rules.len()].copy_from_slice(rules);
        set.len = rules.len() as u32;
        HashMap::<_, HookKey, RuleSet>::try_from(self.ebpf.map_mut(RULES_MAP).unwrap())
            .unwrap()
            .insert(
                HookKey {
                    ifindex: LO,
                    direction: DIRECTION_INGRESS,
                },
                set,
                0,
            )
            .unwrap();
    }

    fn device(&mut self, dev: u32, ifindex: u32) {
        self.device_flags(dev, ifindex, 0);
    }

    fn device_flags(&mut self, dev: u32, ifindex: u32, flags: u32) {
        Array::<_, Device>::try_from(self.ebpf.map_mut(DEVICES_MAP).unwrap())
            .unwrap()
            .set(dev, Device { ifindex, flags }, 0)
            .unwrap();
    }

    /// Runs the program on `frame` with `skb->mark = mark`; returns the verdict.
    fn run(&self, frame: &[u8], mark: u32) -> u32 {
        self.try_run(frame, mark).expect("BPF_PROG_TEST_RUN")
    }

    fn try_run(&self, frame: &[u8], mark: u32) -> Result<u32, aya::programs::ProgramError> {
        // struct __sk_buff: mark is at offset 8; the rest stays zero.
        let mut ctx = [0u8; 192];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let prog: &SchedClassifier = self.ebpf.program(INGRESS_PROG).unwrap().try_into().unwrap();
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        prog.test_run(opts).map(|r| r.return_value)
    }

    fn counters(&self, id: u32) -> Counters {
        let map = PerCpuArray::<_, Counters>::try_from(self.ebpf.map(COUNTERS_MAP).unwrap()).unwrap();
        map.get(&id, 0)
            .unwrap()
            .iter()
            .fold(Counters::default(), |a, c| Counters {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            })
    }
}

fn rule(id: u32, mark: Option<(u32, u32)>) -> Rule {
    let (mark_value, mark_mask) = mark.unwrap_or((0, 0));
    Rule {
        mark_value,
        mark_mask,
        dev: 0,
        id,
        prio: (id + 1) * 10,
        flags: 0,
    }
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// IPv4 UDP with an 8-byte payload: 50 bytes, shorter than the 54 the program reads
/// directly, so it takes the bpf_skb_load_bytes path.
fn ipv4_udp() -> Vec<u8> {
    ipv4_udp_payload(b"imq-test")
}

/// IPv4 UDP with a 40-byte payload: 82 bytes, read directly from the linear data.
fn ipv4_udp_long() -> Vec<u8> {
    ipv4_udp_payload(&[0x77; 40])
}

fn ipv4_udp_payload(payload: &[u8]) -> Vec<u8> {
    let mut f = eth(0x0800);
    let (ip_len, udp_len) = ((28 + payload.len()) as u16, (8 + payload.len()) as u16);
    // 20-byte IPv4 header (198.18.0.1 -> 198.18.0.2, UDP), 8-byte UDP header, payload.
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[
        0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2, 0x30, 0x39, 0x14, 0x51,
    ]);
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn ipv6_udp() -> Vec<u8> {
    let mut f = eth(0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 16, 17, 64]);
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[0x30, 0x39, 0x14, 0x51, 0, 16, 0, 0]);
    f.extend_from_slice(b"imq-test");
    f
}

fn arp() -> Vec<u8> {
    let mut f = eth(0x0806);
    f.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18, 0, 2,
    ]);
    f
}

#[test]
fn ipv4_and_ipv6_are_redirected_and_counted() {
    let mut h = Harness::new();
    h.rules(&[rule(3, None)]);
    let (v4, v4_long, v6) = (ipv4_udp(), ipv4_udp_long(), ipv6_udp());
    assert_eq!(h.run(&v4, 0), TC_ACT_REDIRECT, "short IPv4: headers copied out");
    assert_eq!(h.run(&v4_long, 0), TC_ACT_REDIRECT, "IPv4 read in place");
    assert_eq!(h.run(&v6, 0), TC_ACT_REDIRECT);
    assert_eq!(
        h.counters(3),
        Counters {
            packets: 3,
            bytes: (v4.len() + v4_long.len() + v6.len()) as u64
        },
        "counters count whole frames"
    );
}

#[test]
fn non_ip_and_malformed_frames_are_left_alone() {
    let mut h = Harness::new();
    h.rules(&[rule(0, None)]);
    let mut v4_bad_version = ipv4_udp();
    v4_bad_version[14] = 0x65;
    let mut v4_bad_ihl = ipv4_udp();
    v4_bad_ihl[14] = 0x44;
    // IHL 15 announces 60 bytes of header; the frame ends after 36.
    // Likewise, read in place: IHL 15 needs 74 bytes, the frame stops at 70.
    let mut v4_options_cut_long = ipv4_udp_long();
    v4_options_cut_long[14] = 0x4f;
    v4_options_cut_long.truncate(70);
    let mut v4_bad_version_long = ipv4_udp_long();
    v4_bad_version_long[14] = 0x55;
    let mut v4_options_cut = ipv4_udp();
    v4_options_cut[14] = 0x4f;
    let mut v6_says_v4 = ipv6_udp();
    v6_says_v4[14] = 0x45;
    // An in-band 802.1Q tag in front of IPv4.
    let mut vlan = eth(0x8100);
    vlan.extend_from_slice(&[0, 10, 0x08, 0x00]);
    vlan.extend_from_slice(&ipv4_udp()[14..]);
    let frames = [
        ("ARP", arp()),
        ("IPv4 ethertype, version 6", v4_bad_version),
        ("IPv4 with IHL 4", v4_bad_ihl),
        ("IPv4 header options cut off", v4_options_cut),
        ("IPv4 header options cut off, read in place", v4_options_cut_long),
        ("IPv4 ethertype, version 5, read in place", v4_bad_version_long),
        ("IPv6 ethertype, version 4", v6_says_v4),
        ("VLAN-tagged", vlan),
    ];
    for (what, frame) in &frames {
        assert_eq!(h.run(frame, 0), TCX_NEXT, "{what}");
    }

    // Frames cut inside the fixed IPv4/IPv6 header: this kernel's BPF_PROG_TEST_RUN
    // refuses some of them itself (EINVAL); whatever it does run must be left alone.
    for (what, ethertype, len) in [
        ("IPv4", 0x0800, 0),
        ("IPv4", 0x0800, 10),
        ("IPv4", 0x0800, 19),
        ("IPv6", 0x86dd, 0),
        ("IPv6", 0x86dd, 39),
    ] {
        let mut frame = eth(ethertype);
        frame.extend_from_slice(&if ethertype == 0x0800 { ipv4_udp() } else { ipv6_udp() }[14..14 + len]);
        match h.try_run(&frame, 0) {
            Ok(verdict) => assert_eq!(verdict, TCX_NEXT, "{what} cut after {len} bytes"),
            Err(aya::programs::ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => panic!("{what} cut after {len} bytes: {e}"),
        }
    }
    assert_eq!(h.counters(0), Counters::default());
}

#[test]
fn marks_select_and_first_match_wins() {
    let mut h = Harness::new();
    h.device(1, LO);
    let mut second = rule(1, Some((0x10, 0xf0)));
    second.dev = 1;
    h.rules(&[rule(0, Some((0x11, 0xff))), second]);
    let f = ipv4_udp();
    assert_eq!(h.run(&f, 0), TCX_NEXT, "unmarked");
    assert_eq!(h.run(&f, 0x11), TC_ACT_REDIRECT, "exact mark: first rule");
    assert_eq!(h.run(&f, 0x511), TC_ACT_REDIRECT, "bits outside the mask are ignored");
    assert_eq!(h.run(&f, 0x1f), TC_ACT_REDIRECT, "second rule's mask");
    assert_eq!(h.run(&f, 0x20), TCX_NEXT, "no rule");
    assert_eq!(h.counters(0).packets, 2, "0x11 and 0x511 matched the first rule");
    assert_eq!(
        h.counters(1).packets,
        1,
        "0x11 also fits the second rule, but the first won"
    );
}

#[test]
fn no_rules_or_no_device_means_untouched() {
    let mut h = Harness::new();
    let f = ipv4_udp();
    assert_eq!(h.run(&f, 0), TCX_NEXT, "no rule set for this interface");

    h.rules(&[]);
    assert_eq!(h.run(&f, 0), TCX_NEXT, "empty rule set");

    // The rule's device was never set up, or was deleted: pass unshaped, never drop.
    let mut r = rule(5, None);
    r.dev = 9;
    h.rules(&[r]);
    assert_eq!(h.run(&f, 0), TCX_NEXT, "device table entry empty");
    h.device(9, 999_999);
    assert_eq!(h.run(&f, 0), TCX_NEXT, "device ifindex gone");
    assert_eq!(h.counters(5), Counters::default());
    h.device(9, LO);
    assert_eq!(h.run(&f, 0), TC_ACT_REDIRECT, "device back");

    // A device that is down would drop what is redirected into it: pass instead.
    h.device_flags(9, LO, DEVICE_DOWN);
    assert_eq!(h.run(&f, 0), TCX_NEXT, "device down");
    h.device(9, LO);
    assert_eq!(h.run(&f, 0), TC_ACT_REDIRECT, "device up again");
    assert_eq!(h.counters(5).packets, 2);
}
