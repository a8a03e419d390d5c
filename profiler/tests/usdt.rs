//! Privileged integration tests of USDT probes: `samples/usdt/probes.c`
//! (built with gcc) fires probes guarded by semaphores, with known
//! register, memory and constant arguments of every size, a known number
//! of times; `check_usdt` records every firing's arguments, attached
//! through a `uprobe.multi` link with the semaphores as reference
//! counters. They need root (or CAP_BPF + CAP_PERFMON) and fail, not skip,
//! without it.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsFd as _, unix::fs::FileExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, RingBuf},
    programs::UProbe,
};
use profiler::{
    ebpf,
    record::uprobe_multi::{self, Target},
    sys::Privileges,
    usdt::{self, Probe},
};
use profiler_common::usdt::{
    CHECK_USDT_HITS_MAP, CHECK_USDT_PROGRAM, USDT_MAX_ARGS, USDT_SPECS_MAP, UsdtHit, UsdtSpec,
};

fn require_privileges() {
    let p = Privileges::current().expect("read /proc/self/status");
    assert!(
        p.sufficient(),
        "these tests load eBPF programs: run them as root (./x test does, in CI)"
    );
}

/// Builds `samples/usdt/probes.c` into a directory of the test's own
/// (each test probes its own copy of the file).
fn build(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvprof-usdt-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the build directory");
    let exe = dir.join("probes");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/usdt/probes.c");
    let status = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed on {}", source.display());
    exe
}

/// The running sample, ended and its directory removed when dropped.
struct Sample {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
    /// The semaphores' addresses in the process, as it printed them.
    rx_semaphore: u64,
    tx_semaphore: u64,
    exe: PathBuf,
}

impl Sample {
    fn start(exe: &Path) -> Self {
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the sample");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the sample's first line");
        let words: Vec<&str> = line.split_whitespace().collect();
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("address");
        let pid: u32 = words[0].parse().expect("pid");
        assert_eq!(pid, child.id());
        Self {
            pid,
            rx_semaphore: hex(words[1]),
            tx_semaphore: hex(words[2]),
            child,
            stdin,
            stdout,
            exe: exe.to_owned(),
        }
    }

    /// Fires every probe once (rx 3 times, tx 5, nosem 2).
    fn fire(&mut self) {
        writeln!(self.stdin, "go").expect("write to the sample");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from the sample");
        assert_eq!(line, "done\n");
    }

    /// The `u16` at `addr` in the sample, through /proc/PID/mem.
    fn read_u16(&self, addr: u64) -> u16 {
        let mem = std::fs::File::open(format!("/proc/{}/mem", self.pid)).expect("open mem");
        let mut b = [0u8; 2];
        mem.read_exact_at(&mut b, addr).expect("read mem");
        u16::from_ne_bytes(b)
    }

    fn semaphores(&self) -> (u16, u16) {
        (
            self.read_u16(self.rx_semaphore),
            self.read_u16(self.tx_semaphore),
        )
    }

    /// Where file offset `off` of the sample's executable is mapped.
    fn address_of_offset(&self, off: u64) -> u64 {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)).expect("maps");
        let exe = self.exe.canonicalize().expect("canonical path");
        for line in maps.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || Path::new(f[5]) != exe {
                continue;
            }
            let (start, end) = f[0].split_once('-').expect("range");
            let start = u64::from_str_radix(start, 16).expect("start");
            let end = u64::from_str_radix(end, 16).expect("end");
            let map_off = u64::from_str_radix(f[2], 16).expect("offset");
            if map_off <= off && off < map_off + (end - start) {
                return start + (off - map_off);
            }
        }
        panic!("file offset {off:#x} is not mapped:\n{maps}");
    }
}

impl Drop for Sample {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.exe.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The sample's three probes, checked against what its source emits.
fn sample_probes(exe: &Path) -> [Probe; 3] {
    let probes = usdt::probes(exe).expect("read the sample's probes");
    let names: Vec<&str> = probes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["rx", "tx", "nosem"]);
    assert!(probes.iter().all(|p| p.provider == "hvprof_test"));
    assert_eq!(
        probes[0].arguments,
        "8@%rax -4@%ebx -2@%cx 1@%dl 8@16(%rsi) -4@-8(%rdi) -4@$-7 4@$42 -8@%r12 1@%r13b -2@(%r14)"
    );
    assert_eq!(probes[1].arguments, "-4@%r8d");
    assert_eq!(probes[2].arguments, "8@$7 -8@8(%r9)");
    assert!(probes[0].semaphore_offset.is_some() && probes[1].semaphore_offset.is_some());
    assert_eq!(probes[2].semaphore_offset, None);
    probes.try_into().expect("three")
}

