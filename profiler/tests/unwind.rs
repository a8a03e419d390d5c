//! Privileged integration tests of the in-kernel user-stack unwinder
//! (`hvprof record --unwind dwarf`, the default) against
//! `samples/unwind/workload.c`, built here without frame pointers, whose
//! call chains they know: which named function blocks or burns, called from
//! where, for how long. Debian's libc has no frame pointers either, so a
//! stack that blocks or burns in libc loses its callers to a frame-pointer
//! walk; these stacks must be whole. They need root, and fail (not skip)
//! without.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use profiler::profile::Profile;

/// The on-CPU sampling frequency of every recording here.
const HZ: u64 = 499;

/// Frames of the libc the tests run against that have no symbol (Debian's is
/// stripped): glibc's `clone3`, `start_thread`, `__restore_rt`, …
const LIBC_FRAME: &str = "[libc.so.6+";

/// A scratch directory for one test: the workload, the plugin, the
/// recording. Removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("hvprof-test-unwind-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Self(dir)
    }

    fn workload(&self) -> PathBuf {
        self.0.join("workload")
    }

    fn plugin(&self) -> PathBuf {
        self.0.join("plugin.so")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs gcc with `args`, the source `samples/unwind/NAME` last.
fn gcc(args: &[&str], out: &Path, name: &str) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../samples/unwind")
        .join(name);
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-g",
        ])
        .args(args)
        .arg("-o")
        .arg(out)
        .arg(&source)
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed on {}", source.display());
}

/// Builds the workload (lazily bound, without frame pointers) and the
/// plugin it dlopens, in a scratch directory for `test`.
fn build(test: &str) -> Scratch {
    let s = Scratch::new(test);
    gcc(&["-Wl,-z,lazy"], &s.workload(), "workload.c");
    gcc(&["-shared", "-fPIC"], &s.plugin(), "plugin.c");
    s
}

/// Runs `hvprof record ARGS -- workload PLAN` (on- and off-CPU, at [`HZ`])
/// to completion and reads the profile.
fn record(s: &Scratch, args: &[&str], plan: &str) -> Profile {
    let hz = HZ.to_string();
    let workload = s.workload();
    let workload = workload.to_str().expect("a UTF-8 path");
    let mut all = vec!["--tracers", "oncpu,offcpu", "-F", &hz];
    all.extend(args);
    all.extend(["--", workload, plan]);
    record_in(s, &all)
}

/// Runs `hvprof record -o OUT ARGS` in `s`'s directory to completion and
/// reads the profile.
fn record_in(s: &Scratch, args: &[&str]) -> Profile {
    record_with(s, args, &[])
}

/// [`record_in`] with `env` set for hvprof.
fn record_with(s: &Scratch, args: &[&str], env: &[(&str, &str)]) -> Profile {
    let dir = s.0.join("out");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .envs(env.iter().copied())
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .args(args)
        .current_dir(&s.0)
        .output()
        .expect("run hvprof");
    assert!(
        out.status.success(),
        "hvprof record failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Profile::read(&dir.join("profile.hvprof")).expect("read profile")
}

/// One of the workload's stacks: its user frames, root first (the frames
/// before the first kernel one), and its weight: on-CPU samples or off-CPU
/// ns.
#[derive(Clone, Debug)]
struct UserStack<'a> {
    main_thread: bool,
    frames: Vec<&'a str>,
    weight: u64,
}

impl<'a> UserStack<'a> {
    /// `None` for a stack of another process, or without user frames
    /// (`[preempted]`, a missing user stack).
    fn new(
        p: &'a Profile,
        comm: &str,
        pid: u32,
        tgid: u32,
        stack: &'a [u32],
        weight: u64,
    ) -> Option<Self> {
        let frames: Vec<&str> = p
            .frame_names(stack)
            .take_while(|f| !f.ends_with("_[k]") && !f.starts_with("[kernel"))
            .collect();
        let synthetic = matches!(
            frames.as_slice(),
            [] | ["[preempted]" | "[missing user stack]"]
        );
        (comm == "workload" && !synthetic).then_some(Self {
            main_thread: pid == tgid,
            frames,
            weight,
        })
    }
}

/// The workload's on-CPU stacks, weighed in samples.
fn oncpu(p: &Profile) -> Vec<UserStack<'_>> {
    p.oncpu
        .iter()
        .filter_map(|r| UserStack::new(p, &r.comm, r.pid, r.tgid, &r.stack, r.samples))
        .collect()
}

