//! Holding a published host port. Publishing is nftables DNAT, which does
//! not stop a host process from binding the same port; that process would
//! then receive nothing, silently, while the sandbox lives. So, as Docker
//! does with its proxy, the agent keeps a socket bound to every published
//! port: a host process that listens there first makes the publish fail
//! (`address already in use`, naming it), and one that comes later gets
//! that error from its own bind instead of losing its traffic.
//!
//! The socket is bound, never listened on (TCP) and never read (UDP):
//! DNAT turns the traffic to the sandbox before it could be delivered
//! locally. SO_REUSEADDR stays off, which is what makes the kernel refuse
//! any other bind of the port, with or without that option.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use weft_model::ports::Protocol;

/// A bound socket; the port is free again when it drops.
#[derive(Debug)]
pub struct PortHold {
    _socket: OwnedFd,
}

/// The process that has a port, as far as /proc tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("address already in use{}", .holder.as_ref().map(|h| format!(" by {h}")).unwrap_or_default())]
    InUse { holder: Option<Holder> },
    #[error("binding {protocol} port {port}: {source}")]
    Io {
        protocol: Protocol,
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `protocol` port `port` on `ip` (every address when `None`).
pub fn hold(protocol: Protocol, ip: Option<Ipv4Addr>, port: u16) -> Result<PortHold, HoldError> {
    let addr = SocketAddrV4::new(ip.unwrap_or(Ipv4Addr::UNSPECIFIED), port);
    let bound = match protocol {
        Protocol::Tcp => bind_tcp(addr),
        Protocol::Udp => UdpSocket::bind(addr).map(OwnedFd::from),
    };
    match bound {
        Ok(fd) => Ok(PortHold { _socket: fd }),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(HoldError::InUse {
            holder: holder(protocol, port),
        }),
        Err(source) => Err(HoldError::Io {
            protocol,
            port,
            source,
        }),
    }
}

/// A TCP socket bound to `addr` without listen(2): std's TcpListener
/// would listen, and set SO_REUSEADDR, which lets others bind beside it.
fn bind_tcp(addr: SocketAddrV4) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) takes integers only; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sa` is a valid sockaddr_in that outlives the call, and the
    // length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Who has `port`: its socket's inode from /proc/net/{tcp,udp}{,6} of this
/// namespace, then the process with that socket among its descriptors.
/// Best effort (another user's process may hide its descriptors).
pub fn holder(protocol: Protocol, port: u16) -> Option<Holder> {
    let tables: &[&str] = match protocol {
        Protocol::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Protocol::Udp => &["/proc/net/udp", "/proc/net/udp6"],
    };
    let inodes: Vec<u64> = tables
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .flat_map(|text| socket_inodes(&text, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let has = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| l.to_str().map(|l| wanted.iter().any(|w| w == l)))
                .unwrap_or(false)
        });
        if has {
            let command =
                std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
            return Some(Holder { pid, command });
        }
    }
    None
}

/// Inodes of the sockets bound to local port `port` in one /proc/net table
/// (`sl local_address rem_address st … inode`, addresses as HEXIP:HEXPORT).
fn socket_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = cols.get(1)?;
            let (_, p) = local.rsplit_once(':')?;
            let p = u16::from_str_radix(p, 16).ok()?;
            let inode: u64 = cols.get(9)?.parse().ok()?;
            (p == port && inode != 0).then_some(inode)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inodes_of_one_port_from_a_proc_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:23E7 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41234 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(socket_inodes(table, 9191), vec![41234]);
        assert_eq!(socket_inodes(table, 53), vec![555]);
        assert!(socket_inodes(table, 80).is_empty());
    }

    #[test]
    fn in_use_names_the_holder() {
        let e = HoldError::InUse {
            holder: Some(Holder {
                pid: 42,
                command: "python3".into(),
            }),
        };
        assert_eq!(e.to_string(), "address already in use by pid 42 (python3)");
        let e = HoldError::InUse { holder: None };
        assert_eq!(e.to_string(), "address already in use");
    }
}
