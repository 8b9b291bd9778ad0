//! x86-64 long-mode setup for the KVM guest: where things live in guest RAM, identity page
//! tables, the GDT, initial registers, the guest program, and the saved vCPU state layout.
//!
//! # Guest pages used by the setup
//!
//! Everything sits in the first 1 MiB (16 MiB for a first region of 64 MiB or more:
//! [`reserved_bytes`]) of the FIRST RAM region (base `B` = its gpa, `R` = the area's
//! size), which the walk never writes:
//!
//! | gpa                      | content                                              |
//! |--------------------------|------------------------------------------------------|
//! | `B + 0x1000·i`           | vCPU `i`'s walk table ([`super::WalkTable`]), `i < 16` |
//! | `B + 0x10000`            | GDT: null, kernel code (0x08), data (0x10), TSS (0x18), user data (0x2b), user code (0x33) |
//! | `B + 0x11000`            | guest program ([`GUEST_CODE`])                       |
//! | `B + 0x14000`            | PML4, then PDPT and PD pages as needed, up to `R - 128 KiB` |
//! | `B + R - 128 KiB + 4 KiB·i` | vCPU `i`'s progress words (counter, batches)      |
//! | `B + R - 64 KiB + 4 KiB·i`  | vCPU `i`'s stack page (unused by the program)     |
//!
//! All of it is ordinary guest RAM, so it migrates with the rest of memory. The guest only
//! reads it, except its progress words: descriptors have their Accessed bit and page-table
//! entries their Accessed (and, for leaves, Dirty) bits preset, so the CPU never writes back
//! to them and these pages stay out of KVM's dirty log. The progress pages sit at the top
//! of the area, past its first MiB, and are the only reserved pages the guest dirties.
//!
//! # The program runs in user mode (CPL 3)
//!
//! Under PVM (`kvm_pvm`, KVM without VMX/SVM) guest supervisor code that is not a PVM
//! kernel is emulated instruction by instruction (about 30k pages/s here), while guest
//! user code runs natively (about 100M pages/s). So the vCPUs start at CPL 3: user code and
//! data segments, the U/S bit on every page-table entry, and IOPL 3 so the `in` of a
//! quantum request is allowed. Nothing in the program needs CPL 0; on VMX/SVM hosts it runs
//! natively either way.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use super::memory::{GuestMemory, PAGE_SIZE};
use super::state::{Reader, Writer, KIND_KVM};
use super::GuestError;
use crate::range::IovaRange;

/// Bytes at the start of the first region reserved for the setup (never walked), at least.
pub const RESERVED_BYTES: u64 = 1 << 20;

/// The reserved area for a first region of `first_len` bytes: 1 MiB, or 16 MiB once the
/// region is 64 MiB or more. Without 1 GiB pages every GiB of guest RAM costs a page-table
/// page; 1 MiB holds tables for about 230 GiB, 16 MiB for about 4 TiB.
pub fn reserved_bytes(first_len: u64) -> u64 {
    if first_len >= 64 << 20 {
        16 << 20
    } else {
        RESERVED_BYTES
    }
}
const SETUP_OFFSET: u64 = 0x10000;
const GDT_OFFSET: u64 = SETUP_OFFSET;
const CODE_OFFSET: u64 = SETUP_OFFSET + 0x1000;
const PML4_OFFSET: u64 = SETUP_OFFSET + 0x4000;
/// Most vCPUs the setup has room for (one table page each below the GDT).
pub const MAX_VCPUS: usize = 16;
/// Per-vCPU pages at the top of the reserved area: progress words, then stacks.
const PER_VCPU_AREA: u64 = 2 * MAX_VCPUS as u64 * PAGE_SIZE;

pub use super::program::PROGRESS_PORT;

