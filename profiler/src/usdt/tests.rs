//! The note reader and the argument decoder, on the notes of Debian's
//! libvirt 11.3 (cut out of the libraries by
//! `profiler/tests/data/usdt/extract.py`, with `readelf -n`'s listing of
//! the originals beside them) and on odd and hostile input.

use std::path::PathBuf;

use super::*;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/usdt")
        .join(name)
}

/// `readelf -n`'s probes: (provider, name, location, base, semaphore,
/// arguments).
fn readelf_listing(name: &str) -> Vec<(String, String, u64, u64, u64, String)> {
    let text = std::fs::read_to_string(data(name)).expect("read the readelf listing");
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).expect("hex");
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(provider) = line.strip_prefix("Provider: ") else {
            continue;
        };
        let name = lines
            .next()
            .and_then(|l| l.strip_prefix("Name: "))
            .expect("Name");
        let loc = lines.next().expect("Location");
        let fields: Vec<&str> = loc
            .split(", ")
            .map(|f| f.rsplit(' ').next().unwrap_or(""))
            .collect();
        let args = lines
            .next()
            .and_then(|l| l.strip_prefix("Arguments:"))
            .expect("Arguments")
            .trim();
        out.push((
            provider.to_owned(),
            name.to_owned(),
            hex(fields[0]),
            hex(fields[1]),
            hex(fields[2]),
            args.to_owned(),
        ));
    }
    out
}

fn libvirt() -> Vec<Probe> {
    probes(&data("libvirt.so.0.stapsdt")).expect("read libvirt.so.0's probes")
}

/// Every probe of both libraries, as `readelf -n` lists them, and every
/// argument string decodes.
#[test]
fn libvirt_notes_match_readelf() {
    for (fixture, listing, count) in [
        ("libvirt.so.0.stapsdt", "libvirt.so.0.readelf-n.txt", 41),
        (
            "libvirt_driver_qemu.so.stapsdt",
            "libvirt_driver_qemu.so.readelf-n.txt",
            8,
        ),
    ] {
        let got = probes(&data(fixture)).expect(fixture);
        let want = readelf_listing(listing);
        assert_eq!(got.len(), count, "{fixture}");
        assert_eq!(want.len(), count, "{listing}");
        for (p, w) in got.iter().zip(&want) {
            let seen = (
                p.provider.clone(),
                p.name.clone(),
                p.address,
                p.base,
                p.semaphore,
                p.arguments.clone(),
            );
            assert_eq!(&seen, w);
            let args = p
                .args
                .as_ref()
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(args.len(), p.arguments.split(' ').count(), "{}", p.name);
            assert!(p.semaphore_offset.is_some(), "{} has a semaphore", p.name);
        }
    }
}

/// The probe the libvirt API table pairs with `msg_tx_queue`: its site and
/// semaphore in the file (libvirt.so.0's segments map the file at the
/// offsets equal to the addresses), and its eight arguments.
#[test]
fn rpc_server_client_msg_rx() {
    let all = libvirt();
    let p = all
        .iter()
        .find(|p| p.name == "rpc_server_client_msg_rx")
        .expect("the probe");
    assert_eq!(p.provider, "libvirt");
    // readelf -n: Location: 0x20f6da, Base: 0x3f8a04, Semaphore: 0x4e3f5e
    assert_eq!(
        (p.address, p.base, p.semaphore),
        (0x20_f6da, 0x3f_8a04, 0x4e_3f5e)
    );
    // readelf -l: LOAD 0x0a4000 0xa4000 … R E; LOAD 0x4c7050 0x4c7050 … RW
    assert_eq!(p.offset, 0x20_f6da);
    assert_eq!(p.semaphore_offset, Some(0x4e_3f5e));
    assert_eq!(
        p.arguments,
        "8@%rbp 8@16(%rbx) 8@%rax 8@%rdx 8@%rcx 8@%rsi 8@%rdi 8@%r8"
    );
    let reg = |reg_off| ArgSpec {
        size: 8,
        signed: false,
        location: ArgLocation::Reg { reg_off },
    };
    let want = vec![
        reg(32),
        ArgSpec {
            size: 8,
            signed: false,
            location: ArgLocation::Deref {
                reg_off: 40,
                displacement: 16,
            },
        },
        reg(80),
        reg(96),
        reg(88),
        reg(104),
        reg(112),
        reg(72),
    ];
    assert_eq!(p.args.as_ref().expect("decoded"), &want);
    let spec = p.spec().expect("spec");
    assert_eq!(spec.count, 8);
    assert_eq!(spec.args[1].kind, arg_kind::REG_DEREF);
    assert_eq!((spec.args[1].reg_off, spec.args[1].value), (40, 16));
    assert_eq!(spec.args[8], UsdtArg::default());
}

