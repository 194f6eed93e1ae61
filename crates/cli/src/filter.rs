//! `--filter KEY=VALUE` of `ps` and `network ls`, as Docker's: filters of
//! one key match when any of their values does; different keys must all
//! match. Pure logic, so it is unit-tested without an agent.

use std::collections::BTreeMap;

/// Parsed `--filter` values, by key.
#[derive(Debug, Default)]
pub struct Filters(BTreeMap<String, Vec<String>>);

impl Filters {
    /// Parses `KEY=VALUE` values; `keys` are the ones the command knows.
    pub fn parse(values: &[String], keys: &[&str]) -> Result<Filters, String> {
        let mut f = Filters::default();
        for v in values {
            let Some((k, val)) = v.split_once('=') else {
                return Err(format!(
                    "--filter {v:?}: expected KEY=VALUE, with KEY one of {}",
                    keys.join(", ")
                ));
            };
            if !keys.contains(&k) {
                return Err(format!(
                    "--filter {v:?}: unknown key {k:?}; use one of {}",
                    keys.join(", ")
                ));
            }
            f.0.entry(k.to_string()).or_default().push(val.to_string());
        }
        Ok(f)
    }

    /// Whether an item matches: `values(key)` gives the item's values for a
    /// key, `exact(key)` whether that key compares whole values (otherwise a
    /// substring matches, as Docker's `name` filter does).
    pub fn matches(
        &self,
        values: impl Fn(&str) -> Vec<String>,
        exact: impl Fn(&str) -> bool,
    ) -> bool {
        self.0.iter().all(|(k, wanted)| {
            let have = values(k);
            wanted.iter().any(|w| {
                have.iter().any(|h| {
                    if exact(k) {
                        h == w
                    } else {
                        h.contains(w.as_str())
                    }
                })
            })
        })
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

/// `s` as a shell would need it typed: as is when plain, else in single quotes.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// "5 seconds ago", "3 minutes ago", as Docker's CREATED column.
pub fn ago(then_unix: u64, now_unix: u64) -> String {
    let s = now_unix.saturating_sub(then_unix);
    let (n, unit) = match s {
        0..=1 => return "Less than a second ago".into(),
        2..=59 => (s, "second"),
        60..=3599 => (s / 60, "minute"),
        3600..=86399 => (s / 3600, "hour"),
        _ => (s / 86400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: &[&str]) -> Result<Filters, String> {
        let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        Filters::parse(&v, &["name", "status"])
    }

    #[test]
    fn one_key_any_value_all_keys() {
        let item = |k: &str| match k {
            "name" => vec!["web-1".to_string()],
            _ => vec!["running".to_string()],
        };
        let exact = |k: &str| k == "status";
        assert!(f(&[]).unwrap().matches(item, exact));
        assert!(f(&["name=web"]).unwrap().matches(item, exact));
        assert!(f(&["name=db", "name=web"]).unwrap().matches(item, exact));
        assert!(!f(&["name=web", "status=exited"])
            .unwrap()
            .matches(item, exact));
        assert!(
            !f(&["status=run"]).unwrap().matches(item, exact),
            "status is exact"
        );
    }

    #[test]
    fn bad_filters_say_what_is_known() {
        assert!(f(&["name"]).unwrap_err().contains("expected KEY=VALUE"));
        assert!(f(&["colour=red"])
            .unwrap_err()
            .contains("use one of name, status"));
    }

    #[test]
    fn commands_are_quoted_only_when_needed() {
        assert_eq!(shell_quote("sleep"), "sleep");
        assert_eq!(shell_quote("echo hi"), "'echo hi'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn ages_read_as_dockers() {
        assert_eq!(ago(100, 100), "Less than a second ago");
        assert_eq!(ago(100, 105), "5 seconds ago");
        assert_eq!(ago(0, 60), "1 minute ago");
        assert_eq!(ago(0, 7200), "2 hours ago");
        assert_eq!(ago(0, 3 * 86400), "3 days ago");
    }
}
