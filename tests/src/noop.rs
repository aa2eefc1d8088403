//! A no-op XDP program (`r0 = XDP_PASS; exit`) loaded with raw bpf(2)
//! calls: the end-to-end tests attach it to a veth peer (see e2e_answers.rs),
//! and the benchmark runs it under BPF_PROG_TEST_RUN next to blokir's so the
//! fixed cost of a test run cancels out. Also BPF_PROG_TEST_RUN on any
//! program by id (the daemon's, from outside it).

use std::{
    ffi::c_char,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

unsafe extern "C" {
    fn syscall(number: i64, ...) -> i64;
    pub fn setns(fd: i32, nstype: i32) -> i32;
    pub fn if_nametoindex(name: *const c_char) -> u32;
}

pub const CLONE_NEWNET: i32 = 0x4000_0000;
#[cfg(target_arch = "x86_64")]
const SYS_BPF: i64 = 321;
#[cfg(target_arch = "aarch64")]
const SYS_BPF: i64 = 280;
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_LINK_CREATE: i64 = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `union bpf_attr`, zero-padded; fields written by offset.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn put(&mut self, off: usize, bytes: &[u8]) -> &mut Self {
        self.0[off..off + bytes.len()].copy_from_slice(bytes);
        self
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

/// bpf(2): the command's non-negative result.
unsafe fn bpf(cmd: i64, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, fully initialized bpf_attr of its size; the
    // kernel may write results back into it.
    let r = unsafe { syscall(SYS_BPF, cmd, attr as *mut Attr, std::mem::size_of::<Attr>() as u32) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

unsafe fn bpf_fd(cmd: i64, attr: &mut Attr) -> std::io::Result<OwnedFd> {
    // SAFETY: as for `bpf`; the result of these commands is a new file
    // descriptor that nothing else owns.
    unsafe { bpf(cmd, attr).map(|fd| OwnedFd::from_raw_fd(fd as i32)) }
}

/// Loads `r0 = XDP_PASS; exit`.
pub fn load_xdp_pass() -> std::io::Result<OwnedFd> {
    let insns: [u64; 2] = [0xb7 | (2 << 32), 0x95];
    let license = c"GPL";
    let mut attr = Attr([0; 128]);
    attr.put(0, &BPF_PROG_TYPE_XDP.to_ne_bytes())
        .put(4, &(insns.len() as u32).to_ne_bytes())
        .put(8, &(insns.as_ptr() as u64).to_ne_bytes())
        .put(16, &(license.as_ptr() as u64).to_ne_bytes())
        .put(48, b"blokir_noop");
    // SAFETY: the pointers in `attr` outlive the call.
    unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) }
}

/// Attaches `prog` in native mode to `ifindex` (of the calling thread's
/// namespace) until the returned link is closed.
pub fn xdp_link(prog: &OwnedFd, ifindex: u32) -> std::io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    attr.put(0, &(prog.as_raw_fd() as u32).to_ne_bytes())
        .put(4, &ifindex.to_ne_bytes())
        .put(8, &BPF_XDP.to_ne_bytes())
        .put(12, &XDP_FLAGS_DRV_MODE.to_ne_bytes());
    // SAFETY: no pointers in `attr`.
    unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }
}

/// BPF_PROG_TEST_RUN of the XDP program `prog` on `packet`, `repeat` times:
/// the action and the kernel's mean time per run (as aya's `TestRun` reports
/// it for blokir's program; the output packet is copied out the same way).
pub fn test_run(prog: &OwnedFd, packet: &[u8], repeat: u32) -> std::io::Result<(u32, Duration)> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = Attr([0; 128]);
    attr.put(0, &(prog.as_raw_fd() as u32).to_ne_bytes())
        .put(8, &(packet.len() as u32).to_ne_bytes())
        .put(12, &(out.len() as u32).to_ne_bytes())
        .put(16, &(packet.as_ptr() as u64).to_ne_bytes())
        .put(24, &(out.as_mut_ptr() as u64).to_ne_bytes())
        .put(32, &repeat.to_ne_bytes());
    // SAFETY: `packet` and `out` outlive the call and have the sizes given.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr)? };
    Ok((attr.u32_at(4), Duration::from_nanos(u64::from(attr.u32_at(36)))))
}

/// A file descriptor of the loaded program `id` (another process's, such
/// as the daemon's attached program), for `test_run`.
pub fn prog_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    attr.put(0, &id.to_ne_bytes());
    // SAFETY: no pointers in `attr`.
    unsafe { bpf_fd(BPF_PROG_GET_FD_BY_ID, &mut attr) }
}
