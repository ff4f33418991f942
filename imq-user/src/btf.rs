//! Just enough of a BTF reader to find where a kernel struct keeps a member.
//!
//! The eBPF side is Rust without CO-RE relocations, so the few kernel struct offsets
//! it needs (to follow a `struct net_device *` in the device up/down hooks) are read
//! here from the running kernel's BTF and handed to it as load-time constants.
//! Format: Documentation/bpf/btf.rst.

use std::collections::HashMap;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug)]
enum Type {
    Composite {
        members: Vec<Member>,
    },
    /// An enum's values by name (ENUM; ENUM64 is not needed here).
    Enum {
        values: Vec<(String, i64)>,
    },
    Typedef {
        type_id: u32,
    },
    Other,
}

/// The structs, unions and typedefs of a BTF blob.
pub struct Btf {
    /// Type ids start at 1; index 0 is `void`.
    types: Vec<Type>,
    structs: HashMap<String, u32>,
    enums: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    pub fn from_sys_fs() -> Option<Self> {
        Self::parse(&std::fs::read("/sys/kernel/btf/vmlinux").ok()?)
    }

    /// Parses a little-endian BTF blob; `None` if it is not one.
    pub fn parse(data: &[u8]) -> Option<Self> {
        if u16::from_le_bytes(data.get(0..2)?.try_into().ok()?) != BTF_MAGIC {
            return None;
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_data = data.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
        let strings = data.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
        let name = |off: u32| -> String {
            let s = strings.get(off as usize..).unwrap_or_default();
            let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };

        let mut types = vec![Type::Other];
        let mut structs = HashMap::new();
        let mut enums = HashMap::new();
        let mut at = 0;
        while at < types_data.len() {
            let name_off = u32_at(types_data, at)?;
            let info = u32_at(types_data, at + 4)?;
            let size_or_type = u32_at(types_data, at + 8)?;
            let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
            at += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(types_data, m + 8)?;
                        members.push(Member {
                            name: name(u32_at(types_data, m)?),
                            type_id: u32_at(types_data, m + 4)?,
                            // With kind_flag the top 8 bits are a bitfield size.
                            bit_offset: if kind_flag { offset & 0xff_ffff } else { offset },
                        });
                    }
                    at += vlen * 12;
                    let n = name(name_off);
                    if kind == KIND_STRUCT && !n.is_empty() {
                        structs.entry(n.clone()).or_insert(types.len() as u32);
                    }
                    Type::Composite { members }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let v = at + i * 8;
                        let raw = u32_at(types_data, v + 4)?;
                        // kind_flag: signed values.
                        let value = if kind_flag {
                            i64::from(raw as i32)
                        } else {
                            i64::from(raw)
                        };
                        values.push((name(u32_at(types_data, v)?), value));
                    }
                    at += vlen * 8;
                    let n = name(name_off);
                    if !n.is_empty() {
                        enums.entry(n).or_insert(types.len() as u32);
                    }
                    Type::Enum { values }
                }
                KIND_TYPEDEF => Type::Typedef { type_id: size_or_type },
                _ => {
                    at += match kind {
                        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                        KIND_ARRAY => 12,
                        KIND_FUNC_PROTO => vlen * 8,
                        KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                        _ => 0,
                    };
                    Type::Other
                }
            };
            types.push(ty);
        }
        Some(Self { types, structs, enums })
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        // Typedefs of typedefs are possible; a bound keeps a corrupt blob from looping.
        for _ in 0..16 {
            match self.types.get(id as usize)? {
                Type::Typedef { type_id } => id = *type_id,
                t => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `path` (member names, each in the previous one's struct) inside
    /// `struct name`, e.g. `("net_device", &["nd_net", "net"])`.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Option<u32> {
        let mut id = *self.structs.get(name)?;
        let mut bits = 0;
        for member in path {
            let Type::Composite { members } = self.resolve(id)? else {
                return None;
            };
            let m = members.iter().find(|m| m.name == *member)?;
            bits += m.bit_offset;
            id = m.type_id;
        }
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The value of `variant` in `enum name`, e.g. `("netdev_cmd", "NETDEV_UP")`:
    /// enum values move between kernel versions.
    pub fn enum_value(&self, name: &str, variant: &str) -> Option<i64> {
        let Type::Enum { values } = self.types.get(*self.enums.get(name)? as usize)? else {
            return None;
        };
        values.iter().find(|(n, _)| n == variant).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct inner { int a; int b; }`, `typedef struct inner inner_t;`,
    /// `struct outer { char pad[8]; inner_t in; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0inner_t\0outer\0pad\0in\0cmd\0UP\0DOWN\0";
        let s = |name: &str| -> u32 {
            let needle = [name.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_slice())
                .unwrap() as u32
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| t.extend_from_slice(&w.to_le_bytes()));
        push(&[s("int"), KIND_INT << 24, 4, 32]); // 1: int
        push(&[s("inner"), KIND_STRUCT << 24 | 2, 8]); // 2: struct inner
        push(&[s("a"), 1, 0]);
        push(&[s("b"), 1, 32]);
        push(&[s("inner_t"), KIND_TYPEDEF << 24, 2]); // 3: typedef
        push(&[0, KIND_ARRAY << 24, 0]); // 4: int[2]
        push(&[1, 1, 2]);
        push(&[s("outer"), KIND_STRUCT << 24 | 2, 16]); // 5: struct outer
        push(&[s("pad"), 4, 0]);
        push(&[s("in"), 3, 64]);
        push(&[s("cmd"), KIND_ENUM << 24 | 2, 4]); // 6: enum cmd { UP = 1, DOWN = 9 }
        push(&[s("UP"), 1]);
        push(&[s("DOWN"), 9]);
        let mut b = Vec::new();
        b.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn member_offsets_through_typedefs_and_enum_values() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset_of("inner", &["b"]), Some(4));
        assert_eq!(btf.offset_of("outer", &["in"]), Some(8));
        assert_eq!(btf.offset_of("outer", &["in", "b"]), Some(12));
        assert_eq!(btf.offset_of("outer", &["nope"]), None);
        assert_eq!(btf.offset_of("missing", &["a"]), None);
        assert_eq!(btf.enum_value("cmd", "UP"), Some(1));
        assert_eq!(btf.enum_value("cmd", "DOWN"), Some(9));
        assert_eq!(btf.enum_value("cmd", "GONE"), None);
        assert!(Btf::parse(b"not btf at all, no").is_none());
    }

    #[test]
    fn running_kernel_has_the_offsets_and_values_imq_needs() {
        let Some(btf) = Btf::from_sys_fs() else {
            panic!("/sys/kernel/btf/vmlinux missing or unreadable");
        };
        let offsets = [
            ("net_device", &["ifindex"][..]),
            ("net_device", &["nd_net", "net"]),
            ("net", &["net_cookie"]),
            ("net", &["ns", "inum"]),
            ("netdev_notifier_info", &["dev"]),
        ];
        for (name, path) in offsets {
            let off = btf.offset_of(name, path);
            assert!(off.is_some(), "struct {name}: no {path:?}");
        }
        let events: Vec<i64> = ["NETDEV_UP", "NETDEV_DOWN", "NETDEV_GOING_DOWN"]
            .iter()
            .map(|e| btf.enum_value("netdev_cmd", e).unwrap_or_else(|| panic!("no {e}")))
            .collect();
        assert_eq!(events[0], 1, "NETDEV_UP has been 1 since Linux 2.6");
        assert!(events[1] != events[2] && events.iter().all(|&v| v > 0), "{events:?}");
    }
}
