//! Layered configuration. Each layer may set any key or leave it alone; a later layer wins:
//!
//! 1. built-in defaults;
//! 2. in CI (`CI=true`): caps for shared runners (a one-hour timeout, no more vCPUs than the
//!    host has);
//! 3. `~/.cvm.toml`;
//! 4. inside a git worktree, the main repository's `.cvm.toml`;
//! 5. the project's `.cvm.toml`;
//! 6. the environment (`CVM_CPUS`, `CVM_MEMORY`, ...);
//! 7. command-line flags.
//!
//! A key a layer sets is set, even to the default value, so a project can undo what the
//! global file changed and turn a tool off. Lists extend the layers below (without repeating
//! an entry) unless written as `{ replace = [...] }`. Each value remembers which layers made
//! it, for `cvm config show`. Files are parsed strictly: an unknown key or a bad value is an
//! error naming the file, line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::egress::NetworkMode;
use crate::secrets::{ProxiedSecret, SecretSource};
use cvm_vmm::Engine;
use crate::shares::{expand_home, MountSpec};

/// The file each layer reads.
pub const FILE_NAME: &str = ".cvm.toml";
/// How long a CI job may run unless told otherwise.
pub const CI_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    Ci,
    File(PathBuf),
    Env(&'static str),
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Ci => f.write_str("CI=true"),
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Env(name) => write!(f, "${name}"),
            Source::Flag => f.write_str("command line"),
        }
    }
}

/// A value and the layers that made it (one for a scalar; each contributor for a list).
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    pub sources: Vec<Source>,
}

impl<T> Sourced<T> {
    fn default(value: T) -> Self {
        Sourced { value, sources: vec![Source::Default] }
    }

    fn set(&mut self, value: T, source: Source) {
        self.value = value;
        self.sources = vec![source];
    }

    /// Sets the value when one was given; leaves the layers below alone otherwise.
    fn set_given(&mut self, value: Option<T>, source: Source) {
        if let Some(value) = value {
            self.set(value, source);
        }
    }
}

impl<T: PartialEq> Sourced<Vec<T>> {
    /// Applies a list layer: extends without repeating an entry, or replaces.
    fn apply(&mut self, list: List<T>, source: Source) {
        match list {
            List::Extend(items) => {
                let mut added = false;
                for item in items {
                    if !self.value.contains(&item) {
                        self.value.push(item);
                        added = true;
                    }
                }
                if added {
                    self.sources.retain(|s| *s != Source::Default);
                    self.sources.push(source);
                }
            }
            List::Replace { replace } => self.set(replace, source),
        }
    }
}

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
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmTable {
    pub cpus: Option<Spanned<u8>>,
    pub memory: Option<Spanned<String>>,
    pub disk: Option<Spanned<String>>,
    pub vmm: Option<Spanned<String>>,
    pub image: Option<String>,
    pub timeout: Option<Spanned<String>>,
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
    pub mode: Option<Spanned<String>>,
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
            mounts.iter().map(|m| format!("{}:{}:{}", m.host.get_ref(), m.guest.as_deref().unwrap_or(""), if m.read_only { "ro" } else { "rw" })).collect()
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
        add("network.mode", self.network.mode.iter().map(|m| m.get_ref().clone()).filter(|m| m == "open").collect());
        add("network.allow", spanned(&self.network.allow));
        add("network.hosts", spanned(&self.network.hosts));
        add("runtime.scripts", outside_list(&self.runtime.scripts));
        add("setup.scripts", outside_list(&self.setup.scripts));
        add("context.instructions_file", self.context.instructions_file.iter().filter_map(outside).collect());
        add("secrets.env_file", self.secrets.env_file.iter().filter_map(outside).collect());
        add("vm.image", self.vm.image.iter().filter(|i| !crate::images::is_named(i)).cloned().collect());
        found
    }
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub cpus: Sourced<u8>,
    pub memory: Sourced<u64>,
    pub disk: Sourced<Option<u64>>,
    pub vmm: Sourced<Engine>,
    pub image: Sourced<String>,
    pub timeout: Sourced<Option<Duration>>,
    pub tools: BTreeMap<String, Sourced<bool>>,
    pub packages: Sourced<Vec<String>>,
    pub setup_scripts: Sourced<Vec<PathBuf>>,
    pub setup_mounts: Sourced<Vec<MountSpec>>,
    pub runtime_scripts: Sourced<Vec<PathBuf>>,
    pub claude_args: Sourced<Vec<String>>,
    pub command: Sourced<Option<Vec<String>>>,
    pub instructions: Sourced<Option<String>>,
    pub instructions_file: Sourced<Option<PathBuf>>,
    pub network: Sourced<NetworkMode>,
    pub allow: Sourced<Vec<String>>,
    pub deny: Sourced<Vec<String>>,
    pub hosts: Sourced<Vec<(String, IpAddr)>>,
    pub mounts: Sourced<Vec<MountSpec>>,
    pub secrets_file: Sourced<Option<PathBuf>>,
    pub proxied_secrets: Sourced<Vec<ProxiedSecret>>,
}

