//! Pairing the QEMU monitor (QMP) messages of libvirtd's QEMU driver, as
//! its probes send them (`QMP_MSGS`): each command with QEMU's reply on
//! the same monitor (one command is in flight per monitor), timed and
//! named by its `execute`, an error if the reply is one; events counted by
//! name. The rows go into the next flush; at the stop, the commands still
//! waiting for their reply are rows of their own.

use std::collections::HashMap;

use aya::maps::{MapData, RingBuf};
use profiler_common::record::{QMP_TEXT, QmpMsg, qmp_kind, recorded_window};

use crate::{
    libvirt::{qmp_command, qmp_event, qmp_reply_error},
    profile::{LibvirtCall, merge::merge_rows},
};

/// The name of a message whose text does not say (cut before it, or not
/// JSON).
const UNKNOWN: &str = "?";

/// A command sent, waiting for its reply.
struct Pending {
    window: Option<u32>,
    ts_ns: u64,
    command: String,
}

/// The QMP messages the probes send, read and paired.
pub(super) struct Qmp {
    ring: RingBuf<MapData>,
    paired: Paired,
}

/// The QMP messages read so far, paired.
#[derive(Default)]
struct Paired {
    /// The command in flight, by libvirtd process and monitor.
    pending: HashMap<(u32, u64), Pending>,
    /// Rows since the last [`Paired::take`].
    rows: Vec<LibvirtCall>,
}

impl Qmp {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            ring,
            paired: Paired::default(),
        }
    }

    /// Reads the messages the probes sent since the last read.
    pub fn read(&mut self) {
        let mut msgs = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<QmpMsg>() {
                // SAFETY: the program wrote a QmpMsg (plain old data) here,
                // as long as checked; read_unaligned copes with the ring's
                // 8-byte alignment.
                msgs.push(unsafe { item.as_ptr().cast::<QmpMsg>().read_unaligned() });
            }
        }
        for msg in &msgs {
            self.paired.add(msg);
        }
    }

    /// The rows since the last take, added up.
    pub fn take(&mut self) -> Vec<LibvirtCall> {
        self.paired.take()
    }

    /// At the stop: the last messages, and the commands still waiting for
    /// their reply, timed up to `stop_ns`.
    pub fn stop(&mut self, stop_ns: u64) {
        self.read();
        self.paired.stop(stop_ns);
    }
}

impl Paired {
    fn add(&mut self, msg: &QmpMsg) {
        // A command's row goes to the window it was sent in, as a block's
        // to the window it began in; outside every window there is no row.
        let window = recorded_window(msg.window);
        let len = (msg.len as usize).saturating_sub(1).min(QMP_TEXT);
        let text = &msg.text[..len];
        let monitor = (msg.tgid, msg.mon);
        match msg.kind {
            qmp_kind::SEND => {
                let command = qmp_command(text).unwrap_or_else(|| UNKNOWN.to_owned());
                let sent = Pending {
                    window,
                    ts_ns: msg.ts_ns,
                    command,
                };
                // A command before the last one's reply: the monitor closed
                // (QEMU went) with that one unanswered.
                if let Some(p) = self.pending.insert(monitor, sent) {
                    self.push(msg.tgid, p, LibvirtCall::IN_FLIGHT, msg.ts_ns);
                }
            }
            qmp_kind::REPLY => {
                if let Some(p) = self.pending.remove(&monitor) {
                    let status = if qmp_reply_error(text).is_some() {
                        LibvirtCall::ERROR
                    } else {
                        LibvirtCall::OK
                    };
                    self.push(msg.tgid, p, status, msg.ts_ns);
                }
            }
            qmp_kind::EVENT => self.rows.extend(window.map(|window| LibvirtCall {
                window,
                tgid: msg.tgid,
                kind: LibvirtCall::EVENT.to_owned(),
                name: qmp_event(text).unwrap_or_else(|| UNKNOWN.to_owned()),
                status: LibvirtCall::OK.to_owned(),
                calls: 1,
                ..LibvirtCall::default()
            })),
            _ => {}
        }
        // Tens of messages per VM: merged as they come, the rows stay few.
        if self.rows.len() > 4096 {
            self.rows = merge_rows(std::mem::take(&mut self.rows));
        }
    }

    fn push(&mut self, tgid: u32, p: Pending, status: &str, end_ns: u64) {
        let Some(window) = p.window else {
            return;
        };
        let call = LibvirtCall {
            window,
            tgid,
            kind: LibvirtCall::QMP.to_owned(),
            name: p.command,
            status: status.to_owned(),
            ..LibvirtCall::default()
        };
        self.rows
            .push(call.timed_once(end_ns.saturating_sub(p.ts_ns)));
    }

    fn take(&mut self) -> Vec<LibvirtCall> {
        merge_rows(std::mem::take(&mut self.rows))
    }

