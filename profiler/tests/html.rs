//! The HTML report (`hvprof report --html`) of the checked-in sample profile
//! (`samples/massboot/profile.hvprof`): what the file holds, that names from
//! the recorded system are escaped, and — in a real headless chromium
//! (Debian's, installed by `./x test`) — that it renders without
//! console errors, every window's flame graphs load, switching windows
//! works and a hostile function name shows as text. No root needed.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use profiler::{diff, html, profile::Profile};
use serde_json::{Value, json};

fn sample() -> Profile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/massboot/profile.hvprof");
    Profile::read(&path).expect("the checked-in sample profile reads")
}

const HOSTILE_FRAME: &str = "<script>alert(1)</script>";
const HOSTILE_COMM: &str = "x\"><img src=x onerror=alert(2)>";
const HOSTILE_VM: &str = "<script>alert(3)</script>";
// No digits: cgroup tables fold runs of digits to `*`.
const HOSTILE_CGROUP: &str = "/machine/</td><script>alert(document.domain)</script>";
const HOSTILE_TARGET: &str = "pid 1 <b onmouseover=alert(5)>'";

/// The sample with hostile names where every kind of recorded name shows:
/// the frame with the most on-CPU samples in window 1, the comm of window
/// 1's on-CPU rows, a guest name and command line, a cgroup path and the
/// target.
fn hostile() -> Profile {
    let mut p = sample();
    let mut by_frame: BTreeMap<u32, u64> = BTreeMap::new();
    for r in p.oncpu.iter().filter(|r| r.window == 1) {
        for &f in &r.stack {
            *by_frame.entry(f).or_default() += r.samples;
        }
    }
    let (&top, _) = by_frame.iter().max_by_key(|(_, n)| **n).unwrap();
    HOSTILE_FRAME.clone_into(&mut p.frames[top as usize]);
    for r in p.oncpu.iter_mut().filter(|r| r.window == 1) {
        HOSTILE_COMM.clone_into(&mut r.comm);
    }
    p.vms[0].name = Some(HOSTILE_VM.to_owned());
    p.vms[0].cmdline = Some(format!("qemu -name '{HOSTILE_VM}' \"&"));
    let c = p.cgroups.iter_mut().find(|c| c.window == 1).unwrap();
    HOSTILE_CGROUP.clone_into(&mut c.path);
    HOSTILE_TARGET.clone_into(&mut p.meta.target);
    p
}

/// The `data-srcdoc='…'` attributes of a page, decoded (the documents the
/// flame graph frames show).
fn srcdocs(page: &str) -> Vec<String> {
    page.split("data-srcdoc='")
        .skip(1)
        .map(|s| {
            s[..s.find('\'').unwrap()]
                .replace("&#39;", "'")
                .replace("&amp;", "&")
        })
        .collect()
}

/// The sum of a graph's folded counts in a window: inferno's total.
fn folded_total(p: &Profile, g: &profiler::graphs::Graph, window: u32) -> u64 {
    g.folded(p, window)
        .iter()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum()
}

/// The part of `page` that holds window `id`'s panel.
fn window_panel(page: &str, id: u32) -> &str {
    let start = page
        .find(&format!("<section class=\"window\" data-window=\"{id}\""))
        .unwrap_or_else(|| panic!("no panel for window {id}"));
    let len = page[start..].find("</section>").unwrap();
    &page[start..start + len]
}