impl Settings {
    /// Layer 1: what cvm does with no configuration at all.
    pub fn defaults() -> Settings {
        Settings {
            cpus: Sourced::default(2),
            memory: Sourced::default(512 << 20),
            disk: Sourced::default(None),
            vmm: Sourced::default(Engine::Cvm),
            image: Sourced::default("debian".into()),
            timeout: Sourced::default(None),
            tools: crate::template::CAPABILITIES.iter().map(|c| (c.name.to_string(), Sourced::default(false))).collect(),
            packages: Sourced::default(Vec::new()),
            setup_scripts: Sourced::default(Vec::new()),
            setup_mounts: Sourced::default(Vec::new()),
            runtime_scripts: Sourced::default(Vec::new()),
            claude_args: Sourced::default(Vec::new()),
            command: Sourced::default(None),
            instructions: Sourced::default(None),
            instructions_file: Sourced::default(None),
            network: Sourced::default(NetworkMode::Proxy),
            allow: Sourced::default(crate::egress::DEFAULT_ALLOW.iter().map(|s| s.to_string()).collect()),
            deny: Sourced::default(Vec::new()),
            hosts: Sourced::default(Vec::new()),
            mounts: Sourced::default(Vec::new()),
            secrets_file: Sourced::default(Some(crate::xdg_dir("XDG_CONFIG_HOME", ".config").join("cvm/secrets.env"))),
            proxied_secrets: Sourced::default(Vec::new()),
        }
    }

    /// Layer 2: caps for CI runners.
    pub fn apply_ci(&mut self, host_cpus: usize) {
        self.timeout.set(Some(CI_TIMEOUT), Source::Ci);
        let cap = u8::try_from(host_cpus).unwrap_or(u8::MAX).max(1);
        if self.cpus.value > cap {
            self.cpus.set(cap, Source::Ci);
        }
    }

    /// Layers 3 to 5: one parsed file. `origin` is its path; relative paths in it are relative
    /// to its directory, and `~` is `home`.
    pub fn apply_file(&mut self, file: FileConfig, origin: &Path, text: &str, home: &Path) -> Result<(), ConfigError> {
        let source = Source::File(origin.to_path_buf());
        let dir = origin.parent().unwrap_or(Path::new("/"));
        let at = |span: std::ops::Range<usize>, message: String| ConfigError::at(origin, text, span, message);
        let path = |p: &str| normalize(&dir.join(expand_home(p, home)));
        let vm = file.vm;
        if let Some(cpus) = vm.cpus {
            let span = cpus.span();
            self.cpus.set(check_cpus(*cpus.get_ref()).map_err(|e| at(span, e))?, source.clone());
        }
        if let Some(memory) = vm.memory {
            self.memory.set(cvm_vmm::parse_memory_size(memory.get_ref()).map_err(|e| at(memory.span(), e))?, source.clone());
        }
        if let Some(disk) = vm.disk {
            self.disk.set(Some(cvm_vmm::parse_memory_size(disk.get_ref()).map_err(|e| at(disk.span(), e))?), source.clone());
        }
        if let Some(vmm) = vm.vmm {
            self.vmm.set(parse_enum::<Engine>(vmm.get_ref(), "vmm").map_err(|e| at(vmm.span(), e))?, source.clone());
        }
        if let Some(image) = vm.image {
            self.image.set(image, source.clone());
        }
        if let Some(timeout) = vm.timeout {
            self.timeout.set(Some(crate::run::parse_duration(timeout.get_ref()).map_err(|e| at(timeout.span(), e))?), source.clone());
        }
        for (name, on) in file.tools {
            let span = name.span();
            let Some(tool) = self.tools.get_mut(name.get_ref()) else {
                let known: Vec<&str> = crate::template::CAPABILITIES.iter().map(|c| c.name).collect();
                return Err(at(span, format!("unknown tool {:?} (known: {})", name.get_ref(), known.join(", "))));
            };
            tool.set(on, source.clone());
        }
        if let Some(system) = file.packages.system {
            self.packages.apply(system, source.clone());
        }
        if let Some(scripts) = file.setup.scripts {
            self.setup_scripts.apply(map_list(scripts, |s| Ok::<_, ConfigError>(path(&s)))?, source.clone());
        }
        if !file.setup.mounts.is_empty() {
            let mounts = file.setup.mounts.into_iter().map(|m| mount(m, &path, home, &at)).collect::<Result<Vec<_>, _>>()?;
            self.setup_mounts.apply(List::Extend(mounts), source.clone());
        }
        if let Some(scripts) = file.runtime.scripts {
            self.runtime_scripts.apply(map_list(scripts, |s| Ok::<_, ConfigError>(path(&s)))?, source.clone());
        }
        if let Some(args) = file.defaults.claude_args {
            self.claude_args.apply(args, source.clone());
        }
        if let Some(command) = file.defaults.command {
            self.command.set(Some(command), source.clone());
        }
        if let Some(text) = file.context.instructions {
            self.instructions.set(Some(text), source.clone());
        }
        if let Some(file_path) = file.context.instructions_file {
            self.instructions_file.set(Some(path(&file_path)), source.clone());
        }
        let network = file.network;
        if let Some(mode) = network.mode {
            self.network.set(parse_enum::<NetworkMode>(mode.get_ref(), "network mode").map_err(|e| at(mode.span(), e))?, source.clone());
        }
        if let Some(allow) = network.allow {
            self.allow.apply(map_list(allow, |p| crate::egress::parse_pattern(p.get_ref()).map_err(|e| at(p.span(), e)))?, source.clone());
        }
        if let Some(deny) = network.deny {
            self.deny.apply(map_list(deny, |p| crate::egress::parse_pattern(p.get_ref()).map_err(|e| at(p.span(), e)))?, source.clone());
        }
        if let Some(hosts) = network.hosts {
            self.hosts.apply(map_list(hosts, |h| crate::egress::parse_add_host(h.get_ref()).map_err(|e| at(h.span(), e)))?, source.clone());
        }
        if !file.mounts.is_empty() {
            let mounts = file.mounts.into_iter().map(|m| mount(m, &path, home, &at)).collect::<Result<Vec<_>, _>>()?;
            self.mounts.apply(List::Extend(mounts), source.clone());
        }
        if let Some(env_file) = file.secrets.env_file {
            self.secrets_file.set(Some(path(&env_file)), source.clone());
        }
        for (name, table) in file.secrets.proxied {
            let secret = proxied_secret(name, table, &path, &at)?;
            let mut secrets = self.proxied_secrets.value.clone();
            secrets.retain(|s| s.name != secret.name);
            secrets.push(secret);
            self.proxied_secrets.set(secrets, source.clone());
        }
        Ok(())
    }