/// Page-table entry bits.
const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
/// Flags of a table (non-leaf) entry, user-accessible (the program runs at CPL 3). Accessed
/// is preset so the CPU never writes the tables (a hardware A/D update is a guest write and
/// would dirty the reserved pages).
const TABLE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US | PTE_A;
/// Flags of a huge leaf entry, Accessed and Dirty preset for the same reason.
const LEAF_FLAGS: u64 = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Identity mapping stays in the canonical lower half of 4-level paging.
const MAX_MAPPED: u128 = 1 << 47;

pub use super::program::{GUEST_CODE, STORE_OFFSET};

/// Where the setup lives for a given memory layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupLayout {
    /// GDT gpa.
    pub gdt: u64,
    /// Guest program gpa (initial RIP).
    pub code: u64,
    /// vCPU 0's walk table gpa (its initial RBX); vCPU `i`'s is [`SetupLayout::table_of`].
    pub table: u64,
    /// vCPU 0's initial RSP; vCPU `i`'s is [`SetupLayout::stack_top_of`].
    pub stack_top: u64,
    /// PML4 gpa (CR3).
    pub pml4: u64,
    /// First byte past the page-table space (page tables must end at or below it).
    pub limit: u64,
    /// The reserved byte range (never walked, never a DMA target).
    pub reserved: IovaRange,
}

impl SetupLayout {
    /// Layout for `mem`; its first region must be larger than [`RESERVED_BYTES`].
    pub fn for_memory(mem: &GuestMemory) -> Result<Self, GuestError> {
        let first = mem.regions()[0];
        let reserved = reserved_bytes(first.length);
        if first.length <= reserved {
            return Err(GuestError::FirstRegionTooSmall {
                size: first.length,
                needed: reserved + PAGE_SIZE,
            });
        }
        let b = first.iova;
        let limit = b + reserved - PER_VCPU_AREA;
        Ok(Self {
            gdt: b + GDT_OFFSET,
            code: b + CODE_OFFSET,
            table: b,
            stack_top: limit + PER_VCPU_AREA / 2 + PAGE_SIZE,
            pml4: b + PML4_OFFSET,
            limit,
            reserved: IovaRange::new(b, reserved),
        })
    }

    /// vCPU `i`'s walk table (`i < MAX_VCPUS`).
    pub fn table_of(&self, i: usize) -> u64 {
        self.table + i as u64 * PAGE_SIZE
    }

    /// vCPU `i`'s progress words: `[counter, batches]`, written by the guest.
    pub fn progress_of(&self, i: usize) -> u64 {
        self.limit + i as u64 * PAGE_SIZE
    }

    /// vCPU `i`'s initial RSP (top of its own stack page).
    pub fn stack_top_of(&self, i: usize) -> u64 {
        self.stack_top + i as u64 * PAGE_SIZE
    }
}

/// Build identity page tables covering every region, at `pml4` with pages allocated up to
/// `limit`. `huge_1g` uses 1 GiB PDPT leaves (needs CPUID pdpe1gb), else 2 MiB PD leaves.
/// Returns the first free gpa after the tables.
pub fn build_page_tables(
    mem: &GuestMemory,
    pml4: u64,
    limit: u64,
    huge_1g: bool,
) -> Result<u64, GuestError> {
    let mut next = pml4 + PAGE_SIZE;
    let zero = [0u8; PAGE_SIZE as usize];
    mem.write_page(pml4, &zero)?;
    // Return the next-level table that `entry_gpa` points to, allocating it if absent.
    let mut table_at = |entry_gpa: u64| -> Result<u64, GuestError> {
        let e = mem.read_u64(entry_gpa)?;
        if e & PTE_P != 0 {
            return Ok(e & PTE_ADDR);
        }
        if next + PAGE_SIZE > limit {
            return Err(GuestError::PageTablesTooLarge {
                available_pages: (limit - pml4) / PAGE_SIZE,
            });
        }
        let t = next;
        next += PAGE_SIZE;
        mem.write_page(t, &zero)?;
        mem.write_u64(entry_gpa, t | TABLE_FLAGS)?;
        Ok(t)
    };
    let leaf = if huge_1g { 1u64 << 30 } else { 1u64 << 21 };
    for r in mem.regions() {
        if r.end() > MAX_MAPPED {
            return Err(GuestError::AddressTooHigh { gpa: r.iova });
        }
        let mut a = r.iova & !(leaf - 1);
        while (a as u128) < r.end() {
            let pdpt = table_at(pml4 + 8 * ((a >> 39) & 511))?;
            let pdpte = pdpt + 8 * ((a >> 30) & 511);
            if huge_1g {
                mem.write_u64(pdpte, a | LEAF_FLAGS)?;
            } else {
                let pd = table_at(pdpte)?;
                mem.write_u64(pd + 8 * ((a >> 21) & 511), a | LEAF_FLAGS)?;
            }
            a += leaf;
        }
    }
    Ok(next)
}