/// Loads the object, stores spec `i` for probe `i`, loads `check_usdt`.
fn load(probes: &[Probe]) -> Ebpf {
    let mut bpf = ebpf::load(&[]).expect("load the embedded eBPF object");
    let mut specs: Array<_, UsdtSpec> =
        Array::try_from(bpf.map_mut(USDT_SPECS_MAP).expect("specs map")).expect("array");
    for (i, p) in probes.iter().enumerate() {
        let id = u32::try_from(i).expect("id");
        specs
            .set(id, &p.spec().expect("spec"), 0)
            .expect("store the spec");
    }
    let prog: &mut UProbe = bpf
        .program_mut(CHECK_USDT_PROGRAM)
        .expect("check_usdt in the object")
        .try_into()
        .expect("a uprobe");
    prog.load().expect("load check_usdt");
    bpf
}

/// Every firing recorded, by spec id, in order.
fn hits(bpf: &mut Ebpf) -> BTreeMap<u32, Vec<UsdtHit>> {
    let mut ring =
        RingBuf::try_from(bpf.map_mut(CHECK_USDT_HITS_MAP).expect("ring")).expect("ring");
    let mut out: BTreeMap<u32, Vec<UsdtHit>> = BTreeMap::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<UsdtHit>());
        // SAFETY: the record is a UsdtHit, written whole by the program
        // (length checked); read unaligned as the ring gives 8-byte
        // alignment only.
        let hit: UsdtHit = unsafe { item.as_ptr().cast::<UsdtHit>().read_unaligned() };
        out.entry(hit.spec_id).or_default().push(hit);
    }
    out
}

fn attach(bpf: &Ebpf, exe: &Path, probes: &[Probe], with_semaphores: bool) -> std::os::fd::OwnedFd {
    let prog: &UProbe = bpf
        .program(CHECK_USDT_PROGRAM)
        .expect("program")
        .try_into()
        .expect("a uprobe");
    let targets: Vec<Target> = probes
        .iter()
        .enumerate()
        .map(|(i, p)| Target {
            offset: p.offset,
            ref_ctr_offset: if with_semaphores {
                p.semaphore_offset.unwrap_or(0)
            } else {
                0
            },
            cookie: u64::try_from(i).expect("small"),
        })
        .collect();
    uprobe_multi::attach(
        prog.fd().expect("loaded").as_fd(),
        exe,
        &targets,
        None,
        false,
    )
    .expect("attach the uprobe.multi link")
}