/// The workload's off-CPU stacks, weighed in blocked ns.
fn offcpu(p: &Profile) -> Vec<UserStack<'_>> {
    p.offcpu
        .iter()
        .filter_map(|r| UserStack::new(p, &r.comm, r.pid, r.tgid, &r.stack, r.total_ns))
        .collect()
}

/// Whether `frames` has `chain` in it, consecutive.
fn has_chain(frames: &[&str], chain: &[&str]) -> bool {
    frames.windows(chain.len()).any(|w| w == chain)
}

/// The weight of the stacks whose frames `keep` keeps.
fn weight(stacks: &[UserStack], keep: impl Fn(&[&str]) -> bool) -> u64 {
    stacks
        .iter()
        .filter(|s| keep(&s.frames))
        .map(|s| s.weight)
        .sum()
}

#[expect(
    clippy::cast_precision_loss,
    reason = "shares of counts, for display and bounds"
)]
fn share(part: u64, whole: u64) -> f64 {
    part as f64 / whole.max(1) as f64
}

/// Folded user stacks, for failure messages.
fn dump(stacks: &[UserStack]) -> String {
    stacks.iter().fold(String::new(), |mut out, s| {
        let thread = if s.main_thread { "" } else { "(thread) " };
        let _ = writeln!(out, "{thread}{} {}", s.frames.join(";"), s.weight);
        out
    })
}

/// Of the unwinder's walks, the share that reached the thread's or the
/// process's entry.
fn complete_share(p: &Profile) -> f64 {
    // The other counts are per frame, not per walk.
    let walks = p.unwind.iter().filter(|c| !c.kind.starts_with("frames "));
    let complete = walks
        .clone()
        .filter(|c| c.kind == "complete")
        .map(|c| c.count)
        .sum();
    share(complete, walks.map(|c| c.count).sum())
}

/// That `leaf` ran about `ms` ms (at least half the samples that gives),
/// and that at least `min_share` of its samples are in the `whole` ones
/// (`how`: what makes one whole, for the message).
fn assert_ran_whole(on: &[UserStack], leaf: &str, ms: u64, whole: u64, min_share: f64, how: &str) {
    let ran = weight(on, |f| f.contains(&leaf));
    assert!(
        ran >= ms * HZ / 1000 / 2,
        "{ran} {leaf} samples, want about {}:\n{}",
        ms * HZ / 1000,
        dump(on)
    );
    assert!(
        share(whole, ran) >= min_share,
        "{whole} of {ran} {leaf} samples {how}:\n{}",
        dump(on)
    );
}

fn in_nanosleep(frames: &[&str]) -> bool {
    frames
        .iter()
        .any(|&f| f == "nanosleep" || f == "clock_nanosleep")
}

/// 200 sleeps of 2 ms in `sleeper`, half of them called from each caller.
const SLEEPS: &str = "settle:200,sleeps:200";
const SLEEPS_NS: u64 = 200 * 2_000_000;

#[test]
fn sleeper_is_in_every_off_cpu_stack() {
    let s = build("sleeper");
    let p = record(&s, &[], SLEEPS);
    let off = offcpu(&p);
    let sleeping = sleeping(&off);
    for UserStack { frames: f, .. } in &sleeping {
        assert!(
            has_chain(f, &["sleep_caller_a", "sleeper", "nanosleep"])
                || has_chain(f, &["sleep_caller_b", "sleeper", "nanosleep"]),
            "a sleep without sleeper and its caller:\n{}",
            dump(&off)
        );
        assert!(f.contains(&"main") && f[0] == "_start", "{}", dump(&off));
    }
    let through = |caller: &'static str| move |f: &[&str]| has_chain(f, &[caller, "sleeper"]);
    let a = weight(&sleeping, through("sleep_caller_a"));
    let b = weight(&sleeping, through("sleep_caller_b"));
    assert!(
        a + b >= SLEEPS_NS * 95 / 100,
        "{:.1} ms through sleeper, want {} ms:\n{}",
        share(a + b, 1_000_000),
        SLEEPS_NS / 1_000_000,
        dump(&off)
    );
    // Each caller made half of the sleeps. Both block at the same ip and sp,
    // with the same return addresses up to sleeper's: a stack taken for one
    // must not be reused for the other.
    assert!(
        (0.4..=0.6).contains(&share(a, a + b)),
        "sleep_caller_a {:.1} ms, sleep_caller_b {:.1} ms: want half each:\n{}",
        share(a, 1_000_000),
        share(b, 1_000_000),
        dump(&off)
    );
}

