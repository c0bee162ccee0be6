//! Link options of the binary that Cargo.toml's profile cannot express.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    // The binary is a PIE, and most of its relocations are relative ones: as RELR (a bitmap per
    // 63 words instead of 24 bytes per relocation) they take 2 KiB instead of about 200 KiB, with
    // PIE, RELRO and BIND_NOW unchanged. The loader must know DT_RELR: glibc 2.36 or newer (the
    // binary then needs GLIBC_ABI_DT_RELR and a too old glibc refuses it at start, naming that
    // version); every Yocto release with the Rust 1.89 this crate needs has a newer glibc. Not
    // for musl, whose loader only knows RELR since 1.2.4 and would ignore it silently before.
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
