//! USDT sites of an executable: parsing `.note.stapsdt`, turning addresses into file offsets, and
//! argument strings into specs the eBPF programs read (`enlight_usdt_spec`).
//!
//! Pure: reads bytes, makes no system call, so it is tested on this crate's own test binary.

use std::path::Path;

use object::{Object, ObjectSection, ObjectSegment};

use crate::types::{
    UsdtArg, UsdtSpec, USDT_ARG_CONST, USDT_ARG_REG, USDT_ARG_REG_DEREF, USDT_MAX_ARGS,
};

/// One probe site (every inlined copy of a probe has its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Provider, e.g. `enlight`.
    pub provider: String,
    /// Probe name, e.g. `io_reap`.
    pub name: String,
    /// File offset of the probe's `nop`, where the uprobe goes.
    pub file_offset: u64,
    /// File offset of the semaphore (0 if the site has none).
    pub semaphore_offset: u64,
    /// The argument string, e.g. `-8@%rdi -8@%rsi`.
    pub args: String,
    /// The parsed arguments.
    pub spec: UsdtSpec,
}

/// Why the sites could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UsdtError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// Not an ELF file we understand.
    #[error("{path}: not a readable ELF object: {reason}")]
    Elf { path: String, reason: String },
    /// A malformed note.
    #[error("{path}: malformed .note.stapsdt entry: {reason}")]
    BadNote { path: String, reason: String },
    /// An argument we cannot express.
    #[error("{path}: probe {probe}: unsupported USDT argument {arg:?}: {reason}")]
    BadArg {
        path: String,
        probe: String,
        arg: String,
        reason: String,
    },
    /// A semaphore the kernel would set in another segment's copy of its page
    /// ([`semaphore_shadowed`]): the probe would never see a tracer attach.
    #[error("{path}: probe {probe}: its semaphore (file offset {offset:#x}) shares a page with the writable end of an earlier segment, so the kernel would set that copy and the program would never see a tracer; link the semaphores on a page of their own (enlight's are: enlight_driver::usdt::PageAlignedSemaphore)")]
    SemaphoreShadowed {
        path: String,
        probe: String,
        offset: u64,
    },
    /// An address outside every loadable segment.
    #[error("{path}: probe {probe}: address {addr:#x} is not in any loadable segment")]
    NoSegment {
        path: String,
        probe: String,
        addr: u64,
    },
}

/// Offset of an x86-64 register in `struct pt_regs`, for every name and width GNU as prints.
fn pt_regs_offset(reg: &str) -> Option<i16> {
    let off = match reg {
        "r15" | "r15d" | "r15w" | "r15b" => 0,
        "r14" | "r14d" | "r14w" | "r14b" => 8,
        "r13" | "r13d" | "r13w" | "r13b" => 16,
        "r12" | "r12d" | "r12w" | "r12b" => 24,
        "rbp" | "ebp" | "bp" | "bpl" => 32,
        "rbx" | "ebx" | "bx" | "bl" | "bh" => 40,
        "r11" | "r11d" | "r11w" | "r11b" => 48,
        "r10" | "r10d" | "r10w" | "r10b" => 56,
        "r9" | "r9d" | "r9w" | "r9b" => 64,
        "r8" | "r8d" | "r8w" | "r8b" => 72,
        "rax" | "eax" | "ax" | "al" | "ah" => 80,
        "rcx" | "ecx" | "cx" | "cl" | "ch" => 88,
        "rdx" | "edx" | "dx" | "dl" | "dh" => 96,
        "rsi" | "esi" | "si" | "sil" => 104,
        "rdi" | "edi" | "di" | "dil" => 112,
        "rip" | "eip" => 128,
        "rsp" | "esp" | "sp" | "spl" => 152,
        _ => return None,
    };
    Some(off)
}

