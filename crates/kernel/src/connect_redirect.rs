//! Published ports for the host's own connections, translated at `connect()`.
//!
//! nftables DNAT of locally generated traffic (the `output` hook) costs on
//! every packet: once the destination changes, the kernel routes the packet
//! again (`ip_route_me_harder`), and a 127.0.0.1 source must also be
//! masqueraded on its way to the bridge. Instead, a cgroup `sock_addr` BPF
//! program rewrites the address a socket of the agent's namespace connects
//! (or, for unconnected UDP, sends) to, once, before the kernel routes
//! anything: the socket is then connected straight to the sandbox and its
//! packets are never translated. Two more programs (`getpeername`,
//! `recvmsg`) show the application the address it asked for.
//!
//! Scope and safety. cgroup programs run for every process of the cgroup
//! whatever its network namespace, and several agents (tests, labs) run side
//! by side, each in its own namespace, with overlapping ports. So each agent
//! loads programs and maps of its own: its namespace's cookie is an
//! immediate in the bytecode (any other namespace leaves after one helper
//! call) and is part of every map key as well. The programs are attached to
//! the root of the cgroup2 hierarchy through BPF links (always
//! `BPF_F_ALLOW_MULTI`), so they coexist with each other and with anyone
//! else's. The links are not pinned: they live exactly as long as the
//! agent's file descriptors, so the kernel detaches them however the agent
//! ends (SIGKILL included), and a restarted agent simply attaches fresh ones
//! and refills its maps from its state. Every path of every program returns
//! 1 (allow): a miss only means "not translated here".
//!
//! The nftables DNAT rules stay as they are: they serve traffic from
//! outside and from sandboxes, and whatever the programs leave alone (IPv6
//! sockets, sockets bound to a loopback address, a port whose map update
//! failed, or an agent that could not load BPF at all).
//!
//! Maps (all per agent):
//! - `weft_ports` (LPM trie): netns cookie . host address . protocol . port
//!   → sandbox address and port (port 0: keep it, for ranges). A range is
//!   split into aligned power-of-two blocks, at most 30 prefixes for any
//!   range (the BPF side of "a range is one element"), so ranges need no
//!   limit and cost no more than a few entries. Host address 0.0.0.0 holds
//!   ports published on every address.
//! - `weft_local` (LPM trie): netns cookie . prefix of every local route of
//!   the namespace (table `local`, as `fib daddr type local` sees them),
//!   kept in sync by a thread that watches rtnetlink. A connection is only
//!   translated when its destination is local, as with nftables.
//! - `weft_rev` (LRU hash): socket cookie . sandbox address . port → the
//!   address the application asked for (for getpeername/recvmsg).

use crate::error::KernelError;
use crate::netlink::Netlink;
use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};
use weft_model::ports::{PortMapping, Protocol};

/// What can go wrong loading or feeding the programs. The agent logs it and
/// keeps publishing through nftables alone.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("bpf {op}: {source}{hint}")]
    Bpf {
        op: String,
        #[source]
        source: io::Error,
        /// Why, in words: a permission hint or the verifier's last lines.
        hint: String,
    },
    #[error(
        "no cgroup2 hierarchy is mounted (none in /proc/thread-self/mountinfo); \
         mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, RedirectError>;

fn io_err(what: impl Into<String>, source: io::Error) -> RedirectError {
    RedirectError::Io {
        what: what.into(),
        source,
    }
}

// ---------------------------------------------------------------------------
// The bpf(2) system call.

const BPF_MAP_CREATE: i32 = 0;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_MAP_DELETE_ELEM: i32 = 3;
const BPF_PROG_LOAD: i32 = 5;
const BPF_PROG_GET_FD_BY_ID: i32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i32 = 15;
const BPF_PROG_QUERY: i32 = 16;
const BPF_LINK_CREATE: i32 = 28;

const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// Not in the libc crate yet (asm-generic/socket.h, Linux 5.14).
const SO_NETNS_COOKIE: i32 = 71;

/// The four hooks, by their `enum bpf_attach_type` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttachPoint {
    /// `connect()` of TCP and UDP sockets: the translation.
    Connect4 = 10,
    /// `sendto()`/`sendmsg()` with an address on unconnected UDP sockets.
    UdpSendmsg4 = 14,
    /// `recvfrom()`/`recvmsg()` on UDP sockets: the sender shown as asked.
    UdpRecvmsg4 = 19,
    /// `getpeername()`: the peer shown as asked.
    Getpeername4 = 29,
}

impl AttachPoint {
    pub const ALL: [AttachPoint; 4] = [
        AttachPoint::Connect4,
        AttachPoint::UdpSendmsg4,
        AttachPoint::UdpRecvmsg4,
        AttachPoint::Getpeername4,
    ];

    /// The program's name as the kernel lists it (at most 15 bytes).
    pub fn program_name(self) -> &'static str {
        match self {
            AttachPoint::Connect4 => "weft_connect4",
            AttachPoint::UdpSendmsg4 => "weft_sendmsg4",
            AttachPoint::UdpRecvmsg4 => "weft_recvmsg4",
            AttachPoint::Getpeername4 => "weft_peername4",
        }
    }
}

/// A `bpf_attr` as the kernel reads it: the command's fields, then zeros up
/// to well past the union's size (144 bytes in 6.x). The kernel accepts a
/// larger attr whose tail is zero, and some commands (PROG_QUERY) write
/// fields beyond the ones a caller fills in: they must land in this buffer.
#[repr(C)]
struct Attr<T> {
    fields: T,
    zero: [u8; 256],
}

