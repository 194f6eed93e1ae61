//! `weft`: container networking for Linux. One binary: the agent
//! (`weft agent`) and the client commands that talk to it.

mod client;
mod cni;
mod explain_cmd;
mod filter;
mod lab;
mod log_format;
mod network_cmds;
mod output;
mod sandbox_cmds;
mod spawn;
mod status_cmd;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Container networking for Linux: sandboxes with their own network stack, bridged, routed and masqueraded",
    long_about = "Container networking for Linux.\n\n\
        Start the agent once per host (`weft agent`), then run commands in sandboxes that have \
        their own network namespace: `weft run --name web -d -- CMD`. Every command needs root."
)]
struct Cli {
    /// State directory of the agent to use; its API socket is STATE_DIR/weft.sock
    #[arg(
        long,
        global = true,
        env = "WEFT_STATE_DIR",
        default_value = "/run/weft"
    )]
    state_dir: PathBuf,
    /// Output format: a readable table, or JSON for scripts (dot, svg and
    /// png: pictures, for `weft explain`)
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    /// Graphviz DOT (weft explain)
    Dot,
    /// SVG, rendered by Graphviz's `dot` (weft explain)
    Svg,
    /// PNG, rendered by Graphviz's `dot` (weft explain)
    Png,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-host agent (daemon) in the foreground
    Agent(AgentArgs),
    /// Run a command in a new sandbox
    Run(sandbox_cmds::RunArgs),
    /// List sandboxes, newest first (-a: exited ones too)
    Ps(sandbox_cmds::PsArgs),
    /// Print what a detached sandbox's command wrote (-f: keep following)
    Logs(sandbox_cmds::LogsArgs),
    /// Every detail of sandboxes, as JSON (like `docker inspect`)
    Inspect(sandbox_cmds::InspectArgs),
    /// The version of this client and of the agent it talks to
    #[command(
        after_help = "Example:\n  weft version   # exits 1 when the agent cannot be reached"
    )]
    Version,
    /// Internal: the waiter of a `run -d` command (waits for PID, writes its
    /// exit code to FILE)
    #[command(hide = true)]
    ReapChild {
        /// The command's pid (a child of this process)
        pid: i32,
        /// Where its exit code goes
        exit_file: PathBuf,
    },
    /// Run another command inside a running sandbox
    Exec(sandbox_cmds::ExecArgs),
    /// Stop sandboxes' processes (SIGTERM, then SIGKILL); the sandbox stays until rm
    Stop(sandbox_cmds::StopArgs),
    /// Remove sandboxes and their network endpoints
    Rm(sandbox_cmds::RmArgs),
    /// Act as a CNI plugin (what runtimes do by running `weft` with CNI_COMMAND set)
    #[command(
        after_help = "Example, a network config for Podman or containerd (/etc/cni/net.d/10-weft.conflist):\n  \
{\"cniVersion\":\"1.0.0\",\"name\":\"red\",\"plugins\":[{\"type\":\"weft\",\"network\":\"red\"},{\"type\":\"portmap\",\"capabilities\":{\"portMappings\":true}}]}\n\
with the weft binary (or a link to it) in the runtime's CNI plugin path."
    )]
    Cni,
    /// List a sandbox's published ports
    #[command(after_help = "Example:\n  weft port web   # 80/tcp -> 0.0.0.0:8080 (172.17.0.2:80)")]
    Port {
        /// Sandbox name or id
        sandbox: String,
    },
    /// Create, list, inspect and remove networks; connect and disconnect sandboxes
    #[command(subcommand)]
    Network(network_cmds::NetworkCommand),
    /// Give this host an address on a network: it then reaches the network's
    /// sandboxes on every host by their own addresses (they see that address
    /// as the source), and machines that route the network's subnet via this
    /// host reach them too (weave's `expose`)
    #[command(after_help = "Examples:\n  \
