//! Secrets the guest never holds. A secret declared in `~/.cvm.toml` under
//! `[secrets.proxied.NAME]` names where its value comes from and the hosts it may be sent to.
//! Commands in the guest get `NAME` holding a random placeholder; the host's egress proxy
//! swaps the real value in only on requests to those hosts ([`crate::network::interception`]).
//!
//! A value is read on the host before the VM boots, from one source: a file, a variable of
//! cvm's own environment, a command (`gh auth token`), or, with none of those, the secrets
//! file's line of the same name. A source that fails stops the session before boot.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::host::environment::Environment;

/// How long a secret's command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest value a source may give.
const MAX_VALUE: usize = 64 * 1024;
/// What every placeholder starts with, so that the proxy and a reader of the guest's
/// environment can tell one.
pub const PLACEHOLDER_PREFIX: &str = "cvm-placeholder-";

/// A declared secret, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedSecret {
    /// The variable commands in the guest get.
    pub name: String,
    /// Host patterns (as `--allow`) the value may be sent to.
    pub hosts: Vec<String>,
    pub source: SecretSource,
    /// Swapped in request bodies too (those with a Content-Length, up to 256 KiB), not only in
    /// headers.
    pub body: bool,
    /// Headers it is swapped in besides [`CREDENTIAL_HEADERS`], lower case.
    pub headers: Vec<String>,
}

/// The headers a secret is swapped in: those that carry credentials, which servers do not
/// send back (a value swapped into `Origin` or `Referer` comes back in the answer).
pub const CREDENTIAL_HEADERS: &[&str] = &["authorization", "proxy-authorization", "x-api-key"];

/// Where a secret's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// The secrets file's line of the secret's own name.
    SecretsFile,
    /// A file's contents, without the trailing newline.
    File(PathBuf),
    /// A variable of cvm's environment.
    Env(String),
    /// What a command prints, without the trailing newline.
    Command(Vec<String>),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::SecretsFile => f.write_str("the secrets file"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Env(name) => write!(f, "${name}"),
            SecretSource::Command(argv) => write!(f, "command `{}`", argv.join(" ")),
        }
    }
}

/// A secret with its value and this session's placeholder. `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub name: String,
    pub hosts: Vec<String>,
    value: String,
    pub placeholder: String,
    /// Swapped in request bodies too.
    pub body: bool,
    /// Headers it is swapped in besides [`CREDENTIAL_HEADERS`], lower case.
    pub headers: Vec<String>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret").field("name", &self.name).field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

impl Secret {
    /// A secret with `value`, for `hosts`, under a new random placeholder.
    pub fn new(name: String, hosts: Vec<String>, value: String) -> Result<Secret> {
        check_value(&name, &value)?;
        let mut random = [0u8; 20];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)).context("cannot read /dev/urandom")?;
        let placeholder = format!("{PLACEHOLDER_PREFIX}{}", random.iter().map(|b| format!("{b:02x}")).collect::<String>());
        Ok(Secret { name, hosts, value, placeholder, body: false, headers: Vec::new() })
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether the value may be sent to `host`.
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.hosts.iter().any(|p| crate::network::egress::matches(crate::network::egress::pattern_name(p), &host))
    }

    /// Whether the value may go in the header `name`.
    pub fn goes_in(&self, name: &str) -> bool {
        CREDENTIAL_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h)) || self.headers.iter().any(|h| name.eq_ignore_ascii_case(h))
    }
}

/// A value goes into HTTP headers: printable ASCII only, so that it can neither end a header
/// nor be changed by an encoding on its way.
fn check_value(name: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        bail!("secret {name}: the value is empty");
    }
    if value.len() > MAX_VALUE {
        bail!("secret {name}: the value is longer than {MAX_VALUE} bytes");
    }
    if let Some(bad) = value.bytes().position(|b| !(0x21..0x7f).contains(&b)) {
        bail!("secret {name}: the value has a space, control or non-ASCII byte at offset {bad}: it cannot go in an HTTP header");
    }
    Ok(())
}

/// Reads every declared secret's value. `secrets_file` holds the secrets file's variables;
/// those of a proxied secret's name are taken out of it, so the guest gets only the
/// placeholder.
pub fn resolve(declared: &[ProxiedSecret], secrets_file: &mut Environment) -> Result<Vec<Secret>> {
    declared
        .iter()
        .map(|secret| {
            let name = &secret.name;
            let value = match &secret.source {
                SecretSource::SecretsFile => secrets_file
                    .get(name)
                    .map(str::to_string)
                    .with_context(|| format!("secret {name}: the secrets file has no {name}= line (or give it a file, env or command)"))?,
                SecretSource::File(path) => read_file(path).with_context(|| format!("secret {name}: cannot read {}", path.display()))?,
                SecretSource::Env(variable) => std::env::var(variable).with_context(|| format!("secret {name}: ${variable} is not set"))?,
                SecretSource::Command(argv) => run(argv).with_context(|| format!("secret {name}: command `{}`", argv.join(" ")))?,
            };
            secrets_file.remove(name);
            let mut resolved = Secret::new(name.clone(), secret.hosts.clone(), value.trim_end_matches(['\n', '\r']).to_string())?;
            resolved.body = secret.body;
            resolved.headers = secret.headers.clone();
            Ok(resolved)
        })
        .collect()
}

