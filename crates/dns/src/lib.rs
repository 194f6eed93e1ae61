//! weft's embedded DNS, as pure logic: the table of names per network and
//! the handler that turns a query into an answer, a forward, or nothing.
//! No I/O here: the agent owns the sockets and the upstream servers, and the
//! fuzz target (fuzz/) drives [`answer`] directly.

mod fast;
mod names;
mod resolv;

pub use names::Names;
pub use resolv::{parse_resolv_conf, render_resolv_conf, ResolvConf};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::net::Ipv4Addr;

/// Time to live of weft's answers: none, since a name goes the moment its
/// sandbox does.
pub const TTL: u32 = 0;

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: pass the query, unchanged, to the upstream servers.
    Forward,
    /// Not worth an answer (too short to carry an id, or not a query).
    Drop,
}

/// An error answer for a message that could not be parsed: FORMERR with the
/// query's id, if it has one.
fn format_error(query: &[u8]) -> Outcome {
    if query.len() < 12 {
        return Outcome::Drop;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    // QR set in a "query" means it is a response: never answer those.
    if query[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    match Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec() {
        Ok(bytes) => Outcome::Reply(bytes),
        Err(_) => Outcome::Drop,
    }
}

/// The reply skeleton for `req`, with `code`.
fn reply_to(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(req.metadata.id, req.metadata.op_code);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    m.queries = req.queries.clone();
    if req.edns.is_some() {
        m.edns = Some(Default::default());
    }
    m
}

fn encode(m: &Message) -> Outcome {
    match m.to_vec() {
        Ok(bytes) => Outcome::Reply(bytes),
        Err(_) => Outcome::Drop,
    }
}

/// The IPv4 address of a `d.c.b.a.in-addr.arpa` name.
fn reverse_ip(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let parts: Vec<u8> = rest
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [d, c, b, a] => Some(Ipv4Addr::new(*a, *b, *c, *d)),
        _ => None,
    }
}

/// What [`answer_into`] did with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The reply is in the buffer.
    Reply,
    /// Not ours: pass the query, unchanged, to the upstream servers.
    Forward,
    /// Not worth an answer.
    Drop,
}

/// Answers `query`, which arrived on `network`'s resolver from `client`.
/// Names of the networks the client's sandbox is on are answered here;
/// other dotted names are forwarded; other single-label names do not exist.
pub fn answer(query: &[u8], network: &str, client: Ipv4Addr, names: &Names) -> Outcome {
    let mut out = Vec::new();
    match answer_into(query, network, client, names, &mut out) {
        Written::Reply => Outcome::Reply(out),
        Written::Forward => Outcome::Forward,
        Written::Drop => Outcome::Drop,
    }
}

/// [`answer`], with the reply written into `out` (cleared first): a
/// server reusing one buffer allocates nothing for the common query.
pub fn answer_into(
    query: &[u8],
    network: &str,
    client: Ipv4Addr,
    names: &Names,
    out: &mut Vec<u8>,
) -> Written {
    out.clear();
    if let Some(w) = fast::answer(query, network, client, names, out) {
        return w;
    }
    match answer_slow(query, network, client, names) {
        Outcome::Reply(r) => {
            out.extend_from_slice(&r);
            Written::Reply
        }
        Outcome::Forward => Written::Forward,
        Outcome::Drop => Written::Drop,
    }
}

/// The general path: any query, parsed into a message and answered.
fn answer_slow(query: &[u8], network: &str, client: Ipv4Addr, names: &Names) -> Outcome {
    let req = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return format_error(query),
    };
    if req.metadata.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    if req.metadata.op_code != OpCode::Query {
        return encode(&reply_to(&req, ResponseCode::NotImp));
    }
    let [q] = req.queries.as_slice() else {
        return encode(&reply_to(&req, ResponseCode::FormErr));
    };
    if q.query_class() != DNSClass::IN {
        return Outcome::Forward;
    }
    let qname = q.name().to_ascii().to_ascii_lowercase();
    let qname = qname.trim_end_matches('.');
    let visible = names.visible_networks(network, client);

    if q.query_type() == RecordType::PTR {
        if let Some(ip) = reverse_ip(qname) {
            if let Some(target) = names.reverse(&visible, ip) {
                let mut m = reply_to(&req, ResponseCode::NoError);
                m.metadata.authoritative = true;
                if let Ok(ptr) = Name::from_ascii(format!("{target}.")) {
                    m.answers.push(Record::from_rdata(
                        q.name().clone(),
                        TTL,
                        RData::PTR(PTR(ptr)),
                    ));
                }
                return encode(&m);
            }
        }
        return Outcome::Forward;
    }

    let found = names.lookup(&visible, qname);
    if !found.is_empty() {
        let mut m = reply_to(&req, ResponseCode::NoError);
        m.metadata.authoritative = true;
        // A known name has only IPv4 addresses: other types get an empty answer.
        if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
            for ip in found {
                m.answers
                    .push(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
            }
        }
        return encode(&m);
    }
    if !qname.contains('.') {
        let mut m = reply_to(&req, ResponseCode::NXDomain);
        m.metadata.authoritative = true;
        return encode(&m);
    }
    Outcome::Forward
}

