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

/// The checked-in 50-guest boots under Debian's libvirt 9.0 and 11.3
/// (`samples/libvirt-versions`): each has every guest's `DomainCreateXML`
/// and `qmp_capabilities`, and `hvprof diff` of the two shows the libvirt
/// tables' deltas, as the checked-in `diff.txt` does.
#[test]
fn libvirt_version_samples_diff() {
    use profiler::profile::LibvirtCall;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/libvirt-versions");
    for v in ["9.0", "11.3"] {
        let p = Profile::read(&dir.join(format!("libvirt-{v}.hvprof"))).unwrap();
        let count = |kind: &str, name: &str| -> u64 {
            p.libvirt
                .iter()
                .filter(|r| r.kind == kind && r.name == name && r.status == LibvirtCall::OK)
                .map(|r| r.calls)
                .sum()
        };
        assert_eq!(count(LibvirtCall::API, "DomainCreateXML"), 50, "{v}");
        assert_eq!(count(LibvirtCall::QMP, "qmp_capabilities"), 50, "{v}");
    }
    let out = std::env::temp_dir().join(format!("hvprof-versions-diff-{}", std::process::id()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .arg("diff")
        .arg(dir.join("libvirt-9.0.hvprof"))
        .arg(dir.join("libvirt-11.3.hvprof"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(out.join("diff.txt")).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    for want in ["libvirt API time", "QMP time", "DomainCreateXML", "qom-get"] {
        assert!(text.contains(want), "diff.txt has no {want}");
    }
    let checked_in = std::fs::read_to_string(dir.join("diff.txt")).unwrap();
    // The same diff but for the paths of the profiles in its heading.
    let body = |t: &str| t.lines().skip(3).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&text), body(&checked_in));
}
