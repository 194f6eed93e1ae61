//! Published ports, in Docker's forms: `-p [[HOST_IP:][HOST_PORT[-END]]:]CONTAINER_PORT[-END][/tcp|/udp]`.
//!
//! A `PortRequest` is what was asked (the host port may be a choice: `-p 80`,
//! `-p :80`, `-p 8000-8010:80`); the agent resolves it to a `PortMapping`,
//! which names every host port, against what is published and bound.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// An inclusive range of ports; a single port has `start == end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    /// How many ports the range holds.
    pub fn count(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    pub fn is_single(&self) -> bool {
        self.start == self.end
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// One `-p` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    /// Only traffic to this host address; any address when absent.
    pub host_ip: Option<Ipv4Addr>,
    pub host: PortRange,
    pub container: PortRange,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("-p {value}: {why}")]
pub struct PortError {
    pub value: String,
    pub why: String,
}

fn parse_range(s: &str, what: &str) -> Result<PortRange, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{what} {p:?} is not a port number from 1 to 65535")),
            Ok(n) => Ok(n),
        }
    };
    let (start, end) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if start > end {
        return Err(format!("{what} range {s} ends before it starts"));
    }
    Ok(PortRange { start, end })
}

/// The ports Docker picks a host port from when none is given (`-p 80`,
/// `-P`): the top of the kernel's default ephemeral range.
pub const EPHEMERAL: PortRange = PortRange {
    start: 49153,
    end: 60999,
};

/// The host side of a `-p` as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPorts {
    /// These host ports, one per container port (`8080:80`, `8000-8002:80-82`).
    Exactly(PortRange),
    /// Any one free port of the range (`-p 80`: the ephemeral range; `8000-8010:80`).
    AnyOf(PortRange),
}

/// One `-p` value as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRequest {
    pub host_ip: Option<Ipv4Addr>,
    pub host: HostPorts,
    pub container: PortRange,
    pub protocol: Protocol,
}

pub const PORT_FORMS: &str = "[[HOST_IP:][HOST_PORT[-END]]:]CONTAINER_PORT[-END][/tcp|/udp], as in 8080:80, 80, 127.0.0.1::80 or 8000-8002:80-82";

impl std::str::FromStr for PortRequest {
    type Err = PortError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |why: String| PortError {
            value: value.to_string(),
            why,
        };
        let (spec, protocol) = match value.rsplit_once('/') {
            Some((spec, "tcp")) => (spec, Protocol::Tcp),
            Some((spec, "udp")) => (spec, Protocol::Udp),
            Some((_, other)) => {
                return Err(err(format!("unknown protocol {other:?}: use tcp or udp")))
            }
            None => (value, Protocol::Tcp),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (host_ip, host, container) = match parts.as_slice() {
            [container] => (None, "", *container),
            [host, container] => (None, *host, *container),
            [ip, host, container] => {
                let ip = ip
                    .parse::<Ipv4Addr>()
                    .map_err(|_| err(format!("{ip:?} is not an IPv4 address of this host")))?;
                (Some(ip), *host, *container)
            }
            _ => return Err(err(format!("expected {PORT_FORMS}"))),
        };
        let container = parse_range(container, "container port").map_err(err)?;
        let host = if host.is_empty() {
            if !container.is_single() {
                return Err(err(format!(
                    "give the host ports of a container range, as in {}-{}:{container}",
                    container.start, container.end
                )));
            }
            HostPorts::AnyOf(EPHEMERAL)
        } else {
            let host = parse_range(host, "host port").map_err(err)?;
            if host.count() == container.count() {
                HostPorts::Exactly(host)
            } else if container.is_single() {
                // Docker's meaning: one free port of the host range.
                HostPorts::AnyOf(host)
            } else {
                return Err(err(format!(
                    "the host range has {} ports and the container range {}; they must be the same size",
                    host.count(),
                    container.count()
                )));
            }
        };
        Ok(PortRequest {
            host_ip,
            host,
            container,
            protocol,
        })
    }
}

impl PortRequest {
    /// Every mapping the request may become, in the order to try them:
    /// one for `Exactly`, one per host port of the range for `AnyOf`.
    pub fn candidates(&self) -> impl Iterator<Item = PortMapping> + '_ {
        let (range, each) = match self.host {
            HostPorts::Exactly(r) => (r, false),
            HostPorts::AnyOf(r) => (r, true),
        };
        let ports = if each {
            range.start..=range.end
        } else {
            range.start..=range.start
        };
        ports.map(move |p| PortMapping {
            host_ip: self.host_ip,
            host: if each {
                PortRange { start: p, end: p }
            } else {
                range
            },
            container: self.container,
            protocol: self.protocol,
        })
    }
}

impl std::str::FromStr for PortMapping {
    type Err = PortError;

    /// A mapping whose host ports are all given (what a CNI runtime passes).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let r: PortRequest = value.parse()?;
        match r.host {
            HostPorts::Exactly(_) => Ok(r.candidates().next().expect("one candidate")),
            HostPorts::AnyOf(_) => Err(PortError {
                value: value.to_string(),
                why: "give the host port, as in 8080:80".into(),
            }),
        }
    }
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(f, "{}:{}/{}", self.host, self.container, self.protocol)
    }
}

