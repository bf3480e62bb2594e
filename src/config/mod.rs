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
use toml::Spanned;

use crate::guest::shares::{expand_home, MountSpec};
use crate::host::host_files::normalize;
use crate::host::CONFIG_FILE;
use crate::network::egress::NetworkMode;
use crate::network::secrets::{ProxiedSecret, SecretSource};
use cvm_vmm::Engine;

mod file;
pub mod keys;
pub mod trust_store;

pub use file::{parse_file, ConfigError, FileConfig, List, MountTable, ProxiedTable};

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

    /// A layer merged into the value (a table whose entries override by name): the merged
    /// value, with this layer among its sources.
    fn add(&mut self, value: T, source: Source) {
        self.value = value;
        self.sources.retain(|s| *s != Source::Default);
        self.sources.push(source);
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

/// What `cvm run` runs when no command is given: the coding agent, allowed to act without
/// asking (the VM is the sandbox).
pub const AGENT_COMMAND: &[&str] = &["claude", "--dangerously-skip-permissions"];

/// What cvm itself sets in the guest, or reads as its own configuration (`CVM_*`): a
/// configuration file's `[env]` may not set these (the flags may: they are the user's).
const SET_BY_CVM: &[&str] = &["HOME", "USER", "LOGNAME", "TERM", "SSH_AUTH_SOCK", "GNUPGHOME", "NODE_EXTRA_CA_CERTS"];

/// A name `[env]` may set: a variable name, neither cvm's own nor one cvm sets in the guest
/// (the proxy's, the CA's, the forwarded sockets', the user's identity).
pub fn check_configurable(name: &str) -> Result<(), String> {
    crate::host::environment::check_name(name)?;
    let proxy = crate::network::egress::guest_environment().into_iter().any(|(n, _)| n == name.as_bytes());
    if name.starts_with("CVM_") || proxy || SET_BY_CVM.contains(&name) {
        return Err(format!("{name} is cvm's to set: [env] cannot change it"));
    }
    Ok(())
}

/// `vm.vmm`: which monitor runs a session's VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VmmChoice {
    /// cvm's own VMM where /dev/kvm is hardware KVM, else QEMU.
    Auto,
    /// cvm's own VMM; refused where /dev/kvm cannot run Linux.
    Cvm,
    /// QEMU's microvm machine: KVM where it can, else TCG (slow).
    Qemu,
}

impl VmmChoice {
    /// The engine this choice runs on this host; for `auto`, also the line that tells the
    /// user which one and why.
    pub fn engine(self) -> (Engine, Option<String>) {
        match self {
            VmmChoice::Cvm => (Engine::Cvm, None),
            VmmChoice::Qemu => (Engine::Qemu, None),
            VmmChoice::Auto => match cvm_vmm::host::hardware_kvm() {
                Ok(()) => (Engine::Cvm, Some(format!("cvm: using cvm's VMM: {} is hardware KVM", cvm_vmm::host::kvm_device().display()))),
                Err(why) => (Engine::Qemu, Some(format!("cvm: using QEMU, since cvm's VMM cannot run here: {why}"))),
            },
        }
    }
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub cpus: Sourced<u8>,
    pub memory: Sourced<u64>,
    pub disk: Sourced<Option<u64>>,
    /// The most the guest may add to each writable share; none: what the share's file system
    /// has free, less a reserve.
    pub share_quota: Sourced<Option<u64>>,
    pub vmm: Sourced<VmmChoice>,
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
    /// `[env]`: what every command gets, by name, below `--env-file`, `--inherit-env` and `-e`.
    pub env: Sourced<Vec<(String, String)>>,
}

