//! The launch step: the flags every session command shares, over the configuration layers,
//! become one `SessionConfig` here and nowhere else.

use super::*;

/// The VM a session runs in. Values left out come from the configuration layers (see
/// `cvm config show`): defaults, CI caps, ~/.cvm.toml, the main repository's and the project's
/// .cvm.toml, then CVM_* variables.
#[derive(clap::Args, Clone)]
pub(crate) struct VmArgs {
    /// Which monitor runs the VM: `auto` (cvm's own where /dev/kvm is hardware KVM, else
    /// QEMU; one line on stderr says which and why), `cvm` (needs hardware KVM) or `qemu`
    /// (TCG where there is no hardware KVM). [config: vm.vmm, CVM_VMM; default: auto]
    #[arg(long = "vmm", value_enum)]
    pub engine: Option<VmmChoice>,
    /// Root image: `debian` (Debian with Claude Code, from scripts/build-image), `minimal`
    /// (cvm-agent and busybox in an initramfs, from scripts/build-initramfs) or a path to an
    /// image of either kind. [config: vm.image, CVM_IMAGE; default: debian]
    #[arg(long)]
    pub image: Option<String>,
    /// Guest kernel (default: the one scripts/build-kernel built; also CVM_KERNEL).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Number of vCPUs. [config: vm.cpus, CVM_CPUS; default: 2]
    #[arg(long, value_parser = cvm::config::keys::parse_cpus)]
    pub cpus: Option<u8>,
    /// Guest memory: 512M, 2G, ... (a bare number is MiB). [config: vm.memory, CVM_MEMORY;
    /// default: 512M]
    #[arg(long, value_parser = parse_memory_size)]
    pub memory: Option<u64>,
    /// Stop everything and exit 124 after this long: 30s, 5m, 1h. [config: vm.timeout,
    /// CVM_TIMEOUT; default: none, 1h in CI]
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Put the session's writable layer on a sparse scratch disk of this size (8G, 500M; a
    /// bare number is MiB) instead of in memory; gone when the session ends. Disk images only.
    /// [config: vm.disk, CVM_DISK]
    #[arg(long, value_parser = parse_memory_size)]
    pub disk: Option<u64>,
    /// The most the guest may add to the writable shares on one file system, together (file
    /// sizes, sparse or not, net of what it removes; 20G, 500M), split evenly among them; past
    /// it the guest gets "Disk quota exceeded". [config: vm.share_quota, CVM_SHARE_QUOTA;
    /// default: what the file system has free, less a tenth of its size (at least 1 GiB); new
    /// files likewise]
    #[arg(long, value_parser = parse_memory_size)]
    pub share_quota: Option<u64>,
    /// Show the guest's console (kernel and agent messages) when the session ends.
    #[arg(long)]
    pub debug: bool,
    /// Boot the guest: neither restore a warm-start snapshot (cvm's VMM restores the first
    /// session's guest, snapshotted where its init started) nor make one.
    #[arg(long)]
    pub cold: bool,
    /// Also share a host directory: /host[:/guest][:ro|rw] (the guest path defaults to the host
    /// path; `~` is your home). Read-only is enforced by cvm's file server. Repeatable.
    /// [config: [[mounts]]]
    #[arg(long = "mount", value_name = "SPEC", value_parser = parse_mount)]
    pub mounts: Vec<MountSpec>,
    /// Leave the project's conversation folder (~/.claude/projects/<project>) out of the guest.
    #[arg(long)]
    pub no_conversations: bool,
    /// Where this host allows the file servers no sandbox (no namespaces, not root), serve the
    /// shares without one rather than refuse to start (see `cvm doctor`).
    #[arg(long)]
    pub allow_unsandboxed_fs: bool,
    /// How the guest reaches the outside: `proxy` (allow-listed HTTP and HTTPS through a
    /// proxy on the host), `none`, or `open` (raw TCP and UDP through passt: no allow-list).
    /// [config: network.mode, CVM_NETWORK; default: proxy]
    #[arg(long, value_enum)]
    pub network: Option<NetworkMode>,
    /// Also allow this host name through the proxy (`*.example.com` for its subdomains).
    /// Repeatable. [config: network.allow]
    #[arg(long = "allow", value_name = "NAME", value_parser = cvm::network::egress::parse_pattern)]
    pub allow: Vec<String>,
    /// Refuse this host name even if allowed. Repeatable. [config: network.deny]
    #[arg(long = "deny", value_name = "NAME", value_parser = cvm::network::egress::parse_pattern)]
    pub deny: Vec<String>,
    /// Resolve NAME to IP for the proxy (docker's --add-host); such a name may point at a
    /// private or loopback address. Repeatable. [config: network.hosts]
    #[arg(long = "add-host", value_name = "NAME:IP", value_parser = cvm::network::egress::parse_add_host)]
    pub add_hosts: Vec<(String, std::net::IpAddr)>,
    /// Set a variable for every command: NAME=VALUE. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE", value_parser = cvm::host::environment::parse_pair)]
    pub env: Vec<(String, String)>,
    /// Read variables from a file of NAME=VALUE lines. Repeatable.
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_files: Vec<PathBuf>,
    /// Pass this variable of yours on to every command (skipped if unset). Repeatable.
    #[arg(long = "inherit-env", value_name = "NAME", value_parser = cvm::host::environment::parse_name)]
    pub inherit_env: Vec<String>,
    /// A script sourced before the command, in the same shell, after the project's own
    /// .cvm.runtime.sh; a failure stops the run with its status. Repeatable.
    /// [config: runtime.scripts]
    #[arg(long = "runtime-script", value_name = "FILE")]
    pub runtime_scripts: Vec<PathBuf>,
}

