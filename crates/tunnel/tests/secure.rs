//! The secure backend over real namespaces: traffic flows, nothing of it
//! is readable on the wire, modified and replayed datagrams are dropped
//! and counted, a host with the wrong key gets nothing through, and
//! sessions are replaced by time and by message count without a break.

mod common;

use common::*;
use std::time::Duration;
use weft_tunnel::RekeyPolicy;

fn secure() -> Opts {
    Opts {
        secure: true,
        ..Opts::default()
    }
}

#[test]
fn ping_tcp_and_no_plaintext_on_the_wire() {
    let lab = Lab::new(secure());
    let cap = Capture::start(&lab.a.ns, "veth0");
    // The first packets wait in the queue for the handshake, then go.
    assert!(lab.ping(3), "ping across the secure tunnel failed");
    let marker: &'static [u8] = b"WEFT-MARKER-plaintext-7d1c";
    send_udp(&lab.a, &lab.b, 7000, marker, 5);
    let gbps = tcp_transfer(&lab.a, &lab.b, 5001, 32 << 20, Some(marker));
    eprintln!("secure A->B: {gbps:.2} Gbit/s");
    let gbps = tcp_transfer(&lab.b, &lab.a, 5002, 32 << 20, Some(marker));
    eprintln!("secure B->A: {gbps:.2} Gbit/s");
    let frames = cap.finish();
    let tunnel_frames = frames
        .iter()
        .filter(|f| udp_payload(f, PORT).is_some())
        .count();
    assert!(
        tunnel_frames > 100,
        "only {tunnel_frames} tunnel frames captured"
    );
    assert!(
        !frames.iter().any(|f| contains(f, marker)),
        "the marker appeared in clear on the underlay"
    );
    let (sa, sb) = (lab.a.tunnel().stats(), lab.b.tunnel().stats());
    eprintln!("A: {sa:?}\nB: {sb:?}");
    assert!(sb.rx_bytes > 32 << 20 && sa.rx_bytes > 32 << 20);
    assert_eq!(sa.dropped_bad_auth + sb.dropped_bad_auth, 0);
    assert!(sa.handshakes_completed >= 1 && sb.handshakes_completed >= 1);
}

#[test]
fn modified_and_replayed_datagrams_are_dropped_and_counted() {
    let lab = Lab::new(secure());
    assert!(lab.ping(2));
    // Capture a few small data messages (pings) from A to B.
    let cap = Capture::start(&lab.a.ns, "veth0");
    assert!(lab.ping(3));
    let frames = cap.finish();
    let data: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| f[14 + 16..14 + 20] == [198, 51, 100, 2])
        .filter_map(|f| udp_payload(f, PORT))
        .filter(|p| p[0] == 4 && p.len() < 200)
        .map(<[u8]>::to_vec)
        .collect();
    assert!(!data.is_empty(), "no data message captured");
    let before = lab.b.tunnel().stats();

    // One byte of the ciphertext flipped: authentication fails.
    let mut modified = data[0].clone();
    let at = modified.len() - 20;
    modified[at] ^= 0x01;
    inject(&lab.a, &lab.b, modified);
    eventually(
        "the modified datagram to be counted",
        Duration::from_secs(3),
        || {
            let now = lab.b.tunnel().stats();
            if now.dropped_bad_auth == before.dropped_bad_auth + 1 {
                Ok(())
            } else {
                Err(format!("modified datagram not counted: {now:?}"))
            }
        },
    );

    // The same datagram again, unmodified: a replay.
    inject(&lab.a, &lab.b, data[0].clone());
    eventually(
        "the replayed datagram to be counted",
        Duration::from_secs(3),
        || {
            let now = lab.b.tunnel().stats();
            if now.dropped_replayed == before.dropped_replayed + 1 {
                Ok(())
            } else {
                Err(format!("replayed datagram not counted: {now:?}"))
            }
        },
    );
    let after = lab.b.tunnel().stats();
    // Neither reached B's stack.
    assert_eq!(after.rx_packets, before.rx_packets);
    // And the tunnel still works.
    assert!(lab.ping(2));
}

#[test]
fn a_peer_with_the_wrong_key_gets_nothing_through() {
    let lab = Lab::new(Opts {
        wrong_key_at_b: true,
        ..secure()
    });
    let cap = Capture::start(&lab.a.ns, "veth0");
    assert!(!lab.ping(3), "ping went through with a wrong key");
    // B to A as well.
    let out = lab.b.ns.exec(&[
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "10.50.2.1",
        "10.50.1.1",
    ]);
    assert!(!out.status.success());
    let frames = cap.finish();
    let (sa, sb) = (lab.a.tunnel().stats(), lab.b.tunnel().stats());
    eprintln!("A: {sa:?}\nB: {sb:?}");
    // Handshakes were tried and refused on both sides; no packet arrived.
    assert!(sa.handshakes_sent > 0 && sb.handshakes_sent > 0);
    assert!(sa.handshakes_rejected > 0 && sb.handshakes_rejected > 0);
    assert_eq!(sa.handshakes_completed + sb.handshakes_completed, 0);
    assert_eq!(sa.rx_packets + sb.rx_packets, 0);
    // Queued packets never went out in clear: only handshakes are on the
    // wire (type 1).
    for f in &frames {
        if let Some(p) = udp_payload(f, PORT) {
            assert_eq!(
                p[0], 1,
                "a non-handshake message was sent without a session"
            );
        }
    }
}

#[test]
fn rekey_by_time_and_by_message_count() {
    let lab = Lab::new(Opts {
        rekey: RekeyPolicy {
            after_time: Duration::from_secs(2),
            reject_after_time: Duration::from_secs(30),
            after_messages: 20_000,
            reject_after_messages: 1 << 40,
        },
        ..secure()
    });
    assert!(lab.ping(1));
    // ~100k packets: several rekeys by count while TCP keeps going.
    tcp_transfer(&lab.a, &lab.b, 5003, 128 << 20, None);
    let by_count =
        lab.a.tunnel().stats().handshakes_completed + lab.b.tunnel().stats().handshakes_completed;
    assert!(by_count >= 4, "only {by_count} handshakes after 128 MB");
    // And by time: a slow trickle over a few seconds.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(lab.ping(3));
    let after =
        lab.a.tunnel().stats().handshakes_completed + lab.b.tunnel().stats().handshakes_completed;
    assert!(
        after > by_count,
        "no rekey after the session aged ({after})"
    );
    let (sa, sb) = (lab.a.tunnel().stats(), lab.b.tunnel().stats());
    eprintln!("A: {sa:?}\nB: {sb:?}");
    assert_eq!(sa.dropped_bad_auth + sb.dropped_bad_auth, 0);
}

#[test]
fn key_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("wft-keyfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tunnel.key");
    let k = weft_tunnel::Keys::load_or_create(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        weft_tunnel::Keys::load_or_create(&path)
            .unwrap()
            .public_key(),
        k.public_key()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