impl Settings {
    /// Layer 1: what cvm does with no configuration at all.
    pub fn defaults() -> Settings {
        Settings {
            cpus: Sourced::default(2),
            memory: Sourced::default(512 << 20),
            disk: Sourced::default(None),
            share_quota: Sourced::default(None),
            vmm: Sourced::default(VmmChoice::Auto),
            image: Sourced::default("debian".into()),
            timeout: Sourced::default(None),
            tools: crate::project::template::CAPABILITIES.iter().map(|c| (c.name.to_string(), Sourced::default(false))).collect(),
            packages: Sourced::default(Vec::new()),
            setup_scripts: Sourced::default(Vec::new()),
            setup_mounts: Sourced::default(Vec::new()),
            runtime_scripts: Sourced::default(Vec::new()),
            claude_args: Sourced::default(Vec::new()),
            command: Sourced::default(None),
            instructions: Sourced::default(None),
            instructions_file: Sourced::default(None),
            network: Sourced::default(NetworkMode::Proxy),
            allow: Sourced::default(crate::network::egress::DEFAULT_ALLOW.iter().map(|s| s.to_string()).collect()),
            deny: Sourced::default(Vec::new()),
            hosts: Sourced::default(Vec::new()),
            mounts: Sourced::default(Vec::new()),
            secrets_file: Sourced::default(Some(crate::xdg_dir("XDG_CONFIG_HOME", ".config").join("cvm/secrets.env"))),
            proxied_secrets: Sourced::default(Vec::new()),
            env: Sourced::default(Vec::new()),
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
        for (name, value) in file.vm {
            let key = format!("vm.{}", name.get_ref());
            let Some(key) = keys::key(&key) else {
                let known: Vec<&str> = keys::KEYS.iter().filter_map(|k| k.name.strip_prefix("vm.")).collect();
                return Err(at(name.span(), format!("unknown key `{}` in [vm] (known: {})", name.get_ref(), known.join(", "))));
            };
            (key.set)(self, &value.get_ref().0, source.clone()).map_err(|e| at(value.span(), e))?;
        }
        for (name, on) in file.tools {
            let span = name.span();
            let Some(tool) = self.tools.get_mut(name.get_ref()) else {
                let known: Vec<&str> = crate::project::template::CAPABILITIES.iter().map(|c| c.name).collect();
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
            let key = keys::key("network.mode").expect("network.mode is a key");
            (key.set)(self, &mode.get_ref().0, source.clone()).map_err(|e| at(mode.span(), e))?;
        }
        if let Some(allow) = network.allow {
            self.allow.apply(
                map_list(allow, |p| crate::network::egress::parse_pattern(p.get_ref()).map_err(|e| at(p.span(), e)))?,
                source.clone(),
            );
        }
        if let Some(deny) = network.deny {
            self.deny.apply(
                map_list(deny, |p| crate::network::egress::parse_pattern(p.get_ref()).map_err(|e| at(p.span(), e)))?,
                source.clone(),
            );
        }
        if let Some(hosts) = network.hosts {
            self.hosts.apply(
                map_list(hosts, |h| crate::network::egress::parse_add_host(h.get_ref()).map_err(|e| at(h.span(), e)))?,
                source.clone(),
            );
        }
        if !file.mounts.is_empty() {
            let mounts = file.mounts.into_iter().map(|m| mount(m, &path, home, &at)).collect::<Result<Vec<_>, _>>()?;
            self.mounts.apply(List::Extend(mounts), source.clone());
        }
        if let Some(env_file) = file.secrets.env_file {
            self.secrets_file.set(Some(path(&env_file)), source.clone());
        }
        if !file.env.is_empty() {
            let mut env = self.env.value.clone();
            for (name, value) in file.env {
                check_configurable(name.get_ref()).map_err(|e| at(name.span(), e))?;
                env.retain(|(n, _)| n != name.get_ref());
                env.push((name.into_inner(), value.into_inner()));
            }
            self.env.add(env, source.clone());
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
        for key in keys::KEYS {
            if let Some((name, value)) = key.env.and_then(|name| Some((name, var(name)?))) {
                (key.set)(self, &value, Source::Env(name)).map_err(|e| anyhow::anyhow!("${name}: {e}"))?;
            }
        }
        Ok(())
    }

    /// Layer 7: what the command line set.
    pub fn apply_flags(&mut self, flags: Flags) {
        let f = || Source::Flag;
        self.cpus.set_given(flags.cpus, f());
        self.memory.set_given(flags.memory, f());
        self.disk.set_given(flags.disk.map(Some), f());
        self.share_quota.set_given(flags.share_quota.map(Some), f());
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
        let mut argv: Vec<String> = AGENT_COMMAND.iter().map(|s| s.to_string()).collect();
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
            text.push(
                crate::host::host_files::read_text(path, project, crate::host::host_files::MAX_PROJECT_FILE)
                    .context("[context] instructions_file")?,
            );
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
        let mounts = |items: &[MountSpec]| {
            list(
                &items
                    .iter()
                    .map(|m| format!("{}:{}:{}", m.host.display(), m.guest.display(), if m.read_only { "ro" } else { "rw" }))
                    .collect::<Vec<_>>(),
            )
        };
        for key in keys::KEYS {
            let (value, sources) = (key.show)(self);
            line(key.name, value, sources);
        }
        for (name, on) in &self.tools {
            line(&format!("tools.{name}"), on.value.to_string(), &on.sources);
        }
        line("packages.system", list(&self.packages.value), &self.packages.sources);
        line("setup.scripts", paths(&self.setup_scripts.value), &self.setup_scripts.sources);
        line("setup.mounts", mounts(&self.setup_mounts.value), &self.setup_mounts.sources);
        line("runtime.scripts", paths(&self.runtime_scripts.value), &self.runtime_scripts.sources);
        line("defaults.claude_args", list(&self.claude_args.value), &self.claude_args.sources);
        line("defaults.command", self.command.value.as_deref().map_or("none (Claude Code)".into(), list), &self.command.sources);
        line(
            "context.instructions",
            self.instructions.value.as_ref().map_or("none".into(), |t| format!("{t:?}")),
            &self.instructions.sources,
        );
        line(
            "context.instructions_file",
            self.instructions_file.value.as_ref().map_or("none".into(), |p| format!("{:?}", p.display().to_string())),
            &self.instructions_file.sources,
        );
        line("network.allow", list(&self.allow.value), &self.allow.sources);
        line("network.deny", list(&self.deny.value), &self.deny.sources);
        line("network.hosts", list(&self.hosts.value.iter().map(|(n, ip)| format!("{n}:{ip}")).collect::<Vec<_>>()), &self.hosts.sources);
        line("mounts", mounts(&self.mounts.value), &self.mounts.sources);
        line(
            "secrets.env_file",
            self.secrets_file.value.as_ref().map_or("none".into(), |p| format!("{:?}", p.display().to_string())),
            &self.secrets_file.sources,
        );
        for secret in &self.proxied_secrets.value {
            let place = if secret.body { "headers and bodies" } else { "headers" };
            let value = format!("placeholder in the guest; swapped in {place} for {} from {}", list(&secret.hosts), secret.source);
            line(&format!("secrets.proxied.{}", secret.name), value, &self.proxied_secrets.sources);
        }
        for (name, value) in &self.env.value {
            line(&format!("env.{name}"), format!("{value:?}"), &self.env.sources);
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
    pub share_quota: Option<u64>,
    pub vmm: Option<VmmChoice>,
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

/// The layer files for a session on `project` (or none), lowest first, those that exist.
pub fn layer_files(home: &Path, project: Option<&Path>) -> Vec<PathBuf> {
    let mut files = vec![home.join(CONFIG_FILE)];
    if let Some(project) = project {
        if let Some(main) = crate::guest::shares::main_repository(project) {
            files.push(main.join(CONFIG_FILE));
        }
        files.push(project.join(CONFIG_FILE));
    }
    let mut seen = Vec::new();
    files.retain(|f| {
        f.is_file() && !seen.contains(f) && {
            seen.push(f.clone());
            true
        }
    });
    files
}

/// Reads and parses one layer file. A project's file (any but `~/.cvm.toml`) is one the guest
/// can write: it is read only by ways that stay in its directory, and one whose settings
/// widen the sandbox must be trusted as it is ([`crate::config::trust`]).
pub fn read_layer(path: &Path, home: &Path, trust: &crate::config::trust_store::Store) -> Result<(String, FileConfig)> {
    let own_dir = path.parent().filter(|_| path != home.join(CONFIG_FILE));
    let text = crate::host::host_files::read_text(path, own_dir, crate::host::host_files::MAX_PROJECT_FILE)?;
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
        anyhow::bail!(
            "{}: [secrets.proxied] is read only from ~/{CONFIG_FILE}, never from a project's file (the guest can write it)",
            path.display()
        );
    }
    Ok(())
}

/// The layer files of `project` that the guest can write: all but `~/.cvm.toml`.
pub fn project_layer_files(home: &Path, project: &Path) -> Vec<PathBuf> {
    layer_files(home, Some(project)).into_iter().filter(|f| *f != home.join(CONFIG_FILE)).collect()
}

/// Records a project's layer `file` as trusted, once it is valid; returns what it widens.
pub fn trust(file: &Path, home: &Path, store: &crate::config::trust_store::Store) -> Result<Vec<(&'static str, String)>> {
    let text = crate::host::host_files::read_text(file, file.parent(), crate::host::host_files::MAX_PROJECT_FILE)?;
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
    let trust = crate::config::trust_store::Store::new();
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

/// One `[secrets.proxied.NAME]` table as plain data.
fn proxied_secret(
    name: Spanned<String>,
    table: ProxiedTable,
    path: &dyn Fn(&str) -> PathBuf,
    at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<ProxiedSecret, ConfigError> {
    let (span, name) = (name.span(), name.into_inner());
    crate::host::environment::check_name(&name).map_err(|e| at(span.clone(), format!("secrets.proxied: {e}")))?;
    let hosts_span = table.hosts.span();
    let hosts = table
        .hosts
        .into_inner()
        .into_iter()
        .map(|h| crate::network::egress::parse_pattern(h.get_ref()).map_err(|e| at(h.span(), e)))
        .collect::<Result<Vec<_>, _>>()?;
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
    let headers = table
        .headers
        .into_iter()
        .map(|h| {
            let valid =
                !h.get_ref().is_empty() && h.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if valid {
                Ok(h.get_ref().to_ascii_lowercase())
            } else {
                Err(at(h.span(), format!("secret {name}: {:?} is not a header name", h.get_ref())))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ProxiedSecret { name, hosts, source, body: table.body, headers })
}

/// The name a value of a clap value enum is written as.
fn enum_name<T: clap::ValueEnum>(value: &T) -> String {
    value.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

fn parse_enum<T: clap::ValueEnum>(text: &str, what: &str) -> Result<T, String> {
    T::from_str(text, false).map_err(|_| {
        let names: Vec<String> =
            T::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_string()).collect();
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
fn mount(
    table: MountTable,
    path: &impl Fn(&str) -> PathBuf,
    home: &Path,
    at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<MountSpec, ConfigError> {
    let host = path(table.host.get_ref());
    let guest = table.guest.as_deref().map_or_else(|| host.clone(), |g| expand_home(g, home));
    MountSpec::new(host, guest, table.read_only).map_err(|e| at(table.host.span(), format!("bad mount: {e}")))
}

#[cfg(test)]
mod tests;