/// Two sites of one probe share its semaphore.
#[test]
fn a_probe_with_two_sites() {
    let sites: Vec<Probe> = libvirt()
        .into_iter()
        .filter(|p| p.name == "rpc_client_msg_tx_queue")
        .collect();
    assert_eq!(sites.len(), 2);
    assert_eq!(
        sites.iter().map(|p| p.offset).collect::<Vec<_>>(),
        [0x20_a5dc, 0x20_be24]
    );
    assert!(sites.iter().all(|p| p.semaphore_offset == Some(0x4e_3f58)));
}

/// The QEMU monitor's reply probe reads below the frame pointer.
#[test]
fn qemu_monitor_recv_reply() {
    let all = probes(&data("libvirt_driver_qemu.so.stapsdt")).expect("read");
    let p = all
        .iter()
        .find(|p| p.name == "qemu_monitor_recv_reply")
        .expect("the probe");
    assert_eq!((p.offset, p.semaphore_offset), (0x12_9b30, Some(0x20_8b5a)));
    let spec = p.spec().expect("spec");
    assert_eq!(spec.count, 2);
    assert_eq!(spec.args[0].kind, arg_kind::REG_DEREF);
    assert_eq!(spec.args[0].reg_off, 32);
    assert_eq!(spec.args[0].value.cast_signed(), -88);
    assert_eq!(
        (spec.args[1].kind, spec.args[1].reg_off),
        (arg_kind::REG, 8)
    );
}

/// Every form GNU as emits on x86-64.
#[test]
fn argument_forms() {
    let arg = |t: &str| parse_arg(t).unwrap_or_else(|e| panic!("{t}: {e}"));
    let spec = |size, signed, location| ArgSpec {
        size,
        signed,
        location,
    };
    assert_eq!(
        arg("8@%rax"),
        spec(8, false, ArgLocation::Reg { reg_off: 80 })
    );
    assert_eq!(
        arg("-4@%edi"),
        spec(4, true, ArgLocation::Reg { reg_off: 112 })
    );
    assert_eq!(
        arg("-2@%cx"),
        spec(2, true, ArgLocation::Reg { reg_off: 88 })
    );
    assert_eq!(
        arg("-1@%sil"),
        spec(1, true, ArgLocation::Reg { reg_off: 104 })
    );
    assert_eq!(
        arg("1@%r9b"),
        spec(1, false, ArgLocation::Reg { reg_off: 64 })
    );
    assert_eq!(
        arg("2@%r10w"),
        spec(2, false, ArgLocation::Reg { reg_off: 56 })
    );
    assert_eq!(
        arg("4@%r15d"),
        spec(4, false, ArgLocation::Reg { reg_off: 0 })
    );
    assert_eq!(
        arg("8@%rsp"),
        spec(8, false, ArgLocation::Reg { reg_off: 152 })
    );
    assert_eq!(
        arg("1@%spl"),
        spec(1, false, ArgLocation::Reg { reg_off: 152 })
    );
    assert_eq!(
        arg("-4@-1204(%rbp)"),
        spec(
            4,
            true,
            ArgLocation::Deref {
                reg_off: 32,
                displacement: -1204
            }
        )
    );
    assert_eq!(
        arg("8@(%rsp)"),
        spec(
            8,
            false,
            ArgLocation::Deref {
                reg_off: 152,
                displacement: 0
            }
        )
    );
    assert_eq!(arg("-4@$5"), spec(4, true, ArgLocation::Const(5)));
    assert_eq!(arg("-4@$-9"), spec(4, true, ArgLocation::Const(-9)));
    assert_eq!(arg("8@$0x10"), spec(8, false, ArgLocation::Const(16)));
    assert_eq!(
        arg("8@$18446744073709551615"),
        spec(8, false, ArgLocation::Const(-1))
    );
    // libbpf's own example note (its usdt.c): twelve arguments.
    let twelve = parse_args(
        "-4@-1204(%rbp) -4@%edi -8@-1216(%rbp) -8@%r8 -4@$5 -8@%r9 8@%rdx 8@%r10 -4@$-9 -2@%cx -2@%ax -1@%sil",
    )
    .expect("twelve");
    assert_eq!(twelve.len(), 12);
    assert_eq!(parse_args("").expect("none"), []);
    // Every register name, each at its pt_regs offset.
    for (off, names) in REGISTERS {
        for name in names {
            assert_eq!(register(name), Ok(off), "{name}");
        }
    }
}