/// Parses one `size@location` argument (`-8@%rdi`, `8@-16(%rbp)`, `4@$5`).
pub fn parse_arg(arg: &str) -> Result<UsdtArg, String> {
    let (size, loc) = arg.split_once('@').ok_or("no '@'")?;
    let size: i32 = size.parse().map_err(|_| format!("bad size {size:?}"))?;
    let bytes = size.unsigned_abs();
    if ![1, 2, 4, 8].contains(&bytes) {
        return Err(format!("size {size} is not 1, 2, 4 or 8"));
    }
    let mut spec = UsdtArg {
        arg_signed: (size < 0) as u8,
        arg_bitshift: (64 - 8 * bytes) as i8,
        ..Default::default()
    };
    if let Some(imm) = loc.strip_prefix('$') {
        spec.arg_type = USDT_ARG_CONST;
        spec.val_off = imm
            .parse::<i64>()
            .map_err(|_| format!("bad constant {imm:?}"))? as u64;
    } else if let Some(reg) = loc.strip_prefix('%') {
        spec.arg_type = USDT_ARG_REG;
        spec.reg_off = pt_regs_offset(reg).ok_or_else(|| format!("unknown register {reg:?}"))?;
    } else if let Some((off, rest)) = loc.split_once('(') {
        let reg = rest
            .strip_suffix(')')
            .and_then(|r| r.strip_prefix('%'))
            .ok_or("bad memory operand")?;
        if reg.contains(',') {
            return Err("indexed memory operands are not supported".into());
        }
        spec.arg_type = USDT_ARG_REG_DEREF;
        spec.reg_off = pt_regs_offset(reg).ok_or_else(|| format!("unknown register {reg:?}"))?;
        spec.val_off = if off.is_empty() {
            0
        } else {
            off.parse::<i64>()
                .map_err(|_| format!("bad offset {off:?}"))? as u64
        };
    } else {
        return Err("not a register, constant or memory operand".into());
    }
    Ok(spec)
}

/// Parses a whole argument string into a spec.
pub fn parse_args(args: &str) -> Result<UsdtSpec, (String, String)> {
    let mut spec = UsdtSpec::default();
    for (i, arg) in args.split_whitespace().enumerate() {
        if i >= USDT_MAX_ARGS {
            return Err((
                arg.to_string(),
                format!("more than {USDT_MAX_ARGS} arguments"),
            ));
        }
        spec.args[i] = parse_arg(arg).map_err(|reason| (arg.to_string(), reason))?;
        spec.arg_cnt = i as u32 + 1;
    }
    Ok(spec)
}

fn cstr(data: &[u8], at: &mut usize) -> Option<String> {
    let rest = data.get(*at..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    *at += end + 1;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Every USDT site in the ELF file at `path` (all providers).
pub fn sites(path: &Path) -> Result<Vec<Site>, UsdtError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| UsdtError::Io {
        path: p.clone(),
        source,
    })?;
    sites_in(&p, &data)
}

/// A loadable segment: where it is mapped and where it lies in the file.
#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    offset: u64,
    size: u64,
    executable: bool,
    writable: bool,
}

const PAGE: u64 = 4096;

/// Whether the semaphore at virtual address `addr` (file offset `offset`) sits on a file page
/// that a writable segment at a lower address also maps (pure). The kernel finds the semaphore
/// to increment by its file offset, in the first writable mapping of that file page (lowest
/// address first, `find_ref_ctr_vma`): when the end of an earlier segment (the partial page
/// RELRO leaves writable) shares the page, it increments that copy, and the program, reading
/// its own, never sees a tracer. Seen with a debug build of `enlight` whose `.probes` started
/// 0xf62 bytes into the page where the RELRO segment ended.
fn semaphore_shadowed(segments: &[Segment], addr: u64, offset: u64) -> bool {
    let page = offset / PAGE;
    segments.iter().any(|s| {
        s.writable
            && s.vaddr < addr
            && !(addr >= s.vaddr && addr - s.vaddr < s.size)
            && s.size > 0
            && s.offset / PAGE <= page
            && page <= (s.offset + s.size - 1) / PAGE
    })
}

/// The file offset of virtual address `addr`, if a segment (an executable one, if `code`) maps
/// it.
fn file_offset(segments: &[Segment], addr: u64, code: bool) -> Option<u64> {
    segments
        .iter()
        .filter(|s| s.executable || !code)
        .find(|s| addr >= s.vaddr && addr - s.vaddr < s.size)
        .map(|s| addr - s.vaddr + s.offset)
}

