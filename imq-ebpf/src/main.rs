//! imq data path: TC programs that send selected packets into imq (ifb) devices.
//!
//! Ingress: a TCX ingress program looks up the rule set of the interface and, on the
//! first match, `bpf_redirect`s the packet into the rule's imq device. After the imq
//! device's qdisc, ifb re-injects it with `netif_receive_skb` on the original device,
//! and `skb_skip_tc_classify` keeps the TC ingress hook from running on it again, so a
//! packet is queued at most once (ifb_ri_tasklet, __netif_receive_skb_core).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_UNSPEC},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_check_mtu, bpf_redirect},
    },
    macros::{classifier, fentry, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::{FEntryContext, TcContext},
};
use imq_common::{
    Counters, DEVICE_DOWN, DIRECTION_EGRESS, DIRECTION_INGRESS, Device, HookKey, MAX_DEVICES, MAX_HOOKS, MAX_RULE_IDS,
    MAX_RULES_PER_HOOK, RuleSet,
};

/// Rule sets by hook. Not preallocated: an update then links a fresh element and frees
/// the old one only after an RCU grace period, so a program still reading the old set
/// never sees it rewritten under it (htab_map_update_elem).
#[map(name = "imq_rules")]
static RULES: HashMap<HookKey, RuleSet> = HashMap::with_max_entries(MAX_HOOKS, BPF_F_NO_PREALLOC);

/// imq device number -> ifindex.
#[map(name = "imq_devices")]
static DEVICES: Array<Device> = Array::with_max_entries(MAX_DEVICES, 0);

/// Per-rule packets and bytes sent to the imq device, per CPU.
#[map(name = "imq_counters")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_RULE_IDS, 0);

/// TCX verdict "not mine": the next TCX program, then classic tc filters, still run.
const TCX_NEXT: i32 = TC_ACT_UNSPEC;
/// cls_bpf (classic mode) verdicts: match with the filter's own classid, or no match.
const CLS_MATCH: i32 = -1;
const CLS_NO_MATCH: i32 = 0;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;

#[classifier]
pub fn imq_ingress(ctx: TcContext) -> i32 {
    match select(&ctx, DIRECTION_INGRESS) {
        Some(sel) => {
            count(sel.rule_id, ctx.len());
            // SAFETY: plain helper call; the verdict it returns (TC_ACT_REDIRECT, or
            // TC_ACT_SHOT for bad flags, which we never pass) is handed to the kernel.
            unsafe { bpf_redirect(sel.ifindex, 0) as i32 }
        }
        None => TCX_NEXT,
    }
}

/// Egress classifier, run by cls_bpf in classic (non direct-action) mode with an
/// `act_mirred egress redirect` to one imq device. bpf_redirect cannot be used on
/// egress: it leaves skb_iif unset, so ifb drops local packets and sends forwarded ones
/// back out of their input device (ifb_xmit, ifb_ri_tasklet); mirred sets skb_iif to
/// the egress device first.
///
/// There is one filter per imq device the interface's rules use, all running this
/// program; cls_bpf stores the filter's classid in skb->tc_classid before running it
/// (cls_bpf_classify), and its minor number says which device this filter serves. The
/// program answers "match" (-1: use the filter's classid, then run its mirred action)
/// only when the first matching rule sends the packet to that device.
#[classifier]
pub fn imq_egress(ctx: TcContext) -> i32 {
    // SAFETY: ctx.skb.skb is the context pointer the kernel gave this program.
    let (filter_dev, came_from) = unsafe { ((*ctx.skb.skb).tc_classid & 0xffff, (*ctx.skb.skb).ingress_ifindex) };
    // ifb re-injects with dev_queue_xmit and skb_iif set to itself, and classifiers
    // run again (only actions honour tc_skip_classify). Recognise that second pass
    // first, from this filter's own device entry: one array read, not a rule lookup.
    if came_from != 0 && DEVICES.get(filter_dev).is_some_and(|d| d.ifindex == came_from) {
        return CLS_NO_MATCH;
    }
    match select(&ctx, DIRECTION_EGRESS) {
        // Also covers a packet re-injected by another imq device whose filter comes
        // later: never selected, never counted twice.
        Some(sel) if sel.dev == filter_dev && came_from != sel.ifindex => {
            count(sel.rule_id, ctx.len());
            CLS_MATCH
        }
        _ => CLS_NO_MATCH,
    }
}

/// What the first matching rule decided.
struct Selection {
    /// imq device number and its ifindex.
    dev: u32,
    ifindex: u32,
    rule_id: u32,
}

