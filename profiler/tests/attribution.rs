//! `record --attribute vm` end to end, on real concurrent libvirt boots
//! (`./x massboot`: 8 TCG guests from 8 client threads, windows of 4):
//! each window holds exactly the work of its VMs whatever their timing, and
//! CI gates over three runs a side neither flap on identical boots nor miss
//! a regression injected with a libvirt `qemu` hook. Needs root and
//! Debian's package mirrors (massboot installs libvirt and QEMU if they are
//! missing).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use profiler::{
    profile::Profile,
    windows::{Attribution, UNATTRIBUTED},
};

mod common;
use common::massboot;

const HOOK: &str = "/etc/libvirt/hooks/qemu";
const WINDOW: u64 = 4;

/// Removes massboot's hook if it is still there when the test ends, however
/// it ends (massboot removes it itself on every path it takes).
struct HookGone;

impl Drop for HookGone {
    fn drop(&mut self) {
        if std::fs::read_to_string(HOOK).is_ok_and(|s| s.contains("hvprof's ./x massboot")) {
            let _ = std::fs::remove_file(HOOK);
        }
    }
}

/// One boot, recorded with `--attribute vm`, with massboot's qemu hook
/// sleeping `sleep_ms` whenever it runs for guests 5-8 (0: it runs for
/// every guest and sleeps for none).
fn boot(dir: &Path, sleep_ms: u64) -> Profile {
    let _ = std::fs::remove_dir_all(dir);
    let sleep_ms = sleep_ms.to_string();
    massboot(
        &[
            "--vms",
            "8",
            "--threads",
            "8",
            "--window-size",
            "4",
            "--accel",
            "tcg",
            // Client thread k starts k * 40 ms late: still 8 creations at
            // once (each takes seconds), with the hook's guests mostly last.
            "--start-gap",
            "40",
            "--qemu-hook-sleep",
            &sleep_ms,
            "--qemu-hook-guests",
            "5-8",
            // Then each guest's client asks for its info: a call on the
            // running domain, which names it.
            "--get-info",
            "--hvprof-arg=--attribute=vm",
        ],
        Some(dir),
    );
    assert!(!Path::new(HOOK).exists(), "massboot left its hook behind");
    Profile::read(&dir.join("profile.hvprof")).unwrap()
}

fn window_of(ordinal: u64) -> u32 {
    u32::try_from((ordinal - 1) / WINDOW + 1).unwrap()
}

/// What each window of VMs holds that the test counts: libvirtd's forks
/// under `virFork`, the cgroup directories libvirtd made, the QEMU
/// processes forked in it.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    vir_forks: u64,
    mkdirs: u64,
    qemus: usize,
    /// Runs of the qemu hook (libvirtd runs it at each guest's preparation,
    /// start and end of start).
    hooks: usize,
    /// libvirt's calls that started a VM, and that asked for a VM's info.
    creates: u64,
    infos: u64,
}

/// Every piece of work that names its VM is in that VM's window, and the
/// windows' counts; panics (naming the run) where one is not.
fn attributed_per_vm(p: &Profile, run: &str) -> BTreeMap<u32, Counts> {
    assert_eq!(p.meta.attribute, Attribution::Vm, "{run}");
    let ids: Vec<u32> = p.windows.iter().map(|w| w.id).collect();
    assert_eq!(
        ids,
        [1, 2, UNATTRIBUTED, UNATTRIBUTED | 1, UNATTRIBUTED | 2],
        "{run}"
    );
    assert_eq!(p.vms.len(), 8, "{run}: {:#?}", p.vms);
    let libvirtd: u32 = p.meta.target.strip_prefix("pid ").unwrap().parse().unwrap();
    let mut mkdirs_per_vm = Vec::new();
    for vm in &p.vms {
        let w = window_of(vm.ordinal);
        let name = vm.name.clone().unwrap();
        // The cgroups libvirt makes for a guest name it: all of them (the
        // ground truth, whenever they were made) are in its VM's window.
        let tag = format!("-{name}.libvirt-qemu");
        let ops: Vec<_> = p.cgroups.iter().filter(|c| c.path.contains(&tag)).collect();
        let mkdirs: u64 = ops
            .iter()
            .filter(|c| c.op == "mkdir")
            .map(|c| c.count)
            .sum();
        assert!(mkdirs > 0, "{run}: no cgroup of {name}");
        for c in &ops {
            assert_eq!(c.window, w, "{run}: {name} (VM {}): {c:?}", vm.ordinal);
        }
        mkdirs_per_vm.push(mkdirs);
        // Its QEMU: forked and exec'd in its window, and every sample and
        // block of it there.
        let qemu = p.processes.iter().find(|q| q.tgid == vm.pid).unwrap();
        assert_eq!(
            (qemu.fork_window, qemu.exec_window),
            (Some(w), Some(w)),
            "{run}: {name}'s QEMU {qemu:?}"
        );
        assert!(
            p.oncpu
                .iter()
                .filter(|r| r.tgid == vm.pid)
                .all(|r| r.window == w)
                && p.offcpu
                    .iter()
                    .filter(|r| r.tgid == vm.pid)
                    .all(|r| r.window == w),
            "{run}: {name}'s QEMU has rows outside window {w}"
        );
        // The hook runs libvirtd forked for it (their command line, when
        // read before they exited, names the guest): in its window too.
        for h in p.processes.iter().filter(|q| {
            q.cmdline
                .as_deref()
                .is_some_and(|c| c.contains(&format!("hooks/qemu {name} ")))
        }) {
            assert_eq!(h.fork_window, Some(w), "{run}: {name}'s hook {h:?}");
        }
    }
    // Every run of the hook (a process named after it) is some VM's.
    let hooks: Vec<_> = p.processes.iter().filter(|q| q.comm == "qemu").collect();
    assert!(
        hooks.iter().all(|h| matches!(h.fork_window, Some(1 | 2))),
        "{run}: {hooks:#?}"
    );
    // libvirt makes the same cgroups for every guest.
    assert!(
        mkdirs_per_vm.iter().all(|&n| n == mkdirs_per_vm[0]),
        "{run}: {mkdirs_per_vm:?}"
    );
    let counts: BTreeMap<u32, Counts> = [1, 2]
        .into_iter()
        .map(|w| (w, window_counts(p, libvirtd, w)))
        .collect();
    // The windows hold 4 VMs each: the same counts.
    assert_eq!(counts[&1], counts[&2], "{run}");
    assert_eq!(counts[&1].qemus, 4, "{run}");
    assert_eq!(counts[&1].hooks, 4 * 3, "{run}");
    assert_eq!((counts[&1].creates, counts[&1].infos), (4, 4), "{run}");
    assert_eq!(counts[&1].mkdirs, 4 * mkdirs_per_vm[0], "{run}");
    assert!(counts[&1].vir_forks >= 4, "{run}: {counts:?}");
    counts
}

