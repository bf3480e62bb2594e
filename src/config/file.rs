//! One `.cvm.toml` as written (every key optional, unknown keys refused), and its errors
//! located at a line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::guest::shares::expand_home;
use crate::host::host_files::normalize;

/// A list as a file writes it: `[...]` extends the layers below, `{ replace = [...] }`
/// replaces them.
#[derive(Clone, Debug, PartialEq)]
pub enum List<T> {
    Extend(Vec<T>),
    Replace { replace: Vec<T> },
}

// By hand rather than `#[serde(untagged)]`, which buffers the input and so loses the
// positions that errors point at.
impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ListVisitor<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list, or { replace = [...] }")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(List::Extend(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<List<T>, A::Error> {
                let mut replace = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "replace" if replace.is_none() => replace = Some(map.next_value()?),
                        other => return Err(serde::de::Error::unknown_field(other, &["replace"])),
                    }
                }
                replace.map(|replace| List::Replace { replace }).ok_or_else(|| serde::de::Error::missing_field("replace"))
            }
        }
        deserializer.deserialize_any(ListVisitor(std::marker::PhantomData))
    }
}

/// One `.cvm.toml`, as written: every key optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub vm: VmTable,
    /// Capabilities `cvm setup` installs (`node = true`), by name.
    #[serde(default)]
    pub tools: BTreeMap<Spanned<String>, bool>,
    #[serde(default)]
    pub packages: PackagesTable,
    #[serde(default)]
    pub setup: SetupTable,
    #[serde(default)]
    pub runtime: RuntimeTable,
    #[serde(default)]
    pub defaults: DefaultsTable,
    #[serde(default)]
    pub context: ContextTable,
    #[serde(default)]
    pub network: NetworkTable,
    /// Directories every session gets (`[[mounts]]`).
    #[serde(default)]
    pub mounts: Vec<MountTable>,
    #[serde(default)]
    pub secrets: SecretsTable,
    /// Variables every command of a session gets (`[env]`), by name.
    #[serde(default)]
    pub env: BTreeMap<Spanned<String>, Spanned<String>>,
}

/// `[vm]`: single-valued keys only, each read by its entry in [`super::keys::KEYS`] (an unknown
/// one is refused there, at its line and column).
pub type VmTable = BTreeMap<Spanned<String>, Spanned<Scalar>>;

