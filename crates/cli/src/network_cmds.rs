//! weft network ls / inspect.

use crate::output::{emit, table};
use crate::sandbox_cmds::Context;
use crate::Failure;
use clap::Subcommand;
use weft_model::api::NetworkView;

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// List networks
    #[command(alias = "list")]
    Ls,
    /// Show networks in detail, with their endpoints
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

pub fn dispatch(ctx: &Context, cmd: NetworkCommand) -> Result<i32, Failure> {
    match cmd {
        NetworkCommand::Ls => {
            let list: Vec<NetworkView> = ctx.client.get("/v1/networks")?;
            emit(ctx.format, &list, || {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.id[..12].to_string(),
                            n.driver.clone(),
                            n.subnet.to_string(),
                            n.gateway.to_string(),
                            n.bridge.clone(),
                            n.endpoints.len().to_string(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME",
                        "ID",
                        "DRIVER",
                        "SUBNET",
                        "GATEWAY",
                        "BRIDGE",
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
                            .map(|e| vec![e.sandbox.clone(), e.sandbox_id[..12].to_string(), e.ip.to_string(), e.host_ifname.clone()])
                            .collect();
                        format!(
                            "name:     {}\nid:       {}\ndriver:   {}\nsubnet:   {}\ngateway:  {}\nbridge:   {}\nendpoints:\n{}",
                            n.name,
                            n.id,
                            n.driver,
                            n.subnet,
                            n.gateway,
                            n.bridge,
                            indent(&table(&["SANDBOX", "ID", "ADDRESS", "HOST VETH"], &rows))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n\n")
            });
            Ok(0)
        }
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
