#!/usr/bin/python3
"""A D-Bus service for hvprof's ground truth: "fast or the full timeout".

On a private bus (start one with
`dbus-daemon --session --address=unix:path=/tmp/x/bus --nofork --print-address`)
it owns org.hvprof.Sample and exports /org/hvprof/Sample with, on the
interface org.hvprof.Sample:

  Work(u n) -> u   replies n+1 at once, except that every STALL_EVERY-th
                   call (counting Work calls since the start) gets no reply
                   at all, so its caller waits for its whole timeout;
  Ping() -> s      replies "pong" at once (readiness, and the "outsider"
                   calls of the tests);
  Quit()           replies, then exits.

It uses GIO through python3-gi, server side only: it makes no blocking
client calls itself. Run with Debian's /usr/bin/python3.

  service.py --address unix:path=/tmp/x/bus [--stall-every N]
"""

import argparse
import sys

from gi.repository import Gio, GLib

XML = """
<node>
  <interface name="org.hvprof.Sample">
    <method name="Work">
      <arg type="u" name="n" direction="in"/>
      <arg type="u" name="r" direction="out"/>
    </method>
    <method name="Ping">
      <arg type="s" name="r" direction="out"/>
    </method>
    <method name="Quit"/>
  </interface>
</node>
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--stall-every", type=int, default=0,
                    help="never reply to every Nth Work call (0: always reply)")
    args = ap.parse_args()

    loop = GLib.MainLoop()
    conn = Gio.DBusConnection.new_for_address_sync(
        args.address,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None, None)
    node = Gio.DBusNodeInfo.new_for_xml(XML)
    state = {"work": 0, "stalled": []}

    def on_call(_conn, _sender, _path, _iface, method, params, invocation):
        if method == "Work":
            state["work"] += 1
            n = params.unpack()[0]
            if args.stall_every and state["work"] % args.stall_every == 0:
                # Keep the invocation so it is never answered (nor freed,
                # which would not answer it either, but would warn).
                state["stalled"].append(invocation)
                return
            invocation.return_value(GLib.Variant("(u)", (n + 1,)))
        elif method == "Ping":
            invocation.return_value(GLib.Variant("(s)", ("pong",)))
        elif method == "Quit":
            invocation.return_value(None)
            GLib.idle_add(loop.quit)

    conn.register_object("/org/hvprof/Sample", node.interfaces[0], on_call, None, None)
    # Own the name only once the object is there, so a client that sees the
    # name can call it.
    reply = conn.call_sync(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "RequestName", GLib.Variant("(su)", ("org.hvprof.Sample", 4)),
        GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, -1, None)
    if reply.unpack()[0] != 1:
        sys.exit("service.py: cannot own org.hvprof.Sample (already taken?)")
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