fn sys_bpf<T>(cmd: i32, fields: T) -> io::Result<(i64, T)> {
    let mut attr = Attr {
        fields,
        zero: [0; 256],
    };
    // SAFETY: attr is a live, initialised buffer of the size passed; the
    // kernel reads and writes within it only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut Attr<T>,
            std::mem::size_of::<Attr<T>>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r, attr.fields))
}

/// A new descriptor returned by bpf(2); the kernel sets O_CLOEXEC on all of
/// them, so no child the agent execs (nft, sandboxes) ever holds a link.
fn fd_from(r: i64) -> OwnedFd {
    // SAFETY: bpf(2) returned this descriptor to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

fn bpf_err(op: impl Into<String>, source: io::Error) -> RedirectError {
    let hint = match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (needs root, or CAP_BPF with CAP_NET_ADMIN and CAP_SYS_ADMIN for cgroup attach)"
                .to_string()
        }
        Some(libc::E2BIG) => " (the kernel allows at most 64 programs per cgroup and hook)".into(),
        _ => String::new(),
    };
    RedirectError::Bpf {
        op: op.into(),
        source,
        hint,
    }
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

#[repr(C)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A BPF map owned by this process.
struct Map {
    fd: OwnedFd,
    name: &'static str,
}

impl Map {
    fn create(
        name: &'static str,
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        flags: u32,
    ) -> Result<Map> {
        let (r, _) = sys_bpf(
            BPF_MAP_CREATE,
            MapCreate {
                map_type,
                key_size,
                value_size,
                max_entries,
                map_flags: flags,
                inner_map_fd: 0,
                numa_node: 0,
                map_name: name16(name),
            },
        )
        .map_err(|e| bpf_err(format!("create map {name}"), e))?;
        Ok(Map {
            fd: fd_from(r),
            name,
        })
    }

    fn update(&self, key: &[u8], value: &[u8]) -> Result<()> {
        sys_bpf(
            BPF_MAP_UPDATE_ELEM,
            MapElem {
                map_fd: self.fd.as_raw_fd() as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value: value.as_ptr() as u64,
                flags: 0, // BPF_ANY
            },
        )
        .map(|_| ())
        .map_err(|e| bpf_err(format!("update map {}", self.name), e))
    }

    /// Deletes a key; a key that is not there is not an error.
    fn delete(&self, key: &[u8]) -> Result<()> {
        match sys_bpf(
            BPF_MAP_DELETE_ELEM,
            MapElem {
                map_fd: self.fd.as_raw_fd() as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value: 0,
                flags: 0,
            },
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(bpf_err(format!("delete from map {}", self.name), e)),
        }
    }
}

// ---------------------------------------------------------------------------
// A tiny eBPF assembler: just the instructions the programs below need, with
// forward labels, so the programs read like the listing they are.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Reg {
    R0 = 0,
    R1,
    R2,
    R3,
    R4,
    R6 = 6,
    R7,
    R8,
    R9,
    Fp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8, // dst in the low nibble, src in the high one
    off: i16,
    imm: i32,
}

#[derive(Clone, Copy)]
enum Size {
    B = 0x10,
    H = 0x08,
    W = 0x00,
    Dw = 0x18,
}

const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU: u8 = 0x04;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
const BPF_MEM: u8 = 0x60;
const BPF_IMM: u8 = 0x00;
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
const BPF_ADD: u8 = 0x00;
const BPF_AND: u8 = 0x50;
const BPF_MOV: u8 = 0xb0;
const BPF_JEQ: u8 = 0x10;
const BPF_JNE: u8 = 0x50;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
const BPF_PSEUDO_MAP_FD: u8 = 1;

const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_MAP_UPDATE_ELEM: i32 = 2;
const FN_GET_SOCKET_COOKIE: i32 = 46;
const FN_GET_NETNS_COOKIE: i32 = 122;

/// Offsets in `struct bpf_sock_addr` (uapi/linux/bpf.h).
const CTX_USER_IP4: i16 = 4;
const CTX_USER_PORT: i16 = 24;
const CTX_PROTOCOL: i16 = 36;
const CTX_MSG_SRC_IP4: i16 = 40;
const CTX_SK: i16 = 64;
/// Offset of `src_ip4` in `struct bpf_sock`.
const SK_SRC_IP4: i16 = 24;

#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    /// (instruction index, label) of jumps to patch.
    fixups: Vec<(usize, &'static str)>,
    labels: HashMap<&'static str, usize>,
}

fn regs(dst: Reg, src: Reg) -> u8 {
    (dst as u8) | ((src as u8) << 4)
}