/// Waits up to 2 s for the semaphores to read `want` (a link's release may
/// finish after its close returns).
fn await_semaphores(s: &Sample, want: (u16, u16)) -> (u16, u16) {
    let started = Instant::now();
    loop {
        let now = s.semaphores();
        if now == want || started.elapsed() > Duration::from_secs(2) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `v` cut to `size` bytes and extended back to 64 bits, by its sign when
/// `signed`: what the reader gives for an argument of that size.
fn ext(v: i64, size: u32, signed: bool) -> u64 {
    let shift = 64 - size * 8;
    let high = v.cast_unsigned() << shift;
    if signed {
        (high.cast_signed() >> shift).cast_unsigned()
    } else {
        high >> shift
    }
}

#[test]
fn usdt_arguments_and_semaphores() {
    require_privileges();
    let exe = build("args");
    let probes = sample_probes(&exe);
    let mut sample = Sample::start(&exe);
    // Our file offsets of the semaphores are where the process has them.
    assert_eq!(
        sample.address_of_offset(probes[0].semaphore_offset.expect("rx")),
        sample.rx_semaphore
    );
    assert_eq!(
        sample.address_of_offset(probes[1].semaphore_offset.expect("tx")),
        sample.tx_semaphore
    );
    assert_eq!(sample.semaphores(), (0, 0), "before attach");

    let mut bpf = load(&probes);
    // Nothing attached: the guarded probes do not run, nothing is seen.
    sample.fire();
    assert!(hits(&mut bpf).is_empty());

    let link = attach(&bpf, &exe, &probes, true);
    assert_eq!(sample.semaphores(), (1, 1), "attached");
    sample.fire();
    let seen = hits(&mut bpf);

    let rx = &seen[&0];
    assert_eq!(rx.len(), 3, "rx fired 3 times: {rx:?}");
    for (i, hit) in rx.iter().enumerate() {
        let i = i64::try_from(i).expect("small");
        assert_eq!(hit.tgid, sample.pid);
        assert_eq!(hit.count, 11);
        assert_eq!(hit.read, (1 << 11) - 1, "every argument read");
        let want: [u64; 11] = [
            ext(0x1122_3344_5566_7788 + i, 8, false),
            ext(-1000 - i, 4, true),
            ext(-2 - i, 2, true),
            ext(200 + i, 1, false),
            ext(0xde_adbe_ef00 + i, 8, false),
            ext(-123_456 - i, 4, true),
            ext(-7, 4, true),
            42,
            ext(-5 - i, 8, true),
            ext(7 + i, 1, false),
            ext(-300 - i, 2, true),
        ];
        assert_eq!(hit.args[..11], want, "rx #{i}");
        assert_eq!(hit.args[11..], [0; USDT_MAX_ARGS - 11]);
    }
    // The negative 4-byte arguments are sign-extended to 64 bits.
    assert_eq!(rx[0].args[1].cast_signed(), -1000);
    assert_eq!(rx[0].args[5].cast_signed(), -123_456);

    let tx = &seen[&1];
    assert_eq!(tx.len(), 5, "tx fired 5 times: {tx:?}");
    for (n, hit) in tx.iter().enumerate() {
        assert_eq!((hit.count, hit.read), (1, 1));
        assert_eq!(
            hit.args[0].cast_signed(),
            -i64::try_from(n).expect("small") - 1,
            "tx #{n}"
        );
    }
    // The unreadable argument (at address 8) is reported as not read.
    let nosem = &seen[&2];
    assert_eq!(nosem.len(), 2);
    for hit in nosem {
        assert_eq!((hit.count, hit.read), (2, 0b01));
        assert_eq!(hit.args[..2], [7, 0]);
    }
    assert_eq!(seen.len(), 3);

    drop(link);
    assert_eq!(await_semaphores(&sample, (0, 0)), (0, 0), "after detach");
    sample.fire();
    assert!(hits(&mut bpf).is_empty(), "nothing after detach");
}

/// Without the reference-counter offsets the uprobes are installed (the
/// probe without a semaphore fires) but the semaphores stay 0, so the
/// guarded sites never run: what attaching with aya's `UProbe::attach`
/// would give.
#[test]
fn without_reference_counters_guarded_probes_never_fire() {
    require_privileges();
    let exe = build("noref");
    let probes = sample_probes(&exe);
    let mut sample = Sample::start(&exe);
    let mut bpf = load(&probes);
    let link = attach(&bpf, &exe, &probes, false);
    assert_eq!(sample.semaphores(), (0, 0));
    sample.fire();
    let seen = hits(&mut bpf);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), [2], "{seen:?}");
    assert_eq!(seen[&2].len(), 2);
    drop(link);
}

/// A process started after the link was made gets its semaphores counted
/// too (the kernel does it when it maps the file).
#[test]
fn a_process_started_later_is_counted() {
    require_privileges();
    let exe = build("later");
    let probes = sample_probes(&exe);
    let mut bpf = load(&probes);
    let link = attach(&bpf, &exe, &probes, true);
    let mut sample = Sample::start(&exe);
    assert_eq!(sample.semaphores(), (1, 1));
    sample.fire();
    let seen = hits(&mut bpf);
    let counts: Vec<(u32, usize)> = seen.iter().map(|(k, v)| (*k, v.len())).collect();
    assert_eq!(counts, [(0, 3), (1, 5), (2, 2)]);
    drop(link);
    assert_eq!(await_semaphores(&sample, (0, 0)), (0, 0));
}

impl Sample {
    /// Calls `rx` `n` times; the nanoseconds a call took on average.
    fn bench(&mut self, n: u64) -> f64 {
        writeln!(self.stdin, "bench {n}").expect("write to the sample");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from the sample");
        line.trim().parse().expect("ns per call")
    }
}

