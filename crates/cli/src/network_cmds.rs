//! weft network ls / inspect.

use crate::output::{emit, table};
use crate::sandbox_cmds::Context;
use crate::Failure;
use clap::Args;
use clap::Subcommand;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use weft_model::api::{Connect, Disconnect, NetworkView, RemovedNetwork, SandboxView};
use weft_model::NetworkSpec;

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create a network: a Linux bridge with its own subnet, isolated from other
    /// networks (-d bridge); a LAN through macvlan (-d macvlan); or one network
    /// across every host of the cluster (-d overlay, needs an agent with --etcd-endpoints)
    Create(CreateArgs),
    /// List networks
    #[command(
        alias = "list",
        after_help = "Examples:\n  weft network ls\n  weft network ls -q --filter driver=overlay\n\n\
Filters: name=PART (a part of the name), id=PREFIX, driver=bridge|macvlan|overlay."
    )]
    Ls(LsArgs),
    /// Show networks in detail, with their endpoints
    #[command(
        after_help = "Examples:\n  weft network inspect bridge\n  weft --format json network inspect red green"
    )]
    Inspect {
        /// Network names or ids
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks (refused while sandboxes are attached, unless -f)
    #[command(
        after_help = "Examples:\n  weft network rm red\n  weft network rm -f red   # disconnects red's sandboxes first"
    )]
    Rm {
        /// Disconnect attached sandboxes first
        #[arg(short, long)]
        force: bool,
        /// Network names or ids
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove every user-defined network that has no sandbox attached
    #[command(after_help = "Example:\n  weft network prune")]
    Prune,
    /// Connect a sandbox to a network, without restarting it
    #[command(
        after_help = "Examples:\n  weft network connect red web\n  weft network connect --ip 10.1.0.9 --alias api red web"
    )]
    Connect {
        /// Address on the network (default: the next free one)
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Another name for the sandbox on this network (repeatable)
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// Network name or id
        network: String,
        /// Sandbox name or id
        sandbox: String,
    },
    /// Disconnect a sandbox from a network (the ports it publishes there go with it)
    #[command(after_help = "Example:\n  weft network disconnect red web")]
    Disconnect {
        /// Network name or id
        network: String,
        /// Sandbox name or id
        sandbox: String,
    },
}

#[derive(Args)]
pub struct ExposeArgs {
    /// The address this host takes on the network (default: one of the
    /// network's pool; a network with a subnet per host: its gateway here)
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    /// Network name
    network: String,
}

/// `weft expose NET [--ip ADDR]`.
pub fn expose(ctx: &Context, a: ExposeArgs) -> Result<i32, Failure> {
    let v: weft_model::api::ExposedView = ctx.client.post(
        &format!("/v1/networks/{}/expose", a.network),
        &weft_model::api::ExposeRequest { ip: a.ip },
    )?;
    emit(ctx.format, &v, || {
        if v.default {
            format!(
                "{} is a local bridge network, exposed by default: this host has its gateway {}/{}",
                v.network, v.ip, v.prefix_len
            )
        } else {
            format!(
                "exposed {} on this host as {}/{}",
                v.network, v.ip, v.prefix_len
            )
        }
    });
    Ok(0)
}

/// `weft hide NET`.
pub fn hide(ctx: &Context, network: &str) -> Result<i32, Failure> {
    let v: weft_model::api::ExposedView = ctx
        .client
        .post_empty(&format!("/v1/networks/{network}/hide"))?;
    emit(ctx.format, &v, || {
        if v.kind == "shared" {
            format!("{} hidden: {} is free again", v.network, v.ip)
        } else {
            format!(
                "{} hidden: its gateway {} on this host no longer lets routed machines in",
                v.network, v.ip
            )
        }
    });
    Ok(0)
}

