//! The userspace backends (udp and secure, weft-tunnel) on 3-host labs:
//! ping and TCP across hosts; for secure, no plaintext on the wire, modified
//! and replayed datagrams dropped and counted in `weft status`, and a host
//! with the wrong key kept out.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use weft_e2e::lab::{TestLab, NET};
use weft_e2e::text;

/// A capture on the lab's switch, written as pcap, stopped on drop.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(lab: &TestLab, name: &str, filter: &str) -> Capture {
        let file = lab.lab.dir.join(format!("{name}.pcap"));
        let child = lab
            .underlay_command("tcpdump")
            .args(["--immediate-mode", "-U", "-s", "0", "-i", "ul0", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // tcpdump writes the pcap header once it is capturing.
        let start = Instant::now();
        while std::fs::metadata(&file).map_or(0, |m| m.len()) < 24 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "tcpdump did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        Capture { child, file }
    }

    /// Stops the capture; returns the UDP payloads seen (source, payload).
    fn stop(mut self) -> (Vec<u8>, Vec<(SocketAddrV4, Vec<u8>)>) {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill takes integers and touches no memory; the pid is our
        // unreaped child's, so it cannot have been reused.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let raw = std::fs::read(&self.file).unwrap();
        let mut out = Vec::new();
        let mut off = 24;
        while off + 16 <= raw.len() {
            let caplen = u32::from_le_bytes(raw[off + 8..off + 12].try_into().unwrap()) as usize;
            let frame = &raw[off + 16..(off + 16 + caplen).min(raw.len())];
            off += 16 + caplen;
            // Ethernet, IPv4, UDP.
            if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
                continue;
            }
            let ihl = ((frame[14] & 0x0f) as usize) * 4;
            let ip = &frame[14..];
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let udp = &ip[ihl..];
            let sport = u16::from_be_bytes([udp[0], udp[1]]);
            out.push((SocketAddrV4::new(src, sport), udp[8..].to_vec()));
        }
        (raw, out)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends `marker` from sandbox a (h1) to a TCP server in sandbox b (h2).
fn send_marker(lab: &TestLab, b: Ipv4Addr, marker: &str) {
    let server = lab
        .lab
        .weft(
            1,
            &[
                "exec",
                "b",
                "--",
                "socat",
                "-u",
                "TCP-LISTEN:7100,reuseaddr",
                "STDOUT",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut sent = false;
    for _ in 0..50 {
        let out = lab.exec(0, "a", &format!("echo {marker} | socat -T2 - TCP:{b}:7100"));
        if out.status.success() {
            sent = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(sent, "could not reach b's server");
    let got = server.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&got.stdout).contains(marker),
        "b received the marker through the tunnel"
    );
}

/// Host `i`'s datapath counters of its first overlay network (none yet: empty).
fn counters(lab: &TestLab, i: usize) -> BTreeMap<String, u64> {
    lab.status(i)
        .cluster
        .and_then(|c| c.networks.into_iter().next())
        .map(|n| n.counters)
        .unwrap_or_default()
}

fn three_hosts(backend: &str) -> (TestLab, Ipv4Addr) {
    let lab = TestLab::up(3, Some(backend), 60);
    let ips: Vec<Ipv4Addr> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| lab.sandbox(i, n))
        .collect();
    for (i, from) in ["a", "b", "c"].iter().enumerate() {
        for (j, to) in ips.iter().enumerate() {
            if i != j {
                let ok = lab.exec(i, from, &format!("ping -c 2 -W 2 {to}"));
                assert!(
                    ok.status.success(),
                    "{from} -> {to} over {backend}: {}",
                    text(&ok)
                );
            }
        }
    }
    let dev = String::from_utf8_lossy(&lab.sh(0, "ip -o link show").stdout).into_owned();
    assert!(dev.contains("wtu-"), "a TUN device per network: {dev}");
    (lab, ips[1])
}

#[test]
fn udp_backend_carries_ping_and_tcp_in_plain_udp_on_8285() {
    let (lab, b) = three_hosts("udp");
    let cap = Capture::start(&lab, "udp", "udp");
    send_marker(&lab, b, "wft-plain-marker-4711");
    let (raw, datagrams) = cap.stop();
    let ports: std::collections::BTreeSet<u16> = datagrams.iter().map(|(s, _)| s.port()).collect();
    assert_eq!(
        ports,
        [8285].into_iter().collect(),
        "datagrams from port 8285 only ({} seen, {} bytes captured)",
        datagrams.len(),
        raw.len()
    );
    assert!(
        contains(&raw, b"wft-plain-marker-4711"),
        "plain udp carries the marker in clear (the capture works)"
    );
    // h2's counters (refreshed every 2 s) show what came in.
    lab.wait(
        Duration::from_secs(5),
        "h2 to count received packets",
        || counters(&lab, 1).get("rx_packets").copied().unwrap_or(0) > 0,
    );
}

#[test]
fn secure_backend_shows_no_plaintext_on_the_wire() {
    let (lab, b) = three_hosts("secure");
    let key = lab.lab.dir.join("h1/data/secure.key");
    let mode = std::fs::metadata(&key).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let cap = Capture::start(&lab, "secure", "udp");
    send_marker(&lab, b, "wft-secret-marker-4711");
    let ok = lab.exec(0, "a", &format!("ping -c 3 -p 7766746d61726b6572 {b}"));
    assert!(ok.status.success());
    let (raw, datagrams) = cap.stop();
    assert!(
        datagrams.len() >= 6,
        "encrypted datagrams were captured: {}",
        datagrams.len()
    );
    assert!(
        !contains(&raw, b"wft-secret-marker-4711"),
        "no plaintext marker on the wire"
    );
    assert!(
        !contains(&raw, b"wftmarker"),
        "no plaintext ping payload on the wire"
    );
    // Every UDP datagram on the wire is a secure message (handshake or data).
    assert!(datagrams
        .iter()
        .all(|(_, p)| matches!(p.first(), Some(1 | 2 | 4))));
}

#[test]
fn secure_backend_drops_and_counts_modified_and_replayed_datagrams() {
    let lab = TestLab::up(3, Some("secure"), 60);
    lab.sandbox(0, "a");
    let b = lab.sandbox(1, "b");
    assert!(lab.reaches(0, "a", b));
    let port = lab.network(0, NET).overlay.expect("an overlay").port;
    let (h1, h2) = (lab.hosts[0].ip, lab.hosts[1].ip);
    // Data messages from h2 to h1 (b answering a's pings).
    let cap = Capture::start(&lab, "replay", &format!("udp and src host {h2}"));
    assert!(lab
        .exec(0, "a", &format!("ping -c 3 -s 500 {b}"))
        .status
        .success());
    let (_, datagrams) = cap.stop();
    let data = datagrams
        .iter()
        .rev()
        .find(|(_, p)| p.first() == Some(&4) && p.len() > 500)
        .map(|(_, p)| p.clone())
        .expect("a data message from h2");
    let before = counters(&lab, 0);
    // Send from h2's address and port (beside its tunnel, SO_REUSEPORT):
    // one copy as captured (a replay), one with a byte of ciphertext flipped.
    let ns = std::fs::File::open(lab.host_netns(1)).unwrap();
    let sender = std::thread::spawn(move || {
        // SAFETY: `ns` is an open namespace file this closure owns; setns
        // changes only this short-lived thread's namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        // SAFETY: socket takes integers and touches no memory.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        let one: libc::c_int = 1;
        // SAFETY: the option value is `one`, a live c_int of the 4 bytes
        // passed; the kernel only reads it (a bad `sock` is an error, no UB).
        unsafe {
            libc::setsockopt(
                sock,
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                &one as *const _ as *const libc::c_void,
                4,
            );
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(h2).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `addr` is a live, initialised sockaddr_in and the length
        // passed is its size; the kernel only reads it.
        let rc = unsafe {
            libc::bind(
                sock,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(
            rc,
            0,
            "bind beside h2's tunnel: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: bind succeeded, so `sock` is an open descriptor, which
        // socket() made for us alone: the UdpSocket becomes its only owner.
        let sock: UdpSocket = unsafe { std::os::fd::FromRawFd::from_raw_fd(sock) };
        let to = SocketAddrV4::new(h1, port);
        sock.send_to(&data, to).unwrap();
        let mut modified = data.clone();
        let mid = modified.len() / 2;
        modified[mid] ^= 0x40;
        sock.send_to(&modified, to).unwrap();
    });
    sender.join().unwrap();
    let n = |v: &BTreeMap<String, u64>, k: &str| v.get(k).copied().unwrap_or(0);
    lab.wait(
        Duration::from_secs(6),
        "h1 to count the replay and the forgery",
        || {
            let c = counters(&lab, 0);
            n(&c, "dropped_replayed") > n(&before, "dropped_replayed")
                && n(&c, "dropped_bad_auth") > n(&before, "dropped_bad_auth")
        },
    );
    let human = String::from_utf8_lossy(&lab.weft(0, &["status"]).stdout).into_owned();
    assert!(
        human.contains("replayed=") && human.contains("bad_auth="),
        "{human}"
    );
    assert!(lab.reaches(0, "a", b), "traffic goes on");
}

#[test]
fn a_host_with_the_wrong_key_cannot_join_the_traffic() {
    let mut lab = TestLab::up(3, Some("secure"), 60);
    let a = lab.sandbox(0, "a");
    let s1 = lab.subnet(0);
    let s2 = lab.subnet(1);
    let port = 8285;
    // h2's agent stops (its lease, with its real key, stays until the TTL).
    // An impostor at h2's address with another key tries to talk to h1.
    lab.stop_agent(1, libc::SIGTERM).unwrap();
    // The impostor knows h1's public key (it is public) but not h2's private one.
    let h1_key = weft_tunnel::Keys::load_or_create(&lab.lab.dir.join("h1/data/secure.key"))
        .unwrap()
        .public_key();
    let ns = std::fs::File::open(lab.host_netns(1)).unwrap();
    let mut cfg =
        weft_tunnel::TunnelConfig::new("wftrogue", 1400, SocketAddrV4::new(lab.hosts[1].ip, port));
    cfg.queues = 1;
    cfg.crypto = Some(weft_tunnel::Keys::generate().unwrap());
    let rogue = weft_tunnel::Tunnel::start_in(cfg, std::os::fd::AsFd::as_fd(&ns)).unwrap();
    rogue
        .set_peers(vec![weft_tunnel::Peer {
            subnet: s1,
            endpoint: SocketAddrV4::new(lab.hosts[0].ip, port),
            public_key: Some(h1_key),
        }])
        .unwrap();
    let out = lab.sh(
        1,
        &format!(
            "ip addr add {}/32 dev wftrogue && ip route replace {s1} dev wftrogue",
            s2.network()
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let ping = lab.sh(1, &format!("ping -c 3 -W 1 -I {} {a}", s2.network()));
    assert!(
        !ping.status.success(),
        "the impostor gets no answer: {}",
        text(&ping)
    );
    let n = |k: &str| counters(&lab, 0).get(k).copied().unwrap_or(0);
    lab.wait(
        Duration::from_secs(6),
        "h1 to reject the impostor's handshake",
        || n("handshakes_rejected") > 0,
    );
    assert_eq!(
        n("rx_packets"),
        0,
        "nothing of the impostor's reached h1's sandboxes"
    );
    rogue.stop();
}
