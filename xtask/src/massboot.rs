//! `./x massboot`: profile a real libvirtd mass boot, end to end,
//! with Debian's own libvirt and QEMU, on a machine without systemd.
//!
//! Installs what is missing, starts virtlogd and libvirtd by hand (libvirtd
//! under a child subreaper, because this PID 1 reaps orphans only every 1–2 s
//! and libvirt's destroy waits for the QEMU zombie), boots N transient guests
//! over the libvirt API from T client threads while `hvprof record` follows
//! libvirtd and its children, then destroys every guest, stops the daemons
//! and undoes the configuration it wrote. Every step that fails says which
//! step, why, and where the log is; the teardown runs on every path.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::packages::sh;

/// Packages the boot needs, all from the release's backports suite with
/// their dependencies: on Debian 12 that is libvirt 11.3 and QEMU 10 (the
/// image's qemu-utils 10, from backports, conflicts with bookworm's QEMU
/// 7.2). libvirt is pinned to backports too, so every machine boots the
/// same pair; the versions are printed and kept in the report.
const PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "python3-libvirt",
    "qemu-system-x86",
];

const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// libvirt's hook for QEMU guests, run by libvirtd at each guest's
/// preparation, start and stop (`qemu GUEST OPERATION SUB-OP EXTRA`).
const QEMU_HOOK: &str = "/etc/libvirt/hooks/qemu";
const QEMU_USER: &str = "libvirt-qemu";
const GUEST_PREFIX: &str = "hvprof-mb-";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// Where massboot's libvirt comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LibvirtFrom {
    Release,
    Backports,
}

/// The packages of libvirt's own that a switch between the two moves
/// (those the older one lacks are removed by apt).
const LIBVIRT_PACKAGES: &[&str] = &[
    "libvirt0",
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
];

#[derive(Debug, clap::Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches from the command line"
)]
pub struct Opts {
    /// Guests to boot.
    #[arg(long, default_value_t = 12)]
    pub vms: usize,
    /// Client threads calling the libvirt API.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// QEMU accelerator of the guests.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    pub accel: Accel,
    /// Start the guests paused (with kvm: the VM is created without this
    /// kernel's ~5 s of real-mode emulation per guest).
    #[arg(long)]
    pub paused: bool,
    /// Also boot this many paused KVM guests, after the others.
    #[arg(long, default_value_t = 0)]
    pub kvm_paused: usize,
    /// Windows of K VMs.
    #[arg(long, conflicts_with = "windows")]
    pub window_size: Option<u32>,
    /// Explicit windows, e.g. 1-10,41-50.
    #[arg(long)]
    pub windows: Option<String>,
    /// Report directory.
    #[arg(short, long, default_value = "target/massboot")]
    pub output: PathBuf,
    /// Use this hvprof instead of building the release one.
    #[arg(long)]
    pub hvprof: Option<PathBuf>,
    /// Boot without recording: the baseline for hvprof's overhead.
    #[arg(long)]
    pub no_record: bool,
    /// Extra argument for `hvprof record` (repeatable), e.g.
    /// `--hvprof-arg=--tracers=oncpu,offcpu`.
    #[arg(long = "hvprof-arg", allow_hyphen_values = true)]
    pub hvprof_args: Vec<String>,
    /// Only install libvirt and QEMU (step 1), and stop: the machine as a
    /// boot finds it, for a test to compare the teardown with.
    #[arg(long)]
    pub install_only: bool,
    /// Which libvirt to boot with: Debian's own (`release`: 9.0 on
    /// bookworm) or its backports' (11.3 on bookworm), switched to (up or
    /// down) if the other is installed; QEMU stays the backports' 10.
    /// Diff a boot under each with `hvprof diff`.
    #[arg(long, value_enum, default_value_t = LibvirtFrom::Backports)]
    pub libvirt: LibvirtFrom,
    /// After the boot, still recording: hold the first guest's domain job
    /// for this many seconds (its QEMU stopped under a monitor command)
    /// while two other clients wait to suspend it, the first from 0.5 s
    /// (past 30 s, libvirt's job wait timeout, it fails), the second from
    /// 2 s before the end. The clients' times go to `massboot.json`.
    #[arg(long, value_name = "SECONDS")]
    pub job_contention: Option<f64>,
    /// Install a libvirt `qemu` hook (/etc/libvirt/hooks/qemu) for the boot,
    /// which libvirtd runs at every guest's preparation, start, end of start
    /// and stop, and which sleeps this many ms each time it runs for the
    /// guests `--qemu-hook-guests` (0: it runs, and sleeps for none): a
    /// regression injected the way an administrator could. Removed at the
    /// teardown.
    #[arg(long, value_name = "MS")]
    pub qemu_hook_sleep: Option<u64>,
    /// Client thread k starts its first guest k times this many ms after the
    /// first thread: the guests still boot concurrently, in a steadier
    /// order.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub start_gap: u64,
    /// After booting each guest, its client asks for the guest's info once
    /// (`virDomainGetInfo`: a call on a running domain).
    #[arg(long)]
    pub get_info: bool,
    /// The guests the hook sleeps for, by number (`FIRST-LAST`).
    #[arg(long, value_name = "FIRST-LAST", default_value = "1-1000000")]
    pub qemu_hook_guests: String,
}