impl Asm {
    fn push(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: regs(dst, src),
            off,
            imm,
        });
    }
    fn mov(&mut self, dst: Reg, src: Reg) {
        self.push(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, 0, 0);
    }
    fn mov_imm(&mut self, dst: Reg, imm: i32) {
        self.push(BPF_ALU64 | BPF_MOV | BPF_K, dst, Reg::R0, 0, imm);
    }
    fn add_imm(&mut self, dst: Reg, imm: i32) {
        self.push(BPF_ALU64 | BPF_ADD | BPF_K, dst, Reg::R0, 0, imm);
    }
    /// 32-bit AND: the result is zero-extended, whatever the sign of `imm`.
    fn and32_imm(&mut self, dst: Reg, imm: u32) {
        self.push(BPF_ALU | BPF_AND | BPF_K, dst, Reg::R0, 0, imm as i32);
    }
    /// Two-instruction 64-bit immediate load.
    fn ld_imm64(&mut self, dst: Reg, v: u64) {
        self.push(
            BPF_LD | Size::Dw as u8 | BPF_IMM,
            dst,
            Reg::R0,
            0,
            v as u32 as i32,
        );
        self.push(0, Reg::R0, Reg::R0, 0, (v >> 32) as u32 as i32);
    }
    fn ld_map(&mut self, dst: Reg, map: &Map) {
        self.insns.push(Insn {
            code: BPF_LD | Size::Dw as u8 | BPF_IMM,
            regs: (dst as u8) | (BPF_PSEUDO_MAP_FD << 4),
            off: 0,
            imm: map.fd.as_raw_fd(),
        });
        self.push(0, Reg::R0, Reg::R0, 0, 0);
    }
    fn ldx(&mut self, size: Size, dst: Reg, src: Reg, off: i16) {
        self.push(BPF_LDX | size as u8 | BPF_MEM, dst, src, off, 0);
    }
    fn stx(&mut self, size: Size, dst: Reg, off: i16, src: Reg) {
        self.push(BPF_STX | size as u8 | BPF_MEM, dst, src, off, 0);
    }
    fn st_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) {
        self.push(BPF_ST | size as u8 | BPF_MEM, dst, Reg::R0, off, imm);
    }
    fn call(&mut self, helper: i32) {
        self.push(BPF_JMP | BPF_CALL, Reg::R0, Reg::R0, 0, helper);
    }
    fn jump(&mut self, code: u8, dst: Reg, src: Reg, imm: i32, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.push(code, dst, src, 0, imm);
    }
    fn jeq_imm(&mut self, dst: Reg, imm: i32, label: &'static str) {
        self.jump(BPF_JMP | BPF_JEQ | BPF_K, dst, Reg::R0, imm, label);
    }
    fn jne_imm(&mut self, dst: Reg, imm: i32, label: &'static str) {
        self.jump(BPF_JMP | BPF_JNE | BPF_K, dst, Reg::R0, imm, label);
    }
    fn jne(&mut self, dst: Reg, src: Reg, label: &'static str) {
        self.jump(BPF_JMP | BPF_JNE | BPF_X, dst, src, 0, label);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.insns.len());
    }
    /// `r2 = fp + off`: the address of a stack buffer for a helper.
    fn stack_ptr(&mut self, dst: Reg, off: i16) {
        self.mov(dst, Reg::Fp);
        self.add_imm(dst, i32::from(off));
    }
    /// Leaves the program allowing the operation: the only exit there is.
    fn allow_and_exit(&mut self) {
        self.label("out");
        self.mov_imm(Reg::R0, 1);
        self.push(BPF_JMP | BPF_EXIT, Reg::R0, Reg::R0, 0, 0);
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, label) in &self.fixups {
            let target = self.labels[label];
            self.insns[*at].off = (target as i64 - *at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// The two halves of a 64-bit cookie as the programs store them (two 32-bit
/// stores), so user space writes keys with the very same bytes.
fn cookie_halves(cookie: u64) -> (u32, u32) {
    (cookie as u32, (cookie >> 32) as u32)
}

fn cookie_bytes(cookie: u64) -> [u8; 8] {
    let (lo, hi) = cookie_halves(cookie);
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&lo.to_ne_bytes());
    b[4..].copy_from_slice(&hi.to_ne_bytes());
    b
}

/// Bits of `weft_ports` key data: cookie 64, address 32, protocol 8, a zero
/// byte 8, port 16. The port comes last so that a port prefix is a range.
const PORT_KEY_BITS: u32 = 128;
const PORT_KEY_SIZE: usize = 4 + 16;
const PORT_VALUE_SIZE: usize = 8;
/// Bits of `weft_local` key data: cookie 64, address 32.
const LOCAL_KEY_BITS: u32 = 96;
const LOCAL_KEY_SIZE: usize = 4 + 12;
const REV_KEY_SIZE: usize = 16;
const REV_VALUE_SIZE: usize = 8;

/// Caps only: LPM tries allocate per entry. Every TCP and UDP port
/// published singly on one address is 131070 entries.
const PORTS_MAX: u32 = 262144;
const LOCAL_MAX: u32 = 4096;
/// One entry per translated socket (and UDP peer), recycled least recently
/// used first; preallocated (LRU maps must be), about 1.3 MB per agent. A
/// socket whose entry was recycled still works; only getpeername/recvfrom
/// then show the sandbox's address.
const REV_MAX: u32 = 16384;

/// Stack layout (offsets from the frame pointer).
const FP_LOCAL_KEY: i16 = -16; // 16 bytes
const FP_PORT_KEY: i16 = -40; // 20 bytes
const FP_REV_KEY: i16 = -56; // 16 bytes
const FP_REV_VALUE: i16 = -64; // 8 bytes

/// The first octet of an address as loaded by a 32-bit load of its
/// network-order bytes, for a mask-and-compare in the program.
fn first_octet_mask() -> (u32, u32) {
    (
        u32::from_ne_bytes([0xff, 0, 0, 0]),
        u32::from_ne_bytes([127, 0, 0, 0]),
    )
}

/// `connect()` (TCP and UDP) and UDP `sendmsg()`: translate a connection to
/// a published port on a local address into the sandbox's address, and
/// remember what was asked for under the socket's cookie.
fn translate_program(
    hook: AttachPoint,
    netns_cookie: u64,
    ports: &Map,
    local: &Map,
    rev: &Map,
) -> Vec<Insn> {
    use Reg::*;
    let (lo, hi) = cookie_halves(netns_cookie);
    let (mask, loopback) = first_octet_mask();
    let mut a = Asm::default();
    a.mov(R6, R1); // r6 = ctx, kept across helper calls
                   // Another namespace's socket: not this agent's business.
    a.call(FN_GET_NETNS_COOKIE);
    a.ld_imm64(R1, netns_cookie);
    a.jne(R0, R1, "out");
    // A socket bound to a loopback address could not leave through the
    // bridge with that source; nftables DNAT + masquerade handles it.
    a.ldx(Size::Dw, R1, R6, CTX_SK);
    a.ldx(Size::W, R2, R1, SK_SRC_IP4);
    a.and32_imm(R2, mask);
    a.jeq_imm(R2, loopback as i32, "out");
    if hook == AttachPoint::UdpSendmsg4 {
        // The same for a source chosen per datagram (IP_PKTINFO).
        a.ldx(Size::W, R2, R6, CTX_MSG_SRC_IP4);
        a.and32_imm(R2, mask);
        a.jeq_imm(R2, loopback as i32, "out");
    }
    // Only destinations local to the namespace, as `fib daddr type local`.
    a.st_imm(Size::W, Fp, FP_LOCAL_KEY, LOCAL_KEY_BITS as i32);
    a.st_imm(Size::W, Fp, FP_LOCAL_KEY + 4, lo as i32);
    a.st_imm(Size::W, Fp, FP_LOCAL_KEY + 8, hi as i32);
    a.ldx(Size::W, R2, R6, CTX_USER_IP4);
    a.stx(Size::W, Fp, FP_LOCAL_KEY + 12, R2);
    a.ld_map(R1, local);
    a.stack_ptr(R2, FP_LOCAL_KEY);
    a.call(FN_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, "out");
    // The published port: on this very address first, then on any address.
    a.st_imm(Size::W, Fp, FP_PORT_KEY, PORT_KEY_BITS as i32);
    a.st_imm(Size::W, Fp, FP_PORT_KEY + 4, lo as i32);
    a.st_imm(Size::W, Fp, FP_PORT_KEY + 8, hi as i32);
    a.ldx(Size::W, R2, R6, CTX_USER_IP4);
    a.stx(Size::W, Fp, FP_PORT_KEY + 12, R2);
    a.ldx(Size::W, R2, R6, CTX_PROTOCOL);
    a.stx(Size::B, Fp, FP_PORT_KEY + 16, R2);
    a.st_imm(Size::B, Fp, FP_PORT_KEY + 17, 0);
    a.ldx(Size::W, R2, R6, CTX_USER_PORT);
    a.stx(Size::H, Fp, FP_PORT_KEY + 18, R2);
    a.ld_map(R1, ports);
    a.stack_ptr(R2, FP_PORT_KEY);
    a.call(FN_MAP_LOOKUP_ELEM);
    a.jne_imm(R0, 0, "found");
    a.st_imm(Size::W, Fp, FP_PORT_KEY + 12, 0);
    a.ld_map(R1, ports);
    a.stack_ptr(R2, FP_PORT_KEY);
    a.call(FN_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, "out");
    a.label("found");
    a.mov(R7, R0);
    a.ldx(Size::W, R8, R7, 0); // sandbox address
    a.ldx(Size::H, R9, R7, 4); // sandbox port, 0 for "keep" (ranges)
    a.jne_imm(R9, 0, "port_set");
    a.ldx(Size::W, R9, R6, CTX_USER_PORT);
    a.label("port_set");
    // Remember what the application asked for, for getpeername/recvmsg.
    a.mov(R1, R6);
    a.call(FN_GET_SOCKET_COOKIE);
    a.stx(Size::Dw, Fp, FP_REV_KEY, R0);
    a.stx(Size::W, Fp, FP_REV_KEY + 8, R8);
    a.stx(Size::H, Fp, FP_REV_KEY + 12, R9);
    a.st_imm(Size::H, Fp, FP_REV_KEY + 14, 0);
    a.ldx(Size::W, R2, R6, CTX_USER_IP4);
    a.stx(Size::W, Fp, FP_REV_VALUE, R2);
    a.ldx(Size::W, R2, R6, CTX_USER_PORT);
    a.stx(Size::H, Fp, FP_REV_VALUE + 4, R2);
    a.st_imm(Size::H, Fp, FP_REV_VALUE + 6, 0);
    // The translation itself.
    a.stx(Size::W, R6, CTX_USER_IP4, R8);
    a.stx(Size::W, R6, CTX_USER_PORT, R9);
    a.ld_map(R1, rev);
    a.stack_ptr(R2, FP_REV_KEY);
    a.stack_ptr(R3, FP_REV_VALUE);
    a.mov_imm(R4, 0); // BPF_ANY
    a.call(FN_MAP_UPDATE_ELEM);
    a.allow_and_exit();
    a.finish()
}

/// `getpeername()` and UDP `recvmsg()`: show the sandbox's address as the
/// one the socket was asked to reach.
fn reverse_program(netns_cookie: u64, rev: &Map) -> Vec<Insn> {
    use Reg::*;
    let mut a = Asm::default();
    a.mov(R6, R1);
    a.call(FN_GET_NETNS_COOKIE);
    a.ld_imm64(R1, netns_cookie);
    a.jne(R0, R1, "out");
    a.mov(R1, R6);
    a.call(FN_GET_SOCKET_COOKIE);
    a.stx(Size::Dw, Fp, FP_LOCAL_KEY, R0);
    a.ldx(Size::W, R2, R6, CTX_USER_IP4);
    a.stx(Size::W, Fp, FP_LOCAL_KEY + 8, R2);
    a.ldx(Size::W, R2, R6, CTX_USER_PORT);
    a.stx(Size::H, Fp, FP_LOCAL_KEY + 12, R2);
    a.st_imm(Size::H, Fp, FP_LOCAL_KEY + 14, 0);
    a.ld_map(R1, rev);
    a.stack_ptr(R2, FP_LOCAL_KEY);
    a.call(FN_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, "out");
    a.ldx(Size::W, R2, R0, 0);
    a.stx(Size::W, R6, CTX_USER_IP4, R2);
    a.ldx(Size::H, R2, R0, 4);
    a.stx(Size::W, R6, CTX_USER_PORT, R2);
    a.allow_and_exit();
    a.finish()
}

/// The license the programs declare: weft's. No helper they call is
/// GPL-only.
const LICENSE: &str = "Apache-2.0";

fn load_program(hook: AttachPoint, insns: &[Insn]) -> Result<OwnedFd> {
    let license = CString::new(LICENSE).expect("no NUL");
    let attempt = |log: &mut Vec<u8>| {
        sys_bpf(
            BPF_PROG_LOAD,
            ProgLoad {
                prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: u32::from(!log.is_empty()),
                log_size: log.len() as u32,
                log_buf: if log.is_empty() {
                    0
                } else {
                    log.as_mut_ptr() as u64
                },
                kern_version: 0,
                prog_flags: 0,
                prog_name: name16(hook.program_name()),
                prog_ifindex: 0,
                expected_attach_type: hook as u32,
            },
        )
    };
    match attempt(&mut Vec::new()) {
        Ok((r, _)) => Ok(fd_from(r)),
        Err(first) => {
            // Load again with the verifier's log, only to say why.
            let mut log = vec![0u8; 64 * 1024];
            let _ = attempt(&mut log);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            let tail: Vec<&str> = text.lines().rev().take(6).collect();
            let mut err = bpf_err(format!("load program {}", hook.program_name()), first);
            if let RedirectError::Bpf { hint, .. } = &mut err {
                if !tail.is_empty() {
                    hint.push_str(&format!(
                        "; verifier: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ));
                }
            }
            Err(err)
        }
    }
}

// ---------------------------------------------------------------------------
// Keys and values.

/// One `weft_ports` entry: a port prefix on one address (0.0.0.0: any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PortKey {
    addr: Ipv4Addr,
    proto: u8,
    /// First port of the block.
    port: u16,
    /// How many leading bits of the port are fixed (16: a single port).
    port_bits: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortValue {
    target: Ipv4Addr,
    /// 0: keep the port number (ranges).
    port: u16,
}

impl PortKey {
    fn bytes(&self, cookie: u64) -> [u8; PORT_KEY_SIZE] {
        let mut k = [0u8; PORT_KEY_SIZE];
        let prefix = PORT_KEY_BITS - 16 + u32::from(self.port_bits);
        k[..4].copy_from_slice(&prefix.to_ne_bytes());
        k[4..12].copy_from_slice(&cookie_bytes(cookie));
        k[12..16].copy_from_slice(&self.addr.octets());
        k[16] = self.proto;
        k[18..20].copy_from_slice(&self.port.to_be_bytes());
        k
    }
}

impl PortValue {
    fn bytes(&self) -> [u8; PORT_VALUE_SIZE] {
        let mut v = [0u8; PORT_VALUE_SIZE];
        v[..4].copy_from_slice(&self.target.octets());
        v[4..6].copy_from_slice(&self.port.to_be_bytes());
        v
    }
}

fn local_key(cookie: u64, net: ipnet::Ipv4Net) -> [u8; LOCAL_KEY_SIZE] {
    let mut k = [0u8; LOCAL_KEY_SIZE];
    let prefix = LOCAL_KEY_BITS - 32 + u32::from(net.prefix_len());
    k[..4].copy_from_slice(&prefix.to_ne_bytes());
    k[4..12].copy_from_slice(&cookie_bytes(cookie));
    k[12..16].copy_from_slice(&net.network().octets());
    k
}

/// Splits an inclusive port range into aligned power-of-two blocks, as
/// (first port, fixed leading bits): at most 30 for any range.
fn port_blocks(start: u16, end: u16) -> Vec<(u16, u8)> {
    let (mut a, end) = (u32::from(start), u32::from(end));
    let mut out = Vec::new();
    while a <= end {
        let mut k = if a == 0 {
            16
        } else {
            a.trailing_zeros().min(16)
        };
        while a + (1 << k) - 1 > end {
            k -= 1;
        }
        out.push((a as u16, (16 - k) as u8));
        a += 1 << k;
    }
    out
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

/// The entries of one published port (or range).
fn entries(m: &PortMapping, target: Ipv4Addr) -> Result<Vec<(PortKey, PortValue)>> {
    let addr = m.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let proto = proto_number(m.protocol);
    // Single ports and shifted ranges: one exact entry per host port, as
    // in nftables.
    if m.host.is_single() || !m.keeps_ports() {
        return Ok(m
            .pairs()
            .map(|(host, container)| {
                (
                    PortKey {
                        addr,
                        proto,
                        port: host,
                        port_bits: 16,
                    },
                    PortValue {
                        target,
                        port: container,
                    },
                )
            })
            .collect());
    }
    // Ranges that keep their numbers are translated by address only.
    Ok(port_blocks(m.host.start, m.host.end)
        .into_iter()
        .map(|(port, port_bits)| {
            (
                PortKey {
                    addr,
                    proto,
                    port,
                    port_bits,
                },
                PortValue { target, port: 0 },
            )
        })
        .collect())
}

// ---------------------------------------------------------------------------
// Where to attach, and what is attached there.

/// The root of the cgroup2 hierarchy (on a hybrid host, e.g.
/// /sys/fs/cgroup/unified): every process of the machine (or container) is
/// in it or below it.
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/thread-self/mountinfo")
        .map_err(|e| io_err("read /proc/thread-self/mountinfo", e))?;
    let mut found = None;
    for line in info.lines() {
        // id parent dev root mountpoint options [optional…] - fstype source super
        let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        // A mount of a sub-cgroup (root other than "/") is not the root.
        if fields.len() >= 5 && fields[3] == "/" {
            found.get_or_insert_with(|| PathBuf::from(unescape_mountinfo(fields[4])));
        }
    }
    found.ok_or(RedirectError::NoCgroup2)
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as \ooo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens the cgroup2 root; says where it is (for logs).
///
/// `ip netns exec` gives its command a fresh /sys without the cgroup
/// mounts, so the hierarchy may be invisible to the agent even though it
/// exists. Then it is mounted in `scratch` just long enough to open its
/// root (the descriptor is all that attaching needs) and unmounted again.
fn open_cgroup2_root(scratch: &Path) -> Result<(OwnedFd, String)> {
    if let Ok(p) = cgroup2_root() {
        return Ok((open_dir(&p)?, p.display().to_string()));
    }
    let dir = scratch.join("cgroup2");
    std::fs::create_dir_all(&dir).map_err(|e| io_err(format!("create {}", dir.display()), e))?;
    let c = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| RedirectError::Unsupported(format!("{} has a NUL byte", dir.display())))?;
    let fstype = CString::new("cgroup2").expect("no NUL");
    // SAFETY: mount/umount2 with valid C strings.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_dir(&dir);
        return Err(io_err(
            format!(
                "no cgroup2 mount visible, and mounting one at {} failed",
                dir.display()
            ),
            e,
        ));
    }
    let opened = open_dir(&dir);
    // SAFETY: `c` is a NUL-terminated CString that outlives the call; the
    // descriptor opened above keeps the cgroup reachable once detached.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir(&dir);
    Ok((
        opened?,
        "cgroup2 root (mounted privately, then unmounted)".into(),
    ))
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| io_err(format!("open {}", path.display()), e))
}

/// The ids of the programs attached to `cgroup` at `hook` (BPF_PROG_QUERY),
/// whoever attached them.
pub fn attached_programs(cgroup: &Path, hook: AttachPoint) -> Result<Vec<u32>> {
    let dir = open_dir(cgroup)?;
    let mut ids = vec![0u32; 256];
    let (_, q) = sys_bpf(
        BPF_PROG_QUERY,
        ProgQuery {
            target_fd: dir.as_raw_fd() as u32,
            attach_type: hook as u32,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            _pad: 0,
        },
    )
    .map_err(|e| bpf_err(format!("query {}", cgroup.display()), e))?;
    ids.truncate(q.prog_cnt as usize);
    Ok(ids)
}

/// Whether a program with this id still exists (attached or not).
pub fn program_exists(id: u32) -> bool {
    match sys_bpf(
        BPF_PROG_GET_FD_BY_ID,
        GetFdById {
            id,
            next_id: 0,
            open_flags: 0,
        },
    ) {
        Ok((r, _)) => {
            drop(fd_from(r));
            true
        }
        Err(_) => false,
    }
}

/// The kernel's id of a program we hold.
fn program_id(fd: &OwnedFd) -> Result<u32> {
    // struct bpf_prog_info: type u32, id u32, … (we read only the id).
    let mut info = [0u8; 256];
    sys_bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        InfoByFd {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: info.len() as u32,
            info: info.as_mut_ptr() as u64,
        },
    )
    .map_err(|e| bpf_err("program info", e))?;
    Ok(u32::from_ne_bytes([info[4], info[5], info[6], info[7]]))
}