/// Walk the 4-level tables at `cr3` in guest memory like the MMU does: the physical
/// address `va` maps to, or `None` if not present.
pub fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
    let pml4e = mem
        .read_u64((cr3 & PTE_ADDR) + 8 * ((va >> 39) & 511))
        .ok()?;
    if pml4e & PTE_P == 0 {
        return None;
    }
    let pdpte = mem
        .read_u64((pml4e & PTE_ADDR) + 8 * ((va >> 30) & 511))
        .ok()?;
    if pdpte & PTE_P == 0 {
        return None;
    }
    if pdpte & PTE_PS != 0 {
        return Some((pdpte & PTE_ADDR & !((1 << 30) - 1)) | (va & ((1 << 30) - 1)));
    }
    let pde = mem
        .read_u64((pdpte & PTE_ADDR) + 8 * ((va >> 21) & 511))
        .ok()?;
    if pde & PTE_P == 0 {
        return None;
    }
    if pde & PTE_PS != 0 {
        return Some((pde & PTE_ADDR & !((1 << 21) - 1)) | (va & ((1 << 21) - 1)));
    }
    let pte = mem
        .read_u64((pde & PTE_ADDR) + 8 * ((va >> 12) & 511))
        .ok()?;
    (pte & PTE_P != 0).then_some((pte & PTE_ADDR) | (va & 0xfff))
}

/// Whether the tables at `cr3` use any 1 GiB page (so the CPU must offer pdpe1gb).
pub fn uses_1g_pages(mem: &GuestMemory, cr3: u64) -> bool {
    (0..512u64).any(|i| {
        let Ok(pml4e) = mem.read_u64((cr3 & PTE_ADDR) + 8 * i) else {
            return false;
        };
        pml4e & PTE_P != 0
            && (0..512u64).any(|j| {
                mem.read_u64((pml4e & PTE_ADDR) + 8 * j)
                    .is_ok_and(|e| e & (PTE_P | PTE_PS) == PTE_P | PTE_PS)
            })
    })
}

