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
    // Identical code folding: functions whose machine code came out the same (generic copies
    // that differ only in a type the code never looks at, drop glue, small trait shims) are
    // kept once: 35 KiB less of the stripped device binary. Only lld has `--icf`; it is what
    // rustc links x86_64-unknown-linux-gnu with from Rust 1.90 on (its own rust-lld through
    // cc), unless told otherwise. Any other target (Yocto's own, aarch64), an older rustc, a
    // configured linker or linker flags in RUSTFLAGS keep the link as it is: GNU ld would
    // refuse the option.
    if std::env::var("PROFILE").as_deref() == Ok("release") && links_with_rust_lld() {
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
    }
}

/// Whether rustc links this build with its self-contained lld: its default for
/// x86_64-unknown-linux-gnu since 1.90, when neither a linker nor linker options were chosen.
fn links_with_rust_lld() -> bool {
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if std::env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
        || std::env::var_os("RUSTC_LINKER").is_some()
    {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if ["linker", "link-self-contained", "fuse-ld"]
        .iter()
        .any(|option| flags.contains(option))
    {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let minor = text
        .lines()
        .find_map(|line| line.strip_prefix("release: 1."))
        .and_then(|rest| rest.split('.').next())
        .and_then(|minor| minor.parse::<u32>().ok());
    minor.is_some_and(|minor| minor >= 90)
}