/// The cookie of the calling thread's network namespace.
fn netns_cookie() -> Result<u64> {
    // SAFETY: plain socket calls on a descriptor we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_err("socket", io::Error::last_os_error()));
    }
    // SAFETY: fd >= 0 was just returned by socket(): open and owned by
    // nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` (8) bytes into `cookie`, a
    // live u64, and updates `len`, a live socklen_t.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io_err(
            "getsockopt SO_NETNS_COOKIE (Linux 5.14 or later)",
            io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}

// ---------------------------------------------------------------------------
// Local addresses: the namespace's `local` routing table, watched.

const RT_TABLE_LOCAL: u8 = 255;
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;

/// Every local IPv4 prefix of the namespace: what `fib daddr type local`
/// matches (an address of any interface, 127.0.0.0/8 on lo, AnyIP routes).
fn local_prefixes(nl: &mut Netlink) -> Result<HashSet<ipnet::Ipv4Net>> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    let replies = nl.request(
        "list local routes",
        RouteNetlinkMessage::GetRoute(msg),
        NLM_F_DUMP,
    )?;
    Ok(replies
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r)
                if r.header.table == RT_TABLE_LOCAL && r.header.kind == RouteType::Local =>
            {
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(
                        netlink_packet_route::route::RouteAddress::Inet(ip),
                    ) => Some(*ip),
                    _ => None,
                })?;
                ipnet::Ipv4Net::new(dst, r.header.destination_prefix_length).ok()
            }
            _ => None,
        })
        .collect())
}

