//! Feeds arbitrary bytes to the resolver's query handler: it must never
//! panic, and whatever it sends back must itself be a parseable DNS message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;
use std::sync::OnceLock;
use weft_dns::{answer, Names, Outcome};
use weft_model::{Attachment, Endpoint, Sandbox};

fn names() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut n = Names::default();
        for (i, (name, ip)) in [("web", "10.1.0.2"), ("api", "10.1.0.3")].iter().enumerate() {
            n.add(&Sandbox {
                id: format!("id{i}"),
                name: name.to_string(),
                attachment: Attachment::Networks {
                    endpoints: vec![Endpoint {
                        network: "front".into(),
                        ifname: "eth0".into(),
                                                ip: ip.parse().unwrap(),
                        prefix_len: 24,
                        gateway: "10.1.0.1".parse().unwrap(),
                        aliases: vec![format!("{name}-alias")],
                        kind: weft_model::sandbox::EndpointKind::Veth {
                            host_ifname: format!("wv{i}"),
                        },
                        mac: None,
                    }],
                },
                netns: None,
                process: None,
                auto_remove: false,
                command: vec![],
                created_unix: 0,
                network_setup_us: 0,
                ports: vec![],
                external: None,
            });
        }
        n
    })
}

fuzz_target!(|data: &[u8]| {
    if let Outcome::Reply(bytes) = answer(data, "front", Ipv4Addr::new(10, 1, 0, 2), names()) {
        assert!(bytes.len() >= 12, "a reply shorter than a DNS header");
    }
    let _ = weft_dns::server_failure(data);
});
