//! `cvm run`, `cvm shell` and `cvm setup`: one session each, its exit status passed through.

use super::*;

#[derive(clap::Args, Clone)]
pub(crate) struct RunArgs {
    /// The project directory: shared read-write at its host path, where the command runs as
    /// you. Without it the command runs as root in `/` with nothing shared.
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub forwards: ForwardArgs,
    /// Print how long each phase took (VMM set-up, boot to agent ready, the command, teardown)
    /// on standard error.
    #[arg(long)]
    pub timings: bool,
    /// If the project has no template yet and its configuration asks for tools, packages or
    /// setup scripts, run `cvm setup` first.
    #[arg(long)]
    pub auto_setup: bool,
    /// Run in the git worktree of BRANCH (made beside the main checkout if missing, as
    /// `cvm worktree create`) instead of PATH.
    #[arg(long, value_name = "BRANCH", conflicts_with = "path")]
    pub worktree: Option<String>,
    /// The command and its arguments. Without one: Claude Code
    /// (`claude --dangerously-skip-permissions`) in the project, `.` unless PATH is given.
    #[arg(last = true)]
    pub command: Vec<OsString>,
}

#[derive(clap::Args, Clone)]
pub(crate) struct ShellArgs {
    /// The project directory, shared as with `cvm run`.
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub forwards: ForwardArgs,
}