weft expose weave                   # weave's `weave expose`: an address from the network's pool\n  \
weft expose weave --ip 10.32.0.6    # this address (inside the subnet, free on every host)\n  \
ip route add 10.32.0.0/12 via HOST  # then, on a machine without weft: through this host\n\n\
A network with one subnet across hosts gets an address of its own on this host (on a small\n\
veth pair `wex-ID` beside its bridge); a network with a subnet per host uses this host's\n\
gateway on it; a local bridge network is exposed by default (the host has its gateway).\n\
`weft hide NET` takes it back. It survives an agent restart.")]
    Expose(network_cmds::ExposeArgs),
    /// Take back what `weft expose` gave this host on a network (its
    /// address returns to the pool)
    #[command(after_help = "Example:\n  weft hide weave   # weave's `weave hide`")]
    Hide {
        /// Network name
        network: String,
    },
    /// The agent's view: networks, sandboxes, and in a cluster the etcd
    /// health, this host's leases, its peers and what is programmed for each
    #[command(after_help = "Examples:\n  weft status\n  weft --format json status")]
    Status,
    /// Leave the cluster now: revoke this host's leases so every other host
    /// removes its routes at once (then stop the agent)
    #[command(
        after_help = "Example:\n  weft leave && systemctl stop weft   # or stop `weft agent` however it runs"
    )]
    Leave,
    /// The path of a packet, hop by hop, from the live kernel: routes,
    /// neighbours, bridge ports, VXLAN FDB, weft's nft verdicts; and where
    /// it ends (delivered, or dropped at which hop and why)
    #[command(after_help = "Examples:\n  \
weft explain a b                          # sandbox a to sandbox b (names, ids or addresses)\n  \
weft explain a 10.40.7.2                  # to a sandbox on another host of the cluster\n  \
weft explain a 203.0.113.9                # egress: routed and masqueraded\n  \
weft explain host b                       # the host to a sandbox\n  \
weft explain 198.51.100.9 host --proto tcp --port 8080   # a published port from outside\n  \
weft explain a b --format dot | dot -Tpng > path.png     # or --format svg / png (Debian's graphviz)")]
    Explain(explain_cmd::ExplainArgs),
    /// This host's network as a picture: bridges, the sandboxes on them,
    /// tunnel devices and their peers (text, json, or --format dot|svg|png)
    #[command(
        after_help = "Examples:\n  weft topology\n  weft --format png topology --path a b > host.png   # with the path of `weft explain a b`\n  weft lab picture --format png > lab.png            # every host of a lab"
    )]
    Topology(explain_cmd::TopologyArgs),
    /// Several simulated hosts on this machine, with etcd and an agent each
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Remove everything weft made on this host (sandboxes and their
    /// processes, networks' bridges and devices, weft's routes, the nft
    /// table, namespace files and their mount, weft's files), with the agent
    /// stopped
    #[command(
        after_help = "Examples:\n  weft reset -f\n  weft reset -f --keep-data   # keep network definitions for the next agent\n\nRefused while an agent runs with this state dir. In a cluster, this host's leases expire after their TTL (use `weft leave` first to drop them at once)."
    )]
    Reset(ResetArgs),
}