/// What a firing of an eleven-argument probe costs, printed (a
/// measurement, not a timed test: run with `--ignored --nocapture`). The
/// kernel's run-time statistics are on only while this test holds their
/// file descriptor.
#[test]
#[ignore = "a measurement: prints the cost of a USDT probe"]
fn usdt_probe_cost() {
    const CALLS: u64 = 200_000;
    require_privileges();
    let exe = build("cost");
    let probes = sample_probes(&exe);
    let mut sample = Sample::start(&exe);
    let mut bpf = load(&probes);
    let unprobed = sample.bench(CALLS);
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let link = attach(&bpf, &exe, &probes, true);
    let attached = sample.bench(CALLS);
    let prog: &UProbe = bpf
        .program(CHECK_USDT_PROGRAM)
        .expect("program")
        .try_into()
        .expect("a uprobe");
    let info = prog.info().expect("program info");
    drop(link);
    drop(stats);
    let runs = info.run_count();
    let run_ns = info.run_time().as_nanos();
    let drained = hits(&mut bpf).values().map(Vec::len).sum::<usize>();
    println!(
        "rx not probed: {unprobed:.1} ns a call; probed: {attached:.1} ns a call; \
         check_usdt: {runs} runs, {} ns a run ({drained} records drained)",
        run_ns / u128::from(runs.max(1))
    );
    assert_eq!(runs, CALLS);
}

/// libvirt's own probes, all guarded by semaphores: every site of Debian's
/// `libvirt.so.0` attached, then `virsh` run on libvirt's in-process test
/// driver. Needs libvirt-clients, so not run by default.
#[test]
#[ignore = "needs Debian's libvirt0 and virsh"]
fn libvirt_probes_fire_in_virsh() {
    require_privileges();
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/libvirt.so.0");
    let probes = usdt::probes(lib).expect("read libvirt's probes");
    assert!(probes.iter().all(|p| p.semaphore_offset.is_some()));
    let mut bpf = load(&probes);
    let link = attach(&bpf, lib, &probes, true);
    let out = Command::new("virsh")
        .args(["-c", "test:///default", "list", "--all"])
        .output()
        .expect("run virsh");
    assert!(out.status.success());
    drop(link);
    let mut fired: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, hits) in hits(&mut bpf) {
        let p = &probes[usize::try_from(id).expect("id")];
        *fired.entry(p.name.as_str()).or_default() += hits.len();
        let first = hits[0];
        assert_eq!(first.count as usize, p.args.as_ref().expect("args").len());
        assert_eq!(first.read, (1 << first.count) - 1, "{}: {first:?}", p.name);
    }
    println!("{fired:?}");
    assert!(
        fired.get("object_new").copied().unwrap_or(0) > 0,
        "{fired:?}"
    );
}

/// A link for one process: its probes fire in that process only, and the
/// semaphores count its users there only.
#[test]
fn a_link_for_one_process() {
    require_privileges();
    let exe = build("onepid");
    let probes = sample_probes(&exe);
    let mut one = Sample::start(&exe);
    let mut other = Sample::start(&exe);
    let mut bpf = load(&probes);
    let prog: &UProbe = bpf
        .program(CHECK_USDT_PROGRAM)
        .expect("program")
        .try_into()
        .expect("a uprobe");
    let targets: Vec<Target> = probes
        .iter()
        .enumerate()
        .map(|(i, p)| Target {
            offset: p.offset,
            ref_ctr_offset: p.semaphore_offset.unwrap_or(0),
            cookie: u64::try_from(i).expect("small"),
        })
        .collect();
    let link = uprobe_multi::attach(
        prog.fd().expect("loaded").as_fd(),
        &exe,
        &targets,
        Some(one.pid),
        false,
    )
    .expect("attach for one process");
    assert_eq!(one.semaphores(), (1, 1));
    assert_eq!(other.semaphores(), (0, 0), "another process's semaphores");
    one.fire();
    other.fire();
    let seen = hits(&mut bpf);
    let counts: Vec<(u32, usize)> = seen.iter().map(|(k, v)| (*k, v.len())).collect();
    assert_eq!(counts, [(0, 3), (1, 5), (2, 2)]);
    assert!(seen.values().flatten().all(|h| h.tgid == one.pid));
    drop(link);
    assert_eq!(await_semaphores(&one, (0, 0)), (0, 0));
}
