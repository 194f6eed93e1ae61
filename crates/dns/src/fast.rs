//! The fast path: the query nearly every client sends (one A or AAAA
//! question of class IN, no EDNS or an EDNS record without options),
//! answered straight from the wire bytes into the caller's buffer, without
//! parsing into a message or allocating. Its replies are byte for byte what
//! the general path ([`crate::answer_slow`]) encodes for the same query
//! (unit-tested below); anything else it leaves to that path (`None`).

use crate::{Names, Written};
use std::net::Ipv4Addr;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// The general path's EDNS record advertises hickory's default payload.
const EDNS_PAYLOAD: u16 = 512;
const NOERROR: u8 = 0;
const NXDOMAIN: u8 = 3;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Answers `q` if it is the common kind of query; `None` leaves it to the
/// general path. On `Some(Written::Reply)` the reply is in `out`.
pub(crate) fn answer(
    q: &[u8],
    network: &str,
    client: Ipv4Addr,
    names: &Names,
    out: &mut Vec<u8>,
) -> Option<Written> {
    // Header: a standard query (QR 0, opcode 0, not AA or TC; RD as it
    // likes), RA and Z clear, AD and CD as they like (the reply drops
    // them), no response code; one question, no answers or authority.
    if q.len() < 17 || q[2] & 0xfe != 0 || q[3] & 0xcf != 0 {
        return None;
    }
    if u16_at(q, 4)? != 1 || u16_at(q, 6)? != 0 || u16_at(q, 8)? != 0 {
        return None;
    }
    let additional = u16_at(q, 10)?;
    if additional > 1 {
        return None;
    }

    // The name, uncompressed, in labels the general path prints as they
    // are (letters, digits, '_', '-' not first), lowercased with dots
    // between into `name`, as the general path's text form is.
    let mut name = [0u8; 255];
    let mut len = 0;
    let mut at = 12;
    loop {
        let l = usize::from(*q.get(at)?);
        at += 1;
        if l == 0 {
            break;
        }
        // A pointer (0xc0) or a reserved label type.
        if l > 63 {
            return None;
        }
        let label = q.get(at..at + l)?;
        if len > 0 {
            name[len] = b'.';
            len += 1;
        }
        // Wire length of the name so far, within the 255 a name may have.
        if at + l - 12 + 1 > 255 || len + l > name.len() {
            return None;
        }
        for (i, &c) in label.iter().enumerate() {
            let ok = c.is_ascii_alphanumeric() || c == b'_' || (c == b'-' && i > 0);
            if !ok {
                return None;
            }
            name[len] = c.to_ascii_lowercase();
            len += 1;
        }
        at += l;
    }
    // The root name: rare enough for the general path.
    if len == 0 {
        return None;
    }
    let qtype = u16_at(q, at)?;
    let qclass = u16_at(q, at + 2)?;
    let question_end = at + 4;
    if qclass != CLASS_IN || (qtype != TYPE_A && qtype != TYPE_AAAA) {
        return None;
    }
    // At most an EDNS record: root name, no extended code, version 0, no
    // flags, no options. Nothing after it.
    let mut end = question_end;
    if additional == 1 {
        let opt = q.get(end..end + 11)?;
        if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT || opt[5..11] != [0; 6] {
            return None;
        }
        end += 11;
    }
    if end != q.len() {
        return None;
    }

    let name = std::str::from_utf8(&name[..len]).ok()?;
    let found = names.lookup_one(network, client, name).ok()?;
    let (rcode, addrs) = match found {
        Some(set) => (NOERROR, Some(set)),
        None if !name.contains('.') => (NXDOMAIN, None),
        None => return Some(Written::Forward),
    };
    // A known name has only IPv4 addresses: AAAA gets an empty answer.
    let answers = match (qtype, addrs) {
        (TYPE_A, Some(set)) => Some(set),
        _ => None,
    };
    let count = answers.map_or(0, |s| s.len());
    let count = u16::try_from(count).ok()?;

    out.clear();
    out.reserve(question_end + usize::from(count) * 16 + 11);
    out.extend_from_slice(&q[..2]);
    // QR, AA, RD as asked; RA, the code.
    out.push(0x84 | (q[2] & 0x01));
    out.push(0x80 | rcode);
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&additional.to_be_bytes());
    out.extend_from_slice(&q[12..question_end]);
    for ip in answers.into_iter().flatten() {
        // The question's name by pointer, A, IN, TTL, 4 bytes of address.
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        out.extend_from_slice(&crate::TTL.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    if additional == 1 {
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        out.extend_from_slice(&[0; 6]);
    }
    Some(Written::Reply)
}