/// What the decoder refuses, and says why.
#[test]
fn unsupported_arguments_are_errors() {
    let why = |t: &str| parse_arg(t).expect_err(t);
    assert!(
        why("8@(%rbp,%rax,8)").contains("indexed"),
        "{}",
        why("8@(%rbp,%rax,8)")
    );
    assert!(why("1@-96(%rbp,%rax)").contains("indexed"));
    assert!(why("1@%ah").contains("bits 8-15"));
    assert!(why("8@counter(%rip)").contains("symbol"));
    assert!(why("8@16(%rip)").contains("%rip"));
    assert!(why("8@%xmm0").contains("unknown register %xmm0"));
    assert!(why("3@%rax").contains("not 1, 2, 4 or 8"));
    assert!(why("16@%rax").contains("not 1, 2, 4 or 8"));
    assert!(why("-0@%rax").contains("not 1, 2, 4 or 8"));
    assert!(why("%rax").contains("SIZE@"));
    assert!(why("x@%rax").contains("not a number"));
    assert!(why("8@$").contains("not a number"));
    assert!(why("8@$-").contains("not a number"));
    assert!(why("8@$99999999999999999999").contains("not a number"));
    assert!(why("8@-(%rax)").contains("not a number"));
    assert!(why("8@8(%rax").contains("closing"));
    assert!(why("8@8(rax)").contains("not a register"));
    assert!(why("8@rax").contains("operand"));
    assert!(why("8@").contains("operand"));
    assert_eq!(
        parse_args(&["8@%rax"; 13].join(" ")),
        Err(ArgError::TooMany { count: 13 })
    );
    assert_eq!(
        parse_args("8@%rax 8@%bogus"),
        Err(ArgError::Arg {
            index: 1,
            text: "8@%bogus".to_owned(),
            why: "unknown register %bogus".to_owned()
        })
    );
}