    /// Layer 6: `CVM_*` variables, read through `var`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<()> {
        let bad = |name: &str, e: String| anyhow::anyhow!("${name}: {e}");
        if let Some(v) = var("CVM_CPUS") {
            let cpus = v.parse::<u8>().map_err(|e| bad("CVM_CPUS", e.to_string())).and_then(|c| check_cpus(c).map_err(|e| bad("CVM_CPUS", e)))?;
            self.cpus.set(cpus, Source::Env("CVM_CPUS"));
        }
        if let Some(v) = var("CVM_MEMORY") {
            self.memory.set(cvm_vmm::parse_memory_size(&v).map_err(|e| bad("CVM_MEMORY", e))?, Source::Env("CVM_MEMORY"));
        }
        if let Some(v) = var("CVM_DISK") {
            self.disk.set(Some(cvm_vmm::parse_memory_size(&v).map_err(|e| bad("CVM_DISK", e))?), Source::Env("CVM_DISK"));
        }
        if let Some(v) = var("CVM_VMM") {
            self.vmm.set(parse_enum(&v, "vmm").map_err(|e| bad("CVM_VMM", e))?, Source::Env("CVM_VMM"));
        }
        if let Some(v) = var("CVM_IMAGE") {
            self.image.set(v, Source::Env("CVM_IMAGE"));
        }
        if let Some(v) = var("CVM_TIMEOUT") {
            self.timeout.set(Some(crate::run::parse_duration(&v).map_err(|e| bad("CVM_TIMEOUT", e))?), Source::Env("CVM_TIMEOUT"));
        }
        if let Some(v) = var("CVM_NETWORK") {
            self.network.set(parse_enum(&v, "network mode").map_err(|e| bad("CVM_NETWORK", e))?, Source::Env("CVM_NETWORK"));
        }
        Ok(())
    }

    /// Layer 7: what the command line set.
    pub fn apply_flags(&mut self, flags: Flags) {
        let f = || Source::Flag;
        self.cpus.set_given(flags.cpus, f());
        self.memory.set_given(flags.memory, f());
        self.disk.set_given(flags.disk.map(Some), f());
        self.vmm.set_given(flags.vmm, f());
        self.image.set_given(flags.image, f());
        self.timeout.set_given(flags.timeout.map(Some), f());
        self.network.set_given(flags.network, f());
        for (tool, on) in flags.tools {
            if let Some(t) = self.tools.get_mut(&tool) {
                t.set(on, f());
            }
        }
        extend_from_flags(&mut self.packages, flags.packages);
        extend_from_flags(&mut self.setup_scripts, flags.setup_scripts);
        extend_from_flags(&mut self.runtime_scripts, flags.runtime_scripts);
        extend_from_flags(&mut self.allow, flags.allow);
        extend_from_flags(&mut self.deny, flags.deny);
        extend_from_flags(&mut self.hosts, flags.hosts);
        extend_from_flags(&mut self.mounts, flags.mounts);
    }
}

/// Extends `list` with what the command line gave, if anything.
fn extend_from_flags<T: PartialEq>(list: &mut Sourced<Vec<T>>, items: Vec<T>) {
    if !items.is_empty() {
        list.apply(List::Extend(items), Source::Flag);
    }
}

impl Settings {
    /// The capabilities turned on.
    pub fn tools_on(&self) -> Vec<&str> {
        self.tools.iter().filter(|(_, on)| on.value).map(|(name, _)| name.as_str()).collect()
    }

    /// The command `cvm run PATH` runs when none is given: `[defaults] command`, else Claude
    /// Code with `[defaults] claude_args` (each once, the built-in ones included).
    pub fn agent_command(&self) -> Vec<String> {
        if let Some(command) = &self.command.value {
            return command.clone();
        }
        let mut argv: Vec<String> = crate::run::AGENT_COMMAND.iter().map(|s| s.to_string()).collect();
        for arg in &self.claude_args.value {
            if !argv.contains(arg) {
                argv.push(arg.clone());
            }
        }
        argv
    }