#[test]
fn report_has_every_window_heatmap_and_tables() {
    let p = sample();
    let page = html::report(&p).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    // Self-contained: nothing is fetched.
    for fetch in [
        "src=\"http",
        "href=\"http",
        "src='http",
        "<link",
        "@import",
        "url(http",
    ] {
        assert!(!page.contains(fetch), "the page fetches something: {fetch}");
    }
    assert!(page.contains("default-src 'none'"), "no CSP");

    for w in &p.windows {
        let panel = window_panel(&page, w.id);
        let docs = srcdocs(panel);
        assert_eq!(
            docs.len(),
            profiler::graphs::GRAPHS.len(),
            "window {}: a flame graph per graph",
            w.id
        );
        for (g, doc) in profiler::graphs::GRAPHS.iter().zip(&docs) {
            // The right graph of the right window: its title, and inferno's
            // total equals the sum of the window's folded counts.
            let title = g.title_for(w);
            assert!(
                doc.contains(&html::escape(&title)),
                "window {} {}: title {title:?} missing",
                w.id,
                g.name
            );
            let total = folded_total(&p, g, w.id);
            if total == 0 {
                assert!(
                    doc.contains("nothing recorded in this window"),
                    "{}",
                    g.name
                );
            } else {
                assert!(
                    doc.contains(&format!("total_samples=\"{total}\"")),
                    "window {} {}: total {total}",
                    w.id,
                    g.name
                );
            }
        }
        // The window's tables and its losses.
        for h in [
            "Kernel lock contention",
            "Forks",
            "Cgroup operations",
            "Blocking D-Bus calls",
            "Losses",
        ] {
            assert!(
                panel.contains(&format!(">{h}</h4>")),
                "window {}: {h}",
                w.id
            );
        }
        let locks = profiler::tables::locks(&p, Some(w.id));
        if let Some(top) = locks.first() {
            assert!(panel.contains(&html::escape(&top.lock)), "window {}", w.id);
        }
        // The D-Bus tracer did not run in the sample: said so, not "none".
        assert!(panel.contains("the dbus tracer was not part of this recording"));
    }
    // The whole recording's tables: every lock of the recording.
    let whole = &page[page.find("id=\"whole\"").unwrap()..];
    for l in profiler::tables::locks(&p, None) {
        assert!(whole.contains(&html::escape(&l.address)), "{}", l.address);
    }
    assert!(whole.contains("/machine/qemu-*.libvirt-qemu"));

    check_heatmap(&p, &page);
    // The timeline: one point per VM, and the latencies derived from the
    // forks of libvirt's helper child (every VM of the sample has one).
    assert_eq!(page.matches("<circle class=\"vm\"").count(), p.vms.len());
    let lat = html::vm_latencies(&p);
    assert!(lat.iter().all(|l| l.fork_to_create_ns.is_some()), "{lat:?}");
    // VM 1: QEMU 26811 exec'd at 856.633 ms (the creation, counted by
    // exec), forked by 26810, itself forked at 816.353 ms.
    assert_eq!(lat[0].fork_to_create_ns, Some(856_631_944 - 816_352_924));
    assert_eq!(lat[0].since_previous_ns, None);
    assert_eq!(lat[1].since_previous_ns, Some(860_677_839 - 856_631_944));
}

/// One heatmap cell per metric and window, with the window's value counted
/// here from the profile's rows.
fn check_heatmap(p: &Profile, page: &str) {
    let heat = &page[page.find("<table class=\"heatmap\"").unwrap()..];
    let heat = &heat[..heat.find("</table>").unwrap()];
    for w in &p.windows {
        let samples: u64 = p
            .oncpu
            .iter()
            .filter(|r| r.window == w.id)
            .map(|r| r.samples)
            .sum();
        let off: u64 = p
            .offcpu
            .iter()
            .filter(|r| r.window == w.id)
            .map(|r| r.total_ns)
            .sum();
        let forks: u64 = p
            .forks
            .iter()
            .filter(|r| r.window == w.id)
            .map(|r| r.count)
            .sum();
        for (metric, v) in [
            ("on-CPU samples", samples),
            ("off-CPU time", off),
            ("forks", forks),
        ] {
            let cell = format!(
                "data-select-window=\"{}\" data-scroll=\"\" data-metric=\"{metric}\" data-value=\"{v}\"",
                w.id
            );
            assert!(heat.contains(&cell), "heatmap cell {cell}");
        }
    }
    // VMs created, and the heatmap metrics of the tracers it ran (the
    // sample predates the dbus and libvirt tracers: their rows would say
    // 0 for what was not measured).
    let rows = 1 + profiler::ci::Metric::ALL
        .into_iter()
        .filter(|m| m.heatmap().is_some() && m.tracer().is_none_or(|t| p.recorded(t)))
        .count();
    assert_eq!(rows, 7, "{:?}", p.meta.tracers);
    assert_eq!(
        heat.matches("<td class=\"cell\"").count(),
        rows * p.windows.len(),
        "metrics × windows"
    );
}