/// The imq device the packet is selected for, if any.
///
/// Every "no" is deliberate and leaves the packet untouched: not IPv4/IPv6, a header
/// too short to be a real packet, no rules on this hook, no rule matching, or a target
/// device that does not exist (pass unshaped rather than drop, as IMQ did).
#[inline(always)]
fn select(ctx: &TcContext, direction: u32) -> Option<Selection> {
    if !is_ip(ctx) {
        return None;
    }
    // SAFETY: ctx.skb.skb is the context pointer the kernel gave this program.
    let (ifindex, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    let key = HookKey { ifindex, direction };
    // SAFETY: the value is only read, and an update replaces the element instead of
    // writing into it (see RULES).
    let set = unsafe { RULES.get(key) }?;
    let len = set.len as usize;
    for i in 0..MAX_RULES_PER_HOOK {
        if i >= len {
            break;
        }
        let rule = &set.rules[i];
        if mark & rule.mark_mask != rule.mark_value {
            continue;
        }
        let dev = DEVICES.get(rule.dev).copied().unwrap_or_default();
        if dev.ifindex == 0 || dev.flags & DEVICE_DOWN != 0 || !device_exists(ctx, dev.ifindex) {
            return None;
        }
        let dev_ifindex = dev.ifindex;
        return Some(Selection {
            dev: rule.dev,
            ifindex: dev_ifindex,
            rule_id: rule.id,
        });
    }
    None
}

/// Only real IPv4/IPv6 packets are candidates: the Ethernet type says so and the
/// fixed header is present with the right version. ARP, in-band VLAN tags and other
/// frames are never queued. `load` copies through bpf_skb_load_bytes, so a header in
/// a non-linear part is read correctly, and a short packet fails the load.
#[inline(always)]
fn is_ip(ctx: &TcContext) -> bool {
    // Direct access to the linear data: no helper call. The headers are almost always
    // there; when the linear part is shorter than the packet, copy them out instead.
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + IPV6_HLEN <= end {
        // SAFETY: within [data, end), checked just above (IPV6_HLEN >= IPV4_MIN_HLEN).
        let (proto, first) = unsafe {
            (
                u16::from_be(core::ptr::read_unaligned((data + 12) as *const u16)),
                *((data + ETH_HLEN) as *const u8),
            )
        };
        return ip_header_complete(ctx, proto, first, end - data);
    }
    let (Ok(proto), Ok(first)) = (ctx.load::<u16>(12), ctx.load::<u8>(ETH_HLEN)) else {
        return false;
    };
    ip_header_complete(ctx, u16::from_be(proto), first, ctx.len() as usize)
}

/// `linear`: bytes readable directly; more may be in the packet (skb->len).
#[inline(always)]
fn ip_header_complete(ctx: &TcContext, proto: u16, first: u8, linear: usize) -> bool {
    let (version, need) = match proto {
        // The whole header as IHL declares it, options included.
        ETH_P_IP => (4, usize::from(first & 0xf) * 4),
        ETH_P_IPV6 => (6, IPV6_HLEN),
        _ => return false,
    };
    if first >> 4 != version || need < IPV4_MIN_HLEN {
        return false;
    }
    ETH_HLEN + need <= linear || ctx.load::<u8>(ETH_HLEN + need - 1).is_ok()
}

/// A deleted imq device must not blackhole traffic: bpf_redirect to a missing ifindex
/// would drop the packet in skb_do_redirect. bpf_check_mtu looks the device up in the
/// packet's namespace and fails with -EINVAL when there is none.
#[inline(always)]
fn device_exists(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu_len: u32 = 0;
    // SAFETY: the context pointer and a valid stack slot for mtu_len.
    let ret = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &mut mtu_len, 0, 0) };
    ret >= 0
}

#[inline(always)]
fn count(id: u32, len: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

// Load-time constants (set by imqctl from SO_NETNS_COOKIE and the running kernel's
// BTF): the network namespace this instance serves, and where struct net_device and
// struct net keep what the hooks below read. Without CO-RE in Rust, offsets come in
// this way.
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;
#[unsafe(no_mangle)]
static OFFSET_DEV_IFINDEX: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_DEV_NET: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_NET_COOKIE: u32 = 0;

/// ifb's ndo_open: an imq device came up.
#[fentry(function = "ifb_open")]
pub fn imq_ifb_open(ctx: FEntryContext) -> u32 {
    track_device(&ctx, true);
    0
}

/// ifb's ndo_stop: an imq device went down (also on its way to deletion).
#[fentry(function = "ifb_close")]
pub fn imq_ifb_close(ctx: FEntryContext) -> u32 {
    track_device(&ctx, false);
    0
}

#[inline(always)]
fn track_device(ctx: &FEntryContext, up: bool) {
    // SAFETY: constants are read as the loader left them.
    let (cookie, off_ifindex, off_net, off_cookie) = unsafe {
        (
            core::ptr::read_volatile(&NETNS_COOKIE),
            core::ptr::read_volatile(&OFFSET_DEV_IFINDEX) as usize,
            core::ptr::read_volatile(&OFFSET_DEV_NET) as usize,
            core::ptr::read_volatile(&OFFSET_NET_COOKIE) as usize,
        )
    };
    if cookie == 0 || off_ifindex == 0 {
        return;
    }
    let dev: *const u8 = ctx.arg(0);
    // SAFETY: bpf_probe_read_kernel checks the addresses; dev is the hooked
    // function's struct net_device *.
    let read = || unsafe {
        let net = bpf_probe_read_kernel(dev.add(off_net).cast::<*const u8>()).ok()?;
        let dev_cookie = bpf_probe_read_kernel(net.add(off_cookie).cast::<u64>()).ok()?;
        let ifindex = bpf_probe_read_kernel(dev.add(off_ifindex).cast::<u32>()).ok()?;
        Some((dev_cookie, ifindex))
    };
    // Each namespace's imq state has its own instance: only its devices count.
    let Some((dev_cookie, ifindex)) = read() else {
        return;
    };
    if dev_cookie != cookie {
        return;
    }
    // Device up/down is rare: a scan of the device table is fine here and keeps the
    // per-packet path to the one lookup it already makes.
    for n in 0..MAX_DEVICES {
        if let Some(d) = DEVICES.get_ptr_mut(n) {
            // SAFETY: array element; racing writers only ever store whole flag words.
            unsafe {
                if (*d).ifindex == ifindex {
                    (*d).flags = if up {
                        (*d).flags & !DEVICE_DOWN
                    } else {
                        (*d).flags | DEVICE_DOWN
                    };
                }
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