/// The point of unwinding from tables: with frame pointers, a sleep in
/// Debian's libc (built without them) has no callers. If this fails, the
/// libc here keeps frame pointers and the other tests prove less.
#[test]
fn frame_pointers_lose_the_sleeper() {
    let s = build("fp");
    let p = record(&s, &["--unwind", "fp"], SLEEPS);
    let off = offcpu(&p);
    let sleeping = sleeping(&off);
    let all = weight(&sleeping, |_| true);
    let through = weight(&sleeping, |f| f.contains(&"sleeper"));
    assert!(all >= SLEEPS_NS, "{all} ns in nanosleep:\n{}", dump(&off));
    assert!(
        share(through, all) < 0.5,
        "frame pointers found sleeper in {:.0} % of the sleeps:\n{}",
        share(through, all) * 100.0,
        dump(&off)
    );
}

#[test]
fn busy_leaf_split_follows_its_callers() {
    let s = build("split");
    // busy_leaf burns 500 ms called from caller_a, 1500 ms from caller_b.
    let p = record(&s, &[], "settle:200,split:2000");
    let on = oncpu(&p);
    let leaf = weight(&on, |f| f.contains(&"busy_leaf"));
    let a = weight(&on, |f| has_chain(f, &["split", "caller_a", "busy_leaf"]));
    let b = weight(&on, |f| has_chain(f, &["split", "caller_b", "busy_leaf"]));
    assert!(
        leaf >= 2000 * HZ / 1000 / 2,
        "{leaf} busy_leaf samples, want about {}:\n{}",
        2000 * HZ / 1000,
        dump(&on)
    );
    assert!(
        share(a + b, leaf) >= 0.9,
        "{} of {leaf} busy_leaf samples have their caller:\n{}",
        a + b,
        dump(&on)
    );
    let ratio = share(b, a + b);
    assert!(
        (0.75 * 0.75..=0.75 * 1.25).contains(&ratio),
        "caller_b has {ratio:.3} of busy_leaf's samples ({a} + {b}), want 0.75 ± 25 %"
    );
}

#[test]
fn stacks_end_at_the_thread_entry() {
    let s = build("thread");
    // A thread sleeps 10 ms and burns 10 ms in thread_burn, 50 times, while
    // the main thread burns 1 s in main_burn and then joins it.
    // Every walk is also copied and unwound again in userspace by another
    // unwinder (framehop): none may differ.
    let p = record(&s, &["--verify-unwind=1"], "settle:200,thread:500");
    let v = p.meta.verify_unwind.as_ref().expect("--verify-unwind ran");
    assert!(v.samples >= 100 && v.differs == 0, "{v:#?}");
    let (on, off) = (oncpu(&p), offcpu(&p));
    let thread: Vec<&[&str]> = on
        .iter()
        .chain(&off)
        .filter(|s| !s.main_thread)
        .map(|s| s.frames.as_slice())
        .collect();
    assert!(!thread.is_empty(), "no stacks of the thread");

    // Every stack of the thread starts at the same libc frame (clone3), and
    // thread_fn comes right after glibc's frames (start_thread), the same
    // ones in every stack.
    let root = thread[0][0];
    let mut entry: Option<&[&str]> = None;
    for f in thread {
        assert_eq!(f[0], root, "{}", f.join(";"));
        let Some(at) = f.iter().position(|&x| x == "thread_fn") else {
            continue;
        };
        let before = &f[..at];
        assert!(
            !before.is_empty() && before.iter().all(|x| x.starts_with(LIBC_FRAME)),
            "thread_fn under other than libc's frames: {}",
            f.join(";")
        );
        assert_eq!(*entry.get_or_insert(before), before, "{}", f.join(";"));
    }
    assert!(entry.is_some(), "no stack of the thread through thread_fn");
    let (main_on, thread_on): (Vec<_>, Vec<_>) = on.into_iter().partition(|s| s.main_thread);
    let (main_off, thread_off): (Vec<_>, Vec<_>) = off.into_iter().partition(|s| s.main_thread);
    for (what, stacks) in [("on-CPU", &thread_on), ("off-CPU", &thread_off)] {
        let all = weight(stacks, |_| true);
        let through = weight(stacks, |f| f.contains(&"thread_fn"));
        assert!(
            share(through, all) >= 0.95,
            "{what}: {through} of {all} of the thread's through thread_fn:\n{}",
            dump(stacks)
        );
    }
    assert!(
        weight(&thread_on, |f| has_chain(f, &["thread_fn", "thread_burn"])) > 0,
        "{}",
        dump(&thread_on)
    );

    // The main thread's stacks go through main to _start.
    let all = weight(&main_on, |_| true);
    let whole = weight(&main_on, |f| f[0] == "_start" && f.contains(&"main"));
    // (Two burning threads and hvprof share this machine's CPUs: a loose
    // bound.)
    assert!(
        weight(&main_on, |f| f.contains(&"main_burn")) >= 1000 * HZ / 1000 / 4,
        "{}",
        dump(&main_on)
    );
    assert!(
        share(whole, all) >= 0.95,
        "{whole} of {all} on-CPU samples of the main thread from _start through main:\n{}",
        dump(&main_on)
    );
    for UserStack { frames: f, .. } in &main_off {
        if f.contains(&"thread_step") {
            assert!(f[0] == "_start" && f.contains(&"main"), "{}", f.join(";"));
        }
    }

    // The walks themselves: most reach the entry.
    assert!(
        complete_share(&p) >= 0.9,
        "{:.1} % of the walks complete: {:?}",
        complete_share(&p) * 100.0,
        p.unwind
    );
}

