//! A tiny x86-64 encoder: exactly the instructions the guest driver loops use, with labels and
//! 32-bit relative jumps. Hand-encoded (Intel SDM vol. 2) rather than pulling in an assembler
//! crate for thirty instructions; the guest tests run every path it emits.

use std::collections::HashMap;

/// 8-bit registers the encoder uses as `al`; 32-bit ones by their ModRM number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum R32 {
    Eax = 0,
    Ecx = 1,
    Edx = 2,
    Ebx = 3,
    Esi = 6,
    Edi = 7,
}

/// Conditions for [`Asm::jcc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// ZF = 1.
    Z = 0x4,
    /// ZF = 0.
    Nz = 0x5,
}

/// A program being assembled at a fixed load address.
pub struct Asm {
    base: u64,
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    /// An empty program that will run at guest virtual address `base`.
    pub fn new(base: u64) -> Asm {
        Asm {
            base,
            code: Vec::new(),
            labels: HashMap::new(),
            fixups: Vec::new(),
        }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }

    /// Defines `name` here.
    pub fn label(&mut self, name: &'static str) -> &mut Self {
        assert!(
            self.labels.insert(name, self.code.len()).is_none(),
            "label {name} defined twice"
        );
        self
    }

    /// `mov r32, imm32`.
    pub fn mov_imm(&mut self, r: R32, imm: u32) -> &mut Self {
        self.bytes(&[0xB8 + r as u8]).bytes(&imm.to_le_bytes())
    }