/// Remap the reserved area with 4 KiB pages, read-only except the per-vCPU progress and
/// stack pages at its top (`layout.limit ..`), taking table pages from `next` (the first
/// free gpa after [`build_page_tables`]). Why: a guest read of a page mapped writable (Dirty
/// preset) makes a shadow MMU (PVM) install a writable entry and log the page dirty, so the
/// program, its tables and the GDT would show in the dirty log without being written.
/// Returns the next free gpa.
pub fn protect_setup(
    mem: &GuestMemory,
    layout: &SetupLayout,
    mut next: u64,
) -> Result<u64, GuestError> {
    const RO_LEAF: u64 = PTE_P | PTE_US | PTE_A | PTE_D;
    const RW_LEAF: u64 = RO_LEAF | PTE_RW;
    let mut alloc = || {
        if next + PAGE_SIZE > layout.limit {
            return Err(GuestError::PageTablesTooLarge {
                available_pages: (layout.limit - layout.pml4) / PAGE_SIZE,
            });
        }
        next += PAGE_SIZE;
        Ok(next - PAGE_SIZE)
    };
    let r = layout.reserved;
    let mut a = r.iova & !((1 << 21) - 1);
    while (a as u128) < r.end() {
        let pml4e = mem.read_u64(layout.pml4 + 8 * ((a >> 39) & 511))?;
        let pdpte_at = (pml4e & PTE_ADDR) + 8 * ((a >> 30) & 511);
        let pdpte = mem.read_u64(pdpte_at)?;
        if pdpte & PTE_PS != 0 {
            let pd = alloc()?;
            let base = pdpte & PTE_ADDR & !((1 << 30) - 1);
            for k in 0..512 {
                mem.write_u64(pd + 8 * k, (base + (k << 21)) | LEAF_FLAGS)?;
            }
            mem.write_u64(pdpte_at, pd | TABLE_FLAGS)?;
        }
        let pde_at = (mem.read_u64(pdpte_at)? & PTE_ADDR) + 8 * ((a >> 21) & 511);
        let pde = mem.read_u64(pde_at)?;
        if pde & PTE_PS != 0 {
            let pt = alloc()?;
            let base = pde & PTE_ADDR & !((1 << 21) - 1);
            for k in 0..512 {
                let page = base + k * PAGE_SIZE;
                let ro = r.contains(page) && page < layout.limit;
                mem.write_u64(pt + 8 * k, page | if ro { RO_LEAF } else { RW_LEAF })?;
            }
            mem.write_u64(pde_at, pt | TABLE_FLAGS)?;
        }
        a += 1 << 21;
    }
    Ok(next)
}

/// A GDT descriptor from access/flags bits (`0xF0FF` mask: flags nibble + access byte).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// GDT: null; code = present, DPL0, exec/read, L=1, G=1; data = present, read/write, D/B=1,
/// G=1; TSS = present, 64-bit busy TSS (VMX requires a usable TR in long mode; a 64-bit TSS
/// descriptor takes two slots, so slot 4 stays empty); then user data and user code, as
/// the kernel ones with DPL 3 (the vCPUs run at CPL 3, see the module docs).
const GDT: [u64; 7] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
    0,
    gdt_entry(0xc0f3, 0, 0xfffff),
    gdt_entry(0xa0fb, 0, 0xfffff),
];

