//! Link options of the binary that Cargo.toml's profile cannot express.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=linker/no-unwind-tables.ld");
    println!("cargo::rustc-check-cfg=cfg(no_unwind_tables)");
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
    // Unwind tables (.eh_frame, about 600 KiB of the stripped device binary): with fat LTO the
    // standard library's debug info makes LLVM emit them for every function, and
    // `-C force-unwind-tables=no` cannot take them away. The release profile aborts on panic,
    // so nothing unwinds: the release binary is linked without them. Cargo builds every binary
    // of the release profile (also for `cargo bench` and `cargo test --release`) with that
    // profile's panic strategy; src/main.rs refuses to compile should it ever be `unwind`.
    if os == "linux" && std::env::var("PROFILE").as_deref() == Ok("release") {
        let script = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("linker/no-unwind-tables.ld");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
        println!("cargo:rustc-cfg=no_unwind_tables");
    }
}
