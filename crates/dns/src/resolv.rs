//! resolv.conf: reading the host's, writing each sandbox's.

use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// Parses the parts weft uses; unknown lines are ignored, as the C library does.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut rc = ResolvConf::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                    rc.nameservers.push(ip);
                }
            }
            // The last search (or domain) line wins.
            Some("search") | Some("domain") => rc.search = words.map(String::from).collect(),
            Some("options") => rc.options.extend(words.map(String::from)),
            _ => {}
        }
    }
    rc
}

pub fn render_resolv_conf(rc: &ResolvConf) -> String {
    let mut out = String::from("# written by weft\n");
    for ns in &rc.nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !rc.search.is_empty() {
        out.push_str(&format!("search {}\n", rc.search.join(" ")));
    }
    if !rc.options.is_empty() {
        out.push_str(&format!("options {}\n", rc.options.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let rc = parse_resolv_conf("# x\nnameserver 10.0.0.53\nnameserver  bogus\nnameserver ::1 # v6\nsearch a.example b.example\noptions ndots:2 timeout:1\n");
        assert_eq!(rc.nameservers.len(), 2);
        assert_eq!(rc.search, ["a.example", "b.example"]);
        assert_eq!(rc.options, ["ndots:2", "timeout:1"]);
        assert_eq!(parse_resolv_conf(&render_resolv_conf(&rc)), rc);
    }
}
