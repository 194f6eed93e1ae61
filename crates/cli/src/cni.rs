//! The CNI plugin (spec 1.1.0; results in 0.3.x, 0.4.0, 1.0.0 and 1.1.0 as
//! asked). A runtime runs `weft` from its CNI path with CNI_COMMAND set and
//! the network config on stdin; the plugin hands the work to the local agent,
//! which serialises concurrent calls. Errors go to stdout as CNI error JSON.

use crate::client::{Client, ClientError};
use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;
use weft_model::api::{CniAdd, CniAttachment, CniGc, CniRef};

pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: well-known codes from the spec, 100+ for weft's own.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENV: u32 = 4;
const IO_FAILURE: u32 = 5;
const DECODE_FAILURE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
const NOT_AVAILABLE: u32 = 50;

fn from_client(e: ClientError) -> CniError {
    match e {
        ClientError::NoAgent(_) => CniError {
            code: TRY_AGAIN_LATER,
            msg: "the weft agent is not running".into(),
            details: e.to_string(),
        },
        ClientError::Api {
            status: 404,
            message,
        } => CniError::new(INVALID_CONFIG, message),
        ClientError::Api { message, .. } => CniError::new(100, message),
        other => CniError::new(IO_FAILURE, other.to_string()),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn need(name: &str) -> Result<String, CniError> {
    env(name).ok_or_else(|| CniError::new(INVALID_ENV, format!("{name} is not set")))
}

/// Runs one CNI command; returns the process exit code.
pub fn run() -> i32 {
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let command = env("CNI_COMMAND").unwrap_or_default();
    let conf: Value = if command == "VERSION" && input.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str(&input) {
            Ok(v) => v,
            Err(e) => {
                return fail(
                    "1.1.0",
                    CniError::new(DECODE_FAILURE, format!("network config: {e}")),
                )
            }
        }
    };
    let version = conf["cniVersion"].as_str().unwrap_or("1.1.0").to_string();
    match handle(&command, &conf, &version) {
        Ok(Some(out)) => {
            crate::output::print_line(&out.to_string());
            0
        }
        Ok(None) => 0,
        Err(e) => fail(&version, e),
    }
}

fn fail(version: &str, e: CniError) -> i32 {
    let mut v = json!({ "cniVersion": version, "code": e.code, "msg": e.msg });
    if !e.details.is_empty() {
        v["details"] = json!(e.details);
    }
    crate::output::print_line(&v.to_string());
    1
}

fn client(conf: &Value) -> Client {
    let dir = conf["stateDir"]
        .as_str()
        .map(PathBuf::from)
        .or_else(|| env("WEFT_STATE_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/weft"));
    Client::new(dir.join("weft.sock"))
}

/// The weft network a config means: "network", else the config's name.
fn network(conf: &Value) -> Result<String, CniError> {
    conf["network"]
        .as_str()
        .or_else(|| conf["name"].as_str())
        .map(String::from)
        .ok_or_else(|| CniError::new(INVALID_CONFIG, "the network config has no \"name\""))
}

fn handle(command: &str, conf: &Value, version: &str) -> Result<Option<String>, CniError> {
    if command == "VERSION" {
        return Ok(Some(
            json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED }).to_string(),
        ));
    }
    if !SUPPORTED.contains(&version) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version} is not supported; weft supports {}",
                SUPPORTED.join(", ")
            ),
        ));
    }
    let c = client(conf);
    match command {
        "ADD" => {
            let req = add_request(conf)?;
            let a: CniAttachment = c.post("/v1/cni/add", &req).map_err(from_client)?;
            Ok(Some(result(&a, version).to_string()))
        }
        "DEL" => {
            let r = CniRef {
                container_id: need("CNI_CONTAINERID")?,
                ifname: need("CNI_IFNAME")?,
                network: network(conf)?,
            };
            let () = c.post("/v1/cni/del", &r).map_err(from_client)?;
            Ok(None)
        }
        "CHECK" => {
            let r = CniRef {
                container_id: need("CNI_CONTAINERID")?,
                ifname: need("CNI_IFNAME")?,
                network: network(conf)?,
            };
            let a: CniAttachment = c.post("/v1/cni/check", &r).map_err(from_client)?;
            // The runtime's view (prevResult) must match what weft made.
            if let Some(ips) = conf["prevResult"]["ips"].as_array() {
                let want = format!("{}/{}", a.ip, a.prefix_len);
                if !ips.iter().any(|i| i["address"] == json!(want)) {
                    return Err(CniError::new(
                        100,
                        format!("prevResult does not hold {want}"),
                    ));
                }
            }
            Ok(None)
        }
        "STATUS" => {
            let _: Value = c.get("/v1/ping").map_err(|e| CniError {
                code: NOT_AVAILABLE,
                msg: "the weft agent is not available".into(),
                details: e.to_string(),
            })?;
            Ok(None)
        }
        "GC" => {
            let net = network(conf)?;
            let valid = conf["cni.dev/valid-attachments"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| {
                            Some((
                                v["containerID"].as_str()?.to_string(),
                                v["ifname"].as_str()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _: Vec<String> = c
                .post(
                    "/v1/cni/gc",
                    &CniGc {
                        network: net,
                        valid,
                    },
                )
                .map_err(from_client)?;
            Ok(None)
        }
        other => Err(CniError::new(
            INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        )),
    }
}

/// CNI_ARGS (`K=V;K=V`), the runtime's older channel: podman sends a
/// single `--ip` and `--mac-address` as IP= and MAC=, and the container's
/// name as K8S_POD_NAME.
fn cni_args(raw: &str) -> std::collections::HashMap<String, String> {
    raw.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

fn add_request(conf: &Value) -> Result<CniAdd, CniError> {
    let rc = &conf["runtimeConfig"];
    let bad = |m: String| CniError::new(INVALID_CONFIG, m);
    let args = cni_args(&std::env::var("CNI_ARGS").unwrap_or_default());
    let ip_arg = args.get("IP").map(|s| Value::String(s.clone()));
    let ip = match rc["ips"]
        .as_array()
        .and_then(|a| a.first())
        .or(ip_arg.as_ref())
    {
        None => None,
        Some(v) => {
            let s = v.as_str().unwrap_or("");
            let addr = s.split('/').next().unwrap_or("");
            Some(
                addr.parse()
                    .map_err(|_| bad(format!("runtimeConfig.ips: {s:?} is not an IPv4 address")))?,
            )
        }
    };
    let mut ports = Vec::new();
    for p in rc["portMappings"].as_array().into_iter().flatten() {
        let (Some(host), Some(cont)) = (p["hostPort"].as_u64(), p["containerPort"].as_u64()) else {
            return Err(bad(format!(
                "runtimeConfig.portMappings: {p} needs hostPort and containerPort"
            )));
        };
        let proto = p["protocol"].as_str().unwrap_or("tcp");
        let host_ip = p["hostIP"]
            .as_str()
            .filter(|h| !h.is_empty() && *h != "0.0.0.0");
        ports.push(match host_ip {
            Some(h) => format!("{h}:{host}:{cont}/{proto}"),
            None => format!("{host}:{cont}/{proto}"),
        });
    }
    let net = network(conf)?;
    // Podman passes aliases per network name: {"aliases": {"net": ["a", "b"]}}.
    let mut aliases: Vec<String> = rc["aliases"][conf["name"].as_str().unwrap_or("")]
        .as_array()
        .or_else(|| rc["aliases"][&net].as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    // The container's name, so others reach it by name as on Docker.
    // (Skipped if weft could not use it as a name, rather than failing ADD.)
    if let Some(name) = args.get("K8S_POD_NAME") {
        if !aliases.contains(name) && weft_model::names::validate("alias", name).is_ok() {
            aliases.push(name.clone());
        }
    }
    Ok(CniAdd {
        container_id: need("CNI_CONTAINERID")?,
        netns: need("CNI_NETNS")?,
        ifname: need("CNI_IFNAME")?,
        network: net,
        ip,
        mac: rc["mac"]
            .as_str()
            .map(String::from)
            .or_else(|| args.get("MAC").cloned()),
        ports,
        aliases,
    })
}

/// The ADD result in the version asked for: 0.3.x and 0.4.0 mark each IP
/// with "version": "4"; 1.0.0 and later do not.
fn result(a: &CniAttachment, version: &str) -> Value {
    let mut interfaces = Vec::new();
    if !a.host_ifname.is_empty() {
        interfaces.push(json!({ "name": a.host_ifname }));
    }
    interfaces.push(json!({ "name": a.ifname, "mac": a.mac, "sandbox": a.netns }));
    let mut ip = json!({
        "address": format!("{}/{}", a.ip, a.prefix_len),
        "gateway": a.gateway.to_string(),
        "interface": interfaces.len() - 1,
    });
    if version.starts_with("0.") {
        ip["version"] = json!("4");
    }
    let mut out = json!({
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": [ip],
        "routes": [{ "dst": "0.0.0.0/0", "gw": a.gateway.to_string() }],
    });
    out["dns"] = match a.nameserver {
        Some(ns) => json!({ "nameservers": [ns.to_string()] }),
        None => json!({}),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_are_read() {
        let a =
            cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.1.0.5;MAC=02:42:0a:01:00:05;EMPTY=");
        assert_eq!(a["K8S_POD_NAME"], "web");
        assert_eq!(a["IP"], "10.1.0.5");
        assert_eq!(a["MAC"], "02:42:0a:01:00:05");
        assert!(!a.contains_key("EMPTY"));
    }

    fn attachment() -> CniAttachment {
        CniAttachment {
            host_ifname: "wv0123456789a0".into(),
            host_mac: String::new(),
            ifname: "eth0".into(),
            mac: "02:77:0a:01:00:02".into(),
            netns: "/run/netns/x".into(),
            ip: "10.1.0.2".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.1.0.1".parse().unwrap(),
            nameserver: Some("10.1.0.1".parse().unwrap()),
        }
    }

    #[test]
    fn results_follow_the_asked_version() {
        let old = result(&attachment(), "0.4.0");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][0]["interface"], 1);
        let new = result(&attachment(), "1.0.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["cniVersion"], "1.0.0");
        assert_eq!(new["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(new["dns"]["nameservers"][0], "10.1.0.1");
    }
}