struct LocalSync {
    nl: Netlink,
    map: std::sync::Arc<Map>,
    cookie: u64,
    current: HashSet<ipnet::Ipv4Net>,
}

impl LocalSync {
    /// Makes `weft_local` hold exactly the namespace's local prefixes.
    fn sync(&mut self) -> Result<()> {
        let now = local_prefixes(&mut self.nl)?;
        for gone in self.current.difference(&now) {
            self.map.delete(&local_key(self.cookie, *gone))?;
        }
        for new in now.difference(&self.current) {
            self.map
                .update(&local_key(self.cookie, *new), &1u32.to_ne_bytes())?;
        }
        if now != self.current {
            debug!(prefixes = ?now, "local addresses for connect redirect");
        }
        self.current = now;
        Ok(())
    }
}

/// A subscription to link, address and route changes of the namespace.
fn subscribe() -> Result<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io_err("netlink socket", io::Error::last_os_error()));
    }
    // SAFETY: fd >= 0 was just returned by socket(): open and owned by
    // nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is integers only; all zeroes is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE;
    // SAFETY: `addr` is a live, initialised sockaddr_nl and the length
    // passed is its size; the kernel only reads it.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r != 0 {
        return Err(io_err(
            "subscribe to route changes",
            io::Error::last_os_error(),
        ));
    }
    Ok(sock)
}