#[test]
fn signal_handler_frames() {
    let s = build("signals");
    // 100 SIGALRMs, 10 ms apart, each handled for 5 ms in handler_work,
    // interrupting interrupted (which makes no calls).
    let p = record(&s, &[], "settle:200,signals:100");
    let on = oncpu(&p);
    // handler_work, under the handler, over glibc's signal trampoline
    // (__restore_rt), over the interrupted function and its callers.
    let whole = weight(&on, |f| {
        let Some(at) = f.iter().position(|&x| x == "handler_work") else {
            return false;
        };
        at >= 3
            && f[at - 1] == "on_alarm"
            && f[at - 2].starts_with(LIBC_FRAME)
            && f[at - 3] == "interrupted"
            && has_chain(f, &["main", "run", "signals", "interrupted"])
            && f[0] == "_start"
    });
    assert_ran_whole(
        &on,
        "handler_work",
        500,
        whole,
        0.8,
        "through the signal frame to main",
    );
}

/// `readelf -d` of `path`.
fn dynamic_section(path: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(path)
        .output()
        .expect("run readelf");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn first_call_through_the_plt() {
    let s = build("lazy");
    // The first call of nanosleep: through the lazily bound PLT, into the
    // dynamic linker's resolver, then nanosleep, 300 ms.
    let dynamic = dynamic_section(&s.workload());
    assert!(
        !dynamic.contains("BIND_NOW") && !dynamic.contains(" NOW"),
        "the workload is not lazily bound:\n{dynamic}"
    );
    let p = record(&s, &[], "settle:200,lazy:300");
    let off = offcpu(&p);
    let first = weight(&off, |f| {
        has_chain(f, &["main", "run", "first_sleep", "nanosleep"]) && f[0] == "_start"
    });
    let sleeping = weight(&off, in_nanosleep);
    assert!(
        first >= 300 * 1_000_000 && first == sleeping,
        "{first} of {sleeping} ns in nanosleep through first_sleep, want 300 ms:\n{}",
        dump(&off)
    );
}

#[test]
fn dlopened_library_is_unwound() {
    let s = build("plugin");
    // 500 ms before the dlopen, 200 ms after it, then plugin_work burns
    // 500 ms and plugin_sleep sleeps 20 × 10 ms, both called from
    // call_plugin.
    let plan = format!("settle:500,plugin:{}", s.plugin().display());
    // Flushed every 100 ms: its stacks are symbolized while it runs, with
    // the mappings the kernel announced since the dlopen (a flush reads
    // again only the maps of a process with a snapshot due).
    let p = record(&s, &["--flush-interval", "100ms"], &plan);
    let (on, off) = (oncpu(&p), offcpu(&p));
    // The library's tables are loaded at its mmap, not by the first stack
    // that meets it: none of its stacks is cut for want of them (the first
    // sample in plugin_work was, when they came that way).
    let unmapped = |f: &[&str]| {
        f.iter().any(|x| x.starts_with("plugin_"))
            && f.first().is_some_and(|root| {
                ["no mapping", "tables not loaded yet"]
                    .iter()
                    .any(|why| *root == format!("[user stack cut: {why}]"))
            })
    };
    for (what, stacks) in [("on-CPU", &on), ("off-CPU", &off)] {
        assert_eq!(
            weight(stacks, unmapped),
            0,
            "{what} stacks in the plugin cut before its tables came:\n{}",
            dump(stacks)
        );
    }
    let through = |leaf: &'static str| {
        move |f: &[&str]| has_chain(f, &["main", "run", "call_plugin", leaf]) && f[0] == "_start"
    };
    let slept = weight(&off, through("plugin_sleep"));
    assert!(
        slept >= 200 * 1_000_000 * 80 / 100,
        "{:.1} ms through call_plugin;plugin_sleep, want 200 ms:\n{}",
        share(slept, 1_000_000),
        dump(&off)
    );
    let whole = weight(&on, through("plugin_work"));
    assert_ran_whole(&on, "plugin_work", 500, whole, 0.95, "through call_plugin");
}