/// What crosses between host and guest besides the shares: not for `cvm setup`, whose
/// `--gpg` is a tool to install.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct ForwardArgs {
    /// Publish a guest TCP port on the host's 127.0.0.1: HOSTPORT:GUESTPORT. Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "HOSTPORT:GUESTPORT", value_parser = cvm::network::forward::parse_publish)]
    pub publish: Vec<cvm::network::forward::Publish>,
    /// Let the guest reach 127.0.0.1:PORT on the host at its own 127.0.0.1:PORT (a local
    /// database, an MCP server). Repeatable.
    #[arg(long = "host-port", value_name = "PORT", value_parser = cvm::network::forward::parse_host_port)]
    pub host_ports: Vec<u16>,
    /// Give the guest an SSH_AUTH_SOCK that reaches your SSH agent ($SSH_AUTH_SOCK).
    #[arg(short = 'A', long = "forward-ssh-agent")]
    pub forward_ssh_agent: bool,
    /// Give the guest your GPG agent (its extra socket: sign and decrypt, no key export) and
    /// your public keyring, in GNUPGHOME=/run/cvm/gnupg.
    #[arg(long = "gpg")]
    pub forward_gpg_agent: bool,
}

impl ForwardArgs {
    pub(crate) fn request(&self) -> anyhow::Result<ForwardRequest> {
        Ok(ForwardRequest {
            publish: self.publish.clone(),
            host_ports: self.host_ports.clone(),
            ssh_agent: match self.forward_ssh_agent {
                true => Some(
                    std::env::var_os("SSH_AUTH_SOCK")
                        .map(PathBuf::from)
                        .ok_or_else(|| anyhow::anyhow!("-A: SSH_AUTH_SOCK is not set (is ssh-agent running?)"))?,
                ),
                false => None,
            },
            gpg_agent: if self.forward_gpg_agent { Some(cvm::network::forward::GpgAgent::from_host()?) } else { None },
        })
    }
}

impl VmArgs {
    /// What these flags set, as the top configuration layer.
    pub(crate) fn flags(&self) -> Flags {
        Flags {
            cpus: self.cpus,
            memory: self.memory,
            disk: self.disk,
            share_quota: self.share_quota,
            vmm: self.engine,
            image: self.image.clone(),
            timeout: self.timeout,
            network: self.network,
            runtime_scripts: self.runtime_scripts.clone(),
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            hosts: self.add_hosts.clone(),
            mounts: self.mounts.clone(),
            ..Flags::default()
        }
    }
}