/// The thread that keeps `weft_local` in sync, and how to stop it.
struct Watcher {
    stop: OwnedFd, // an eventfd
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    fn start(events: OwnedFd, mut sync: LocalSync) -> Result<Watcher> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io_err("eventfd", io::Error::last_os_error()));
        }
        // SAFETY: efd >= 0 was just returned by eventfd(): open and owned by
        // nothing else.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_raw = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("weft-redirect".into())
            .spawn(move || watch(events, stop_raw, &mut sync))
            .map_err(|e| io_err("spawn the local address watcher", e))?;
        Ok(Watcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let one = 1u64;
        // SAFETY: writing 8 bytes from `one`, a live u64, to our eventfd,
        // which `self.stop` keeps open.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for rtnetlink events and re-reads the local table after each burst
/// (a dump is the truth; events only say when to look, and a lost event,
/// ENOBUFS, is just one more reason to look).
fn watch(events: OwnedFd, stop: RawFd, sync: &mut LocalSync) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: events.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two descriptors we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            warn!(error = %io::Error::last_os_error(), "local address watcher stopped");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        // Let a burst (an interface with its addresses and routes) settle.
        std::thread::sleep(Duration::from_millis(20));
        loop {
            // SAFETY: recv into our buffer, non-blocking.
            let r = unsafe {
                libc::recv(
                    events.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOBUFS) {
                break;
            }
        }
        if let Err(e) = sync.sync() {
            warn!(error = %e, "refreshing local addresses for connect redirect");
        }
    }
}