#[test]
fn hostile_names_are_escaped_everywhere() {
    let page = html::report(&hostile()).unwrap();
    // Nothing hostile is markup in the page, nor in any frame's document.
    let mut docs = srcdocs(&page);
    docs.push(page.clone());
    for doc in &docs {
        for raw in ["<script>alert", "<img", "<b onmouseover", "</td><script"] {
            assert!(!doc.contains(raw), "raw {raw:?} in the report");
        }
    }
    // The page has exactly its own script (outside the frames' documents);
    // every frame its own two (the replaceState guard and inferno's).
    let outside: String = page
        .split("data-srcdoc='")
        .enumerate()
        .map(|(i, s)| {
            if i == 0 {
                s
            } else {
                &s[s.find('\'').unwrap()..]
            }
        })
        .collect();
    assert_eq!(outside.matches("<script").count(), 1);
    for d in &docs[..docs.len() - 1] {
        assert!(d.matches("<script").count() <= 2, "{}", &d[..200]);
    }
    // …and the names are there, as text.
    for name in [HOSTILE_VM, HOSTILE_CGROUP, HOSTILE_TARGET] {
        assert!(page.contains(&html::escape(name)), "{name}");
    }
    let w1 = srcdocs(window_panel(&page, 1));
    assert!(w1[0].contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
}

#[test]
fn report_command_writes_the_page() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("html-report-cmd");
    let _ = fs::remove_dir_all(&dir);
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/massboot/profile.hvprof");
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .arg("report")
        .arg(&profile)
        .arg("-o")
        .arg(&dir)
        .arg("--html")
        .output()
        .unwrap();
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = dir.join(html::FILE_NAME);
    let size = fs::metadata(&page).unwrap().len();
    println!(
        "hvprof report --html: {} ms, {} ({size} bytes)",
        elapsed.as_millis(),
        page.display()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("report.html"));
    // Next to the per-window outputs, which it does not replace.
    assert!(dir.join("w01-vms-1-4/oncpu.svg").is_file());
    assert!(size > 100_000, "{size}");
}

// ---- the browser ------------------------------------------------------

/// Headless chromium driven over the Chrome `DevTools` protocol on a pipe
/// (`--remote-debugging-pipe`: fd 3 in, fd 4 out, NUL-separated JSON). The
/// process group it starts is killed on drop, also when a test fails.
struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    rx: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    /// Console errors, exceptions and log errors, as text.
    errors: Vec<String>,
    /// Messages of JavaScript dialogs that opened (alert, confirm, prompt).
    dialogs: Vec<String>,
    dir: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on the process group this Browser started
        // (process_group(0) made its pid the group id).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn chromium() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromium is not installed; `./x test` installs it (Debian's chromium package), or run `apt-get install chromium`"
            )
        })
}

