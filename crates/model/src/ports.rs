//! Published ports: `-p [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]`.

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

impl std::str::FromStr for PortMapping {
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
            [host, container] => (None, *host, *container),
            [ip, host, container] => {
                let ip = ip
                    .parse::<Ipv4Addr>()
                    .map_err(|_| err(format!("{ip:?} is not an IPv4 address of this host")))?;
                (Some(ip), *host, *container)
            }
            _ => return Err(err(
                "expected [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp], as in 8080:80"
                    .into(),
            )),
        };
        let host = parse_range(host, "host port").map_err(err)?;
        let container = parse_range(container, "container port").map_err(err)?;
        if host.count() != container.count() && !container.is_single() {
            return Err(err(format!(
                "the host range has {} ports and the container range {}; they must be the same size",
                host.count(),
                container.count()
            )));
        }
        if !host.is_single() && host != container {
            return Err(err(format!(
                "a range must publish the same port numbers ({h}:{h}); weft does not shift ranges",
                h = host
            )));
        }
        Ok(PortMapping {
            host_ip,
            host,
            container,
            protocol,
        })
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
        assert!(p("80").unwrap_err().why.contains("HOST_PORT"));
        assert!(p("0:80").unwrap_err().why.contains("1 to 65535"));
        assert!(p("70000:80").is_err());
        assert!(p("8080:80/sctp").unwrap_err().why.contains("tcp or udp"));
        assert!(p("8010-8000:80").unwrap_err().why.contains("ends before"));
        assert!(p("8000-8010:80-85").unwrap_err().why.contains("same size"));
        assert!(p("8000-8010:9000-9010").unwrap_err().why.contains("shift"));
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
