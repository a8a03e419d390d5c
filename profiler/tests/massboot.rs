//! End to end: a real libvirtd mass boot with Debian's libvirt and QEMU,
//! profiled by hvprof (`./x massboot`): 12 TCG guests and 2 paused
//! KVM guests, windows of 4 VMs. Needs root, /dev/kvm and Debian's package
//! mirrors (massboot installs libvirt and QEMU if they are missing).

use std::{collections::BTreeSet, path::Path, process::Command};

use profiler::profile::Profile;

mod common;
use common::{assert_no_losses, massboot};

/// A stack that reaches its thread's entry or main: not cut by the
/// unwinder, and with user frames.
fn is_whole(p: &Profile, stack: &[u32]) -> bool {
    p.frame_names(stack).all(|f| {
        !f.starts_with("[user stack cut") && f != "[missing user stack]" && f != "[unknown]"
    }) && p
        .frame_names(stack)
        .any(|f| !f.ends_with("_[k]") && !f.starts_with('['))
}

#[expect(clippy::cast_precision_loss, reason = "a share")]
fn share(part: u64, all: u64) -> f64 {
    part as f64 / all.max(1) as f64
}

fn live_comm(comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.contains(&format!("({comm})"))
                    && !s
                        .rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
        })
        .collect()
}

