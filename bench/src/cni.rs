//! The CNI reference plugins `bridge` + `host-local`, executed directly the
//! way a container runtime does, from inside a host namespace of their own.

use crate::harness::{Harness, Sample};
use crate::netns::{self, Netns};
use crate::sys::{self, bail, failed, remove_tree, require_exe, timed, Context, Result};
use std::path::{Path, PathBuf};

pub struct CniOpts {
    /// Directory of the plugin binaries (CNI_PATH).
    pub dir: PathBuf,
    pub subnet: String,
}

pub const BRIDGE: &str = "wftbcni0";

/// Checks that the plugins are there, before anything is set up.
pub fn preflight(opts: &CniOpts) -> Result<()> {
    let hint = "install Debian's containernetworking-plugins or pass --cni-dir (or --skip-cni)";
    require_exe(&opts.dir.join("bridge"), hint)?;
    require_exe(&opts.dir.join("host-local"), hint)
}

pub struct CniHarness {
    plugin: PathBuf,
    cni_path: PathBuf,
    config: Vec<u8>,
    dir: PathBuf,
    pid: u32,
    seq: usize,
    host: Option<Netns>,
}

/// One sandbox: its namespace, deleted (unmeasured) when the handle drops.
pub struct CniSandbox {
    id: String,
    ns: Netns,
}

impl CniHarness {
    /// `dir` is this harness's own directory (made fresh, removed on drop).
    pub fn start(opts: &CniOpts, dir: &Path, pid: u32) -> Result<CniHarness> {
        sys::create_fresh_dir(dir)?;
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "wftbench",
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": "host-local",
                "subnet": opts.subnet,
                "dataDir": dir.join("ipam"),
            }
        });
        let mut h = CniHarness {
            plugin: opts.dir.join("bridge"),
            cni_path: opts.dir.clone(),
            config: serde_json::to_vec(&config).expect("static JSON"),
            dir: dir.to_path_buf(),
            pid,
            seq: 0,
            host: None,
        };
        h.host = Some(netns::add(&format!("wftbcnihost-{pid}"))?);
        Ok(h)
    }

    fn plugin_command(&self, command: &str, sb: &CniSandbox) -> Result<std::process::Command> {
        let host = self
            .host
            .as_ref()
            .expect("host namespace exists while running");
        let mut cmd = host.entered(&self.plugin)?;
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sb.id)
            .env("CNI_NETNS", sb.ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path);
        Ok(cmd)
    }

    fn exec(&self, command: &str, sb: &CniSandbox) -> Result<Sample> {
        let mut cmd = self.plugin_command(command, sb)?;
        let (wall, out) = timed(&mut cmd, Some(&self.config), &self.dir)?;
        if !out.status.success() {
            return Err(failed(&cmd, &out)).context(format_args!("CNI {command}"));
        }
        if command == "ADD" {
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context(format_args!(
                    "CNI ADD printed no JSON result: {}",
                    String::from_utf8_lossy(&out.stdout)
                ))?;
            if v["ips"].as_array().is_none_or(|a| a.is_empty()) {
                return bail(format!("CNI ADD result has no IP address: {v}"));
            }
        }
        Ok(Sample {
            wall,
            inner_us: None,
        })
    }
}

impl Harness for CniHarness {
    type Handle = CniSandbox;

    fn attach(&mut self) -> Result<(CniSandbox, Sample)> {
        let id = format!("wftbcni-{}-{}", self.pid, self.seq);
        self.seq += 1;
        // Not measured: a runtime makes the namespace before calling CNI.
        let sb = CniSandbox {
            ns: netns::add(&id)?,
            id,
        };
        let s = self.exec("ADD", &sb)?;
        Ok((sb, s))
    }

    fn remove(&mut self, mut sb: CniSandbox) -> Result<Sample> {
        let s = self.exec("DEL", &sb)?;
        // Not measured either: the runtime's own namespace cleanup.
        sb.ns.delete()?;
        Ok(s)
    }
}

impl Drop for CniHarness {
    fn drop(&mut self) {
        // Deleting the host namespace takes the bridge and the masquerade
        // rules with it; sandbox namespaces went with their handles.
        if let Some(mut host) = self.host.take() {
            if let Err(e) = host.delete() {
                eprintln!("warning: {e}");
            }
        }
        remove_tree(&self.dir);
    }
}