#[derive(clap::Args, Clone)]
pub(crate) struct SetupArgs {
    /// The project (default: the current directory).
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub tools: ToolFlags,
    /// Another Debian package to install. Repeatable.
    #[arg(long = "package", value_name = "NAME")]
    pub packages: Vec<String>,
    /// A script to run after the packages (and after ~/.cvm.setup.sh), before
    /// ./.cvm.setup.sh. Repeatable.
    #[arg(long = "setup-script", value_name = "FILE")]
    pub setup_scripts: Vec<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// `cvm setup`'s `--NAME` for each of [`cvm::project::template::CAPABILITIES`], and `--all`.
#[derive(Clone, Default)]
pub(crate) struct ToolFlags {
    /// The capabilities asked for.
    pub on: Vec<&'static str>,
}

impl clap::FromArgMatches for ToolFlags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let all = matches.get_flag("all");
        Ok(ToolFlags {
            on: cvm::project::template::CAPABILITIES.iter().filter(|c| all || matches.get_flag(c.name)).map(|c| c.name).collect(),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for ToolFlags {
    fn augment_args(command: clap::Command) -> clap::Command {
        let flag = |name: &'static str, about: &'static str| clap::Arg::new(name).long(name).help(about).action(clap::ArgAction::SetTrue);
        cvm::project::template::CAPABILITIES
            .iter()
            .fold(command, |command, c| command.arg(flag(c.name, c.about)))
            .arg(flag("all", "Every capability above"))
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

/// `cvm run`, and `cvm "PROMPT"` (the prompt after the agent command).
pub(crate) fn run(args: &RunArgs, prompt: Vec<OsString>) -> ExitCode {
    session_exit(run_session(args, prompt))
}

pub(crate) fn run_session(args: &RunArgs, prompt: Vec<OsString>) -> anyhow::Result<u8> {
    let path = match &args.worktree {
        Some(branch) => Some(cvm::project::worktree::create(&std::env::current_dir()?, branch, None)?),
        None => args.path.clone(),
    };
    let project = cvm::session::run::default_project(path, !args.command.is_empty());
    let canonical = project.as_ref().and_then(|p| p.canonicalize().ok());
    let settings = settings(args.vm.flags(), canonical.as_deref())?;
    let command = match args.command.is_empty() {
        true => settings.agent_command().into_iter().map(OsString::from).chain(prompt).collect(),
        false => args.command.clone(),
    };
    let mut config = session_config(&settings, &args.vm, args.forwards.request()?, project, true)?;
    // A project's template, made by `cvm setup` on this image, is where it starts from.
    if let (Some(project), cvm::project::images::Image::Disk(image)) = (&canonical, &config.image) {
        config.template = cvm::project::template::find(project, image);
        if config.template.is_none() && args.auto_setup && wants_setup(&settings, project) {
            eprintln!("cvm: --auto-setup: {} has no template yet; running cvm setup first", project.display());
            let code = run_setup(&settings, &args.vm, project)?;
            if code != 0 {
                return Ok(code);
            }
            config.template = cvm::project::template::find(project, image);
        }
    }
    cvm::session::run::run(&config, command, settings.timeout.value, args.timings)
}

/// Whether the configuration asks for anything `cvm setup` would install or run.
pub(crate) fn wants_setup(settings: &Settings, project: &Path) -> bool {
    !settings.tools_on().is_empty()
        || !settings.packages.value.is_empty()
        || !settings.setup_scripts.value.is_empty()
        || project.join(cvm::project::template::HOME_SCRIPT).is_file()
}

/// `cvm setup`: the flags' tools, packages and scripts on top of the configuration's.
pub(crate) fn setup(args: SetupArgs) -> anyhow::Result<u8> {
    let project = args.path.clone().unwrap_or_else(|| PathBuf::from(".")).canonicalize()?;
    let mut flags = args.vm.flags();
    flags.tools = args.tools.on.iter().map(|name| (name.to_string(), true)).collect();
    flags.packages = args.packages.clone();
    flags.setup_scripts = args.setup_scripts.clone();
    let settings = settings(flags, Some(&project))?;
    run_setup(&settings, &args.vm, &project)
}

/// One session on a scratch disk that becomes the project's template.
pub(crate) fn run_setup(settings: &Settings, vm: &VmArgs, project: &Path) -> anyhow::Result<u8> {
    use cvm::project::template;
    let packages = template::packages(&settings.tools_on(), &settings.packages.value);
    // The user's scripts, read here: ~/.cvm.setup.sh, then [setup] scripts and --setup-script,
    // then the project's.
    let own = [home_dir().join(template::HOME_SCRIPT)].into_iter().filter(|p| p.is_file());
    let project_script = [project.join(template::HOME_SCRIPT)].into_iter().filter(|p| p.is_file());
    let scripts = own
        .chain(settings.setup_scripts.value.iter().cloned())
        .chain(project_script)
        .map(|p| cvm::host::host_files::read(&p, Some(project), cvm::host::host_files::MAX_PROJECT_FILE))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = session_config(settings, vm, ForwardRequest::default(), Some(project.to_path_buf()), false)?;
    config.shares.mounts.extend(settings.setup_mounts.value.iter().cloned());
    let dir = template::dir_for(project);
    std::fs::create_dir_all(&dir)?;
    let layer = dir.join("layer.ext4.new");
    cvm::project::images::make_scratch_disk(&layer, template::LAYER_BYTES)?;
    config.scratch = Some(Scratch::Kept(layer.clone()));
    config.runtime = false;
    let argv = template::command(&packages, &scripts).into_iter().map(<OsString as std::os::unix::ffi::OsStringExt>::from_vec).collect();
    let code = cvm::session::run::run(&config, argv, settings.timeout.value, false);
    match code {
        Ok(0) => {
            let kept = template::keep(project, &layer, config.image.path())?;
            eprintln!("cvm setup: the template for {} is ready ({})", project.display(), kept.display());
            Ok(0)
        }
        other => {
            let _ = std::fs::remove_file(&layer);
            other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(argv: &[&str]) -> Vec<&'static str> {
        match Cli::try_parse_from(["cvm", "setup"].iter().chain(argv)).unwrap().command {
            Command::Setup(args) => args.tools.on,
            _ => unreachable!(),
        }
    }

    #[test]
    fn setup_has_a_flag_per_capability_and_all_of_them_with_all() {
        assert_eq!(tools(&["--gpg", "--node"]), ["node", "gpg"], "in the table's order");
        assert_eq!(tools(&[]), Vec::<&str>::new());
        assert_eq!(tools(&["--all"]), cvm::project::template::CAPABILITIES.iter().map(|c| c.name).collect::<Vec<_>>());
        assert!(Cli::try_parse_from(["cvm", "setup", "--nodejs"]).is_err());
    }
}
