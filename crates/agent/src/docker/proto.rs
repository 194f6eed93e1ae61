//! The JSON of Docker's plugin protocols, as libnetwork's remote driver and
//! remote IPAM proxies send and read it (Go field names, so PascalCase).
//! Go marshals empty slices and maps as `null`, so every collection here
//! reads `null` as empty.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Option keys libnetwork uses (its `netlabel` package).
pub const GENERIC_OPTIONS: &str = "com.docker.network.generic";
pub const INTERNAL: &str = "com.docker.network.internal";
pub const PORT_MAP: &str = "com.docker.network.portmap";
pub const MAC_ADDRESS: &str = "com.docker.network.endpoint.macaddress";
/// `RequestAddress` option that marks the request for a network's gateway.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
pub const GATEWAY_REQUEST: &str = "com.docker.network.gateway";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamData {
    /// CIDR.
    pub pool: String,
    /// CIDR (the gateway's address with the pool's prefix length); may be absent.
    #[serde(default)]
    pub gateway: String,
    #[serde(default, deserialize_with = "nullable")]
    pub aux_addresses: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "Options", default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, serde_json::Value>,
    #[serde(rename = "IPv4Data", default, deserialize_with = "nullable")]
    pub ipv4_data: Vec<IpamData>,
    #[serde(rename = "IPv6Data", default, deserialize_with = "nullable")]
    pub ipv6_data: Vec<IpamData>,
}

#[derive(Debug, Default, Deserialize)]
pub struct NetworkRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Interface {
    /// CIDR.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(
        rename = "AddressIPv6",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub address_ipv6: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Interface", default)]
    pub interface: Option<Interface>,
}

/// Only what the driver chose: libnetwork refuses a value it gave itself.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpointReply {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<Interface>,
}

/// The request of DeleteEndpoint, EndpointOperInfo, Leave and RevokeExternalConnectivity.
#[derive(Debug, Default, Deserialize)]
pub struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointInfo {
    pub value: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey", default)]
    pub sandbox_key: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    /// The link in the host namespace that Docker moves into the container.
    pub src_name: String,
    /// Docker appends an index: eth0, eth1, …
    pub dst_prefix: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinReply {
    pub interface_name: InterfaceName,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// Without a gateway Docker would plug the container into a
    /// `docker_gwbridge` network of its own; this says not to.
    pub disable_gateway_service: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct ExternalConnectivity {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Options", default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// One published port as libnetwork's `types.PortBinding` marshals it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortBinding {
    /// IANA protocol number: 6 TCP, 17 UDP, 132 SCTP.
    #[serde(rename = "Proto")]
    pub proto: u8,
    /// The container's address; empty when Docker leaves it to the driver.
    #[serde(rename = "IP", default, deserialize_with = "nullable")]
    pub ip: String,
    #[serde(rename = "Port")]
    pub port: u16,
    /// Empty (or 0.0.0.0): every host address.
    #[serde(rename = "HostIP", default, deserialize_with = "nullable")]
    pub host_ip: String,
    /// 0: any free port, chosen by the driver.
    #[serde(rename = "HostPort", default)]
    pub host_port: u16,
    /// Above `host_port`: any free port of the range.
    #[serde(rename = "HostPortEnd", default)]
    pub host_port_end: u16,
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPool {
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub sub_pool: String,
    #[serde(default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
    #[serde(rename = "V6", default)]
    pub v6: bool,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PoolReply {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub pool: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PoolRef {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// A plain address (no prefix); empty: any.
    #[serde(default)]
    pub address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressReply {
    /// CIDR.
    pub address: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(default)]
    pub address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_nulls_as_empty() {
        let r: CreateNetwork = serde_json::from_str(
            r#"{"NetworkID":"n","Options":null,"IPv4Data":[{"AddressSpace":"LocalDefault","Pool":"10.1.0.0/24","Gateway":"10.1.0.1/24","AuxAddresses":null}],"IPv6Data":null}"#,
        )
        .unwrap();
        assert!(r.options.is_empty() && r.ipv6_data.is_empty());
        assert_eq!(r.ipv4_data[0].gateway, "10.1.0.1/24");
        let r: RequestPool =
            serde_json::from_str(r#"{"AddressSpace":"x","Options":null,"V6":false}"#).unwrap();
        assert!(r.pool.is_empty() && r.options.is_empty());
    }

    #[test]
    fn port_bindings_use_docker_field_names() {
        let b: PortBinding = serde_json::from_str(
            r#"{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080}"#,
        )
        .unwrap();
        assert_eq!((b.proto, b.port, b.host_port), (TCP, 80, 8080));
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["HostIP"], "");
        assert_eq!(v["HostPortEnd"], 8080);
    }

    #[test]
    fn create_endpoint_reply_leaves_out_what_docker_gave() {
        let r = CreateEndpointReply {
            interface: Some(Interface {
                mac_address: "02:77:0a:01:00:02".into(),
                ..Default::default()
            }),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"Interface":{"MacAddress":"02:77:0a:01:00:02"}}"#
        );
    }
}
