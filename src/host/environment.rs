//! The environment every command of a session gets from the host: `--env K=V`, `--env-file F`,
//! `--inherit-env NAME`, and the secrets file (`~/.config/cvm/secrets.env` or
//! `[secrets] env_file`). Values travel to the guest only in each exec request over the
//! control channel: never into an image, a template, the meta dir or a log. Their `Debug`
//! shows names only, so a logged configuration cannot leak them.

use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Variables by name, in order; a later one with the same name wins.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Environment(Vec<(String, String)>);

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(name, _)| name)).finish()
    }
}

impl Environment {
    pub fn set(&mut self, name: String, value: String) {
        self.0.retain(|(n, _)| *n != name);
        self.0.push((name, value));
    }

    pub fn extend(&mut self, other: Environment) {
        for (name, value) in other.0 {
            self.set(name, value);
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| n != name);
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }

    /// As an exec request carries it.
    pub fn to_exec(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.0.iter().map(|(n, v)| (n.clone().into_bytes(), v.clone().into_bytes())).collect()
    }
}

/// Parses `--env NAME=VALUE`.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| format!("bad --env {text:?}: expected NAME=VALUE"))?;
    check_name(name).map_err(|e| format!("bad --env: {e}"))?;
    Ok((name.to_string(), value.to_string()))
}

/// Parses `--inherit-env NAME`.
pub fn parse_name(text: &str) -> Result<String, String> {
    check_name(text).map_err(|e| format!("bad --inherit-env: {e}"))?;
    Ok(text.to_string())
}

/// A variable name: a letter or `_`, then letters, digits and `_`.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{name:?} is not a variable name"));
    }
    Ok(())
}

/// Reads an env file: `NAME=VALUE` lines, `export ` allowed in front, blank lines and `#`
/// comments skipped, one pair of matching quotes around a value removed. An error names the
/// line, never a value.
/// Inside `root` (a project the guest can write), only by ways that stay inside.
pub fn read_file(path: &Path, root: Option<&Path>) -> Result<Environment> {
    let text = crate::host::host_files::read_text(path, root, crate::host::host_files::MAX_PROJECT_FILE)?;
    parse_file(&text).map_err(|(line, why)| anyhow::anyhow!("{}:{line}: {why}", path.display()))
}

fn parse_file(text: &str) -> Result<Environment, (usize, String)> {
    let mut env = Environment::default();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((name, value)) = line.split_once('=') else {
            return Err((index + 1, "expected NAME=VALUE".into()));
        };
        let name = name.trim();
        check_name(name).map_err(|e| (index + 1, e))?;
        let value = value.trim();
        let unquoted = ['"', '\''].iter().find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q))).unwrap_or(value);
        env.set(name.to_string(), unquoted.to_string());
    }
    Ok(env)
}

/// The secrets file, if there is one: a missing file is no secrets; a file others may read is
/// refused. Inside `root`, only by ways that stay inside.
pub fn read_secrets(path: &Path, root: Option<&Path>) -> Result<Environment> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Environment::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read the secrets file {}", path.display())),
    };
    if meta.permissions().mode() & 0o077 != 0 {
        bail!("the secrets file {} is readable by others: chmod 600 it", path.display());
    }
    read_file(path, root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_and_names() {
        assert_eq!(parse_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_pair("_X="), Ok(("_X".into(), "".into())));
        for bad in ["A", "=x", "1A=x", "A-B=x", "A B=x", ""] {
            assert!(parse_pair(bad).is_err(), "{bad:?}");
        }
        assert!(parse_name("HOME").is_ok() && parse_name("NO-PE").is_err());
    }

    #[test]
    fn env_files() {
        let env = parse_file("# comment\n\nA=1\nexport B = \"two words\"\nC='x'\nA=3\n").unwrap();
        assert_eq!(env.0, [("B".into(), "two words".into()), ("C".into(), "x".into()), ("A".into(), "3".into())]);
        assert_eq!(parse_file("A=1\nsecret-value\n").unwrap_err(), (2, "expected NAME=VALUE".into()));
        let err = parse_file("A-B=hunter2\n").unwrap_err();
        assert!(!err.1.contains("hunter2"), "an error never shows the value: {err:?}");
    }

    #[test]
    fn debug_shows_names_only() {
        let mut env = Environment::default();
        env.set("TOKEN".into(), "hunter2".into());
        assert_eq!(format!("{env:?}"), "[\"TOKEN\"]");
    }

    #[test]
    fn secrets_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.env");
        assert_eq!(read_secrets(&path, None).unwrap(), Environment::default(), "no file, no secrets");
        std::fs::write(&path, "TOKEN=hunter2\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_secrets(&path, None).unwrap_err().to_string().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secrets(&path, None).unwrap().names().collect::<Vec<_>>(), ["TOKEN"]);
    }
}