    fn stop(&mut self, stop_ns: u64) {
        for (monitor, p) in std::mem::take(&mut self.pending) {
            self.push(monitor.0, p, LibvirtCall::IN_FLIGHT, stop_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::record::{NO_WINDOW, WINDOW_PARITY};

    use super::*;

    fn msg(kind: u32, mon: u64, ts_ns: u64, window: u32, text: &str) -> QmpMsg {
        let mut m = QmpMsg {
            ts_ns,
            mon,
            kind,
            window,
            tgid: 7,
            len: 0,
            text: [0; QMP_TEXT],
        };
        let n = text.len().min(QMP_TEXT - 1);
        m.text[..n].copy_from_slice(&text.as_bytes()[..n]);
        m.len = u32::try_from(n + 1).unwrap();
        m
    }

    fn row<'a>(rows: &'a [LibvirtCall], name: &str, status: &str) -> &'a LibvirtCall {
        rows.iter()
            .find(|r| r.name == name && r.status == status)
            .unwrap_or_else(|| panic!("no {name} {status} in {rows:#?}"))
    }

    /// Commands pair with the replies of their own monitor, whatever
    /// comes between; an error reply is an error; events count by name; a
    /// command never answered is in flight, timed to the stop (or to the
    /// next command on its monitor, which closed).
    #[test]
    fn commands_pair_per_monitor() {
        let mut p = Paired::default();
        let w1 = 1 | WINDOW_PARITY;
        for m in [
            msg(
                qmp_kind::SEND,
                0xa,
                1_000,
                w1,
                r#"{"execute":"qmp_capabilities","id":"libvirt-1"}"#,
            ),
            msg(
                qmp_kind::SEND,
                0xb,
                2_000,
                w1,
                r#"{"execute":"qmp_capabilities","id":"libvirt-1"}"#,
            ),
            msg(
                qmp_kind::EVENT,
                0xb,
                2_500,
                w1,
                r#"{"timestamp": {"seconds": 1764763000, "microseconds": 4}, "event": "RESUME"}"#,
            ),
            msg(
                qmp_kind::REPLY,
                0xb,
                5_000,
                w1,
                r#"{"return": {}, "id": "libvirt-1"}"#,
            ),
            msg(
                qmp_kind::REPLY,
                0xa,
                11_000,
                w1,
                r#"{"return": {}, "id": "libvirt-1"}"#,
            ),
            msg(
                qmp_kind::SEND,
                0xa,
                20_000,
                2,
                r#"{"execute":"query-cpus-fast","id":"libvirt-2"}"#,
            ),
            msg(
                qmp_kind::REPLY,
                0xa,
                20_700,
                2,
                r#"{"id": "libvirt-2", "error": {"class": "GenericError", "desc": "no"}}"#,
            ),
            msg(
                qmp_kind::SEND,
                0xa,
                30_000,
                2,
                r#"{"execute":"cont","id":"libvirt-3"}"#,
            ),
            // A reply on no command in flight is ignored.
            msg(qmp_kind::REPLY, 0xc, 31_000, 2, r#"{"return": {}}"#),
        ] {
            p.add(&m);
        }
        let first = p.take();
        let caps = row(&first, "qmp_capabilities", LibvirtCall::OK);
        assert_eq!(
            (caps.window, caps.calls, caps.total_ns, caps.max_ns),
            (1, 2, 13_000, 10_000)
        );
        assert_eq!(caps.hist.iter().sum::<u64>(), 2);
        let ev = row(&first, "RESUME", LibvirtCall::OK);
        assert_eq!((ev.kind.as_str(), ev.calls), (LibvirtCall::EVENT, 1));
        let err = row(&first, "query-cpus-fast", LibvirtCall::ERROR);
        assert_eq!((err.window, err.calls, err.total_ns), (2, 1, 700));
        assert_eq!(first.len(), 3, "{first:#?}");
        p.stop(45_000);
        let last = p.take();
        let cont = row(&last, "cont", LibvirtCall::IN_FLIGHT);
        assert_eq!((cont.calls, cont.total_ns), (1, 15_000));
        assert_eq!(last.len(), 1);
    }

    /// Text the probe could not read or cut before the member is `?`, not
    /// a loss of the command's time.
    #[test]
    fn unreadable_text_is_named_unknown() {
        let mut p = Paired::default();
        let mut m = msg(qmp_kind::SEND, 1, 0, 1, "");
        m.len = 0;
        p.add(&m);
        p.add(&msg(qmp_kind::REPLY, 1, 9, 1, r#"{"return": {}}"#));
        let rows = p.take();
        assert_eq!(row(&rows, UNKNOWN, LibvirtCall::OK).total_ns, 9);
    }

    /// A command counts in the window it was sent in (as a block in the
    /// one it began in), and not at all if sent outside every window.
    #[test]
    fn commands_count_in_the_window_they_were_sent_in() {
        let mut p = Paired::default();
        for m in [
            msg(
                qmp_kind::SEND,
                0xd,
                40_000,
                1,
                r#"{"execute":"query-block","id":"libvirt-9"}"#,
            ),
            msg(
                qmp_kind::REPLY,
                0xd,
                40_400,
                2 | WINDOW_PARITY,
                r#"{"return": [], "id": "libvirt-9"}"#,
            ),
            msg(
                qmp_kind::SEND,
                0xe,
                40_000,
                NO_WINDOW,
                r#"{"execute":"query-name","id":"libvirt-7"}"#,
            ),
            msg(
                qmp_kind::REPLY,
                0xe,
                40_300,
                2,
                r#"{"return": {}, "id": "libvirt-7"}"#,
            ),
        ] {
            p.add(&m);
        }
        let rows = p.take();
        let block = row(&rows, "query-block", LibvirtCall::OK);
        assert_eq!((block.window, block.total_ns), (1, 400));
        assert_eq!(rows.len(), 1, "{rows:#?}");
    }
}