fn read_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)?;
    if bytes.len() > MAX_VALUE + 2 {
        bail!("larger than {MAX_VALUE} bytes");
    }
    String::from_utf8(bytes).context("not text")
}

/// Runs `argv` with no input, its output captured, for at most [`COMMAND_TIMEOUT`].
fn run(argv: &[String]) -> Result<String> {
    let (program, args) = argv.split_first().context("an empty command")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start it")?;
    let (mut stdout, mut stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = (&mut stdout).take(MAX_VALUE as u64 + 3).read_to_end(&mut out);
        let mut err = Vec::new();
        let _ = (&mut stderr).take(4096).read_to_end(&mut err);
        read.map(|_| (out, err))
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {}s", COMMAND_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = reader.join().map_err(|_| anyhow::anyhow!("its output could not be read"))??;
    if !status.success() {
        bail!("{status}: {}", String::from_utf8_lossy(&err).trim());
    }
    if out.len() > MAX_VALUE + 2 {
        bail!("printed more than {MAX_VALUE} bytes");
    }
    String::from_utf8(out).context("printed something that is not text")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(name: &str, source: SecretSource) -> ProxiedSecret {
        ProxiedSecret {
            name: name.into(),
            hosts: vec!["api.test".into(), "*.github.test".into()],
            source,
            body: false,
            headers: Vec::new(),
        }
    }

    #[test]
    fn values_come_from_each_source_and_leave_the_secrets_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "from-file\n").unwrap();
        std::env::set_var("CVM_TEST_SECRET_SOURCE", "from-env");
        let mut file = Environment::default();
        file.set("FROM_SECRETS".into(), "from-secrets-file".into());
        file.set("OTHER".into(), "stays".into());
        let secrets = resolve(
            &[
                declared("FROM_SECRETS", SecretSource::SecretsFile),
                declared("FROM_FILE", SecretSource::File(dir.path().join("key"))),
                declared("FROM_ENV", SecretSource::Env("CVM_TEST_SECRET_SOURCE".into())),
                declared("FROM_COMMAND", SecretSource::Command(vec!["printf".into(), "from-command\\n\\n".into()])),
            ],
            &mut file,
        )
        .unwrap();
        let values: Vec<&str> = secrets.iter().map(Secret::value).collect();
        assert_eq!(values, ["from-secrets-file", "from-file", "from-env", "from-command"]);
        assert_eq!(file.names().collect::<Vec<_>>(), ["OTHER"], "the guest gets the placeholder, not the file's value");
        for secret in &secrets {
            assert!(secret.placeholder.starts_with(PLACEHOLDER_PREFIX) && secret.placeholder.len() == PLACEHOLDER_PREFIX.len() + 40);
            assert!(!format!("{secret:?}").contains(secret.value()), "{secret:?}");
        }
        assert_ne!(secrets[0].placeholder, secrets[1].placeholder);
        assert!(secrets[0].applies_to("API.test") && secrets[0].applies_to("x.github.test"));
        assert!(!secrets[0].applies_to("github.test") && !secrets[0].applies_to("api.test.evil"));
    }

    #[test]
    fn a_bad_source_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("spaced"), "two words").unwrap();
        let cases = [
            (SecretSource::File(dir.path().join("missing")), "cannot read"),
            (SecretSource::File(dir.path().join("spaced")), "space, control or non-ASCII"),
            (SecretSource::Env("CVM_TEST_NOT_SET_ANYWHERE".into()), "is not set"),
            (SecretSource::Command(vec!["sh".into(), "-c".into(), "echo denied >&2; exit 3".into()]), "denied"),
            (SecretSource::Command(vec!["/nonexistent/gh".into()]), "cannot start it"),
            (SecretSource::Command(vec!["true".into()]), "empty"),
            (SecretSource::SecretsFile, "no S= line"),
        ];
        for (source, says) in cases {
            let e = resolve(&[declared("S", source.clone())], &mut Environment::default()).unwrap_err();
            let text = format!("{e:#}");
            assert!(text.starts_with("secret S: ") && text.contains(says), "{source:?}: {text}");
        }
    }
}
