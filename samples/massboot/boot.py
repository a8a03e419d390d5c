#!/usr/bin/python3
"""Boot (or destroy) transient libvirt guests concurrently, over the libvirt
API, from several client threads: the client side of `./x massboot`.

    boot.py boot GUESTS.json --threads T      boots, waits for each '!' on COM1
    boot.py destroy GUESTS.json               destroys whatever is still running

GUESTS.json is a list of {"name", "xml", "serial", "paused"} written by xtask.
`boot` prints one JSON object: per guest the time createXML took and the time
until the guest's boot sector wrote '!' to its serial port, and the wall time.
Uses Debian's python3-libvirt (the C library's own bindings).
"""

import json
import sys
import threading
import time

import libvirt

URI = "qemu:///system"
BOOT_TIMEOUT_S = 60.0


def boot(guests, threads):
    results = [None] * len(guests)
    errors = []
    next_index = [0]
    lock = threading.Lock()
    start = time.monotonic()

    def worker():
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
                    conn.createXML(g["xml"], flags)
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
                results[i] = {
                    "name": g["name"],
                    "start_s": t0 - start,
                    "create_s": created,
                    "boot_s": booted,
                    "paused": g["paused"],
                }
        finally:
            conn.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
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


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("boot", "destroy"):
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[2]) as f:
        guests = json.load(f)
    if sys.argv[1] == "boot":
        threads = 4
        if "--threads" in sys.argv:
            threads = int(sys.argv[sys.argv.index("--threads") + 1])
        return boot(guests, max(1, threads))
    return destroy(guests)


if __name__ == "__main__":
    sys.exit(main())
