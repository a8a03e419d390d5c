//! The few members of QMP messages the tables need, read from the JSON
//! text libvirtd's `qemu_monitor_*` probes see.
//!
//! The probes read a bounded prefix of the text, so a message may end
//! anywhere: a member is found if it, and everything before it at the top
//! level, is whole; the rest of the text is never looked at. A small
//! scanner does this rather than a JSON parser, which would refuse the
//! cut text. Nested values are skipped without recursion, so no input
//! can exhaust the stack, and nothing here panics.

/// The command of a QMP command message: its `execute` (or `exec-oob`)
/// member, as `{"execute":"query-cpus-fast","id":"libvirt-12"}` has it.
#[must_use]
pub fn qmp_command(msg: &[u8]) -> Option<String> {
    let mut s = Scanner::new(msg);
    s.member(&["execute", "exec-oob"])?;
    s.string()
}

/// The class of a QMP error reply (`GenericError`, `DeviceNotFound`, …):
/// `{"error": {"class": …, "desc": …}, "id": …}`; `None` for a success
/// (`{"return": …}`) or a reply cut before the class.
#[must_use]
pub fn qmp_reply_error(reply: &[u8]) -> Option<String> {
    let mut s = Scanner::new(reply);
    s.member(&["error"])?;
    s.member(&["class"])?;
    s.string()
}

/// The name of a QMP event: `{"timestamp": {…}, "event": "RESUME"}`.
#[must_use]
pub fn qmp_event(text: &[u8]) -> Option<String> {
    let mut s = Scanner::new(text);
    s.member(&["event"])?;
    s.string()
}