impl Browser {
    fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// [`Browser::start`] with more chromium flags.
    fn start_with(name: &str, flags: &[&str]) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chromium-{name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (chrome_in, to) = std::io::pipe().unwrap();
        let (from, chrome_out) = std::io::pipe().unwrap();
        let (cin, cout) = (chrome_in.as_raw_fd(), chrome_out.as_raw_fd());
        let mut cmd = Command::new(chromium());
        cmd.args([
            "--headless",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--window-size=1280,1000",
        ])
        .args(flags)
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("chromium.log")).unwrap())
        .process_group(0);
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // Chromium's sandbox refuses to run as root.
            cmd.arg("--no-sandbox");
        }
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
        // and exec. The pipe ends are first moved above fd 10 so that
        // placing them at 3 and 4 cannot overwrite one with the other.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(cin, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(cout, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting chromium");
        drop((chrome_in, chrome_out));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(from);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    break;
                }
                buf.clear();
            }
        });
        let mut b = Self {
            child,
            to,
            rx,
            next_id: 0,
            session: String::new(),
            errors: Vec::new(),
            dialogs: Vec::new(),
            dir,
        };
        let target = b.call("Target.createTarget", &json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().unwrap().to_owned();
        let attached = b.call(
            "Target.attachToTarget",
            &json!({"targetId": target, "flatten": true}),
        );
        attached["sessionId"]
            .as_str()
            .unwrap()
            .clone_into(&mut b.session);
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            b.call(domain, &json!({}));
        }
        b
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Handles an event: collects errors and dialogs (and dismisses the
    /// dialog, so the page goes on).
    fn event(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str().unwrap_or("") {
            "Runtime.exceptionThrown" => self.errors.push(format!(
                "exception: {}",
                p["exceptionDetails"]["exception"]["description"]
                    .as_str()
                    .unwrap_or_else(|| p["exceptionDetails"]["text"].as_str().unwrap_or("?"))
            )),
            "Runtime.consoleAPICalled"
                if matches!(p["type"].as_str(), Some("error" | "assert")) =>
            {
                self.errors
                    .push(format!("console.{}: {}", p["type"], p["args"]));
            }
            "Log.entryAdded" if p["entry"]["level"] == "error" => {
                self.errors.push(format!(
                    "log: {}",
                    p["entry"]["text"].as_str().unwrap_or("?")
                ));
            }
            "Page.javascriptDialogOpening" => {
                self.dialogs
                    .push(p["message"].as_str().unwrap_or("").to_owned());
                self.send("Page.handleJavaScriptDialog", &json!({"accept": false}));
            }
            _ => {}
        }
    }

    fn send(&mut self, method: &str, params: &Value) -> u64 {
        self.next_id += 1;
        let mut msg = json!({"id": self.next_id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        self.next_id
    }

    /// Waits for a message matching `pred`, handling events meanwhile.
    fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.rx.recv_timeout(left) {
                Ok(v) => v,
                Err(e) => panic!(
                    "chromium: no {what} within {timeout:?} ({e}); its log:\n{}",
                    self.log_tail()
                ),
            };
            if v.get("method").is_some() {
                self.event(&v);
            }
            if pred(&v) {
                return v;
            }
        }
    }

    fn call(&mut self, method: &str, params: &Value) -> Value {
        let id = self.send(method, params);
        let v = self.wait_for(method, Duration::from_secs(30), |v| v["id"] == id);
        assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
        v["result"].clone()
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its
    /// value; a JavaScript exception fails the test.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            &json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    fn open(&mut self, page: &Path) {
        let url = format!("file://{}", page.canonicalize().unwrap().display());
        self.send("Page.navigate", &json!({"url": url}));
        self.wait_for("page load", Duration::from_secs(30), |v| {
            v["method"] == "Page.loadEventFired"
        });
    }

    /// Waits until the frames of the selected window have loaded their
    /// graph and inferno's script has laid it out; returns the window.
    fn settle(&mut self) -> String {
        let v = self.eval(
            r#"new Promise((resolve, reject) => {
                const t0 = Date.now();
                (function poll() {
                    const id = document.body.getAttribute("data-selected-window");
                    const s = document.querySelector(`section.window[data-window="${id}"]`);
                    const frames = s ? [...s.querySelectorAll("iframe")] : [];
                    const ready = frames.length > 0 && frames.every(f => {
                        const d = f.contentDocument;
                        return d && d.readyState === "complete" && d.querySelector("svg") &&
                            (!d.getElementById("frames") || d.getElementById("unzoom").classList.contains("hide"));
                    });
                    if (ready) return setTimeout(() => resolve(id), 300);
                    if (Date.now() - t0 > 15000) return reject(new Error("frames of window " + id + " did not load"));
                    setTimeout(poll, 50);
                })();
            })"#,
        );
        v.as_str().unwrap().to_owned()
    }

    fn screenshot(&mut self, path: &Path) {
        let m = self.call("Page.getLayoutMetrics", &json!({}));
        let size = &m["cssContentSize"];
        let shot = self.call(
            "Page.captureScreenshot",
            &json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            }),
        );
        fs::write(path, base64(shot["data"].as_str().unwrap())).unwrap();
    }

    fn assert_clean(&self) {
        assert!(
            self.dialogs.is_empty(),
            "dialogs opened: {:?}",
            self.dialogs
        );
        assert!(self.errors.is_empty(), "console errors: {:#?}", self.errors);
    }
}

fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | u32::from(val(c)) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Selects window `w` with its button and checks that exactly its panel
/// shows, with its four graphs loaded: each frame's document is the graph
/// of this window (its title, and inferno's total equal to the folded
/// counts), laid out to the frame's width.
fn select_and_check_window(b: &mut Browser, p: &Profile, w: &profiler::windows::WindowInfo) {
    b.eval(&format!(
        "document.querySelector('nav.windows [data-select-window=\"{}\"]').click()",
        w.id
    ));
    assert_eq!(b.settle(), w.id.to_string());
    let shown = b.eval(
        "[...document.querySelectorAll('section.window')].filter(s => !s.hidden && s.offsetParent !== null).map(s => s.dataset.window)",
    );
    assert_eq!(shown, json!([w.id.to_string()]));
    let graphs = b.eval(&format!(
        r#"[...document.querySelectorAll('section.window[data-window="{}"] iframe')].map(f => {{
            const d = f.contentDocument;
            const fr = d.getElementById("frames");
            return {{
                title: d.querySelector("svg text").textContent,
                total: fr ? Number(fr.getAttribute("total_samples")) : 0,
                boxes: fr ? fr.children.length : 0,
                width: d.querySelector("svg").getBoundingClientRect().width,
            }};
        }})"#,
        w.id
    ));
    let graphs = graphs.as_array().unwrap();
    assert_eq!(
        graphs.len(),
        profiler::graphs::GRAPHS.len(),
        "window {}",
        w.id
    );
    for (g, got) in profiler::graphs::GRAPHS.iter().zip(graphs) {
        let total = folded_total(p, g, w.id);
        assert_eq!(got["title"], json!(g.title_for(w)), "window {}", w.id);
        assert_eq!(got["total"], json!(total), "window {} {}", w.id, g.name);
        assert_eq!(got["boxes"].as_u64().unwrap() > 0, total > 0, "{got}");
        assert!(
            got["width"].as_f64().unwrap() > 1000.0,
            "graph fills the frame: {got}"
        );
    }
}

#[test]
fn browser_renders_the_report_and_switches_windows() {
    let p = sample();
    let page = artifacts().join("report.html");
    html::write_report(&p, &page).unwrap();
    let mut b = Browser::start("report");
    b.open(&page);
    let first = b.settle();
    assert_eq!(first, "1", "opens on the first window with VMs");
    for w in &p.windows {
        select_and_check_window(&mut b, &p, w);
    }

    // A heatmap cell selects its window.
    b.eval("document.querySelector('table.heatmap td.cell[data-select-window=\"3\"]').click()");
    assert_eq!(b.settle(), "3");
    // The heatmap's per-VM switch divides by the VMs created in the window
    // (none in the setup window), and switches back.
    let w1 = &p.windows[1];
    let samples: u64 = p
        .oncpu
        .iter()
        .filter(|r| r.window == 1)
        .map(|r| r.samples)
        .sum();
    let vms = p
        .vms
        .iter()
        .filter(|v| (w1.first_vm.unwrap()..=w1.last_vm.unwrap()).contains(&v.ordinal))
        .count() as u64;
    let cells = b.eval(
        r#"(() => {
            const box = document.getElementById("heatmap-per-vm");
            const cell = w => document.querySelector(`table.heatmap td.cell[data-metric="on-CPU samples"][data-select-window="${w}"]`).textContent;
            box.click();
            const r = {setup: cell(0), w1: cell(1)};
            box.click();
            r.back = cell(1);
            return r;
        })()"#,
    );
    assert_eq!(
        cells,
        json!({
            "setup": "-",
            "w1": format!("{} per VM", (samples + vms / 2) / vms),
            "back": samples.to_string(),
        })
    );
    // Inferno's zoom and search work inside the frame.
    let zoom = b.eval(
        r##"(() => {
            const w = document.querySelector('section.window[data-window="3"] iframe').contentWindow;
            const d = w.document;
            w.search("qemu");
            const matched = d.getElementById("matched").textContent;
            const boxes = d.querySelectorAll("#frames > g");
            const g = boxes[boxes.length - 1];
            g.querySelector("rect").dispatchEvent(new MouseEvent("click", {bubbles: true}));
            const zoomed = !d.getElementById("unzoom").classList.contains("hide");
            return {zoomed, matched};
        })()"##,
    );
    assert_eq!(zoom["zoomed"], json!(true), "{zoom}");
    assert!(
        zoom["matched"].as_str().unwrap().contains("Matched"),
        "{zoom}"
    );
    b.eval("document.querySelector('nav.windows [data-select-window=\"1\"]').click()");
    b.settle();
    let shot = artifacts().join("report.png");
    b.screenshot(&shot);
    println!("screenshot: {}", shot.display());
    assert!(fs::metadata(&shot).unwrap().len() > 10_000);
    assert!(fs::read(&shot).unwrap().starts_with(b"\x89PNG"));
    b.assert_clean();
}