/// SERVFAIL for a query no upstream answered.
pub fn server_failure(query: &[u8]) -> Outcome {
    match Message::from_vec(query) {
        Ok(req) if req.metadata.message_type == MessageType::Query => {
            encode(&reply_to(&req, ResponseCode::ServFail))
        }
        _ => Outcome::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use weft_model::{Attachment, Endpoint, Sandbox};

    fn sandbox(id: &str, name: &str, eps: &[(&str, &str, &[&str])]) -> Sandbox {
        Sandbox {
            id: id.into(),
            name: name.into(),
            attachment: Attachment::Networks {
                endpoints: eps
                    .iter()
                    .enumerate()
                    .map(|(i, (net, ip, aliases))| Endpoint {
                        network: net.to_string(),
                        ifname: format!("eth{i}"),
                        ip: ip.parse().unwrap(),
                        prefix_len: 24,
                        gateway: "10.0.0.1".parse().unwrap(),
                        aliases: aliases.iter().map(|a| a.to_string()).collect(),
                        kind: weft_model::sandbox::EndpointKind::Veth {
                            host_ifname: format!("wv{id}{i}"),
                        },
                        mac: None,
                    })
                    .collect(),
            },
            netns: None,
            process: None,
            auto_remove: false,
            command: vec![],
            created_unix: 0,
            network_setup_us: 0,
            ports: vec![],
            external: None,
            hostname: None,
        }
    }

    fn table() -> Names {
        let mut n = Names::default();
        n.add(&sandbox("1", "web", &[("front", "10.1.0.2", &["www"])]));
        n.add(&sandbox("2", "db", &[("back", "10.2.0.2", &[])]));
        n.add(&sandbox(
            "3",
            "api",
            &[("front", "10.1.0.3", &[]), ("back", "10.2.0.3", &[])],
        ));
        n
    }

    fn ask(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn reply(o: Outcome) -> Message {
        match o {
            Outcome::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some(ip.to_string()),
                _ => None,
            })
            .collect()
    }

    const WEB: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
    const API: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);

    #[test]
    fn names_and_aliases_of_the_same_network() {
        let n = table();
        let m = reply(answer(&ask("api.", RecordType::A), "front", WEB, &n));
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&m), ["10.1.0.3"]);
        let m = reply(answer(&ask("WWW", RecordType::A), "front", API, &n));
        assert_eq!(addrs(&m), ["10.1.0.2"], "aliases, case-insensitively");
    }

    #[test]
    fn names_of_other_networks_do_not_resolve() {
        let n = table();
        let m = reply(answer(&ask("db.", RecordType::A), "front", WEB, &n));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // api is on both networks: it sees db, on back's address.
        let m = reply(answer(&ask("db.", RecordType::A), "front", API, &n));
        assert_eq!(addrs(&m), ["10.2.0.2"]);
    }

    #[test]
    fn ptr_for_visible_addresses() {
        let n = table();
        let m = reply(answer(
            &ask("3.0.1.10.in-addr.arpa.", RecordType::PTR),
            "front",
            WEB,
            &n,
        ));
        let ptr: Vec<String> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect();
        assert_eq!(ptr, ["api."]);
        assert_eq!(
            answer(
                &ask("2.0.2.10.in-addr.arpa.", RecordType::PTR),
                "front",
                WEB,
                &n
            ),
            Outcome::Forward,
            "db's address is not visible from web"
        );
    }

    #[test]
    fn other_names_forward_or_do_not_exist() {
        let n = table();
        assert_eq!(
            answer(&ask("example.org.", RecordType::A), "front", WEB, &n),
            Outcome::Forward
        );
        let m = reply(answer(&ask("nosuch.", RecordType::A), "front", WEB, &n));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = reply(answer(&ask("api.", RecordType::AAAA), "front", WEB, &n));
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0)
        );
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let n = table();
        assert_eq!(answer(&[], "front", WEB, &n), Outcome::Drop);
        assert_eq!(answer(&[1, 2, 3], "front", WEB, &n), Outcome::Drop);
        let mut bad = ask("api.", RecordType::A);
        bad.truncate(bad.len() - 3);
        let m = reply(answer(&bad, "front", WEB, &n));
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (4242, ResponseCode::FormErr)
        );
        // Every prefix and every single-byte corruption is handled without panic.
        let good = ask("api.", RecordType::A);
        for len in 0..good.len() {
            let _ = answer(&good[..len], "front", WEB, &n);
        }
        for i in 0..good.len() {
            for b in [0u8, 0x3f, 0xc0, 0xff] {
                let mut v = good.clone();
                v[i] = b;
                let _ = answer(&v, "front", WEB, &n);
            }
        }
    }

    #[test]
    fn removal_forgets_the_names() {
        let mut n = table();
        n.remove("3");
        let m = reply(answer(&ask("api.", RecordType::A), "front", WEB, &n));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            reply(answer(&ask("www.", RecordType::A), "front", WEB, &n))
                .answers
                .len(),
            1
        );
    }

    /// A query built byte by byte, so that shapes hickory would not encode
    /// (odd flags, odd labels) can be tried too.
    fn raw(
        flags: [u8; 2],
        labels: &[&[u8]],
        qtype: u16,
        qclass: u16,
        opt: Option<[u8; 11]>,
    ) -> Vec<u8> {
        let mut q = vec![
            0x12,
            0x34,
            flags[0],
            flags[1],
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            opt.is_some() as u8,
        ];
        for l in labels {
            q.push(l.len() as u8);
            q.extend_from_slice(l);
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&qclass.to_be_bytes());
        if let Some(o) = opt {
            q.extend_from_slice(&o);
        }
        q
    }

    /// Whenever the fast path answers, its answer is the general path's,
    /// byte for byte; returns whether it answered.
    fn same_as_slow(q: &[u8], network: &str, client: Ipv4Addr, n: &Names) -> bool {
        let mut out = Vec::new();
        let Some(w) = fast::answer(q, network, client, n, &mut out) else {
            return false;
        };
        let slow = answer_slow(q, network, client, n);
        let fast = match w {
            Written::Reply => Outcome::Reply(out),
            Written::Forward => Outcome::Forward,
            Written::Drop => Outcome::Drop,
        };
        assert_eq!(fast, slow, "query {q:02x?} on {network} from {client}");
        true
    }

    #[test]
    fn fast_path_is_byte_identical_to_the_general_path() {
        let mut n = table();
        // Several sandboxes behind one alias: several addresses, sorted.
        n.add(&sandbox("4", "web2", &[("front", "10.1.0.9", &["www"])]));
        n.add(&sandbox("5", "a_b-c", &[("front", "10.1.0.7", &[])]));
        let edns = [0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0];
        let edns_do = [0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0];
        let edns_opts = [0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 4];
        let labels: &[&[&[u8]]] = &[
            &[b"api"],
            &[b"API"],
            &[b"www"],
            &[b"db"],
            &[b"a_b-c"],
            &[b"A_B-C"],
            &[b"nosuch"],
            &[b"example", b"org"],
            &[b"api", b"front"],
            &[b"-api"],
            &[b"a.i"],
            &[b"x y"],
            &[b"\xc3\xa9"],
            &[],
            &[b"xn--nxasmq6b"],
        ];
        let mut taken = 0;
        let mut tried = 0;
        for flags in [
            [1, 0],
            [0, 0],
            [1, 0x20],
            [1, 0x10],
            [1, 0x80],
            [5, 0],
            [3, 0],
            [0x81, 0],
            [0x09, 0],
            [1, 0x40],
            [1, 3],
        ] {
            for l in labels {
                for qtype in [1, 28, 12, 255, 16] {
                    for qclass in [1, 3, 255] {
                        for opt in [None, Some(edns), Some(edns_do), Some(edns_opts)] {
                            let q = raw(flags, l, qtype, qclass, opt);
                            for (net, client) in [
                                ("front", WEB),
                                ("front", API),
                                ("back", API),
                                ("front", Ipv4Addr::new(10, 9, 9, 9)),
                            ] {
                                tried += 1;
                                taken += same_as_slow(&q, net, client, &n) as usize;
                            }
                        }
                    }
                }
            }
        }
        // 608 of the combinations are common queries (counted once).
        assert_eq!(taken, 608, "the fast path took {taken} of {tried}");
        // The common queries all go the fast way.
        for name in ["api.", "WWW.", "nosuch.", "example.org.", "a_b-c."] {
            for t in [RecordType::A, RecordType::AAAA] {
                let q = ask(name, t);
                assert!(same_as_slow(&q, "front", WEB, &n), "{name} {t}");
            }
        }
        // Every prefix and single-byte change of common queries.
        for good in [
            ask("api.", RecordType::A),
            raw([1, 0], &[b"www"], 1, 1, Some(edns)),
        ] {
            for len in 0..good.len() {
                same_as_slow(&good[..len], "front", WEB, &n);
            }
            for i in 0..good.len() {
                for b in 0..=255u8 {
                    let mut v = good.clone();
                    v[i] = b;
                    same_as_slow(&v, "front", WEB, &n);
                    same_as_slow(&v, "front", API, &n);
                }
            }
            let mut longer = good.clone();
            longer.push(0);
            assert!(!same_as_slow(&longer, "front", WEB, &n), "trailing bytes");
        }
    }
}