/// The `kvm_segment` the CPU caches for GDT entry `index` (matches [`GDT`]); the
/// selector's RPL is the descriptor's DPL.
fn segment(index: u16) -> kvm_segment {
    let e = GDT[index as usize];
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = (((e >> 32) & 0x000f_0000) | (e & 0xffff)) as u32;
    kvm_segment {
        base: 0,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) | ((e >> 45) & 3) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// GDT slots of the user segments the program runs on.
const USER_DATA: u16 = 5;
const USER_CODE: u16 = 6;
/// RFLAGS bit 1 is always set; IOPL 3 lets CPL 3 code use `in` (the quantum request).
const RFLAGS_FIXED: u64 = 0x2;
const RFLAGS_IOPL3: u64 = 3 << 12;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Write the GDT, program and one walk table per vCPU (`tables`, at most [`MAX_VCPUS`],
/// each with its `progress` gpa set), clear the progress and stack pages, and build the
/// page tables. Host writes: none of this shows in KVM's dirty log (the migration's first
/// pass sends all RAM anyway).
pub fn write_setup(
    mem: &GuestMemory,
    layout: &SetupLayout,
    tables: &[super::walk::WalkTable],
    huge_1g: bool,
) -> Result<(), GuestError> {
    if tables.is_empty() || tables.len() > MAX_VCPUS {
        return Err(GuestError::VcpuCount {
            count: tables.len(),
            max: MAX_VCPUS,
        });
    }
    let zero = [0u8; PAGE_SIZE as usize];
    mem.write_page(layout.gdt, &zero)?;
    for (i, e) in GDT.iter().enumerate() {
        mem.write_u64(layout.gdt + 8 * i as u64, *e)?;
    }
    let mut code = zero;
    code[..GUEST_CODE.len()].copy_from_slice(GUEST_CODE);
    mem.write_page(layout.code, &code)?;
    for (i, t) in tables.iter().enumerate() {
        t.write_to(mem, layout.table_of(i))?;
        mem.write_page(layout.progress_of(i), &zero)?;
        mem.write_page(layout.stack_top_of(i) - PAGE_SIZE, &zero)?;
    }
    let next = build_page_tables(mem, layout.pml4, layout.limit, huge_1g)?;
    protect_setup(mem, layout, next)?;
    Ok(())
}

/// Long-mode special registers, starting from the vCPU's reset values (`base`, which keeps
/// e.g. `apic_base`).
pub fn long_mode_sregs(base: &kvm_sregs, layout: &SetupLayout) -> kvm_sregs {
    let mut s = *base;
    // User mode (CPL 3): native speed under PVM (module docs).
    let code = segment(USER_CODE);
    let data = segment(USER_DATA);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(3);
    s.gdt = kvm_dtable {
        base: layout.gdt,
        limit: (8 * GDT.len() - 1) as u16,
        padding: [0; 3],
    };
    // No IDT: interrupts stay disabled and the program raises no exception; a fault would
    // triple-fault into KVM_EXIT_SHUTDOWN, which the run loop reports as an error.
    s.idt = kvm_dtable::default();
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = layout.pml4;
    s.cr4 = CR4_PAE;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// Initial general registers of vCPU `i`: RIP at the program, RBX at its walk table, RSP
/// at its stack, counter, index and limit 0 (so it asks for a quantum after its first
/// batch), interrupts off.
pub fn initial_regs(layout: &SetupLayout, i: usize) -> kvm_regs {
    kvm_regs {
        rip: layout.code,
        rbx: layout.table_of(i),
        rsp: layout.stack_top_of(i),
        rflags: RFLAGS_FIXED | RFLAGS_IOPL3,
        ..Default::default()
    }
}

/// What the next host needs to continue this guest: the general and special registers.
/// FPU/SSE, MSRs other than EFER (in `sregs`), LAPIC and events are not saved: the program
/// uses no FPU, no interrupts and no other MSR.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VcpuState {
    /// General registers (the program's counter is `r8`).
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER.
    pub sregs: kvm_sregs,
}

fn put_seg(w: &mut Writer, s: &kvm_segment) {
    w.u64(s.base);
    w.u32(s.limit);
    w.u16(s.selector);
    for b in [
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ] {
        w.u8(b);
    }
}

fn get_seg(r: &mut Reader<'_>) -> Result<kvm_segment, GuestError> {
    Ok(kvm_segment {
        base: r.u64()?,
        limit: r.u32()?,
        selector: r.u16()?,
        type_: r.u8()?,
        present: r.u8()?,
        dpl: r.u8()?,
        db: r.u8()?,
        s: r.u8()?,
        l: r.u8()?,
        g: r.u8()?,
        avl: r.u8()?,
        unusable: r.u8()?,
        padding: 0,
    })
}

fn regs_array(r: &kvm_regs) -> [u64; 18] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
}

impl VcpuState {
    /// The value of the program's last completed page write: `r8`, except when the vCPU
    /// stopped between `inc r8` and the store (RIP at [`STORE_OFFSET`]), where RAM holds
    /// `r8 - 1` at most. So this equals the largest counter in RAM.
    pub fn counter(&self) -> u64 {
        if self.regs.rip & (PAGE_SIZE - 1) == STORE_OFFSET {
            self.regs.r8.wrapping_sub(1)
        } else {
            self.regs.r8
        }
    }

    /// Versioned byte layout (see `state.rs`): header, 18 general registers in `kvm_regs`
    /// order, 8 segments (cs ds es fs gs ss tr ldt), gdt, idt, cr0 cr2 cr3 cr4 cr8 efer
    /// apic_base, 4 interrupt-bitmap words.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(KIND_KVM);
        for v in regs_array(&self.regs) {
            w.u64(v);
        }
        let s = &self.sregs;
        for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
            put_seg(&mut w, seg);
        }
        for t in [&s.gdt, &s.idt] {
            w.u64(t.base);
            w.u16(t.limit);
        }
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
            w.u64(v);
        }
        for v in s.interrupt_bitmap {
            w.u64(v);
        }
        w.finish()
    }

    /// Parse [`VcpuState::to_bytes`] output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GuestError> {
        let mut r = Reader::new(bytes, KIND_KVM)?;
        let mut g = [0u64; 18];
        for v in &mut g {
            *v = r.u64()?;
        }
        let regs = kvm_regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: g[16],
            rflags: g[17],
        };
        let mut s = kvm_sregs {
            cs: get_seg(&mut r)?,
            ds: get_seg(&mut r)?,
            es: get_seg(&mut r)?,
            fs: get_seg(&mut r)?,
            gs: get_seg(&mut r)?,
            ss: get_seg(&mut r)?,
            tr: get_seg(&mut r)?,
            ldt: get_seg(&mut r)?,
            ..Default::default()
        };
        for t in [&mut s.gdt, &mut s.idt] {
            t.base = r.u64()?;
            t.limit = r.u16()?;
        }
        for v in [
            &mut s.cr0,
            &mut s.cr2,
            &mut s.cr3,
            &mut s.cr4,
            &mut s.cr8,
            &mut s.efer,
            &mut s.apic_base,
        ] {
            *v = r.u64()?;
        }
        for v in &mut s.interrupt_bitmap {
            *v = r.u64()?;
        }
        r.end()?;
        Ok(Self { regs, sregs: s })
    }
}

