//! The ingress program's verdicts on crafted frames, through BPF_PROG_TEST_RUN.
//!
//! The test loads its own copy of the embedded object with unpinned maps, so it never
//! touches imq state. BPF_PROG_TEST_RUN runs the program on `lo` (ifindex 1) and does
//! not carry out redirects: the verdict, the rule counters and the skb fields the
//! program may write are what is checked. Its frames are linear, so the program reads
//! them in place; a read past the end takes the bpf_skb_load_bytes path and fails.

mod harness;

use aya::maps::Array;
use harness::*;
use imq_common::{Counters, DEVICE_DOWN};

/// IPv4 UDP with an 8-byte payload: 50 bytes.
fn ipv4_udp() -> Vec<u8> {
    ipv4_udp_payload(b"imq-test")
}

/// IPv4 UDP with a 40-byte payload: 82 bytes.
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
    h.install(&[(3, rule_to(10, 0, ""))]);
    let (v4, v4_long, v6) = (ipv4_udp(), ipv4_udp_long(), ipv6_udp());
    assert_eq!(h.run(&v4, 0), TC_ACT_REDIRECT, "short IPv4");
    assert_eq!(h.run(&v4_long, 0), TC_ACT_REDIRECT, "longer IPv4");
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
    h.rules(&rules(&[""]));
    let mut v4_bad_version = ipv4_udp();
    v4_bad_version[14] = 0x65;
    let mut v4_bad_ihl = ipv4_udp();
    v4_bad_ihl[14] = 0x44;
    // IHL 15 announces 60 bytes of header; the frame ends after 36.
    // Likewise on a longer frame: IHL 15 needs 74 bytes, the frame stops at 70.
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
        ("IPv4 header options cut off, longer frame", v4_options_cut_long),
        ("IPv4 ethertype, version 5, longer frame", v4_bad_version_long),
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
            Ok(out) => assert_eq!(out.verdict, TCX_NEXT, "{what} cut after {len} bytes"),
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
    h.rules(&[rule_to(10, 0, "mark 0x11/0xff"), rule_to(20, 1, "mark 0x10/0xf0")]);
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
    h.install(&[(5, rule_to(10, 9, ""))]);
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

#[test]
fn address_prefixes_select_ipv4_and_ipv6() {
    let mut h = Harness::new();
    h.rules(&rules(&[
        "dst 198.18.0.2/32",
        "src 198.18.0.0/24",
        "src 2001:db8:1::/48",
        "dst 2001:db8::/32",
    ]));
    let udp = ports(1, 2);
    assert_eq!(h.selected_by(&ipv4(A, B, 0, 17, 0, &udp), 0..4), Some(0));
    assert_eq!(h.selected_by(&ipv4(A, [198, 18, 0, 3], 0, 17, 0, &udp), 0..4), Some(1));
    assert_eq!(
        h.selected_by(&ipv4([198, 18, 1, 1], [198, 18, 0, 3], 0, 17, 0, &udp), 0..4),
        None
    );
    assert_eq!(
        h.selected_by(&ipv6("2001:db8:1:2::1", "2001:db9::1", 0, 17, &udp), 0..4),
        Some(2)
    );
    assert_eq!(
        h.selected_by(&ipv6("2001:db9::1", "2001:db8:ff::1", 0, 17, &udp), 0..4),
        Some(3)
    );
    assert_eq!(
        h.selected_by(&ipv6("2001:db9::1", "2001:db9::2", 0, 17, &udp), 0..4),
        None
    );
}