    /// `mov dx, imm16`.
    pub fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.bytes(&[0x66, 0xBA]).bytes(&port.to_le_bytes())
    }

    /// `mov al, imm8`.
    pub fn mov_al(&mut self, imm: u8) -> &mut Self {
        self.bytes(&[0xB0, imm])
    }

    /// `mov r32, [rbx + disp8]`.
    pub fn load_rbx(&mut self, r: R32, disp: i8) -> &mut Self {
        self.bytes(&[0x8B, 0x43 | (r as u8) << 3, disp as u8])
    }

    /// `mov [rbx + disp8], r32`.
    pub fn store_rbx(&mut self, r: R32, disp: i8) -> &mut Self {
        self.bytes(&[0x89, 0x43 | (r as u8) << 3, disp as u8])
    }

    /// `shr eax, imm8`.
    pub fn shr_eax(&mut self, n: u8) -> &mut Self {
        self.bytes(&[0xC1, 0xE8, n])
    }

    /// `and al, imm8`.
    pub fn and_al(&mut self, imm: u8) -> &mut Self {
        self.bytes(&[0x24, imm])
    }

    /// `or al, imm8`.
    pub fn or_al(&mut self, imm: u8) -> &mut Self {
        self.bytes(&[0x0C, imm])
    }

    /// `test al, imm8`.
    pub fn test_al(&mut self, imm: u8) -> &mut Self {
        self.bytes(&[0xA8, imm])
    }

    /// `cmp eax, imm8`.
    pub fn cmp_eax(&mut self, imm: i8) -> &mut Self {
        self.bytes(&[0x83, 0xF8, imm as u8])
    }

    /// `movzx eax, al`.
    pub fn movzx_eax_al(&mut self) -> &mut Self {
        self.bytes(&[0x0F, 0xB6, 0xC0])
    }

    /// `out dx, al`.
    pub fn out_al(&mut self) -> &mut Self {
        self.bytes(&[0xEE])
    }

    /// `out dx, ax`.
    pub fn out_ax(&mut self) -> &mut Self {
        self.bytes(&[0x66, 0xEF])
    }

    /// `in al, dx`.
    pub fn in_al(&mut self) -> &mut Self {
        self.bytes(&[0xEC])
    }

    /// `in ax, dx`.
    pub fn in_ax(&mut self) -> &mut Self {
        self.bytes(&[0x66, 0xED])
    }

    /// `mov [rdi], ax`.
    pub fn store_ax_rdi(&mut self) -> &mut Self {
        self.bytes(&[0x66, 0x89, 0x07])
    }

    /// `mov ax, [rdi]`.
    pub fn load_ax_rdi(&mut self) -> &mut Self {
        self.bytes(&[0x66, 0x8B, 0x07])
    }

    /// `mov eax, [rdi]`.
    pub fn load_eax_rdi(&mut self) -> &mut Self {
        self.bytes(&[0x8B, 0x07])
    }

    /// `add rdi, imm8`.
    pub fn add_rdi(&mut self, imm: i8) -> &mut Self {
        self.bytes(&[0x48, 0x83, 0xC7, imm as u8])
    }

    /// `dec r32`.
    pub fn dec(&mut self, r: R32) -> &mut Self {
        self.bytes(&[0xFF, 0xC8 | r as u8])
    }

    /// `mov dword [abs32], imm32` (the address sign-extends: keep it below 2 GiB).
    pub fn store_abs(&mut self, addr: u32, imm: u32) -> &mut Self {
        assert!(addr < 0x8000_0000, "absolute address must sign-extend");
        self.bytes(&[0xC7, 0x04, 0x25])
            .bytes(&addr.to_le_bytes())
            .bytes(&imm.to_le_bytes())
    }

    /// `mov edx, eax`.
    pub fn mov_edx_eax(&mut self) -> &mut Self {
        self.bytes(&[0x89, 0xC2])
    }

    /// `and edx, imm8` (sign-extended).
    pub fn and_edx(&mut self, imm: i8) -> &mut Self {
        self.bytes(&[0x83, 0xE2, imm as u8])
    }

    /// `shl edx, imm8`.
    pub fn shl_edx(&mut self, n: u8) -> &mut Self {
        self.bytes(&[0xC1, 0xE2, n])
    }

    /// `add edx, imm32`.
    pub fn add_edx(&mut self, imm: u32) -> &mut Self {
        self.bytes(&[0x81, 0xC2]).bytes(&imm.to_le_bytes())
    }

    /// `mov rdi, [rsi + disp8]`.
    pub fn load_rdi_rsi(&mut self, disp: i8) -> &mut Self {
        self.bytes(&[0x48, 0x8B, 0x7E, disp as u8])
    }

    /// `mov [rdx + disp8], rdi`.
    pub fn store_rdi_rdx(&mut self, disp: i8) -> &mut Self {
        self.bytes(&[0x48, 0x89, 0x7A, disp as u8])
    }

    /// `add esi, imm8`.
    pub fn add_esi(&mut self, imm: i8) -> &mut Self {
        self.bytes(&[0x83, 0xC6, imm as u8])
    }

    /// `inc eax`.
    pub fn inc_eax(&mut self) -> &mut Self {
        self.bytes(&[0xFF, 0xC0])
    }

    /// `mov r32, [abs32]` (eax or edx).
    pub fn load_abs(&mut self, r: R32, addr: u32) -> &mut Self {
        assert!(addr < 0x8000_0000, "absolute address must sign-extend");
        self.bytes(&[0x8B, 0x04 | (r as u8) << 3, 0x25])
            .bytes(&addr.to_le_bytes())
    }

    /// `mov [abs32], r32`.
    pub fn store_abs_reg(&mut self, r: R32, addr: u32) -> &mut Self {
        assert!(addr < 0x8000_0000, "absolute address must sign-extend");
        self.bytes(&[0x89, 0x04 | (r as u8) << 3, 0x25])
            .bytes(&addr.to_le_bytes())
    }

    /// `cmp edx, eax`.
    pub fn cmp_edx_eax(&mut self) -> &mut Self {
        self.bytes(&[0x39, 0xC2])
    }

    /// `pause`.
    pub fn pause(&mut self) -> &mut Self {
        self.bytes(&[0xF3, 0x90])
    }

    fn rel32(&mut self, opcode: &[u8], target: &'static str) -> &mut Self {
        self.bytes(opcode);
        self.fixups.push((self.code.len(), target));
        self.bytes(&[0; 4])
    }

    /// `jmp rel32`.
    pub fn jmp(&mut self, target: &'static str) -> &mut Self {
        self.rel32(&[0xE9], target)
    }

    /// `jcc rel32`.
    pub fn jcc(&mut self, cond: Cond, target: &'static str) -> &mut Self {
        self.rel32(&[0x0F, 0x80 | cond as u8], target)
    }

    /// Resolves the jumps; panics on an undefined label (a bug in the program, not input).
    pub fn finish(&mut self) -> Vec<u8> {
        for (at, name) in std::mem::take(&mut self.fixups) {
            let target = *self
                .labels
                .get(name)
                .unwrap_or_else(|| panic!("undefined label {name}"));
            let rel = target as i64 - (at as i64 + 4);
            self.code[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        self.code.clone()
    }

    /// Where the program runs.
    pub fn base(&self) -> u64 {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_the_manual() {
        let mut a = Asm::new(0x8000);
        a.label("top")
            .mov_imm(R32::Ebx, 0x10000)
            .mov_dx(0x1F7)
            .load_rbx(R32::Ecx, 4)
            .store_rbx(R32::Eax, 16)
            .in_ax()
            .store_ax_rdi()
            .add_rdi(2)
            .dec(R32::Esi)
            .jcc(Cond::Nz, "top")
            .store_abs(0x3000_0000, 1)
            .jmp("top");
        let code = a.finish();
        let expected: Vec<u8> = [
            &[0xBB, 0x00, 0x00, 0x01, 0x00][..], // mov ebx, 0x10000
            &[0x66, 0xBA, 0xF7, 0x01],           // mov dx, 0x1f7
            &[0x8B, 0x4B, 0x04],                 // mov ecx, [rbx+4]
            &[0x89, 0x43, 0x10],                 // mov [rbx+16], eax
            &[0x66, 0xED],                       // in ax, dx
            &[0x66, 0x89, 0x07],                 // mov [rdi], ax
            &[0x48, 0x83, 0xC7, 0x02],           // add rdi, 2
            &[0xFF, 0xCE],                       // dec esi
            &[0x0F, 0x85],                       // jnz top
        ]
        .concat();
        assert_eq!(&code[..expected.len()], &expected[..]);
        let jnz_end = expected.len() + 4;
        let rel = i32::from_le_bytes(code[expected.len()..jnz_end].try_into().unwrap());
        assert_eq!(rel, -(jnz_end as i32));
        assert_eq!(
            &code[jnz_end..jnz_end + 11],
            &[0xC7, 0x04, 0x25, 0, 0, 0, 0x30, 1, 0, 0, 0]
        );
        assert_eq!(code[jnz_end + 11], 0xE9);
    }

    #[test]
    fn ring_instructions_match_the_manual() {
        let mut a = Asm::new(0);
        a.mov_edx_eax()
            .and_edx(63)
            .shl_edx(5)
            .add_edx(0x20000)
            .load_rdi_rsi(8)
            .store_rdi_rdx(24)
            .add_esi(32)
            .inc_eax()
            .load_abs(R32::Edx, 0x1F040)
            .store_abs_reg(R32::Eax, 0x1F000)
            .cmp_edx_eax()
            .pause()
            .load_eax_rdi();
        let expected: Vec<u8> = [
            &[0x89, 0xC2][..],                           // mov edx, eax
            &[0x83, 0xE2, 0x3F],                         // and edx, 63
            &[0xC1, 0xE2, 0x05],                         // shl edx, 5
            &[0x81, 0xC2, 0x00, 0x00, 0x02, 0x00],       // add edx, 0x20000
            &[0x48, 0x8B, 0x7E, 0x08],                   // mov rdi, [rsi+8]
            &[0x48, 0x89, 0x7A, 0x18],                   // mov [rdx+24], rdi
            &[0x83, 0xC6, 0x20],                         // add esi, 32
            &[0xFF, 0xC0],                               // inc eax
            &[0x8B, 0x14, 0x25, 0x40, 0xF0, 0x01, 0x00], // mov edx, [0x1f040]
            &[0x89, 0x04, 0x25, 0x00, 0xF0, 0x01, 0x00], // mov [0x1f000], eax
            &[0x39, 0xC2],                               // cmp edx, eax
            &[0xF3, 0x90],                               // pause
            &[0x8B, 0x07],                               // mov eax, [rdi]
        ]
        .concat();
        assert_eq!(a.finish(), expected);
    }
}