#[cfg(test)]
mod tests {
    use super::super::walk::WalkTable;
    use super::*;

    fn check_identity(huge_1g: bool) {
        let mem =
            GuestMemory::new(&[(0, 64 << 20), (4 << 30, 64 << 20), (1 << 40, 4 << 20)]).unwrap();
        let layout = SetupLayout::for_memory(&mem).unwrap();
        let end = build_page_tables(&mem, layout.pml4, layout.limit, huge_1g).unwrap();
        // PML4 + PDPT for slot 0 + PDPT for 1 TiB (slot 2); with 2 MiB pages also one PD per
        // touched GiB (0, 4, 1024).
        let expect_pages = if huge_1g { 3 } else { 6 };
        assert_eq!(end, layout.pml4 + expect_pages * PAGE_SIZE);
        for r in mem.regions() {
            for va in [
                r.iova,
                r.iova + 0x1234,
                r.iova + r.length / 2 + 8,
                r.iova + r.length - 1,
            ] {
                assert_eq!(translate(&mem, layout.pml4, va), Some(va), "va {va:#x}");
            }
        }
        // User-accessible at every level (the program runs at CPL 3).
        let pml4e = mem.read_u64(layout.pml4).unwrap();
        assert_ne!(pml4e & PTE_US, 0);
        assert_ne!(mem.read_u64(pml4e & PTE_ADDR).unwrap() & PTE_US, 0);
        // Far outside any region (different 1 GiB slot, different PML4 slot): unmapped.
        assert_eq!(translate(&mem, layout.pml4, 2 << 30), None);
        assert_eq!(translate(&mem, layout.pml4, 1 << 45), None);
    }

    #[test]
    fn identity_tables_2m() {
        check_identity(false);
    }

    #[test]
    fn identity_tables_1g() {
        check_identity(true);
    }