// ---------------------------------------------------------------------------
// The public face.

/// The connect-time redirect of one agent: its programs attached to the
/// cgroup2 root, its maps, and the local-address watcher. Dropping it
/// detaches everything (and so does the agent's exit, however it happens).
pub struct ConnectRedirect {
    cookie: u64,
    cgroup: String,
    ports: Map,
    /// What `weft_ports` holds, so removals and full replacements are exact.
    mirror: HashMap<PortKey, PortValue>,
    /// Links first: dropped first, so the programs stop before the maps go.
    links: Vec<OwnedFd>,
    program_ids: Vec<u32>,
    _watcher: Watcher,
}

impl ConnectRedirect {
    /// Loads and attaches the programs for the calling thread's network
    /// namespace (call it from the agent's namespace). `scratch` is a
    /// directory of the agent's own (its state dir), used only if the
    /// cgroup2 hierarchy must be mounted for a moment to be found.
    pub fn load(scratch: &Path) -> Result<ConnectRedirect> {
        let cookie = netns_cookie()?;
        let ports = Map::create(
            "weft_ports",
            BPF_MAP_TYPE_LPM_TRIE,
            PORT_KEY_SIZE as u32,
            PORT_VALUE_SIZE as u32,
            PORTS_MAX,
            BPF_F_NO_PREALLOC,
        )?;
        let local = std::sync::Arc::new(Map::create(
            "weft_local",
            BPF_MAP_TYPE_LPM_TRIE,
            LOCAL_KEY_SIZE as u32,
            4,
            LOCAL_MAX,
            BPF_F_NO_PREALLOC,
        )?);
        let rev = Map::create(
            "weft_rev",
            BPF_MAP_TYPE_LRU_HASH,
            REV_KEY_SIZE as u32,
            REV_VALUE_SIZE as u32,
            REV_MAX,
            0,
        )?;
        // Subscribe before the first read, so no change falls in between.
        let events = subscribe()?;
        let mut sync = LocalSync {
            nl: Netlink::open()?,
            map: local.clone(),
            cookie,
            current: HashSet::new(),
        };
        sync.sync()?;

        let mut programs = Vec::new();
        for hook in AttachPoint::ALL {
            let insns = match hook {
                AttachPoint::Connect4 | AttachPoint::UdpSendmsg4 => {
                    translate_program(hook, cookie, &ports, &local, &rev)
                }
                AttachPoint::UdpRecvmsg4 | AttachPoint::Getpeername4 => {
                    reverse_program(cookie, &rev)
                }
            };
            programs.push((hook, load_program(hook, &insns)?));
        }
        let (dir, cgroup) = open_cgroup2_root(scratch)?;
        let mut links = Vec::new();
        let mut program_ids = Vec::new();
        // The programs hold the maps; our map descriptors can go when we do.
        for (hook, prog) in &programs {
            let (r, _) = sys_bpf(
                BPF_LINK_CREATE,
                LinkCreate {
                    prog_fd: prog.as_raw_fd() as u32,
                    target_fd: dir.as_raw_fd() as u32,
                    attach_type: *hook as u32,
                    flags: 0,
                },
            )
            .map_err(|e| bpf_err(format!("attach {} to {cgroup}", hook.program_name()), e))?;
            links.push(fd_from(r));
            program_ids.push(program_id(prog)?);
        }
        let watcher = Watcher::start(events, sync)?;
        info!(
            cgroup = %cgroup,
            netns_cookie = cookie,
            programs = ?program_ids,
            "connect redirect attached"
        );
        Ok(ConnectRedirect {
            cookie,
            cgroup,
            ports,
            mirror: HashMap::new(),
            links,
            program_ids,
            _watcher: watcher,
        })
    }

    /// The ids of this agent's four programs (for logs and tests).
    pub fn program_ids(&self) -> &[u32] {
        &self.program_ids
    }

    /// Where the programs are attached.
    pub fn cgroup(&self) -> &str {
        &self.cgroup
    }

    /// Redirects connections from this namespace to `m`'s host port(s) (on
    /// its host address, or on every local address) to `target`.
    pub fn add(&mut self, m: &PortMapping, target: Ipv4Addr) -> Result<()> {
        for (k, v) in entries(m, target)? {
            self.ports.update(&k.bytes(self.cookie), &v.bytes())?;
            self.mirror.insert(k, v);
        }
        Ok(())
    }

