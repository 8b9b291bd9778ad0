//! The KVM guest's program: a hand-assembled 64-bit loop every vCPU runs over its own
//! slice of the working set.
//!
//! # Why no exit per batch
//!
//! A real guest dirties memory at GB/s; a VM exit to userspace per small batch caps the
//! guest at a few 10k pages/s. So the guest reports progress by storing its counter into
//! its own progress words in guest RAM (the host reads them), and leaves the guest only
//! when it reaches a page limit the host handed it (`in` on [`PROGRESS_PORT`]; the host
//! paces there and answers the next quantum). Unlimited, the quantum is 2^32 - 1 pages:
//! practically no exit at all. Pause, stop, throttle and rate changes reach a vCPU by
//! signal kick instead (see `kvm.rs`).

/// I/O port the guest reads its next page quantum from (`in eax, dx`), once it has
/// written up to the limit the host set (`r14`).
pub const PROGRESS_PORT: u16 = 0x3f0;

/// Byte offset of the table entries in a vCPU's walk table page: eight header words
/// `[stride, total, batch, count, progress_gpa, 0, 0, 0]` (see `walk.rs`).
pub const ENTRIES_OFFSET: u64 = 64;

/// The guest program, hand-assembled (checked against GNU `as` + `objdump`).
///
/// Registers: `rbx` = this vCPU's walk table gpa (set by the host), `r8` = running counter
/// (the value written; set by the host, 0 at boot), `r9` = walk index (host), `r10` =
/// stride, `r11` = total pages, `r12` = batch, `r13` = pages left in this batch, `r14` =
/// page limit (host: the guest asks for more once `r8 >= r14`), `r15` = progress words,
/// `rbp` = batches done. All state is in registers, so `kvm_regs` plus RAM is the whole
/// vCPU.
///
/// Every batch ends with two stores to the progress words (`[r15] = r8`, `[r15+8] =
/// rbp`), which the host reads as the vCPU's progress; no exit.
#[rustfmt::skip]
pub const GUEST_CODE: &[u8] = &[
    // start:
    0x4c, 0x8b, 0x13,             // 00 mov r10, [rbx]        ; stride
    0x4c, 0x8b, 0x5b, 0x08,       // 03 mov r11, [rbx+8]      ; total
    0x4c, 0x8b, 0x63, 0x10,       // 07 mov r12, [rbx+16]     ; batch
    0x4c, 0x8b, 0x7b, 0x20,       // 0b mov r15, [rbx+32]     ; progress words
    0x4d, 0x89, 0xe5,             // 0f mov r13, r12
    // top:                        find the entry holding idx
    0x4c, 0x89, 0xc9,             // 12 mov rcx, r9           ; rcx = idx
    0x48, 0x8d, 0x73, 0x40,       // 15 lea rsi, [rbx+64]     ; first entry
    // find:
    0x48, 0x8b, 0x56, 0x08,       // 19 mov rdx, [rsi+8]      ; entry pages
    0x48, 0x39, 0xd1,             // 1d cmp rcx, rdx
    0x72, 0x09,                   // 20 jb found
    0x48, 0x29, 0xd1,             // 22 sub rcx, rdx          ; skip this entry
    0x48, 0x83, 0xc6, 0x10,       // 25 add rsi, 16
    0xeb, 0xee,                   // 29 jmp find
    // found:
    0x48, 0xc1, 0xe1, 0x0c,       // 2b shl rcx, 12           ; page offset in entry
    0x48, 0x03, 0x0e,             // 2f add rcx, [rsi]        ; + entry gpa
    0x49, 0xff, 0xc0,             // 32 inc r8                ; counter += 1
    0x4c, 0x89, 0x01,             // 35 mov [rcx], r8         ; dirty the page
    0x4d, 0x01, 0xd1,             // 38 add r9, r10           ; idx += stride
    0x4d, 0x39, 0xd9,             // 3b cmp r9, r11
    0x72, 0x03,                   // 3e jb nowrap
    0x4d, 0x29, 0xd9,             // 40 sub r9, r11           ; idx -= total
    // nowrap:
    0x49, 0xff, 0xcd,             // 43 dec r13
    0x75, 0xca,                   // 46 jnz top
    0x4d, 0x89, 0xe5,             // 48 mov r13, r12          ; new batch
    0x48, 0xff, 0xc5,             // 4b inc rbp               ; batches += 1
    0x4d, 0x89, 0x07,             // 4e mov [r15], r8         ; publish the counter
    0x49, 0x89, 0x6f, 0x08,       // 51 mov [r15+8], rbp      ; and the batch count
    0x4d, 0x39, 0xf0,             // 55 cmp r8, r14
    0x72, 0xb8,                   // 58 jb top                ; below the limit: no exit
    0xba, 0xf0, 0x03, 0x00, 0x00, // 5a mov edx, 0x3f0
    0xed,                         // 5f in eax, dx            ; exit: the host paces, answers a quantum
    0x89, 0xc0,                   // 60 mov eax, eax          ; zero-extend (KVM does too)
    0x4d, 0x8d, 0x34, 0x00,       // 62 lea r14, [r8+rax]     ; next limit
    0xeb, 0xaa,                   // 66 jmp top
];

/// Offset in [`GUEST_CODE`] (and in its page) of the `mov [rcx], r8` store.
pub const STORE_OFFSET: u64 = 0x35;

/// Quantum the host answers when the rate is unlimited: the most `in eax` carries.
pub const UNLIMITED_QUANTUM: u32 = u32::MAX;
