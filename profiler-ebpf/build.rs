use which::which;

/// Rebuild the eBPF object when the linker changes (a new LLVM can change the
/// output), as the aya template does.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
