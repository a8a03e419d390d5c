use which::which;

/// Rebuild the eBPF object when the linker changes (a new LLVM can change the
/// output), as the aya template does.
fn main() {
    // The unwinder's global BPF functions stay global (bpf-linker makes
    // every other symbol internal): the verifier then checks each once per
    // program rather than at every call site.
    println!(
        "cargo::rustc-link-arg-bins=--export=hvprof_unwind_walk,hvprof_unwind_return,hvprof_store_stack,hvprof_site_matches"
    );
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