/// Every USDT site in the ELF image `data` whose code the linker kept; `path` is only used in
/// errors.
pub fn sites_in(path: &str, data: &[u8]) -> Result<Vec<Site>, UsdtError> {
    let elf_err = |reason: String| UsdtError::Elf {
        path: path.to_string(),
        reason,
    };
    let file = object::File::parse(data).map_err(|e| elf_err(e.to_string()))?;
    if !file.is_64() {
        return Err(elf_err("only 64-bit objects are supported".into()));
    }
    let Some(notes) = file.section_by_name(".note.stapsdt") else {
        return Ok(Vec::new());
    };
    let notes = notes.data().map_err(|e| elf_err(e.to_string()))?;
    let base_section = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let segments = loadable_segments(&file);
    let bad = |reason: &str| UsdtError::BadNote {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let mut out = Vec::new();
    for note in (ElfNotes { data: notes, at: 0 }) {
        let note = note.map_err(bad)?;
        if note.ty != NT_STAPSDT || note.name != b"stapsdt\0" {
            continue;
        }
        let note = StapsdtNote::parse(note.desc).map_err(bad)?;
        // Prelink-style correction: the note records the .stapsdt.base address it was built with.
        let delta = base_section.map(|b| b.wrapping_sub(note.base)).unwrap_or(0);
        if let Some(site) = site(path, note, delta, &segments)? {
            out.push(site);
        }
    }
    Ok(out)
}

/// Every loadable segment of `file`, with its permissions.
fn loadable_segments(file: &object::File) -> Vec<Segment> {
    file.segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            let p_flags = match s.flags() {
                object::SegmentFlags::Elf { p_flags } => p_flags,
                _ => 0,
            };
            Segment {
                vaddr: s.address(),
                offset,
                size,
                executable: p_flags & object::elf::PF_X != 0,
                writable: p_flags & object::elf::PF_W != 0,
            }
        })
        .collect()
}

/// The note type of a SystemTap SDT note.
const NT_STAPSDT: u32 = 3;

/// One ELF note, its name and descriptor as they are in the section (padding left out).
struct ElfNote<'a> {
    ty: u32,
    name: &'a [u8],
    desc: &'a [u8],
}

/// The notes of a note section, in order; a note that runs past the section is an error (the
/// reason), after which there are no more.
struct ElfNotes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> ElfNotes<'a> {
    fn u32_at(&self, at: usize) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(
            self.data
                .get(at..at + 4)
                .ok_or("truncated header")?
                .try_into()
                .expect("4"),
        ))
    }

    fn note_at(&self, at: usize) -> Result<(ElfNote<'a>, usize), &'static str> {
        let (namesz, descsz, ty) = (
            self.u32_at(at)? as usize,
            self.u32_at(at + 4)? as usize,
            self.u32_at(at + 8)?,
        );
        let name_at = at + 12;
        let desc_at = name_at + namesz.next_multiple_of(4);
        let next = desc_at + descsz.next_multiple_of(4);
        if next > self.data.len() {
            return Err("note runs past the section");
        }
        let note = ElfNote {
            ty,
            name: &self.data[name_at..name_at + namesz],
            desc: &self.data[desc_at..desc_at + descsz],
        };
        Ok((note, next))
    }
}

impl<'a> Iterator for ElfNotes<'a> {
    type Item = Result<ElfNote<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at + 12 > self.data.len() {
            return None;
        }
        match self.note_at(self.at) {
            Ok((note, next)) => {
                self.at = next;
                Some(Ok(note))
            }
            Err(reason) => {
                self.at = self.data.len();
                Some(Err(reason))
            }
        }
    }
}

/// A `stapsdt` note's descriptor: the site's address, the `.stapsdt.base` address and the
/// semaphore's address (0: none) as linked, then provider, name and argument string.
struct StapsdtNote {
    pc: u64,
    base: u64,
    semaphore: u64,
    provider: String,
    name: String,
    args: String,
}