/// The configuration layers for a session on `project`, with `flags` on top.
pub(crate) fn settings(flags: Flags, project: Option<&Path>) -> anyhow::Result<Settings> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let mut settings = cvm::config::load(&home_dir(), project, ci, |name| std::env::var(name).ok())?;
    settings.apply_flags(flags);
    Ok(settings)
}

pub(crate) fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default()
}

/// The session `settings` and the per-run flags describe. Secrets only where asked: a
/// template's set-up never sees them.
pub(crate) fn session_config(
    settings: &Settings,
    args: &VmArgs,
    forwards: ForwardRequest,
    project: Option<PathBuf>,
    with_secrets: bool,
) -> anyhow::Result<SessionConfig> {
    if settings.network.value == NetworkMode::Open
        && !(settings.allow.sources == [Source::Default] && settings.deny.value.is_empty() && settings.hosts.value.is_empty())
    {
        anyhow::bail!(
            "--allow, --deny and --add-host (network.allow, deny, hosts) are rules of the proxy: --network open has no allow-list"
        );
    }
    let mut env = Environment::default();
    for (name, value) in &settings.env.value {
        env.set(name.clone(), value.clone());
    }
    // Files inside the project are the guest's to write: read only by ways that stay inside.
    let root = project.as_deref().and_then(|p| p.canonicalize().ok());
    let mut secrets = Vec::new();
    if with_secrets {
        let mut secrets_file = match &settings.secrets_file.value {
            Some(path) => cvm::host::environment::read_secrets(path, root.as_deref())?,
            None => Environment::default(),
        };
        secrets = cvm::network::secrets::resolve(&settings.proxied_secrets.value, &mut secrets_file)?;
        env.extend(secrets_file);
        for secret in &secrets {
            env.set(secret.name.clone(), secret.placeholder.clone());
        }
        if settings.network.value == NetworkMode::Open && !secrets.is_empty() {
            eprintln!("cvm: warning: with --network open nothing passes the proxy, so the proxied secrets' variables hold placeholders that no server accepts");
        }
    }
    for file in &args.env_files {
        env.extend(cvm::host::environment::read_file(file, None)?);
    }
    for name in &args.inherit_env {
        if let Ok(value) = std::env::var(name) {
            env.set(name.clone(), value);
        }
    }
    for (name, value) in &args.env {
        env.set(name.clone(), value.clone());
    }
    Ok(SessionConfig {
        shares: ShareRequest {
            project,
            mounts: settings.mounts.value.clone(),
            conversations: !args.no_conversations,
            allow_unsandboxed_fs: args.allow_unsandboxed_fs,
            quota: settings.share_quota.value,
            claude_items: CLAUDE_DEFAULT_ITEMS.iter().map(|s| s.to_string()).collect(),
            external: Vec::new(),
        },
        engine: {
            let (engine, why) = settings.vmm.value.engine();
            if let Some(why) = why {
                eprintln!("{why}");
            }
            engine
        },
        kernel: cvm::project::images::kernel(args.kernel.clone())?,
        image: cvm::project::images::image(&settings.image.value)?,
        cpus: settings.cpus.value,
        memory_bytes: settings.memory.value,
        // -v shows the guest's side too: its console, kernel and agent messages included.
        debug: args.debug || tracing::enabled!(tracing::Level::INFO),
        runtime_scripts: settings.runtime_scripts.value.clone(),
        scratch: settings.disk.value.map(Scratch::Fresh),
        template: None,
        runtime: true,
        egress: EgressPolicy {
            mode: settings.network.value,
            allow: settings.allow.value.clone(),
            deny: settings.deny.value.clone(),
            hosts: settings.hosts.value.clone(),
            upstream: cvm::network::egress::upstream_from_env().map_err(anyhow::Error::msg)?,
        },
        forwards,
        env,
        secrets,
        instructions: settings.instructions(root.as_deref())?,
        cold: args.cold,
    })
}

pub(crate) fn parse_mount(text: &str) -> Result<MountSpec, String> {
    parse_mount_spec(text, &std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default())
}