#[test]
fn libvirtd_mass_boot_is_profiled_per_window_and_torn_down() {
    // What the teardown must leave is the machine with libvirt installed
    // (installing it writes qemu.conf and adds the libvirt-qemu user).
    install_libvirt();
    let qemu_conf_before = std::fs::read("/etc/libvirt/qemu.conf").ok();
    let user_before = libvirt_qemu_user_exists();
    let dir = std::env::temp_dir().join(format!("hvprof-massboot-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run_massboot(&dir);

    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_every_vm_in_its_window(&p);
    let libvirtd = p
        .meta
        .target
        .strip_prefix("pid ")
        .unwrap()
        .parse::<u32>()
        .unwrap();
    assert_libvirtd_and_its_qemus_are_followed(&p, libvirtd);
    assert_forks_have_their_callers_and_vms_their_cgroups(&p, libvirtd);
    // The kernel lock tracer ran and libvirtd waited on kernel locks.
    assert!(p.meta.tracers.iter().any(|t| t == "locks"));
    // No losses at defaults.
    assert_no_losses(&p);
    assert_user_stacks_are_whole(&p, libvirtd);
    assert_libvirt_calls_match_the_client(&p, &dir, libvirtd);
    assert_nothing_is_left_behind(&dir, qemu_conf_before.as_deref(), user_before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The libvirt tracer, against the client's own figures (`boot.py` times
/// each createXML call, in `massboot.json`): one `DomainCreateXML` per
/// guest (each in the window it began in: the windows add up to the
/// guests), each timed within the client's call; a `ConnectOpen` per
/// client connection; one `qmp_capabilities` per QEMU monitor; `cont` and
/// a `RESUME` event for each guest not started paused.
fn assert_libvirt_calls_match_the_client(p: &Profile, dir: &Path, libvirtd: u32) {
    use profiler::profile::LibvirtCall;
    assert!(p.meta.tracers.iter().any(|t| t == "libvirt"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("massboot.json")).unwrap()).unwrap();
    let client: Vec<f64> = report["boot"]["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["create_s"].as_f64().unwrap())
        .collect();
    assert_eq!(client.len(), 14);
    let rows = |kind: &str, name: &str| -> Vec<&LibvirtCall> {
        p.libvirt
            .iter()
            .filter(|r| r.kind == kind && r.name == name)
            .collect()
    };
    let sum = |rows: &[&LibvirtCall], f: fn(&LibvirtCall) -> u64| -> u64 {
        rows.iter().map(|r| f(r)).sum()
    };
    let create = rows(LibvirtCall::API, "DomainCreateXML");
    assert!(
        create
            .iter()
            .all(|r| r.tgid == libvirtd && r.status == LibvirtCall::OK),
        "{create:#?}"
    );
    assert_eq!(sum(&create, |r| r.calls), 14, "{create:#?}");
    // libvirtd's time for a call is within the client's (which adds the
    // RPC's transport), and most of it.
    let client_total: f64 = client.iter().sum();
    let client_max = client.iter().copied().fold(0.0, f64::max);
    #[expect(clippy::cast_precision_loss, reason = "seconds")]
    let (total, max) = (
        sum(&create, |r| r.total_ns) as f64 / 1e9,
        create.iter().map(|r| r.max_ns).max().unwrap() as f64 / 1e9,
    );
    assert!(
        total <= client_total && total >= 0.9 * client_total,
        "DomainCreateXML: {total:.3} s in libvirtd, {client_total:.3} s at the client"
    );
    assert!(
        max <= client_max && max >= 0.9 * client_max,
        "DomainCreateXML max: {max:.3} s in libvirtd, {client_max:.3} s at the client"
    );
    // Every call took time (none in the histogram's first bucket, < 2 ns).
    assert!(
        create
            .iter()
            .all(|r| r.hist.first().is_none_or(|&n| n == 0))
    );
    let count = |kind, name| sum(&rows(kind, name), |r| r.calls);
    // boot.py's four client threads open a connection each, and the job
    // contention's three clients one each (massboot's own `virsh` calls
    // come before the recording and after it).
    assert_eq!(count(LibvirtCall::API, "ConnectOpen"), 4 + 3);
    assert_eq!(count(LibvirtCall::QMP, "qmp_capabilities"), 14);
    assert_eq!(count(LibvirtCall::QMP, "cont"), 12);
    assert_eq!(count(LibvirtCall::EVENT, "RESUME"), 12);
    // The job contention's suspends: one failed.
    let suspend = rows(LibvirtCall::API, "DomainSuspend");
    assert_eq!(sum(&suspend, |r| r.calls), 2, "{suspend:#?}");
    let failed: u64 = suspend
        .iter()
        .filter(|r| r.status == LibvirtCall::ERROR)
        .map(|r| r.calls)
        .sum();
    assert_eq!(failed, 1, "{suspend:#?}");
    assert!(
        p.libvirt
            .iter()
            .filter(|r| r.kind != LibvirtCall::EVENT && r.name != "DomainSuspend")
            .all(|r| r.status != LibvirtCall::ERROR),
        "an error in a clean boot"
    );
    assert_job_waits_match_the_clients(p, &report["job_contention"]);
}

/// The domain job held on purpose (`--job-contention 32`): the first
/// suspend waits from 0.5 s and times out after libvirt's 30 s; the second
/// waits from 30 s until the holder ends at 32 s. Both named by
/// `virDomainSuspend`, the innermost named caller (Debian's QEMU driver
/// has no symbols for `qemuDomainSuspend`).
fn assert_job_waits_match_the_clients(p: &Profile, contention: &serde_json::Value) {
    use profiler::profile::LibvirtCall;
    let client = |who: &str, what: &str| contention["clients"][who][what].as_f64().unwrap();
    let released = contention["released_s"].as_f64().unwrap();
    let first_error = contention["clients"]["first waiter"]["error"]
        .as_str()
        .unwrap_or("");
    assert!(
        first_error.contains("cannot acquire state change lock"),
        "{contention:#}"
    );
    assert!(
        contention["clients"]["second waiter"]["error"].is_null(),
        "{contention:#}"
    );
    let waits: Vec<&LibvirtCall> = p
        .libvirt
        .iter()
        .filter(|r| {
            r.kind == LibvirtCall::JOB && p.frame_names(&r.stack).any(|f| f == "virDomainSuspend")
        })
        .collect();
    // The table names them by it.
    let table = profiler::tables::libvirt_rows(p, None, LibvirtCall::JOB);
    let row = table.iter().find(|r| r.name == "virDomainSuspend");
    assert!(
        row.is_some_and(|r| r.calls == 2 && r.timeouts == 1),
        "{table:#?}"
    );
    let of = |status: &str| -> Vec<&&LibvirtCall> {
        waits.iter().filter(|r| r.status == status).collect()
    };
    #[expect(clippy::cast_precision_loss, reason = "seconds")]
    let secs = |ns: u64| ns as f64 / 1e9;
    // The first: timed out, after at least 30 s and within its client's call.
    let timeout = of(LibvirtCall::TIMEOUT);
    assert_eq!(timeout.len(), 1, "{waits:#?}");
    assert_eq!(timeout[0].calls, 1);
    let first = client("first waiter", "end_s") - client("first waiter", "start_s");
    let t = secs(timeout[0].total_ns);
    // libvirt's deadline is in ms of a truncated clock: a ms early at most.
    assert!(
        (29.99..=first).contains(&t),
        "timed out after {t:.3} s, client {first:.3} s"
    );
    // The second: got the job when the holder let it go.
    let got = of(LibvirtCall::OK);
    assert_eq!(got.iter().map(|r| r.calls).sum::<u64>(), 1, "{waits:#?}");
    let want = released - client("second waiter", "start_s");
    let w = secs(got[0].total_ns);
    assert!(
        (w - want).abs() < 0.3,
        "waited {w:.3} s, the job was held {want:.3} s past the waiter's start"
    );
}

fn libvirt_qemu_user_exists() -> bool {
    Command::new("id")
        .arg("libvirt-qemu")
        .output()
        .unwrap()
        .status
        .success()
}

/// `./x massboot` of 12 TCG guests and 2 paused KVM guests, windows of 4,
/// with this build's hvprof, the report in `dir`.
/// Step 1 of massboot alone: Debian's libvirt and QEMU.
fn install_libvirt() {
    massboot(&["--install-only"], None);
}

fn run_massboot(dir: &Path) {
    massboot(
        &[
            "--vms",
            "12",
            "--window-size",
            "4",
            "--accel",
            "tcg",
            "--kvm-paused",
            "2",
            // Then the first guest's job held for 32 s while two clients
            // wait for it: the first runs into the 30 s job wait timeout.
            "--job-contention",
            "32",
            // Every 32nd user-stack walk is copied and unwound again in
            // userspace by another unwinder.
            "--hvprof-arg=--verify-unwind=32",
        ],
        Some(dir),
    );
}

/// The boot's VMs, in order, and its windows.
fn assert_every_vm_in_its_window(p: &Profile) {
    // Exactly 14 VM creations, ordinals 1..=14, each one of our guests,
    // each made by a QEMU process.
    assert_eq!(p.vms.len(), 14, "{:#?}", p.vms);
    for (i, vm) in p.vms.iter().enumerate() {
        assert_eq!(vm.ordinal, i as u64 + 1);
        assert_eq!(vm.comm, "qemu-system-x86", "{vm:?}");
    }
    let names: BTreeSet<String> = p.vms.iter().filter_map(|v| v.name.clone()).collect();
    let want: BTreeSet<String> = (1..=14).map(|i| format!("hvprof-mb-{i}")).collect();
    assert_eq!(names, want);

    // Windows 0 (setup), 1–4, 5–8, 9–12, 13–16: every one has data.
    let ids: Vec<u32> = p.windows.iter().map(|w| w.id).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    for w in &ids {
        let on = p.oncpu.iter().filter(|r| r.window == *w).count();
        let off = p.offcpu.iter().filter(|r| r.window == *w).count();
        assert!(on + off > 0, "window {w} is empty");
    }
}

/// libvirtd's RPC worker threads on and off CPU, and its QEMU processes
/// followed as its descendants.
fn assert_libvirtd_and_its_qemus_are_followed(p: &Profile, libvirtd: u32) {
    // libvirtd's RPC worker threads, on CPU and off CPU.
    assert!(
        p.oncpu.iter().any(|r| r.comm == "rpc-libvirtd"),
        "no rpc-libvirtd on-CPU"
    );
    assert!(
        p.offcpu.iter().any(|r| r.comm == "rpc-libvirtd"),
        "no rpc-libvirtd off-CPU"
    );

    // QEMU processes were followed as children of libvirtd.
    let qemus: Vec<u32> = p.vms.iter().map(|v| v.pid).collect();
    let qemu_rows = p.oncpu.iter().filter(|r| qemus.contains(&r.tgid)).count()
        + p.offcpu.iter().filter(|r| qemus.contains(&r.tgid)).count();
    assert!(qemu_rows > 0, "no QEMU stacks");
    for q in &qemus {
        let mut cur = *q;
        let mut hops = 0;
        while cur != libvirtd {
            let proc = p
                .processes
                .iter()
                .find(|x| x.tgid == cur)
                .unwrap_or_else(|| panic!("process {cur} unknown"));
            cur = proc
                .parent
                .unwrap_or_else(|| panic!("QEMU {q}: no parent recorded for {cur}"));
            hops += 1;
            assert!(hops < 8, "QEMU {q} is not a descendant of libvirtd");
        }
    }
}

/// libvirtd's forks under `virFork`, QEMU's threads under
/// `qemu_thread_create`, and one machine cgroup per VM.
fn assert_forks_have_their_callers_and_vms_their_cgroups(p: &Profile, libvirtd: u32) {
    // libvirtd forks for every VM (and QEMU makes threads).
    let libvirtd_forks: u64 = p
        .forks
        .iter()
        .filter(|f| f.tgid == libvirtd && !f.thread)
        .map(|f| f.count)
        .sum();
    assert!(
        libvirtd_forks >= 14,
        "libvirtd forked {libvirtd_forks} times for 14 VMs"
    );
    // With libvirt's caller frames (from the learned fork paths, no
    // uprobe): its forks are virFork's, QEMU's threads qemu_thread_create's.
    let rows = profiler::tables::forks(p, None);
    let by = |caller: &str, creates: &str| -> u64 {
        rows.iter()
            .filter(|r| r.caller == caller && r.creates == creates)
            .map(|r| r.count)
            .sum()
    };
    assert!(by("virFork", "process") >= 14, "{rows:#?}");
    // QEMU's sandbox refuses clone3, so most of its threads come through
    // glibc's clone fallback: those too have their caller.
    assert!(by("qemu_thread_create", "thread") >= 3 * 14, "{rows:#?}");
    assert!(
        !rows
            .iter()
            .any(|r| r.parent == "qemu-system-x86" && r.caller == "[unknown]"),
        "{rows:#?}"
    );
    // One per-VM machine cgroup made in the v2 hierarchy for every VM.
    let machine_mkdirs: u64 = profiler::tables::cgroups(p, None)
        .iter()
        .filter(|r| {
            r.op == "mkdir" && r.hierarchy == "v2" && r.path == "/machine/qemu-*.libvirt-qemu"
        })
        .map(|r| r.count)
        .sum();
    assert_eq!(
        machine_mkdirs,
        14,
        "{:#?}",
        profiler::tables::cgroups(p, None)
    );
}

/// Shares of on-CPU samples and off-CPU time (preemptions left out) in
/// whole stacks, of the threads `tgids` selects by comm and tgid; then the
/// sample count and the off-CPU nanoseconds.
fn whole_shares(p: &Profile, tgids: &dyn Fn(&str, u32) -> bool) -> (f64, f64, u64, u64) {
    let (mut on, mut on_whole, mut off, mut off_whole) = (0u64, 0u64, 0u64, 0u64);
    for r in p.oncpu.iter().filter(|r| tgids(&r.comm, r.tgid)) {
        on += r.samples;
        if is_whole(p, &r.stack) {
            on_whole += r.samples;
        }
    }
    for r in p.offcpu.iter().filter(|r| tgids(&r.comm, r.tgid)) {
        if p.frame_names(&r.stack).any(|f| f == "[preempted]") {
            continue;
        }
        off += r.total_ns;
        if is_whole(p, &r.stack) {
            off_whole += r.total_ns;
        }
    }
    (share(on_whole, on), share(off_whole, off), on, off)
}

/// Whole user stacks without frame pointers (Debian's libvirt, glib,
/// QEMU and libc have none): libvirtd's stacks reach their thread's
/// entry or main, QEMU's vCPU threads' their thread function.
fn assert_user_stacks_are_whole(p: &Profile, libvirtd: u32) {
    let (on, off, n_on, n_off) = whole_shares(p, &|_, t| t == libvirtd);
    assert!(
        on >= 0.9 && off >= 0.9,
        "libvirtd: {:.1} % of {n_on} on-CPU samples and {:.1} % of {n_off} ns off-CPU in whole stacks",
        on * 100.0,
        off * 100.0
    );
    // QEMU's vCPU threads, from the second window on: the first QEMUs of
    // a fresh machine start while their files' tables are built (about
    // half a second here, the unwind cache being empty), and their first
    // blocks are walked by frame pointer meanwhile (counted as "tables not
    // loaded yet"); later QEMUs find every table loaded.
    let warm: Vec<u32> = p
        .vms
        .iter()
        .filter(|v| v.ordinal > 4)
        .map(|v| v.pid)
        .collect();
    let (on, off, n_on, n_off) = whole_shares(p, &|comm, t| {
        warm.contains(&t) && comm.starts_with("CPU ") && comm.contains('/')
    });
    // On CPU a vCPU thread runs TCG code, whose rows come from what QEMU
    // registers for GDB's JIT interface once its accelerator starts: its
    // first samples can come before that (about 1 in 10 of the few dozen
    // samples here; 93-99.5 % are whole in 50- and 150-VM boots).
    assert!(
        n_on > 0 && on >= 0.75 && off >= 0.9,
        "QEMU vCPU threads: {:.1} % of {n_on} on-CPU samples and {:.1} % of {n_off} ns off-CPU in whole stacks",
        on * 100.0,
        off * 100.0
    );
    // And the same stacks again, unwound in userspace from copies of the
    // stacks by another unwinder: none differs.
    let v = p.meta.verify_unwind.as_ref().expect("--verify-unwind ran");
    assert!(v.samples >= 50 && v.differs == 0, "{v:#?}");
}

/// The teardown left nothing behind, and undid its configuration.
fn assert_nothing_is_left_behind(dir: &Path, qemu_conf_before: Option<&[u8]>, user_before: bool) {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("massboot.json")).unwrap()).unwrap();
    assert_eq!(report["teardown_left"], serde_json::json!([]));
    assert_eq!(report["guests"], 14);
    assert!(live_comm("libvirtd").is_empty(), "libvirtd left running");
    assert!(live_comm("virtlogd").is_empty(), "virtlogd left running");
    assert!(live_comm("qemu-system-x86").is_empty(), "QEMU left running");
    let cgroups = Command::new("find")
        .args(["/sys/fs/cgroup", "-name", "*hvprof*"])
        .output()
        .unwrap();
    assert!(
        cgroups.stdout.is_empty(),
        "cgroups left: {}",
        String::from_utf8_lossy(&cgroups.stdout)
    );
    assert_eq!(
        std::fs::read("/etc/libvirt/qemu.conf").ok().as_deref(),
        qemu_conf_before
    );
    assert_eq!(libvirt_qemu_user_exists(), user_before);
}