impl StapsdtNote {
    fn parse(desc: &[u8]) -> Result<StapsdtNote, &'static str> {
        if desc.len() < 24 {
            return Err("descriptor shorter than three addresses");
        }
        let word = |i: usize| u64::from_le_bytes(desc[i * 8..i * 8 + 8].try_into().expect("8"));
        let mut s = 24;
        let provider = cstr(desc, &mut s).ok_or("no provider")?;
        let name = cstr(desc, &mut s).ok_or("no name")?;
        let args = cstr(desc, &mut s).unwrap_or_default();
        Ok(StapsdtNote {
            pc: word(0),
            base: word(1),
            semaphore: word(2),
            provider,
            name,
            args,
        })
    }
}

/// The site `note` describes, its addresses moved by `delta` and turned into file offsets;
/// `None` for a site in code the linker discarded.
fn site(
    path: &str,
    note: StapsdtNote,
    delta: u64,
    segments: &[Segment],
) -> Result<Option<Site>, UsdtError> {
    let StapsdtNote {
        pc,
        semaphore,
        provider,
        name,
        args,
        ..
    } = note;
    let pc = pc.wrapping_add(delta);
    let semaphore = if semaphore == 0 {
        0
    } else {
        semaphore.wrapping_add(delta)
    };
    let spec = parse_args(&args).map_err(|(arg, reason)| UsdtError::BadArg {
        path: path.to_string(),
        probe: format!("{provider}:{name}"),
        arg,
        reason,
    })?;
    // A note whose site is in no executable segment belongs to code the linker discarded
    // (--gc-sections keeps the note, with the dead function's address resolved to 0 plus
    // the site's offset): it can never fire, and the kernel refuses a uprobe there.
    let Some(site_offset) = file_offset(segments, pc, true) else {
        log::debug!("{path}: {provider}:{name} at {pc:#x} is in discarded code, skipped");
        return Ok(None);
    };
    let semaphore_offset = if semaphore == 0 {
        0
    } else {
        let offset =
            file_offset(segments, semaphore, false).ok_or_else(|| UsdtError::NoSegment {
                path: path.to_string(),
                probe: name.clone(),
                addr: semaphore,
            })?;
        if semaphore_shadowed(segments, semaphore, offset) {
            return Err(UsdtError::SemaphoreShadowed {
                path: path.to_string(),
                probe: format!("{provider}:{name}"),
                offset,
            });
        }
        offset
    };
    Ok(Some(Site {
        provider,
        name,
        file_offset: site_offset,
        semaphore_offset,
        args,
        spec,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_argument_forms() {
        let a = parse_arg("-8@%rdi").unwrap();
        assert_eq!(
            (a.arg_type, a.reg_off, a.arg_signed, a.arg_bitshift),
            (USDT_ARG_REG, 112, 1, 0)
        );
        let a = parse_arg("4@-16(%rbp)").unwrap();
        assert_eq!(
            (
                a.arg_type,
                a.reg_off,
                a.val_off as i64,
                a.arg_signed,
                a.arg_bitshift
            ),
            (USDT_ARG_REG_DEREF, 32, -16, 0, 32)
        );
        let a = parse_arg("-2@$-5").unwrap();
        assert_eq!(
            (a.arg_type, a.val_off as i64, a.arg_bitshift),
            (USDT_ARG_CONST, -5, 48)
        );
        let a = parse_arg("8@(%rax)").unwrap();
        assert_eq!(
            (a.arg_type, a.reg_off, a.val_off),
            (USDT_ARG_REG_DEREF, 80, 0)
        );
        assert!(parse_arg("3@%rdi").is_err());
        assert!(parse_arg("8@%xmm0").is_err());
        assert!(parse_arg("8@8(%rax,%rbx,2)").is_err());
        assert_eq!(parse_args("-8@%rdi -8@%rsi 8@$1").unwrap().arg_cnt, 3);
    }

    #[test]
    fn finds_this_binarys_own_sites() {
        // A site in this test binary, with a semaphore.
        #[inline(never)]
        fn fire(x: u64) -> bool {
            probe::probe_lazy!(enlight_test, parse_me, x, x + 1)
        }
        assert!(!fire(1));
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let sites = sites(&exe).unwrap();
        let site = sites
            .iter()
            .find(|s| s.provider == "enlight_test" && s.name == "parse_me")
            .expect("site present");
        assert_eq!(site.spec.arg_cnt, 2);
        assert!(site.semaphore_offset != 0 && site.file_offset != 0);
        // The byte at the site's file offset is the probe's nop.
        let bytes = std::fs::read(&exe).unwrap();
        assert_eq!(bytes[site.file_offset as usize], 0x90);
    }

    /// The two writable segments of the debug `enlight` whose devices never saw a tracer.
    fn debug_enlight_segments() -> Vec<Segment> {
        let seg = |vaddr, offset, size| Segment {
            vaddr,
            offset,
            size,
            executable: false,
            writable: true,
        };
        vec![
            seg(0x19b7f50, 0x19b5f50, 0x121160),
            seg(0x1ada0b0, 0x1ad70b0, 0xec2),
        ]
    }

    #[test]
    fn a_semaphore_on_the_page_where_relro_ends_is_shadowed() {
        let segs = debug_enlight_segments();
        // `.probes` 0xf62 bytes into the page the first segment's end shares: refused.
        assert!(semaphore_shadowed(&segs, 0x1adaf62, 0x1ad7f62));
        // The same semaphore a page further on (page-aligned `.probes`): its page is its own.
        assert!(!semaphore_shadowed(&segs, 0x1adb000, 0x1ad8000));
        // A semaphore in the first segment is found first: fine.
        assert!(!semaphore_shadowed(&segs, 0x1a00000, 0x19fe000));
    }

    #[test]
    fn the_enlight_binaries_semaphores_are_on_pages_of_their_own() {
        // This test binary's sites (the driver's macro, page-aligned semaphores) parse without
        // a shadowed semaphore, whatever the linker made of this build.
        #[inline(never)]
        fn fire(x: u64) -> bool {
            enlight_driver::usdt_lazy!(enlight_test, own_page_site, x)
        }
        assert!(!fire(1));
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let site = sites(&exe)
            .unwrap()
            .into_iter()
            .find(|s| s.name == "own_page_site")
            .expect("site present");
        assert_eq!(site.semaphore_offset % PAGE, 0, "{site:?}");
    }

    #[test]
    fn an_enlight_site_is_a_five_byte_nop_with_its_arguments() {
        // The driver's own macro: a 5-byte nop, so that the kernel can optimise the uprobe.
        #[inline(never)]
        fn fire(x: u64) -> bool {
            enlight_driver::usdt_lazy!(enlight_test, five_byte_site, x, x + 1, 7u32)
        }
        assert!(!fire(1));
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let sites = sites(&exe).unwrap();
        let site = sites
            .iter()
            .find(|s| s.provider == "enlight_test" && s.name == "five_byte_site")
            .expect("site present");
        assert_eq!(site.spec.arg_cnt, 3);
        assert!(site.semaphore_offset != 0 && site.file_offset != 0);
        let bytes = std::fs::read(&exe).unwrap();
        let at = site.file_offset as usize;
        assert_eq!(&bytes[at..at + 5], &[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    }

    #[test]
    fn a_site_in_discarded_code_has_no_offset() {
        // The layout of a typical PIE: headers and read-only data, then text, then data.
        let segs = [
            Segment {
                vaddr: 0,
                offset: 0,
                size: 0x6000,
                executable: false,
                writable: false,
            },
            Segment {
                vaddr: 0x7000,
                offset: 0x6000,
                size: 0x9000,
                executable: true,
                writable: false,
            },
            Segment {
                vaddr: 0x11000,
                offset: 0xf000,
                size: 0x1000,
                executable: false,
                writable: true,
            },
        ];
        // A site in text maps into the file; one the linker discarded (address 0 + offset)
        // lands in the headers, which are no code.
        assert_eq!(file_offset(&segs, 0x7010, true), Some(0x6010));
        assert_eq!(file_offset(&segs, 0xa4, true), None);
        // A semaphore lives in data, which is fine for a data address.
        assert_eq!(file_offset(&segs, 0x11008, false), Some(0xf008));
        assert_eq!(file_offset(&segs, 0x11008, true), None);
        assert_eq!(file_offset(&segs, 0x20000, false), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            sites_in("x", b"not an elf"),
            Err(UsdtError::Elf { .. })
        ));
    }
}
