#!/usr/bin/python3
"""Boot (or destroy) transient libvirt guests concurrently, over the libvirt
API, from several client threads: the client side of `./x massboot`.

    boot.py boot GUESTS.json --threads T [--gap-ms G] [--get-info]
                                              boots, waits for each '!' on COM1;
                                              client thread k starts k*G ms late;
                                              then asks for each guest's info once
    boot.py destroy GUESTS.json               destroys whatever is still running
    boot.py contend NAME HOLD_S               holds guest NAME's job for HOLD_S
                                              while two other clients wait for it

GUESTS.json is a list of {"name", "xml", "serial", "paused"} written by xtask.
`boot` prints one JSON object: per guest the time createXML took and the time
until the guest's boot sector wrote '!' to its serial port, and the wall time.
Uses Debian's python3-libvirt (the C library's own bindings).
"""

import json
import os
import signal
import sys
import threading
import time

import libvirt
import libvirt_qemu

URI = "qemu:///system"
BOOT_TIMEOUT_S = 60.0


def boot(guests, threads, gap_s=0.0, get_info=False):
    results = [None] * len(guests)
    errors = []
    next_index = [0]
    lock = threading.Lock()
    start = time.monotonic()

    def worker(k):
        time.sleep(k * gap_s)
        conn = libvirt.open(URI)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(guests) or errors:
                    return
                g = guests[i]
                flags = libvirt.VIR_DOMAIN_START_PAUSED if g["paused"] else 0
                t0 = time.monotonic()
                try:
                    dom = conn.createXML(g["xml"], flags)
                except libvirt.libvirtError as e:
                    errors.append("%s: createXML failed: %s" % (g["name"], e))
                    return
                created = time.monotonic() - t0
                booted = None
                if not g["paused"]:
                    deadline = t0 + BOOT_TIMEOUT_S
                    while time.monotonic() < deadline:
                        try:
                            with open(g["serial"], "rb") as f:
                                if b"!" in f.read():
                                    booted = time.monotonic() - t0
                                    break
                        except FileNotFoundError:
                            pass
                        time.sleep(0.02)
                    if booted is None:
                        errors.append(
                            "%s: no '!' on COM1 (%s) within %.0f s"
                            % (g["name"], g["serial"], BOOT_TIMEOUT_S)
                        )
                        return
                if get_info:
                    dom.info()
                results[i] = {
                    "name": g["name"],
                    "start_s": t0 - start,
                    "create_s": created,
                    "boot_s": booted,
                    "paused": g["paused"],
                }
        finally:
            conn.close()

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out = {
        "wall_s": time.monotonic() - start,
        "guests": [r for r in results if r is not None],
        "errors": errors,
    }
    print(json.dumps(out))
    return 0 if not errors else 1


def destroy(guests):
    conn = libvirt.open(URI)
    names = {g["name"] for g in guests}
    left = 0
    for dom in conn.listAllDomains():
        if dom.name() in names:
            try:
                dom.destroy()
            except libvirt.libvirtError as e:
                print("%s: destroy failed: %s" % (dom.name(), e), file=sys.stderr)
                left += 1
    conn.close()
    return 0 if left == 0 else 1


def contend(name, hold_s):
    """A domain job held on purpose, and waited for: guest NAME's QEMU is
    stopped (SIGSTOP), so a monitor command ('query-status') waits for its
    reply holding the domain's job, until HOLD_S later QEMU goes on
    (SIGCONT). Meanwhile two clients ask to suspend the guest: the first
    from 0.5 s, the second from HOLD_S - 2 s. Prints the times, from the
    holder's start, each client saw: a suspend that waits past libvirt's
    30 s job wait time fails ("cannot acquire state change lock")."""
    with open("/run/libvirt/qemu/%s.pid" % name) as f:
        qemu = int(f.read().strip())
    start = time.monotonic()
    out = {"hold_s": hold_s, "clients": {}}

    def client(what, delay, call):
        time.sleep(delay)
        conn = libvirt.open(URI)
        t0 = time.monotonic() - start
        error = None
        try:
            call(conn.lookupByName(name))
        except libvirt.libvirtError as e:
            error = str(e)
        t1 = time.monotonic() - start
        conn.close()
        out["clients"][what] = {"start_s": t0, "end_s": t1, "error": error}

    os.kill(qemu, signal.SIGSTOP)
    try:
        threads = [
            threading.Thread(target=client, args=(
                "holder", 0.0,
                lambda d: libvirt_qemu.qemuMonitorCommand(d, '{"execute":"query-status"}', 0))),
            threading.Thread(target=client, args=("first waiter", 0.5, lambda d: d.suspend())),
            threading.Thread(target=client, args=("second waiter", hold_s - 2.0, lambda d: d.suspend())),
        ]
        for t in threads:
            t.start()
        time.sleep(hold_s)
    finally:
        out["released_s"] = time.monotonic() - start
        os.kill(qemu, signal.SIGCONT)
    for t in threads:
        t.join()
    print(json.dumps(out))
    return 0


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "contend":
        return contend(sys.argv[2], float(sys.argv[3]))
    if len(sys.argv) < 3 or sys.argv[1] not in ("boot", "destroy"):
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[2]) as f:
        guests = json.load(f)
    if sys.argv[1] == "boot":
        threads = 4
        if "--threads" in sys.argv:
            threads = int(sys.argv[sys.argv.index("--threads") + 1])
        gap_ms = 0.0
        if "--gap-ms" in sys.argv:
            gap_ms = float(sys.argv[sys.argv.index("--gap-ms") + 1])
        return boot(
            guests, max(1, threads), max(0.0, gap_ms) / 1000.0, "--get-info" in sys.argv
        )
    return destroy(guests)


if __name__ == "__main__":
    sys.exit(main())