#[test]
fn browser_shows_hostile_names_as_text() {
    let page = artifacts().join("report-hostile.html");
    html::write_report(&hostile(), &page).unwrap();
    let mut b = Browser::start("hostile");
    b.open(&page);
    assert_eq!(b.settle(), "1");
    // Zoom into the hostile frame: inferno writes its name into the box.
    let r = b.eval(&format!(
        r##"(() => {{
            const d = document.querySelector('section.window[data-window="1"] iframe').contentDocument;
            const g = [...d.querySelectorAll("#frames > g")].find(g => g.querySelector("title").textContent.startsWith({frame}));
            if (g) g.querySelector("rect").dispatchEvent(new MouseEvent("click", {{bubbles: true}}));
            const comm = [...d.querySelectorAll("#frames > g title")].some(t => t.textContent.startsWith({comm}));
            return {{
                frame: !!g,
                box: g ? g.querySelector("text").textContent : "",
                comm,
                frameImgs: d.querySelectorAll("img").length,
                frameScripts: d.querySelectorAll("script").length,
                page: document.body.textContent,
                pageImgs: document.querySelectorAll("img").length,
                pageScripts: document.querySelectorAll("script").length,
                title: document.title,
            }};
        }})()"##,
        frame = json!(HOSTILE_FRAME),
        // Folded stacks write a comm's spaces as `_`.
        comm = json!(HOSTILE_COMM.replace(' ', "_")),
    ));
    assert_eq!(r["frame"], json!(true), "hostile frame not in the graph");
    assert!(
        r["box"].as_str().unwrap().contains("alert(1)"),
        "{}",
        r["box"]
    );
    assert_eq!(r["comm"], json!(true), "hostile comm not in the graph");
    assert_eq!(r["frameImgs"], json!(0));
    assert_eq!(r["frameScripts"], json!(2));
    assert_eq!(r["pageImgs"], json!(0));
    assert_eq!(r["pageScripts"], json!(1));
    let text = r["page"].as_str().unwrap();
    for name in [HOSTILE_VM, HOSTILE_CGROUP, HOSTILE_TARGET] {
        assert!(text.contains(name), "{name} not shown as text");
    }
    assert!(r["title"].as_str().unwrap().contains(HOSTILE_TARGET));
    // Hovering shows the name in inferno's details line, as text; then
    // give anything that would run late (an onerror) time to.
    let details = b.eval(&format!(
        r##"new Promise(resolve => {{
            const d = document.querySelector('section.window[data-window="1"] iframe').contentDocument;
            const g = [...d.querySelectorAll("#frames > g")].find(g => g.querySelector("title").textContent.startsWith({frame}));
            g.querySelector("rect").dispatchEvent(new MouseEvent("mouseover", {{bubbles: true}}));
            setTimeout(() => resolve(d.getElementById("details").textContent), 300);
        }})"##,
        frame = json!(HOSTILE_FRAME),
    ));
    assert!(
        details.as_str().unwrap().contains(HOSTILE_FRAME),
        "{details}"
    );
    b.assert_clean();
}

