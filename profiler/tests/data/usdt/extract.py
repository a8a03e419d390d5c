#!/usr/bin/env python3
"""Cuts the USDT notes out of an ELF file into a small ELF file that keeps
what reading them needs: the ELF header, the program headers (verbatim),
`.note.stapsdt` (verbatim) and the address of `.stapsdt.base`. The segments'
contents are left out (their offsets point past the end of the cut file).

    extract.py /usr/lib/x86_64-linux-gnu/libvirt.so.0 libvirt.so.0.stapsdt
"""
import struct
import sys


def main(src, dst):
    data = open(src, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "ELF64 LE only"
    (e_phoff, e_shoff) = struct.unpack_from("<QQ", data, 0x20)
    (e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from("<HHHHH", data, 0x36)
    shdrs = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    strtab = shdrs[e_shstrndx]

    def name(sh):
        start = strtab[4] + sh[0]
        return data[start:data.index(b"\0", start)].decode()

    by_name = {name(sh): sh for sh in shdrs}
    notes = by_name[".note.stapsdt"]
    base = by_name.get(".stapsdt.base")

    out = bytearray(data[:64])
    assert e_phoff == 64
    out += data[e_phoff:e_phoff + e_phnum * e_phentsize]
    while len(out) % 8:
        out.append(0)
    notes_off = len(out)
    out += data[notes[4]:notes[4] + notes[5]]
    shstr = b"\0.note.stapsdt\0.stapsdt.base\0.shstrtab\0"
    shstr_off = len(out)
    out += shstr
    while len(out) % 8:
        out.append(0)
    shoff = len(out)
    sections = [(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    # name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections.append((1, 7, 0, 0, notes_off, notes[5], 0, 0, notes[8], 0))  # SHT_NOTE
    if base:
        sections.append((15, 8, 2, base[3], notes_off, base[5], 0, 0, 1, 0))  # SHT_NOBITS, SHF_ALLOC
    sections.append((29, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0))  # SHT_STRTAB
    for sh in sections:
        out += struct.pack("<IIQQQQIIQQ", *sh)
    struct.pack_into("<Q", out, 0x28, shoff)
    struct.pack_into("<HHH", out, 0x3a, 64, len(sections), len(sections) - 1)
    open(dst, "wb").write(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