    #[test]
    fn unaligned_region_maps_fully_with_2m() {
        // Region not 2 MiB aligned on either end.
        let mem = GuestMemory::new(&[(0, 4 << 20), (0x7ff000, 0x3000)]).unwrap();
        let layout = SetupLayout::for_memory(&mem).unwrap();
        build_page_tables(&mem, layout.pml4, layout.limit, false).unwrap();
        for va in [0x7ff000u64, 0x800000, 0x801fff] {
            assert_eq!(translate(&mem, layout.pml4, va), Some(va));
        }
    }

    #[test]
    fn table_space_and_address_limits() {
        // 300 GiB of 2 MiB pages needs 300 PDs: more than a 1 MiB area (first region under
        // 64 MiB) holds, but it fits the 16 MiB area of a larger first region.
        let mem = GuestMemory::new(&[(0, 32 << 20), (4 << 30, 300 << 30)]).unwrap();
        let layout = SetupLayout::for_memory(&mem).unwrap();
        assert_eq!(layout.reserved.length, RESERVED_BYTES);
        assert!(matches!(
            build_page_tables(&mem, layout.pml4, layout.limit, false),
            Err(GuestError::PageTablesTooLarge { .. })
        ));
        assert!(build_page_tables(&mem, layout.pml4, layout.limit, true).is_ok());
        let mem = GuestMemory::new(&[(0, 300 << 30)]).unwrap();
        let layout = SetupLayout::for_memory(&mem).unwrap();
        assert_eq!(layout.reserved.length, 16 << 20);
        build_page_tables(&mem, layout.pml4, layout.limit, false).unwrap();
        assert_eq!(
            translate(&mem, layout.pml4, (300 << 30) - 8),
            Some((300 << 30) - 8)
        );
        // 5 TiB needs 5120 PDs: more than even the 16 MiB area holds.
        let mem = GuestMemory::new(&[(0, 5 << 40)]).unwrap();
        let layout = SetupLayout::for_memory(&mem).unwrap();
        assert!(matches!(
            build_page_tables(&mem, layout.pml4, layout.limit, false),
            Err(GuestError::PageTablesTooLarge { .. })
        ));
        let mem = GuestMemory::new(&[(0, 2 << 20), (1 << 47, 1 << 20)]).unwrap();
        assert!(matches!(
            build_page_tables(&mem, 0x14000, 0x100000, true),
            Err(GuestError::AddressTooHigh { .. })
        ));
        let small = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        assert!(matches!(
            SetupLayout::for_memory(&small),
            Err(GuestError::FirstRegionTooSmall { .. })
        ));
    }