/// A position in JSON text. Every method returns `None` where the text
/// ends or is not JSON.
struct Scanner<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a [u8]) -> Self {
        Self { text, pos: 0 }
    }

    fn skip_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\r' | b'\n') = self.text.get(self.pos) {
            self.pos += 1;
        }
    }

    /// The next byte after white space, consumed.
    fn next_byte(&mut self) -> Option<u8> {
        self.skip_space();
        let b = *self.text.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// Moves to the value of the first member named one of `names` of the
    /// object that starts here.
    fn member(&mut self, names: &[&str]) -> Option<()> {
        if self.next_byte()? != b'{' {
            return None;
        }
        loop {
            let key = self.string()?;
            if self.next_byte()? != b':' {
                return None;
            }
            if names.contains(&key.as_str()) {
                return Some(());
            }
            self.skip_value()?;
            if self.next_byte()? != b',' {
                return None;
            }
        }
    }

    /// The string that starts here, unescaped.
    fn string(&mut self) -> Option<String> {
        if self.next_byte()? != b'"' {
            return None;
        }
        let mut out = Vec::new();
        loop {
            let b = *self.text.get(self.pos)?;
            self.pos += 1;
            match b {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = *self.text.get(self.pos)?;
                    self.pos += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return None,
                    };
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                0..0x20 => return None,
                _ => out.push(b),
            }
        }
    }

    /// The character of a `\uXXXX` escape (the `\u` read), with the low
    /// half of a surrogate pair that follows.
    fn unicode_escape(&mut self) -> Option<char> {
        let high = self.hex4()?;
        if !(0xd800..0xdc00).contains(&high) {
            return char::from_u32(high);
        }
        if self.text.get(self.pos..self.pos + 2)? != b"\\u" {
            return None;
        }
        self.pos += 2;
        let low = self.hex4()?;
        if !(0xdc00..0xe000).contains(&low) {
            return None;
        }
        char::from_u32(0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.text.get(self.pos..self.pos + 4)?;
        let mut v = 0;
        for &d in digits {
            v = v * 16 + char::from(d).to_digit(16)?;
        }
        self.pos += 4;
        Some(v)
    }

    /// Moves past the value that starts here. Objects and arrays are
    /// skipped by counting brackets outside strings, which is enough to
    /// find where a well-formed value ends.
    fn skip_value(&mut self) -> Option<()> {
        self.skip_space();
        match *self.text.get(self.pos)? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *self.text.get(self.pos)? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                // A number, true, false or null: up to what ends it, which
                // must be there (`12` may be the start of `123`).
                let start = self.pos;
                while !matches!(
                    *self.text.get(self.pos)?,
                    b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'
                ) {
                    self.pos += 1;
                }
                (self.pos > start).then_some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(text: &str) -> Option<String> {
        qmp_command(text.as_bytes())
    }

    #[test]
    fn commands_as_libvirt_sends_them() {
        // libvirt writes compact JSON, execute first, id last, then CRLF.
        assert_eq!(
            command("{\"execute\":\"qmp_capabilities\",\"id\":\"libvirt-1\"}\r\n").as_deref(),
            Some("qmp_capabilities")
        );
        assert_eq!(
            command("{\"execute\":\"query-cpus-fast\",\"id\":\"libvirt-12\"}").as_deref(),
            Some("query-cpus-fast")
        );
        assert_eq!(
            command(
                "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"virtio-net-pci\",\
                 \"netdev\":\"hostnet0\",\"id\":\"net0\",\"bus\":\"pci.1\",\"addr\":\"0x0\"},\
                 \"id\":\"libvirt-20\"}"
            )
            .as_deref(),
            Some("device_add")
        );
        assert_eq!(
            command("{\"exec-oob\": \"migrate-pause\", \"id\": \"libvirt-40\"}").as_deref(),
            Some("migrate-pause")
        );
    }

    #[test]
    fn a_command_after_other_members_and_white_space() {
        assert_eq!(
            command("{\"id\":\"libvirt-7\",\"execute\":\"cont\"}").as_deref(),
            Some("cont")
        );
        assert_eq!(
            command(
                " {\n  \"id\" : 7 ,\n  \"arguments\" : { \"execute\" : \"not-this\", \"l\": \
                 [1, {\"a\": \"}]\"}, null, true, -1.5e3] } ,\n  \"execute\"\t:\t\"object-add\"\n}"
            )
            .as_deref(),
            Some("object-add"),
            "a nested execute is not the command"
        );
        assert_eq!(
            command(r#"{"execute":"a\u0062c\"\\\/"}"#).as_deref(),
            Some("abc\"\\/")
        );
        assert_eq!(
            command(r#"{"execute":"\ud83d\ude00"}"#).as_deref(),
            Some("\u{1f600}")
        );
    }

    #[test]
    fn text_cut_short() {
        let whole = "{\"execute\":\"query-cpus-fast\",\"id\":\"libvirt-12\"}";
        // Cut after the command's string, the command is known; cut
        // inside it, it is not (a prefix of a name is not a name).
        for cut in 0..whole.len() {
            let got = command(&whole[..cut]);
            if cut >= "{\"execute\":\"query-cpus-fast\"".len() {
                assert_eq!(got.as_deref(), Some("query-cpus-fast"), "cut at {cut}");
            } else {
                assert_eq!(got, None, "cut at {cut}");
            }
        }
        // The arguments come first and are cut: the command is not there.
        assert_eq!(command("{\"arguments\":{\"props\":{\"size\":12"), None);
        assert_eq!(command("{\"id\":12"), None);
    }

    #[test]
    fn error_replies() {
        let error = |t: &str| qmp_reply_error(t.as_bytes());
        assert_eq!(
            error(
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Device 'net0' not found\"}, \
                 \"id\": \"libvirt-23\"}"
            )
            .as_deref(),
            Some("GenericError")
        );
        assert_eq!(
            error(
                "{\"id\": \"libvirt-23\", \"error\": {\"desc\": \"no {such} \\\"thing\\\"\", \
                 \"class\": \"DeviceNotFound\"}}"
            )
            .as_deref(),
            Some("DeviceNotFound")
        );
        assert_eq!(error("{\"return\": {}, \"id\": \"libvirt-1\"}\r\n"), None);
        assert_eq!(
            error("{\"return\": [{\"error\": {\"class\": \"Nested\"}}], \"id\": \"libvirt-2\"}"),
            None
        );
        assert_eq!(
            error("{\"error\": {\"desc\": \"a long description cut sh"),
            None
        );
    }

    #[test]
    fn events() {
        let event = |t: &str| qmp_event(t.as_bytes());
        assert_eq!(
            event(
                "{\"timestamp\": {\"seconds\": 1733190000, \"microseconds\": 123456}, \
                 \"event\": \"RESUME\"}"
            )
            .as_deref(),
            Some("RESUME")
        );
        assert_eq!(
            event(
                "{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \
                 \"guest-shutdown\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}"
            )
            .as_deref(),
            Some("SHUTDOWN")
        );
        assert_eq!(event("{\"return\": {}, \"id\": \"libvirt-1\"}"), None);
        assert_eq!(event("{\"timestamp\": {\"seconds\": 17331"), None);
    }

    #[test]
    fn hostile_text_is_refused_without_panicking() {
        let deep = "[".repeat(100_000);
        let inputs: [Vec<u8>; 18] = [
            b"".to_vec(),
            b"{".to_vec(),
            b"{}".to_vec(),
            b"[\"execute\",\"x\"]".to_vec(),
            b"{\"execute\"}".to_vec(),
            b"{\"execute\":17}".to_vec(),
            b"{\"execute\":\"a\nb\"}".to_vec(),
            b"{\"execute\":\"\\x\"}".to_vec(),
            b"{\"execute\":\"\\u12\"}".to_vec(),
            b"{\"execute\":\"\\ud800\"}".to_vec(),
            b"{\"execute\":\"\\ud800\\u0041\"}".to_vec(),
            b"{\"execute\":\"\xff\xfe\"}".to_vec(),
            b"{\"a\":}".to_vec(),
            b"{\"a\":1 \"execute\":\"x\"}".to_vec(),
            b"{\"a\":]]]]],\"execute\":\"x\"}".to_vec(),
            format!("{{\"a\":{deep},\"execute\":\"x\"}}").into_bytes(),
            vec![0; 64],
            vec![0xff; 64],
        ];
        for input in &inputs {
            assert_eq!(
                qmp_command(input),
                None,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(qmp_reply_error(input), None);
            assert_eq!(qmp_event(input), None);
        }
    }
}