/// A 512-byte boot sector: write '!' to COM1 and halt.
///
/// ```text
/// ba f8 03   mov  dx, 0x3f8     ; COM1 data port
/// b0 21      mov  al, '!'
/// ee         out  dx, al
/// fa         cli
/// f4         hlt
/// eb fd      jmp  short hlt     ; stay halted (NMIs)
/// …zeros…    55 aa at 510      ; boot signature
/// ```
#[must_use]
pub fn boot_sector() -> [u8; 512] {
    let code = [0xba, 0xf8, 0x03, 0xb0, 0x21, 0xee, 0xfa, 0xf4, 0xeb, 0xfd];
    let mut s = [0u8; 512];
    s[..code.len()].copy_from_slice(&code);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

fn domain_xml(name: &str, accel: Accel, disk: &Path, serial: &Path) -> String {
    let ty = match accel {
        Accel::Tcg => "qemu",
        Accel::Kvm => "kvm",
    };
    // <acpi/>: without it libvirt 9.0 passes -no-acpi, which QEMU 10 rejects.
    format!(
        "<domain type='{ty}'>
  <name>{name}</name>
  <memory unit='MiB'>16</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='hda' bus='ide'/></disk>
    <serial type='file'><source path='{}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>",
        disk.display(),
        serial.display()
    )
}

/// Live (not zombie) processes whose comm is `comm`.
fn pids_named(comm: &str) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                let (name, rest) = st
                    .split_once(" (")
                    .and_then(|(_, r)| r.rsplit_once(')'))
                    .unwrap_or(("", ""));
                name == comm && !rest.trim_start().starts_with(['Z', 'X'])
            })
        })
        .collect()
}

/// QEMU processes of our guests.
fn our_qemus() -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&format!("guest={GUEST_PREFIX}"))
            })
        })
        .collect()
}

/// Cgroup directories libvirt made for our guests (any hierarchy).
pub fn our_cgroups() -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if depth > 6 {
            return;
        }
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let name = e.file_name().to_string_lossy().into_owned();
                // libvirt escapes '-' as \x2d in machine names.
                if name.contains("hvprof\\x2dmb") || name.contains(GUEST_PREFIX) {
                    out.push(p.clone());
                }
                walk(&p, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), 0, &mut out);
    out
}

