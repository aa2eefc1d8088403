//! What the kernel says about one interface, read the way `blokir run`
//! meets it: through this process's network namespace (netlink and ioctls,
//! never /sys/class/net, which shows the namespace /sys was mounted in).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkMessage, LinkXdp, State, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// An interface as RTM_GETLINK and ethtool report it.
#[derive(Debug, Default)]
pub struct Link {
    pub index: u32,
    pub admin_up: bool,
    /// IFLA_OPERSTATE: "up", "down", "unknown" (veth and tun say unknown
    /// when they carry traffic), ...
    pub oper: String,
    pub mtu: u32,
    pub max_mtu: Option<u32>,
    pub rx_queues: Option<u32>,
    /// The driver ethtool names (`veth`, `mlx5_core`, `ixgbe`), if any.
    pub driver: Option<String>,
    /// An XDP program attached now: its id and mode.
    pub xdp: Option<(u32, XdpMode)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Native,
    Generic,
    Offload,
    Several,
}

impl XdpMode {
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Offload => "offloaded",
            XdpMode::Several => "several modes",
        }
    }
}

/// The interface named `name` in this network namespace; `Ok(None)` when
/// there is none.
pub fn query(name: &str) -> io::Result<Option<Link>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = LinkMessage::default();
    message.attributes.push(LinkAttribute::IfName(name.to_string()));
    let mut request = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(RouteNetlinkMessage::GetLink(message)));
    request.header.flags = NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut reply = vec![0; 64 * 1024];
    let n = socket.recv(&mut &mut reply[..], 0)?;
    let answer: NetlinkMessage<RouteNetlinkMessage> =
        NetlinkMessage::deserialize(&reply[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {e}")))?;
    let msg = match answer.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => m,
        NetlinkPayload::Error(e) => {
            let code = e.code.map(|c| -c.get()).unwrap_or(0);
            return match code {
                libc::ENODEV => Ok(None),
                c => Err(io::Error::from_raw_os_error(c)),
            };
        }
        other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("netlink: unexpected answer {other:?}"))),
    };
    let mut link = Link { index: msg.header.index, admin_up: msg.header.flags.contains(LinkFlags::Up), ..Link::default() };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::MaxMtu(m) => link.max_mtu = Some(m),
            LinkAttribute::NumRxQueues(q) => link.rx_queues = Some(q),
            LinkAttribute::OperState(s) => link.oper = oper_name(s).into(),
            LinkAttribute::Xdp(xdp) => link.xdp = attached(&xdp),
            _ => {}
        }
    }
    link.driver = driver(name).ok();
    Ok(Some(link))
}

fn oper_name(s: State) -> &'static str {
    match s {
        State::Up => "up",
        State::Down => "down",
        State::LowerLayerDown => "lower layer down",
        State::Dormant => "dormant",
        State::Testing => "testing",
        State::NotPresent => "not present",
        _ => "unknown",
    }
}

fn attached(xdp: &[LinkXdp]) -> Option<(u32, XdpMode)> {
    let mode = xdp.iter().find_map(|x| match x {
        LinkXdp::Attached(XdpAttached::Driver) => Some(XdpMode::Native),
        LinkXdp::Attached(XdpAttached::SocketBuffer) => Some(XdpMode::Generic),
        LinkXdp::Attached(XdpAttached::Hardware) => Some(XdpMode::Offload),
        LinkXdp::Attached(XdpAttached::Multiple) => Some(XdpMode::Several),
        _ => None,
    })?;
    let id = xdp.iter().find_map(|x| match x {
        LinkXdp::ProgId(id) | LinkXdp::DrvProgId(id) | LinkXdp::SkbProgId(id) => Some(*id),
        _ => None,
    });
    Some((id.unwrap_or(0), mode))
}

/// The driver's name, by ETHTOOL_GDRVINFO (it answers in this process's
/// network namespace).
fn driver(name: &str) -> io::Result<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 32 * 4 + 12 + 4 * 5] };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _pad: [0; 16] };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a plain datagram socket, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned here only.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL reads the name and writes at most
    // size_of::<DrvInfo>() bytes through `data`, both owned here.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The name of the loaded program with id `id` (needs CAP_SYS_ADMIN or
/// CAP_BPF to look).
pub fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs().flatten().find(|p| p.id() == id).and_then(|p| p.name_as_str().map(str::to_string))
}

/// What attaching a program in native (driver) mode did.
#[derive(Debug)]
pub enum Trial {
    Attached,
    /// The driver has no native XDP (EOPNOTSUPP).
    Unsupported,
    Refused(io::Error),
}

/// Loads a two-instruction XDP program (`return XDP_PASS`), attaches it to
/// `ifindex` in driver mode through a bpf_link, and detaches it again by
/// closing the link. Never called when a program is attached already.
pub fn try_native(ifindex: u32) -> io::Result<Trial> {
    let prog = load_pass()?;
    match link_create(&prog, ifindex) {
        Ok(link) => {
            drop(link);
            Ok(Trial::Attached)
        }
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(Trial::Unsupported),
        Err(e) => Ok(Trial::Refused(e)),
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a repr(C) prefix of union bpf_attr for `cmd`, its
    // size passed along; the kernel zero-extends the rest.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load_pass() -> io::Result<OwnedFd> {
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
    }
    // r0 = XDP_PASS (2); exit.
    let insns: [u64; 2] = [u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]), u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0])];
    let license = CString::new("GPL").expect("no NUL");
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"blokir_doctor");
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
    };
    bpf(BPF_PROG_LOAD, &mut attr)
}

fn link_create(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = LinkCreate { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type: BPF_XDP, flags: XDP_FLAGS_DRV_MODE };
    bpf(BPF_LINK_CREATE, &mut attr)
}