impl PortMapping {
    /// Whether two mappings claim some of the same host ports.
    pub fn conflicts_with(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && self.host.overlaps(&other.host)
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// Whether the container sees the same port numbers as the host
    /// (then only the address is translated).
    pub fn keeps_ports(&self) -> bool {
        self.host == self.container
    }

    /// Each host port of the mapping with the container port it leads to
    /// (a shifted range, 8000-8002:80-82, goes port by port).
    pub fn pairs(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        (self.host.start..=self.host.end).map(move |h| {
            let c = if self.container.is_single() {
                self.container.start
            } else {
                self.container.start + (h - self.host.start)
            };
            (h, c)
        })
    }
}

/// Checks a sandbox's own mappings against each other.
pub fn check_own(maps: &[PortMapping]) -> Result<(), PortError> {
    for (i, a) in maps.iter().enumerate() {
        if let Some(b) = maps[..i].iter().find(|b| a.conflicts_with(b)) {
            return Err(PortError {
                value: a.to_string(),
                why: format!("it overlaps -p {b} of the same command"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<PortMapping, PortError> {
        s.parse()
    }

    fn r(s: &str) -> Result<PortRequest, PortError> {
        s.parse()
    }

    #[test]
    fn a_missing_or_ranged_host_port_is_a_choice() {
        for v in ["80", ":80", "80/tcp"] {
            assert_eq!(r(v).unwrap().host, HostPorts::AnyOf(EPHEMERAL), "{v}");
        }
        let bound = r("127.0.0.1::53/udp").unwrap();
        assert_eq!(bound.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(bound.host, HostPorts::AnyOf(EPHEMERAL));
        assert_eq!(bound.protocol, Protocol::Udp);
        let some = r("8000-8002:80").unwrap();
        let c: Vec<String> = some.candidates().map(|m| m.to_string()).collect();
        assert_eq!(c, ["8000:80/tcp", "8001:80/tcp", "8002:80/tcp"]);
        let exact = r("8080:80").unwrap();
        assert_eq!(exact.candidates().count(), 1);
    }

    #[test]
    fn shifted_ranges_go_port_by_port() {
        let m = p("8000-8002:80-82").unwrap();
        assert!(!m.keeps_ports());
        assert_eq!(
            m.pairs().collect::<Vec<_>>(),
            [(8000, 80), (8001, 81), (8002, 82)]
        );
        let same = p("9000-9001:9000-9001").unwrap();
        assert_eq!(
            same.pairs().collect::<Vec<_>>(),
            [(9000, 9000), (9001, 9001)]
        );
        assert_eq!(
            p("8080:80").unwrap().pairs().collect::<Vec<_>>(),
            [(8080, 80)]
        );
    }

    #[test]
    fn parses_the_docker_forms() {
        let m = p("8080:80").unwrap();
        assert_eq!(
            (m.host.start, m.container.start, m.protocol, m.host_ip),
            (8080, 80, Protocol::Tcp, None)
        );
        let m = p("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(m.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(m.protocol, Protocol::Udp);
        let m = p("8000-8010:8000-8010").unwrap();
        assert_eq!(m.host.count(), 11);
        assert!(m.keeps_ports());
        assert_eq!(m.to_string(), "8000-8010:8000-8010/tcp");
    }

    #[test]
    fn refuses_bad_values_with_a_reason() {
        assert!(p("80").unwrap_err().why.contains("give the host port"));
        assert!(p("a:b:c:d").unwrap_err().why.contains("HOST_PORT"));
        assert!(p("0:80").unwrap_err().why.contains("1 to 65535"));
        assert!(p("70000:80").is_err());
        assert!(p("8080:80/sctp").unwrap_err().why.contains("tcp or udp"));
        assert!(p("8010-8000:80").unwrap_err().why.contains("ends before"));
        assert!(p("8000-8010:80-85").unwrap_err().why.contains("same size"));
        assert!(r("80-82").unwrap_err().why.contains("as in 80-82:80-82"));
        assert!(p("nothost:80:80").unwrap_err().why.contains("IPv4"));
    }

    #[test]
    fn conflicts() {
        let a = p("8000-8010:8000-8010").unwrap();
        assert!(a.conflicts_with(&p("8005:80").unwrap()));
        assert!(!a.conflicts_with(&p("8005:80/udp").unwrap()));
        assert!(!a.conflicts_with(&p("8011:80").unwrap()));
        let bound = p("10.0.0.1:9000:90").unwrap();
        assert!(
            bound.conflicts_with(&p("9000:90").unwrap()),
            "any address includes 10.0.0.1"
        );
        assert!(!bound.conflicts_with(&p("10.0.0.2:9000:90").unwrap()));
        assert!(check_own(&[a, p("8010:80").unwrap()]).is_err());
        assert!(check_own(&[a, p("8011:80").unwrap()]).is_ok());
    }
}