/// What window `w` holds that the test counts.
fn window_counts(p: &Profile, libvirtd: u32, w: u32) -> Counts {
    let vir_forks = p
        .forks
        .iter()
        .filter(|f| {
            f.window == w
                && f.tgid == libvirtd
                && !f.thread
                && f.caller.as_deref() == Some("virFork")
        })
        .map(|f| f.count)
        .sum();
    let mkdirs = p
        .cgroups
        .iter()
        .filter(|c| c.window == w && c.op == "mkdir")
        .map(|c| c.count)
        .sum();
    let calls = |name: &str| -> u64 {
        p.libvirt
            .iter()
            .filter(|c| c.window == w && c.kind == "api" && c.name == name)
            .map(|c| c.calls)
            .sum()
    };
    let forked_here = |comm: &str| {
        p.processes
            .iter()
            .filter(|q| q.comm == comm && q.fork_window == Some(w))
            .count()
    };
    Counts {
        vir_forks,
        mkdirs,
        qemus: forked_here("qemu-system-x86"),
        hooks: forked_here("qemu"),
        creates: calls("DomainCreateXML"),
        infos: calls("DomainGetInfo"),
    }
}

/// `hvprof diff A... --vs B...` with the CI gates: its exit code, its text
/// and the windows (ids) where a gate failed, by gate.
fn diff(a: &[PathBuf], b: &[PathBuf], out: &Path) -> (Option<i32>, String, Vec<Vec<u64>>) {
    let run = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .arg("diff")
        .args(a)
        .arg("--vs")
        .args(b)
        .arg("-o")
        .arg(out)
        .args([
            "--fail-on",
            "regression>10%",
            "--fail-on",
            "window:1.offcpu:virHookCall>10%",
            "--fail-on",
            "window:2.offcpu:virHookCall>10%",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("diff.json")).unwrap()).unwrap();
    let failed = j["gates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            g["violations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["window"].as_u64().unwrap())
                .collect()
        })
        .collect();
    if let Some(gates) = text.find("\ngates:") {
        eprintln!("{}", &text[gates..]);
    }
    (run.status.code(), text, failed)
}

#[test]
fn concurrent_boots_are_attributed_per_vm_and_their_gates_do_not_flap() {
    let _hook_gone = HookGone;
    let root = std::env::temp_dir().join(format!("hvprof-attribution-{}", std::process::id()));
    let runs = |side: &str, sleep_ms: u64| -> Vec<PathBuf> {
        (1..=3)
            .map(|i| {
                let dir = root.join(format!("{side}{i}"));
                let p = boot(&dir, sleep_ms);
                let counts = attributed_per_vm(&p, &format!("{side}{i}"));
                eprintln!("{side}{i}: {counts:?}");
                dir
            })
            .collect()
    };
    // Three identical boots, three more, and three whose hook sleeps 50 ms
    // each of the three times it runs for guests 5-8.
    let same = runs("same", 0);
    let base = runs("base", 0);
    let slow = runs("slow", 50);
    // The counts of the windows are the same in every run: libvirt's work
    // for a guest does not change with the hook's sleep.
    let counts: Vec<BTreeMap<u32, Counts>> = same
        .iter()
        .chain(&base)
        .chain(&slow)
        .map(|d| attributed_per_vm(&Profile::read(&d.join("profile.hvprof")).unwrap(), "again"))
        .collect();
    assert!(counts.iter().all(|c| *c == counts[0]), "{counts:#?}");

    let (code, text, failed) = diff(&same, &base, &root.join("same-vs-base"));
    assert_eq!(code, Some(0), "identical boots failed a gate:\n{text}");
    assert!(failed.iter().all(Vec::is_empty), "{text}");

    let (code, text, failed) = diff(&base, &slow, &root.join("base-vs-slow"));
    assert_eq!(code, Some(3), "the hook's sleep passed the gates:\n{text}");
    // Off-CPU time under the hook's runs (virHookCall: libvirtd's fork,
    // exec and wait) grew in window 2, the hook's guests' window, and not in
    // window 1; so did the forks (the hook's sleeps), and nothing of window
    // 1 moved.
    assert_eq!(failed[2], [2], "{text}");
    assert!(failed[1].is_empty(), "{text}");
    assert!(
        !failed[0].is_empty() && failed[0].iter().all(|&w| w == 2),
        "{text}"
    );
    assert!(
        text.contains("window 2 (VMs 5\u{2013}8): offcpu virHookCall"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
