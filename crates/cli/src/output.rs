//! Plain tables for people, JSON for scripts.

use crate::Format;
use serde::Serialize;
use std::io::{ErrorKind, Write};

/// Writes `s` and a newline to stdout. Every line weft prints goes through
/// here because `println!` panics when the reader has gone (`weft ps |
/// head`): a reader that stopped reading is not the command's failure, so
/// weft ends quietly with status 0, the way `head`'s upstream ends under a
/// shell without pipefail. Any other write error is reported (status 1).
pub fn print_line(s: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{s}").and_then(|()| out.flush()) {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        drop(out);
        eprintln!("weft: writing to stdout: {e}");
        std::process::exit(1);
    }
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:w$}", c, w = widths[i]))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Prints `value` as JSON, or `human()` as text.
pub fn emit<T: Serialize>(format: Format, value: &T, human: impl FnOnce() -> String) {
    match format {
        Format::Json => print_line(&serde_json::to_string_pretty(value).expect("serializable")),
        Format::Table => {
            let s = human();
            if !s.is_empty() {
                print_line(&s);
            }
        }
        Format::Dot | Format::Svg | Format::Png => {
            eprintln!("weft: --format dot, svg and png are pictures of a path: only `weft explain` draws them; use table or json here");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligns_columns() {
        let t = super::table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A     LONGER\nxyz   1");
    }
}