    /// Stops redirecting `m`'s host port(s).
    pub fn remove(&mut self, m: &PortMapping) -> Result<()> {
        for (k, _) in entries(m, Ipv4Addr::UNSPECIFIED)? {
            self.ports.delete(&k.bytes(self.cookie))?;
            self.mirror.remove(&k);
        }
        Ok(())
    }

    /// Makes the redirects exactly `all`, changing only what differs. A
    /// mapping that cannot be redirected is skipped (nftables serves it)
    /// and reported after the rest is done.
    pub fn replace_all<'a>(
        &mut self,
        all: impl IntoIterator<Item = (&'a PortMapping, Ipv4Addr)>,
    ) -> Result<()> {
        let mut want = HashMap::new();
        let mut skipped = None;
        for (m, target) in all {
            match entries(m, target) {
                Ok(e) => want.extend(e),
                Err(e) => skipped = Some(e),
            }
        }
        let gone: Vec<PortKey> = self
            .mirror
            .keys()
            .filter(|k| !want.contains_key(*k))
            .copied()
            .collect();
        for k in gone {
            self.ports.delete(&k.bytes(self.cookie))?;
            self.mirror.remove(&k);
        }
        for (k, v) in want {
            if self.mirror.get(&k) != Some(&v) {
                self.ports.update(&k.bytes(self.cookie), &v.bytes())?;
                self.mirror.insert(k, v);
            }
        }
        skipped.map_or(Ok(()), Err)
    }

    /// How many `weft_ports` entries are in use (a range takes a few).
    pub fn entries(&self) -> usize {
        self.mirror.len()
    }
}

impl Drop for ConnectRedirect {
    fn drop(&mut self) {
        // Closing the link descriptors detaches the programs; say so.
        self.links.clear();
        info!(programs = ?self.program_ids, "connect redirect detached");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_model::ports::PortRange;

    #[test]
    fn ranges_split_into_aligned_blocks_that_cover_exactly_the_range() {
        for (s, e) in [
            (1u16, 65535u16),
            (9000, 9002),
            (8000, 8010),
            (80, 80),
            (1024, 2047),
            (65535, 65535),
            (3, 65534),
        ] {
            let blocks = port_blocks(s, e);
            assert!(blocks.len() <= 30, "{s}-{e}: {} blocks", blocks.len());
            let mut covered = Vec::new();
            for (base, bits) in &blocks {
                let size = 1u32 << (16 - u32::from(*bits));
                assert_eq!(u32::from(*base) % size, 0, "{base}/{bits} is aligned");
                covered.extend(u32::from(*base)..u32::from(*base) + size);
            }
            let want: Vec<u32> = (u32::from(s)..=u32::from(e)).collect();
            assert_eq!(covered, want, "{s}-{e}");
        }
        assert_eq!(port_blocks(9000, 9002), vec![(9000, 15), (9002, 16)]);
    }

    #[test]
    fn keys_put_the_port_last_in_network_order() {
        let k = PortKey {
            addr: Ipv4Addr::new(127, 0, 0, 1),
            proto: 6,
            port: 8080,
            port_bits: 16,
        };
        let b = k.bytes(0x0102_0304_0506_0708);
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()), 128);
        assert_eq!(&b[12..16], &[127, 0, 0, 1]);
        assert_eq!(b[16], 6);
        assert_eq!(b[17], 0);
        assert_eq!(&b[18..20], &8080u16.to_be_bytes());
        let (lo, hi) = cookie_halves(0x0102_0304_0506_0708);
        assert_eq!((lo, hi), (0x0506_0708, 0x0102_0304));
        assert_eq!(&b[4..8], &lo.to_ne_bytes());
        let range = PortKey { port_bits: 15, ..k };
        assert_eq!(
            u32::from_ne_bytes(range.bytes(1)[..4].try_into().unwrap()),
            127
        );
    }

    #[test]
    fn shifted_ranges_go_port_by_port_and_single_ports_keep_their_target_port() {
        let m = |h: (u16, u16), c: (u16, u16)| PortMapping {
            host_ip: None,
            host: PortRange {
                start: h.0,
                end: h.1,
            },
            container: PortRange {
                start: c.0,
                end: c.1,
            },
            protocol: Protocol::Udp,
        };
        let t = Ipv4Addr::new(10, 0, 0, 2);
        let shifted = entries(&m((8000, 8002), (9000, 9002)), t).unwrap();
        let pairs: Vec<(u16, u8, u16)> = shifted
            .iter()
            .map(|(k, v)| (k.port, k.port_bits, v.port))
            .collect();
        assert_eq!(
            pairs,
            [(8000, 16, 9000), (8001, 16, 9001), (8002, 16, 9002)]
        );
        let e = entries(&m((8080, 8080), (80, 80)), t).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0.proto, 17);
        assert_eq!(e[0].1.port, 80);
        let r = entries(&m((9000, 9002), (9000, 9002)), t).unwrap();
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|(_, v)| v.port == 0));
    }

    #[test]
    fn jumps_land_on_their_labels_and_every_path_allows() {
        let mut a = Asm::default();
        a.jeq_imm(Reg::R0, 0, "out");
        a.mov_imm(Reg::R1, 5);
        a.allow_and_exit();
        let insns = a.finish();
        assert_eq!(insns[0].off, 1);
        assert_eq!(insns[2].code, BPF_ALU64 | BPF_MOV | BPF_K);
        assert_eq!(insns[2].imm, 1);
        assert_eq!(insns[3].code, BPF_JMP | BPF_EXIT);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(
            unescape_mountinfo("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
    }
}
