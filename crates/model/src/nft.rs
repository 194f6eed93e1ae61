//! weft's nftables table, rendered from desired state as one `nft -f` batch.
//!
//! The table is owned by name: weft only ever creates, replaces or deletes
//! `table inet weft` and never touches another table. Membership lives in
//! sets, so adding a network adds elements, not rules.

use ipnet::Ipv4Net;

pub const TABLE_FAMILY: &str = "inet";
pub const TABLE_NAME: &str = "weft";

/// What the table must express.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallSpec {
    /// Subnets whose outbound traffic is masqueraded.
    pub masquerade: Vec<Ipv4Net>,
    /// weft's bridges: traffic to them is not masqueraded.
    pub bridges: Vec<String>,
}

fn elements<T: std::fmt::Display>(items: &[T], quote: bool) -> String {
    if items.is_empty() {
        return String::new();
    }
    let list: Vec<String> = items
        .iter()
        .map(|i| {
            if quote {
                format!("\"{i}\"")
            } else {
                i.to_string()
            }
        })
        .collect();
    format!(" elements = {{ {} }};", list.join(", "))
}

/// The whole table. The batch first makes sure the table exists, then deletes
/// and recreates it, so it applies atomically whatever was there before.
pub fn render(spec: &FirewallSpec) -> String {
    format!(
        "add table {f} {t}\n\
         delete table {f} {t}\n\
         table {f} {t} {{\n\
         \tset masq_src {{ type ipv4_addr; flags interval;{masq} }}\n\
         \tset bridges {{ type ifname;{br} }}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr @masq_src oifname != @bridges masquerade\n\
         \t}}\n\
         }}\n",
        f = TABLE_FAMILY,
        t = TABLE_NAME,
        masq = elements(&spec.masquerade, false),
        br = elements(&spec.bridges, true),
    )
}

/// Removes the table, tolerating its absence.
pub fn render_delete() -> String {
    format!("add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_elements_not_rules() {
        let one = render(&FirewallSpec {
            masquerade: vec!["10.88.0.0/16".parse().unwrap()],
            bridges: vec!["weft0".into()],
        });
        assert!(one.contains("elements = { 10.88.0.0/16 }"), "{one}");
        assert!(one.contains("elements = { \"weft0\" }"), "{one}");
        let two = render(&FirewallSpec {
            masquerade: vec![
                "10.88.0.0/16".parse().unwrap(),
                "10.89.0.0/16".parse().unwrap(),
            ],
            bridges: vec!["weft0".into(), "weft1".into()],
        });
        assert_eq!(
            one.lines().count(),
            two.lines().count(),
            "rule count does not grow"
        );
    }

    #[test]
    fn empty_sets_have_no_elements_clause() {
        let t = render(&FirewallSpec::default());
        assert!(!t.contains("elements"), "{t}");
        assert!(t.starts_with("add table inet weft\ndelete table inet weft\n"));
    }
}
