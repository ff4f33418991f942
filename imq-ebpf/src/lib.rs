//! Exists so that imq-user can name this package as a build-dependency (cargo then
//! rebuilds the embedded object when anything here changes). The programs are in
//! `main.rs`, built for bpfel-unknown-none by imq-user/build.rs.
#![no_std]
