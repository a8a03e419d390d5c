//! The D-Bus tracer's keys, values and in-flight calls.

use super::{COMM_LEN, LOCK_HIST_BUCKETS};

/// The blocking D-Bus client functions, as uprobe cookies number them.
pub mod dbus_fn {
    /// libdbus `dbus_connection_send_with_reply_and_block(conn, msg, timeout_ms, err)`.
    pub const LIBDBUS_SEND_BLOCK: u32 = 1;
    /// libdbus `dbus_pending_call_block(pending)`.
    pub const LIBDBUS_PENDING_BLOCK: u32 = 2;
    /// GIO `g_dbus_connection_call_sync(conn, name, path, iface, method, params, type, flags, timeout_ms, …)`.
    pub const GIO_CALL_SYNC: u32 = 3;
    /// GIO `g_dbus_connection_call_with_unix_fd_list_sync` (same leading arguments).
    pub const GIO_CALL_FD_SYNC: u32 = 4;
    /// GIO `g_dbus_connection_send_message_with_reply_sync(conn, msg, flags, timeout_ms, …)`.
    pub const GIO_SEND_MESSAGE_SYNC: u32 = 5;
    /// GIO `g_dbus_proxy_call_sync(proxy, method, params, flags, timeout_ms, …)`.
    pub const GIO_PROXY_CALL_SYNC: u32 = 6;
    /// sd-bus `sd_bus_call(bus, msg, usec, err, reply)`.
    pub const SDBUS_CALL: u32 = 7;
    /// Not blocking, probed for what the next blocking call is about:
    /// libdbus `dbus_message_new_method_call(dest, path, iface, method)`.
    pub const LIBDBUS_NEW_METHOD_CALL: u32 = 16;
    /// GIO `g_dbus_message_new_method_call(name, path, iface, method)`.
    pub const GIO_NEW_METHOD_CALL: u32 = 17;
    /// sd-bus `sd_bus_message_new_method_call(bus, &msg, dest, path, iface, member)`.
    pub const SDBUS_NEW_METHOD_CALL: u32 = 18;
    /// libdbus `dbus_connection_send_with_reply(conn, msg, &pending, timeout_ms)`:
    /// the timeout a later `dbus_pending_call_block` waits for.
    pub const LIBDBUS_SEND_WITH_REPLY: u32 = 19;
    /// libdbus `dbus_message_set_destination(msg, dest)` (dbus-send names
    /// the destination after constructing the message).
    pub const LIBDBUS_SET_DESTINATION: u32 = 20;
}

/// Bytes kept of each D-Bus name (destination, path, interface, member).
pub const DBUS_NAME_LEN: usize = 80;

/// What a D-Bus call is addressed to, NUL-padded (truncated names end
/// without a NUL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DbusNames {
    pub destination: [u8; DBUS_NAME_LEN],
    pub path: [u8; DBUS_NAME_LEN],
    pub interface: [u8; DBUS_NAME_LEN],
    pub member: [u8; DBUS_NAME_LEN],
}

/// No timeout given: the library default (25 s in libdbus, GIO and sd-bus).
pub const DBUS_TIMEOUT_DEFAULT: i64 = -1;
/// The call waits forever (`DBUS_TIMEOUT_INFINITE`, `G_MAXINT`).
pub const DBUS_TIMEOUT_INFINITE: i64 = 0x7fff_ffff;
/// The libraries' default timeout, in ms.
pub const DBUS_DEFAULT_TIMEOUT_MS: u64 = 25_000;

/// Key of the D-Bus call aggregation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DbusKey {
    pub window: u32,
    pub tgid: u32,
    /// [`dbus_fn`] of the outermost call.
    pub function: u32,
    pub pad: u32,
    /// As passed, in ms ([`DBUS_TIMEOUT_DEFAULT`], [`DBUS_TIMEOUT_INFINITE`]).
    pub timeout_ms: i64,
    /// The caller's user stack, taken when the outermost call returned.
    pub user_stack: u64,
    pub comm: [u8; COMM_LEN],
    pub names: DbusNames,
}

/// Calls of one [`DbusKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbusValue {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// Calls that lasted at least their timeout.
    pub timeouts: u64,
    pub hist: [u64; LOCK_HIST_BUCKETS],
}

/// A thread inside a blocking D-Bus call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbusInflight {
    /// Nesting: GIO's `call_sync` ends in `send_message_with_reply_sync`,
    /// libdbus's `send_with_reply_and_block` in `pending_call_block`.
    pub depth: u32,
    pub function: u32,
    pub window: u32,
    pub pad: u32,
    pub timeout_ms: i64,
    pub start_ns: u64,
    pub names: DbusNames,
}

/// What the thread's last message constructor (or libdbus
/// `send_with_reply`) said, for the blocking call that follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbusLast {
    /// 0 when no timeout was seen.
    pub has_timeout: u32,
    pub pad: u32,
    pub timeout_ms: i64,
    pub names: DbusNames,
}