    #[test]
    fn setup_writes_program_table_and_gdt() {
        let mem = GuestMemory::new(&[(0, 8 << 20)]).unwrap();
        let layout = SetupLayout::for_memory(&mem).unwrap();
        let mut table = WalkTable::new(mem.regions(), layout.reserved, 64).unwrap();
        table.progress = layout.progress_of(0);
        write_setup(&mem, &layout, std::slice::from_ref(&table), false).unwrap();
        let mut page = vec![0u8; 4096];
        mem.read_page(layout.code, &mut page).unwrap();
        assert_eq!(&page[..GUEST_CODE.len()], GUEST_CODE);
        // STORE_OFFSET really is `mov [rcx], r8`, right after `inc r8`.
        let at = STORE_OFFSET as usize;
        assert_eq!(
            &GUEST_CODE[at - 3..at + 3],
            &[0x49, 0xff, 0xc0, 0x4c, 0x89, 0x01]
        );
        // The program reads its entries where the table writes them.
        assert_eq!(
            GUEST_CODE[0x18],
            super::super::program::ENTRIES_OFFSET as u8
        );
        assert_eq!(mem.read_u64(layout.gdt + 8).unwrap(), 0x00af_9b00_0000_ffff);
        assert_eq!(
            mem.read_u64(layout.gdt + 16).unwrap(),
            0x00cf_9300_0000_ffff
        );
        assert_eq!(WalkTable::read_from(&mem, layout.table).unwrap(), table);
        // The setup is read-only to the guest, its progress and stack pages writable, and
        // everything still identity-mapped.
        let leaf = |va: u64| {
            let pml4e = mem.read_u64(layout.pml4).unwrap();
            let pdpte = mem
                .read_u64((pml4e & PTE_ADDR) + 8 * ((va >> 30) & 511))
                .unwrap();
            let pde = mem
                .read_u64((pdpte & PTE_ADDR) + 8 * ((va >> 21) & 511))
                .unwrap();
            mem.read_u64((pde & PTE_ADDR) + 8 * ((va >> 12) & 511))
                .unwrap()
        };
        for ro in [layout.table, layout.code, layout.gdt, layout.pml4] {
            assert_eq!(leaf(ro) & PTE_RW, 0, "{ro:#x} writable");
        }
        for rw in [
            layout.progress_of(0),
            layout.stack_top - 8,
            layout.reserved.end() as u64,
        ] {
            assert_ne!(leaf(rw) & PTE_RW, 0, "{rw:#x} read-only");
        }
        for va in [0, layout.code + 5, layout.progress_of(3), 7 << 20] {
            assert_eq!(translate(&mem, layout.pml4, va), Some(va));
        }
        // Every setup page is inside the reserved (never walked) area.
        for gpa in [
            layout.gdt,
            layout.code,
            layout.table,
            layout.stack_top - 1,
            layout.pml4,
            layout.progress_of(MAX_VCPUS - 1),
            layout.stack_top_of(MAX_VCPUS - 1) - 1,
        ] {
            assert!(layout.reserved.contains(gpa));
        }
        let cs = segment(1);
        assert_eq!((cs.type_, cs.l, cs.db, cs.s, cs.present), (0xb, 1, 0, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(segment(3).s, 0);
        // The user segments the program runs on: the kernel ones at DPL 3, RPL 3.
        let (ucs, uds) = (segment(USER_CODE), segment(USER_DATA));
        assert_eq!((ucs.type_, ucs.l, ucs.dpl, ucs.selector), (0xb, 1, 3, 0x33));
        assert_eq!(
            (uds.type_, uds.db, uds.dpl, uds.selector),
            (0x3, 1, 3, 0x2b)
        );
        let sregs = long_mode_sregs(&kvm_sregs::default(), &layout);
        assert_eq!((sregs.cs.dpl, sregs.ss.dpl), (3, 3));
        assert_eq!(initial_regs(&layout, 0).rflags >> 12 & 3, 3, "IOPL 3");
    }

    #[test]
    fn vcpu_state_round_trips() {
        let mem = GuestMemory::new(&[(0, 8 << 20)]).unwrap();
        let layout = SetupLayout::for_memory(&mem).unwrap();
        let mut st = VcpuState {
            regs: initial_regs(&layout, 0),
            sregs: long_mode_sregs(&kvm_sregs::default(), &layout),
        };
        st.regs.r8 = 0x1234_5678_9abc;
        assert_eq!(st.counter(), 0x1234_5678_9abc);
        st.regs.rip = layout.code + STORE_OFFSET;
        assert_eq!(st.counter(), 0x1234_5678_9abb);
        st.sregs.apic_base = 0xfee0_0900;
        st.sregs.interrupt_bitmap[3] = 7;
        let bytes = st.to_bytes();
        assert_eq!(VcpuState::from_bytes(&bytes).unwrap(), st);
        assert!(matches!(
            VcpuState::from_bytes(&bytes[..bytes.len() - 1]),
            Err(GuestError::StateTruncated)
        ));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(matches!(
            VcpuState::from_bytes(&extra),
            Err(GuestError::StateTrailing { extra: 1 })
        ));
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(matches!(
            VcpuState::from_bytes(&bad),
            Err(GuestError::StateBadMagic)
        ));
        let mut v2 = bytes;
        v2[8] = 2;
        assert!(matches!(
            VcpuState::from_bytes(&v2),
            Err(GuestError::StateVersion { found: 2 })
        ));
    }
}
