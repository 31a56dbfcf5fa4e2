//! Link options of the `sidemesh` binary.
//!
//! - The binary stays position-independent (ASLR), but its relative relocations are packed
//!   (`DT_RELR`, `-z pack-relative-relocs`, glibc ≥ 2.36 and binutils ≥ 2.38): the loader
//!   then reads about 16 KiB of relocations at start instead of the ~1 MiB `.rela.dyn`,
//!   which a sidecar otherwise kept resident (idle RSS 13.7 → 12.9 MiB, measured with
//!   `/proc/PID/smaps`). Set `SIDEMESH_NO_RELR=1` to link without it on an older toolchain.
//! - Release builds place the functions a sidecar runs (start, idle, the request paths)
//!   side by side at the front of `.text`, in the order of `link/symbol-order.txt`
//!   (lld's `--symbol-ordering-file`; lld is Rust's default linker on x86_64 Linux since
//!   1.90). The kernel maps code in 64 KiB windows around each page a process touches, so
//!   with the ~2.7 MB of executed code spread over the 16 MB `.text` a sidecar kept
//!   9.7 MiB of code resident; packed, it keeps about what it runs. Names missing from the
//!   binary are skipped (the list only loses effect as code changes; regenerate it with
//!   `scripts/symbol-order.sh`). Set `SIDEMESH_NO_SYMBOL_ORDER=1` to link without it
//!   (another linker than lld).

fn main() {
    println!("cargo:rerun-if-env-changed=SIDEMESH_NO_RELR");
    println!("cargo:rerun-if-env-changed=SIDEMESH_NO_SYMBOL_ORDER");
    println!("cargo:rerun-if-changed=link/symbol-order.txt");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    if os == "linux" && env == "gnu" && std::env::var_os("SIDEMESH_NO_RELR").is_none() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if os == "linux"
        && env == "gnu"
        && arch == "x86_64"
        && release
        && std::env::var_os("SIDEMESH_NO_SYMBOL_ORDER").is_none()
    {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
        let order = std::path::Path::new(&dir).join("link/symbol-order.txt");
        if order.is_file() {
            println!(
                "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
                order.display()
            );
            println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        }
    }
}
