//! Types shared by the imq TC programs and the control plane.
//!
//! Everything here is `#[repr(C)]`, free of padding and of fixed size, because it is
//! the byte layout of BPF map keys and values. Sizes are asserted at compile time so
//! that a change on one side cannot silently disagree with the other.
#![no_std]

/// Rules per (interface, direction). The data path walks at most this many entries,
/// a bound the verifier can see.
pub const MAX_RULES_PER_HOOK: usize = 32;

/// imq devices are named `imq0` .. `imq{MAX_DEVICES - 1}`; the number indexes
/// [`DEVICES_MAP`].
pub const MAX_DEVICES: u32 = 256;

/// Counter slots: one per rule, allocated by the control plane.
pub const MAX_RULE_IDS: u32 = 4096;

/// (interface, direction) pairs that can carry rules.
pub const MAX_HOOKS: u32 = 1024;

/// Map names, as the ELF declares them and as they are pinned.
pub const RULES_MAP: &str = "imq_rules";
pub const DEVICES_MAP: &str = "imq_devices";
pub const COUNTERS_MAP: &str = "imq_counters";

/// Program names in the ELF.
pub const INGRESS_PROG: &str = "imq_ingress";
pub const EGRESS_PROG: &str = "imq_egress";
pub const IFB_OPEN_PROG: &str = "imq_ifb_open";
pub const IFB_CLOSE_PROG: &str = "imq_ifb_close";

pub const DIRECTION_INGRESS: u32 = 0;
pub const DIRECTION_EGRESS: u32 = 1;

/// Key of [`RULES_MAP`]: the hook a rule set belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HookKey {
    pub ifindex: u32,
    /// [`DIRECTION_INGRESS`] or [`DIRECTION_EGRESS`].
    pub direction: u32,
}

/// One selection rule. A packet matches when `(skb->mark & mark_mask) == mark_value`;
/// a rule without a mark has both at zero and matches every IPv4/IPv6 packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rule {
    pub mark_value: u32,
    pub mark_mask: u32,
    /// imq device number: the packet goes to `imq{dev}`, resolved through [`DEVICES_MAP`].
    pub dev: u32,
    /// Counter slot in [`COUNTERS_MAP`].
    pub id: u32,
    /// User-visible order; rules are stored sorted by it.
    pub prio: u32,
    /// Reserved, zero.
    pub flags: u32,
}

/// Value of [`RULES_MAP`]: the ordered rules of one hook. The control plane replaces
/// the whole value in one map update, so the data path sees either the old or the new
/// set, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub len: u32,
    pub _reserved: u32,
    pub rules: [Rule; MAX_RULES_PER_HOOK],
}

impl RuleSet {
    pub const fn empty() -> Self {
        Self {
            len: 0,
            _reserved: 0,
            rules: [Rule {
                mark_value: 0,
                mark_mask: 0,
                dev: 0,
                id: 0,
                prio: 0,
                flags: 0,
            }; MAX_RULES_PER_HOOK],
        }
    }

    /// The rules in use.
    pub fn as_slice(&self) -> &[Rule] {
        let len = (self.len as usize).min(MAX_RULES_PER_HOOK);
        &self.rules[..len]
    }
}

/// Value of [`DEVICES_MAP`], indexed by device number. `ifindex == 0`: no such device;
/// [`DEVICE_DOWN`] set: the device is down. Either way selected packets pass unshaped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Device {
    pub ifindex: u32,
    pub flags: u32,
}

/// [`Device::flags`]: the device is down; a redirect into it would be dropped.
pub const DEVICE_DOWN: u32 = 1;

/// Value of the per-CPU [`COUNTERS_MAP`]: what a rule sent to its imq device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = {
    assert!(core::mem::size_of::<HookKey>() == 8);
    assert!(core::mem::size_of::<Rule>() == 24);
    assert!(core::mem::size_of::<RuleSet>() == 8 + 24 * MAX_RULES_PER_HOOK);
    assert!(core::mem::size_of::<Device>() == 8);
    assert!(core::mem::size_of::<Counters>() == 16);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers, without padding
    // (sizes asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::HookKey {}
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::RuleSet {}
    unsafe impl aya::Pod for super::Device {}
    unsafe impl aya::Pod for super::Counters {}
}