/// `hvprof diff`'s page, opened from disk as a CI artifact would be: each
/// window's differential flame graphs are files next to it, loaded into
/// frames when the window is selected. Every window shows its four graphs
/// (the right window and tracer, B's total, laid out to the frame's width),
/// the changed stack is coloured, and nothing logs an error (a frame the
/// page's security policy blocked would).
#[test]
fn browser_renders_the_diff_page_and_its_graph_files() {
    let dir = artifacts().join("diff");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    // B: window 3's biggest on-CPU row has three times its samples.
    let a = sample();
    let mut b = a.clone();
    let row = b
        .oncpu
        .iter_mut()
        .filter(|r| r.window == 3)
        .max_by_key(|r| r.samples)
        .unwrap();
    row.samples *= 3;
    let b_path = dir.join("b.hvprof");
    b.write(&b_path).unwrap();
    let a_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/massboot/profile.hvprof");
    let out = dir.join("out");
    diff::run(&diff::DiffArgs {
        a: &[a_path],
        b: &[b_path],
        output: &out,
        normalize: true,
        common_windows: false,
        gates: &[],
        markdown_summary: None,
    })
    .unwrap();
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("diff.json")).unwrap()).unwrap();

    // The frames' documents are files of their own; chromium gives each
    // file its own origin unless told otherwise, and the checks below read
    // the frames' documents from the page.
    let mut br = Browser::start_with("diff", &["--allow-file-access-from-files"]);
    br.open(&out.join("diff.html"));
    assert_eq!(br.settle(), "1", "opens on the first window with VMs");
    for (w, sec) in a.windows.iter().zip(report["windows"].as_array().unwrap()) {
        br.eval(&format!(
            "document.querySelector('nav.windows [data-select-window=\"{}\"]').click()",
            w.id
        ));
        assert_eq!(br.settle(), w.id.to_string());
        let graphs = br.eval(&format!(
            r#"[...document.querySelectorAll('section.window[data-window="{}"] iframe')].map(f => {{
                const d = f.contentDocument;
                const fr = d.getElementById("frames");
                return {{
                    src: f.getAttribute("src"),
                    title: d.querySelector("svg text").textContent,
                    total: fr ? Number(fr.getAttribute("total_samples")) : 0,
                    changed: fr ? [...fr.querySelectorAll("rect")].filter(r => r.getAttribute("fill") !== "rgb(250,250,250)").length : 0,
                    width: d.querySelector("svg").getBoundingClientRect().width,
                }};
            }})"#,
            w.id
        ));
        let graphs = graphs.as_array().unwrap();
        let want = sec["flame_graphs"].as_array().unwrap();
        assert_eq!(
            graphs.len(),
            profiler::graphs::GRAPHS.len(),
            "window {}",
            w.id
        );
        for (got, f) in graphs.iter().zip(want) {
            let tracer = f["tracer"].as_str().unwrap();
            assert_eq!(got["src"], f["svg"], "window {} {tracer}", w.id);
            let title = got["title"].as_str().unwrap();
            assert!(
                title.contains(&format!("window {} ({})", w.id, w.label())),
                "window {} {tracer}: {title}",
                w.id
            );
            let b_total = f["b_total"].as_u64().unwrap();
            if b_total == 0 {
                assert!(title.contains("nothing in B"), "{title}");
            } else {
                // inferno draws B's widths.
                assert_eq!(got["total"], json!(b_total), "window {} {tracer}", w.id);
                assert!(
                    got["width"].as_f64().unwrap() > 1000.0,
                    "graph fills the frame: {got}"
                );
            }
            // Only window 3's on-CPU graph has frames that changed.
            let changed = got["changed"].as_u64().unwrap() > 0;
            assert_eq!(
                changed,
                w.id == 3 && tracer == "oncpu",
                "window {} {tracer}: {got}",
                w.id
            );
        }
    }
    br.eval("document.querySelector('nav.windows [data-select-window=\"3\"]').click()");
    br.settle();
    br.assert_clean();
    // Last: the capture beyond the viewport lays the frames out anew, at
    // 0 px for a moment, and inferno's script in each says so (the
    // report's inline graphs carry a guard against it; a file cannot).
    let shot = artifacts().join("diff.png");
    br.screenshot(&shot);
    println!("screenshot: {}", shot.display());
    assert!(fs::read(&shot).unwrap().starts_with(b"\x89PNG"));
}