#[derive(Args)]
struct ResetArgs {
    /// Do it: without -f, reset only says what it would need
    #[arg(short, long)]
    force: bool,
    /// Keep the data dir (network definitions, cluster identity), so the next
    /// agent makes the same networks again
    #[arg(long)]
    keep_data: bool,
    /// The agent's data dir
    #[arg(long, env = "WEFT_DATA_DIR", default_value = "/var/lib/weft")]
    data_dir: PathBuf,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  weft agent                                   # one host\n  \
weft agent --etcd-endpoints http://10.0.0.1:2379 --iface eth0   # a cluster\n  \
weft agent --docker-plugin                    # also Docker's network driver `weft`"
)]
struct AgentArgs {
    /// Persistent data (the network store)
    #[arg(long, env = "WEFT_DATA_DIR", default_value = "/var/lib/weft")]
    data_dir: PathBuf,
    /// Subnet of the default `bridge` network (default: a free /16 from 172.17.0.0-172.31.0.0, then 192.168.0.0/16 in /20s)
    #[arg(long)]
    bridge_subnet: Option<ipnet::Ipv4Net>,
    /// Namespaces, each with a veth pair, kept ready so that an attach only
    /// renames, addresses and routes (0 turns the pool off)
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(0..=1024))]
    netns_pool: u16,
    /// Where the host's upstream name servers and search domains are (reread when it changes)
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Join a cluster: etcd URLs (comma-separated), e.g. http://10.0.0.1:2379.
    /// Without them the agent is single-host and overlay networks are refused
    #[arg(long, value_delimiter = ',', env = "WEFT_ETCD_ENDPOINTS")]
    etcd_endpoints: Vec<String>,
    /// Prefix of every key weft keeps in etcd
    #[arg(long, default_value = "/weft")]
    etcd_prefix: String,
    #[command(flatten)]
    etcd_security: EtcdSecurityArgs,
    /// This host's address that other hosts reach it on (default: from --iface,
    /// else the interface of the default route)
    #[arg(long)]
    public_ip: Option<std::net::Ipv4Addr>,
    /// The interface whose first address is this host's public address
    #[arg(long, conflicts_with = "public_ip")]
    iface: Option<String>,
    /// This host's name in the cluster (default: the hostname)
    #[arg(long)]
    node_name: Option<String>,
    /// Seconds before this host's subnet leases expire if the agent stops
    /// renewing them (it renews every third of it)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(2..=86400))]
    lease_ttl: u64,
    /// Be Docker's network and IPAM driver `weft` (`docker network create -d weft`),
    /// on /run/docker/plugins/weft.sock
    #[arg(long)]
    docker_plugin: bool,
    /// Serve the Docker plugin on this socket instead (implies --docker-plugin);
    /// Docker names the driver after the file, without .sock
    #[arg(long, value_name = "PATH")]
    docker_plugin_socket: Option<PathBuf>,
    /// dockerd's API, a unix socket only (with --docker-plugin): in a cluster
    /// every global network on this host becomes a Docker network there,
    /// and each container's name becomes a name in weft's resolver
    #[arg(long, value_name = "unix:///PATH", default_value = weft_agent::config::DOCKER_HOST,
          value_parser = weft_agent::config::parse_docker_host)]
    docker_host: PathBuf,
    /// Serve Prometheus metrics (read-only, GET /metrics; nothing else is
    /// served there) on ADDRESS:PORT, e.g. 127.0.0.1:9178, or on unix:PATH.
    /// Off by default
    #[arg(long, value_name = "ADDRESS:PORT|unix:PATH")]
    metrics_listen: Option<weft_agent::MetricsListen>,
    /// How log lines look on stderr: text, or json for log collectors
    #[arg(long, value_enum, default_value_t = log_format::LogFormat::Text)]
    log_format: log_format::LogFormat,
}

/// TLS and authentication with etcd (flannel's flag names).
#[derive(clap::Args)]
struct EtcdSecurityArgs {
    /// CA certificate (PEM) that signed etcd's server certificate; needed
    /// with https:// endpoints
    #[arg(long, value_name = "FILE", env = "WEFT_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// This host's client certificate (PEM), for etcd's --client-cert-auth
    #[arg(
        long,
        value_name = "FILE",
        env = "WEFT_ETCD_CERTFILE",
        requires = "etcd_keyfile"
    )]
    etcd_certfile: Option<PathBuf>,
    /// The private key (PEM) of --etcd-certfile
    #[arg(
        long,
        value_name = "FILE",
        env = "WEFT_ETCD_KEYFILE",
        requires = "etcd_certfile"
    )]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user to authenticate as (etcd's `auth enable`)
    #[arg(long, env = "WEFT_ETCD_USERNAME", requires = "etcd_password_file")]
    etcd_username: Option<String>,
    /// File whose content is the password of --etcd-username
    #[arg(
        long,
        value_name = "FILE",
        env = "WEFT_ETCD_PASSWORD_FILE",
        requires = "etcd_username"
    )]
    etcd_password_file: Option<PathBuf>,
}

impl From<EtcdSecurityArgs> for weft_agent::EtcdSecurity {
    fn from(a: EtcdSecurityArgs) -> Self {
        weft_agent::EtcdSecurity {
            ca_file: a.etcd_cafile,
            cert_file: a.etcd_certfile,
            key_file: a.etcd_keyfile,
            username: a.etcd_username,
            password_file: a.etcd_password_file,
        }
    }
}

/// An error of weft itself, with the exit code to leave with.
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn main() {
    // Run by a container runtime as a CNI plugin: CNI_COMMAND set, no arguments.
    if std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1 {
        std::process::exit(cni::run());
    }
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("weft: {}", f.message);
            f.code
        }
    };
    std::process::exit(code);
}