/// A single value as a file writes it, a string or a number (`cpus = 2`, `memory = "2G"`),
/// kept as text for its key's parser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl serde::de::Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagesTable {
    /// Debian packages for the template.
    pub system: Option<List<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupTable {
    /// Scripts `cvm setup` runs after the packages.
    pub scripts: Option<List<String>>,
    /// Directories only `cvm setup` gets (`[[setup.mounts]]`).
    #[serde(default)]
    pub mounts: Vec<MountTable>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeTable {
    pub scripts: Option<List<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsTable {
    /// Arguments added to `claude` when it is the command.
    pub claude_args: Option<List<String>>,
    /// What `cvm run PATH` runs without `-- CMD` (default: Claude Code).
    pub command: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextTable {
    /// Text added to what Claude is told about the VM.
    pub instructions: Option<String>,
    /// A file whose text is added likewise.
    pub instructions_file: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkTable {
    /// Read by its entry in [`super::keys::KEYS`].
    pub mode: Option<Spanned<Scalar>>,
    pub allow: Option<List<Spanned<String>>>,
    pub deny: Option<List<Spanned<String>>>,
    /// `NAME:IP` mappings, as `--add-host`.
    pub hosts: Option<List<Spanned<String>>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountTable {
    pub host: Spanned<String>,
    pub guest: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsTable {
    /// KEY=VALUE lines whose values reach commands' environment only.
    pub env_file: Option<String>,
    /// Secrets the guest gets only as placeholders (`[secrets.proxied.NAME]`): in
    /// `~/.cvm.toml` only.
    #[serde(default)]
    pub proxied: BTreeMap<Spanned<String>, ProxiedTable>,
}

/// One `[secrets.proxied.NAME]`: the hosts its value may go to, and at most one source (none:
/// the secrets file's `NAME=` line).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxiedTable {
    pub hosts: Spanned<Vec<Spanned<String>>>,
    pub file: Option<String>,
    pub env: Option<String>,
    pub command: Option<Spanned<Vec<String>>>,
    /// Swapped in request bodies too, not only in headers.
    #[serde(default)]
    pub body: bool,
    /// Headers it is swapped in besides the credential headers.
    #[serde(default)]
    pub headers: Vec<Spanned<String>>,
}

impl FileConfig {
    /// The settings of this file, at `origin`, that widen the sandbox beyond what the project
    /// itself holds: (key, value as shown) for each. Paths are resolved as
    /// [`Settings::apply_file`] does; a file inside the file's own directory widens nothing,
    /// since cvm reads it only by ways that stay inside.
    pub fn widening(&self, origin: &Path, home: &Path) -> Vec<(&'static str, String)> {
        let dir = origin.parent().unwrap_or(Path::new("/"));
        let outside = |p: &String| {
            let resolved = normalize(&dir.join(expand_home(p, home)));
            (!resolved.starts_with(dir)).then(|| resolved.display().to_string())
        };
        let outside_list = |list: &Option<List<String>>| -> Vec<String> {
            match list {
                Some(List::Extend(items) | List::Replace { replace: items }) => items.iter().filter_map(outside).collect(),
                None => Vec::new(),
            }
        };
        let mounts = |mounts: &[MountTable]| -> Vec<String> {
            mounts
                .iter()
                .map(|m| format!("{}:{}:{}", m.host.get_ref(), m.guest.as_deref().unwrap_or(""), if m.read_only { "ro" } else { "rw" }))
                .collect()
        };
        let spanned = |list: &Option<List<Spanned<String>>>| -> Vec<String> {
            match list {
                Some(List::Extend(items) | List::Replace { replace: items }) => items.iter().map(|i| i.get_ref().clone()).collect(),
                None => Vec::new(),
            }
        };
        let mut found = Vec::new();
        let mut add = |key: &'static str, values: Vec<String>| {
            if !values.is_empty() {
                found.push((key, format!("{values:?}")));
            }
        };
        add("mounts", mounts(&self.mounts));
        add("setup.mounts", mounts(&self.setup.mounts));
        add("network.mode", self.network.mode.iter().map(|m| m.get_ref().0.clone()).filter(|m| m == "open").collect());
        add("network.allow", spanned(&self.network.allow));
        add("network.hosts", spanned(&self.network.hosts));
        add("runtime.scripts", outside_list(&self.runtime.scripts));
        add("setup.scripts", outside_list(&self.setup.scripts));
        add("context.instructions_file", self.context.instructions_file.iter().filter_map(outside).collect());
        add("secrets.env_file", self.secrets.env_file.iter().filter_map(outside).collect());
        let image = self.vm.iter().find(|(name, _)| name.get_ref() == "image").map(|(_, value)| value.get_ref().0.clone());
        add("vm.image", image.into_iter().filter(|i| !crate::project::images::is_named(i)).collect());
        for (name, value) in &self.vm {
            if let Some(key) = raised_limit(name.get_ref(), &value.get_ref().0) {
                add(key, vec![value.get_ref().0.clone()]);
            }
        }
        found
    }
}

/// The key, when a project's `[vm]` `name = text` asks more of the host than cvm's defaults
/// give (vCPUs or memory beyond them, any scratch disk or share quota, a time limit beyond
/// CI's): such a
/// file could make the next session take the host's CPUs, memory, disk or time.
fn raised_limit(name: &str, text: &str) -> Option<&'static str> {
    let defaults = super::Settings::defaults();
    let raised = match name {
        "cpus" => super::keys::parse_cpus(text).is_ok_and(|cpus| cpus > defaults.cpus.value),
        "memory" => cvm_vmm::parse_memory_size(text).is_ok_and(|bytes| bytes > defaults.memory.value),
        "disk" | "share_quota" => true,
        "timeout" => crate::config::keys::parse_duration(text).is_ok_and(|limit| limit > super::CI_TIMEOUT),
        _ => false,
    };
    raised.then(|| super::keys::key(&format!("vm.{name}")).map(|k| k.name)).flatten()
}

/// A bad configuration file, located.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ConfigError {
    pub(super) fn at(file: &Path, text: &str, span: std::ops::Range<usize>, message: String) -> ConfigError {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError { file: file.display().to_string().into(), line, column, message }
    }
}

/// Parses one file's text strictly.
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        // toml's message repeats the location in a banner; its first line is the reason.
        let message = e.message().lines().next().unwrap_or("invalid TOML").to_string();
        ConfigError::at(path, text, span, message)
    })
}