/// `hvprof record ARGS -- sh -c SCRIPT` (off-CPU) in `s`'s directory; the
/// profile.
fn record_script(s: &Scratch, args: &[&str], script: &str) -> Profile {
    let mut all = vec!["--tracers", "offcpu"];
    all.extend(args);
    all.extend(["--", "sh", "-c", script]);
    record_in(s, &all)
}

/// The rows hvprof loaded (`unwind tables: rows`).
fn rows_loaded(p: &Profile) -> u32 {
    let rows = p.meta.counters.get("unwind tables: rows").copied();
    u32::try_from(rows.expect("an unwind rows counter")).expect("rows fit u32")
}

/// Copies of the workload (each its own file, so its own table), run one
/// after the other from one shell: with room in the rows map for the
/// shell's files and about one and a half workload tables, each copy's
/// table fits only once the rows of the copy before it, which exited, are
/// given back. Every copy's sleeps must then be whole, and nothing lost.
#[test]
fn rows_of_exited_processes_make_room_for_new_files() {
    let s = build("reclaim");
    for copy in ["a", "b", "c"] {
        std::fs::create_dir_all(s.0.join(copy)).expect("create a copy's directory");
        std::fs::copy(s.workload(), s.0.join(copy).join("workload")).expect("copy the workload");
    }
    // How many rows the shell's files and one or two workload tables take.
    let one = rows_loaded(&record_script(&s, &[], "./a/workload sleeps:20"));
    let two = rows_loaded(&record_script(
        &s,
        &[],
        "./a/workload sleeps:20; ./b/workload sleeps:20",
    ));
    let table = two - one;
    assert!(table > 0, "{one} rows for one copy, {two} for two");
    let room = one + table / 2;
    let p = record_script(
        &s,
        &["--unwind-max-rows", &room.to_string()],
        "./a/workload sleeps:100; ./b/workload sleeps:100; ./c/workload sleeps:100",
    );
    let counters = &p.meta.counters;
    let given_back = counters.get("unwind tables: tables given back").copied();
    let lost: u64 = p
        .losses
        .iter()
        .filter(|l| l.kind.contains("unwind tables full"))
        .map(|l| l.count)
        .sum();
    let mut whole_by_copy = std::collections::BTreeMap::<u32, (u64, u64)>::new();
    for r in p.offcpu.iter().filter(|r| r.comm == "workload") {
        let frames: Vec<&str> = p.frame_names(&r.stack).collect();
        if !frames
            .iter()
            .any(|&f| f == "nanosleep" || f == "clock_nanosleep")
        {
            continue;
        }
        let whole = frames.first() == Some(&"_start") && has_chain(&frames, &["main"])
            || frames.contains(&"sleeper") && frames.contains(&"main");
        let e = whole_by_copy.entry(r.tgid).or_default();
        e.0 += r.total_ns;
        e.1 += if whole { r.total_ns } else { 0 };
    }
    let report = format!(
        "room {room} rows ({one} for one copy, {table} a table); tables given back \
         {given_back:?}; walks lost to full tables {lost}; per copy (sleeping ns, of \
         them whole) {whole_by_copy:?}; counters {counters:?}"
    );
    assert_eq!(whole_by_copy.len(), 3, "{report}");
    for &(sleeping, whole) in whole_by_copy.values() {
        assert!(sleeping >= 100 * 2_000_000, "{report}");
        assert!(share(whole, sleeping) >= 0.95, "{report}");
    }
    assert_eq!(lost, 0, "{report}");
    assert!(given_back.is_some_and(|n| n >= 2), "{report}");
}

/// The stacks of `stacks` asleep in `nanosleep`.
fn sleeping<'a>(stacks: &[UserStack<'a>]) -> Vec<UserStack<'a>> {
    stacks
        .iter()
        .filter(|s| in_nanosleep(&s.frames))
        .cloned()
        .collect()
}

