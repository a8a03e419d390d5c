//! The kernel's tracing filesystem: where it is, which tracepoints exist, and
//! the layout of their records (read from each event's `format` file, so that
//! hvprof never hard-codes a field offset that a kernel update may move).

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// A static tracepoint, `category:name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tracepoint {
    pub category: &'static str,
    pub name: &'static str,
}

impl Tracepoint {
    #[must_use]
    pub const fn new(category: &'static str, name: &'static str) -> Self {
        Self { category, name }
    }
}

impl fmt::Display for Tracepoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.category, self.name)
    }
}

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted (looked in /proc/mounts, /sys/kernel/tracing and \
         /sys/kernel/debug/tracing); mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    NotMounted,
    #[error(
        "tracepoint {tracepoint} does not exist on this kernel ({path} is missing); \
         the kernel was built without it"
    )]
    NoTracepoint { tracepoint: String, path: PathBuf },
    #[error(
        "tracefs at {path} is not readable by this user; run as root (or chmod its events directory)"
    )]
    NotReadable { path: PathBuf },
    #[error(
        "tracefs is not mounted, and mounting it at {path} failed: {source}; \
         run as root, or mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    Mount { path: PathBuf, source: io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("tracepoint {tracepoint} has no field `{field}` in its format")]
    NoField { tracepoint: String, field: String },
}

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds the tracefs mount.
    pub fn locate() -> Result<Self, TracefsError> {
        let from_mounts = fs::read_to_string("/proc/mounts").ok().and_then(|m| {
            m.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
                (ty == "tracefs").then(|| PathBuf::from(dir))
            })
        });
        if let Some(root) = from_mounts {
            // Mounted, but tracefs is root-only by default.
            return match fs::read_dir(root.join("events")) {
                Ok(_) => Ok(Self { root }),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    Err(TracefsError::NotReadable { path: root })
                }
                Err(source) => Err(TracefsError::Read { path: root, source }),
            };
        }
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .map(PathBuf::from)
            .into_iter()
            .find(|p| p.join("events").is_dir())
            .map(|root| Self { root })
            .ok_or(TracefsError::NotMounted)
    }

    /// Finds the tracefs mount, mounting tracefs at `/sys/kernel/tracing`
    /// if it is not mounted anywhere (systemd does this at boot; a minimal
    /// init does not). Returns whether hvprof mounted it. The mount is left in
    /// place: unmounting could break another tracer that started meanwhile.
    pub fn locate_or_mount() -> Result<(Self, bool), TracefsError> {
        match Self::locate() {
            Ok(t) => return Ok((t, false)),
            Err(TracefsError::NotMounted) => {}
            Err(e) => return Err(e),
        }
        let dir = Path::new("/sys/kernel/tracing");
        if !dir.is_dir() {
            return Err(TracefsError::NotMounted);
        }
        // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
        let rc = unsafe {
            libc::mount(
                c"nodev".as_ptr(),
                c"/sys/kernel/tracing".as_ptr(),
                c"tracefs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let source = io::Error::last_os_error();
            return Err(TracefsError::Mount {
                path: dir.to_path_buf(),
                source,
            });
        }
        Self::locate().map(|t| (t, true))
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn event_dir(&self, tp: Tracepoint) -> PathBuf {
        self.root.join("events").join(tp.category).join(tp.name)
    }

    /// The tracepoint's id, which also proves it exists.
    pub fn id(&self, tp: Tracepoint) -> Result<u64, TracefsError> {
        let path = self.event_dir(tp).join("id");
        let text = fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                TracefsError::NoTracepoint {
                    tracepoint: tp.to_string(),
                    path: path.clone(),
                }
            } else {
                TracefsError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        text.trim().parse().map_err(|_| TracefsError::Read {
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, "id is not a number"),
        })
    }

    /// The record layout of a tracepoint.
    pub fn format(&self, tp: Tracepoint) -> Result<Format, TracefsError> {
        let path = self.event_dir(tp).join("format");
        let text = fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                TracefsError::NoTracepoint {
                    tracepoint: tp.to_string(),
                    path: path.clone(),
                }
            } else {
                TracefsError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Ok(Format::parse(tp, &text))
    }
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The fields of a tracepoint record, as the `format` file lists them.
#[derive(Clone, Debug)]
pub struct Format {
    tracepoint: String,
    fields: Vec<Field>,
}

impl Format {
    /// Parses the text of an event's `format` file. Lines that are not
    /// fields are ignored.
    #[must_use]
    pub fn parse(tp: Tracepoint, text: &str) -> Self {
        let fields = text
            .lines()
            .filter_map(|line| {
                let line = line.trim().strip_prefix("field:")?;
                let mut decl = None;
                let mut offset = None;
                let mut size = None;
                for part in line.split(';').map(str::trim) {
                    if let Some(v) = part.strip_prefix("offset:") {
                        offset = v.parse().ok();
                    } else if let Some(v) = part.strip_prefix("size:") {
                        size = v.parse().ok();
                    } else if decl.is_none() && !part.is_empty() {
                        decl = Some(part);
                    }
                }
                // `char prev_comm[16]` → `prev_comm`; `pid_t pid` → `pid`.
                let name = decl?.rsplit(' ').next()?.split('[').next()?.to_owned();
                Some(Field {
                    name,
                    offset: offset?,
                    size: size?,
                })
            })
            .collect();
        Self {
            tracepoint: tp.to_string(),
            fields,
        }
    }

    pub fn field(&self, name: &str) -> Result<&Field, TracefsError> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| TracefsError::NoField {
                tracepoint: self.tracepoint.clone(),
                field: name.to_owned(),
            })
    }

    /// The offset of a field that must have one of `sizes` bytes.
    pub fn offset(&self, name: &str, sizes: &[u32]) -> Result<u32, TracefsError> {
        let f = self.field(name)?;
        if sizes.contains(&f.size) {
            Ok(f.offset)
        } else {
            Err(TracefsError::NoField {
                tracepoint: self.tracepoint.clone(),
                field: format!("{name} (size {} instead of {sizes:?})", f.size),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED_SWITCH: &str = "name: sched_switch
ID: 316
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;
\tfield:int next_prio;\toffset:60;\tsize:4;\tsigned:1;

print fmt: \"prev_comm=%s\"
";

    #[test]
    fn parses_sched_switch_format() {
        let f = Format::parse(Tracepoint::new("sched", "sched_switch"), SCHED_SWITCH);
        assert_eq!(f.offset("prev_pid", &[4]).unwrap(), 24);
        assert_eq!(f.offset("prev_state", &[4, 8]).unwrap(), 32);
        assert_eq!(f.offset("next_pid", &[4]).unwrap(), 56);
        assert_eq!(f.field("prev_comm").unwrap().size, 16);
        let err = f.offset("prev_state", &[4]).unwrap_err().to_string();
        assert!(err.contains("size 8"), "{err}");
        let err = f.field("nope").unwrap_err().to_string();
        assert!(
            err.contains("sched:sched_switch") && err.contains("nope"),
            "{err}"
        );
    }
}
