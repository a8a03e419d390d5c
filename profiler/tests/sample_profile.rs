//! The checked-in profile of a real libvirtd mass boot
//! (`samples/massboot/profile.hvprof`) reads and renders without root.

use std::path::Path;

use profiler::{profile::Profile, render};

fn sample() -> Profile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/massboot/profile.hvprof");
    Profile::read(&path).expect("the checked-in sample profile reads")
}

#[test]
fn sample_profile_has_the_boot_it_recorded() {
    let p = sample();
    assert_eq!(p.vms.len(), 14);
    assert!(
        p.vms
            .iter()
            .all(|v| v.comm == "qemu-system-x86" && v.name.is_some())
    );
    assert_eq!(p.windows.len(), 5);
    assert!(p.oncpu.iter().any(|r| r.comm == "rpc-libvirtd"));
    assert!(p.offcpu.iter().any(|r| r.comm == "rpc-libvirtd"));
    assert!(p.losses.is_empty(), "{:?}", p.losses);
    // Every tracer's data is there: per-VM cgroups, libvirtd's forks, locks.
    let mkdirs: u64 = profiler::tables::cgroups(&p, None)
        .iter()
        .filter(|r| {
            r.op == "mkdir" && r.hierarchy == "v2" && r.path == "/machine/qemu-*.libvirt-qemu"
        })
        .map(|r| r.count)
        .sum();
    assert_eq!(mkdirs, 14);
    assert!(
        p.forks
            .iter()
            .any(|f| f.comm == "rpc-libvirtd" && !f.thread)
    );
    assert!(!p.locks.is_empty(), "no lock waits in the sample");
    // Every window has on-CPU samples, and the folded stacks are well formed.
    for w in &p.windows {
        let lines = profiler::graphs::ONCPU.folded(&p, w.id);
        assert!(!lines.is_empty(), "window {}", w.id);
        for l in lines
            .iter()
            .chain(profiler::graphs::OFFCPU.folded(&p, w.id).iter())
        {
            let (stack, count) = l.rsplit_once(' ').unwrap();
            assert!(count.parse::<u64>().unwrap() > 0, "{l}");
            assert!(!stack.is_empty() && !stack.contains('\n'), "{l}");
        }
    }
}

#[test]
fn sample_profile_renders_every_output() {
    let p = sample();
    let dir = std::env::temp_dir().join(format!("hvprof-sample-render-{}", std::process::id()));
    let summary = render::write_all(&p, &dir).unwrap();
    assert_eq!(summary.vms_created, 14);
    for w in &p.windows {
        for f in ["oncpu.folded", "offcpu.folded", "oncpu.svg", "offcpu.svg"] {
            assert!(
                dir.join(w.dir_name()).join(f).is_file(),
                "{} {f}",
                w.dir_name()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