pub(crate) fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: signalling a process we started, by pid.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Signals a child and waits for it; kills it (SIGKILL) after `grace`.
pub(crate) fn stop_child(child: &mut Child, sig: i32, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal(child.id(), sig);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[derive(Default)]
enum QemuConf {
    /// Not written (yet).
    #[default]
    Untouched,
    /// Written; there was none before.
    WasAbsent,
    /// Written; this was the content before.
    Was(Vec<u8>),
}

/// Everything massboot changed, undone in reverse order on drop — on success,
/// on error and on panic.
#[derive(Default)]
struct Session {
    logs: PathBuf,
    scratch: Option<PathBuf>,
    created_user: bool,
    /// What qemu.conf was before massboot wrote it.
    qemu_conf: QemuConf,
    /// What the qemu hook was before massboot wrote it (`--qemu-hook-sleep`),
    /// and whether massboot made its directory.
    qemu_hook: QemuConf,
    created_hooks_dir: bool,
    virtlogd: Option<Child>,
    /// The subreaper that runs libvirtd.
    libvirtd: Option<Child>,
    guests_file: Option<PathBuf>,
    hvprof: Option<Child>,
    /// What the teardown found and removed, for the report.
    leftovers: Vec<String>,
}

impl Session {
    fn teardown(&mut self) {
        if let Some(mut hv) = self.hvprof.take() {
            stop_child(&mut hv, libc::SIGINT, Duration::from_secs(60));
        }
        if let Some(g) = self.guests_file.take()
            && self.libvirtd.is_some()
        {
            let _ = Command::new("/usr/bin/python3")
                .arg(boot_script())
                .arg("destroy")
                .arg(&g)
                .status();
        }
        if let Some(mut l) = self.libvirtd.take() {
            // The subreaper forwards SIGTERM to libvirtd and reaps the rest.
            stop_child(&mut l, libc::SIGTERM, Duration::from_secs(15));
        }
        if let Some(mut v) = self.virtlogd.take() {
            stop_child(&mut v, libc::SIGTERM, Duration::from_secs(5));
        }
        for pid in our_qemus() {
            self.leftovers.push(format!("QEMU pid {pid} (killed)"));
            signal(pid, libc::SIGKILL);
        }
        for cg in our_cgroups().into_iter().rev() {
            if fs::remove_dir(&cg).is_ok() {
                self.leftovers
                    .push(format!("cgroup {} (removed)", cg.display()));
            }
        }
        match std::mem::take(&mut self.qemu_conf) {
            QemuConf::Was(old) => {
                let _ = fs::write(QEMU_CONF, old);
            }
            QemuConf::WasAbsent => {
                let _ = fs::remove_file(QEMU_CONF);
            }
            QemuConf::Untouched => {}
        }
        match std::mem::take(&mut self.qemu_hook) {
            QemuConf::Was(old) => {
                let _ = fs::write(QEMU_HOOK, old);
            }
            QemuConf::WasAbsent => {
                let _ = fs::remove_file(QEMU_HOOK);
            }
            QemuConf::Untouched => {}
        }
        if std::mem::take(&mut self.created_hooks_dir) {
            let _ = fs::remove_dir(Path::new(QEMU_HOOK).parent().unwrap_or(Path::new("/")));
        }
        if std::mem::take(&mut self.created_user) {
            let _ = Command::new("userdel").arg(QEMU_USER).status();
        }
        if let Some(s) = self.scratch.take() {
            let _ = fs::remove_dir_all(s);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn boot_script() -> PathBuf {
    crate::toolchain::root().join("samples/massboot/boot.py")
}

/// `./x subreaper --pidfile F -- CMD…`: become a child subreaper, run
/// CMD, reap every orphan that lands here, forward SIGTERM/SIGINT to CMD,
/// and exit with CMD's status once it and all orphans are gone.
pub fn subreaper(pidfile: &Path, cmd: &[String]) -> anyhow::Result<i32> {
    ensure!(!cmd.is_empty(), "subreaper needs a command");
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    ensure!(
        r == 0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
    // Block the signals we forward; take them with sigtimedwait below.
    // SAFETY: plain signal-set manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        set
    };
    let mut command = Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    // SAFETY: only async-signal-safe calls between fork and exec: the child
    // must not inherit the blocked signals (it would ignore SIGTERM).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &raw const empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = command.spawn().context("starting the command")?;
    let main = child.id();
    fs::write(pidfile, main.to_string())?;
    let mut status = None;
    loop {
        // Reap everything that has exited.
        loop {
            let mut st = 0;
            // SAFETY: reaping our own (or reparented) children.
            let pid = unsafe { libc::waitpid(-1, &raw mut st, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid.cast_unsigned() == main {
                status = Some(if libc::WIFEXITED(st) {
                    libc::WEXITSTATUS(st)
                } else {
                    128 + libc::WTERMSIG(st)
                });
            }
        }
        if status.is_some() {
            // Any children left? ECHILD means none.
            // SAFETY: as above.
            let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
            if r < 0 {
                break;
            }
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // SAFETY: valid set and timeout.
        let sig =
            unsafe { libc::sigtimedwait(&raw const set, std::ptr::null_mut(), &raw const ts) };
        if (sig == libc::SIGTERM || sig == libc::SIGINT) && status.is_none() {
            signal(main, sig);
        }
    }
    drop(child);
    Ok(status.unwrap_or(0))
}

/// Seconds all CPUs have done work since boot (`/proc/stat`: user, nice,
/// system, irq, softirq; not steal, the time a hypervisor below took).
pub(crate) fn cpu_busy_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let jiffies: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map_or(0, |l| {
            l.split_whitespace()
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6))
                .map(|(_, v)| v)
                .sum()
        });
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
    let secs = jiffies as f64 / hz.max(1) as f64;
    secs
}

/// User and system CPU time of process `pid` so far (0 if it is gone).
pub(crate) fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesized comm: state is field 3, utime 14, stime 15.
    let ticks: u64 = stat.rsplit_once(')').map_or(0, |(_, rest)| {
        rest.split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse::<u64>().ok())
            .sum()
    });
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
    let secs = ticks as f64 / hz.max(1) as f64;
    secs
}

/// Run time of hvprof's eBPF programs, from the summary it wrote (recorded
/// with `--bpf-stats`).
fn ebpf_seconds(report: &Path) -> Option<f64> {
    let summary: serde_json::Value =
        serde_json::from_slice(&fs::read(report.join("summary.json")).ok()?).ok()?;
    let ns: u64 = summary["program_stats"]
        .as_array()?
        .iter()
        .filter_map(|p| p["run_time_ns"].as_u64())
        .sum();
    #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
    let secs = ns as f64 / 1e9;
    Some(secs)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index"
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the whole mass boot. Returns the report directory.
pub fn run(opts: &Opts, hvprof: &Path) -> anyhow::Result<PathBuf> {
    check_machine(opts)?;
    install_packages(opts.libvirt)?;
    if opts.install_only {
        return Ok(opts.output.clone());
    }
    let out = opts.output.clone();
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let mut s = Session::default();
    s.logs = out.join("logs");
    fs::create_dir_all(&s.logs)?;
    let scratch = std::env::temp_dir().join(format!("hvprof-massboot-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    s.scratch = Some(scratch.clone());

    configure_libvirt(&mut s)?;
    if let Some(ms) = opts.qemu_hook_sleep {
        install_qemu_hook(&mut s, ms, &opts.qemu_hook_guests)?;
    }
    let libvirtd_pid = start_daemons(&mut s, &scratch)?;
    let (guests_file, guests) = write_guests(opts, &scratch)?;
    s.guests_file = Some(guests_file.clone());
    let err_drain = start_recording(opts, hvprof, libvirtd_pid, &out, &mut s)?;
    let mut boot = boot_guests(opts, &guests_file, guests, &s)?;
    if let Some(hold) = opts.job_contention {
        boot.contention = Some(contend(hold, &s)?);
    }
    // Stop recording before the teardown, so the profile is the boot alone.
    if let Some(err_drain) = err_drain {
        stop_recording(&mut s, err_drain)?;
    }

    step("step 7/7: destroying guests, stopping the daemons, restoring the configuration");
    s.teardown();
    let leftovers = std::mem::take(&mut s.leftovers);
    let still = still_there();
    report_boot(&out, &boot, libvirtd_pid, &leftovers, &still)?;
    ensure!(still.is_empty(), "the teardown left {still:?} behind");
    Ok(out)
}

fn step(s: &str) {
    println!("massboot: {s}");
}

/// Root, something to boot, /dev/kvm for KVM guests.
fn check_machine(opts: &Opts) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "massboot starts libvirtd and loads eBPF: run it as root"
    );
    ensure!(opts.vms + opts.kvm_paused > 0, "--vms 0: nothing to boot");
    ensure!(
        (opts.accel == Accel::Tcg && opts.kvm_paused == 0) || Path::new("/dev/kvm").exists(),
        "KVM guests need /dev/kvm"
    );
    Ok(())
}

/// Step 1: libvirt and QEMU from backports, and no daemon of ours running.
fn install_packages(from: LibvirtFrom) -> anyhow::Result<()> {
    use crate::packages::{Suite, install, release_version, version};
    crate::packages::ensure("massboot", PACKAGES, Suite::Backports)
        .context("step 1/7 (packages) failed")?;
    // Backports' versions say so (`11.3.0-2~bpo12+1`).
    let backports = version("libvirt-daemon").is_some_and(|v| v.contains("~bpo"));
    match (from, backports) {
        (LibvirtFrom::Release, true) => {
            let v = release_version("libvirt-daemon").context("step 1/7 (packages) failed")?;
            let pinned: Vec<String> = LIBVIRT_PACKAGES
                .iter()
                .map(|p| format!("{p}={v}"))
                .collect();
            let pinned: Vec<&str> = pinned.iter().map(String::as_str).collect();
            install("massboot", &pinned, Suite::Release, true)
                .context("step 1/7: installing the release's libvirt failed")?;
        }
        (LibvirtFrom::Backports, false) => {
            install("massboot", LIBVIRT_PACKAGES, Suite::Backports, false)
                .context("step 1/7: installing backports' libvirt failed")?;
        }
        _ => {}
    }
    step(&format!(
        "libvirt-daemon {}, qemu-system-x86 {}",
        crate::packages::version("libvirt-daemon").unwrap_or_default(),
        crate::packages::version("qemu-system-x86").unwrap_or_default()
    ));
    for d in ["libvirtd", "virtlogd"] {
        let running = pids_named(d);
        ensure!(
            running.is_empty(),
            "a {d} is already running (pid {running:?}); massboot starts and stops its own — stop that one first"
        );
    }
    Ok(())
}

/// Step 2: the `libvirt-qemu` user and a qemu.conf that runs QEMU as root
/// without a security driver; both undone by the session's teardown.
fn configure_libvirt(s: &mut Session) -> anyhow::Result<()> {
    step("step 2/7: libvirt configuration (user libvirt-qemu, qemu.conf)");
    if Command::new("id")
        .arg(QEMU_USER)
        .output()
        .is_ok_and(|o| !o.status.success())
    {
        sh(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            QEMU_USER,
        ]))
        .context("step 2/7: creating the libvirt-qemu user failed")?;
        s.created_user = true;
    }
    s.qemu_conf = fs::read(QEMU_CONF).map_or(QemuConf::WasAbsent, QemuConf::Was);
    fs::create_dir_all("/etc/libvirt")?;
    fs::write(
        QEMU_CONF,
        "# Written by hvprof's ./x massboot; restored when it ends.\n\
         user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n",
    )
    .context("step 2/7: writing /etc/libvirt/qemu.conf failed")?;
    Ok(())
}

/// Step 2 (`--qemu-hook-sleep`): the qemu hook, which libvirtd finds when it
/// starts (it runs it at each guest's preparation, start and end of start,
/// three times per boot); undone by the session's teardown.
fn install_qemu_hook(s: &mut Session, ms: u64, guests: &str) -> anyhow::Result<()> {
    let (first, last) = guests.split_once('-').unwrap_or((guests, guests));
    let (first, last): (u64, u64) = (
        first
            .trim()
            .parse()
            .context("--qemu-hook-guests: FIRST-LAST, e.g. 5-8")?,
        last.trim()
            .parse()
            .context("--qemu-hook-guests: FIRST-LAST, e.g. 5-8")?,
    );
    step(&format!(
        "step 2/7: a qemu hook ({QEMU_HOOK}) that sleeps {ms} ms whenever it runs for guests {first}-{last}"
    ));
    let dir = Path::new(QEMU_HOOK).parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        s.created_hooks_dir = true;
    }
    s.qemu_hook = fs::read(QEMU_HOOK).map_or(QemuConf::WasAbsent, QemuConf::Was);
    let script = format!(
        "#!/bin/sh\n\
         # Written by hvprof's ./x massboot (--qemu-hook-sleep); removed when it ends.\n\
         # libvirtd runs it as: qemu GUEST OPERATION SUB-OPERATION EXTRA\n\
         n=\"${{1#{GUEST_PREFIX}}}\"\n\
         if [ {ms} -gt 0 ] && [ \"$n\" -ge {first} ] 2>/dev/null && [ \"$n\" -le {last} ]; then\n\
         \x20   sleep {secs}\n\
         fi\n\
         exit 0\n",
        secs = format_args!("{}.{:03}", ms / 1000, ms % 1000),
    );
    fs::write(QEMU_HOOK, script).context("step 2/7: writing the qemu hook failed")?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(QEMU_HOOK, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Step 3: virtlogd, and libvirtd under a child subreaper. Returns
/// libvirtd's pid once it answers on `qemu:///system`.
fn start_daemons(s: &mut Session, scratch: &Path) -> anyhow::Result<u32> {
    step("step 3/7: starting virtlogd and libvirtd (under a child subreaper)");
    let vlog = fs::File::create(s.logs.join("virtlogd.log"))?;
    s.virtlogd = Some(
        Command::new("virtlogd")
            .stdout(vlog.try_clone()?)
            .stderr(vlog)
            .spawn()
            .context("step 3/7: starting virtlogd failed")?,
    );
    let pidfile = scratch.join("libvirtd.pid");
    let lerr = fs::File::create(s.logs.join("libvirtd.stderr"))?;
    let xtask = std::env::current_exe()?;
    s.libvirtd = Some(
        Command::new(&xtask)
            .args(["subreaper", "--pidfile"])
            .arg(&pidfile)
            .args(["--", "libvirtd"])
            .env(
                "LIBVIRT_LOG_OUTPUTS",
                format!("3:file:{}", s.logs.join("libvirtd.log").display()),
            )
            .stdout(lerr.try_clone()?)
            .stderr(lerr)
            .spawn()
            .context("step 3/7: starting libvirtd failed")?,
    );
    wait_for_libvirtd(s, &pidfile)
}

/// Polls until libvirtd answers and has written its pid; fails if it exits
/// or is not up within 30 s.
fn wait_for_libvirtd(s: &mut Session, pidfile: &Path) -> anyhow::Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = Command::new("virsh")
            .args(["-c", "qemu:///system", "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        if up
            && let Some(pid) = fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse().ok())
        {
            return Ok(pid);
        }
        if let Some(l) = s.libvirtd.as_mut()
            && let Ok(Some(st)) = l.try_wait()
        {
            bail!(
                "step 3/7: libvirtd exited ({st}) while starting; see {}/libvirtd.log and libvirtd.stderr",
                s.logs.display()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "step 3/7: libvirtd did not answer on qemu:///system within 30 s; see {}/libvirtd.log",
            s.logs.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Step 4: each guest's disk, serial file and domain XML, listed in
/// `guests.json` for the boot client. Returns that file and the guest count.
fn write_guests(opts: &Opts, scratch: &Path) -> anyhow::Result<(PathBuf, usize)> {
    step("step 4/7: preparing guests");
    let sector = boot_sector();
    let mut guests = Vec::new();
    for i in 0..opts.vms + opts.kvm_paused {
        let name = format!("{GUEST_PREFIX}{}", i + 1);
        let (accel, paused) = if i < opts.vms {
            (opts.accel, opts.paused)
        } else {
            (Accel::Kvm, true)
        };
        // Each guest its own disk: IDE disks cannot be read-only.
        let disk = scratch.join(format!("{name}.img"));
        fs::write(&disk, sector)?;
        let serial = scratch.join(format!("{name}.serial"));
        guests.push(serde_json::json!({
            "name": name,
            "xml": domain_xml(&name, accel, &disk, &serial),
            "serial": serial,
            "paused": paused,
        }));
    }
    let guests_file = scratch.join("guests.json");
    fs::write(&guests_file, serde_json::to_string(&guests)?)?;
    Ok((guests_file, guests.len()))
}

/// Step 5: `hvprof record` following libvirtd, started and waited for until
/// it says it is recording (unless `--no-record`). Returns the thread that
/// collects the rest of its stderr.
fn start_recording(
    opts: &Opts,
    hvprof: &Path,
    libvirtd_pid: u32,
    out: &Path,
    s: &mut Session,
) -> anyhow::Result<Option<std::thread::JoinHandle<String>>> {
    if opts.no_record {
        step("step 5/7: not recording (--no-record)");
        return Ok(None);
    }
    step(&format!(
        "step 5/7: hvprof record -p {libvirtd_pid} (libvirtd and its children)"
    ));
    let mut rec = Command::new(hvprof);
    rec.args(["record", "--bpf-stats", "-p", &libvirtd_pid.to_string()])
        .args(["--vm-event", "kvm", "--vm-event", "exec:qemu-system-*"]);
    match (&opts.windows, opts.window_size) {
        (Some(w), _) => rec.args(["--windows", w]),
        (None, k) => rec.args(["--window-size", &k.unwrap_or(10).to_string()]),
    };
    rec.args(&opts.hvprof_args);
    rec.arg("-o")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut hv = rec.spawn().context("step 5/7: starting hvprof failed")?;
    let stderr = hv
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no hvprof stderr"))?;
    s.hvprof = Some(hv);
    let mut lines = BufReader::new(stderr).lines();
    let mut hv_err = String::new();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("recording") => break,
            Some(Ok(l)) => {
                hv_err.push_str(&l);
                hv_err.push('\n');
            }
            _ => bail!("step 5/7: hvprof exited before recording:\n{hv_err}"),
        }
    }
    Ok(Some(std::thread::spawn(move || {
        lines.map_while(Result::ok).collect::<Vec<_>>().join("\n")
    })))
}

/// What the boot client reported, and the CPU time the boot took.
struct Boot {
    /// The boot client's JSON result.
    json: serde_json::Value,
    /// CPU time of the whole machine during the boot.
    cpu_s: f64,
    /// hvprof's own process CPU time during the boot, when it recorded.
    hvprof_cpu_s: Option<f64>,
    /// `--job-contention`: what its clients saw.
    contention: Option<serde_json::Value>,
}

/// `--job-contention`: the first guest's job held for `hold` seconds while
/// two clients wait for it (`boot.py contend`).
fn contend(hold: f64, s: &Session) -> anyhow::Result<serde_json::Value> {
    ensure!(
        hold > 2.5,
        "--job-contention: hold the job for more than 2.5 s"
    );
    step(&format!(
        "step 6/7: holding {GUEST_PREFIX}1's domain job for {hold} s while two clients wait"
    ));
    let out = Command::new("/usr/bin/python3")
        .arg(boot_script())
        .args(["contend", &format!("{GUEST_PREFIX}1"), &hold.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("step 6/7: running the job contention failed")?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow!(
            "step 6/7: the job contention printed no result ({e}); see {}/libvirtd.log",
            s.logs.display()
        )
    })
}

/// Step 6: boots every guest through the boot client, measuring the
/// machine's and hvprof's CPU time meanwhile; fails if any guest failed.
fn boot_guests(
    opts: &Opts,
    guests_file: &Path,
    guests: usize,
    s: &Session,
) -> anyhow::Result<Boot> {
    step(&format!(
        "step 6/7: booting {guests} guests from {} client threads",
        opts.threads
    ));
    let busy_before = cpu_busy_seconds();
    let hv_pid = s.hvprof.as_ref().map(Child::id);
    let hv_before = hv_pid.map_or(0.0, process_cpu_seconds);
    let boot = Command::new("/usr/bin/python3")
        .arg(boot_script())
        .arg("boot")
        .arg(guests_file)
        .args(["--threads", &opts.threads.to_string()])
        .args(["--gap-ms", &opts.start_gap.to_string()])
        .args(opts.get_info.then_some("--get-info"))
        .stderr(Stdio::inherit())
        .output()
        .context("step 6/7: running the boot client failed")?;
    // CPU time of the whole machine during the boot: steadier than wall
    // time on a small, noisy box, and what an overhead costs in the end.
    let cpu_s = cpu_busy_seconds() - busy_before;
    // hvprof's own share: its process (draining maps and rings, reading
    // /proc) and, from its summary, its eBPF programs.
    let hvprof_cpu_s = hv_pid.map(|p| process_cpu_seconds(p) - hv_before);
    let json: serde_json::Value = serde_json::from_slice(&boot.stdout).map_err(|e| {
        anyhow!(
            "step 6/7: the boot client printed no result ({e}); see {}/libvirtd.log",
            s.logs.display()
        )
    })?;
    let errors: Vec<String> = json["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    ensure!(
        errors.is_empty(),
        "step 6/7: guests failed to boot:\n  {}\nsee {}/libvirtd.log",
        errors.join("\n  "),
        s.logs.display()
    );
    Ok(Boot {
        json,
        cpu_s,
        hvprof_cpu_s,
        contention: None,
    })
}

/// Stops `hvprof record` (SIGINT) and prints its summary; fails if it did.
fn stop_recording(
    s: &mut Session,
    err_drain: std::thread::JoinHandle<String>,
) -> anyhow::Result<()> {
    let hv = s.hvprof.take().ok_or_else(|| anyhow!("hvprof is gone"))?;
    signal(hv.id(), libc::SIGINT);
    let hv_out = hv.wait_with_output()?;
    let hv_stderr = err_drain.join().unwrap_or_default();
    // Kept beside the daemons' logs: its warnings and, with
    // HVPROF_TIMING set, where its time went.
    fs::write(s.logs.join("hvprof.stderr"), &hv_stderr)?;
    ensure!(
        hv_out.status.success(),
        "step 6/7: hvprof record failed ({}):\n{hv_stderr}",
        hv_out.status
    );
    print!("{}", String::from_utf8_lossy(&hv_out.stdout));
    Ok(())
}

/// QEMUs, cgroups and daemons of ours still there after the teardown.
fn still_there() -> Vec<String> {
    our_qemus()
        .iter()
        .map(|p| format!("QEMU pid {p}"))
        .chain(
            our_cgroups()
                .iter()
                .map(|c| format!("cgroup {}", c.display())),
        )
        .chain(
            pids_named("libvirtd")
                .iter()
                .map(|p| format!("libvirtd pid {p}")),
        )
        .chain(
            pids_named("virtlogd")
                .iter()
                .map(|p| format!("virtlogd pid {p}")),
        )
        .collect()
}

/// The boot's own figures: printed, and written to `massboot.json` in `out`.
fn report_boot(
    out: &Path,
    boot: &Boot,
    libvirtd_pid: u32,
    leftovers: &[String],
    still: &[String],
) -> anyhow::Result<()> {
    let mut create: Vec<f64> = boot.json["guests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["create_s"].as_f64())
        .collect();
    create.sort_by(f64::total_cmp);
    let wall = boot.json["wall_s"].as_f64().unwrap_or(0.0);
    let ebpf_cpu_s = boot.hvprof_cpu_s.and_then(|_| ebpf_seconds(out));
    print!(
        "{}",
        boot_figures_text(out, boot, &create, wall, ebpf_cpu_s, leftovers, still)
    );
    let report = serde_json::json!({
        "guests": create.len(),
        "wall_s": wall,
        "boot_cpu_s": boot.cpu_s,
        "hvprof_cpu_s": boot.hvprof_cpu_s,
        "ebpf_cpu_s": ebpf_cpu_s,
        "create_s": { "p50": percentile(&create, 0.5), "p90": percentile(&create, 0.9),
                      "max": create.last().copied().unwrap_or(0.0) },
        "boot": boot.json,
        "job_contention": boot.contention,
        "teardown_cleaned": leftovers,
        "teardown_left": still,
        "libvirtd_pid": libvirtd_pid,
        "packages": {
            "libvirt-daemon": crate::packages::version("libvirt-daemon"),
            "qemu-system-x86": crate::packages::version("qemu-system-x86"),
        },
    });
    fs::write(
        out.join("massboot.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

/// The boot's figures as printed: CPU time, guests and createXML latency
/// (`create` sorted), the teardown's outcome and the report's place.
fn boot_figures_text(
    out: &Path,
    boot: &Boot,
    create: &[f64],
    wall: f64,
    ebpf_cpu_s: Option<f64>,
    leftovers: &[String],
    still: &[String],
) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "\nmassboot: machine CPU time during the boot: {:.2} s",
        boot.cpu_s
    );
    if let Some(hv) = boot.hvprof_cpu_s {
        let _ = writeln!(
            text,
            "  of which hvprof's process: {hv:.2} s; its eBPF programs: {} \
             (the whole recording)",
            ebpf_cpu_s.map_or_else(|| "unknown".to_owned(), |e| format!("{e:.2} s"))
        );
    }
    let _ = writeln!(
        text,
        "\nmassboot: {} guests booted in {wall:.2} s",
        create.len()
    );
    let _ = writeln!(
        text,
        "  createXML latency: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        percentile(create, 0.5) * 1e3,
        percentile(create, 0.9) * 1e3,
        create.last().copied().unwrap_or(0.0) * 1e3
    );
    let _ = writeln!(
        text,
        "  teardown: {}",
        if leftovers.is_empty() && still.is_empty() {
            "clean (no guest, daemon or cgroup left)".to_owned()
        } else {
            format!("cleaned {leftovers:?}; still there: {still:?}")
        }
    );
    let _ = writeln!(text, "  report: {}", out.display());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sector_is_bootable() {
        let s = boot_sector();
        assert_eq!(&s[510..], [0x55, 0xaa]);
        assert_eq!(s[0], 0xba);
    }

    #[test]
    fn domain_has_acpi_and_its_own_disk() {
        let x = domain_xml(
            "hvprof-mb-3",
            Accel::Kvm,
            Path::new("/d/3.img"),
            Path::new("/d/3.serial"),
        );
        assert!(x.contains("<domain type='kvm'>") && x.contains("<acpi/>"));
        assert!(x.contains("/d/3.img") && x.contains("<memory unit='MiB'>16</memory>"));
    }

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert!((percentile(&v, 0.5) - 3.0).abs() < 1e-9);
        assert!((percentile(&v, 0.9) - 5.0).abs() < 1e-9);
        assert!(percentile(&[], 0.5).abs() < 1e-9);
    }
}