/// A site the decoder refuses keeps its file's other sites.
#[test]
fn one_bad_argument_string_spoils_only_its_site() {
    let mut file = std::fs::read(data("libvirt_driver_qemu.so.stapsdt")).expect("read");
    let at = find(&file, b"8@-88(%rbp) 8@%r14").expect("recv_reply's arguments");
    file[at + 7..at + 10].copy_from_slice(b"rip");
    let all = probes_in(&file).expect("still a file of probes");
    assert_eq!(all.len(), 8);
    let bad: Vec<&str> = all
        .iter()
        .filter(|p| p.args.is_err())
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(bad, ["qemu_monitor_recv_reply"]);
    assert!(all[0].spec().is_ok());
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The site and the semaphore move with `.stapsdt.base` (prelink), and
/// each is looked up in its segment and turned into a file offset.
#[test]
fn prelink_shift_and_segment_offsets() {
    let segments = [
        Segment {
            vaddr: 0x40_0000,
            memsz: 0x1000,
            offset: 0,
            exec: true,
        },
        Segment {
            vaddr: 0x60_1e10,
            memsz: 0x300,
            offset: 0xe10,
            exec: false,
        },
    ];
    let raw = |address, semaphore| RawNote {
        address,
        base: 0x40_0800,
        semaphore,
        provider: "p",
        name: "n",
        arguments: "-4@$1",
    };
    let p = place(raw(0x40_0100, 0x60_1f00), Some(0x40_0800), &segments).expect("place");
    assert_eq!((p.offset, p.semaphore_offset), (0x100, Some(0xf00)));
    // Prelinked 0x10 higher: .stapsdt.base now says so.
    let p = place(raw(0x40_0100, 0x60_1f00), Some(0x40_0810), &segments).expect("place");
    assert_eq!((p.offset, p.semaphore_offset), (0x110, Some(0xf10)));
    assert_eq!((p.address, p.semaphore), (0x40_0100, 0x60_1f00));
    // No semaphore.
    let p = place(raw(0x40_0100, 0), None, &segments).expect("place");
    assert_eq!(p.semaphore_offset, None);
    // A site outside the code, a semaphore in the code or nowhere, an odd
    // semaphore.
    for (site, sema) in [
        (0x60_1f00, 0x60_1f00),
        (0x50_0000, 0x60_1f00),
        (0x40_0100, 0x40_0200),
        (0x40_0100, 0x70_0000),
    ] {
        let e = place(raw(site, sema), None, &segments).expect_err("refused");
        assert!(matches!(e, UsdtError::NoSegment { .. }), "{e}");
    }
    let e = place(raw(0x40_0100, 0x60_1f01), None, &segments).expect_err("odd");
    assert!(e.to_string().contains("2-byte aligned"), "{e}");
}

/// Truncated, corrupted and odd notes are errors, never panics.
#[test]
fn hostile_notes_are_errors() {
    let endian = object::Endianness::Little;
    let desc = |tail: &[u8]| {
        let mut d = vec![0u8; 24];
        d[..8].copy_from_slice(&0x1000u64.to_le_bytes());
        d.extend_from_slice(tail);
        d
    };
    assert!(parse_note(&[0; 23], endian).is_err());
    assert!(parse_note(&desc(b""), endian).is_err());
    assert!(parse_note(&desc(b"prov"), endian).is_err());
    assert!(parse_note(&desc(b"prov\0"), endian).is_err());
    assert!(parse_note(&desc(b"prov\0name"), endian).is_err());
    assert!(parse_note(&desc(b"prov\0name\08@%rax"), endian).is_err());
    assert!(parse_note(&desc(b"\0name\0\0"), endian).is_err());
    assert!(parse_note(&desc(b"prov\0\xff\xfe\0\0"), endian).is_err());
    let no_arguments = desc(b"prov\0name\0\0\0\0");
    let ok = parse_note(&no_arguments, endian).expect("no arguments");
    assert_eq!((ok.provider, ok.name, ok.arguments), ("prov", "name", ""));
    assert_eq!(ok.address, 0x1000);

    // Every prefix of a real file, and every single-byte corruption of its
    // notes: an error or probes, never a panic.
    let file = std::fs::read(data("libvirt_driver_qemu.so.stapsdt")).expect("read");
    for len in 0..file.len() {
        let _ = probes_in(&file[..len]);
    }
    assert!(probes_in(&file[..file.len() - 1]).is_err());
    for at in 0..file.len() {
        for byte in [0x00, 0xff, b'%', b'@'] {
            let mut f = file.clone();
            f[at] = byte;
            if let Ok(all) = probes_in(&f) {
                for p in all {
                    let _ = p.spec();
                }
            }
        }
    }
    assert!(matches!(
        probes_in(b"not an ELF file"),
        Err(UsdtError::Elf { .. })
    ));
}

/// A file without USDT notes has no probes; one that is not x86-64 is
/// refused.
#[test]
fn files_without_notes_and_other_machines() {
    let exe = std::env::current_exe().expect("this test binary");
    assert_eq!(probes(&exe).expect("read").len(), 0);
    let mut file = std::fs::read(data("libvirt.so.0.stapsdt")).expect("read");
    file[0x12] = 0xb7; // EM_AARCH64
    let e = probes_in(&file).expect_err("aarch64");
    assert!(e.to_string().contains("not x86-64"), "{e}");
    let e = probes(&data("missing")).expect_err("missing");
    assert!(matches!(e, UsdtError::Read { .. }), "{e}");
}