fn dispatch(cli: Cli) -> Result<i32, Failure> {
    // SAFETY: geteuid takes nothing, touches no memory and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure {
            code: 1,
            message: "weft needs root: the agent's socket is root-only and sandboxes are network namespaces; run it with sudo".into(),
        });
    }
    let client = client::Client::new(cli.state_dir.join("weft.sock"));
    let ctx = sandbox_cmds::Context {
        client,
        format: cli.format,
        state_dir: cli.state_dir.clone(),
    };
    match cli.command {
        Command::Agent(a) => run_agent(cli.state_dir, a),
        Command::ReapChild { pid, exit_file } => Ok(spawn::reap_child(pid, &exit_file)),
        Command::Run(a) => sandbox_cmds::run(&ctx, a),
        Command::Ps(a) => sandbox_cmds::ps(&ctx, a),
        Command::Exec(a) => sandbox_cmds::exec(&ctx, a),
        Command::Logs(a) => sandbox_cmds::logs(&ctx, a),
        Command::Inspect(a) => sandbox_cmds::inspect(&ctx, a),
        Command::Version => status_cmd::version(&ctx),
        Command::Stop(a) => sandbox_cmds::stop(&ctx, a),
        Command::Rm(a) => sandbox_cmds::rm(&ctx, a),
        Command::Cni => Ok(cni::run()),
        Command::Port { sandbox } => sandbox_cmds::port(&ctx, &sandbox),
        Command::Network(n) => network_cmds::dispatch(&ctx, n),
        Command::Expose(a) => network_cmds::expose(&ctx, a),
        Command::Hide { network } => network_cmds::hide(&ctx, &network),
        Command::Status => status_cmd::status(&ctx),
        Command::Explain(a) => explain_cmd::explain(&ctx, a),
        Command::Topology(a) => explain_cmd::topology(&ctx, a),
        Command::Leave => {
            let () = ctx.client.post_empty("/v1/cluster/leave")?;
            eprintln!("weft: left the cluster; stop the agent now");
            Ok(0)
        }
        Command::Lab(l) => lab::dispatch(cli.format, l),
        Command::Reset(r) => reset(cli.state_dir, cli.format, r),
    }
}

fn reset(state_dir: PathBuf, format: Format, r: ResetArgs) -> Result<i32, Failure> {
    if !r.force {
        return Err(Failure {
            code: 2,
            message: format!(
                "reset removes every sandbox, network and file weft has on this host (state dir {}, data dir {}); run `weft reset -f` to do it",
                state_dir.display(),
                r.data_dir.display()
            ),
        });
    }
    let cfg = weft_agent::AgentConfig {
        state_dir,
        data_dir: r.data_dir,
        // Only the two directories matter to a reset.
        bridge_subnet: None,
        netns_pool: 0,
        resolv_conf: PathBuf::from("/etc/resolv.conf"),
        cluster: None,
        docker_plugin: None,
        docker_host: PathBuf::new(),
        metrics_listen: None,
    };
    let report = weft_agent::reset::reset(&cfg, r.keep_data)?;
    output::emit(format, &report, || {
        let mut lines: Vec<String> = report
            .removed
            .iter()
            .map(|w| format!("removed {w}"))
            .collect();
        lines.extend(report.failed.iter().map(|w| format!("failed: {w}")));
        if lines.is_empty() {
            lines.push("nothing of weft's was left on this host".into());
        }
        lines.join("\n")
    });
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

fn run_agent(state_dir: PathBuf, a: AgentArgs) -> Result<i32, Failure> {
    log_format::init(a.log_format);
    let cfg = weft_agent::AgentConfig {
        state_dir,
        data_dir: a.data_dir,
        bridge_subnet: a.bridge_subnet,
        netns_pool: a.netns_pool.into(),
        resolv_conf: a.resolv_conf,
        cluster: (!a.etcd_endpoints.is_empty()).then(|| weft_agent::ClusterConfig {
            etcd_endpoints: a.etcd_endpoints,
            etcd_prefix: a.etcd_prefix,
            etcd_security: a.etcd_security.into(),
            public_ip: a.public_ip,
            iface: a.iface,
            node_name: a.node_name.unwrap_or_else(hostname),
            lease_ttl: std::time::Duration::from_secs(a.lease_ttl),
        }),
        docker_plugin: a.docker_plugin_socket.or_else(|| {
            a.docker_plugin
                .then(|| PathBuf::from(weft_agent::config::DOCKER_PLUGIN_SOCKET))
        }),
        docker_host: a.docker_host,
        metrics_listen: a.metrics_listen,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(weft_agent::serve(cfg))?;
    Ok(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
