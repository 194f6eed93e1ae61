//! Names of sandboxes and networks: what users may type.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {name:?}: {why}")]
pub struct NameError {
    pub what: &'static str,
    pub name: String,
    pub why: &'static str,
}

/// Docker's rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, here capped at 63 characters
/// so that a name is always a valid DNS label.
pub fn validate(what: &'static str, name: &str) -> Result<(), NameError> {
    let err = |why| {
        Err(NameError {
            what,
            name: name.to_string(),
            why,
        })
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return err("it is empty"),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return err("it must start with a letter or digit")
        }
        _ => {}
    }
    if name.len() > 63 {
        return err("it is longer than 63 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return err("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_docker_style_names() {
        for ok in ["web", "web-1", "a.b_c", "9lives"] {
            validate("sandbox", ok).unwrap();
        }
    }

    #[test]
    fn rejects_bad_names_with_reason() {
        assert!(validate("sandbox", "")
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(validate("sandbox", "-x")
            .unwrap_err()
            .to_string()
            .contains("start with"));
        assert!(validate("sandbox", "a b")
            .unwrap_err()
            .to_string()
            .contains("only letters"));
        assert!(validate("sandbox", "a/b").is_err());
        assert!(validate("sandbox", &"a".repeat(64))
            .unwrap_err()
            .to_string()
            .contains("63"));
    }
}
