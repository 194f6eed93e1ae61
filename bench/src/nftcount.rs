//! Counting what is in weft's nftables table (`table inet weft`) inside the
//! agent's namespace: its rules, and the elements of its sets and maps.

use crate::netns::Netns;
use crate::sys::{bail, run_ok, Context, Result};
use serde_json::Value;
use std::time::Duration;

const NFT_TIMEOUT: Duration = Duration::from_secs(60);

/// The rules in the text of `nft list table …`: the statement lines inside
/// `chain … { }` blocks, not counting a base chain's `type … hook …`
/// declaration, chain comments, or anything in sets and maps.
pub fn count_rules(text: &str) -> usize {
    let mut in_chain = false;
    let mut rules = 0;
    for line in text.lines() {
        let l = line.trim();
        if !in_chain {
            if l.starts_with("chain ") && l.ends_with('{') {
                in_chain = true;
            }
            continue;
        }
        if l == "}" {
            in_chain = false;
        } else if l.is_empty()
            || (l.starts_with("type ") && l.contains(" hook "))
            || l.starts_with("comment ")
            || l.starts_with("policy ")
        {
            continue;
        } else {
            rules += 1;
        }
    }
    rules
}

/// The number of `"rule"` objects in `nft -j list table …` output.
pub fn count_rules_json(json: &[u8]) -> Result<usize> {
    let v: Value = serde_json::from_slice(json).context("nft -j printed no JSON")?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .context("nft -j output has no \"nftables\" array")?;
    Ok(items.iter().filter(|i| i.get("rule").is_some()).count())
}

/// The number of elements of set or map `name` in `nft -j list map|set …`
/// output (0 when it has none).
pub fn count_elements_json(json: &[u8], name: &str) -> Result<usize> {
    let v: Value = serde_json::from_slice(json).context("nft -j printed no JSON")?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .context("nft -j output has no \"nftables\" array")?;
    for i in items {
        for kind in ["map", "set"] {
            if let Some(obj) = i.get(kind) {
                if obj.get("name").and_then(Value::as_str) == Some(name) {
                    return Ok(obj
                        .get("elem")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len));
                }
            }
        }
    }
    bail(format!("nft -j output has no set or map {name:?}"))
}

/// weft's maps of published ports (single ports in hash maps, ranges in interval maps).
pub const PORT_MAPS: [&str; 4] = ["port_addr", "port_any", "range_addr", "range_any"];

/// What weft's table holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TableCount {
    /// Rules counted in the text of `nft list table inet weft`.
    pub rules: usize,
    /// Rule objects in `nft -j list table inet weft` (the same, as a check).
    pub rules_json: usize,
    /// Elements of weft's published-port maps.
    pub publish_elements: usize,
}

fn nft(ns: &Netns, args: &[&str]) -> Result<Vec<u8>> {
    let mut cmd = ns.entered("nft")?;
    cmd.args(args);
    let out = run_ok(&mut cmd, NFT_TIMEOUT)
        .context(format_args!("listing weft's nft table in {}", ns.name()))?;
    Ok(out.stdout)
}

/// Counts rules and published-port elements of `table inet weft` in `ns`.
pub fn weft_table(ns: &Netns) -> Result<TableCount> {
    let text = nft(ns, &["list", "table", "inet", "weft"])?;
    let json = nft(ns, &["-j", "list", "table", "inet", "weft"])?;
    let mut publish_elements = 0;
    for map in PORT_MAPS {
        publish_elements += count_elements_json(&json, map)?;
    }
    Ok(TableCount {
        rules: count_rules(&String::from_utf8_lossy(&text)),
        rules_json: count_rules_json(&json)?,
        publish_elements,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "table inet weft {
	set bridges {
		type ifname
		elements = { \"weft0\" }
	}

	map publish_port {
		type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
		flags interval
		elements = { 0.0.0.0/0 . tcp . 20000 : 10.211.0.2 . 80,
			     0.0.0.0/0 . tcp . 20001 : 10.211.0.2 . 80 }
	}

	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local jump publish
	}

	chain publish {
		meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @publish_addr
		meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @publish_port
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		comment \"weft\"
		iifname . oifname @same_bridge accept
	}
}
";

    #[test]
    fn counts_rules_not_elements() {
        assert_eq!(count_rules(TABLE), 4);
        assert_eq!(count_rules(""), 0);
    }

    #[test]
    fn counts_json() {
        let j = br#"{"nftables":[{"metainfo":{}},{"table":{"name":"weft"}},
            {"chain":{"name":"publish"}},
            {"map":{"name":"publish_port","elem":[1,2,3]}},
            {"map":{"name":"publish_addr"}},
            {"rule":{"chain":"publish"}},{"rule":{"chain":"publish"}}]}"#;
        assert_eq!(count_rules_json(j).unwrap(), 2);
        assert_eq!(count_elements_json(j, "publish_port").unwrap(), 3);
        assert_eq!(count_elements_json(j, "publish_addr").unwrap(), 0);
        assert!(count_elements_json(j, "nope").is_err());
    }
}