#[test]
fn protocols_port_ranges_and_dscp() {
    let mut h = Harness::new();
    h.rules(&rules(&[
        "proto udp dport 5000-5100",
        "proto tcp sport 80",
        "dscp ef",
        "proto icmp",
        "proto udp sport 1024-65535 dport 53",
    ]));
    let udp = |s, d| ipv4(A, B, 0, 17, 0, &ports(s, d));
    assert_eq!(h.selected_by(&udp(9, 5000), 0..5), Some(0));
    assert_eq!(h.selected_by(&udp(9, 5100), 0..5), Some(0));
    assert_eq!(h.selected_by(&udp(9, 5101), 0..5), None);
    assert_eq!(h.selected_by(&udp(1024, 53), 0..5), Some(4));
    assert_eq!(h.selected_by(&udp(1023, 53), 0..5), None);
    assert_eq!(h.selected_by(&ipv4(A, B, 0, 6, 0, &ports(80, 40000)), 0..5), Some(1));
    assert_eq!(
        h.selected_by(&ipv4(A, B, 0, 17, 0, &ports(80, 40000)), 0..5),
        None,
        "udp is not tcp"
    );
    assert_eq!(h.selected_by(&ipv4(A, B, 46, 17, 0, &ports(9, 9)), 0..5), Some(2));
    assert_eq!(
        h.selected_by(&ipv4(A, B, 0, 1, 0, &[8, 0, 0, 0, 0, 0, 0, 0]), 0..5),
        Some(3)
    );
    // The same on IPv6, DSCP across the traffic class bytes.
    let v6 = |dscp, next, l4: &[u8]| ipv6("2001:db8::1", "2001:db8::2", dscp, next, l4);
    assert_eq!(h.selected_by(&v6(0, 17, &ports(9, 5050)), 0..5), Some(0));
    assert_eq!(h.selected_by(&v6(46, 6, &ports(9, 9)), 0..5), Some(2));
    assert_eq!(h.selected_by(&v6(45, 6, &ports(9, 9)), 0..5), None);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut h = Harness::new();
    h.rules(&rules(&["proto udp dport 5201", "proto udp"]));
    let udp = ports(9, 5201);
    // Hop-by-hop (8 bytes), destination options (16 bytes), routing (8), then UDP.
    let mut chain = vec![60, 0, 1, 4, 0, 0, 0, 0];
    chain.extend_from_slice(&[43, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    chain.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 0]);
    chain.extend_from_slice(&udp);
    assert_eq!(
        h.selected_by(&ipv6("2001:db8::1", "2001:db8::2", 0, 0, &chain), 0..2),
        Some(0)
    );
    // AH counts its length in 4-octet units, minus 2: 12 bytes here.
    let mut ah = vec![17, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
    ah.extend_from_slice(&udp);
    assert_eq!(
        h.selected_by(&ipv6("2001:db8::1", "2001:db8::2", 0, 51, &ah), 0..2),
        Some(0)
    );

    // Fragments: the first carries the ports; a later one only the protocol.
    let fragment = |offset: u16, more: bool| {
        let mut f = vec![17, 0];
        f.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 7]);
        f.extend_from_slice(&udp);
        ipv6("2001:db8::1", "2001:db8::2", 0, 44, &f)
    };
    assert_eq!(h.selected_by(&fragment(0, true), 0..2), Some(0));
    assert_eq!(h.selected_by(&fragment(1, true), 0..2), Some(1));
    assert_eq!(h.selected_by(&fragment(100, false), 0..2), Some(1));
    // A later fragment's bytes are payload, never headers: here its fragment header
    // names destination options (60), and the payload happens to look like one that
    // names UDP. Walking into it would make the fragment UDP; its protocol is 60.
    let mut f = vec![60, 0];
    f.extend_from_slice(&(100u16 << 3).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 7]);
    f.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&udp);
    assert_eq!(
        h.selected_by(&ipv6("2001:db8::1", "2001:db8::2", 0, 44, &f), 0..2),
        None
    );

    // More extension headers than the walk takes: the transport header is never
    // reached, so neither rule (both need udp) matches.
    let mut long = Vec::new();
    for _ in 0..9 {
        long.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    long[8 * 8] = 17;
    long.extend_from_slice(&udp);
    assert_eq!(
        h.selected_by(&ipv6("2001:db8::1", "2001:db8::2", 0, 60, &long), 0..2),
        None
    );
    // Cut inside an extension header.
    assert_eq!(
        h.selected_by(&ipv6("2001:db8::1", "2001:db8::2", 0, 0, &[17, 0]), 0..2),
        None
    );
}

#[test]
fn ipv4_fragments_and_truncated_transport_headers_match_no_port_rule() {
    let mut h = Harness::new();
    h.rules(&rules(&["proto udp dport 53", "proto udp"]));
    let l4 = ports(9, 53);
    assert_eq!(
        h.selected_by(&ipv4(A, B, 0, 17, 0x2000, &l4), 0..2),
        Some(0),
        "first fragment, MF set"
    );
    assert_eq!(
        h.selected_by(&ipv4(A, B, 0, 17, 0x0001, &l4), 0..2),
        Some(1),
        "offset 8"
    );
    assert_eq!(
        h.selected_by(&ipv4(A, B, 0, 17, 0x4000, &l4), 0..2),
        Some(0),
        "DF is not a fragment"
    );
    // Only two bytes of the UDP header: ports unknown.
    assert_eq!(h.selected_by(&ipv4(A, B, 0, 17, 0, &l4[..2]), 0..2), Some(1));
}

#[test]
fn actions_set_the_mark_and_the_class() {
    let mut h = Harness::new();
    h.rules(&[
        rule_to(10, 0, "proto udp set_mark 0x100/0xf00 classid 1:10"),
        rule_to(20, 0, "classid 2:3"),
    ]);
    let f = ipv4(A, B, 0, 17, 0, &ports(1, 2));
    let out = h.try_run(&f, 0x12345).unwrap();
    assert_eq!(
        out,
        Outcome {
            verdict: TC_ACT_REDIRECT,
            mark: 0x12145,
            priority: 0x10010
        }
    );
    let tcp = ipv4(A, B, 0, 6, 0, &ports(1, 2));
    let out = h.try_run(&tcp, 0x12345).unwrap();
    assert_eq!((out.mark, out.priority), (0x12345, 0x20003), "mark untouched");
    // Not selected: nothing changes.
    h.rules(&[rule_to(10, 0, "proto udp classid 1:10")]);
    let out = h.try_run(&tcp, 7).unwrap();
    assert_eq!((out.verdict, out.mark, out.priority), (TCX_NEXT, 7, 0));
}

#[test]
fn the_active_generation_decides() {
    let mut h = Harness::new();
    let r = rule_to(10, 0, "proto udp");
    h.install(&[(0, r)]);
    // The same rule written only into generation 1: invisible until it is active.
    h.write_generation(&[(1, r)], 1);
    let f = ipv4(A, B, 0, 17, 0, &ports(1, 2));
    assert_eq!(h.selected_by(&f, 0..2), Some(0));
    Array::<_, u32>::try_from(h.ebpf.map_mut(imq_common::ACTIVE_MAP).unwrap())
        .unwrap()
        .set(0, 1, 0)
        .unwrap();
    assert_eq!(h.selected_by(&f, 0..2), Some(1));
}