    /// The text added to what Claude is told: `instructions`, then `instructions_file`'s (read,
    /// inside `project`, only by ways that stay inside).
    pub fn instructions(&self, project: Option<&Path>) -> Result<Option<String>> {
        let mut text: Vec<String> = self.instructions.value.iter().cloned().collect();
        if let Some(path) = &self.instructions_file.value {
            text.push(crate::host_files::read_text(path, project, crate::host_files::MAX_PROJECT_FILE).context("[context] instructions_file")?);
        }
        Ok((!text.is_empty()).then(|| text.join("\n")))
    }

    /// `cvm config show`: every key, its value, and where it came from. Secrets are never
    /// read here; only the file's path is shown.
    pub fn show(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: String, sources: &[Source]| {
            let from: Vec<String> = sources.iter().map(Source::to_string).collect();
            out.push_str(&format!("{key:<26} = {value:<40} # {}\n", from.join(", ")));
        };
        let list = |items: &[String]| format!("[{}]", items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "));
        let paths = |items: &[PathBuf]| list(&items.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
        let mounts = |items: &[MountSpec]| list(&items.iter().map(|m| format!("{}:{}:{}", m.host.display(), m.guest.display(), if m.read_only { "ro" } else { "rw" })).collect::<Vec<_>>());
        line("vm.cpus", self.cpus.value.to_string(), &self.cpus.sources);
        line("vm.memory", format!("\"{}M\"", self.memory.value >> 20), &self.memory.sources);
        line("vm.disk", self.disk.value.map_or("none".into(), |d| format!("\"{}M\"", d >> 20)), &self.disk.sources);
        line("vm.vmm", format!("{:?}", enum_name(&self.vmm.value)), &self.vmm.sources);
        line("vm.image", format!("{:?}", self.image.value), &self.image.sources);
        line("vm.timeout", self.timeout.value.map_or("none".into(), |t| format!("\"{}s\"", t.as_secs())), &self.timeout.sources);
        for (name, on) in &self.tools {
            line(&format!("tools.{name}"), on.value.to_string(), &on.sources);
        }
        line("packages.system", list(&self.packages.value), &self.packages.sources);
        line("setup.scripts", paths(&self.setup_scripts.value), &self.setup_scripts.sources);
        line("setup.mounts", mounts(&self.setup_mounts.value), &self.setup_mounts.sources);
        line("runtime.scripts", paths(&self.runtime_scripts.value), &self.runtime_scripts.sources);
        line("defaults.claude_args", list(&self.claude_args.value), &self.claude_args.sources);
        line("defaults.command", self.command.value.as_deref().map_or("none (Claude Code)".into(), list), &self.command.sources);
        line("context.instructions", self.instructions.value.as_ref().map_or("none".into(), |t| format!("{t:?}")), &self.instructions.sources);
        line("context.instructions_file", self.instructions_file.value.as_ref().map_or("none".into(), |p| format!("{:?}", p.display().to_string())), &self.instructions_file.sources);
        line("network.mode", format!("{:?}", enum_name(&self.network.value)), &self.network.sources);
        line("network.allow", list(&self.allow.value), &self.allow.sources);
        line("network.deny", list(&self.deny.value), &self.deny.sources);
        line("network.hosts", list(&self.hosts.value.iter().map(|(n, ip)| format!("{n}:{ip}")).collect::<Vec<_>>()), &self.hosts.sources);
        line("mounts", mounts(&self.mounts.value), &self.mounts.sources);
        line("secrets.env_file", self.secrets_file.value.as_ref().map_or("none".into(), |p| format!("{:?}", p.display().to_string())), &self.secrets_file.sources);
        for secret in &self.proxied_secrets.value {
            let place = if secret.body { "headers and bodies" } else { "headers" };
            let value = format!("placeholder in the guest; swapped in {place} for {} from {}", list(&secret.hosts), secret.source);
            line(&format!("secrets.proxied.{}", secret.name), value, &self.proxied_secrets.sources);
        }
        out
    }
}

/// What the command line may set; `None` and empty lists leave the layers below alone.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub cpus: Option<u8>,
    pub memory: Option<u64>,
    pub disk: Option<u64>,
    pub vmm: Option<Engine>,
    pub image: Option<String>,
    pub timeout: Option<Duration>,
    pub network: Option<NetworkMode>,
    pub tools: Vec<(String, bool)>,
    pub packages: Vec<String>,
    pub setup_scripts: Vec<PathBuf>,
    pub runtime_scripts: Vec<PathBuf>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub hosts: Vec<(String, IpAddr)>,
    pub mounts: Vec<MountSpec>,
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
    fn at(file: &Path, text: &str, span: std::ops::Range<usize>, message: String) -> ConfigError {
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

/// The layer files for a session on `project` (or none), lowest first, those that exist.
pub fn layer_files(home: &Path, project: Option<&Path>) -> Vec<PathBuf> {
    let mut files = vec![home.join(FILE_NAME)];
    if let Some(project) = project {
        if let Some(main) = crate::shares::main_repository(project) {
            files.push(main.join(FILE_NAME));
        }
        files.push(project.join(FILE_NAME));
    }
    let mut seen = Vec::new();
    files.retain(|f| f.is_file() && !seen.contains(f) && {
        seen.push(f.clone());
        true
    });
    files
}

/// Reads and parses one layer file. A project's file (any but `~/.cvm.toml`) is one the guest
/// can write: it is read only by ways that stay in its directory, and one whose settings
/// widen the sandbox must be trusted as it is ([`crate::trust`]).
pub fn read_layer(path: &Path, home: &Path, trust: &crate::trust::Store) -> Result<(String, FileConfig)> {
    let own_dir = path.parent().filter(|_| path != home.join(FILE_NAME));
    let text = crate::host_files::read_text(path, own_dir, crate::host_files::MAX_PROJECT_FILE)?;
    let file = parse_file(path, &text)?;
    if own_dir.is_some() {
        refuse_proxied_secrets(path, &file)?;
        let widening = file.widening(path, home);
        if !widening.is_empty() {
            trust.check(path, &text, &widening, |trusted| parse_file(path, trusted).map(|f| f.widening(path, home)).unwrap_or_default())?;
        }
    }
    Ok((text, file))
}

/// A project's file may not declare proxied secrets, trusted or not: the guest can write it,
/// and a declaration names where a secret may be sent and which host command gives it.
fn refuse_proxied_secrets(path: &Path, file: &FileConfig) -> Result<()> {
    if !file.secrets.proxied.is_empty() {
        anyhow::bail!("{}: [secrets.proxied] is read only from ~/{FILE_NAME}, never from a project's file (the guest can write it)", path.display());
    }
    Ok(())
}

/// The layer files of `project` that the guest can write: all but `~/.cvm.toml`.
pub fn project_layer_files(home: &Path, project: &Path) -> Vec<PathBuf> {
    layer_files(home, Some(project)).into_iter().filter(|f| *f != home.join(FILE_NAME)).collect()
}

/// Records a project's layer `file` as trusted, once it is valid; returns what it widens.
pub fn trust(file: &Path, home: &Path, store: &crate::trust::Store) -> Result<Vec<(&'static str, String)>> {
    let text = crate::host_files::read_text(file, file.parent(), crate::host_files::MAX_PROJECT_FILE)?;
    let parsed = parse_file(file, &text)?;
    refuse_proxied_secrets(file, &parsed)?;
    let widening = parsed.widening(file, home);
    Settings::defaults().apply_file(parsed, file, &text, home)?;
    store.trust(file, &text)?;
    Ok(widening)
}

/// Every layer but the flags: defaults, CI caps when `ci`, the files, the environment.
pub fn load(home: &Path, project: Option<&Path>, ci: bool, env: impl Fn(&str) -> Option<String>) -> Result<Settings> {
    let mut settings = Settings::defaults();
    if ci {
        settings.apply_ci(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    let trust = crate::trust::Store::new();
    for path in layer_files(home, project) {
        let (text, file) = read_layer(&path, home, &trust)?;
        settings.apply_file(file, &path, &text, home)?;
    }
    settings.apply_env(env)?;
    Ok(settings)
}

/// Checks one file as `load` would, without the other layers.
pub fn validate(path: &Path, home: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = parse_file(path, &text)?;
    Settings::defaults().apply_file(file, path, &text, home)?;
    Ok(())
}

/// `path` with `.` and `..` resolved by name (a file's `../data` is its sibling), as the
/// shell does; symlinks are the share checks' business.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(name) => out.push(name),
            _ => {}
        }
    }
    out
}

/// One `[secrets.proxied.NAME]` table as plain data.
fn proxied_secret(name: Spanned<String>, table: ProxiedTable, path: &dyn Fn(&str) -> PathBuf, at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError) -> Result<ProxiedSecret, ConfigError> {
    let (span, name) = (name.span(), name.into_inner());
    crate::environment::check_name(&name).map_err(|e| at(span.clone(), format!("secrets.proxied: {e}")))?;
    let hosts_span = table.hosts.span();
    let hosts = table.hosts.into_inner().into_iter().map(|h| crate::egress::parse_pattern(h.get_ref()).map_err(|e| at(h.span(), e))).collect::<Result<Vec<_>, _>>()?;
    if hosts.is_empty() {
        return Err(at(hosts_span, format!("secret {name} needs at least one host to go to")));
    }
    let mut sources = Vec::new();
    sources.extend(table.file.map(|f| SecretSource::File(path(&f))));
    sources.extend(table.env.map(SecretSource::Env));
    if let Some(command) = table.command {
        if command.get_ref().is_empty() {
            return Err(at(command.span(), format!("secret {name}: an empty command")));
        }
        sources.push(SecretSource::Command(command.into_inner()));
    }
    let source = match sources.len() {
        0 => SecretSource::SecretsFile,
        1 => sources.remove(0),
        _ => return Err(at(span, format!("secret {name}: give one of file, env and command"))),
    };
    Ok(ProxiedSecret { name, hosts, source, body: table.body })
}

fn check_cpus(cpus: u8) -> Result<u8, String> {
    if cpus == 0 {
        return Err("cpus must be at least 1".into());
    }
    Ok(cpus)
}

/// The name a value of a clap value enum is written as.
fn enum_name<T: clap::ValueEnum>(value: &T) -> String {
    value.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

fn parse_enum<T: clap::ValueEnum>(text: &str, what: &str) -> Result<T, String> {
    T::from_str(text, false).map_err(|_| {
        let names: Vec<String> = T::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_string()).collect();
        format!("unknown {what} {text:?} (expected {})", names.join(", "))
    })
}

fn map_list<T, U, E>(list: List<T>, f: impl Fn(T) -> Result<U, E>) -> Result<List<U>, E> {
    Ok(match list {
        List::Extend(items) => List::Extend(items.into_iter().map(f).collect::<Result<_, _>>()?),
        List::Replace { replace } => List::Replace { replace: replace.into_iter().map(f).collect::<Result<_, _>>()? },
    })
}

/// A `[[mounts]]` entry: the host path may be relative to the file; the guest path is
/// absolute (or under `~`) and defaults to the host path.
fn mount(table: MountTable, path: &impl Fn(&str) -> PathBuf, home: &Path, at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError) -> Result<MountSpec, ConfigError> {
    let host = path(table.host.get_ref());
    let guest = table.guest.as_deref().map_or_else(|| host.clone(), |g| expand_home(g, home));
    let spec = format!("{}:{}:{}", host.display(), guest.display(), if table.read_only { "ro" } else { "rw" });
    crate::shares::parse_mount_spec(&spec, home).map_err(|e| at(table.host.span(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: &str = "/home/dev";

    /// Pieces of configuration files, valid and not, to build hostile files from.
    const PIECES: &[&str] = &[
        "[vm]\n", "cpus = 2\n", "cpus = 0\n", "cpus = 300\n", "memory = \"1T\"\n", "memory = \"12Q\"\n", "timeout = \"-1s\"\n",
        "vmm = \"qemu\"\n", "image = \"/etc/passwd\"\n", "[network]\n", "mode = \"open\"\n", "allow = [\"*.x\", \"\"]\n",
        "allow = { replace = [] }\n", "allow = { replace = 3 }\n", "hosts = [\"a:1.2.3.4\", \"b:nope\"]\n", "[[mounts]]\n",
        "host = \"~\"\n", "host = \"../../..\"\n", "guest = \"/\"\n", "read_only = true\n", "[tools]\n", "node = true\n",
        "cobol = true\n", "[runtime]\n", "scripts = [\"../x.sh\"]\n", "[secrets]\n", "env_file = \"/dev/zero\"\n", "[secrets.proxied.T]\n", "hosts = [\"a.test\"]\n", "command = []\n", "env = \"X\"\n", "[[", "]]\n",
        "= \"\n", "\u{0}", "\u{feff}", "\"\"\"\n", "x.y.z = 1\n", "[vm.cpus]\n",
    ];

    // Cases: PROPTEST_CASES (scripts/test sets thousands; more by hand for a soak).
    proptest::proptest! {
        /// Any file, from the user or planted by a guest: parsed and applied, or refused at a
        /// line and column inside it. Never a panic.
        #[test]
        fn any_file_is_applied_or_refused_at_a_place_in_it(pieces in proptest::collection::vec(proptest::sample::select(PIECES), 0..12), noise in ".{0,20}") {
            let text = pieces.concat() + &noise;
            let path = Path::new("/p/.cvm.toml");
            let result = parse_file(path, &text).and_then(|file| {
                let _ = file.widening(path, Path::new(HOME));
                Settings::defaults().apply_file(file, path, &text, Path::new(HOME))
            });
            if let Err(e) = result {
                proptest::prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1) + 1, "{e} in {text:?}");
            }
        }
    }

    /// Applies each (file name, text) as a layer, in order.
    fn layered(files: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut settings = Settings::defaults();
        for (name, text) in files {
            let path = Path::new(name);
            let file = parse_file(path, text)?;
            settings.apply_file(file, path, text, Path::new(HOME))?;
        }
        Ok(settings)
    }

    #[test]
    fn proxied_secrets_are_declared_in_the_users_file_only_and_shown_as_placeholders() {
        let global = "[secrets.proxied.GH_TOKEN]\nhosts = [\"github.com\", \"*.github.com\"]\ncommand = [\"gh\", \"auth\", \"token\"]\n[secrets.proxied.KEY]\nhosts = [\"api.test\"]\nfile = \"~/.key\"\n";
        let s = layered(&[("/home/dev/.cvm.toml", global)]).unwrap();
        let sources: Vec<&SecretSource> = s.proxied_secrets.value.iter().map(|p| &p.source).collect();
        assert_eq!(sources, [&SecretSource::Command(vec!["gh".into(), "auth".into(), "token".into()]), &SecretSource::File("/home/dev/.key".into())]);
        let shown = s.show();
        assert!(shown.lines().any(|l| l.starts_with("secrets.proxied.GH_TOKEN") && l.contains("placeholder in the guest") && l.contains("\"*.github.com\"") && l.contains("command `gh auth token`")), "{shown}");
        for (text, says) in [
            ("[secrets.proxied.K]\nhosts = []\n", "at least one host"),
            ("[secrets.proxied.K]\nhosts = [\"a b\"]\n", "bad host pattern"),
            ("[secrets.proxied.1K]\nhosts = [\"a.test\"]\n", "not a variable name"),
            ("[secrets.proxied.K]\nhosts = [\"a.test\"]\nenv = \"A\"\nfile = \"/f\"\n", "one of file, env and command"),
            ("[secrets.proxied.K]\nhosts = [\"a.test\"]\ncommand = []\n", "empty command"),
            ("[secrets.proxied.K]\nhosts = [\"a.test\"]\nvalue = \"inline\"\n", "unknown field"),
        ] {
            let e = layered(&[("/home/dev/.cvm.toml", text)]).unwrap_err();
            assert!(e.to_string().contains(says), "{text:?}: {e}");
        }
        // A project's file, which the guest can write, may not declare one, trusted or not.
        let dir = tempfile::tempdir().unwrap();
        let project_file = dir.path().join(".cvm.toml");
        std::fs::write(&project_file, global).unwrap();
        let store = crate::trust::Store::at(dir.path().join("trusted"));
        for e in [read_layer(&project_file, Path::new(HOME), &store).unwrap_err(), trust(&project_file, Path::new(HOME), &store).unwrap_err()] {
            assert!(e.to_string().contains("[secrets.proxied] is read only from ~/.cvm.toml"), "{e}");
        }
    }

    fn file(name: &str) -> Source {
        Source::File(name.into())
    }

    #[test]
    fn a_project_value_equal_to_the_default_still_overrides_the_global_one() {
        let s = layered(&[("/home/dev/.cvm.toml", "[vm]\ncpus = 4\nmemory = \"2G\"\n"), ("/p/.cvm.toml", "[vm]\ncpus = 2\n")]).unwrap();
        assert_eq!(s.cpus, Sourced { value: 2, sources: vec![file("/p/.cvm.toml")] });
        assert_eq!(s.memory, Sourced { value: 2 << 30, sources: vec![file("/home/dev/.cvm.toml")] }, "a key the project leaves alone stays global");
    }

    #[test]
    fn a_tool_turned_off_by_the_project_stays_off() {
        let s = layered(&[("/home/dev/.cvm.toml", "[tools]\nnode = true\npython = true\n"), ("/p/.cvm.toml", "[tools]\nnode = false\n")]).unwrap();
        assert_eq!(s.tools_on(), ["python"]);
        assert_eq!(s.tools["node"].sources, [file("/p/.cvm.toml")]);
    }

    #[test]
    fn claude_args_are_never_duplicated() {
        let s = layered(&[
            ("/home/dev/.cvm.toml", "[defaults]\nclaude_args = [\"--model\", \"opus\", \"--verbose\"]\n"),
            ("/p/.cvm.toml", "[defaults]\nclaude_args = [\"--verbose\", \"--dangerously-skip-permissions\"]\n"),
        ])
        .unwrap();
        assert_eq!(s.agent_command(), ["claude", "--dangerously-skip-permissions", "--model", "opus", "--verbose"]);
        let s = layered(&[("/p/.cvm.toml", "[defaults]\ncommand = [\"bash\", \"-l\"]\n")]).unwrap();
        assert_eq!(s.agent_command(), ["bash", "-l"]);
    }

    #[test]
    fn lists_extend_unless_they_say_replace() {
        let s = layered(&[
            ("/home/dev/.cvm.toml", "[packages]\nsystem = [\"jq\", \"make\"]\n[network]\nallow = [\"example.com\"]\n"),
            ("/p/.cvm.toml", "[packages]\nsystem = [\"make\", \"zip\"]\n[network]\nallow = { replace = [\"api.anthropic.com\"] }\n"),
        ])
        .unwrap();
        assert_eq!(s.packages.value, ["jq", "make", "zip"]);
        assert_eq!(s.packages.sources, [file("/home/dev/.cvm.toml"), file("/p/.cvm.toml")]);
        assert_eq!(s.allow.value, ["api.anthropic.com"]);
        assert_eq!(s.allow.sources, [file("/p/.cvm.toml")]);
        let s = layered(&[("/p/.cvm.toml", "[network]\nallow = [\"example.com\"]\n")]).unwrap();
        assert!(s.allow.value.len() > 1 && s.allow.value.last().unwrap() == "example.com", "the default list is extended");
    }

    #[test]
    fn env_overrides_files_and_flags_override_env() {
        let mut s = layered(&[("/p/.cvm.toml", "[vm]\ncpus = 4\nmemory = \"1G\"\nvmm = \"qemu\"\n")]).unwrap();
        s.apply_env(|name| (name == "CVM_CPUS").then(|| "3".to_string())).unwrap();
        assert_eq!((s.cpus.value, &s.cpus.sources[..]), (3, &[Source::Env("CVM_CPUS")][..]));
        s.apply_flags(Flags { cpus: Some(1), mounts: vec![], ..Flags::default() });
        assert_eq!((s.cpus.value, &s.cpus.sources[..]), (1, &[Source::Flag][..]));
        assert_eq!(s.vmm.value, Engine::Qemu);
        assert_eq!(s.memory.value, 1 << 30);
        for (name, value) in [("CVM_CPUS", "0"), ("CVM_CPUS", "many"), ("CVM_MEMORY", "lots"), ("CVM_VMM", "xen"), ("CVM_NETWORK", "wide"), ("CVM_TIMEOUT", "soon")] {
            let err = Settings::defaults().apply_env(|n| (n == name).then(|| value.to_string())).unwrap_err();
            assert!(err.to_string().starts_with(&format!("${name}: ")), "{err}");
        }
    }

    #[test]
    fn ci_caps_apply_and_can_be_overridden() {
        let mut s = Settings::defaults();
        s.apply_ci(1);
        assert_eq!((s.cpus.value, s.timeout.value), (1, Some(CI_TIMEOUT)));
        assert_eq!(s.timeout.sources, [Source::Ci]);
        let path = Path::new("/p/.cvm.toml");
        let text = "[vm]\ntimeout = \"10m\"\n";
        s.apply_file(parse_file(path, text).unwrap(), path, text, Path::new(HOME)).unwrap();
        assert_eq!(s.timeout.value, Some(Duration::from_secs(600)));
    }

    #[test]
    fn paths_are_relative_to_their_file_and_home() {
        let s = layered(&[(
            "/p/.cvm.toml",
            "[runtime]\nscripts = [\"ci/env.sh\", \"~/x.sh\", \"/abs.sh\"]\n[[mounts]]\nhost = \"../data\"\nguest = \"/data\"\nread_only = true\n[[setup.mounts]]\nhost = \"~/cache\"\n[secrets]\nenv_file = \"secrets.env\"\n",
        )])
        .unwrap();
        assert_eq!(s.runtime_scripts.value, [PathBuf::from("/p/ci/env.sh"), "/home/dev/x.sh".into(), "/abs.sh".into()]);
        assert_eq!(s.mounts.value, [MountSpec { host: "/data".into(), guest: "/data".into(), read_only: true }]);
        assert_eq!(s.setup_mounts.value, [MountSpec { host: "/home/dev/cache".into(), guest: "/home/dev/cache".into(), read_only: false }]);
        assert_eq!(s.secrets_file.value, Some(PathBuf::from("/p/secrets.env")));
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let cases = [
            ("[vm]\ncpus = 2\nmemroy = \"1G\"\n", 3, 1, "unknown field `memroy`"),
            ("[vm]\nmemory = \"lots\"\n", 2, 10, "invalid memory size"),
            ("[vm]\nvmm = \"xen\"\n", 2, 7, "unknown vmm \"xen\""),
            ("[vm]\ncpus = 0\n", 2, 8, "at least 1"),
            ("[vm]\ncpus = 300\n", 2, 8, ""),
            ("[tools]\nnode = true\ncobol = true\n", 3, 1, "unknown tool \"cobol\""),
            ("[network]\nmode = \"wide\"\n", 2, 8, "unknown network mode"),
            ("[network]\nhosts = [\"db\"]\n", 2, 10, "expected NAME:IP"),
            ("[network]\nallow = [\"exa mple.com\"]\n", 2, 10, ""),
            ("[[mounts]]\nhost = \"/data\"\nguest = \"relative\"\n", 2, 8, "absolute"),
            ("[sandbox]\n", 1, 2, "unknown field `sandbox`"),
            ("[vm\n", 1, 4, ""),
        ];
        for (text, line, column, message) in cases {
            let err = layered(&[("/p/.cvm.toml", text)]).unwrap_err();
            assert_eq!((err.line, err.column), (line, column), "{text:?}: {err}");
            assert!(err.message.contains(message), "{text:?}: {err}");
            assert!(err.to_string().starts_with(&format!("/p/.cvm.toml:{line}:{column}: ")), "{err}");
        }
    }

    #[test]
    fn a_worktree_reads_its_main_repositorys_file_before_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let (main, wt) = crate::shares::fake_worktree(dir.path());
        for d in [&home, &main, &wt] {
            std::fs::write(d.join(FILE_NAME), "").unwrap();
        }
        let main = main.canonicalize().unwrap();
        assert_eq!(layer_files(&home, Some(&wt)), [home.join(FILE_NAME), main.join(FILE_NAME), wt.join(FILE_NAME)]);
        assert_eq!(layer_files(&home, Some(&main)), [home.join(FILE_NAME), main.join(FILE_NAME)], "the main checkout reads its own once");
        assert_eq!(layer_files(&home, None), [home.join(FILE_NAME)]);
        std::fs::remove_file(home.join(FILE_NAME)).unwrap();
        assert_eq!(layer_files(&home, None), Vec::<PathBuf>::new(), "missing files are no layers");
    }

    #[test]
    fn show_names_every_source_and_no_secret() {
        let s = layered(&[("/home/dev/.cvm.toml", "[vm]\ncpus = 4\n[secrets]\nenv_file = \"/s.env\"\n")]).unwrap();
        let shown = s.show();
        assert!(shown.lines().any(|l| l.starts_with("vm.cpus") && l.contains("= 4") && l.ends_with("# /home/dev/.cvm.toml")), "{shown}");
        assert!(shown.lines().any(|l| l.starts_with("vm.memory") && l.ends_with("# default")), "{shown}");
        assert!(shown.lines().any(|l| l.starts_with("secrets.env_file") && l.contains("/s.env")), "{shown}");
    }
}