/// The workload's sleeps in libc's `clock_nanosleep` (at least `want_ns`)
/// unwound whole, through `sleeper` and `main` to `_start`.
fn assert_sleeps_whole(p: &Profile, want_ns: u64) {
    let off = offcpu(p);
    let sleeping = sleeping(&off);
    let all = weight(&sleeping, |_| true);
    let whole = weight(&sleeping, |f| {
        f.first() == Some(&"_start") && f.contains(&"main") && f.contains(&"sleeper")
    });
    assert!(all >= want_ns, "{all} ns in nanosleep:\n{}", dump(&off));
    assert!(
        share(whole, all) >= 0.95,
        "{:.1} % of the sleeps whole:\n{}",
        share(whole, all) * 100.0,
        dump(&off)
    );
}

/// With a small rows map, libc's table (some 20 k rows) is cut in pieces
/// of at most 1/64 of the map, each its own mapping entry: the sleeps in
/// libc's `clock_nanosleep` must still unwind whole through `sleeper` to
/// `_start`.
#[test]
fn tables_cut_in_pieces_unwind_whole() {
    let s = build("pieces");
    let p = record(&s, &["--unwind-max-rows", "131072"], SLEEPS);
    let counters = &p.meta.counters;
    let files = counters
        .get("unwind tables: files loaded")
        .copied()
        .unwrap_or(0);
    let pieces = counters.get("unwind tables: pieces").copied().unwrap_or(0);
    assert!(
        pieces >= files + 8,
        "{pieces} pieces for {files} files: libc was not cut; counters {counters:?}"
    );
    assert_sleeps_whole(&p, SLEEPS_NS);
}

/// A flush's symbol lookup (made to take 1.5 s here, as a first flush can
/// on a slow machine, or one of hundreds of QEMUs) must not keep the
/// recording from what a new process needs: the workload exec'd while the
/// first flush looks up symbols must be snapshotted and get its tables at
/// once, and its sleeps (all within the lookup) must be whole.
#[test]
fn a_process_started_during_a_flush_is_unwound_whole() {
    let s = build("during-flush");
    let p = record_with(
        &s,
        &[
            "--tracers",
            "offcpu",
            "--flush-interval",
            "1s",
            "--",
            "sh",
            "-c",
            "sleep 1.2; ./workload sleeps:100",
        ],
        &[("HVPROF_TEST_SLOW_LOOKUP_MS", "1500")],
    );
    let flush_ms = p.meta.counters.get("flushes while recording: ms").copied();
    assert!(
        flush_ms.is_some_and(|ms| ms >= 1500),
        "no slow flush: {:?}",
        p.meta.counters
    );
    assert_sleeps_whole(&p, 100 * 2_000_000);
}

/// A recording keeps only the stacks a row may still name: every 16
/// flushes, those no flush named lately and no thread holds are dropped.
/// Here (flushes every 100 ms) the stack of `settle`'s poll is walked at
/// its second block (the first loads libc's table) and kept with the
/// thread's site; the third, in the next window (a VM created), puts the
/// second's row in the map, so a flush reads the stack and deletes it from
/// the kernel. The main thread then sleeps elsewhere through the first
/// drop, and blocks in `settle` again for 2.5 s, from its remembered site,
/// through the second. All three blocks must be whole: the site, then the
/// block in progress, hold the stack. The stacks that nothing holds (the
/// sleeps of a thread that exited) are dropped.
#[test]
fn stacks_held_by_threads_outlive_the_drops() {
    let s = build("held");
    let p = record(
        &s,
        &["--flush-interval", "100ms"],
        "settle:200,settle:300,vm:1,settle:200,thread:200,sleeps:600,settle:2500",
    );
    let off = offcpu(&p);
    let in_settle = |f: &[&str]| f.contains(&"settle");
    let settled = weight(&off, in_settle);
    let whole = weight(&off, |f| {
        in_settle(f) && f.first() == Some(&"_start") && f.contains(&"main")
    });
    assert!(
        settled >= 3_000_000_000 && share(whole, settled) >= 0.99,
        "{:.1} ms in settle, {:.1} ms of it whole, want 3000 ms whole:\n{}",
        share(settled, 1_000_000),
        share(whole, 1_000_000),
        dump(&off)
    );
    let counters = &p.meta.counters;
    let dropped = counters.get("stacks dropped: no program held them");
    assert!(dropped.is_some_and(|&n| n > 0), "{counters:?}");
}
