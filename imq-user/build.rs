//! Builds imq-ebpf for the BPF target (nightly, build-std=core, bpf-linker) so that
//! imqctl embeds the object and needs nothing installed beside it.
//! `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../imq-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "imq-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