#[derive(Args)]
pub struct LsArgs {
    /// Print short ids only, one per line
    #[arg(short, long)]
    quiet: bool,
    /// Only networks that match KEY=VALUE (repeatable; see below)
    #[arg(short, long, value_name = "KEY=VALUE")]
    filter: Vec<String>,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  weft network create red\n  weft network create --subnet 10.1.0.0/24 --internal back\n  \
weft network create -d macvlan -o parent=eth0 --subnet 198.51.100.0/24 --gateway 198.51.100.1 lan\n  \
weft network create -d overlay --subnet 10.0.2.0/24 ov   # one subnet shared by all hosts (Docker overlay, weave); needs --etcd-endpoints\n  \
weft network create -d overlay --subnet 10.40.0.0/16 --host-subnet-len 24 fl   # a /24 per host, routed (flannel)"
)]
pub struct CreateArgs {
    /// Driver: bridge, macvlan or overlay
    #[arg(short = 'd', long, default_value = "bridge")]
    driver: String,
    /// Subnet in CIDR form (default: a free one from 172.17.0.0/16-172.31.0.0/16, then 192.168.0.0/16 in /20s).
    /// For -d overlay: the one subnet every host's sandboxes share (a host
    /// address is masked, as Docker does), or with --host-subnet-len the
    /// range cut into a subnet per host
    #[arg(long)]
    subnet: Option<Ipv4Net>,
    /// -d overlay: give each host a subnet of this prefix length, routed
    /// between hosts (flannel's kind) instead of one shared subnet
    #[arg(long)]
    host_subnet_len: Option<u8>,
    /// -d overlay: how packets cross hosts: vxlan (the default: kernel VXLAN,
    /// UDP port 8472), host-gw (plain routes, all hosts on one L2 segment),
    /// udp or secure (those that this build has; an unavailable one is an
    /// error, never replaced by another)
    #[arg(long)]
    backend: Option<String>,
    /// -d overlay: take range, host subnet length and backend from a flannel
    /// network config, e.g. '{"Network":"10.40.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}'
    #[arg(long, value_name = "JSON")]
    from_flannel_config: Option<String>,
    /// Gateway address, the bridge's (default: the subnet's first address)
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// Hand out dynamic addresses from this part of the subnet only
    #[arg(long)]
    ip_range: Option<Ipv4Net>,
    /// MTU of the bridge and of every sandbox interface on it
    #[arg(long)]
    mtu: Option<u32>,
    /// No way out: no masquerade, no forwarding to or from other interfaces
    #[arg(long)]
    internal: bool,
    /// Driver option KEY=VALUE. bridge: bridge.name (or com.docker.network.bridge.name),
    /// mtu (or com.docker.network.driver.mtu). macvlan: parent=IFACE,
    /// macvlan_mode=bridge, host_access=ADDR (an address for the host on the LAN)
    #[arg(short = 'o', long = "opt", value_parser = key_value)]
    opts: Vec<(String, String)>,
    /// Label KEY=VALUE
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// Name of the network
    name: String,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn names<T>(items: &[T], name: impl Fn(&T) -> &str) -> String {
    items
        .iter()
        .map(|i| name(i).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn dispatch(ctx: &Context, cmd: NetworkCommand) -> Result<i32, Failure> {
    match cmd {
        NetworkCommand::Create(a) => {
            let backend_given = a.backend.is_some()
                || a.from_flannel_config
                    .as_deref()
                    .is_some_and(|c| c.contains("\"Backend\""));
            let spec = NetworkSpec {
                overlay: weft_model::overlay::OverlayRequest {
                    range: None,
                    host_subnet_len: a.host_subnet_len,
                    backend: a.backend,
                    flannel_config: a.from_flannel_config,
                },
                name: a.name,
                driver: Some(a.driver),
                subnet: a.subnet,
                gateway: a.gateway,
                ip_range: a.ip_range,
                mtu: a.mtu,
                internal: a.internal,
                options: a.opts.into_iter().collect(),
                labels: a.labels.into_iter().collect(),
            };
            let v: NetworkView = ctx.client.post("/v1/networks", &spec)?;
            if let (Some(o), false, crate::Format::Table) = (&v.overlay, backend_given, ctx.format)
            {
                // Say which backend was chosen: never a silent default.
                eprintln!(
                    "weft: no backend given; using {} (the default for -d overlay)",
                    o.backend
                );
            }
            emit(ctx.format, &v, || v.id.clone());
            Ok(0)
        }
        NetworkCommand::Rm { force, networks } => {
            let mut done: Vec<RemovedNetwork> = Vec::new();
            let mut code = 0;
            for n in &networks {
                match ctx
                    .client
                    .delete::<RemovedNetwork>(&format!("/v1/networks/{n}?force={force}"))
                {
                    Ok(r) => done.push(r),
                    Err(e) => {
                        eprintln!("weft: network rm {n}: {e}");
                        code = 1;
                    }
                }
            }
            emit(ctx.format, &done, || names(&done, |r| &r.name));
            Ok(code)
        }
        NetworkCommand::Prune => {
            let done: Vec<RemovedNetwork> = ctx.client.post_empty("/v1/networks/prune")?;
            emit(ctx.format, &done, || names(&done, |r| &r.name));
            Ok(0)
        }
        NetworkCommand::Connect {
            ip,
            aliases,
            network,
            sandbox,
        } => {
            let v: SandboxView = ctx.client.post(
                &format!("/v1/networks/{network}/connect"),
                &Connect {
                    sandbox,
                    ip,
                    aliases,
                },
            )?;
            emit(ctx.format, &v, String::new);
            Ok(0)
        }
        NetworkCommand::Disconnect { network, sandbox } => {
            // Ports published on the network go with it: say which.
            let before: Option<SandboxView> =
                ctx.client.get(&format!("/v1/sandboxes/{sandbox}")).ok();
            let v: SandboxView = ctx.client.post(
                &format!("/v1/networks/{network}/disconnect"),
                &Disconnect { sandbox },
            )?;
            let gone: Vec<String> = before
                .iter()
                .flat_map(|b| b.ports.iter())
                .filter(|p| !v.ports.contains(p))
                .map(|p| p.mapping.to_string())
                .collect();
            if !gone.is_empty() {
                eprintln!(
                    "weft: sandbox {} no longer publishes -p {} (published on network {network})",
                    v.name,
                    gone.join(", -p ")
                );
            }
            emit(ctx.format, &v, String::new);
            Ok(0)
        }
        NetworkCommand::Ls(a) => {
            let filters = crate::filter::Filters::parse(&a.filter, &["name", "id", "driver"])
                .map_err(|m| Failure {
                    code: 2,
                    message: m,
                })?;
            let mut list: Vec<NetworkView> = ctx.client.get("/v1/networks")?;
            list.retain(|n| {
                filters.matches(
                    |k| match k {
                        "name" => vec![n.name.clone()],
                        "id" => vec![n.id.clone()],
                        _ => vec![n.driver.clone()],
                    },
                    |k| k == "driver",
                )
            });
            if a.quiet {
                let ids: Vec<String> = list.iter().map(|n| n.id[..12].to_string()).collect();
                emit(ctx.format, &ids, || ids.join("\n"));
                return Ok(0);
            }
            emit(ctx.format, &list, || {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.id[..12].to_string(),
                            n.driver.clone(),
                            kind_of(n).to_string(),
                            n.subnet.to_string(),
                            n.gateway.to_string(),
                            n.parent
                                .clone()
                                .map(|p| format!("(parent {p})"))
                                .unwrap_or_else(|| n.bridge.clone()),
                            if n.internal { "yes" } else { "no" }.to_string(),
                            n.endpoints.len().to_string(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME",
                        "ID",
                        "DRIVER",
                        "SCOPE",
                        "SUBNET",
                        "GATEWAY",
                        "BRIDGE",
                        "INTERNAL",
                        "ENDPOINTS",
                    ],
                    &rows,
                )
            });
            Ok(0)
        }
        NetworkCommand::Inspect { networks } => {
            let mut views = Vec::new();
            for n in &networks {
                views.push(
                    ctx.client
                        .get::<NetworkView>(&format!("/v1/networks/{n}"))?,
                );
            }
            emit(ctx.format, &views, || {
                views
                    .iter()
                    .map(|n| {
                        let rows: Vec<Vec<String>> = n
                            .endpoints
                            .iter()
                            .map(|e| {
                                vec![
                                    e.sandbox.clone(),
                                    e.sandbox_id[..12].to_string(),
                                    e.ifname.clone(),
                                    e.ip.to_string(),
                                    e.host_ifname.clone(),
                                    e.aliases.join(","),
                                ]
                            })
                            .collect();
                        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                        let kv = |m: &std::collections::BTreeMap<String, String>| {
                            m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
                        };
                        let overlay = n.overlay.as_ref().map_or(String::new(), |o| {
                            let cut = if o.is_shared() {
                                format!("IPAM blocks /{}", o.host_subnet_len)
                            } else {
                                format!("host subnets /{}", o.host_subnet_len)
                            };
                            format!(
                                "overlay:   {} ({}; {cut}), backend {}, vni {}, port {}\n",
                                o.range,
                                o.kind.describe(),
                                o.backend,
                                o.vni,
                                o.port
                            )
                        });
                        let blocks = if n.blocks.is_empty() {
                            String::new()
                        } else {
                            let rows: Vec<Vec<String>> = n
                                .blocks
                                .iter()
                                .map(|b| {
                                    vec![
                                        b.node.clone(),
                                        b.block.to_string(),
                                        format!("{}/{}", b.used, b.capacity),
                                    ]
                                })
                                .collect();
                            format!("\nblocks:\n{}", indent(&table(&["HOST", "BLOCK", "USED"], &rows)))
                        };
                        let subranges = if n.subranges.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "\nisolated sub-ranges (--net {}:subnet=CIDR): {}",
                                n.name,
                                n.subranges
                                    .iter()
                                    .map(|s| s.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        };
                        let exposed = if n.exposed.is_empty() {
                            String::new()
                        } else {
                            let rows: Vec<Vec<String>> = n
                                .exposed
                                .iter()
                                .map(|e| vec![e.node.clone(), e.ip.to_string()])
                                .collect();
                            format!("\nexposed on:\n{}", indent(&table(&["HOST", "ADDRESS"], &rows)))
                        };
                        format!(
                            "name:      {}\nid:        {}\ndriver:    {}\n{overlay}subnet:    {}\ngateway:   {}\nip range:  {}\nbridge:    {}\nmtu:       {}\ninternal:  {}\noptions:   {}\nlabels:    {}\nendpoints:\n{}",
                            n.name,
                            n.id,
                            n.driver,
                            n.subnet,
                            n.gateway,
                            opt(n.ip_range.map(|r| r.to_string())),
                            n.bridge,
                            opt(n.mtu.map(|m| m.to_string())),
                            n.internal,
                            kv(&n.options),
                            kv(&n.labels),
                            indent(&table(&["SANDBOX", "ID", "IFACE", "ADDRESS", "HOST VETH", "ALIASES"], &rows))
                        ) + &blocks
                            + &subranges
                            + &exposed
                    })
                    .collect::<Vec<_>>()
                    .join("\n\n")
            });
            Ok(0)
        }
    }
}

/// Where a network lives: on this host, or across hosts (and which kind).
fn kind_of(n: &NetworkView) -> &'static str {
    match &n.overlay {
        None => "local",
        Some(o) if o.is_shared() => "global (shared subnet)",
        Some(_) => "global (subnet per host)",
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
